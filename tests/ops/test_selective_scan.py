"""Chunked Mamba-1 selective scan and the recurrent step against the sequential reference."""

import pytest
import torch
import torch.nn.functional as F

from bmojo.ops.selective_scan import selective_scan, selective_scan_ref, selective_scan_step

E, N = 24, 16  # E: a channel count that is not a power of two


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: a second thread only adds synchronisation (slow on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(batch, length, dtype=torch.float32, strong_decay=False, seed=0):
    """``(u, delta, A, B, C, initial_state)`` with Mamba-like magnitudes; ``delta * |A| ~ 20`` if strong."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, E, generator=g)
    delta = F.softplus(torch.randn(batch, length, E, generator=g)) * 0.5
    A = -torch.exp(torch.randn(E, N, generator=g))
    if strong_decay:
        delta, A = delta + 2.0, A - 10.0
    B = torch.randn(batch, length, N, generator=g)
    C = torch.randn(batch, length, N, generator=g)
    h0 = torch.randn(batch, E, N, generator=g)
    return [t.to(dtype) for t in (u, delta, A, B, C)] + [h0]


def _outputs_and_grads(fn, inputs, seed=1):
    """``fn``'s outputs and the gradients of a random projection of them w.r.t. every input."""
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    y, state = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    loss = (y.float() * torch.randn(y.shape, generator=g)).sum() + (state * torch.randn(state.shape, generator=g)).sum()
    return (y, state), torch.autograd.grad(loss, inputs)


def _assert_close(actual, expected, name, **tol):
    print(f"{name}: max abs diff {(actual.float() - expected.float()).abs().max().item():.2e}")
    torch.testing.assert_close(actual, expected, **tol)


@pytest.mark.parametrize("length", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 8, 24])
def test_chunked_matches_reference(length, batch, with_initial_state, chunk_size):
    *inputs, h0 = _inputs(batch, length)
    if with_initial_state:
        inputs.append(h0)
    (y, s), grads = _outputs_and_grads(lambda *a: selective_scan(*a, chunk_size=chunk_size), inputs)
    (y_ref, s_ref), grads_ref = _outputs_and_grads(selective_scan_ref, inputs)
    assert y.shape == (batch, length, E) and s.shape == (batch, E, N) and s.dtype == torch.float32
    _assert_close(y, y_ref, "y", atol=1e-5, rtol=1e-4)
    _assert_close(s, s_ref, "final state", atol=1e-5, rtol=1e-4)
    for name, g, g_ref in zip(["u", "delta", "A", "B", "C", "initial_state"], grads, grads_ref):
        _assert_close(g, g_ref, f"grad {name}", atol=1e-5, rtol=1e-4)


def test_bf16_inputs():
    *inputs, h0 = _inputs(2, 65, dtype=torch.bfloat16)
    (y, s), grads = _outputs_and_grads(lambda *a: selective_scan(*a, chunk_size=16), inputs + [h0])
    (y_ref, s_ref), grads_ref = _outputs_and_grads(selective_scan_ref, inputs + [h0])
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    _assert_close(y, y_ref, "y", atol=2e-2, rtol=2e-2)
    _assert_close(s, s_ref, "final state", atol=1e-4, rtol=1e-4)
    for name, g, g_ref in zip(["u", "delta", "A", "B", "C", "initial_state"], grads, grads_ref):
        _assert_close(g.float(), g_ref.float(), f"grad {name}", atol=5e-2, rtol=2e-2)


def test_strong_decay_is_stable():
    """``delta * |A|`` around 20-30 per step: every state underflows within a step or two, no inf/nan."""
    inputs = _inputs(2, 130, strong_decay=True)
    (y, s), grads = _outputs_and_grads(lambda *a: selective_scan(*a, chunk_size=32), inputs)
    (y_ref, s_ref), grads_ref = _outputs_and_grads(selective_scan_ref, inputs)
    for t in (y, s, *grads):
        assert torch.isfinite(t).all()
    _assert_close(y, y_ref, "y", atol=1e-5, rtol=1e-4)
    _assert_close(s, s_ref, "final state", atol=1e-5, rtol=1e-4)
    for name, g, g_ref in zip(["u", "delta", "A", "B", "C", "initial_state"], grads, grads_ref):
        _assert_close(g, g_ref, f"grad {name}", atol=1e-5, rtol=1e-4)


