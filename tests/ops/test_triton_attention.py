"""Our Triton read-out kernels (``bmojo.ops.triton.attention``) against the dense definition
``union_attention_ref``, outputs and every gradient, on CPU tensors under ``TRITON_INTERPRET=1`` (``interpret.py``).

float32 and float16 only: the interpreter's ``tl.dot`` multiplies bfloat16 operands' bit patterns (values near 1e10,
triton-lang/triton#11584, unsupported upstream), so bfloat16 is checked on a GPU only (``tests/test_cuda.py``)."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest
import torch
from interpret import assert_same_gradients, grad_leaves, probe_loss, run_interpreted

import bmojo.ops.triton as kernels
from bmojo import BMojoConfig, BMojoForCausalLM
from bmojo.ops.attention import Band, ChunkMemory, union_attention_ref

KERNEL = "bmojo.ops.triton.attention:union_attention_triton"
UNION = "bmojo.ops.attention:union_attention"

# name: (batch, query heads, kv heads, length, head dim, bands as (lo, hi), memory chunk (0: none), memory slots,
# tiles (union_attention_triton's arguments), dtype)
SQUARE, TALL, F32 = {"block_m": 16, "block_n": 16}, {"block_m": 32, "block_n": 16}, torch.float32
CASES = {
    # the B'MOJO read-out: window, fading band, eidetic tokens; grouped heads, a head dim that is not a power of two,
    # a length that fills no tile, chunks smaller than a query tile (a tile spans chunks), invalid slots
    "bmojo": (2, 4, 2, 37, 24, [(0, 7), (8, 15)], 8, 5, SQUARE, F32),
    "window": (1, 2, 2, 33, 16, [(0, 9)], 0, 0, TALL, F32),
    # bands wider than the tiles: blocks every query of a tile sees, computed without a mask
    "wide": (1, 4, 2, 100, 16, [(0, 39), (40, 79)], 32, 4, SQUARE, F32),
    # ... with other tiles in the backward
    "wide_tiles": (2, 2, 1, 90, 16, [(0, 47), (48, 95)], 0, 0, {**TALL, "bwd_block_m": 16, "bwd_block_n": 32}, F32),
    "one_token": (1, 2, 1, 1, 16, [(0, 3), (4, 7)], 16, 3, SQUARE, F32),
    # a band alone that starts at distance 8: the first 8 queries see nothing (o = 0, lse = -inf)
    "empty_rows": (1, 2, 1, 30, 16, [(8, 15)], 0, 0, SQUARE, F32),
    # full causal attention and a memory whose chunk spans several tiles
    "causal": (1, 2, 1, 50, 16, [(0, None)], 32, 4, {"block_m": 16, "block_n": 32}, F32),
    "half": (2, 2, 1, 45, 32, [(0, 7), (8, 15)], 16, 6, TALL, torch.float16),
    # a memory of no slots: no memory kernel in the backward, its (empty) gradients all the same
    "no_slots": (1, 2, 1, 20, 16, [(0, 7)], 8, 0, SQUARE, F32),
}


def case_inputs(name: str, grad: bool = False, seed: int = 0) -> tuple[torch.Tensor, list[Band], ChunkMemory | None]:
    """Random queries, bands and chunk memories (one chunk more than the queries need, as the layer makes them)."""
    b, hq, hkv, length, d, spans, chunk, slots, _, dtype = CASES[name]
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    q = rand(b, hq, length, d)
    bands = [Band(rand(b, hkv, length, d), rand(b, hkv, length, d), lo, hi) for lo, hi in spans]
    memory = None
    if chunk:
        n_chunks = length // chunk + 1
        valid = torch.rand(b, n_chunks, slots, generator=g) > 0.3
        memory = ChunkMemory(rand(b, hkv, n_chunks, slots, d), rand(b, hkv, n_chunks, slots, d), valid, chunk)
    return q, bands, memory


def tolerance(name: str) -> dict[str, float]:
    return {"rtol": 2e-3, "atol": 2e-3} if CASES[name][-1] == torch.float16 else {"rtol": 1e-4, "atol": 1e-4}


# kernel calls of a tiny model's forward: two B'MOJO layers (SSD and read-out each); two sliding-window layers (a
# read-out over one band); a Mamba layer (selective scan) and a full-attention layer (SDPA, not ours)
MODEL_PRESETS = {"bmojo": 4, "swa": 2, "jamba": 1}


def tiny_model(preset: str) -> BMojoForCausalLM:
    torch.manual_seed(0)
    config = BMojoConfig.from_preset(
        preset, "tiny", window_size=8, chunk_size=8, eidetic_size=3, selection="recency", loss_chunk_size=0
    )  # the logits too, which probe_loss weighs
    return BMojoForCausalLM(config)


def model_input() -> torch.Tensor:
    return torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Outputs of the calls below, run with the Triton interpreter on CPU: ``{key: (output, kernel calls)}``."""
    pytest.importorskip("triton")
    calls = {}
    for name, case in CASES.items():
        tiles = case[-2]
        calls[name] = (KERNEL, case_inputs(name), tiles)
        calls[f"{name}_grad"] = (KERNEL, case_inputs(name, grad=True), {**tiles, "_grad": True})
    calls["dispatch"] = (UNION, case_inputs("bmojo", seed=1), {})
    for preset in MODEL_PRESETS:
        ids = model_input()
        calls[f"model_{preset}"] = (tiny_model(preset), (ids,), {"labels": ids, "use_cache": False, "_grad": True})
    return run_interpreted(calls, tmp_path_factory.mktemp("triton_attention"))


