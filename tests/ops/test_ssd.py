"""Chunked Mamba-2 SSD and the recurrent step against the sequential reference."""

import pytest
import torch
import torch.nn.functional as F
from scan_checks import assert_outputs_close, check_scan

from bmojo.layers.norm import GatedRMSNorm
from bmojo.ops.ssd import gated_rms_norm, mamba2_step, ssd_scan, ssd_scan_ref, ssd_step

H, P, N = 6, 5, 8  # heads and head dim that are not powers of two
NAMES = ["x", "dt", "A", "B", "C", "initial_state"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: a second thread only adds synchronisation (slow on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(batch, length, groups=2, dtype=torch.float32, strong_decay=False, seed=0):
    """``(x, dt, A, B, C, initial_state)`` with Mamba-2-like magnitudes; ``dt * |A| ~ 20`` if strong."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, H, P, generator=g)
    dt = F.softplus(torch.randn(batch, length, H, generator=g)) * 0.5
    A = -torch.exp(torch.randn(H, generator=g))
    if strong_decay:
        dt, A = dt + 2.0, A - 10.0
    B = torch.randn(batch, length, groups, N, generator=g)
    C = torch.randn(batch, length, groups, N, generator=g)
    s0 = torch.randn(batch, H, P, N, generator=g)
    return [t.to(dtype) for t in (x, dt, A, B, C)] + [s0]


def _chunked(chunk_size):
    return lambda x, dt, A, B, C, s0=None: ssd_scan(x, dt, A, B, C, chunk_size=chunk_size, initial_state=s0)


@pytest.mark.parametrize("length", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("chunk_size", [64, 8, 24])
def test_chunked_matches_reference(length, batch, with_initial_state, chunk_size):
    *inputs, s0 = _inputs(batch, length)
    if with_initial_state:
        inputs.append(s0)
    (y, s), grads = check_scan(_chunked(chunk_size), ssd_scan_ref, inputs, NAMES)
    assert y.shape == (batch, length, H, P) and s.shape == (batch, H, P, N) and s.dtype == torch.float32


@pytest.mark.parametrize("groups", [1, 3, 6])
def test_groups(groups):
    inputs = _inputs(2, 50, groups=groups)
    check_scan(_chunked(16), ssd_scan_ref, inputs, NAMES)


def test_heads_must_divide_into_groups():
    x, dt, A, B, C, _ = _inputs(1, 4, groups=4)
    with pytest.raises(ValueError, match="multiple of B/C groups"):
        ssd_scan(x, dt, A, B, C)


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5])
def test_bad_chunk_size_raises(chunk_size):
    """A chunk size of 0 divided by zero, a negative one made a negative shape."""
    with pytest.raises(ValueError, match=f"chunk_size must be a positive integer, got {chunk_size}"):
        ssd_scan(*_inputs(1, 5)[:5], chunk_size=chunk_size)


@pytest.mark.parametrize("with_initial_state", [False, True])
def test_no_steps_pass_the_state_through(with_initial_state):
    """Length 0: an empty ``y`` and the initial state (zeros without one), from the reference (which once stacked
    no steps) as from the chunked scan."""
    *inputs, s0 = _inputs(2, 0)
    s0 = s0 if with_initial_state else None
    for fn in (ssd_scan_ref, _chunked(8)):
        y, s = fn(*inputs, s0)
        assert y.shape == (2, 0, H, P) and y.dtype == inputs[0].dtype and s.dtype == torch.float32
        torch.testing.assert_close(s, torch.zeros(2, H, P, N) if s0 is None else s0)


def test_bf16_inputs():
    inputs = _inputs(2, 65, dtype=torch.bfloat16)
    (y, s), _ = check_scan(
        _chunked(16),
        ssd_scan_ref,
        inputs,
        NAMES,
        y_tol={"atol": 2e-2, "rtol": 2e-2},
        state_tol={"atol": 1e-4, "rtol": 1e-4},
        grad_tol={"atol": 5e-2, "rtol": 2e-2},
    )
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32


def test_strong_decay_is_stable():
    """``dt * |A|`` around 20-30 per step: the segment sums reach about -2000 per chunk, no inf/nan."""
    inputs = _inputs(2, 130, strong_decay=True)
    (y, s), grads = check_scan(_chunked(64), ssd_scan_ref, inputs, NAMES)
    for t in (y, s, *grads):
        assert torch.isfinite(t).all()


def test_step_iterated_matches_reference():
    x, dt, A, B, C, s0 = _inputs(3, 20)
    y_ref, s_ref = ssd_scan_ref(x, dt, A, B, C, s0)
    state, ys = s0, []
    for t in range(x.shape[1]):
        y_t, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y_t)
    assert_outputs_close((torch.stack(ys, dim=1), state), (y_ref, s_ref))


@pytest.mark.parametrize("split", [1, 37, 64])
def test_two_pieces_equal_one_scan(split):
    x, dt, A, B, C, s0 = _inputs(2, 101)
    y, s = ssd_scan(x, dt, A, B, C, chunk_size=16, initial_state=s0)
    first = slice(None, split)
    second = slice(split, None)
    y1, s1 = ssd_scan(x[:, first], dt[:, first], A, B[:, first], C[:, first], chunk_size=16, initial_state=s0)
    y2, s2 = ssd_scan(x[:, second], dt[:, second], A, B[:, second], C[:, second], chunk_size=16, initial_state=s1)
    assert_outputs_close((torch.cat([y1, y2], dim=1), s2), (y, s))


@pytest.mark.parametrize("state,path", [(8, "ours"), (16, "ours"), (17, "fla"), (128, "fla")])
def test_cuda_inputs_take_our_kernels_and_fla_only_for_large_states(monkeypatch, state, path):
    """Where both could run (stand-ins for a CUDA device with ``triton`` and ``fla``), the SSD takes our Triton
    kernels up to the state they were timed faster than fla's at (16, an H100), fla's for larger states."""
    import bmojo.ops.ssd as ssd

    triton_ssd = pytest.importorskip("bmojo.ops.triton.ssd")
    called = []
    monkeypatch.setattr(ssd, "use_fused_cuda", lambda *tensors: True)
    monkeypatch.setattr(ssd, "use_triton", lambda *tensors, differentiable=False: True)
    monkeypatch.setattr(ssd, "fla_available", lambda: True)
    monkeypatch.setattr(ssd, "ssd_scan_fla", lambda *inputs: called.append("fla"))
    monkeypatch.setattr(triton_ssd, "ssd_scan_triton", lambda *inputs: called.append("ours"))
    x, dt, A = torch.randn(1, 4, 2, 3), torch.rand(1, 4, 2), -torch.rand(2)
    B, C = torch.randn(1, 4, 1, state), torch.randn(1, 4, 1, state)
    with torch.no_grad():
        ssd.ssd_scan(x, dt, A, B, C)
    assert called == [path]


def test_bad_inputs_raise_naming_them():
    """Inputs of another batch would broadcast, integers give integer outputs: both silently, once."""
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(2, 5, 4, 8, generator=g), torch.rand(2, 5, 4, generator=g)
    a, b, c = -torch.rand(4, generator=g), torch.randn(2, 5, 1, 3, generator=g), torch.randn(2, 5, 1, 3, generator=g)
    for args, match in [
        ((x, dt, a, b[:1], c), r"B must have shape \(2, 5, 1, 3\)"),
        ((x, dt[:, :, :2], a, b, c), "dt must have shape"),
        ((x.long(), dt, a, b, c), "x must be floating point"),
        ((x, dt, a, b, c, 32, torch.zeros(1, 4, 8, 3)), "initial_state must have shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            ssd_scan(*args)
    step = (torch.zeros(2, 4, 8, 3), x[:, 0], dt[:, 0], a, b[:, 0], c[:, 0])
    for i, bad, match in [
        (5, c[:1, 0], r"C must have shape \(2, 1, 3\)"),
        (1, x, r"x must be floating point \[batch, heads, head_dim\]"),  # a sequence where a step is expected
        (4, b, r"B must be \[batch, groups, state\]"),
        (0, torch.zeros(2, 4, 8, 2), r"initial_state must have shape \(2, 4, 8, 3\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            ssd_step(*step[:i], bad, *step[i + 1 :])


def test_gated_rms_norm_rejects_bad_inputs():
    """Integer ``x`` gave integer garbage, an ``x`` of another width than the weight a broadcast error; the layer
    (``GatedRMSNorm``) reaches the same checks."""
    x, z, w = torch.randn(2, 8), torch.randn(2, 8), torch.ones(8)
    assert gated_rms_norm(x, z, w, 2, 1e-5).shape == (2, 8)
    for call in (lambda: gated_rms_norm(x.long(), z, w, 2, 1e-5), lambda: GatedRMSNorm(8, 2)(x.long(), z)):
        with pytest.raises(TypeError, match="floating point x, got torch.int64"):
            call()
    for args, match in [
        ((x, z, torch.ones(6), 2), r"must end in the weight's size C, got x \(2, 8\) and weight \(6,\)"),
        ((x, z, torch.ones(1, 8), 2), r"got x \(2, 8\) and weight \(1, 8\)"),
        ((x, z[:1], w, 2), r"z must have shape \(2, 8\), got \(1, 8\)"),
        ((x, z, w, 3), r"groups \(3\) must be a positive integer dividing x's last axis \(8\)"),
        ((x, z, w, 0), r"groups \(0\) must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            gated_rms_norm(*args, 1e-5)
    with pytest.raises(ValueError, match=r"got x \(2, 6\) and weight \(8,\)"):
        GatedRMSNorm(8, 2)(x[:, :6], z[:, :6])


def test_bad_mamba2_step_inputs_raise():
    """``mamba2_step``'s checks name the input that does not fit (2 heads of 4, one group of state 3, conv of 4)."""
    xbc, dt, z, conv, ssm = (torch.zeros(*shape) for shape in ((2, 14), (2, 2), (2, 8), (2, 14, 3), (2, 2, 4, 3)))
    params = (torch.zeros(14, 1, 4), torch.zeros(14), *torch.zeros(3, 2), torch.ones(8), 1e-5)
    mamba2_step(xbc, dt, z, conv, ssm, *params)  # fits
    for args, match in [
        ((xbc[0], dt, z, conv, ssm, *params), r"expected xbc \[batch, C\]"),
        ((torch.zeros(2, 15), dt, z, torch.zeros(2, 15, 3), ssm, *params), "not H\\*P \\+ 2\\*G\\*N"),
        ((xbc, dt[:, :1], z, conv, ssm, *params), r"dt must have shape \(2, 2\)"),
        ((xbc, dt, z[:, :4], conv, ssm, *params), r"z must have shape \(2, 8\)"),
        ((xbc, dt, z, conv[..., :2], ssm, *params), r"conv_state must have shape \(2, 14, 3\)"),
        ((xbc, dt, z, conv, ssm, torch.zeros(14, 4), *params[1:]), r"conv_weight must have shape \(14, 1, 4\)"),
        ((xbc, dt, z, conv, ssm, *params[:4], torch.zeros(3), *params[5:]), r"D must have shape \(2,\)"),
        ((xbc, dt, z, conv, ssm, *params[:5], torch.ones(4), 1e-5), r"norm_weight must have shape \(8,\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            mamba2_step(*args)
