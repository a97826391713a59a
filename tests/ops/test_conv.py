"""The depthwise conv's own CPU backward against PyTorch's conv1d autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bmojo.ops.conv import depthwise_conv1d


@pytest.mark.parametrize("b,c,length,k", [(1, 3, 1, 4), (2, 8, 37, 4), (3, 5, 64, 2), (1, 16, 200, 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("silu", [False, True])
def test_depthwise_conv1d_matches_conv1d_forward_and_gradients(b, c, length, k, bias, dtype, silu):
    """Against ``F.conv1d`` (then ``F.silu``) under autograd; with SiLU the gradient arrives transposed, as in the
    SSM layers (a strided view of a ``[B, L, C]`` tensor)."""
    g = torch.Generator().manual_seed(length)
    x = torch.randn(b, c, length + k - 1, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(c, 1, k, generator=g, dtype=dtype, requires_grad=True)
    bb = torch.randn(c, generator=g, dtype=dtype, requires_grad=True) if bias else None
    grad = torch.randn(b, c, length, generator=g, dtype=dtype)
    if silu:
        grad = grad.transpose(1, 2).contiguous().transpose(1, 2)
    leaves = [t for t in (x, w, bb) if t is not None]
    y = depthwise_conv1d(x, w, bb, silu=silu)
    y_ref = F.conv1d(x, w, bb, groups=c)
    y_ref = F.silu(y_ref) if silu else y_ref
    torch.testing.assert_close(y, y_ref)
    for a, r in zip(torch.autograd.grad(y, leaves, grad), torch.autograd.grad(y_ref, leaves, grad)):
        torch.testing.assert_close(a, r)


def test_depthwise_conv1d_gradcheck_and_frozen_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(depthwise_conv1d, (x, w, b))
    assert torch.autograd.gradcheck(depthwise_conv1d, (x, w, b, True))
    (gx,) = torch.autograd.grad(depthwise_conv1d(x, w.detach(), b.detach()).sum(), x)  # weights frozen
    torch.testing.assert_close(gx, torch.autograd.grad(F.conv1d(x, w, b, groups=3).sum(), x)[0])


def test_depthwise_conv1d_under_bfloat16_autocast_follows_conv1d():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 40, generator=g, requires_grad=True)
    w = torch.randn(6, 1, 4, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True)
    results = []
    for fn in (depthwise_conv1d, lambda *a: F.conv1d(*a, groups=6)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, w, b)
        results.append((y, *torch.autograd.grad(y.float().square().sum(), (x, w, b))))
    for a, r in zip(*results):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, atol=0.1, rtol=0.02)
