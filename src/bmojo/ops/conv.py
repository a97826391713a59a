"""Causal depthwise 1-d convolution (the SSM layers' short conv) in the layers' ``[B, L, C]`` layout.

:func:`causal_conv1d` computes ``y[b, t, c] = bias[c] + sum_j weight[c, 0, j] * x[b, t + j, c]`` for ``x [B, L + K - 1,
C]`` (already holding the ``K - 1`` inputs before the first output), an ``nn.Conv1d(C, C, K, groups=C)`` weight
``[C, 1, K]`` and bias ``[C]``, optionally followed by SiLU (as causal-conv1d's ``activation="silu"``). The reference
is ``F.conv1d`` of the input transposed to ``[B, C, L + K - 1]``; here it is ``K`` shifted multiply-adds, which
autograd differentiates and ``torch.compile`` fuses into one pass, and which keep the tokens-major layout of the
projections around it. On CPU that is faster than the convolution for the whole training step: PyTorch's depthwise
conv backward is slow at these shapes, and a channels-major conv output leaves the elementwise work after it
(the SSD's skip, the gated norm, their backward) reading transposed memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu: bool = False
) -> torch.Tensor:
    """``x [B, L + K - 1, C]``, ``weight [C, 1, K]``, ``bias [C]`` -> ``[B, L, C]``, then SiLU if ``silu``; computed
    in ``x``'s dtype (as ``F.conv1d`` under autocast)."""
    c, k = weight.shape[0], weight.shape[-1]
    if weight.shape != (c, 1, k) or x.dim() != 3 or x.shape[2] != c:
        raise ValueError(f"expected x [B, L + K - 1, C] and a depthwise weight [C, 1, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")  # fmt: skip
    length = x.shape[1] - k + 1
    if length < 1:
        raise ValueError(f"a kernel of {k} needs at least {k} inputs, got {x.shape[1]}")
    w = weight[:, 0].to(x.dtype)
    y = x[:, :length] * w[:, 0] if bias is None else torch.addcmul(bias.to(x.dtype), x[:, :length], w[:, 0])
    for j in range(1, k):
        y = torch.addcmul(y, x[:, j : j + length], w[:, j])
    return F.silu(y) if silu else y