def test_step_iterated_matches_reference():
    u, delta, A, B, C, h0 = _inputs(3, 20)
    y_ref, s_ref = selective_scan_ref(u, delta, A, B, C, h0)
    state, ys = h0, []
    for t in range(u.shape[1]):
        y_t, state = selective_scan_step(state, u[:, t], delta[:, t], A, B[:, t], C[:, t])
        ys.append(y_t)
    _assert_close(torch.stack(ys, dim=1), y_ref, "y", atol=1e-5, rtol=1e-4)
    _assert_close(state, s_ref, "final state", atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("split", [1, 37, 64])
def test_two_pieces_equal_one_scan(split):
    u, delta, A, B, C, h0 = _inputs(2, 101)
    y, s = selective_scan(u, delta, A, B, C, h0, chunk_size=16)
    first = slice(None, split)
    second = slice(split, None)
    y1, s1 = selective_scan(u[:, first], delta[:, first], A, B[:, first], C[:, first], h0, chunk_size=16)
    y2, s2 = selective_scan(u[:, second], delta[:, second], A, B[:, second], C[:, second], s1, chunk_size=16)
    _assert_close(torch.cat([y1, y2], dim=1), y, "y", atol=1e-5, rtol=1e-4)
    _assert_close(s2, s, "final state", atol=1e-5, rtol=1e-4)


NAMES = ["u", "delta", "A", "B", "C", "initial_state"]


@pytest.mark.parametrize(
    "trainable", [["u"], ["delta"], ["A"], ["B", "C"], ["initial_state"], ["delta", "A"], ["u", "initial_state"]]
)
@pytest.mark.parametrize("loss_on", ["y", "state"])
def test_backward_with_some_inputs_trainable(trainable, loss_on):
    """Only some inputs require grad, and the loss may use only one output: the same gradients as autograd."""
    inputs = _inputs(2, 45)
    grads = []
    for fn in (lambda *a: selective_scan(*a, chunk_size=20), selective_scan_ref):
        leaves = [t.detach().requires_grad_(name in trainable) for name, t in zip(NAMES, inputs)]
        y, state = fn(*leaves)
        g = torch.Generator().manual_seed(1)
        out = y if loss_on == "y" else state
        loss = (out * torch.randn(out.shape, generator=g)).sum()
        trained = [t for t in leaves if t.requires_grad]
        grads.append(torch.autograd.grad(loss, trained, allow_unused=True, materialize_grads=True))
    for name, g, g_ref in zip(trainable, *grads):
        _assert_close(g, g_ref, f"grad {name}", atol=1e-5, rtol=1e-4)


def test_gradcheck_float64():
    """Finite differences in float64 on a tiny shape: 3 chunks of 12 steps (the last one padded), each
    recomputed in two checkpoint blocks, batch 2, an initial state."""
    g = torch.Generator().manual_seed(0)
    batch, length, e, n = 2, 30, 3, 2
    u = torch.randn(batch, length, e, generator=g, dtype=torch.float64)
    delta = F.softplus(torch.randn(batch, length, e, generator=g, dtype=torch.float64))
    A = -torch.exp(torch.randn(e, n, generator=g, dtype=torch.float64))
    B = torch.randn(batch, length, n, generator=g, dtype=torch.float64)
    C = torch.randn(batch, length, n, generator=g, dtype=torch.float64)
    h0 = torch.randn(batch, e, n, generator=g, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C, h0)]
    y, state = selective_scan(*inputs, chunk_size=12)
    assert y.dtype == state.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, chunk_size=12), inputs)
