"""``benchmarks/train_gpu_bytes.py``: the bytes of inductor's Triton kernels in a training step's code for a GPU,
written on a CPU."""

from __future__ import annotations

import os
import sys

import pytest
from test_decode_profile import run_gpu_codegen

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from train_gpu_bytes import kernel_bytes  # noqa: E402

CODE = """
triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', '''
@triton.jit
def triton_poi_fused_add_0(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    inductor_meta={'kernel_name': 'triton_poi_fused_add_0', 'kernel_num_gb': 0.002, 'kernel_flop': 0}
def get_args():
    return (arg_0, arg_1, 8,)
def call(args):
    triton_poi_fused_add_0.run(*args, stream=stream0)
''', device_str='cuda')
class Runner:
    def call(self, args):
        extern_kernels.mm(arg0_1, arg1_1, out=buf0)
        triton_poi_fused_add_0.run(buf0, buf1, 8, stream=stream0)
        triton_poi_fused_add_0.run(buf1, buf2, 8, stream=stream0)
"""


def test_kernel_bytes_counts_the_graphs_launches_not_the_benchmark_harness():
    assert kernel_bytes([CODE, CODE]) == {"0:triton_poi_fused_add_0": (2e6, 2), "1:triton_poi_fused_add_0": (2e6, 2)}


SPLIT = """
from train_gpu_bytes import split, step_bytes, total
from bmojo import BMojoConfig
for preset in ("transformer", "bmojo"):
    config = BMojoConfig.from_preset(preset, "tiny", num_hidden_layers=3, window_size=16, chunk_size=16)
    parts = split(config, 64, 1)
    print(preset, *parts["layer"], *parts["rest"], *total(step_bytes(config, 64, 1)))
"""


def test_a_layer_and_the_rest_add_up_to_the_whole_model():
    """From 1 and 2 layers, a 3-layer model's bytes and kernel calls, generated on their own."""
    rows = {name: list(map(float, rest)) for name, rest in run_gpu_codegen(SPLIT).items()}
    for layer_bytes, layer_calls, rest_bytes, rest_calls, whole_bytes, whole_calls in rows.values():
        assert layer_bytes > 0 and rest_bytes > 0
        assert rest_bytes + 3 * layer_bytes == pytest.approx(whole_bytes, rel=1e-5)  # (up to a few scalars)
        assert abs(rest_calls + 3 * layer_calls - whole_calls) <= 2  # (where a layer meets the next, fusions vary)
    assert rows["bmojo"][1] > rows["transformer"][1]  # B'MOJO's layer: more kernels (the SSM's, the eidetic memory's)
