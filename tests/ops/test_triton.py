"""Our Triton scan kernels (forward and backward) against their PyTorch references, on CPU tensors under
``TRITON_INTERPRET=1`` (``interpret.py``)."""

from __future__ import annotations

import pytest
import torch
from interpret import assert_same_gradients, grad_leaves, probe_loss, run_interpreted

import bmojo.ops.triton as kernels
from bmojo.layers.eidetic import stage_evicted
from bmojo.layers.ssm import Mamba, Mamba2
from bmojo.ops.attention import flex_available
from bmojo.ops.selective_scan import selective_scan, selective_scan_ref
from bmojo.ops.ssd import fla_available, mamba2_step, ssd_scan, ssd_scan_ref

SCAN_TRITON = "bmojo.ops.triton.selective_scan:selective_scan_triton"
SCAN = "bmojo.ops.selective_scan:selective_scan"
SSD_TRITON = "bmojo.ops.triton.ssd:ssd_scan_triton"
SSD = "bmojo.ops.ssd:ssd_scan"
STEP_TRITON = "bmojo.ops.triton.ssd:mamba2_step_triton"
STAGE_TRITON = "bmojo.ops.triton.eidetic:stage_evicted_triton"


def scan_inputs(bsz: int, length: int, e: int, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random Mamba-like inputs: positive ``delta``, negative ``A``, and an initial state."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(bsz, length, e, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(bsz, length, e, generator=g) - 1)
    a = -torch.rand(e, n, generator=g) * 2 - 0.1
    b, c = torch.randn(bsz, length, n, generator=g), torch.randn(bsz, length, n, generator=g)
    return u, delta, a, b, c, torch.randn(bsz, e, n, generator=g)


# (batch, length, channels, states, channels per program, initial state): channel and state counts that do not
# fill a block (masked lanes), a single step, one channel per program
SHAPES = [(2, 13, 24, 8, 16, True), (1, 9, 5, 3, 4, False), (3, 1, 16, 16, 8, True), (1, 20, 33, 6, 1, True)]
# steps between the states the forward keeps for the backward: a length that fills no chunk, one chunk longer than
# the sequence, chunks longer than one step, chunks that do not divide the length
SCAN_CHUNKS = [4, 64, 4, 7]


def strided_inputs() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Non-contiguous views of the same values (as the layer's ``chunk``/``split`` make them), and the originals."""
    u, delta, a, b, c, h0 = scan_inputs(2, 11, 12, 4, seed=1)
    u_view = torch.cat([u, torch.randn_like(u)], dim=-1)[..., :12]
    bc = torch.cat([b, c], dim=-1)
    views = (u_view, delta, a.t().contiguous().t(), bc[..., :4], bc[..., 4:], h0.transpose(1, 2).contiguous().mT)
    assert not any(x.is_contiguous() for x in (views[0], views[2], views[3], views[5]))
    return views, (u, delta, a, b, c, h0)


def scan_grad_inputs(case: int) -> tuple[torch.Tensor | None, ...]:
    """The inputs of ``SHAPES[case]``, requiring gradients."""
    bsz, length, e, n, _, h0 = SHAPES[case]
    inputs = scan_inputs(bsz, length, e, n)
    return tuple(t.requires_grad_() for t in inputs[:5]) + (inputs[5].requires_grad_() if h0 else None,)


def mamba_layer() -> Mamba:
    torch.manual_seed(0)
    return Mamba(16, state_size=4).eval()


def ssd_inputs(bsz: int, length: int, heads: int, p: int, groups: int, n: int, h0: bool = True, seed: int = 0,
               decay: float = 2.0) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """Random Mamba-2-like inputs: positive ``dt``, negative ``A`` (down to ``-decay``), an initial state."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, length, heads, p, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(bsz, length, heads, generator=g) - 1)
    a = -torch.rand(heads, generator=g) * decay - 0.1
    b, c = torch.randn(bsz, length, groups, n, generator=g), torch.randn(bsz, length, groups, n, generator=g)
    return x, dt, a, b, c, torch.randn(bsz, heads, p, n, generator=g) if h0 else None


# (batch, length, heads, head dim, B/C groups, state, initial state, kernel options): a length that does not fill
# its last chunk, 2 heads per group, a state below 16 (padded for tl.dot); one step with a head dim that is not a
# power of two; several chunks with two programs per head; strong decay (exp(dt * A) down to about 1e-13 a step);
# a state above 32 (the kernels' own 16-step chunks, and 16 head dimensions a backward program: kernel_tiles) with a
# head dim of 40 (three backward programs a head, the last half empty); without gradients, the sequence in pieces of
# chunks (states_bytes), without and with an initial state
SSD_SHAPES = [
    (2, 37, 4, 16, 2, 8, True, {}),
    (1, 1, 2, 24, 1, 5, False, {}),
    (1, 70, 2, 64, 1, 16, True, {"chunk_size": 16, "block_p": 32}),
    (1, 50, 2, 16, 1, 4, True, {"decay": 30.0}),
    (1, 45, 2, 40, 1, 40, True, {}),
    (2, 83, 2, 32, 1, 8, False, {"chunk_size": 16, "states_bytes": 3 * 2 * 2 * 32 * 8 * 4}),  # pieces of 3 chunks
    (1, 64, 2, 16, 1, 8, True, {"chunk_size": 16, "states_bytes": 2 * 2 * 16 * 8 * 4}),  # 2 pieces of 2, from h0
]


def ssd_call(case: int, grad: bool = False) -> tuple[tuple[torch.Tensor | None, ...], dict]:
    """Inputs and kernel options of ``SSD_SHAPES[case]`` (``grad``: inputs that require gradients, and the worker's
    flag for a call with gradients)."""
    *shape, h0, options = SSD_SHAPES[case]
    inputs = ssd_inputs(*shape, h0=h0, decay=options.get("decay", 2.0))
    kwargs = {k: v for k, v in options.items() if k != "decay"}
    if grad:
        inputs = tuple(None if t is None else t.requires_grad_() for t in inputs)
        kwargs["_grad"] = True
    return inputs, kwargs


def mamba2_layer() -> Mamba2:
    torch.manual_seed(0)
    return Mamba2(32, state_size=8, head_dim=16, chunk_size=8).eval()


def strided_ssd_inputs() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Non-contiguous views of the same SSD inputs (as the layer's ``split`` makes them), and the originals."""
    x, dt, a, b, c, h0 = ssd_inputs(2, 20, 2, 16, 1, 8, seed=5)
    x_view = torch.cat([x, torch.randn_like(x)], dim=-1)[..., :16]
    bc = torch.cat([b, c], dim=-1)
    views = (x_view, dt, a, bc[..., :8], bc[..., 8:], h0.transpose(2, 3).contiguous().mT)
    assert not any(t.is_contiguous() for t in (views[0], views[3], views[5]))
    return views, (x, dt, a, b, c, h0)


# Mamba-2 decoding steps (batch, heads, head dim, B/C groups, state, conv kernel, conv bias, dtype): two heads per
# group; a head dim and a state that are not powers of two with a conv of 2 (one input held); 16-bit inputs
MAMBA2_STEPS = [
    (2, 4, 16, 2, 8, 4, True, torch.float32),
    (1, 3, 12, 1, 5, 2, False, torch.float32),
    (3, 2, 16, 1, 16, 3, True, torch.bfloat16),
]


def mamba2_step_inputs(bsz: int, heads: int, p: int, groups: int, n: int, k: int, bias: bool, dtype: torch.dtype,
                       seed: int = 0) -> tuple:  # fmt: skip
    """Arguments of ``mamba2_step``: ``z``, ``xbc`` and ``dt`` as views of one input projection's row (as the layer
    splits it), a conv state, a float32 SSM state of other strides (a transposed layout), the layer's parameters."""
    g = torch.Generator().manual_seed(seed)
    e, channels = heads * p, heads * p + 2 * groups * n
    row = torch.randn(bsz, 5 + e + channels + heads, generator=g)
    ssm = torch.randn(bsz, heads, n, p, generator=g).mT
    conv = torch.randn(bsz, channels, k - 1, generator=g)
    weight, conv_bias = torch.randn(channels, 1, k, generator=g) / k, torch.randn(channels, generator=g)
    dt_bias, d, a_log = torch.randn(3, heads, generator=g).unbind()
    norm = torch.rand(e, generator=g) + 0.5
    row, conv, weight, conv_bias, norm = (t.to(dtype) for t in (row, conv, weight, conv_bias, norm))
    z, xbc, dt = row[:, 5:].split([e, channels, heads], 1)
    return xbc, dt, z, conv, ssm, weight, conv_bias if bias else None, dt_bias, a_log.abs() * 2, d, norm, 1e-5


def mamba2_decoder() -> Mamba2:
    """A Mamba-2 layer whose segments are single tokens: a call continuing a state steps through the tokens."""
    layer = mamba2_layer()
    layer.segment_length = 1
    return layer


def stage_inputs(case: int) -> tuple:
    """Arguments of ``stage_evicted`` (3 sequences, 2 heads of 12, window 4 in 10 joined slots, a memory of 5).
    Case 0, position 6 (ring slot 2): a memory with two empty slots (the candidate takes the first), one whose two
    lowest scores tie (the candidate, scoring the same, stays out), a candidate from an empty ring slot (out). Case 1,
    position 9 (slot 1): random scores, some candidates in."""
    g = torch.Generator().manual_seed(case)
    keys, values = torch.randn(2, 3, 2, 10, 12, generator=g).unbind()
    positions = torch.randint(0, 9, (3, 10), generator=g)
    win_score, stage_score = torch.rand(3, 4, generator=g), torch.rand(3, 5, generator=g)
    stage_k, stage_v = torch.randn(2, 3, 2, 5, 12, generator=g).unbind()
    stage_pos = torch.arange(15).view(3, 5)
    if case == 0:
        stage_score[0, [1, 3]], stage_pos[0, [1, 3]] = float("-inf"), -1
        stage_score[1, [0, 4]] = win_score[1, 2] = stage_score[1].min() - 0.1
        positions[2, 2] = -1
    pos = torch.tensor([6 if case == 0 else 9])
    return keys, values, positions, win_score, pos, 4, stage_k, stage_v, stage_score, stage_pos


def bmojo_decode_inputs() -> tuple:
    """A B'MOJO mixer (window 64, chunks of 8, 4 eidetic tokens) and its state after a prefill of 70 tokens (the
    PyTorch path), and 3 more tokens, which it takes as steps (fewer than a sixteenth of the window)."""
    from bmojo.layers import BMojoMixer, MixerState

    torch.manual_seed(0)
    mixer = BMojoMixer(32, num_heads=2, window=64, eidetic_size=4, chunk_size=8,
                       ssm_kwargs={"state_size": 8, "head_dim": 16, "chunk_size": 8}).eval()  # fmt: skip
    h = torch.randn(1, 73, 32, generator=torch.Generator().manual_seed(14))
    state = MixerState()
    with torch.no_grad():
        mixer(h[:, :70], state)
    return mixer, h[:, 70:], state


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Outputs of the calls below, run with the Triton interpreter on CPU: ``{key: (output, kernel calls)}``."""
    pytest.importorskip("triton")
    half = [x.half() for x in scan_inputs(1, 7, 6, 4, seed=3)]
    calls = {f"scan{i}": (SCAN_TRITON, (*scan_inputs(bs, n, e, s)[:5], scan_inputs(bs, n, e, s)[5] if h0 else None),
                          {"block_e": be}) for i, (bs, n, e, s, be, h0) in enumerate(SHAPES)}  # fmt: skip
    calls["scan_strided"] = (SCAN_TRITON, strided_inputs()[0], {})
    calls["scan_half"] = (SCAN_TRITON, (half[0], half[1], half[2].float(), half[3], half[4]), {})
    calls["scan_dispatch"] = (SCAN, scan_inputs(2, 12, 8, 4, seed=2), {})
    calls["mamba"] = (mamba_layer(), (torch.randn(1, 10, 16, generator=torch.Generator().manual_seed(4)),), {})
    calls |= {f"scan_grad{i}": (SCAN_TRITON, scan_grad_inputs(i), {"block_e": SHAPES[i][4], "chunk": SCAN_CHUNKS[i],
                                                           "_grad": True}) for i in range(len(SHAPES))}  # fmt: skip
    calls["mamba_grad"] = (
        mamba_layer(),
        (torch.randn(1, 10, 16, generator=torch.Generator().manual_seed(10)),),
        {"_grad": True},
    )
    calls |= {f"ssd{case}": (SSD_TRITON, *ssd_call(case)) for case in range(len(SSD_SHAPES))}
    calls["ssd_strided"] = (SSD_TRITON, strided_ssd_inputs()[0], {})
    calls["ssd_half"] = (SSD_TRITON, tuple(t.half() for t in ssd_inputs(1, 21, 2, 16, 1, 8, seed=6)), {})
    calls["ssd_empty"] = (SSD_TRITON, ssd_inputs(1, 0, 2, 16, 1, 8, seed=11), {})
    calls["ssd_no_rows"] = (SSD_TRITON, ssd_inputs(0, 40, 2, 16, 1, 8, seed=12), {"chunk_size": 16})
    *args, h0 = ssd_inputs(2, 30, 4, 16, 2, 8, seed=7)
    calls["ssd_dispatch"] = (SSD, tuple(args), {"chunk_size": 8, "initial_state": h0})
    calls["mamba2"] = (mamba2_layer(), (torch.randn(1, 19, 32, generator=torch.Generator().manual_seed(8)),), {})
    calls |= {f"ssd_grad{case}": (SSD_TRITON, *ssd_call(case, grad=True)) for case in range(len(SSD_SHAPES))}
    calls["mamba2_grad"] = (
        mamba2_layer(),
        (torch.randn(1, 19, 32, generator=torch.Generator().manual_seed(9)),),
        {"_grad": True},
    )
    calls |= {f"mamba2_step{i}": (STEP_TRITON, mamba2_step_inputs(*shape), {"_inputs": True})
              for i, shape in enumerate(MAMBA2_STEPS)}  # fmt: skip
    calls["mamba2_decode"] = (mamba2_decoder(), mamba2_decode_inputs(), {"inplace": True, "_inputs": True})
    calls |= {f"stage{case}": (STAGE_TRITON, stage_inputs(case), {"_inputs": True}) for case in range(2)}
    mixer, h, state = bmojo_decode_inputs()
    calls["bmojo_decode"] = (mixer, (h, state), {"_inputs": True})
    return run_interpreted(calls, tmp_path_factory.mktemp("triton"))


def mamba2_decode_inputs() -> tuple[torch.Tensor, object]:
    """The last 9 of 19 tokens, continuing the state of a prefill of the first 10 (the PyTorch path) by
    :func:`mamba2_layer`."""
    h = torch.randn(1, 19, 32, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        _, state = mamba2_layer()(h[:, :10])
    return h[:, 10:], state


@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_selective_scan_kernel_matches_reference(interpreted, case):
    bsz, length, e, n, _, with_h0 = SHAPES[case]
    u, delta, a, b, c, h0 = scan_inputs(bsz, length, e, n)
    (y, final), _ = interpreted[f"scan{case}"]
    y_ref, final_ref = selective_scan_ref(u, delta, a, b, c, h0 if with_h0 else None)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, final_ref, rtol=1e-5, atol=1e-5)


def test_selective_scan_kernel_strided_and_half_inputs(interpreted):
    (y, final), _ = interpreted["scan_strided"]
    y_ref, final_ref = selective_scan_ref(*strided_inputs()[1])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, final_ref, rtol=1e-5, atol=1e-5)
    half = [x.half() for x in scan_inputs(1, 7, 6, 4, seed=3)]
    (y16, final16), _ = interpreted["scan_half"]
    y_ref16, final_ref16 = selective_scan_ref(half[0], half[1], half[2].float(), half[3], half[4])
    assert y16.dtype == torch.float16 and final16.dtype == torch.float32
    torch.testing.assert_close(y16, y_ref16, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(final16, final_ref16, rtol=1e-5, atol=1e-5)


def test_dispatch_runs_kernel_in_selective_scan_and_mamba_layer(interpreted):
    """With ``BMOJO_KERNELS=triton``, ``selective_scan`` and a Mamba layer's forward run the kernel and match the
    PyTorch path computed here."""
    ((y, final), calls_scan), (out, calls_layer) = interpreted["scan_dispatch"], interpreted["mamba"]
    assert (calls_scan, calls_layer) == (1, 1)  # one kernel call each
    y_ref, final_ref = selective_scan(*scan_inputs(2, 12, 8, 4, seed=2))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, final_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out_ref = mamba_layer()(torch.randn(1, 10, 16, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(out[0], out_ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1].ssm, out_ref[1].ssm, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_selective_scan_kernel_gradients_match_reference(interpreted, case):
    """The backward kernel's gradients of ``u, delta, A, B, C`` and the initial state equal autograd's through the
    sequential reference."""
    result, calls = interpreted[f"scan_grad{case}"]
    inputs = scan_grad_inputs(case)
    assert calls == 1
    assert_same_gradients(result, probe_loss(selective_scan_ref(*inputs)), grad_leaves(inputs), rtol=1e-4, atol=1e-4)


def test_mamba_layer_trains_through_the_selective_scan_kernels(interpreted):
    """A Mamba layer's forward and backward with ``BMOJO_KERNELS=triton`` run the kernels and give the PyTorch
    path's parameter gradients."""
    result, calls = interpreted["mamba_grad"]
    layer = mamba_layer()
    loss_ref = probe_loss(layer(torch.randn(1, 10, 16, generator=torch.Generator().manual_seed(10))))
    assert calls == 1
    assert_same_gradients(result, loss_ref, list(layer.parameters()), rtol=1e-4, atol=1e-4)


def test_selective_scan_kernel_rejects_bad_shapes(monkeypatch):
    kernel = pytest.importorskip("bmojo.ops.triton.selective_scan")
    monkeypatch.setattr(kernels, "interpreting", lambda: True)  # CPU tensors pass, as under the interpreter
    u, delta, a, b, c, h0 = scan_inputs(1, 5, 6, 4)
    with pytest.raises(ValueError, match="B must have shape"):
        kernel.selective_scan_triton(u, delta, a, b[..., :3], c)
    with pytest.raises(ValueError, match="A must be"):
        kernel.selective_scan_triton(u, delta, a[:5], b, c)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        kernel.selective_scan_triton(u, delta, a, b, c, h0[:, :, :2])
    with pytest.raises(ValueError, match="power of two"):
        kernel.selective_scan_triton(u, delta, a, b, c, block_e=3)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        kernel.selective_scan_triton(u, delta, a, b, c, chunk=0)


@pytest.fixture
def kernel_mode():
    """Set the kernel switch for one test; restores the previous mode."""
    before = kernels.kernels()
    yield kernels.set_kernels
    kernels.set_kernels(before)


def test_use_triton_rules(kernel_mode):
    """CPU tensors (auto), tensors needing gradients (but for a kernel with a backward) and float64 take the PyTorch
    path; unknown modes are rejected."""
    x = torch.zeros(2)
    kernel_mode("auto")
    assert not kernels.use_triton(x, None)
    kernel_mode("triton")
    if kernels.triton_available():
        assert kernels.use_triton(x, None)
        with torch.no_grad():
            assert kernels.use_triton(torch.zeros(2, requires_grad=True))
        assert kernels.use_triton(x, torch.zeros(2, requires_grad=True), differentiable=True)
    assert not kernels.use_triton(x.double())
    assert not kernels.use_triton(x, torch.zeros(2, requires_grad=True))
    kernel_mode("reference")
    assert not kernels.use_triton(x)
    with pytest.raises(ValueError, match="BMOJO_KERNELS must be one of"):
        kernels.set_kernels("fast")


def test_inputs_too_large_for_32_bit_offsets_are_refused(kernel_mode, monkeypatch):
    """A tensor spanning ``2**31`` elements or more within a batch entry (meta tensors: no memory) takes the PyTorch
    path in ``auto`` mode and is refused by the kernels' input check; ``2**31 - 1`` fits."""
    monkeypatch.setattr(kernels, "interpreting", lambda: True)  # (meta tensors pass the device check)
    fits, huge = (torch.empty(2, 2**16, n, device="meta") for n in (2**15, 2**15 + 1))  # last offsets 2**31 - 1, more
    assert kernels.offsets_fit(fits) and not kernels.offsets_fit(huge)
    assert kernels.offsets_fit(torch.empty(2**20, 2**12, device="meta"))  # the batch entries' own offsets are 64-bit
    broadcast = torch.empty(2, 1, 1, device="meta").expand(2, 2**16, 2**15 + 1)  # strides 0, outputs of its shape
    assert not kernels.offsets_fit(broadcast) and kernels.offsets_fit(broadcast[:, :, : 2**15])
    kernels.check_inputs(fits)
    with pytest.raises(ValueError, match="32-bit offsets"):
        kernels.check_inputs(fits, huge)


def test_kernels_refuse_cpu_tensors_outside_the_interpreter(kernel_mode, monkeypatch):
    """Without ``TRITON_INTERPRET=1`` the kernels, called directly or by ``BMOJO_KERNELS=triton``, say that they take
    CUDA tensors (Triton failed with "0 active drivers"); the interpreter takes CPU ones."""
    kernel = pytest.importorskip("bmojo.ops.triton.ssd")
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    x, dt, a, b, c, _ = ssd_inputs(1, 5, 4, 16, 2, 8)
    u, delta, a1, b1, c1, _ = scan_inputs(1, 5, 6, 4)
    kernel_mode("triton")
    for call in (lambda: kernel.ssd_scan_triton(x, dt, a, b, c), lambda: ssd_scan(x, dt, a, b, c),
                 lambda: selective_scan(u, delta, a1, b1, c1)):  # fmt: skip
        with pytest.raises(ValueError, match="Triton kernels take CUDA tensors, got cpu ones"):
            call()
    monkeypatch.setattr(kernels, "interpreting", lambda: True)
    kernels.check_inputs(x, dt, a, b, c)


def test_kernels_need_a_torch_that_registers_triton_ops(kernel_mode, monkeypatch):
    """A torch without ``torch.library.triton_op`` (before 2.6) takes the PyTorch paths in ``auto`` mode and says what
    ``triton`` mode needs."""
    monkeypatch.delattr(torch.library, "triton_op")
    kernels.triton_available.cache_clear()
    try:
        assert not kernels.triton_available()
        kernel_mode("triton")
        with pytest.raises(RuntimeError, match=r"torch >= 2.6"):
            kernels.use_triton(torch.zeros(2))
    finally:
        kernels.triton_available.cache_clear()


def test_lookups_are_constants_to_torch_compile():
    """A full-graph compile calls a ``lookup_once`` function once and takes its result, rather than tracing it (torch
    2.11's dynamo refuses to trace ``importlib.util.find_spec``, which broke compiled CUDA models): a look-up dynamo
    cannot trace still compiles, with an argument too; the package's own look-ups compile on this torch."""
    calls = []

    @kernels.lookup_once
    def untraceable(device: torch.device) -> bool:
        torch._dynamo.graph_break()
        calls.append(device)
        return device.type == "cpu"

    compiled = torch.compile(lambda x: x + untraceable(x.device), fullgraph=True, backend="eager")
    assert compiled(torch.ones(1)).tolist() == [2.0] and compiled(torch.ones(2)).tolist() == [2.0, 2.0]
    assert calls == [torch.device("cpu")]
    untraceable.cache_clear()
    assert untraceable(torch.device("meta")) is False and len(calls) == 2

    def found(x: torch.Tensor) -> torch.Tensor:
        return x + kernels.triton_available() + fla_available() + flex_available()

    expected = found(torch.zeros(1))
    assert torch.equal(torch.compile(found, fullgraph=True, backend="eager")(torch.zeros(1)), expected)


@pytest.mark.parametrize("case", range(len(SSD_SHAPES)))
def test_ssd_kernel_matches_reference(interpreted, case):
    inputs, _ = ssd_call(case)
    (y, final), _ = interpreted[f"ssd{case}"]
    y_ref, final_ref = ssd_scan_ref(*inputs)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)


def test_ssd_kernel_strided_and_half_inputs(interpreted):
    (y, final), _ = interpreted["ssd_strided"]
    y_ref, final_ref = ssd_scan_ref(*strided_ssd_inputs()[1])
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)
    (y16, final16), _ = interpreted["ssd_half"]
    y_ref16, final_ref16 = ssd_scan_ref(*(t.half() for t in ssd_inputs(1, 21, 2, 16, 1, 8, seed=6)))
    assert y16.dtype == torch.float16 and final16.dtype == torch.float32
    torch.testing.assert_close(y16, y_ref16, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(final16, final_ref16, rtol=1e-4, atol=1e-4)


def test_ssd_kernel_with_no_steps_passes_the_state_through(interpreted):
    """A sequence of length 0 leaves the initial state as it is (as the PyTorch path does), no kernel launched."""
    (y, final), _ = interpreted["ssd_empty"]
    inputs = ssd_inputs(1, 0, 2, 16, 1, 8, seed=11)
    y_ref, final_ref = ssd_scan(*inputs[:5], initial_state=inputs[5])
    assert y.shape == y_ref.shape == (1, 0, 2, 16)
    assert final.dtype == torch.float32 and torch.equal(final, final_ref) and torch.equal(final, inputs[5])


def test_ssd_kernel_with_an_empty_batch_returns_empty_outputs(interpreted):
    """No batch rows (no gradients, so the forward would cut the sequence into pieces of states_bytes): empty outputs
    of the reference's shapes, where the pieces' size once divided by zero."""
    (y, final), _ = interpreted["ssd_no_rows"]
    y_ref, final_ref = ssd_scan_ref(*ssd_inputs(0, 40, 2, 16, 1, 8, seed=12))
    assert y.shape == y_ref.shape == (0, 40, 2, 16) and final.shape == final_ref.shape == (0, 2, 16, 8)


def test_dispatch_runs_ssd_kernel_in_ssd_scan_and_mamba2_layer(interpreted):
    """With ``BMOJO_KERNELS=triton``, ``ssd_scan`` and a Mamba-2 layer's forward run the kernel (one call each) and
    match the PyTorch path computed here."""
    ((y, final), calls_ssd), (out, calls_layer) = interpreted["ssd_dispatch"], interpreted["mamba2"]
    assert (calls_ssd, calls_layer) == (1, 1)
    *args, h0 = ssd_inputs(2, 30, 4, 16, 2, 8, seed=7)
    y_ref, final_ref = ssd_scan(*args, chunk_size=8, initial_state=h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        out_ref = mamba2_layer()(torch.randn(1, 19, 32, generator=torch.Generator().manual_seed(8)))
    torch.testing.assert_close(out[0], out_ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1].ssm, out_ref[1].ssm, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", range(len(MAMBA2_STEPS)))
def test_mamba2_step_kernel_matches_reference(interpreted, case):
    """The one-kernel decoding step (conv, ``dt`` softplus, state update, skip, gated norm) returns the PyTorch step's
    output and leaves both states as it does, in place. The kernel computes the conv in float32: 16-bit inputs are
    compared with the PyTorch step on their float32 values (and its output rounded as the kernel's)."""
    (y, args), calls = interpreted[f"mamba2_step{case}"]
    dtype = MAMBA2_STEPS[case][-1]
    ref = [t.float().clone() if isinstance(t, torch.Tensor) else t for t in mamba2_step_inputs(*MAMBA2_STEPS[case])]
    y_ref = mamba2_step(*ref).to(dtype)
    assert calls == 1 and y.dtype == dtype and args[4].dtype == torch.float32
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(y, y_ref, **tolerance)
    assert torch.equal(args[3], ref[3].to(dtype))  # the conv state: the last inputs, copied
    torch.testing.assert_close(args[4], ref[4], rtol=1e-5, atol=1e-5)


def test_mamba2_layer_decodes_through_the_step_kernel(interpreted):
    """A Mamba-2 layer continuing a state token by token runs the step kernel once a token, gives the outputs of one
    parallel pass over the whole sequence, and updates the given state's tensors in place."""
    (out, args), calls = interpreted["mamba2_decode"]
    h, _ = mamba2_decode_inputs()
    assert calls == h.shape[1]
    assert out[1] is args[1]  # (pickled together: the returned state is the given one)
    with torch.no_grad():
        full, final = mamba2_layer()(torch.randn(1, 19, 32, generator=torch.Generator().manual_seed(13)))
    torch.testing.assert_close(out[0], full[:, 10:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(args[1].ssm, final.ssm, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(args[1].conv, final.conv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", range(2))
def test_stage_evicted_kernel_matches_reference(interpreted, case):
    """The eidetic memory's one-kernel update leaves the staging memory as the PyTorch path does: the slot chosen (an
    empty one first, the newest of tied lowest scores), entry only on a strictly higher score, none from an empty
    ring slot."""
    (_, args), calls = interpreted[f"stage{case}"]
    ref = stage_inputs(case)
    before = [t.clone() for t in ref[6:]]
    stage_evicted(*ref)
    assert calls == 1
    for got, want in zip(args[6:], ref[6:]):
        assert torch.equal(got, want)
    changed = (ref[8] != before[2]).sum(1).tolist()  # entries replaced, by row
    if case == 0:  # row 0's first empty slot took the candidate of ring slot 2
        assert changed == [1, 0, 0] and ref[9][0, 1] == ref[2][0, 2] and torch.equal(ref[6][0, :, 1], ref[0][0, :, 2])
    else:
        assert sum(changed) > 0


def test_bmojo_mixer_decodes_through_the_step_kernels(interpreted):
    """A B'MOJO mixer's decoding steps with ``BMOJO_KERNELS=triton`` (its Mamba-2 step and eidetic update kernels)
    give the PyTorch steps' outputs and state."""
    (out, (_, state)), calls = interpreted["bmojo_decode"]
    mixer, h, ref_state = bmojo_decode_inputs()
    with torch.no_grad():
        ref = mixer(h, ref_state)[0]
    assert calls == 2 * h.shape[1]
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(state.tensors(), ref_state.tensors(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ssd_kernel_rejects_bad_shapes(monkeypatch):
    kernel = pytest.importorskip("bmojo.ops.triton.ssd")
    monkeypatch.setattr(kernels, "interpreting", lambda: True)  # CPU tensors pass, as under the interpreter
    x, dt, a, b, c, h0 = ssd_inputs(1, 5, 4, 16, 2, 8)
    with pytest.raises(ValueError, match="C must have shape"):
        kernel.ssd_scan_triton(x, dt, a, b, c[..., :3])
    with pytest.raises(ValueError, match="A must have shape"):
        kernel.ssd_scan_triton(x, dt, a[:3], b, c)
    with pytest.raises(ValueError, match="multiple of B/C groups"):
        kernel.ssd_scan_triton(x[:, :, :3], dt[:, :, :3], a[:3], b, c)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        kernel.ssd_scan_triton(x, dt, a, b, c, h0[..., :2])
    with pytest.raises(ValueError, match="power of two >= 16"):
        kernel.ssd_scan_triton(x, dt, a, b, c, chunk_size=8)


@pytest.mark.parametrize("case", range(len(SSD_SHAPES)))
def test_ssd_kernel_gradients_match_reference(interpreted, case):
    """The backward kernel's gradients of every input (``x, dt, A, B, C`` and the initial state) equal autograd's
    through the sequential reference."""
    inputs, _ = ssd_call(case, grad=True)
    loss_ref = probe_loss(ssd_scan_ref(*inputs))
    assert_same_gradients(interpreted[f"ssd_grad{case}"][0], loss_ref, grad_leaves(inputs), rtol=1e-4, atol=1e-4)


def test_mamba2_layer_trains_through_the_ssd_kernels(interpreted):
    """A Mamba-2 layer's forward and backward with ``BMOJO_KERNELS=triton`` run the kernels and give the PyTorch
    path's parameter gradients."""
    result, calls = interpreted["mamba2_grad"]
    assert calls == 1
    layer = mamba2_layer()
    loss_ref = probe_loss(layer(torch.randn(1, 19, 32, generator=torch.Generator().manual_seed(9))))
    assert_same_gradients(result, loss_ref, list(layer.parameters()), rtol=1e-4, atol=1e-4)


class _Launching(Exception):
    """Raised by the stand-in for ``torch.cuda.device``, to stop a call before its kernel would launch."""


def test_kernel_ops_make_their_inputs_device_current(monkeypatch):
    """Triton launches on the current CUDA device, not its arguments': the forward op of each of our kernels enters its
    first input's device first (fake CUDA tensors on ``cuda:1``; a stand-in for ``torch.cuda.device`` records it and
    stops). The backward ops take the same ``kernel_op``; autograd runs CUDA backward nodes in a thread of their
    device anyway."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bmojo.ops.attention import Band
    from bmojo.ops.triton.attention import union_attention_triton
    from bmojo.ops.triton.selective_scan import selective_scan_triton
    from bmojo.ops.triton.ssd import ssd_scan_triton

    entered = []

    def device(d: torch.device) -> None:
        entered.append(torch.device(d))
        raise _Launching

    import bmojo.ops.triton.attention as readout

    monkeypatch.setattr(torch.cuda, "device", device)
    scan, ssd, (q, k, v) = scan_inputs(1, 9, 16, 4), ssd_inputs(1, 9, 2, 16, 1, 8), torch.randn(3, 1, 2, 9, 16)
    dev = "cuda:1"
    monkeypatch.setitem(readout._SHARED_MEMORY, torch.device(dev), 232448)  # as an H100 would say (no driver here)
    calls = {
        "selective scan": lambda: selective_scan_triton(*(t.to(dev) for t in scan)),
        "ssd": lambda: ssd_scan_triton(*(t.to(dev) for t in ssd)),
        "read-out": lambda: union_attention_triton(q.to(dev), [Band(k.to(dev), v.to(dev), 0, 3)]),
    }
    with FakeTensorMode(allow_non_fake_inputs=True):
        for name, call in calls.items():
            with pytest.raises(_Launching):
                call()
            assert entered.pop() == torch.device(dev), name


def test_float32_products_follow_torchs_matmul_precision():
    """Float32 inputs get full float32 products unless ``torch.set_float32_matmul_precision`` allows TF32 (as for
    PyTorch's own products); 16-bit inputs always take TF32."""
    before = torch.get_float32_matmul_precision()
    x32, x16 = torch.empty(1), torch.empty(1, dtype=torch.bfloat16)
    try:
        torch.set_float32_matmul_precision("highest")
        assert (kernels.dot_precision(x32), kernels.dot_precision(x16)) == ("ieee", "tf32")
        torch.set_float32_matmul_precision("high")
        assert (kernels.dot_precision(x32), kernels.dot_precision(x16)) == ("tf32", "tf32")
    finally:
        torch.set_float32_matmul_precision(before)