@pytest.mark.parametrize("name", CASES)
def test_union_attention_kernel_matches_reference(interpreted, name):
    (o, lse), calls = interpreted[name]
    o_ref, lse_ref = union_attention_ref(*case_inputs(name))
    assert calls == 1 and o.dtype == o_ref.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, **tolerance(name))
    torch.testing.assert_close(lse, lse_ref, **tolerance(name))
    if name == "empty_rows":
        assert torch.isinf(lse[:, :, :8]).all() and not o[:, :, :8].any()


@pytest.mark.parametrize("name", CASES)
def test_union_attention_kernel_gradients_match_reference(interpreted, name):
    """The backward kernels' gradients of the queries, every band's keys and values and the memory's, through both
    outputs (``o`` and the LSE, as the merge with retrieved tokens uses it), equal autograd's through the dense
    reference."""
    inputs = case_inputs(name, grad=True)
    loss_ref = probe_loss(union_attention_ref(*inputs))
    assert_same_gradients(interpreted[f"{name}_grad"][0], loss_ref, grad_leaves(inputs), **tolerance(name))


def test_union_attention_dispatches_to_the_kernel(interpreted):
    """With ``BMOJO_KERNELS=triton``, ``union_attention`` runs the kernel (one call)."""
    (o, lse), calls = interpreted["dispatch"]
    o_ref, lse_ref = union_attention_ref(*case_inputs("bmojo", seed=1))
    assert calls == 1
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-4, atol=1e-4)


def test_auto_mode_weighs_every_input_the_kernels_read(monkeypatch):
    """``union_attention`` asks ``use_triton`` about the eidetic memory's keys and values too, not the queries and
    bands alone (so that a memory too large for the kernels' offsets makes it choose another path)."""
    import bmojo.ops.attention as attention

    asked = []
    monkeypatch.setattr(attention, "use_triton", lambda *tensors, differentiable=False: asked.extend(tensors) and False)
    q, bands, memory = case_inputs("bmojo")
    attention.union_attention(q, bands, memory)
    expected = [q, *(x for band in bands for x in (band.k, band.v)), memory.k, memory.v]
    assert len(asked) == len(expected) and all(a is e for a, e in zip(asked, expected))


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_model_trains_through_the_kernels(interpreted, preset):
    """A whole tiny model's loss and every parameter's gradient with ``BMOJO_KERNELS=triton`` (our kernels for every
    scan and read-out) equal those of its CPU paths."""
    result, calls = interpreted[f"model_{preset}"]
    model = tiny_model(preset)
    ids = model_input()
    assert calls == MODEL_PRESETS[preset]
    loss_ref = probe_loss(model(ids, labels=ids, use_cache=False))
    assert_same_gradients(result, loss_ref, list(model.parameters()), rtol=1e-4, atol=1e-4)


