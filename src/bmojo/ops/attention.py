"""Attention with log-sum-exp outputs, banded (sliding-window) attention, and the exact LSE merge.

Shapes: queries ``q [B, Hq, M, d]``; keys/values ``k, v [B, Hkv, K, d]`` with ``Hq % Hkv == 0``
(grouped-query attention). Every function returns ``(o, lse)``: ``o [B, Hq, M, d]`` in the
input dtype and ``lse [B, Hq, M]`` in float32, ``lse = -inf`` (and ``o = 0``) for a query that
sees no key. Several ``(o, lse)`` pairs computed over disjoint key sets combine into the single
softmax over their union with :func:`merge_attention`.

:func:`union_attention` is the B'MOJO read-out: one softmax over bands of aligned keys (the window, the
fading band) and per-chunk memories (the eidetic tokens). On CUDA it is our Triton kernels
(``bmojo.ops.triton.attention``: each block of queries walks only the key blocks its bands and chunk reach), or one
FlexAttention call over the concatenated keys with a block-sparse mask; on CPU PyTorch's fused flash-attention
kernel over overlapping strided views of the band keys (:func:`blocks_union_attention`: nothing gathered, LSE
included), with the chunk memories merged by log-sum-exp; else (reference mode, unbounded bands) the banded
attentions and the chunk attention merged by log-sum-exp. :func:`union_attention_ref` is the dense definition they
are all tested against.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bmojo.ops import check_shapes
from bmojo.ops.triton import kernels, lookup_once, use_fused_cuda, use_triton

AttnOut = tuple[torch.Tensor, torch.Tensor]
ATTENTION_IMPLS = ("auto", "triton", "flex", "blocks", "merge")  # union_attention's impl
SEGMENT_BYTES = 4 << 20  # float32 scores per segment of query blocks: small enough to stay in a CPU cache


def _group(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, M, d] -> [B, Hkv, G, M, d] so that query head h uses key head h // G."""
    b, hq, m, d = q.shape
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    return q.view(b, hkv, hq // hkv, m, d)


def _accumulate(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 if it already is (so float64 gradient checks stay exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_softmax(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and log-sum-exp over the last axis of float32 (or float64) ``scores`` (masked entries -inf;
    all masked: probabilities 0, lse -inf)."""
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1)), lse


def _softmax_lse(scores: torch.Tensor, v: torch.Tensor) -> AttnOut:
    """Softmax over the last axis of ``scores`` (see :func:`masked_softmax`), then ``@ v``."""
    p, lse = masked_softmax(scores)
    return p.to(v.dtype) @ v, lse


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, scale: float | None = None
) -> AttnOut:
    """Dense attention of every query to every key allowed by ``mask``.

    ``mask`` is boolean (True = visible), broadcastable to ``[B, Hkv, G, M, K]`` where
    ``G = Hq // Hkv``; a mask of shape ``[B, M, K]`` or ``[B, K]`` must be unsqueezed by the caller.
    """
    b, hq, m, d = q.shape
    scale = d**-0.5 if scale is None else scale
    scores = _accumulate(_group(q, k.shape[1]) @ k.unsqueeze(2).transpose(-1, -2)) * scale  # [B, Hkv, G, M, K]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    o, lse = _softmax_lse(scores, v.unsqueeze(2))
    return o.reshape(b, hq, m, d), lse.reshape(b, hq, m)


def step_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor | None,
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One decoding step in one fused SDPA call: queries ``q [B, Hq, 1, d]`` attend to the keys ``k, v [B, Hkv, K,
    d]`` where ``visible [B, K]`` (``None``: every key, with no mask, which lets SDPA take its FlashAttention kernels)
    and, with ``extra = (keys, values [B, Hq, 1, n, d], valid [B, Hq, 1, n])``, to further keys of each query head
    alone (retrieved from a store), in the same softmax. Returns ``[B, Hq, 1, d]``; every query must see at least one
    key."""
    b, hq, m, d = q.shape
    if m != 1:
        raise ValueError(f"step_attention takes one query per head, got {m}")
    hkv, n_keys = k.shape[1], k.shape[2]
    check_shapes([("k", k, (b, hkv, n_keys, d)), ("v", v, (b, hkv, n_keys, d)), ("visible", visible, (b, n_keys))])
    if visible is not None and visible.dtype != torch.bool:
        raise ValueError(f"visible must be bool, got {visible.dtype}")
    g = _group(q, hkv).shape[2]
    mask = None if visible is None else visible[:, None, None, :]
    if extra is None:  # the G query heads of a key head as G queries of it: the keys are read once, not copied G times
        o = F.scaled_dot_product_attention(q.view(b, hkv, g, d), k, v, attn_mask=mask)
        return o.reshape(b, hq, 1, d)  # CUDA's memory-efficient kernel returns [B, Hkv, G, d] as a transposed view
    k, v = (x.unsqueeze(2).expand(b, hkv, g, n_keys, d).reshape(b, hq, n_keys, d) for x in (k, v))
    ek, ev, valid = extra
    seen = torch.ones(b, 1, 1, n_keys, dtype=torch.bool, device=q.device) if mask is None else mask
    mask = torch.cat([seen.expand(b, hq, 1, n_keys), valid], -1)
    k, v = torch.cat([k, ek[:, :, 0]], 2), torch.cat([v, ev[:, :, 0]], 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lo: int,
    hi: int | None,
    block_size: int = 64,
    scale: float | None = None,
) -> AttnOut:
    """Query ``i`` attends to key ``j`` iff ``lo <= i - j <= hi`` (``hi=None``: no upper bound).

    ``q, k, v`` are aligned sequences of the same length ``L`` (self-attention at positions
    ``0..L-1``). Queries are processed in blocks of ``block_size``; block ``[a, a+c)`` scores
    only keys ``[a - hi, a + c - 1 - lo]``, so no ``L x L`` tensor is built when the band is narrow.
    Blocks are grouped into segments of about ``SEGMENT_BYTES`` of scores, computed one after the
    other and recomputed in backward: only ``q, k, v`` are saved, so training memory is ``O(L * d)``.
    """
    check_union_inputs(q, [Band(k, v, lo, hi)], None)
    b, hq, length, d = q.shape
    hi = length - 1 if hi is None else min(hi, length - 1)
    if lo > hi:  # no query has any key in the band
        return q.new_zeros(q.shape), q.new_full((b, hq, length), float("-inf"), dtype=torch.float32)
    scale = d**-0.5 if scale is None else scale
    c = max(1, min(block_size, length))
    nb = -(-length // c)
    seg = max(1, SEGMENT_BYTES // (4 * b * hq * c * (c + hi - lo)))
    # Left-pad keys by `hi` so block b's keys start at padded index b*c; right-pad so every window fits.
    kp = F.pad(k, (0, 0, hi, nb * c - length))
    vp = F.pad(v, (0, 0, hi, nb * c - length))
    qp = F.pad(q, (0, 0, 0, nb * c - length))
    if torch.compiler.is_compiling():  # dynamo cannot trace the recomputing backward: plain autograd instead
        o, lse = _band_segments(qp, kp, vp, lo, hi, c, scale, seg)
    else:
        o, lse = _BandedAttention.apply(qp, kp, vp, lo, hi, c, scale, seg)
    return o[:, :, :length], lse[:, :, :length]


def _band_segment(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b0: int, lo: int, hi: int, c: int, scale: float
) -> AttnOut:
    """``n`` query blocks ``q [B, Hq, n*c, d]``, the first being block ``b0``, against their keys.

    ``k, v [B, Hkv, n*c + hi - lo, d]`` are the left-padded keys from padded index ``b0*c``: block
    ``b0 + m`` scores the ``span = c + hi - lo`` of them from ``m*c`` (true positions from
    ``(b0+m)*c - hi``). Returns ``o [B, Hq, n*c, d]`` and ``lse [B, Hq, n*c]``.
    """
    b, hq, nc, d = q.shape
    hkv, n, span = k.shape[1], nc // c, c + hi - lo
    kw = k.unfold(2, span, c)  # [B, Hkv, n, d, span]
    vw = v.unfold(2, span, c).transpose(-1, -2)  # [B, Hkv, n, span, d]
    qb = _group(q, hkv).unflatten(3, (n, c))  # [B, Hkv, G, n, c, d]
    scores = _accumulate(qb @ kw.unsqueeze(2)) * scale  # [B, Hkv, G, n, c, span]
    visible = _band_visible(b0, n, c, lo, hi, q.device)
    o, lse = _softmax_lse(scores.masked_fill(~visible, float("-inf")), vw.unsqueeze(2))
    return o.reshape(b, hq, nc, d), lse.reshape(b, hq, nc)


def _in_band(query_pos: torch.Tensor, key_pos: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Whether a query at ``query_pos`` sees a band key at ``key_pos`` (``lo <= query_pos - key_pos <= hi``) that
    exists (``key_pos >= 0``); broadcasting."""
    delta = query_pos - key_pos
    return (delta >= lo) & (delta <= hi) & (key_pos >= 0)


def _band_visible(b0: int, n: int, c: int, lo: int, hi: int, device: torch.device) -> torch.Tensor:
    """``[n, c, c + hi - lo]``: which of the left-padded keys from padded index ``b*c`` query ``i`` of block
    ``b = b0..b0+n-1`` sees (``lo <= i - j <= hi``, and no key before position 0)."""
    start = torch.arange(b0, b0 + n, device=device).view(n, 1, 1) * c
    query_pos = start + torch.arange(c, device=device).view(1, c, 1)
    key_pos = start - hi + torch.arange(c + hi - lo, device=device).view(1, 1, -1)
    return _in_band(query_pos, key_pos, lo, hi)


def _segments(nb: int, seg: int, c: int, hi: int, lo: int) -> list[tuple[int, slice, slice]]:
    """``(first block, query slice, key slice)`` of each segment of ``seg`` query blocks out of ``nb``."""
    return [(b0, slice(b0 * c, min(b0 + seg, nb) * c), slice(b0 * c, min(b0 + seg, nb) * c + hi - lo))
            for b0 in range(0, nb, seg)]  # fmt: skip


def _band_segments(
    qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, lo: int, hi: int, c: int, scale: float, seg: int
) -> AttnOut:
    """:func:`banded_attention` on padded inputs, one segment of query blocks after the other."""
    parts = [
        _band_segment(qp[:, :, qs], kp[:, :, ks], vp[:, :, ks], b0, lo, hi, c, scale)
        for b0, qs, ks in _segments(qp.shape[2] // c, seg, c, hi, lo)
    ]
    return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)


class _BandedAttention(torch.autograd.Function):
    """:func:`banded_attention` on padded inputs, one segment of ``seg`` query blocks at a time.

    Backward recomputes each segment's scores and differentiates through :func:`_band_segment`,
    accumulating key/value gradients over the overlapping key ranges of neighbouring segments.
    """

    @staticmethod
    def forward(ctx, qp, kp, vp, lo: int, hi: int, c: int, scale: float, seg: int) -> AttnOut:
        ctx.save_for_backward(qp, kp, vp)
        ctx.band = (lo, hi, c, scale, seg)
        return _band_segments(qp, kp, vp, lo, hi, c, scale, seg)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: torch.Tensor, dlse: torch.Tensor):
        qp, kp, vp = ctx.saved_tensors
        lo, hi, c, scale, seg = ctx.band
        dq, dk, dv = torch.empty_like(qp), torch.zeros_like(kp), torch.zeros_like(vp)
        for b0, qs, ks in _segments(qp.shape[2] // c, seg, c, hi, lo):
            inputs = [t.detach().requires_grad_() for t in (qp[:, :, qs], kp[:, :, ks], vp[:, :, ks])]
            with torch.enable_grad():
                o, lse = _band_segment(*inputs, b0, lo, hi, c, scale)
                # queries that see no key have lse = -inf and no gradient through it
                lse = lse.masked_fill(torch.isinf(lse), 0.0)
            gq, gk, gv = torch.autograd.grad((o, lse), inputs, (do[:, :, qs], dlse[:, :, qs]))
            dq[:, :, qs] = gq
            dk[:, :, ks] += gk
            dv[:, :, ks] += gv
        return dq, dk, dv, None, None, None, None, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Full causal attention without LSE, through PyTorch's fused ``scaled_dot_product_attention``: queries ``q [B,
    Hq, M, d]`` of the last ``M`` of the ``K`` positions of ``k, v [B, Hkv, K, d]`` (``M = K`` but where queries
    continue a cache), query ``i`` seeing keys ``0 .. K - M + i``. Grouped key heads are read in place
    (``enable_gqa``) where the CPU flash kernel takes them (:data:`_FLASH_CPU_GROUPS`), else repeated for every query
    head of their group; on CUDA too, where SDPA takes grouped heads into FlashAttention only and, wherever that
    kernel does not apply (fp32, older GPUs, large heads), would fall back to its unfused path rather than the
    memory-efficient kernel."""
    m, n = q.shape[2], k.shape[2]
    check_union_inputs(q, [Band(k[:, :, n - m :], v[:, :, n - m :], 0, None)], None)
    (k, v), in_place = _sdpa_heads(q, k, v)
    gqa = {"enable_gqa": True} if in_place else {}
    if m == n:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)
    visible = torch.ones(m, n, dtype=torch.bool, device=q.device).tril(n - m)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, **gqa)


def _sdpa_heads(q: torch.Tensor, *kv: torch.Tensor) -> tuple[list[torch.Tensor], bool]:
    """Key / value tensors ``[B, Hkv, ...]`` for SDPA with ``q [B, Hq, ...]``: as they are, and ``True`` (pass
    ``enable_gqa``) for grouped heads the CPU flash kernel reads in place (:data:`_FLASH_CPU_GROUPS`); otherwise
    grouped heads repeated for every query head of their group, and ``False``."""
    hq, hkv = q.shape[1], kv[0].shape[1]
    if hq == hkv:
        return list(kv), False
    if q.device.type == "cpu" and _FLASH_CPU_GROUPS:
        return list(kv), True
    return [x.repeat_interleave(hq // hkv, dim=1) for x in kv], False


def merge_attention(parts: list[AttnOut]) -> AttnOut:
    """Combine partial attentions over disjoint key sets into the softmax over their union.

    ``o = sum_j o_j exp(lse_j - m) / sum_j exp(lse_j - m)`` with ``m = max_j lse_j`` and the union's
    ``lse = m + log sum_j exp(lse_j - m)``; a query that sees no key in any set gets ``o = 0, lse = -inf``.
    """
    if not parts:
        raise ValueError("merge_attention needs at least one part")
    if len(parts) == 1:
        return parts[0]
    lse = torch.stack([p[1] for p in parts])  # [S, B, H, M]
    m = lse.amax(0)
    m_finite = m.masked_fill(torch.isinf(m), 0.0)
    w = torch.exp(lse - m_finite.unsqueeze(0))  # exp(-inf) = 0 for empty sets
    total = w.sum(0)
    denom = total.clamp_min(torch.finfo(torch.float32).tiny)
    o = sum(_accumulate(p[0]) * (wi / denom).unsqueeze(-1) for p, wi in zip(parts, w))
    return o.to(parts[0][0].dtype), m_finite + torch.log(total)


@dataclass
class Band:
    """Keys/values ``k, v [B, Hkv, L, d]`` aligned with the queries: query ``i`` sees key ``j`` iff
    ``lo <= i - j <= hi`` (``hi=None``: no upper bound)."""

    k: torch.Tensor
    v: torch.Tensor
    lo: int
    hi: int | None


@dataclass
class ChunkMemory:
    """Per-chunk keys/values ``k, v [B, Hkv, n_chunks, m, d]`` and ``valid [B, n_chunks, m]``: query ``i``
    sees the valid entries of chunk ``i // chunk`` (``n_chunks = ceil(L / chunk)``)."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    chunk: int


def chunk_attention(q: torch.Tensor, memory: ChunkMemory) -> AttnOut:
    """Each query ``q [B, Hq, L, d]`` attends to its chunk's memory: ``(o [B, Hq, L, d], lse [B, Hq, L])``."""
    b, hq, length, d = q.shape
    _, hkv, n_chunks, m, _ = memory.k.shape
    c = memory.chunk
    qc = F.pad(q, (0, 0, 0, n_chunks * c - length)).view(b, hq, n_chunks, c, d)
    qc = qc.transpose(1, 2).reshape(b * n_chunks, hq, c, d)
    ek = memory.k.transpose(1, 2).reshape(b * n_chunks, hkv, m, d)
    ev = memory.v.transpose(1, 2).reshape(b * n_chunks, hkv, m, d)
    o, lse = attention_with_lse(qc, ek, ev, memory.valid.reshape(b * n_chunks, 1, 1, 1, m))
    o = o.view(b, n_chunks, hq, c, d).transpose(1, 2).reshape(b, hq, n_chunks * c, d)[:, :, :length]
    lse = lse.view(b, n_chunks, hq, c).transpose(1, 2).reshape(b, hq, n_chunks * c)[:, :, :length]
    return o, lse


def _union_keys(bands: list[Band], memory: ChunkMemory | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every key set concatenated along the key axis: bands in order, then the memories chunk by chunk (a single
    set as it is)."""
    ks = [band.k for band in bands] + ([] if memory is None else [memory.k.flatten(2, 3)])
    vs = [band.v for band in bands] + ([] if memory is None else [memory.v.flatten(2, 3)])
    return (ks[0], vs[0]) if len(ks) == 1 else (torch.cat(ks, dim=2), torch.cat(vs, dim=2))


def _union_mask_mod(length: int, bands: list[Band], memory: ChunkMemory | None, pair: int | None = None):
    """``mask_mod(b, h, q_idx, kv_idx)`` over the keys of :func:`_union_keys` (FlexAttention's convention), or of
    :func:`_paired_keys` for a window of ``pair`` tokens and its fading band."""
    spans = tuple((i * length, band.lo, band.hi) for i, band in enumerate(bands))
    m, chunk = (None, None) if memory is None else (memory.valid.shape[2], memory.chunk)
    mask_mod = _mask_mod_for(length, spans, m, chunk, pair)
    if memory is not None:
        mask_mod.buffers["valid"] = memory.valid.flatten(1)  # [B, n_chunks * m]
    return mask_mod


def _paired_window(bands: list[Band]) -> int | None:
    """``w`` if ``bands`` are a window ``[0, w - 1]`` and a fading band ``[w, 2w - 1]`` over as many keys (B'MOJO's
    read-out), else ``None``."""
    if len(bands) != 2 or bands[0].lo != 0 or bands[0].hi is None or bands[0].k.shape != bands[1].k.shape:
        return None
    w = bands[0].hi + 1
    return w if (bands[1].lo, bands[1].hi) == (w, 2 * w - 1) else None


def _paired_keys(bands: list[Band], w: int, memory: ChunkMemory | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A window of ``w`` and its fading band as one sliding window over interleaved keys: slot ``2p`` holds window
    key ``p``, slot ``2p + 1`` fading key ``p - w`` (seen at distances ``w..2w-1``, so at ``0..w-1`` from ``p``);
    then the memories as in :func:`_union_keys`. FlexAttention meets as many partial blocks as with the bands
    concatenated (more where the band's fading slots are still empty), but evaluates a simpler mask in them."""

    def interleave(x: torch.Tensor, xf: torch.Tensor) -> torch.Tensor:
        shifted = F.pad(xf, (0, 0, w, 0))[:, :, : xf.shape[2]]
        return torch.stack([x, shifted], dim=3).flatten(2, 3)

    paired = Band(interleave(bands[0].k, bands[1].k), interleave(bands[0].v, bands[1].v), 0, None)
    return _union_keys([paired], memory)  # (the band's lo / hi are not read)


@functools.lru_cache(maxsize=256)
def _mask_mod_for(
    length: int, spans: tuple[tuple[int, int, int | None], ...], m: int | None, chunk: int | None, pair: int | None
):
    """One ``mask_mod`` function per mask structure, so compiled FlexAttention sees the same function every call
    (a new closure per call could recompile); the memory's validity is the tensor in ``mask_mod.buffers``."""
    start = len(spans) * length
    buffers: dict[str, torch.Tensor] = {}

    def mask_mod(b, h, q_idx, kv_idx):
        if pair is None:
            visible = q_idx < 0
            for offset, lo, hi in spans:
                dist = q_idx - (kv_idx - offset)
                ok = (kv_idx >= offset) & (kv_idx < offset + length) & (dist >= lo)
                visible = visible | (ok if hi is None else ok & (dist <= hi))
        else:  # interleaved (_paired_keys): slot kv_idx holds position kv_idx // 2, a fading key from pair on
            slot = kv_idx // 2
            dist = q_idx - slot
            visible = (kv_idx < start) & (dist >= 0) & (dist < pair) & ((kv_idx % 2 == 0) | (slot >= pair))
        if m:  # (a memory of no slots adds no key)
            valid = buffers["valid"]
            slot = (kv_idx - start).clamp(0, valid.shape[1] - 1)
            visible = visible | ((kv_idx >= start) & (slot // m == q_idx // chunk) & valid[b, slot])
        return visible

    mask_mod.buffers = buffers
    return mask_mod


def parse_kernel_options(text: str) -> dict[str, int]:
    """FlexAttention kernel options from ``"BLOCK_M=64,BLOCK_N=64,fwd_num_warps=8"`` (integer values)."""
    options: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"kernel option {item!r} is not NAME=INTEGER (in {text!r})")
        options[key.strip()] = int(value)
    return options


def parse_triton_tiles(text: str) -> dict[str, int]:
    """Tiles of our Triton read-out from ``"block_m=128,block_n=64,num_warps=8,bwd_num_warps=4"`` (keys ``block_m,
    block_n, num_warps, num_stages`` of the forward and the same with ``bwd_`` for the backward)."""
    tiles = parse_kernel_options(text)
    names = {"block_m", "block_n", "num_warps", "num_stages"}
    unknown = set(tiles) - names - {f"bwd_{name}" for name in names}
    if unknown:
        raise ValueError(f"tiles take {sorted(names)} and the same with bwd_, got {sorted(unknown)} in {text!r}")
    return tiles


# Tiles of our Triton read-out (bmojo.ops.triton.attention) for every union_attention call that takes it
# (BMOJO_TRITON_TILES, read at import); empty: the tuned tiles of _triton_tile_options.
TRITON_TILES: dict[str, int] = parse_triton_tiles(os.environ.get("BMOJO_TRITON_TILES", ""))

# FlexAttention kernel options for every flex_union_attention call that passes none (BMOJO_FLEX_OPTIONS, read at
# import; e.g. "BLOCK_M=128,BLOCK_N=64"); empty: the tuned tiles of _tuned_flex_options.
FLEX_KERNEL_OPTIONS: dict[str, int] = parse_kernel_options(os.environ.get("BMOJO_FLEX_OPTIONS", ""))


def _tuned_flex_options(q: torch.Tensor) -> dict[str, int]:
    """Forward tiles for the read-out's mask where measured faster than FlexAttention's defaults: CUDA, 16-bit, head
    dim <= 64, 128 x 32 (5.5 -> 2.3 ms on an H200 at the 130m preset's shapes; the default 128 x 128 tile at 4
    warps spills the mask's integer work; benchmarks/RESULTS.md). Else FlexAttention's own choice."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 32}
    return {}


def _triton_tile_options(q: torch.Tensor) -> dict[str, int]:
    """Tiles for our Triton read-out: ``BMOJO_TRITON_TILES``, else where measured faster than the kernels' defaults
    (64 x 64): NVIDIA, 16-bit, head dim <= 64, 64 x 32 (forward + backward 2.28 -> 2.06 ms on an H100 at the 130m
    preset's shapes; benchmarks/RESULTS.md)."""
    if TRITON_TILES:
        return TRITON_TILES
    nvidia = q.is_cuda and torch.version.hip is None
    if nvidia and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 64:
        return {"block_n": 32}
    return {}


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_union_attention(
    q: torch.Tensor,
    bands: list[Band],
    memory: ChunkMemory | None = None,
    kernel_options: dict | None = None,
    interleave: bool = False,
) -> AttnOut:
    """:func:`union_attention` as one FlexAttention call with a block-sparse mask (compiled on CUDA).

    Only the key blocks that some query of a block can see are computed, so the cost is
    ``O(L * (sum of band widths + memory size))``. ``interleave``: a window and its fading band as one sliding window
    over interleaved keys (:func:`_paired_keys`: a simpler mask, as many partial blocks; not yet timed on a GPU,
    ``benchmarks/bench_flex.py`` compares the two). On CPU it runs FlexAttention's eager path (forward only).
    ``kernel_options`` go to FlexAttention unchanged (tile sizes such as ``BLOCK_M``, ``BLOCK_N``; ``{}``:
    FlexAttention's defaults); ``None``: :data:`FLEX_KERNEL_OPTIONS` if set, else tuned tiles where measured.
    """
    from torch.nn.attention import flex_attention as fa

    b, _, length, _ = q.shape
    pair = _paired_window(bands) if interleave else None
    k, v = _union_keys(bands, memory) if pair is None else _paired_keys(bands, pair, memory)
    mask_mod = _union_mask_mod(length, bands, memory, pair)
    block_mask = fa.create_block_mask(mask_mod, None if memory is None else b, None, length, k.shape[2],
                                      device=q.device, _compile=q.is_cuda)  # fmt: skip
    return flex_call(q, k, v, block_mask, kernel_options)


def flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, kernel_options: dict | None = None
              ) -> AttnOut:  # fmt: skip
    """FlexAttention of ``q`` over ``k, v`` under ``block_mask`` (compiled on CUDA), with its LSE; ``kernel_options``
    as in :func:`flex_union_attention`."""
    from torch.nn.attention import flex_attention as fa

    flex = _compiled_flex_attention() if q.is_cuda else fa.flex_attention
    gqa = q.shape[1] != k.shape[1]
    if kernel_options is None:
        kernel_options = FLEX_KERNEL_OPTIONS or _tuned_flex_options(q)
    kernel_options = dict(kernel_options) or None
    if hasattr(fa, "AuxRequest"):
        o, aux = flex(q, k, v, block_mask=block_mask, enable_gqa=gqa, kernel_options=kernel_options,
                      return_aux=fa.AuxRequest(lse=True))  # fmt: skip
        return o, aux.lse.float()
    o, lse = flex(q, k, v, block_mask=block_mask, enable_gqa=gqa, kernel_options=kernel_options, return_lse=True)
    return o, lse.float()


@lookup_once
def flex_available() -> bool:
    """Whether this torch has FlexAttention."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_cpu_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
if _flash_cpu is not None and "attn_mask" not in {a.name for a in _flash_cpu.default._schema.arguments}:
    _flash_cpu = None  # a torch whose CPU kernel takes no mask: the merge path serves instead


def _flash_cpu_takes_groups() -> bool:
    """Whether this torch's CPU flash-attention kernel takes fewer key/value heads than query heads (grouped-query
    attention with each key head read in place), as SDPA's dispatcher says (it picks the kernel for grouped heads
    only where the kernel supports them; earlier kernels read past the keys rather than refuse)."""
    from torch.nn.attention import SDPBackend

    q, kv = torch.zeros(1, 2, 1, 8, device="cpu"), torch.zeros(1, 1, 1, 8, device="cpu")
    try:
        return torch._fused_sdp_choice(q, kv, kv, enable_gqa=True) == int(SDPBackend.FLASH_ATTENTION)
    except Exception:  # a torch without enable_gqa (< 2.5) or without the dispatcher's entry point
        return False


_FLASH_CPU_GROUPS = _flash_cpu is not None and _flash_cpu_takes_groups()


def _blocks_ok(q: torch.Tensor, bands: list[Band]) -> bool:
    """Whether :func:`blocks_union_attention` applies: CPU tensors, this torch's fused CPU flash attention, finite
    bands, the first with ``lo = 0`` (every query sees itself, so no softmax row is empty)."""
    return (q.device.type == "cpu" and _flash_cpu is not None and len(bands) > 0 and bands[0].lo == 0
            and all(band.hi is not None for band in bands))  # fmt: skip


def _blocks_layout(bands: list[Band], c: int) -> tuple[list[int], int]:
    """Each band's shift in blocks (query block ``i`` sees band keys up to block ``i - shift``) and ``t``, the
    number of consecutive key blocks every query block needs to see all its bands."""
    shifts = [-((c - 1 - band.lo) // c) for band in bands]
    return shifts, max(-(-band.hi // c) - shift + 1 for band, shift in zip(bands, shifts))


def _blocks_keys(xs: list[torch.Tensor], shifts: list[int], c: int, n: int, t: int) -> torch.Tensor:
    """Key (or value) slots ``[B, Hkv, n + t - 1, S, d]``, ``S = len(xs) * c``: slot ``j`` holds block
    ``j - (t - 1) - shift`` of each band's ``x [B, Hkv, L, d]`` (zeros outside ``0..L-1``)."""
    slots, length = n + t - 1, xs[0].shape[2]
    return torch.cat([F.pad(x, (0, 0, (t - 1 + s) * c, max(0, (n - s) * c - length)))[:, :, : slots * c]
                      .unflatten(2, (slots, c)) for x, s in zip(xs, shifts)], dim=3)  # fmt: skip


def _blocks_mask(bands: list[Band], shifts: list[int], c: int, n: int, t: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:  # fmt: skip
    """Additive mask ``[m, 1, c, t * S]`` (0 visible, -inf not) of query row ``r`` of block ``i`` over the keys of
    slots ``i..i+t-1`` of :func:`_blocks_keys`: band keys with ``lo <= i*c + r - position <= hi``, position >= 0.

    Which keys a row sees depends on ``i`` only through ``position >= 0``, so every block from ``t - 1 + max(shifts)``
    on has the same mask: only ``m = min(n, t + max(shifts))`` rows are built, and block ``i`` uses row
    ``min(i, m - 1)`` (:func:`_block_pieces`).
    """
    i = torch.arange(min(n, t + max(shifts)), device=device).view(-1, 1, 1, 1)
    r = torch.arange(c, device=device).view(1, c, 1, 1)
    slot = torch.arange(t, device=device).view(1, 1, t, 1)
    s = torch.arange(c, device=device).view(1, 1, 1, c)
    parts = []
    for band, shift in zip(bands, shifts):
        parts.append(_in_band(i * c + r, (i + slot - (t - 1) - shift) * c + s, band.lo, band.hi))
    visible = torch.cat(parts, dim=-1).flatten(2)  # [m, c, t * S]
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf")).unsqueeze(1)


def _block_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, t: int) -> tuple[torch.Tensor, ...]:
    """``n`` query blocks of one sequence, ``q [Hq, n*c, d]``, and their key/value slots ``[Hkv, n + t - 1, S, d]``
    as the batches the CPU flash kernel takes: queries ``[n, Hq, c, d]``, keys/values ``[n, Hkv, t*S, d]`` (overlapping
    strided views of the slots: block ``i`` sees slots ``i..i+t-1``; nothing is copied)."""
    size, d = k.shape[2:]
    kv, vv = (x.flatten(1, 2).unfold(1, t * size, size).permute(1, 0, 3, 2) for x in (k, v))
    return q.view(q.shape[0], n, -1, d).transpose(0, 1), kv, vv


def _block_pieces(b: int, n: int, per_piece: int, mask: torch.Tensor) -> list[tuple[int, int, int, torch.Tensor]]:
    """``(sequence, first block, end block, mask)`` of each kernel call: up to ``per_piece`` blocks of one sequence,
    cut also where the last row of ``mask`` (:func:`_blocks_mask`) starts to serve every block; the piece's own rows
    before, that row broadcast over the piece from there."""
    m = mask.shape[0]
    cuts = sorted({*range(0, n, per_piece), m - 1})
    return [(i, a, e, mask[a:e] if e < m else mask[m - 1 :]) for i in range(b) for a, e in zip(cuts, [*cuts[1:], n])]


def _piece_views(q, k, v, i: int, a: int, e: int, c: int, t: int) -> tuple[torch.Tensor, ...]:
    """:func:`_block_views` of blocks ``a..e-1`` of sequence ``i``."""
    return _block_views(q[i, :, a * c : e * c], k[i, :, a : e + t - 1], v[i, :, a : e + t - 1], e - a, t)


@torch.library.custom_op("bmojo::blocks_attention", mutates_args=())
def _blocks_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, t: int, scale: float,
                      per_piece: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Query block ``i`` of ``q [B, Hq, n*c, d]`` attends to key/value slots ``i..i+t-1`` of ``k, v [B, Hkv,
    n+t-1, S, d]`` (``Hkv`` dividing ``Hq``; fewer only where the kernel takes grouped heads,
    :data:`_FLASH_CPU_GROUPS`) under the additive ``mask [m, 1, c, t*S]`` (:func:`_blocks_mask`): fused CPU
    flash-attention calls over overlapping strided views of the slots (no gathered windows), ``per_piece`` blocks per
    call (so the kernel's gradient buffers stay small enough to be reused rather than freshly mapped); returns ``(o
    [B, Hq, n*c, d], lse [B, Hq, n*c])``.

    A custom op, so that ``torch.compile`` keeps it whole; its backward is :func:`_blocks_attention_backward`.
    """
    b, h, length, _ = q.shape
    c = mask.shape[2]
    o, lse = torch.empty_like(q), q.new_empty((b, h, length), dtype=_accumulate(q).dtype)
    for i, a, e, piece_mask in _block_pieces(b, length // c, per_piece, mask):
        out, piece_lse = _flash_cpu(*_piece_views(q, k, v, i, a, e, c, t), attn_mask=piece_mask, scale=scale)
        o[i, :, a * c : e * c] = out.transpose(0, 1).flatten(1, 2)
        lse[i, :, a * c : e * c] = piece_lse.transpose(0, 1).flatten(1)
    return o, lse


@_blocks_attention.register_fake
def _blocks_attention_fake(q, k, v, mask, t, scale, per_piece):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_accumulate(q).dtype)


@torch.library.custom_op("bmojo::blocks_attention_backward", mutates_args=())
def _blocks_attention_backward(do: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, mask: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, t: int,
                               scale: float, per_piece: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients of :func:`_blocks_attention` with respect to ``q, k, v``: the kernel's backward per call, each
    block's key gradients folded back onto the slots (``t`` shifted adds).

    The LSE's gradient ``dlse`` enters through the kernel's ``D = rowsum(do * o)`` term, which is all ``o`` is used
    for: passing ``o - dlse / |do|^2 * do`` subtracts ``dlse`` from ``D``, exactly what differentiating ``lse`` adds
    to the score gradients (rows with ``do = 0`` and ``dlse != 0`` are refused).
    """
    b, h, length, d = q.shape
    c = mask.shape[2]
    norm = _accumulate(do).square().sum(-1)
    torch._assert_async(
        ~((norm == 0) & (dlse != 0)).any(),
        "blocks_union_attention: a gradient through the LSE "
        "of a query whose output has no gradient is not supported; use union_attention(impl='merge')",
    )
    o = (_accumulate(o) - (dlse / norm.clamp_min(torch.finfo(torch.float32).tiny)).unsqueeze(-1) * do).to(o.dtype)
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i, a, e, piece_mask in _block_pieces(b, length // c, per_piece, mask):
        n, rows = e - a, slice(a * c, e * c)
        gq, gk, gv = _flash_cpu_backward(do[i, :, rows].view(h, n, c, d).transpose(0, 1),
                                         *_piece_views(q, k, v, i, a, e, c, t),
                                         o[i, :, rows].view(h, n, c, d).transpose(0, 1),
                                         lse[i, :, rows].view(h, n, c).transpose(0, 1), 0.0, False,
                                         attn_mask=piece_mask, scale=scale)  # fmt: skip
        dq[i, :, rows] = gq.transpose(0, 1).flatten(1, 2)
        _fold_blocks(dk[i, :, a : e + t - 1], gk, t)
        _fold_blocks(dv[i, :, a : e + t - 1], gv, t)
    return dq, dk, dv


@_blocks_attention_backward.register_fake
def _blocks_attention_backward_fake(do, dlse, q, k, v, mask, o, lse, t, scale, per_piece):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _blocks_setup(ctx, inputs, output) -> None:
    q, k, v, mask, t, scale, per_piece = inputs
    ctx.save_for_backward(q, k, v, mask, *output)
    ctx.args = (t, scale, per_piece)


def _blocks_backward(ctx, do: torch.Tensor, dlse: torch.Tensor):
    q, k, v, mask, o, lse = ctx.saved_tensors
    dq, dk, dv = _blocks_attention_backward(do.contiguous(), dlse.contiguous(), q, k, v, mask, o, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None


_blocks_attention.register_autograd(_blocks_backward, setup_context=_blocks_setup)


def _fold_blocks(out: torch.Tensor, g: torch.Tensor, t: int) -> None:
    """Adds the gradients of the overlapping views ``g [n, H, t*S, d]`` onto their slots ``out [H, n + t - 1, S, d]``."""
    n, h, ts, d = g.shape
    g = g.view(n, h, t, ts // t, d)
    for j in range(t):
        out[:, j : j + n] += g[:, :, j].transpose(0, 1)


def blocks_union_attention(
    q: torch.Tensor, bands: list[Band], memory: ChunkMemory | None = None, block_size: int = 64
) -> AttnOut:
    """:func:`union_attention` through PyTorch's fused CPU flash-attention kernel, without gathering windows.

    Band keys are laid out in slots of ``c = block_size`` positions: slot ``j`` holds one block of each band, each
    band shifted so that its keys for query block ``i`` lie in slots ``i..i+t-1`` (the fading band of width ``w``
    right before the window of ``w`` share the same ``t = w/c + 1`` slots). Every query block is one batch entry of
    a kernel call over overlapping strided views of the slots, under one additive mask; the chunk memories
    (:func:`chunk_attention`) join by :func:`merge_attention`. Needs CPU tensors and a band with ``lo = 0`` first
    (every query sees itself) and finite bands. Scores ``t * c`` keys per band per query.
    """
    _, hq, length, d = q.shape
    if not _blocks_ok(q, bands):
        raise ValueError("blocks_union_attention needs CPU tensors and finite bands, the first with lo = 0")
    hkv = bands[0].k.shape[1]
    _group(q, hkv)
    c = max(1, min(block_size, length))
    n = -(-length // c)
    shifts, t = _blocks_layout(bands, c)
    keys = [_blocks_keys([band.k for band in bands], shifts, c, n, t),
            _blocks_keys([band.v for band in bands], shifts, c, n, t)]  # fmt: skip
    keys, _ = _sdpa_heads(q, *keys)
    mask = _blocks_mask(bands, shifts, c, n, t, q.dtype, q.device)
    per_piece = max(1, SEGMENT_BYTES // (hq * keys[0].shape[3] * t * d * q.element_size()))
    o, lse = _blocks_attention(F.pad(q, (0, 0, 0, n * c - length)), *keys, mask, t, d**-0.5, per_piece)
    parts = [(o[:, :, :length], lse[:, :, :length])]
    if memory is not None:
        parts.append(chunk_attention(q, memory))
    return merge_attention(parts)


def _triton_tiles(q: torch.Tensor, bands: list[Band], memory: ChunkMemory | None) -> tuple[int, ...] | None:
    """The tiles our Triton read-out would launch with (``bmojo.ops.triton.attention.launch_tiles``; ``None``: none
    fits the GPU)."""
    from bmojo.ops.triton.attention import launch_tiles

    return launch_tiles(q, bands, memory, **_triton_tile_options(q))


def check_union_inputs(q: torch.Tensor, bands: list[Band], memory: ChunkMemory | None) -> None:
    """Raise ``ValueError`` naming the first input of :func:`union_attention` that does not fit ``q [B, Hq, L, d]``
    (L >= 1): each band's ``k, v [B, Hkv, L, d]`` with ``0 <= lo <= hi``, the memory's ``k, v [B, Hkv, chunks, slots,
    d]`` over at least ``L`` positions and ``valid [B, chunks, slots]`` bool, one dtype for queries, keys and values;
    at least one band or a memory; ``TypeError`` unless that dtype is floating point."""
    if q.dim() != 4 or q.shape[0] == 0 or q.shape[2] == 0:
        raise ValueError(f"q must be [batch >= 1, heads, length >= 1, head_dim], got shape {tuple(q.shape)}")
    if not bands and memory is None:
        raise ValueError("union_attention needs at least one band or a memory")
    b, _, length, d = q.shape
    first = bands[0].k if bands else memory.k
    hkv = first.shape[1] if first.dim() > 1 else -1  # (a tensor of too few dimensions fails the shapes below)
    shapes = [(f"bands[{i}].{n}", x, (b, hkv, length, d)) for i, band in enumerate(bands)
              for n, x in (("k", band.k), ("v", band.v))]  # fmt: skip
    if memory is not None:
        n_chunks, slots = memory.k.shape[2:4] if memory.k.dim() == 5 else (0, 0)
        shapes += [("memory.k", memory.k, (b, hkv, n_chunks, slots, d)),
                   ("memory.v", memory.v, (b, hkv, n_chunks, slots, d)),
                   ("memory.valid", memory.valid, (b, n_chunks, slots))]  # fmt: skip
    check_shapes(shapes)
    _group(q, hkv)
    if any(band.lo < 0 or (band.hi is not None and band.hi < band.lo) for band in bands):
        raise ValueError(f"invalid band: bands need 0 <= lo <= hi, got {[(band.lo, band.hi) for band in bands]}")
    if memory is not None:
        if memory.valid.dtype != torch.bool:
            raise ValueError(f"memory.valid must be bool, got {memory.valid.dtype}")
        if memory.chunk < 1 or memory.k.shape[2] * memory.chunk < length:
            raise ValueError(f"memory has {memory.k.shape[2]} chunks of {memory.chunk}, fewer than the {length} "
                             "queries need")  # fmt: skip
    dtypes = {x.dtype for name, x, _ in shapes if name != "memory.valid"} | {q.dtype}
    if len(dtypes) > 1:
        raise ValueError(f"queries, keys and values must share one dtype, got {sorted(map(str, dtypes))}")
    if not q.is_floating_point():
        raise TypeError(f"queries, keys and values must be floating point, got {q.dtype}")


def _cut_to(bands: list[Band], length: int) -> list[Band]:
    """The ``bands`` of a sequence of ``length`` positions as far as they reach into it: ``hi`` at most ``length -
    1``, and a band beyond it (``lo >= length``) left out, unless it is the only one."""
    inside = [band for band in bands if band.lo < length] or bands[:1]
    return [Band(band.k, band.v, band.lo, None if band.hi is None else min(band.hi, max(length - 1, band.lo)))
            for band in inside]  # fmt: skip


def union_attention(
    q: torch.Tensor, bands: list[Band], memory: ChunkMemory | None = None, block_size: int = 64, impl: str = "auto"
) -> AttnOut:
    """One softmax of ``q [B, Hq, L, d]`` over the union of ``bands`` and the per-chunk ``memory``: ``(o, lse)``.

    ``impl``: ``"triton"`` (``bmojo.ops.triton.attention.union_attention_triton``: our kernels, up to two bands),
    ``"flex"`` (:func:`flex_union_attention`), ``"blocks"`` (:func:`blocks_union_attention`: the fused CPU kernel),
    ``"merge"`` (:func:`banded_attention` per band and :func:`chunk_attention`, merged by :func:`merge_attention`), or
    ``"auto"``: ours where ``bmojo.ops.triton.use_triton`` allows it (CUDA tensors, or kernel mode ``triton``), there
    are at most two bands and some tiles of our kernels fit the GPU's shared memory; else FlexAttention where
    ``use_fused_cuda`` allows it; else blocks where it applies (CPU, finite bands, kernel mode not ``reference``);
    else merge. Inputs are checked first (:func:`check_union_inputs`); a band reaching past the sequence is cut to it
    and one wholly past it left out (the blocks and kernels would score padding: a window of 2048 over 512 tokens
    took 4.6x the time of one of 512, for the same result).
    """
    check_union_inputs(q, bands, memory)
    bands = _cut_to(bands, q.shape[2])
    if impl == "auto":
        inputs = [x for band in bands for x in (band.k, band.v)] + ([] if memory is None else [memory.k, memory.v])
        if len(bands) <= 2 and use_triton(q, *inputs, differentiable=True) and _triton_tiles(q, bands, memory):
            impl = "triton"
        elif use_fused_cuda(q) and flex_available():
            impl = "flex"
        elif _blocks_ok(q, bands) and kernels() != "reference":
            impl = "blocks"
        else:
            impl = "merge"
    if impl == "triton":
        from bmojo.ops.triton.attention import union_attention_triton

        return union_attention_triton(q, bands, memory, **_triton_tile_options(q))
    if impl == "flex":
        return flex_union_attention(q, bands, memory)
    if impl == "blocks":
        return blocks_union_attention(q, bands, memory, block_size)
    if impl != "merge":
        raise ValueError(f"impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    parts = [banded_attention(q, band.k, band.v, band.lo, band.hi, block_size) for band in bands]
    if memory is not None:
        parts.append(chunk_attention(q, memory))
    return merge_attention(parts)


def union_attention_ref(q: torch.Tensor, bands: list[Band], memory: ChunkMemory | None = None) -> AttnOut:
    """Reference for :func:`union_attention`: dense attention over the concatenated keys under an explicit mask."""
    b, _, length, _ = q.shape
    k, v = _union_keys(bands, memory)
    mask_mod = _union_mask_mod(length, bands, memory)
    qi = torch.arange(length, device=q.device).view(1, length, 1)
    ki = torch.arange(k.shape[2], device=q.device).view(1, 1, -1)
    mask = mask_mod(torch.arange(b, device=q.device).view(b, 1, 1), None, qi, ki)  # [B, L, K]
    return attention_with_lse(q, k, v, mask.expand(b, length, k.shape[2])[:, None, None])


def banded_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: int, hi: int | None, scale: float | None = None
) -> AttnOut:
    """Reference for :func:`banded_attention`: dense attention under an explicit ``[L, L]`` band mask."""
    i = torch.arange(q.shape[2], device=q.device).view(-1, 1)
    j = torch.arange(k.shape[2], device=q.device).view(1, -1)
    mask = (i - j >= lo) & (True if hi is None else (i - j <= hi))
    return attention_with_lse(q, k, v, mask, scale)
