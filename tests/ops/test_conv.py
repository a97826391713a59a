"""The causal depthwise conv as shifted products against PyTorch's ``conv1d`` (forward and autograd)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from bmojo.ops.conv import causal_conv1d, causal_conv1d_step, conv_taps


def conv1d_ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, silu: bool = False) -> torch.Tensor:
    """``F.conv1d`` over ``x [B, L + K - 1, C]`` transposed to channels-major, back to ``[B, L, C]``."""
    y = F.conv1d(x.transpose(1, 2), w, b, groups=x.shape[2]).transpose(1, 2)
    return F.silu(y) if silu else y


@pytest.mark.parametrize("b,c,length,k", [(1, 3, 1, 4), (2, 8, 37, 4), (3, 5, 64, 2), (1, 16, 200, 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("silu", [False, True])
def test_causal_conv1d_matches_conv1d_forward_and_gradients(b, c, length, k, bias, dtype, silu):
    g = torch.Generator().manual_seed(length)
    x = torch.randn(b, length + k - 1, c, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(c, 1, k, generator=g, dtype=dtype, requires_grad=True)
    bb = torch.randn(c, generator=g, dtype=dtype, requires_grad=True) if bias else None
    grad = torch.randn(b, length, c, generator=g, dtype=dtype)
    leaves = [t for t in (x, w, bb) if t is not None]
    y, y_ref = causal_conv1d(x, w, bb, silu=silu), conv1d_ref(x, w, bb, silu)
    torch.testing.assert_close(y, y_ref)
    for a, r in zip(torch.autograd.grad(y, leaves, grad), torch.autograd.grad(y_ref, leaves, grad)):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_step_is_the_last_output_over_its_window(k, bias):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, 9 + k, 5, generator=g)
    w, b = torch.randn(5, 1, k, generator=g), torch.randn(5, generator=g) if bias else None
    full = conv1d_ref(x, w, b, silu=True)
    for t in (0, 4, 9):  # output t reads inputs t .. t + k - 1
        step = causal_conv1d_step(x[:, t : t + k].transpose(1, 2), w, b, silu=True)
        torch.testing.assert_close(step, full[:, t])


def test_causal_conv1d_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(causal_conv1d, (x, w, b))
    assert torch.autograd.gradcheck(causal_conv1d, (x, w, b, True))


def test_causal_conv1d_under_bfloat16_autocast_follows_conv1d():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 6, generator=g, requires_grad=True)
    w = torch.randn(6, 1, 4, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True)
    results = []
    for fn in (causal_conv1d, conv1d_ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x.bfloat16(), w, b)  # the SSM layers' input comes from a linear layer, bfloat16 under autocast
        results.append((y, *torch.autograd.grad(y.float().square().sum(), (x, w, b))))
    for a, r in zip(*results):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, atol=0.1, rtol=0.02)


@pytest.mark.parametrize(
    "x_shape,w_shape,match",
    [
        ((2, 3, 5), (5, 1, 4), "at least 4 inputs"),
        ((2, 9, 5), (6, 1, 4), "depthwise weight"),
        ((9, 5), (5, 1, 4), "expected x"),
    ],
)
def test_causal_conv1d_rejects_bad_shapes(x_shape, w_shape, match):
    with pytest.raises(ValueError, match=match):
        causal_conv1d(torch.randn(x_shape), torch.randn(w_shape))


def test_causal_conv1d_step_rejects_a_window_that_does_not_fit():
    with pytest.raises(ValueError, match="expected a window"):
        causal_conv1d_step(torch.randn(2, 1, 4), torch.randn(5, 1, 4))  # one channel would broadcast over five
    with pytest.raises(ValueError, match="expected a window"):
        causal_conv1d_step(torch.randn(5, 4), torch.randn(5, 1, 4))


def test_causal_conv1d_rejects_integer_inputs():
    """Integer inputs once gave zeros silently: the weights were cast to the input's integer dtype."""
    x, w = torch.randint(0, 5, (1, 6, 2)), torch.full((2, 1, 3), 0.5)
    with pytest.raises(TypeError, match="floating point inputs, got x torch.int64"):
        causal_conv1d(x, w)
    with pytest.raises(TypeError, match="got window torch.int64"):
        causal_conv1d_step(x[:, :3].transpose(1, 2), w)
    with pytest.raises(TypeError, match="got weight torch.int64, bias torch.int64"):
        causal_conv1d(x.float(), w.long(), torch.ones(2, dtype=torch.long))


def test_causal_conv1d_rejects_a_bias_that_is_not_one_per_channel():
    x, w = torch.randn(2, 8, 7), torch.randn(7, 1, 3)
    for bias in (torch.randn(8), torch.randn(1, 7)):
        with pytest.raises(ValueError, match=rf"bias must have shape \(7,\), got {re.escape(str(tuple(bias.shape)))}"):
            causal_conv1d(x, w, bias)
        with pytest.raises(ValueError, match=r"bias must have shape \(7,\)"):
            causal_conv1d_step(x[:, :3].transpose(1, 2), w, bias)


def test_causal_conv1d_compiled_matches_eager():
    """Under ``torch.compile`` the taps come from the opaque ``conv_taps`` op; same values and gradients."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 19, 6, generator=g, requires_grad=True)
    w = torch.randn(6, 1, 4, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True)
    grad = torch.randn(2, 16, 6, generator=g)
    compiled = torch.compile(causal_conv1d, fullgraph=True)
    y, y_ref = compiled(x, w, b, True), conv1d_ref(x, w, b, True)
    torch.testing.assert_close(y, y_ref)
    for a, r in zip(torch.autograd.grad(y, (x, w, b), grad), torch.autograd.grad(y_ref, (x, w, b), grad)):
        torch.testing.assert_close(a, r)


def test_conv_taps_layout_and_gradient():
    w = torch.randn(5, 1, 3, dtype=torch.float64, requires_grad=True)
    taps = conv_taps(w)
    assert taps.shape == (3, 5) and taps.is_contiguous()
    torch.testing.assert_close(taps, w[:, 0].t())
    assert torch.autograd.gradcheck(conv_taps, (w,))