def test_union_attention_kernel_rejects_bad_input(monkeypatch):
    kernel = pytest.importorskip("bmojo.ops.triton.attention")
    monkeypatch.setattr(kernels, "interpreting", lambda: True)  # CPU tensors pass, as under the interpreter
    q, bands, memory = case_inputs("bmojo")
    with pytest.raises(ValueError, match="one or two bands"):
        kernel.union_attention_triton(q, bands * 2, memory)
    with pytest.raises(ValueError, match=r"bands\[1\].v must have shape"):
        kernel.union_attention_triton(q, [bands[0], Band(bands[1].k, bands[1].v[:, :, :5], 8, 15)], memory)
    with pytest.raises(ValueError, match="memory.valid must have shape"):
        kernel.union_attention_triton(q, bands, ChunkMemory(memory.k, memory.v, memory.valid[:, :2], 8))
    with pytest.raises(ValueError, match="must share one dtype"):
        kernel.union_attention_triton(q.half(), bands, memory)
    with pytest.raises(ValueError, match="memory.valid must be bool"):
        kernel.union_attention_triton(q, bands, ChunkMemory(memory.k, memory.v, memory.valid.float(), 8))
    with pytest.raises(ValueError, match="fewer than the 37 queries need"):
        kernel.union_attention_triton(q, bands, ChunkMemory(memory.k, memory.v, memory.valid, 4))
    with pytest.raises(ValueError, match="0 <= lo <= hi"):
        kernel.union_attention_triton(q, [Band(bands[0].k, bands[0].v, 3, 2)])
    with pytest.raises(ValueError, match="power of two >= 16"):
        kernel.union_attention_triton(q, bands, memory, block_m=24)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        kernel.union_attention_triton(q[:, :3], bands, memory)


GPUS = {"A100": 166912, "RTX 3090": 101376, "H100": 232448}  # bytes of shared memory a block may use
DEFAULT_TILES = (64, 64, 0, 0, 64, 64, 0, 0)  # union_attention_triton's: block_m, block_n, warps, stages, then bwd_


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_fit_tiles_cut_the_default_tiles_only_as_far_as_shared_memory_needs(gpu, dtype, d):
    """Each half (forward, backward) keeps the defaults where their bound fits the GPU, else takes tiles that fit
    when one more stage would not; ``None`` only when the smallest tiles do not fit."""
    kernel = pytest.importorskip("bmojo.ops.triton.attention")
    limit, itemsize = GPUS[gpu], dtype.itemsize
    tiles = kernel.fit_tiles(DEFAULT_TILES, d, 64, itemsize, limit)
    if tiles is None:
        assert any(kernel.shared_bound(backward, 16, 16, 1, d, 64, itemsize) > limit for backward in (False, True))
        return
    for backward, (block_m, block_n, warps, stages) in ((False, tiles[:4]), (True, tiles[4:])):
        assert warps == 0 and kernel.shared_bound(backward, block_m, block_n, stages, d, 64, itemsize) <= limit
        if (block_m, block_n, stages) != (64, 64, kernel.TRITON_STAGES):
            assert kernel.shared_bound(backward, 64, 64, kernel.TRITON_STAGES, d, 64, itemsize) > limit
        if stages < kernel.TRITON_STAGES:
            assert kernel.shared_bound(backward, block_m, block_n, stages + 1, d, 64, itemsize) > limit
    if dtype == torch.bfloat16 and d == 64:  # the presets' heads in 16 bits: the defaults on every GPU
        assert tiles == (64, 64, 0, 3, 64, 64, 0, 3)


