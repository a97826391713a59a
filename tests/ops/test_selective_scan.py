"""Chunked Mamba-1 selective scan and the recurrent step against the sequential reference."""

import pytest
import torch
import torch.nn.functional as F
from scan_checks import TOL, assert_close, assert_outputs_close, check_scan

from bmojo.ops.selective_scan import selective_scan, selective_scan_ref, selective_scan_step

E, N = 24, 16  # E: a channel count that is not a power of two
NAMES = ["u", "delta", "A", "B", "C", "initial_state"]


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


@pytest.mark.parametrize("length", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 8, 24])
def test_chunked_matches_reference(length, batch, with_initial_state, chunk_size):
    *inputs, h0 = _inputs(batch, length)
    if with_initial_state:
        inputs.append(h0)
    (y, s), grads = check_scan(lambda *a: selective_scan(*a, chunk_size=chunk_size), selective_scan_ref, inputs, NAMES)
    assert y.shape == (batch, length, E) and s.shape == (batch, E, N) and s.dtype == torch.float32


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5])
def test_bad_chunk_size_raises(chunk_size):
    """A negative chunk size made a negative shape; 0 once meant the default."""
    with pytest.raises(ValueError, match=f"chunk_size must be a positive integer, got {chunk_size}"):
        selective_scan(*_inputs(1, 5)[:5], chunk_size=chunk_size)


@pytest.mark.parametrize("batch,length", [(0, 9), (0, 0), (2, 0)])
def test_empty_batch_or_sequence(batch, length):
    """An empty batch (the chunked layout once failed to reshape it) or sequence: empty outputs, the state passing
    through (as the reference gives, which once stacked no steps), and gradients of the inputs' shapes, none for
    ``A``."""
    inputs = [t.requires_grad_() for t in _inputs(batch, length)]
    y, s = selective_scan(*inputs, chunk_size=4)
    y_ref, s_ref = selective_scan_ref(*inputs)
    assert y.shape == y_ref.shape == (batch, length, E) and s.shape == s_ref.shape == (batch, E, N)
    torch.testing.assert_close(s, inputs[5].detach())
    torch.testing.assert_close(s_ref, inputs[5].detach())
    grads = torch.autograd.grad(y.sum() + s.sum(), inputs)
    assert [g.shape for g in grads] == [t.shape for t in inputs]
    assert not grads[2].any()
    torch.testing.assert_close(grads[5], torch.ones(batch, E, N))


def test_bf16_inputs():
    *inputs, h0 = _inputs(2, 65, dtype=torch.bfloat16)
    (y, s), _ = check_scan(
        lambda *a: selective_scan(*a, chunk_size=16),
        selective_scan_ref,
        inputs + [h0],
        NAMES,
        y_tol={"atol": 2e-2, "rtol": 2e-2},
        state_tol={"atol": 1e-4, "rtol": 1e-4},
        grad_tol={"atol": 5e-2, "rtol": 2e-2},
    )
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32


def test_strong_decay_is_stable():
    """``delta * |A|`` around 20-30 per step: every state underflows within a step or two, no inf/nan."""
    inputs = _inputs(2, 130, strong_decay=True)
    (y, s), grads = check_scan(lambda *a: selective_scan(*a, chunk_size=32), selective_scan_ref, inputs, NAMES)
    for t in (y, s, *grads):
        assert torch.isfinite(t).all()


def test_step_iterated_matches_reference():
    u, delta, A, B, C, h0 = _inputs(3, 20)
    y_ref, s_ref = selective_scan_ref(u, delta, A, B, C, h0)
    state, ys = h0, []
    for t in range(u.shape[1]):
        y_t, state = selective_scan_step(state, u[:, t], delta[:, t], A, B[:, t], C[:, t])
        ys.append(y_t)
    assert_outputs_close((torch.stack(ys, dim=1), state), (y_ref, s_ref))


@pytest.mark.parametrize("split", [1, 37, 64])
def test_two_pieces_equal_one_scan(split):
    u, delta, A, B, C, h0 = _inputs(2, 101)
    y, s = selective_scan(u, delta, A, B, C, h0, chunk_size=16)
    first = slice(None, split)
    second = slice(split, None)
    y1, s1 = selective_scan(u[:, first], delta[:, first], A, B[:, first], C[:, first], h0, chunk_size=16)
    y2, s2 = selective_scan(u[:, second], delta[:, second], A, B[:, second], C[:, second], s1, chunk_size=16)
    assert_outputs_close((torch.cat([y1, y2], dim=1), s2), (y, s))


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
        assert_close(g, g_ref, f"grad {name}", **TOL)


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


def test_bad_inputs_raise_naming_them():
    """A batch-1 state or B would broadcast over the batch, integers give integer outputs: both silently, once."""
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(2, 5, 6, generator=g), torch.rand(2, 5, 6, generator=g)
    a, b, c = -torch.rand(6, 3, generator=g), torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    for args, match in [
        ((u, delta, a, b, c, torch.zeros(1, 6, 3)), r"initial_state must have shape \(2, 6, 3\)"),
        ((u, delta, a, b[:1], c), "B must have shape"),
        ((u.long(), delta, a, b, c), "u must be floating point"),
        ((u, delta, a[:4], b, c), "A must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            selective_scan(*args)
    step = (torch.zeros(2, 6, 3), u[:, 0], delta[:, 0], a, b[:, 0], c[:, 0])
    for i, bad, match in [
        (0, torch.zeros(1, 6, 3), r"initial_state must have shape \(2, 6, 3\)"),
        (1, u, r"u must be floating point \[batch, channels\]"),  # a sequence where a step is expected
        (4, b[:, 0, :2], r"B must have shape \(2, 3\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            selective_scan_step(*step[:i], bad, *step[i + 1 :])
