"""Checks shared by the scan tests (Mamba-1 selective scan, Mamba-2 SSD): a scan's output, final state and every
input's gradient against its sequential reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

TOL = {"atol": 1e-5, "rtol": 1e-4}
Scan = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def outputs_and_grads(fn: Scan, inputs: Sequence[torch.Tensor], seed: int = 1):
    """``fn``'s ``(y, final state)`` and the gradients of a random projection of them w.r.t. every input."""
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    y, state = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    loss = (y.float() * torch.randn(y.shape, generator=g)).sum() + (state * torch.randn(state.shape, generator=g)).sum()
    return (y, state), torch.autograd.grad(loss, inputs)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, **tol) -> None:
    print(f"{name}: max abs diff {(actual.float() - expected.float()).abs().max().item():.2e}")
    torch.testing.assert_close(actual, expected, **tol)


def assert_outputs_close(out, expected, y_tol: dict = TOL, state_tol: dict = TOL) -> None:
    """``(y, final state)`` against the expected pair."""
    assert_close(out[0], expected[0], "y", **y_tol)
    assert_close(out[1], expected[1], "final state", **state_tol)


def check_scan(fn: Scan, ref: Scan, inputs: Sequence[torch.Tensor], names: Sequence[str], y_tol: dict = TOL,
               state_tol: dict = TOL, grad_tol: dict = TOL):  # fmt: skip
    """``fn`` against ``ref`` on ``inputs`` (named ``names``): outputs and gradients; returns ``fn``'s."""
    out, grads = outputs_and_grads(fn, inputs)
    expected, grads_ref = outputs_and_grads(ref, inputs)
    assert_outputs_close(out, expected, y_tol, state_tol)
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close(g.float(), g_ref.float(), f"grad {name}", **grad_tol)
    return out, grads