def test_fitting_tiles_compiles_into_the_graph_for_any_head_dim(monkeypatch):
    """Under ``torch.compile``, the GPU's shared memory is a constant read once (not traced into Triton's driver) and
    the fitting is traced (one graph per head dim: its tile is a constant), under dynamic shapes too."""
    kernel = pytest.importorskip("bmojo.ops.triton.attention")
    import triton

    class Utils:  # Triton's CUDA driver, as a GPU would answer (through a call dynamo cannot trace)
        calls = 0

        def get_device_properties(self, index):
            Utils.calls += os.getpid() > 0
            return {"max_shared_mem": GPUS["RTX 3090"]}

    class Driver:
        utils = Utils()

    config = triton.runtime.driver  # its active driver: a property over _active in recent Triton, an attribute before
    monkeypatch.setattr(config, "_active" if isinstance(getattr(type(config), "active", None), property) else "active",
                        Driver())  # fmt: skip
    monkeypatch.setattr(kernel, "_SHARED_MEMORY", {})

    def step(x):
        limit = kernel._shared_memory(torch.device("cuda", 0))
        tiles = kernel.fit_tiles(DEFAULT_TILES, x.shape[-1], 64, x.element_size(), limit)
        return x * 0 if tiles is None else x + tiles[0] + tiles[3] + tiles[4] + tiles[7]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for d in (64, 128, 256):
        x = torch.zeros(2, d)
        torch.testing.assert_close(compiled(x), step(x))
    assert Utils.calls == 1


def test_launch_tiles_off_a_gpu_are_the_options_given():
    kernel = pytest.importorskip("bmojo.ops.triton.attention")
    q, bands, memory = case_inputs("bmojo")
    assert kernel.launch_tiles(q, bands, memory) == DEFAULT_TILES
    assert kernel.launch_tiles(q, bands, memory, block_m=128, bwd_block_n=32, num_stages=2) == (
        128, 64, 0, 2, 128, 32, 0, 2)  # fmt: skip


def _ptxas_or_skip() -> None:
    """Skip where this Triton ships no ``ptxas`` (compiling for a GPU target needs it)."""
    triton = pytest.importorskip("triton")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not any(os.path.exists(os.path.join(bin_dir, name)) for name in ("ptxas-blackwell", "ptxas")):
        pytest.skip("this triton ships no ptxas")


@pytest.fixture
def kernel_registers(monkeypatch):
    """``benchmarks/kernel_registers.py`` as a module: it compiles our kernels for GPU targets without a GPU."""
    pytest.importorskip("bmojo.ops.triton.attention")
    _ptxas_or_skip()
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    return importlib.import_module("kernel_registers")


def test_kernels_compile_with_float64_scales_as_torch_compile_launches_them(kernel_registers):
    """``torch.compile``'s generated code passes the kernels' float arguments as float64 (seen on an H100: the
    forward's running sum then changed type inside its loop and Triton refused to compile it); the kernels cast them
    to float32. Compiled for an H100 with Triton's own ``ptxas``, no GPU needed."""
    for backward in (False, True):
        for name, kernel, constexprs in kernel_registers.readout_kernels(backward, 2, 64, 64, 32, 64, "tf32"):
            compiled = kernel_registers.compile_kernel(kernel, constexprs, num_warps=4, num_stages=2, scale="fp64")
            assert compiled.metadata.shared > 0, name


def test_decoding_step_kernels_compile_for_an_h100(kernel_registers):
    """The Mamba-2 step and eidetic update kernels (tested under the interpreter, which does not compile them) lower
    to an H100's code at the 130m shapes, the norm's eps a float64 as ``torch.compile`` passes it, without spills."""
    for kernel, types, constexprs in kernel_registers.STEP_KERNELS:
        registers, spilled = kernel_registers.compile_report(kernel, constexprs, 4, 1, types)
        assert 0 < registers <= 255 and spilled == 0, kernel.__name__


@pytest.mark.slow  # ~30 s of Triton compiles with a cold cache
def test_shared_bound_holds_for_the_kernels_compiled_for_an_h100(kernel_registers):
    """What Triton compiles for an H100 (no GPU needed: its own ``ptxas``) at the tiles fitted for head dim 128 in
    bfloat16 with 64 memory slots (the defaults) needs at most ``shared_bound``: the forward's kernel, and each of the
    backward's (``benchmarks/kernel_registers.py --shared``, for one GPU, dtype and head dim)."""
    (line,) = kernel_registers.shared_report({90: kernel_registers.SHARED_LIMITS[90]}, ("bf16",), (128,))
    cells = re.findall(r"(forward|dq|dk, dv|memory) (\d+) / (\d+)", line)
    assert line.startswith("sm_90 bf16 d=128: forward 64x64, 3 stages; backward 64x64, 3 stages")
    assert [name for name, *_ in cells] == ["forward", "dq", "dk, dv", "memory"] and "EXCEEDS" not in line
    assert all(0 < int(used) <= int(bound) for _, used, bound in cells)


