"""Attention with log-sum-exp outputs, banded (sliding-window) attention, and the exact LSE merge.

Shapes: queries ``q [B, Hq, M, d]``; keys/values ``k, v [B, Hkv, K, d]`` with ``Hq % Hkv == 0``
(grouped-query attention). Every function returns ``(o, lse)``: ``o [B, Hq, M, d]`` in the
input dtype and ``lse [B, Hq, M]`` in float32, ``lse = -inf`` (and ``o = 0``) for a query that
sees no key. Several ``(o, lse)`` pairs computed over disjoint key sets combine into the single
softmax over their union with :func:`merge_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AttnOut = tuple[torch.Tensor, torch.Tensor]
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


def _softmax_lse(scores: torch.Tensor, v: torch.Tensor) -> AttnOut:
    """Softmax over the last axis of float32 (or float64) ``scores`` (masked entries -inf), then ``@ v``."""
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    return p.to(v.dtype) @ v, lse


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> AttnOut:
    """Dense attention of every query to every key allowed by ``mask``.

    ``mask`` is boolean (True = visible), broadcastable to ``[B, Hkv, G, M, K]`` where
    ``G = Hq // Hkv``; a mask of shape ``[B, M, K]`` or ``[B, K]`` must be unsqueezed by the caller.
    """
    b, hq, m, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    qg = _group(q, hkv)
    scores = _accumulate(qg @ k.unsqueeze(2).transpose(-1, -2)) * scale  # [B, Hkv, G, M, K]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    o, lse = _softmax_lse(scores, v.unsqueeze(2))
    return o.reshape(b, hq, m, d), lse.reshape(b, hq, m)


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
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    if lo < 0 or (hi is not None and hi < lo):
        raise ValueError(f"invalid band lo={lo}, hi={hi}")
    _group(q, hkv)  # checks the head counts
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
    qi = torch.arange(c, device=q.device).view(c, 1)
    s = torch.arange(span, device=q.device).view(1, span)
    offset = qi + hi - s  # i - j inside a block
    key_pos = torch.arange(b0, b0 + n, device=q.device).view(n, 1) * c - hi + s  # [n, span]
    visible = (offset >= lo) & (offset <= hi) & (key_pos >= 0).unsqueeze(1)  # [n, c, span]
    o, lse = _softmax_lse(scores.masked_fill(~visible, float("-inf")), vw.unsqueeze(2))
    return o.reshape(b, hq, nc, d), lse.reshape(b, hq, nc)


class _BandedAttention(torch.autograd.Function):
    """:func:`banded_attention` on padded inputs, one segment of ``seg`` query blocks at a time.

    Backward recomputes each segment's scores and differentiates through :func:`_band_segment`,
    accumulating key/value gradients over the overlapping key ranges of neighbouring segments.
    """

    @staticmethod
    def _segments(nb: int, seg: int, c: int, hi: int, lo: int) -> list[tuple[int, slice, slice]]:
        return [(b0, slice(b0 * c, min(b0 + seg, nb) * c), slice(b0 * c, min(b0 + seg, nb) * c + hi - lo))
                for b0 in range(0, nb, seg)]  # fmt: skip

    @staticmethod
    def forward(ctx, qp, kp, vp, lo: int, hi: int, c: int, scale: float, seg: int) -> AttnOut:
        ctx.save_for_backward(qp, kp, vp)
        ctx.band = (lo, hi, c, scale, seg)
        parts = [
            _band_segment(qp[:, :, qs], kp[:, :, ks], vp[:, :, ks], b0, lo, hi, c, scale)
            for b0, qs, ks in _BandedAttention._segments(qp.shape[2] // c, seg, c, hi, lo)
        ]
        return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: torch.Tensor, dlse: torch.Tensor):
        qp, kp, vp = ctx.saved_tensors
        lo, hi, c, scale, seg = ctx.band
        dq, dk, dv = torch.empty_like(qp), torch.zeros_like(kp), torch.zeros_like(vp)
        for b0, qs, ks in _BandedAttention._segments(qp.shape[2] // c, seg, c, hi, lo):
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
    """Full causal attention without LSE, through PyTorch's fused ``scaled_dot_product_attention``."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def merge_attention(parts: list[AttnOut]) -> torch.Tensor:
    """Combine partial attentions over disjoint key sets into the softmax over their union.

    ``o = sum_j o_j exp(lse_j - m) / sum_j exp(lse_j - m)`` with ``m = max_j lse_j``; a query
    that sees no key in any set gets ``o = 0``.
    """
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.stack([p[1] for p in parts])  # [S, B, H, M]
    m = lse.amax(0)
    w = torch.exp(lse - m.masked_fill(torch.isinf(m), 0.0))  # exp(-inf) = 0 for empty sets
    denom = w.sum(0).clamp_min(torch.finfo(torch.float32).tiny)
    o = sum(p[0].float() * (wi / denom).unsqueeze(-1) for p, wi in zip(parts, w))
    return o.to(parts[0][0].dtype)


def banded_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: int, hi: int | None, scale: float | None = None
) -> AttnOut:
    """Reference for :func:`banded_attention`: dense attention under an explicit ``[L, L]`` band mask."""
    i = torch.arange(q.shape[2], device=q.device).view(-1, 1)
    j = torch.arange(k.shape[2], device=q.device).view(1, -1)
    mask = (i - j >= lo) & (True if hi is None else (i - j <= hi))
    return attention_with_lse(q, k, v, mask, scale)
