"""The B'MOJO mixer: fading memory (SSM) + short-term eidetic memory (window) + innovation-selected eidetic memory.

For pre-normed hidden states ``h [B, L, D]`` (SPEC section 2):

1. fading memory: ``f = SSM(h)``; ``f_t`` summarises everything up to ``t``;
2. short-term eidetic memory: query ``i`` attends to raw keys/values at ``[i-w+1, i]``;
3. fading band: query ``i`` attends to keys/values of fading tokens at ``[i-2w+1, i-w]``, made with
   the same projections (tied) and RoPE at the position of the token they summarise;
4. eidetic memory: up to ``k`` raw past tokens chosen by the innovation test (``layers.eidetic``);
5. optional long-term memory: each query's top-``r`` keys retrieved from a vector store of tokens that
   left the eidetic memory (``layers.storage``);
6. one softmax over the union (``ops.attention.union_attention``: one FlexAttention call on CUDA, the fused
   CPU flash-attention kernel over strided views of the band keys on CPU; eidetic and retrieved tokens are
   merged exactly by log-sum-exp, and in decoding join the step's softmax), then ``out = Wo o``.

Transformers, sliding-window Transformers, Mamba and B'MOJO-F are configurations of this one
module: no SSM and no window (full causal attention), no SSM with a window, an SSM and no
attention (the read-out is the SSM output), and no eidetic memory.

Parallel mode (training, prefill) and recurrent mode (decoding with a :class:`MixerState`) give
the same outputs: the state keeps the SSM state, a ``w``-slot ring of raw keys/values, a
``2w``-slot ring of fading keys/values and ``2k`` eidetic keys/values (the memory in use and the
one being built for the next chunk boundary), so its size does not depend on the context length;
only full attention (no window) keeps every key.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from bmojo.layers.attention import Attention
from bmojo.layers.eidetic import EideticMemory, chunk_memories, insert_slot
from bmojo.layers.ssm import Mamba, Mamba2, SSMState
from bmojo.layers.storage import StorageConfig, VectorStore, in_batch_retrieval, store_membership
from bmojo.ops.attention import (
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
    in a buffer that grows by an eighth when full, :meth:`reserve`), with ``win_pos [S]`` (``-1`` = empty) and eidetic
    scores ``win_score [B, S]``.
    ``fad_*``: fading keys/values in ring slots ``pos % 2w``. ``mem_*``: the eidetic memory in use
    (positions ``[B, k]``), ``stage_*``: the best ``k`` tokens that have left the window so far,
    which becomes the memory in use at the next chunk boundary. ``f_last [B, D]``: last fading token.
    With a window, ``keys``/``values [B, Hkv, w (+ 2w) (+ k), d]`` hold the window's, fading and eidetic keys and
    values in one buffer, which a decoding step reads at once: ``win_k``, ``fad_k``, ``mem_k`` (and the ``_v``) are
    views of it. With storage: ``store_ids [B]``, the sequences of the layer's vector store this batch reads and
    writes; ``pend_*``: this chunk's tokens that left the window (``write="all"``), ring slots ``t % c``.
    """

    seen: int = 0
    pos: torch.Tensor | None = None
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
    mem_k: torch.Tensor | None = None
    mem_v: torch.Tensor | None = None
    mem_pos: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    stage_k: torch.Tensor | None = None
    stage_v: torch.Tensor | None = None
    stage_pos: torch.Tensor | None = None
    stage_score: torch.Tensor | None = None
    store_ids: torch.Tensor | None = None
    pend_k: torch.Tensor | None = None
    pend_v: torch.Tensor | None = None
    pend_pos: torch.Tensor | None = None

    @property
    def started(self) -> bool:
        """Whether a prefill has filled the state (the layer then continues it token by token)."""
        return self.pos is not None

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

    def nbytes(self) -> int:
        """Bytes held by the state (the views of ``keys``/``values`` counted in them)."""
        joined = [t for t in (self.keys, self.values) if t is not None]
        return sum(t.numel() * t.element_size() for t in self.tensors() if not any(t._base is j for j in joined))

    def join_keys(self) -> None:
        """Put the window's, fading and eidetic keys (and values) in one buffer, ``keys``/``values``, and make the
        pieces views of it."""
        for kind in ("k", "v"):
            names = [f"{part}_{kind}" for part in ("win", "fad", "mem") if getattr(self, f"{part}_{kind}") is not None]
            pieces = [getattr(self, name) for name in names]
            joined = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 2)
            setattr(self, "keys" if kind == "k" else "values", joined)
            for name, view in zip(names, joined.split([piece.shape[2] for piece in pieces], 2)):
                setattr(self, name, view)


