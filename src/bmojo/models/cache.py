"""``BMojoCache``: the generation cache of a B'MOJO model, one :class:`MixerState` per layer."""

from __future__ import annotations

import torch

from bmojo.layers.bmojo import MixerState


class BMojoCache:
    """Recurrent state of every layer: SSM and conv states, window and fading rings, eidetic memory.

    Its size is independent of the context length for SSM, SWA, B'MOJO-F and B'MOJO layers; only
    full-attention layers keep every key and value.
    """

    is_croppable = False  # (Hugging Face ``generate`` asks before it defers a stop decision)

    def __init__(self, num_layers: int, store_ids: torch.Tensor | None = None, max_length: int | None = None) -> None:
        """``store_ids [B]``: sequences of the layers' vector stores to read and extend (default: new ones).

        ``max_length``: a static cache, for at most that many tokens (Hugging Face ``generate(...,
        cache_implementation="static")`` makes one): after the prefill (:meth:`prefilled`) its full-attention buffers
        hold room for all of them and every state tensor keeps its address, so that a compiled decoding step is one
        graph for every position, replayed as a CUDA graph under ``mode="reduce-overhead"``; ``generate`` then compiles
        the steps by itself on CUDA (:attr:`is_compileable`; ``compile_config`` sets how).
        """
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 (or None), got {max_length}")
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.layers = [MixerState(store_ids=store_ids) for _ in range(num_layers)]
        self.max_length = max_length
        self.layout: tuple | None = None  # what the model that filled it says of its layers (``BMojoModel``)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, idx: int) -> MixerState:
        return self.layers[idx]

    @property
    def is_linear(self) -> list[bool]:
        """Hugging Face ``generate``'s per-layer flag for attention with a fixed-size state, which it reads of a cache
        passed in: all ``False``, so that it feeds only the tokens the cache has not seen, as every layer here needs."""
        return [False] * len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far."""
        return self.layers[layer_idx].seen

    def nbytes(self) -> int:
        """Bytes held by all layers' states."""
        return sum(state.nbytes() for state in self.layers)

    def layer_nbytes(self) -> list[int]:
        """Bytes held by each layer's state."""
        return [state.nbytes() for state in self.layers]

    @property
    def is_compileable(self) -> bool:
        """Whether Hugging Face ``generate`` may compile the decoding steps: for a static cache (``max_length``)."""
        return self.max_length is not None

    @property
    def started(self) -> bool:
        """Whether a prefill has filled the cache (a forward then continues it token by token)."""
        return len(self.layers) > 0 and self.layers[0].started

    @torch.compiler.disable
    def advance(self, tokens: int) -> None:
        """Count ``tokens`` more tokens seen by every layer (after steps run with ``advance=False`` and
        :meth:`advance_positions`), bringing the eidetic memories built so far into use at chunk boundaries
        (:meth:`MixerState.advance`). Outside compiled code, so that a compiled decoding step has no int inputs,
        replays as one CUDA graph at every position and leaves the boundaries' copies out."""
        for state in self.layers:
            state.advance(tokens)

    def prefilled(self) -> None:
        """After a prefill, where each layer made its own position tensor (all holding the tokens seen), make them
        one, so that a step advances it once for every layer (:meth:`advance_positions`); a static cache
        (``max_length``) then reserves room for ``max_length`` tokens (:meth:`reserve`) and marks its tensors'
        addresses static (:meth:`mark_static_addresses`)."""
        for state in self.layers[1:]:
            state.pos = self.layers[0].pos
        if self.max_length is not None and self.layers:
            seen = self.get_seq_length()
            if seen > self.max_length:
                raise ValueError(f"the prompt ({seen} tokens) is longer than the static cache's max_length "
                                 f"({self.max_length})")  # fmt: skip
            self.reserve(self.max_length - seen)
            self.mark_static_addresses()

    def advance_positions(self, tokens: int) -> None:
        """Add ``tokens`` to the position tensor the layers share after the prefill (:meth:`prefilled`), after steps
        run with ``advance=False`` and before :meth:`advance`: inside a compiled step, one kernel for every layer (and
        no guard on which tensor it is, so that a step compiled for one cache serves the next)."""
        if self.layers:
            self.layers[0].pos.add_(tokens)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep the batch rows ``beam_idx [B]`` of every layer's state, in that order (Hugging Face beam search calls
        it after each step; :meth:`MixerState.select_rows`)."""
        for state in self.layers:
            state.select_rows(beam_idx)

    def reserve(self, tokens: int) -> None:
        """Room for exactly ``tokens`` more tokens in the full-attention layers' key buffers (a compiled step reads
        the whole buffer, masked; other layers' states are fixed)."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        for state in self.layers:
            state.reserve(tokens, exact=True)

    def mark_static_addresses(self) -> None:
        """Tell ``torch.compile`` that every state tensor keeps its address (``torch._dynamo.mark_static_address``):
        decoding updates them in place, so a step compiled with ``mode="reduce-overhead"`` can replay as a CUDA graph.
        Call after the prefill and :meth:`reserve` (a full-attention buffer that grows moves)."""
        for t in (t for state in self.layers for t in state.tensors()):
            torch._dynamo.mark_static_address(t)

    @property
    def device(self) -> torch.device | None:
        tensors = [t for state in self.layers for t in state.tensors()]
        return tensors[0].device if tensors else None
