"""Depthwise 1-d convolution (the SSM layers' short causal conv) with a cheaper backward pass on CPU.

:func:`depthwise_conv1d` computes ``y[b, c, t] = bias[c] + sum_j weight[c, 0, j] * x[b, c, t + j]`` for ``x [B, C,
L + K - 1]`` (already padded on the left for a causal conv), ``weight [C, 1, K]``, ``bias [C]``: ``F.conv1d(x, weight,
bias, groups=C)``, which stays the reference, optionally followed by SiLU (as causal-conv1d's ``activation="silu"``).
On CPU its backward is computed here: the input gradient as the same depthwise convolution of the gradient with the
flipped kernel, the kernel gradient as ``K`` products of shifted inputs with the gradient, summed; PyTorch's own
depthwise backward is about 1.5-3x slower at the layers' shapes. The SSM layers use the output transposed to ``[B,
L, C]``, so its gradient arrives transposed: the backward makes it contiguous once, which makes the SiLU backward
and the products about 5-10x faster than on the strided gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class _DepthwiseConv1d(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # the backward's convolution runs under the forward's autocast state
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
        y = F.conv1d(x, weight, bias, groups=x.shape[1])
        ctx.save_for_backward(x, weight, y if silu else None)
        return F.silu(y) if silu else y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, y = ctx.saved_tensors
        grad = grad.contiguous()
        if y is not None:
            grad = torch.ops.aten.silu_backward(grad, y)
        k, length = weight.shape[-1], grad.shape[-1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv1d(grad, weight.flip(-1), padding=k - 1, groups=x.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = torch.stack([(x[..., j : j + length] * grad).sum((0, 2)) for j in range(k)], -1).unsqueeze(1)
        if ctx.needs_input_grad[2]:  # False without a bias
            grad_b = grad.sum((0, 2))
        return grad_x, grad_w, grad_b, None


def depthwise_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu: bool = False
) -> torch.Tensor:
    """``F.conv1d(x, weight, bias, groups=C)`` for ``x [B, C, L + K - 1]`` -> ``[B, C, L]``, then SiLU if ``silu``,
    differentiated by this module's backward on CPU."""
    if x.device.type == "cpu" and torch.is_grad_enabled():
        return _DepthwiseConv1d.apply(x, weight, bias, silu)
    y = F.conv1d(x, weight, bias, groups=x.shape[1])
    return F.silu(y) if silu else y