# Traces a compiled training step of a tiny model of the preset argv[1] with BMOJO_KERNELS=triton through dynamo and
# AOT autograd (fake tensors: no kernel runs) and prints the Triton kernels in its forward and backward graphs.
# Triton analyses a kernel for torch.compile by lowering it for a target; with no GPU here, a stand-in driver names
# an H100.
TRACE = """
import torch, triton
from triton.backends.compiler import GPUTarget
from torch._dynamo.backends.common import aot_autograd
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from bmojo import BMojoConfig, BMojoForCausalLM

class Driver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

triton.runtime.driver.set_active(Driver())
torch._functorch.config.force_non_lazy_backward_lowering = True
graphs = {}

def record(name):
    def compiler(gm, example_inputs):
        graphs[name] = gm
        def run(*args):
            raise SystemExit
        return run
    return compiler

import sys
config = BMojoConfig.from_preset(sys.argv[1], "tiny", window_size=16, chunk_size=16, eidetic_size=4)
model = BMojoForCausalLM(config)
ids = torch.randint(0, 100, (2, 64))
backend = aot_autograd(fw_compiler=record("forward"), bw_compiler=record("backward"))
try:
    torch.compile(model, backend=backend, fullgraph=True)(ids, labels=ids, use_cache=False)
except SystemExit:
    pass
for name, gm in graphs.items():
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)]
    print(name, *(kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in calls))
    # inductor cannot lower a bool tensor viewed as another dtype (seen on an H100): none may reach the graphs
    print(name + "-dtype-views", *(n for n in gm.graph.nodes if n.target is torch.ops.aten.view.dtype))
"""


# the kernels of one layer's forward and backward, by preset (the read-out's dk/dv kernel runs twice: bands, memory)
TRACED = {
    "bmojo": (
        ["_ssd_fwd_own_kernel", "_ssd_fwd_states_kernel", "_ssd_fwd_output_kernel", "_query_kernel"],
        ["_query_kernel", "_bwd_kv_kernel", "_bwd_kv_kernel", "_ssd_bwd_states_kernel", "_ssd_bwd_chunk_kernel"],
    ),
    "mamba": (["_selective_scan_fwd_kernel"], ["_selective_scan_bwd_kernel"]),
}


@pytest.mark.parametrize("preset", TRACED)
def test_compiled_training_traces_through_the_kernels(preset):
    """``torch.compile(model, fullgraph=True)`` of a training step keeps our kernels (``triton_op``s) in one graph:
    per layer the scan's (and the read-out's) forward kernels, and their backward kernels."""
    pytest.importorskip("triton")
    env = {**os.environ, "BMOJO_KERNELS": "triton"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", TRACE, preset], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    graphs = {name: items for name, *items in map(str.split, proc.stdout.splitlines())}
    layers = BMojoConfig.from_preset(preset, "tiny").num_hidden_layers
    forward, backward = TRACED[preset]
    assert sorted(graphs["forward"]) == sorted(forward * layers)
    assert sorted(graphs["backward"]) == sorted(backward * layers)
    assert graphs["forward-dtype-views"] == graphs["backward-dtype-views"] == []


def test_kernel_registers_script_reports_every_kernel():
    """``benchmarks/kernel_registers.py`` compiles the three kernels for sm_90a without a GPU and reports each one's
    registers and spills (skipped where this Triton ships no ``ptxas``)."""
    _ptxas_or_skip()
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "kernel_registers.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script, "--tiles", "block_m=16,block_n=16"], env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.splitlines()[-1]
    assert line.startswith("block_m=16,block_n=16:")
    numbers = [int(x) for x in re.findall(r"(\d+) / (\d+)", line) for x in x]
    assert len(numbers) == 6 and all(0 < r <= 255 for r in numbers[::2])
