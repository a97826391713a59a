"""``benchmarks/decode_profile.py`` on a CPU: it counts an eager decoding step's operations and the kernel calls of the
compiled step's generated code (the full run compiles two models: marked slow)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from decode_profile import generated_kernel_calls  # noqa: E402

CODE = """
cpp_fused_add_0 = async_compile.cpp_pybinding(...)
def call(args):
    buf0 = empty_strided_cpu((1, 64), (64, 1), torch.float32)
    extern_kernels.mm(arg0_1, arg1_1, out=buf0)
    cpp_fused_add_0(buf0, arg2_1)
    buf1 = buf0; del buf0
    extern_kernels.mm(buf1, arg3_1, out=buf2)
    triton_poi_fused_1.run(buf2, stream=stream0)
    _mamba2_step_kernel_0.run(buf2, arg5_1, 1, 1, stream=stream0)
    extern_kernels.bmm(buf2, arg4_1, out=buf3)
    buf4 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(buf3, buf3, buf3)
    return (buf4,)
"""


def test_generated_kernel_calls_counts_fused_kernels_our_kernels_external_calls_and_fallbacks():
    """Over every graph of a step (here two copies of one)."""
    assert generated_kernel_calls([CODE, CODE]) == {
        "mm": 4, "fused": 4, "ours": 2, "bmm": 2, "_scaled_dot_product_flash_attention_for_cpu": 2}  # fmt: skip


BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def run_gpu_codegen(code: str) -> dict[str, list[str]]:
    """Output lines of ``code``, run with the benchmarks importable in a process of its own (``gpu_codegen`` swaps
    Triton's driver for a stand-in) without the Triton interpreter, as ``{first word: the others}``."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import sys\nsys.path.insert(0, {BENCHMARKS!r})\n{code}"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: rest for name, *rest in map(str.split, proc.stdout.splitlines())}


# gpu_kernel_calls for 1-layer models
GPU_KERNELS = """
import torch
from decode_profile import gpu_kernel_calls
from bmojo import BMojoConfig, BMojoForCausalLM
for preset in ("transformer", "bmojo"):
    config = BMojoConfig.from_preset(preset, "tiny", num_hidden_layers=1, window_size=16, chunk_size=16)
    counts = gpu_kernel_calls(BMojoForCausalLM(config).eval(), torch.randint(0, 100, (1, 40)))
    print(preset, counts.get("mm", 0), counts.get("fused", 0), counts.get("ours", 0), sum(counts.values()))
"""


def test_gpu_kernel_calls_count_the_code_inductor_generates_for_a_gpu():
    """One matrix product a projection, as CUDA runs them (F.linear): the Transformer's 7 (q, k, v, o, gate, up,
    down) and B'MOJO's 10 (the Mamba-2 in and out projections, the innovation test's predictor, q, k and v of the
    token and the fading token in one product each, o, the MLP's 3), each with the LM head's; B'MOJO's Mamba-2 step
    (conv, state update, skip, gated norm) and eidetic memory update as our two Triton kernels; inductor's Triton
    kernels for the rest, more of them for B'MOJO."""
    counts = {name: list(map(int, rest)) for name, rest in run_gpu_codegen(GPU_KERNELS).items()}
    assert counts["transformer"][0] == 7 + 1 and counts["bmojo"][0] == 10 + 1
    assert counts["transformer"][1] > 0 and counts["bmojo"][1] > counts["transformer"][1]
    assert counts["transformer"][2] == 0 and counts["bmojo"][2] == 2


@pytest.mark.slow
def test_script_reports_counts_for_both_models():
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "decode_profile.py")
    proc = subprocess.run([sys.executable, script, "--steps", "2", "--length", "40", "--set", "window_size=16",
                           "--host-profile", "3", "--reference-steps"], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "eager ops" in line]
    assert [line.split()[0] for line in lines] == ["transformer", "bmojo", "bmojo-ref"]
    assert all("mm" in line and "fused" in line for line in lines)
    assert proc.stdout.count("where the host's time goes") == 3 and proc.stdout.count("Ordered by: internal time") == 3