def _gather_positions(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``x [B, H, L, d]`` at positions ``pos [B, *idx]`` (``-1`` read as 0) -> ``[B, H, *idx, d]``."""
    b, h, _, d = x.shape
    flat = pos.clamp_min(0).reshape(b, 1, -1, 1).expand(b, h, -1, d)
    return x.gather(2, flat).reshape(b, h, *pos.shape[1:], d)


def _ring_fill(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring buffer of the last ``size`` entries of ``x [B, H, L, d]``: ``(buffer [B, H, size, d], pos [size])``."""
    b, h, length, d = x.shape
    pos = torch.arange(max(0, length - size), length, device=x.device)
    buf = x.new_zeros(b, h, size, d)
    slots = torch.full((size,), -1, dtype=torch.long, device=x.device)
    buf[:, :, pos % size] = x[:, :, pos]
    slots[pos % size] = pos
    return buf, slots


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
        if window is not None and window < 1:
            raise ValueError(f"window_size must be >= 1 (or None for full attention), got {window}")
        if attention and fading and (ssm is None or window is None):
            raise ValueError("the fading band needs both an SSM and a finite window")
        if eidetic_size < 0:
            raise ValueError(f"eidetic_size must be >= 0, got {eidetic_size}")
        if attention and eidetic_size > 0 and selection != "none" and window is None:
            raise ValueError("eidetic memory needs a finite window (tokens are selected once they leave it)")
        self.window = window
        self.fading = attention and fading
        self.block_size = block_size
        self.ssm = None if ssm is None else SSM_TYPES[ssm](hidden_size, **(ssm_kwargs or {}))
        attn_args = (hidden_size, num_heads, num_kv_heads, head_dim, qk_norm, rope_theta, attention_bias)
        self.attn = Attention(*attn_args, **(attention_kwargs or {})) if attention else None
        self.fading_k_proj = self.fading_v_proj = None
        if self.fading and not tie_fading_kv:
            self.fading_k_proj = nn.Linear(hidden_size, self.attn.num_kv_heads * self.attn.head_dim, bias=False)
            self.fading_v_proj = nn.Linear(hidden_size, self.attn.num_kv_heads * self.attn.head_dim, bias=False)
        use_memory = attention and eidetic_size > 0 and selection != "none"
        self.memory = (
            EideticMemory(hidden_size, eidetic_size, window, chunk_size or window, selection, seed)
            if use_memory
            else None
        )
        if storage is not None and self.memory is None:
            raise ValueError("storage needs the eidetic memory (attention, a window, eidetic_size > 0, a selection)")
        self.storage = storage
        self.store = None if storage is None else VectorStore(self.attn.head_dim, self.attn.num_kv_heads, storage)

    def forward(
        self, h: torch.Tensor, state: MixerState | None = None, advance: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, MixerState | None]:
        """``h [B, L, D] -> (out [B, L, D], auxiliary predictor loss or None, state)``.

        Without ``state`` the sequence is processed in parallel from position 0. With an empty
        ``state`` it is processed in parallel and the state is filled (prefill); with a non-empty
        one every token is a recurrent step from where the state left off; ``advance=False`` leaves
        ``state.seen`` (a Python int) for the caller to advance, outside compiled code (``BMojoCache.advance``): an
        int that a compiled step changes would be an input of its graph, and CUDA graphs record one per value.
        """
        if h.dim() != 3:
            raise ValueError(f"expected hidden states [batch, length, hidden], got shape {tuple(h.shape)}")
        if h.shape[1] == 0:
            raise ValueError("empty sequence: length must be >= 1")
        if state is None or not state.started:
            return self._parallel(h, state)
        outs = []
        state.reserve(h.shape[1])
        for i in range(h.shape[1]):
            outs.append(self._step(h[:, i : i + 1], state, state.seen + i))
            state.pos.add_(1)
        if advance:
            state.seen += h.shape[1]
        return torch.cat(outs, dim=1), None, state

    # ---------------------------------------------------------------- parallel (training, prefill)
    def _parallel(
        self, h: torch.Tensor, state: MixerState | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, MixerState | None]:
        length = h.shape[1]
        f = ssm_state = None
        if self.ssm is not None:
            f, ssm_state = self.ssm(h)
        if state is not None:
            state.seen, state.pos, state.ssm = length, torch.tensor([length], device=h.device), ssm_state
            state.f_last = None if f is None else f[:, -1].clone()  # decoding overwrites it in place
        if self.attn is None:
            return f, None, state

        w = self.window
        pos = torch.arange(length, device=h.device)
        rope = self.attn.rope(pos)
        q = self.attn.queries(h, rope)
        k, v = self.attn.keys_values(h, rope)
        aux = scores = None
        if self.fading is False and self.memory is None and w is None:
            o = causal_attention(q, k, v)
        else:
            bands = [Band(k, v, 0, None if w is None else w - 1)]
            if self.fading:
                # no query sees the fading keys of the last w positions; the recurrent state keeps them
                seen = length if state is not None else max(0, length - w)
                rope_f = None if rope is None else (rope[0][:seen], rope[1][:seen])
                kf, vf = self.attn.keys_values(f[:, :seen], rope_f, self.fading_k_proj, self.fading_v_proj)
                bands.append(Band(*(F.pad(x, (0, 0, 0, length - seen)) for x in (kf, vf)), w, 2 * w - 1))
            eidetic = None
            if self.memory is not None:
                f_prev = F.pad(f[:, :-1], (0, 0, 1, 0))
                scores, aux = self.memory.score(h, f_prev, pos)
                # memories of every chunk, plus the one holding the next position (recurrent state, storage)
                memories = chunk_memories(scores, w, self.memory.chunk_size, self.memory.size,
                                          length // self.memory.chunk_size + 1)  # fmt: skip
                eidetic = self._eidetic_memory(k, v, memories, state)
            retrieve = self.store is not None and (state is not None or self.storage.in_batch)
            o, lse = union_attention(q, bands, eidetic, self.block_size)
            if retrieve:
                o, _ = merge_attention([(o, lse), self._storage_attention(q, k, v, memories[0], state)])
        out = self.attn.output(o)

        if state is not None:
            self._fill_state(state, k, v, pos, bands[-1] if self.fading else None, scores)
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
        if state is not None:
            state.mem_pos = mem_pos[:, length // c]
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
        fading: Band | None,
        scores: torch.Tensor | None,
    ) -> None:
        """Recurrent state after a parallel pass over positions ``pos`` with keys/values ``k, v`` and the ``fading``
        band's."""
        w = self.window
        if w is None:
            state.win_k, state.win_v, state.win_pos, state.full = k, v, pos, True
            return
        state.win_k, state.win_pos = _ring_fill(k, w)
        state.win_v, _ = _ring_fill(v, w)
        if scores is not None:
            state.win_score = scores.new_zeros(scores.shape[0], w)
            valid = state.win_pos >= 0
            state.win_score[:, valid] = scores[:, state.win_pos[valid]]
        if fading is not None:
            state.fad_k, state.fad_pos = _ring_fill(fading.k, 2 * w)
            state.fad_v, _ = _ring_fill(fading.v, 2 * w)
        state.join_keys()

    # ---------------------------------------------------------------- recurrent (decoding)
    def _step(self, h: torch.Tensor, state: MixerState, t: int) -> torch.Tensor:
        """One token ``h [B, 1, D]`` at position ``t``, which ``state.pos`` holds too (the caller then advances
        ``pos``, and ``seen``).

        Updates the state in place: its tensors keep their storage (but a full-attention buffer that grows, and the
        store's pending rows), so a compiled step can run as a CUDA graph (:meth:`BMojoCache.mark_static_addresses`).
        """
        pos = state.pos
        if self.attn is not None:
            rope = self.attn.rope(pos)
            q = self.attn.queries(h, rope)
            if self.store is not None:  # the search runs while the SSM and the window attention do
                found = self.store.retrieve_async(state.store_ids.tolist(), q, self.storage.topk)
        f = score = None
        if self.ssm is not None:
            f, ssm = self.ssm(h, state.ssm)
            state.ssm.conv.copy_(ssm.conv)
            state.ssm.ssm.copy_(ssm.ssm)
        if self.memory is not None:  # the innovation of this token given the fading state before it
            score, _ = self.memory.score(h, state.f_last.unsqueeze(1), pos)
        if f is not None:
            state.f_last.copy_(f[:, -1])
        if self.attn is None:
            return f

        w = self.window
        if self.fading and self.fading_k_proj is None:  # tied: the token and its fading output through one product
            (k, kf), (v, vf) = (x.chunk(2) for x in self.attn.keys_values(torch.cat([h, f]), rope))
        else:
            k, v = self.attn.keys_values(h, rope)
            if self.fading:
                kf, vf = self.attn.keys_values(f, rope, self.fading_k_proj, self.fading_v_proj)
        if self.memory is not None:
            boundary = pos % self.memory.chunk_size == 0  # the memory built so far comes into use
            for mem, stage in (
                (state.mem_k, state.stage_k),
                (state.mem_v, state.stage_v),
                (state.mem_pos, state.stage_pos),
            ):
                mem.copy_(torch.where(boundary, stage, mem))
        if w is None:
            state.win_k.index_copy_(2, pos, k)
            state.win_v.index_copy_(2, pos, v)
            state.win_pos.index_copy_(0, pos, pos)
            n = state.win_k.shape[2] if torch.compiler.is_compiling() else t + 1  # compiled: one shape, masked
            keys, values = state.win_k[:, :, :n], state.win_v[:, :, :n]
            visible = (state.win_pos[:n] >= 0).expand(h.shape[0], -1)
        else:
            self._write_window(state, t, pos, k, v, score)
            keys, values = state.keys, state.values  # the window's, fading and memory keys (views of them updated)
            visible = [(state.win_pos >= 0).expand(h.shape[0], -1)]
            if self.fading:
                slot = pos % (2 * w)
                state.fad_k.index_copy_(2, slot, kf)
                state.fad_v.index_copy_(2, slot, vf)
                state.fad_pos.index_copy_(0, slot, pos)
                lag = pos - state.fad_pos
                visible.append(((state.fad_pos >= 0) & (lag >= w)).expand(h.shape[0], -1))
            if self.memory is not None:
                visible.append(state.mem_pos >= 0)
            visible = torch.cat(visible, 1)
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
        k: torch.Tensor,
        v: torch.Tensor,
        score: torch.Tensor | None,
    ) -> None:
        """Put the token at position ``t`` (``pos [1]`` as a tensor) in ring slot ``pos % w``; the token it evicts
        (none while the ring fills: slot position ``-1``) becomes an eidetic candidate."""
        slot = pos % self.window
        if self.memory is not None:
            cand_k, cand_v = state.win_k.index_select(2, slot), state.win_v.index_select(2, slot)
            cand_pos = state.win_pos.index_select(0, slot).expand(k.shape[0], 1)
            cand_score = state.win_score.index_select(1, slot).masked_fill(cand_pos < 0, float("-inf"))
            at, enter = insert_slot(state.stage_score, state.stage_pos, cand_score)  # [B, 1] each
            for stage, cand, dim in (
                (state.stage_score, cand_score, 1),
                (state.stage_pos, cand_pos, 1),
                (state.stage_k, cand_k, 2),
                (state.stage_v, cand_v, 2),
            ):
                ones = [-1] + [1] * (stage.dim() - 1)
                index = at.view(ones).expand(cand.shape)
                stage.scatter_(dim, index, torch.where(enter.view(ones), cand, stage.gather(dim, index)))
            if state.pend_pos is not None and t >= self.window:
                pend = t % self.memory.chunk_size
                state.pend_k[:, :, pend], state.pend_v[:, :, pend] = cand_k[:, :, 0], cand_v[:, :, 0]
                state.pend_pos[pend] = t - self.window
        state.win_k.index_copy_(2, slot, k)
        state.win_v.index_copy_(2, slot, v)
        state.win_pos.index_copy_(0, slot, pos)
        if score is not None:
            state.win_score.index_copy_(1, slot, score)
