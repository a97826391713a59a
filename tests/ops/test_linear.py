"""The few-row linear map (split across CPU threads; a multiply and sum under ``torch.compile``) against ``F.linear``
(forward, autograd, compiled)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torch.utils._python_dispatch import TorchDispatchMode

import bmojo.ops.linear
from bmojo.layers.linear import Linear
from bmojo.ops.linear import MAX_ROWS, MIN_PIECE_BYTES, linear


@pytest.fixture(autouse=True)
def any_weight_size(monkeypatch):
    """Split weights of any size: ``MIN_PIECE_BYTES`` is a speed threshold, and small weights keep the tests fast."""
    monkeypatch.setattr(bmojo.ops.linear, "MIN_PIECE_BYTES", 1)


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Ops(TorchDispatchMode):
    """Names of the PyTorch operations dispatched under it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", [(24,), (1, 1, 24), (3, 24), (2, 5, 24), (MAX_ROWS, 24), (MAX_ROWS + 1, 24), (0, 24)])
@pytest.mark.parametrize("out_features", [128, 127, 97, 63])
@pytest.mark.parametrize("n_threads", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear_forward_and_gradients(shape, out_features, n_threads, bias):
    g = torch.Generator().manual_seed(out_features + len(shape))
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out_features, 24, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_features, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    with threads(n_threads):
        y, ref = linear(x, w, b), F.linear(x, w, b)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref)
    if y.numel():
        grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        for a, r in zip(torch.autograd.grad(y, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
            torch.testing.assert_close(a, r)


@pytest.mark.parametrize("rows,out_features,n_threads,split", [
    (1, 64, 2, True), (MAX_ROWS, 128, 4, True), (1, 127, 4, True), (MAX_ROWS + 1, 64, 2, False), (1, 64, 1, False),
    (1, 63, 2, False),  # pieces of 31 rows: too small to share out
])  # fmt: skip
def test_linear_splits_few_rows_across_the_threads(rows, out_features, n_threads, split):
    """Few rows and at least ``MIN_PIECE`` output rows per thread take one batched product; else ``F.linear``."""
    x, w = torch.randn(rows, 24), torch.randn(out_features, 24)
    ops = _Ops()
    with threads(n_threads), ops:
        linear(x, w)
    assert ("bmm" in ops.names) == split


@pytest.mark.parametrize("out_features,dtype,split", [
    (384, torch.float32, True), (383, torch.float32, False), (768, torch.bfloat16, True), (767, torch.bfloat16, False),
])  # fmt: skip
def test_eager_split_needs_min_piece_bytes_of_weight_a_piece(monkeypatch, out_features, dtype, split):
    """Eager, each piece holds at least ``MIN_PIECE_BYTES`` of the weight (192 KiB: 384 x 256 fp32 in two)."""
    monkeypatch.setattr(bmojo.ops.linear, "MIN_PIECE_BYTES", MIN_PIECE_BYTES)
    x, w = torch.randn(1, 256, dtype=dtype), torch.randn(out_features, 256, dtype=dtype)
    ops = _Ops()
    with threads(2), ops:
        linear(x, w)
    assert ("bmm" in ops.names) == split


def test_linear_in_low_precision_and_with_a_strided_weight():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 1, 32, generator=g), torch.randn(64, 32, generator=g)
    with threads(2):
        torch.testing.assert_close(linear(x.bfloat16(), w.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()))
        strided = torch.randn(32, 64, generator=g).t()
        torch.testing.assert_close(linear(x, strided), F.linear(x, strided))


def _outcome(fn, *args) -> torch.Tensor | str:
    """What ``fn(*args)`` returns, or the first line of the error it raises."""
    try:
        return fn(*args)
    except RuntimeError as error:
        return str(error).splitlines()[0]


@pytest.mark.parametrize("x,w,b", [
    (torch.randn(1, 23), torch.randn(64, 24), None),  # features that do not match
    (torch.randn(1, 24), torch.randn(64, 24, dtype=torch.float64), None),  # mixed dtypes
    (torch.randn(1, 24), torch.randn(64, 24), torch.randn(64, dtype=torch.float64)),
    (torch.randn(1, 24), torch.randn(24), None),  # a 1-D weight
    (torch.tensor(1.0), torch.randn(64, 24), None),  # a 0-D input
])  # fmt: skip
def test_linear_on_odd_arguments_does_what_f_linear_does(x, w, b):
    """Results or errors of ``F.linear`` (no silent dtype promotion, no error of our own)."""
    with threads(2):
        got, expected = _outcome(linear, x, w, b), _outcome(F.linear, x, w, b)
    if isinstance(expected, str):
        assert got == expected
    else:
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("compiled", [False, True])
def test_linear_under_cpu_autocast_gives_f_linear_dtype_and_values(compiled):
    """Autocast runs products in bfloat16 and returns bfloat16; the split product would return float32 after the bias."""
    layer = Linear(32, 64)
    x = torch.randn(1, 32)
    fn = torch.compile(layer, fullgraph=True) if compiled else layer
    with threads(2), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch._dynamo.reset()
        y, ref = fn(x), F.linear(x, layer.weight, layer.bias)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)


@pytest.mark.skipif(
    not hasattr(torch.compiler, "is_exporting"), reason="torch.compiler.is_exporting needs torch >= 2.5"
)
def test_exported_linear_keeps_a_matrix_product():
    """``torch.export`` graphs run op by op elsewhere: they keep the product, not a ``[rows, out, in]`` multiply."""
    with threads(2):
        graph = torch.export.export(Linear(24, 64), (torch.randn(1, 24),)).graph_module
    ops = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert "aten.linear.default" in ops and "aten.mul.Tensor" not in ops


@pytest.mark.parametrize("rows,fused", [(1, True), (MAX_ROWS + 1, False)])
def test_linear_compiles_into_one_graph_with_few_row_products_in_inductor_loops(monkeypatch, rows, fused):
    """Compiled, products too small to split eagerly become inductor loops too (they add no call there)."""
    monkeypatch.setattr(bmojo.ops.linear, "MIN_PIECE_BYTES", MIN_PIECE_BYTES)
    layer = Linear(24, 64)
    x = torch.randn(rows, 1, 24)
    with threads(2), torch.no_grad():
        torch._dynamo.reset()
        y, codes = run_and_get_code(torch.compile(layer, fullgraph=True), x)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))
    code = "".join(codes)
    assert ("extern_kernels." not in code.split("def call(")[1]) == fused  # no call of addmm, mm or bmm


def test_compiled_few_row_products_in_bfloat16_accumulate_as_f_linear_does():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 1, 768, generator=g), torch.randn(512, 768, generator=g) / 28
    with threads(2), torch.no_grad():
        torch._dynamo.reset()
        y = torch.compile(linear, fullgraph=True)(x.bfloat16(), w.bfloat16())
    ref = F.linear(x.bfloat16().double(), w.bfloat16().double())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, atol=0.02, rtol=0.02)  # bfloat16 rounding of the output only


def test_linear_module_keeps_nn_linear_parameters_and_state_dict():
    layer = Linear(24, 64, bias=False)
    assert isinstance(layer, torch.nn.Linear) and list(layer.state_dict()) == ["weight"]
