"""Causal depthwise 1-d convolution (the SSM layers' short conv) in the layers' ``[B, L, C]`` layout.

:func:`causal_conv1d` computes ``y[b, t, c] = bias[c] + sum_j weight[c, 0, j] * x[b, t + j, c]`` for ``x [B, L + K - 1,
C]`` (already holding the ``K - 1`` inputs before the first output), an ``nn.Conv1d(C, C, K, groups=C)`` weight
``[C, 1, K]`` and bias ``[C]``, optionally followed by SiLU (as causal-conv1d's ``activation="silu"``). The reference
is ``F.conv1d`` of the input transposed to ``[B, C, L + K - 1]``; here it is ``K`` shifted multiply-adds, which
autograd differentiates and ``torch.compile`` fuses into one pass, and which keep the tokens-major layout of the
projections around it. On CPU that is faster than the convolution for the whole training step: PyTorch's depthwise
conv backward is slow at these shapes, and a channels-major conv output leaves the elementwise work after it
(the SSD's skip, the gated norm, their backward) reading transposed memory. :func:`causal_conv1d_step` is one
output from the last ``K`` inputs, for decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bmojo.ops import check_shapes


def _check_dtypes_and_bias(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, name: str = "x") -> None:
    """Raise ``TypeError`` unless the input ``x`` (called ``name``), ``weight`` and ``bias`` are floating point (the
    weights would be cast to an integer ``x``'s dtype: rounded, to zero below 1), ``ValueError`` unless ``bias`` is
    ``[C]`` (``C = weight.shape[0]``)."""
    given = [(name, x), ("weight", weight), ("bias", bias)]
    wrong = [f"{label} {t.dtype}" for label, t in given if t is not None and not t.is_floating_point()]
    if wrong:
        raise TypeError(f"the causal conv takes floating point inputs, got {', '.join(wrong)}")
    check_shapes([("bias", bias, (weight.shape[0],))])


@torch.library.custom_op("bmojo::conv_taps", mutates_args=())
def conv_taps(weight: torch.Tensor) -> torch.Tensor:
    """A depthwise conv weight ``[C, 1, K]`` as ``[K, C]``, contiguous: each tap's weights side by side.

    An opaque op, so that ``torch.compile`` keeps its result as a buffer: inductor inlines a plain ``.t().contiguous()``
    into the kernels that read the taps, and its CPU code does not vectorize their stride-``K`` loads (those kernels
    ran about 3x slower).
    """
    return weight[:, 0].t().contiguous()


@conv_taps.register_fake
def _(weight: torch.Tensor) -> torch.Tensor:
    return weight.new_empty(weight.shape[2], weight.shape[0])


conv_taps.register_autograd(lambda ctx, grad: grad.t().unsqueeze(1))


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu: bool = False
) -> torch.Tensor:
    """``x [B, L + K - 1, C]``, ``weight [C, 1, K]``, ``bias [C]`` -> ``[B, L, C]``, then SiLU if ``silu``; computed
    in ``x``'s dtype (as ``F.conv1d`` under autocast)."""
    c, k = weight.shape[0], weight.shape[-1]
    if weight.shape != (c, 1, k) or x.dim() != 3 or x.shape[2] != c:
        raise ValueError(f"expected x [B, L + K - 1, C] and a depthwise weight [C, 1, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")  # fmt: skip
    _check_dtypes_and_bias(x, weight, bias)
    length = x.shape[1] - k + 1
    if length < 1:
        raise ValueError(f"a kernel of {k} needs at least {k} inputs, got {x.shape[1]}")
    w = (conv_taps(weight) if torch.compiler.is_compiling() else weight[:, 0].t()).to(x.dtype)  # [K, C]
    y = x[:, :length] * w[0] if bias is None else torch.addcmul(bias.to(x.dtype), x[:, :length], w[0])
    for j in range(1, k):
        y = torch.addcmul(y, x[:, j : j + length], w[j])
    return F.silu(y) if silu else y


def causal_conv1d_step(
    window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu: bool = False
) -> torch.Tensor:
    """The conv's output for the last of ``window [B, C, K]``, the last ``K`` inputs (oldest first): ``[B, C]``, then
    SiLU if ``silu`` (:func:`causal_conv1d` over those inputs, in one product and sum)."""
    if window.dim() != 3 or window.shape[1:] != (weight.shape[0], weight.shape[-1]) or weight.shape[1] != 1:
        raise ValueError(f"expected a window [B, C, K] and a depthwise weight [C, 1, K], got {tuple(window.shape)} "
                         f"and {tuple(weight.shape)}")  # fmt: skip
    _check_dtypes_and_bias(window, weight, bias, "window")
    y = (window * weight[:, 0].to(window.dtype)).sum(-1)
    y = y if bias is None else y + bias.to(y.dtype)
    return F.silu(y) if silu else y
