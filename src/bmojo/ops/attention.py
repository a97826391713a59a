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


def _group(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, M, d] -> [B, Hkv, G, M, d] so that query head h uses key head h // G."""
    b, hq, m, d = q.shape
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    return q.view(b, hkv, hq // hkv, m, d)


def _softmax_lse(scores: torch.Tensor, v: torch.Tensor) -> AttnOut:
    """Softmax over the last axis of float32 ``scores`` (masked entries -inf), then ``@ v``."""
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
    scores = (qg @ k.unsqueeze(2).transpose(-1, -2)).float() * scale  # [B, Hkv, G, M, K]
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
    only keys ``[a - hi, a + c - 1 - lo]``, so memory is ``O(L * (block_size + hi - lo))`` and no
    ``L x L`` tensor is built when the band is narrow.
    """
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    if lo < 0 or (hi is not None and hi < lo):
        raise ValueError(f"invalid band lo={lo}, hi={hi}")
    hi = length - 1 if hi is None else min(hi, length - 1)
    if lo > hi:  # no query has any key in the band
        return q.new_zeros(q.shape), q.new_full((b, hq, length), float("-inf"), dtype=torch.float32)
    scale = d**-0.5 if scale is None else scale
    c = max(1, min(block_size, length))
    nb = -(-length // c)
    span = c + hi - lo  # keys a block can see
    # Left-pad keys by `hi` so block b's keys start at padded index b*c; right-pad so every window fits.
    kp = F.pad(k, (0, 0, hi, nb * c - length))
    vp = F.pad(v, (0, 0, hi, nb * c - length))
    kw = kp.unfold(2, span, c)[:, :, :nb]  # [B, Hkv, nb, d, span]
    vw = vp.unfold(2, span, c)[:, :, :nb].transpose(-1, -2)  # [B, Hkv, nb, span, d]
    qb = _group(F.pad(q, (0, 0, 0, nb * c - length)), hkv).unflatten(3, (nb, c))  # [B, Hkv, G, nb, c, d]
    scores = (qb @ kw.unsqueeze(2)).float() * scale  # [B, Hkv, G, nb, c, span]
    qi = torch.arange(c, device=q.device).view(c, 1)
    s = torch.arange(span, device=q.device).view(1, span)
    offset = qi + hi - s  # i - j inside a block
    key_pos = torch.arange(nb, device=q.device).view(nb, 1) * c - hi + s  # [nb, span]
    visible = (offset >= lo) & (offset <= hi) & (key_pos >= 0).unsqueeze(1)  # [nb, c, span]
    scores = scores.masked_fill(~visible, float("-inf"))
    o, lse = _softmax_lse(scores, vw.unsqueeze(2))
    o = o.reshape(b, hq, nb * c, d)[:, :, :length]
    lse = lse.reshape(b, hq, nb * c)[:, :, :length]
    return o, lse


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
