"""The B'MOJO mixer: fading memory (SSM) + short-term eidetic memory (window) + innovation-selected eidetic memory.

For pre-normed hidden states ``h [B, L, D]`` (SPEC section 2):

1. fading memory: ``f = SSM(h)``; ``f_t`` summarises everything up to ``t``;
2. short-term eidetic memory: query ``i`` attends to raw keys/values at ``[i-w+1, i]``;
3. fading band: query ``i`` attends to keys/values of fading tokens at ``[i-2w+1, i-w]``, made with
   the same projections (tied) and RoPE at the position of the token they summarise;
4. eidetic memory: up to ``k`` raw past tokens chosen by the innovation test (``layers.eidetic``);
5. optional long-term memory: each query's top-``r`` keys retrieved from a vector store of tokens that
   left the eidetic memory (``layers.storage``);
6. one softmax over the union (``ops.attention.union_attention``: our Triton kernels on CUDA, the fused CPU
   flash-attention kernel over strided views of the band keys on CPU, with the eidetic tokens merged exactly by
   log-sum-exp; retrieved tokens are merged by log-sum-exp too, and in decoding every key joins the step's
   softmax), then ``out = Wo o``.

Transformers, sliding-window Transformers, Mamba and B'MOJO-F are configurations of this one
module: no SSM and no window (full causal attention), no SSM with a window, an SSM and no
attention (the read-out is the SSM output), and no eidetic memory.

Parallel mode (training, prefill, and several tokens continuing a state) and recurrent mode (decoding with a
:class:`MixerState`) give the same outputs: the state keeps the SSM state, a ``w``-slot ring of raw keys/values, a
``w``-slot ring of the fading band's keys/values, the last ``w`` fading tokens (each projected into the band
``w`` steps after it is made) and ``2k`` eidetic keys/values (the memory in use and the one being built for the
next chunk boundary), so its size does not depend on the context length; only full attention (no window) keeps
every key.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from bmojo.layers.attention import Attention, Rope
from bmojo.layers.checks import check_hidden_states
from bmojo.layers.eidetic import EideticMemory, chunk_memories, memory_before, merge_topk, stage_evicted
from bmojo.layers.linear import Linear
from bmojo.layers.ssm import Mamba, Mamba2, SSMState
from bmojo.layers.storage import StorageConfig, VectorStore, in_batch_retrieval, store_membership
from bmojo.ops.attention import (
    ATTENTION_IMPLS,
    Band,
    ChunkMemory,
    causal_attention,
    merge_attention,
    step_attention,
    union_attention,
)

SSM_TYPES = {"mamba": Mamba, "mamba2": Mamba2}


@dataclass
class MixerState:
    """Recurrent state of one mixer after ``seen`` tokens.

    ``pos [1]``: ``seen`` as a tensor on the state's device, from which decoding computes its ring slots, so that a
    compiled step does not depend on the Python integer (one graph for every position).
    ``win_*``: raw keys/values ``[B, Hkv, S, d]`` in ring slots ``pos % w`` (``full`` attention: all tokens in order,
    in a buffer that grows by an eighth when full, :meth:`reserve`), with positions ``win_pos [B, S]`` (``-1`` =
    empty) and eidetic scores ``win_score [B, S]``.
    ``fad_*``: the fading band, keys/values of the fading tokens of positions ``pos - 2w .. pos - w - 1`` in ring
    slots ``p % w``; ``f_pend [B, w, D]``: the fading tokens of the last ``w`` positions (slots ``p % w``), each
    projected into the band when it enters it. ``mem_*``: the eidetic memory in use
    (positions ``[B, k]``), ``stage_*``: the best ``k`` tokens that have left the window so far,
    which becomes the memory in use at the next chunk boundary. ``f_last [B, D]``: last fading token.
    With a window, ``keys``/``values [B, Hkv, w (+ w) (+ k), d]`` and ``positions [B, w (+ w) (+ k)]`` hold the
    window's, fading and eidetic keys, values and positions in one buffer each, which a decoding step reads at once
    (every slot holds a key its query sees, or a negative position): ``win_k``, ``fad_k``, ``mem_k`` (and the
    ``_v``, ``_pos``) are views of them. With storage: ``store_ids [B]``, the sequences of the layer's vector store
    this batch reads and writes; ``pend_*``: this chunk's tokens that left the window (``write="all"``), ring slots
    ``t % c``. ``chunk``: the eidetic memory's selection period ``c`` (0: no eidetic memory).
    ``pads [B]``: rows of different lengths (a padded batch): row ``b`` has seen ``pads[b]`` tokens fewer than ``pos``;
    ring slots follow the batch's positions (``pos``), while RoPE, the positions kept (``*_pos``, which say what a
    query sees) and the chunk boundaries follow each row's own, ``pos - pads``. ``None``: every row at ``pos``.
    """

    seen: int = 0
    pos: torch.Tensor | None = None
    chunk: int = 0
    full: bool = False
    ssm: SSMState | None = None
    f_last: torch.Tensor | None = None
    win_k: torch.Tensor | None = None
    win_v: torch.Tensor | None = None
    win_pos: torch.Tensor | None = None
    win_score: torch.Tensor | None = None
    fad_k: torch.Tensor | None = None
    fad_v: torch.Tensor | None = None
    fad_pos: torch.Tensor | None = None
    f_pend: torch.Tensor | None = None
    mem_k: torch.Tensor | None = None
    mem_v: torch.Tensor | None = None
    mem_pos: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    stage_k: torch.Tensor | None = None
    stage_v: torch.Tensor | None = None
    stage_pos: torch.Tensor | None = None
    stage_score: torch.Tensor | None = None
    store_ids: torch.Tensor | None = None
    pend_k: torch.Tensor | None = None
    pend_v: torch.Tensor | None = None
    pend_pos: torch.Tensor | None = None
    pads: torch.Tensor | None = None

    @property
    def started(self) -> bool:
        """Whether a prefill has filled the state (the layer then continues it token by token)."""
        return self.pos is not None

    def advance(self, tokens: int) -> None:
        """Count ``tokens`` more tokens seen (which ``pos`` already counts), then :meth:`enter_chunk`."""
        self.seen += tokens
        self.enter_chunk(self.seen)

    def enter_chunk(self, t: int, pos: torch.Tensor | None = None) -> None:
        """Before the token at position ``t`` (``pos``, default ``self.pos``, holds it as a tensor): at a chunk
        boundary the eidetic memory built so far (``stage_*``) comes into use (``mem_*``). Eager: only then; compiled:
        a masked copy at every position, so that the graph does not depend on ``t`` (a compiled model leaves it to
        ``BMojoCache.advance``, which runs eager); with :attr:`pads`, a copy masked by each row's own boundaries. The
        copies write the joined buffers rather than views of them, so inductor updates them in place."""
        masked = torch.compiler.is_compiling() or self.pads is not None
        if not self.chunk or not (masked or t % self.chunk == 0):
            return
        slots, stage = self.memory_slots(), (self.stage_k, self.stage_v, self.stage_pos)
        if masked:
            boundary = self.own_positions(self.pos if pos is None else pos) % self.chunk == 0  # [1] or [B, 1]
            stage = [torch.where(boundary.view(-1, *[1] * (x.dim() - 1)), x, joined.index_select(dim, slots))
                     for x, joined, dim in zip(stage, (self.keys, self.values, self.positions), (2, 2, 1))]  # fmt: skip
        self.write_slots(slots, *stage)

    def own_positions(self, at: torch.Tensor) -> torch.Tensor:
        """Positions ``at [n]`` of the batch as each row's own: ``at``, or ``[B, n]`` with :attr:`pads`."""
        return at if self.pads is None else at - self.pads[:, None]

    def memory_slots(self) -> torch.Tensor:
        """The eidetic memory's slots, last in the joined buffers ``keys``/``values``/``positions``."""
        n, k = self.positions.shape[1], self.stage_pos.shape[1]
        return torch.arange(n - k, n, device=self.positions.device)

    def write_slots(
        self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None
    ) -> None:
        """Keys and values ``[B, Hkv, n, d]`` and their positions (``[n]`` or ``[B, n]``; ``None``: the caller writes
        them) into ``slots [n]`` of the joined buffers (of ``win_*`` for full attention, slot = position). Writes the
        buffers themselves rather than views of them, so that inductor updates them in place."""
        buffers = (self.win_k, self.win_v, self.win_pos) if self.full else (self.keys, self.values, self.positions)
        buffers[0].index_copy_(2, slots, k)
        buffers[1].index_copy_(2, slots, v)
        if positions is not None:
            buffers[2].index_copy_(1, slots, positions.expand(k.shape[0], -1))

    def reserve(self, tokens: int, exact: bool = False) -> None:
        """Room for ``tokens`` more keys in a full-attention buffer: grown, when short, by at least an eighth (so
        that decoding token by token copies the keys O(1) times per token on average), or by exactly what is
        missing (``exact``: a compiled step reads the whole buffer); a no-op for other states."""
        if self.full and self.seen + tokens > self.win_k.shape[2]:
            missing = self.seen + tokens - self.win_k.shape[2]
            extra = missing if exact else max(64, self.seen // 8, missing)
            self.win_k, self.win_v = (F.pad(x, (0, 0, 0, extra)) for x in (self.win_k, self.win_v))
            self.win_pos = F.pad(self.win_pos, (0, extra), value=-1)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds (views of ``keys``/``values`` too), each once."""
        out = [] if self.ssm is None else [self.ssm.conv, self.ssm.ssm]
        out += [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]
        return list({id(t): t for t in out}.values())

    def _buffers(self) -> list[torch.Tensor]:
        """:meth:`tensors` but the views of ``keys``/``values``/``positions``, told by their storage (a view made under
        ``torch.inference_mode`` does not know its base)."""
        joined = [t for t in (self.keys, self.values, self.positions) if t is not None]
        storages = {j.untyped_storage().data_ptr() for j in joined}
        return [
            t for t in self.tensors() if t.untyped_storage().data_ptr() not in storages or any(t is j for j in joined)
        ]

    def nbytes(self) -> int:
        """Bytes held by the state (the views of ``keys``/``values``/``positions`` counted in them)."""
        return sum(t.numel() * t.element_size() for t in self._buffers())

    def select_rows(self, rows: torch.Tensor) -> None:
        """Make batch row ``i`` the current row ``rows[i]`` for every ``i`` (``rows [B]``, repeats allowed: the rows
        beam search keeps), in place: every tensor keeps its storage (a compiled step's static addresses)."""
        if self.store_ids is not None:
            raise NotImplementedError("reordering the batch of a layer with long-term storage is not supported: its "
                                      "rows read and write their own sequences of the vector store")  # fmt: skip
        batched = [t for t in self._buffers() if t is not self.pos]  # (the position, [1], is every row's)
        if not batched:
            return
        b = batched[0].shape[0]
        if rows.dim() != 1 or len(rows) != b or rows.is_floating_point() or rows.is_complex():
            raise ValueError(f"rows must be {b} integer batch indices [B], got {rows.dtype} {tuple(rows.shape)}")
        if ((rows < 0) | (rows >= b)).any():
            raise ValueError(f"rows must lie in [0, {b}), got {rows.tolist()}")
        for t in batched:
            t.copy_(t.index_select(0, rows.to(t.device)))

    def join_keys(self) -> None:
        """Put the window's, fading and eidetic keys (values, positions) in one buffer, ``keys`` (``values``,
        ``positions``), and make the pieces views of it."""
        for kind, joined_name, dim in (("k", "keys", 2), ("v", "values", 2), ("pos", "positions", 1)):
            names = [f"{part}_{kind}" for part in ("win", "fad", "mem") if getattr(self, f"{part}_{kind}") is not None]
            pieces = [getattr(self, name) for name in names]
            joined = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)
            setattr(self, joined_name, joined)
            for name, view in zip(names, joined.split([piece.shape[dim] for piece in pieces], dim)):
                setattr(self, name, view)


def _rows(rope: Rope, rows: slice) -> Rope:
    """``rope`` (``(cos, sin) [..., n, r]`` or ``None``) at some of its positions."""
    return None if rope is None else (rope[0][..., rows, :], rope[1][..., rows, :])


def _gather_positions(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``x [B, H, L, d]`` at positions ``pos [B, *idx]`` (``-1`` read as 0) -> ``[B, H, *idx, d]``."""
    b, h, _, d = x.shape
    flat = pos.clamp_min(0).reshape(b, 1, -1, 1).expand(b, h, -1, d)
    return x.gather(2, flat).reshape(b, h, *pos.shape[1:], d)


def roll_rows(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """``x [B, L, ...]`` with row ``b`` turned ``shifts[b]`` places to the left: ``out[b, i] = x[b, (i + shifts[b]) %
    L]`` (``shifts [B]``; negative: to the right)."""
    length = x.shape[1]
    idx = (torch.arange(length, device=x.device) + shifts[:, None]) % length
    return x.gather(1, idx.view(*idx.shape, *[1] * (x.dim() - 2)).expand_as(x))


def _ring_fill(x: torch.Tensor, size: int, pads: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring buffer of the last ``size`` entries of ``x [B, ..., L, d]`` (time on dim -2): ``(buffer [B, ..., size, d],
    positions [B, size])``, entry ``p`` in slot ``p % size`` (empty slots: zeros, position ``-1``). With ``pads [B]``
    (:attr:`MixerState.pads`) row ``b``'s entries end at ``L - pads[b]``, each in the slot of ``p + pads[b]``."""
    length, b = x.shape[-2], x.shape[0]
    at = torch.arange(max(0, length - size), length, device=x.device)  # the slots' positions
    if pads is None:
        entries, own = x[..., at, :], at.expand(b, -1)
    else:
        own = at - pads[:, None]
        heads = x if x.dim() == 4 else x.unsqueeze(1)  # [B, H, L, d]
        entries = _gather_positions(heads, own).masked_fill((own < 0)[:, None, :, None], 0)
        entries = entries if x.dim() == 4 else entries.squeeze(1)
    buf = x.new_zeros(*x.shape[:-2], size, x.shape[-1])
    positions = torch.full((b, size), -1, dtype=torch.long, device=x.device)
    buf[..., at % size, :] = entries
    positions[:, at % size] = own.clamp(min=-1)
    return buf, positions


class BMojoMixer(nn.Module):
    """One B'MOJO layer mapping ``h [B, L, D] -> out [B, L, D]``; every special case is a configuration.

    Args:
        ssm: ``"mamba"``, ``"mamba2"`` or ``None`` (no fading memory).
        attention: attend at all; ``False`` makes the layer the SSM alone (Mamba / Mamba-2).
        window: sliding window ``w`` (tokens including the query itself); ``None`` = full causal attention.
        fading: attend to the fading band (needs ``ssm`` and ``window``).
        eidetic_size: eidetic memory slots ``k`` (0 = B'MOJO-F).
        selection: ``innovation | random | recency | none``.
        chunk_size: selection period ``c`` (default ``w``).
        tie_fading_kv: fading keys/values use the raw ``k_proj, v_proj`` (else their own).
        block_size: query block of the CPU read-out and of the banded reference attention.
        attention_impl: the read-out's implementation (``union_attention``'s ``impl``: ``auto | triton | flex |
            blocks | merge``).
        ssm_kwargs: passed to the SSM constructor (``state_size``, ``expand``, ...).
        attention_kwargs: passed to :class:`Attention` (``norm_eps``, ``rope``).
        storage: long-term memory settings (needs the eidetic memory); ``None`` = no store.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 1,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        ssm: str | None = "mamba2",
        attention: bool = True,
        window: int | None = None,
        fading: bool = True,
        eidetic_size: int = 0,
        selection: str = "innovation",
        chunk_size: int | None = None,
        qk_norm: bool = False,
        rope_theta: float = 10000.0,
        attention_bias: bool = False,
        tie_fading_kv: bool = True,
        block_size: int = 64,
        attention_impl: str = "auto",
        ssm_kwargs: dict | None = None,
        attention_kwargs: dict | None = None,
        seed: int = 0,
        storage: StorageConfig | None = None,
    ) -> None:
        super().__init__()
        if ssm is not None and ssm not in SSM_TYPES:
            raise ValueError(f"unknown ssm {ssm!r}; expected one of {sorted(SSM_TYPES)} or None")
        if not attention and ssm is None:
            raise ValueError("a mixer needs an SSM, attention, or both")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window_size must be an integer >= 1 (or None for full attention), got {window!r}")
        if attention and fading and (ssm is None or window is None):
            raise ValueError("the fading band needs both an SSM and a finite window")
        if eidetic_size < 0:
            raise ValueError(f"eidetic_size must be >= 0, got {eidetic_size}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
        if attention and eidetic_size > 0 and selection != "none" and window is None:
            raise ValueError("eidetic memory needs a finite window (tokens are selected once they leave it)")
        self.hidden_size = hidden_size
        self.window = window
        self.fading = attention and fading
        self.block_size = block_size
        self.attention_impl = attention_impl
        self.ssm = None if ssm is None else SSM_TYPES[ssm](hidden_size, **(ssm_kwargs or {}))
        attn_args = (hidden_size, num_heads, num_kv_heads, head_dim, qk_norm, rope_theta, attention_bias)
        self.attn = Attention(*attn_args, **(attention_kwargs or {})) if attention else None
        self.fading_k_proj = self.fading_v_proj = None
        if self.fading and not tie_fading_kv:
            self.fading_k_proj = Linear(hidden_size, self.attn.num_kv_heads * self.attn.head_dim, bias=False)
            self.fading_v_proj = Linear(hidden_size, self.attn.num_kv_heads * self.attn.head_dim, bias=False)
        use_memory = attention and eidetic_size > 0 and selection != "none"
        self.memory = (
            EideticMemory(
                hidden_size, eidetic_size, window, window if chunk_size is None else chunk_size, selection, seed
            )  # fmt: skip
            if use_memory
            else None
        )
        if storage is not None and self.memory is None:
            raise ValueError("storage needs the eidetic memory (attention, a window, eidetic_size > 0, a selection)")
        self.storage = storage
        self.store = None if storage is None else VectorStore(self.attn.head_dim, self.attn.num_kv_heads, storage)

    def forward(
        self, h: torch.Tensor, state: MixerState | None = None, advance: bool = True, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, MixerState | None]:
        """``h [B, L, D] -> (out [B, L, D], auxiliary predictor loss or None, state)``.

        Without ``state`` the sequence is processed in parallel from position 0. With an empty
        ``state`` it is processed in parallel and the state is filled (prefill); with a non-empty
        one the tokens continue it: several in one parallel pass (:meth:`_continue`; not with long-term storage),
        else each a recurrent step; ``advance=False`` leaves the state's token count for the caller to advance:
        ``state.pos`` (a tensor, which the layers of a ``BMojoCache`` share: one addition a step for all,
        ``BMojoCache.advance_positions``) and ``state.seen`` (a Python int), outside compiled code
        (``BMojoCache.advance``): an int that a compiled step changes would be an input of its graph, and CUDA graphs
        record one per value.
        ``valid [B, L]`` (bool, passes from an empty state only): each row's tokens, padding after them (the layer is
        causal, so it leaves their outputs as they are): the auxiliary loss averages over the tokens, and a state is
        filled with each row's state at its own end (:attr:`MixerState.pads`).
        """
        weights = self.attn.q_proj.weight if self.attn is not None else self.ssm.in_proj.weight
        check_hidden_states(h, self.hidden_size, weights.dtype)
        if valid is not None and (valid.shape != h.shape[:2] or valid.dtype != torch.bool):
            raise ValueError(f"valid must be bool [batch, length] {tuple(h.shape[:2])}, got {valid.dtype} "
                             f"{tuple(valid.shape)}")  # fmt: skip
        if state is None or not state.started:
            return self._parallel(h, state, valid)
        if valid is not None:
            raise ValueError("valid positions are for passes from an empty state; continuing one takes every token")
        if state.win_pos is not None and state.win_pos.shape[0] != h.shape[0]:
            raise ValueError(f"the state holds {state.win_pos.shape[0]} sequences but the input {h.shape[0]}")
        state.reserve(h.shape[1])
        if state.pads is None and self._continues_in_parallel(h.shape[1]):  # (padded rows: each its own chunks)
            out = self._continue(h, state)
        else:
            outs = []
            for i in range(h.shape[1]):
                pos = state.pos + i if i else state.pos  # (state.pos is advanced after all the tokens)
                if i:  # (the state's first token: the caller's advance entered its chunk)
                    state.enter_chunk(state.seen + i, pos)
                outs.append(self._step(h[:, i : i + 1], state, state.seen + i, pos))
            out = torch.cat(outs, dim=1)
        if advance:
            state.pos.add_(h.shape[1])
            state.advance(h.shape[1])
        return out, None, state

    # ---------------------------------------------------------------- parallel (training, prefill)
    def _parallel(
        self, h: torch.Tensor, state: MixerState | None, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, MixerState | None]:
        length = h.shape[1]
        pads = None if state is None or valid is None else length - valid.sum(1)  # rows' states at their own ends
        if pads is not None and self.store is not None:
            raise NotImplementedError("padded rows with long-term storage are not supported: each row would write its "
                                      "vector store from its own end")  # fmt: skip
        f = ssm_state = None
        if self.ssm is not None:
            if pads is None:
                f, ssm_state = self.ssm(h)
            else:  # each row's tokens moved to end at L, the padding before them taking no step
                f, ssm_state = self.ssm(
                    roll_rows(h, -pads), tokens=torch.arange(length, device=h.device) >= pads[:, None]
                )
                f = roll_rows(f, pads)
        if state is not None:
            state.seen, state.pos, state.ssm = length, torch.tensor([length], device=h.device), ssm_state
            state.pads = pads
            state.f_last = None  # (below: each row's last fading token, a copy, which decoding overwrites in place)
            if f is not None:
                state.f_last = (f[:, -1] if pads is None else f[torch.arange(len(pads)), length - 1 - pads]).clone()
        if self.attn is None:
            return f, None, state

        w = self.window
        pos = torch.arange(length, device=h.device)
        rope = self.attn.rope(pos)
        q = self.attn.queries(h, rope)
        k, v = self.attn.keys_values(h, rope)
        aux = scores = fading = eidetic = None
        bands = [Band(k, v, 0, None if w is None else w - 1)]
        if self.fading:
            # no query sees the fading keys of the last w positions (the recurrent state keeps their tokens)
            seen = max(0, length - w)
            rope_f = None if rope is None else (rope[0][:seen], rope[1][:seen])
            fading = self.attn.keys_values(f[:, :seen], rope_f, self.fading_k_proj, self.fading_v_proj)
            bands.append(Band(*(F.pad(x, (0, 0, 0, length - seen)) for x in fading), w, 2 * w - 1))
        if self.memory is not None:
            f_prev = F.pad(f[:, :-1], (0, 0, 1, 0))
            scores, aux = self.memory.score(h, f_prev, pos, valid)
            # memories of every chunk, plus the one holding the next position (recurrent state, storage)
            memories = chunk_memories(scores, w, self.memory.chunk_size, self.memory.size,
                                      length // self.memory.chunk_size + 1)  # fmt: skip
            if pads is not None:  # the staging memory of each row's own tokens that have left its window
                memories = (memories[0], memory_before(scores, length - pads - w, self.memory.size))
            eidetic = self._eidetic_memory(k, v, memories, state)
        retrieve = self.store is not None and (state is not None or self.storage.in_batch)
        if retrieve or (w is not None and w < length):
            o, lse = union_attention(q, bands, eidetic, self.block_size, self.attention_impl)
            if retrieve:
                o, _ = merge_attention([(o, lse), self._storage_attention(q, k, v, memories[0], state)])
        else:  # each query's window holds every earlier token: the memories stay empty, the fading band unseen
            o = causal_attention(q, k, v)
        out = self.attn.output(o)

        if state is not None:
            self._fill_state(state, k, v, pos, fading, f, scores)
        return out, aux, state

    def _eidetic_memory(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        memories: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
        state: MixerState | None,
    ) -> ChunkMemory:
        """Keys/values of each chunk's eidetic memory (``memories`` from :func:`chunk_memories` for chunks
        ``0..L//c``); fills ``state.mem_*``/``stage_*``."""
        length, c = k.shape[2], self.memory.chunk_size
        mem_pos, (stage_score, stage_pos) = memories
        if state is not None:  # the memory in use at each row's next position
            now = (length if state.pads is None else length - state.pads) // c
            state.chunk, state.mem_pos = c, mem_pos[torch.arange(len(mem_pos), device=mem_pos.device), now]
            state.mem_k, state.mem_v = _gather_positions(k, state.mem_pos), _gather_positions(v, state.mem_pos)
            state.stage_pos, state.stage_score = stage_pos, stage_score
            state.stage_k, state.stage_v = _gather_positions(k, stage_pos), _gather_positions(v, stage_pos)
        mem_pos = mem_pos[:, : -(-length // c)]
        return ChunkMemory(_gather_positions(k, mem_pos), _gather_positions(v, mem_pos), mem_pos >= 0, c)

    def _storage_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem_pos: torch.Tensor, state: MixerState | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's top-``r`` keys among its chunk's store: this pass's evicted tokens (exact) and, with a
        state, rows already in the vector store; then writes the store of the chunk holding the next position."""
        b, _, length, _ = q.shape
        c, w = self.memory.chunk_size, self.window
        member = store_membership(mem_pos, length, w, c, self.storage.write)
        stored = None
        if state is not None:
            if state.store_ids is None:
                state.store_ids = torch.tensor(self.store.new_sequences(b))
            if state.store_ids.shape != (b,):
                raise ValueError(f"store_ids must hold one sequence id per batch row ({b}), got {state.store_ids}")
            if any(self.store.count(s) for s in state.store_ids.tolist()):
                stored = self.store.retrieve(state.store_ids.tolist(), q, self.storage.topk)
            rows, pos = member[:, length // c].nonzero(as_tuple=True)
            self.store.add(state.store_ids[rows.cpu()], pos, k[rows, :, pos], v[rows, :, pos])
            if self.storage.write == "all":
                state.pend_k = k.new_zeros(*k.shape[:2], c, k.shape[3])
                state.pend_v = torch.zeros_like(state.pend_k)
                state.pend_pos = torch.full((c,), -1, dtype=torch.long, device=k.device)
                cand = torch.arange(max(0, length // c * c - w), max(0, length - w), device=k.device)
                state.pend_k[:, :, (cand + w) % c], state.pend_v[:, :, (cand + w) % c] = k[:, :, cand], v[:, :, cand]
                state.pend_pos[(cand + w) % c] = cand
        return in_batch_retrieval(q, k, v, member, c, self.storage.topk, stored)

    def _fill_state(
        self,
        state: MixerState,
        k: torch.Tensor,
        v: torch.Tensor,
        pos: torch.Tensor,
        fading: tuple[torch.Tensor, torch.Tensor] | None,
        f: torch.Tensor | None,
        scores: torch.Tensor | None,
    ) -> None:
        """Recurrent state after a parallel pass over positions ``pos`` with keys/values ``k, v``, the ``fading``
        band's (positions ``< L - w``) and fading tokens ``f``."""
        w, b, pads = self.window, k.shape[0], state.pads
        state.full = w is None
        if w is None and pads is None:
            state.win_k, state.win_v, state.win_pos = k, v, pos.repeat(b, 1)
            return
        size = k.shape[2] if w is None else w  # (full attention: slot = position)
        (state.win_k, state.win_pos), (state.win_v, _) = (_ring_fill(x, size, pads) for x in (k, v))
        if w is None:
            return
        if scores is not None:  # (a mask's selection would have a data-dependent size: a graph break when compiled)
            state.win_score = torch.where(state.win_pos >= 0, scores.gather(1, state.win_pos.clamp(min=0)), 0.0)
        if fading is not None:
            (state.fad_k, state.fad_pos), (state.fad_v, _) = (_ring_fill(x, w, pads) for x in fading)
            state.f_pend, _ = _ring_fill(f, w, pads)
        state.join_keys()

    def _fading_after(
        self, h: torch.Tensor, state: MixerState, positions: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """For tokens ``h [B, L, D]`` at ``positions [L]`` continuing ``state``: their fading tokens ``f [B, L, D]``
        (the SSM from the state's, which it advances in place, as ``f_last``) and innovation scores ``[B, L]`` (each
        token's given the fading token before it); ``None`` for what the layer lacks."""
        f = score = None
        if self.ssm is not None:
            f, _ = self.ssm(h, state.ssm, inplace=True)
        if self.memory is not None:
            f_prev = state.f_last.unsqueeze(1)
            score, _ = self.memory.score(h, f_prev if h.shape[1] == 1 else torch.cat([f_prev, f[:, :-1]], 1), positions)
        if f is not None:
            state.f_last.copy_(f[:, -1])
        return f, score

    # ---------------------------------------------------------------- continuation (several tokens after a state)
    def _continues_in_parallel(self, length: int) -> bool:
        """Whether ``length`` tokens after a state run as one parallel pass (:meth:`_continue`) rather than steps:
        without long-term storage, from 2 tokens on, and for a window ``w`` from ``w / 16`` on (the pass also reads the
        ``2w`` positions before the tokens: on the CPU bench model, window 256, it takes as long as 12 steps)."""
        return self.store is None and length >= max(2, (self.window or 0) // 16)

    @torch.compiler.disable
    def _continue(self, h: torch.Tensor, state: MixerState) -> torch.Tensor:
        """The tokens ``h [B, L, D]`` at positions ``s .. s+L-1`` after a state of ``s`` tokens in one parallel pass
        (the recurrent steps' outputs, to float rounding), updating the state in place as the steps would. Eager
        under ``torch.compile`` too (a graph break): its shapes follow ``s``, so a graph would be compiled per call.

        With a window the read-out runs over an extended sequence of positions ``p0 .. s+L-1``, ``p0 = max(0, s-2w)``
        rounded down to a chunk boundary: before ``s`` it holds what the state keeps (the window ring's raw keys, the
        fading band's keys, the pending fading tokens, projected now) and queries of zeros, whose outputs are
        dropped; the eidetic memory of each chunk starting in the pass merges the state's staging memory with the
        tokens leaving the window (:func:`merge_topk`)."""
        s, length, w = state.seen, h.shape[1], self.window
        new = torch.arange(s, s + length, device=h.device)
        f, score = self._fading_after(h, state, new)
        if self.attn is None:
            return f
        if w is None:
            rope = self.attn.rope(new)
            q, (k, v) = self.attn.queries(h, rope), self.attn.keys_values(h, rope)
            state.write_slots(new, k, v, new)
            o = causal_attention(q, state.win_k[:, :, : s + length], state.win_v[:, :, : s + length])
            return self.attn.output(o)

        c = 1 if self.memory is None else self.memory.chunk_size
        p0 = max(0, s - 2 * w) // c * c
        lead, total = s - p0, s + length - p0  # positions before the tokens, and in all, of the extended sequence
        rope = self.attn.rope(torch.arange(p0, s + length, device=h.device))
        q = F.pad(self.attn.queries(h, _rows(rope, slice(lead, None))), (0, 0, lead, 0))
        k_new, v_new = self.attn.keys_values(h, _rows(rope, slice(lead, None)))
        held = torch.arange(max(p0, s - w), s, device=h.device)  # the window ring's positions that a query sees
        k, v = (torch.cat([F.pad(ring.index_select(2, held % w), (0, 0, max(p0, s - w) - p0, 0)), x], 2)
                for ring, x in ((state.win_k, k_new), (state.win_v, v_new)))  # fmt: skip
        bands = [Band(k, v, 0, w - 1)]
        fading = None
        if self.fading:
            ring = torch.arange(max(0, s - 2 * w), max(0, s - w), device=h.device)  # the band's ring: projected
            pend = torch.arange(max(0, s - w), s, device=h.device)  # pending fading tokens, then the new ones
            tokens = torch.cat([state.f_pend.index_select(1, pend % w), f[:, : max(0, length - w)]], 1)
            at = slice(max(0, s - w) - p0, max(0, s - w) - p0 + tokens.shape[1])  # (the tokens' positions)
            projected = self.attn.keys_values(tokens, _rows(rope, at), self.fading_k_proj, self.fading_v_proj)
            fading = [torch.cat([F.pad(band.index_select(2, ring % w), (0, 0, max(0, s - 2 * w) - p0, 0)), x], 2)
                      for band, x in ((state.fad_k, projected[0]), (state.fad_v, projected[1]))]  # fmt: skip
            fading = [F.pad(x, (0, 0, 0, total - x.shape[2])) for x in fading]
            bands.append(Band(*fading, w, 2 * w - 1))
        memory = None if self.memory is None else self._continued_memories(state, k, v, score, p0, length)
        o, _ = union_attention(q, bands, memory, self.block_size, self.attention_impl)
        self._write_continued(state, new, k_new, v_new, fading, f, score, p0)
        return self.attn.output(o[:, :, lead:])

    def _continued_memories(self, state: MixerState, k: torch.Tensor, v: torch.Tensor, score: torch.Tensor,
                            p0: int, length: int) -> ChunkMemory:  # fmt: skip
        """:meth:`_continue`'s chunk memories over the extended sequence ``k, v [B, Hkv, s+L-p0, d]`` (positions
        ``p0 ..``; ``score [B, L]``: the tokens' innovation scores): the state's memory in use for the chunks up to
        the one holding ``s``, then at each chunk boundary the staging memory merged with the tokens that left the
        window before it; writes the staging memory and the memory in use at ``s + L`` into the state."""
        s, w, c, m = state.seen, self.window, self.memory.chunk_size, self.memory.size
        b, hkv, _, d = k.shape
        bank = [torch.cat([mem, stage, x], 2) for mem, stage, x in ((state.mem_k, state.stage_k, k),
                                                                     (state.mem_v, state.stage_v, v))]  # fmt: skip
        first = max(0, s - w)  # tokens leaving the window in the pass: positions first .. s+L-w-1
        cand = torch.arange(first, max(first, s + length - w), device=k.device)
        ringed = min(len(cand), s - first)  # of them in the window ring, the rest among the new tokens
        cand_score = torch.cat([state.win_score.index_select(1, cand[:ringed] % w), score[:, : len(cand) - ringed]], 1)
        cand_pos, cand_idx = cand.expand(b, -1), (2 * m + cand - p0).expand(b, -1)
        slots = torch.arange(m, device=k.device).expand(b, m)
        current = (state.mem_pos, slots)  # (positions, bank indices) of the memory in use at s
        starts = range(p0, s + length, c)  # the extended sequence's chunks
        boundary = (s + length) // c * c  # the chunk boundary of the memory in use after the pass
        limits = {start - w for start in starts if start > s} | {boundary - w, s + length - w}
        staged, done, merged = (state.stage_score, state.stage_pos, slots + m), 0, {}
        for limit in sorted(limits):  # the staging memory with the candidates of positions below each limit merged in
            upto = max(done, min(len(cand), limit - first))
            if upto > done:
                score_, pos_, order = merge_topk(*staged[:2], cand_score[:, done:upto], cand_pos[:, done:upto], m)
                staged, done = (score_, pos_, torch.cat([staged[2], cand_idx[:, done:upto]], 1).gather(1, order)), upto
            merged[limit] = staged[1:]
        chunks = [current if start <= s else merged[start - w] for start in starts]
        in_use = current if boundary <= s else merged[boundary - w]

        def gather(idx: torch.Tensor) -> list[torch.Tensor]:
            flat = idx.reshape(b, 1, -1, 1).expand(b, hkv, -1, d)
            return [x.gather(2, flat).view(b, hkv, *idx.shape[1:], d) for x in bank]

        pos = torch.stack([p for p, _ in chunks], 1)
        memory = ChunkMemory(*gather(torch.stack([i for _, i in chunks], 1)), pos >= 0, c)
        if boundary > s:  # a new memory in use (else the state's stays)
            state.write_slots(state.memory_slots(), *gather(in_use[1]), in_use[0])
        if done:  # candidates merged into the staging memory
            for stage, new in zip((state.stage_k, state.stage_v, state.stage_score, state.stage_pos),
                                  (*gather(staged[2]), staged[0], staged[1])):  # fmt: skip
                stage.copy_(new)
        return memory

    def _write_continued(self, state: MixerState, new: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         fading: list[torch.Tensor] | None, f: torch.Tensor | None, score: torch.Tensor | None,
                         p0: int) -> None:  # fmt: skip
        """:meth:`_continue`'s window ring (raw keys ``k, v`` of the new positions ``new``, their scores), fading
        band ring (``fading``: the extended sequence's fading keys/values) and pending fading tokens ``f``."""
        s, length, w = state.seen, len(new), self.window
        kept = new[-min(length, w) :]  # the new positions the window ring keeps
        state.write_slots(kept % w, k[:, :, -len(kept) :], v[:, :, -len(kept) :], kept)
        if score is not None:
            state.win_score.index_copy_(1, kept % w, score[:, -len(kept) :])
        if fading is not None:
            band = torch.arange(max(0, s - w, s + length - 2 * w), max(0, s + length - w), device=k.device)
            state.write_slots(w + band % w, *(x.index_select(2, band - p0) for x in fading), band)
            state.f_pend.index_copy_(1, kept % w, f[:, -len(kept) :])

    # ---------------------------------------------------------------- recurrent (decoding)
    def _step(self, h: torch.Tensor, state: MixerState, t: int, pos: torch.Tensor) -> torch.Tensor:
        """One token ``h [B, 1, D]`` at position ``t``, which ``pos [1]`` holds too (the caller then advances
        ``state.pos`` and ``state.seen``).

        Updates the state in place: its tensors keep their storage (but a full-attention buffer that grows, and the
        store's pending rows), so a compiled step can run as a CUDA graph (:meth:`BMojoCache.mark_static_addresses`).
        Every write to a buffer comes after the step's reads of it, which read the joined buffers rather than views of
        them: inductor then updates the buffers in place, where it would otherwise copy them whole at every step.
        With a fading band, the fading token of position ``t - w`` enters it: its key and value are projected with
        the token's (in one product when tied) and written with them.
        """
        w = self.window
        slot = None if w is None else pos % w  # the ring slot of this token (and of the fading key entering the band)
        at = torch.cat([pos, pos - w]) if self.fading else pos  # positions of the keys this step writes [n]
        own = state.own_positions(at)  # [n], or each row's [B, n] (left padding)
        if self.attn is not None:
            rope = self.attn.rope(own)
            q = self.attn.queries(h, _rows(rope, slice(0, 1)))
            if self.store is not None:  # the search runs while the SSM and the window attention do
                found = self.store.retrieve_async(state.store_ids.tolist(), q, self.storage.topk)
        f, score = self._fading_after(h, state, own[..., :1])
        if self.attn is None:
            return f

        if not self.fading:
            k, v = self.attn.keys_values(h, rope)
        else:
            entering = state.f_pend.index_select(1, slot)  # the fading token of position t - w
            if self.fading_k_proj is None:  # tied: the token and the entering fading token through one product
                k, v = self.attn.keys_values(torch.cat([h, entering], 1), rope)
            else:
                k, v = self.attn.keys_values(h, _rows(rope, slice(0, 1)))
                kf, vf = self.attn.keys_values(entering, _rows(rope, slice(1, 2)), self.fading_k_proj,
                                               self.fading_v_proj)  # fmt: skip
                k, v = torch.cat([k, kf], 2), torch.cat([v, vf], 2)
        if w is None:
            state.write_slots(pos, k, v, own)
            if torch.compiler.is_compiling():  # one shape for every position: the whole buffer, masked
                keys, values, visible = state.win_k, state.win_v, state.win_pos >= 0
            else:  # the keys so far, every one visible but padding: no mask (SDPA's FlashAttention takes none)
                keys, values = state.win_k[:, :, : t + 1], state.win_v[:, :, : t + 1]
                visible = None if state.pads is None else state.win_pos[:, : t + 1] >= 0
        else:
            self._write_window(state, t, pos, slot, at, own, k, v, score)
            if self.fading:
                state.f_pend.index_copy_(1, slot, f)
            keys, values, visible = state.keys, state.values, state.positions >= 0
        retrieved = None if self.store is None else found.result()
        o = step_attention(q, keys, values, visible, retrieved)
        if self.store is not None and (t + 1) % self.memory.chunk_size == 0:
            self._write_store(state)
        return self.attn.output(o)

    def _write_store(self, state: MixerState) -> None:
        """At the end of a chunk: hand the store this chunk's eidetic tokens and (``write="all"``) the tokens the
        window evicted during it; it writes those the next chunk's eidetic memory (``stage``) leaves out."""
        # the store reads what it is handed in the background: copies of the buffers decoding updates in place
        parts = [(state.mem_pos.clone(), state.mem_k.clone(), state.mem_v.clone())]
        if state.pend_pos is not None:  # the store takes these buffers over: the next chunk fills fresh ones
            parts.append((state.pend_pos.expand(state.mem_pos.shape[0], -1), state.pend_k, state.pend_v))
            state.pend_pos = torch.full_like(state.pend_pos, -1)
            state.pend_k, state.pend_v = torch.empty_like(state.pend_k), torch.empty_like(state.pend_v)
        self.store.add_candidates(state.store_ids, *zip(*parts), skip=state.stage_pos.clone())

    def _write_window(
        self,
        state: MixerState,
        t: int,
        pos: torch.Tensor,
        slot: torch.Tensor,
        at: torch.Tensor,
        own: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        score: torch.Tensor | None,
    ) -> None:
        """Put the token at position ``t`` (``pos [1]`` as a tensor; ``at [1 or 2]``: with the position ``t - w`` of
        the fading key entering the band; ``own``: ``at`` as each row's own positions, which the state keeps) and its
        keys/values ``k, v [B, Hkv, 1 or 2, d]`` in ring slot ``slot [1]`` (``t % w``) of the window (and of the band);
        the token it evicts (none while the ring fills: slot position ``-1``) becomes an eidetic candidate."""
        w = self.window
        if self.memory is not None:
            if state.pend_pos is not None and t >= w:  # (read before the candidate's slot is written)
                pend = t % self.memory.chunk_size
                state.pend_k[:, :, pend], state.pend_v[:, :, pend] = state.keys[:, :, t % w], state.values[:, :, t % w]
                state.pend_pos[pend] = t - w
            stage_evicted(state.keys, state.values, state.positions, state.win_score, pos, w, state.stage_k,
                          state.stage_v, state.stage_score, state.stage_pos)  # fmt: skip
        index = slot + torch.arange(0, at.shape[0] * w, w, device=at.device)  # [win | band]
        compiled = torch.compiler.is_compiling()
        state.write_slots(index, k, v, None if compiled else own)
        if compiled:  # the positions whole (slot s of the window ring holds t, of the band's t - w), a pass that also
            # makes the step's mask (positions >= 0), where inductor gives a write of two slots a kernel of its own
            ring = torch.arange(state.positions.shape[1], device=at.device)
            written = (ring < at.shape[0] * w) & (ring % w == slot)
            state.positions.copy_(torch.where(written, own[..., :1] - ring // w * w, state.positions))
        if score is not None:
            state.win_score.index_copy_(1, slot, score)
