"""Registers and spills of our Triton read-out kernels per tile, compiled for an H100 (sm_90a) without a GPU.

    python benchmarks/kernel_registers.py                        # the tile sweep of bench_flex.py
    python benchmarks/kernel_registers.py --tiles block_m=128,block_n=64,num_warps=8

Each kernel of ``bmojo.ops.triton.attention`` (the forward, ``dq`` and ``dk, dv`` walks) is compiled by Triton for
``GPUTarget("cuda", 90, 32)`` at the 130m preset's read-out (bf16, head dim 64, two bands, 64 eidetic slots) and
its PTX assembled by the ``ptxas`` Triton ships, whose report gives the registers a thread uses and the bytes it
spills to local memory. Spills are what made FlexAttention's default tile slow on the H200 (benchmarks/RESULTS.md);
registers bound how many programs share an SM (65,536 registers: two programs of 4 warps at 255 registers).
Needs ``triton`` with its NVIDIA backend (the Linux wheels); no GPU, no driver.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(__file__))
from bench_flex import TILE_SWEEP  # noqa: E402

from bmojo.ops.attention import parse_triton_tiles  # noqa: E402
from bmojo.ops.triton.attention import _bwd_kv_kernel, _query_kernel  # noqa: E402

POINTERS = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "valid_ptr": "*u8"}  # the rest bf16


def compile_report(fn, constexprs: dict, num_warps: int, num_stages: int) -> tuple[int, int]:
    """``(registers, spilled bytes)`` of ``fn`` compiled with ``constexprs`` for sm_90a."""
    signature = {name: "constexpr" if name in constexprs else POINTERS.get(name, "*bf16") if name.endswith("_ptr")
                 else "fp32" if name.endswith("scale") else "i32" for name in fn.arg_names}  # fmt: skip
    options = {"num_warps": num_warps, "num_stages": num_stages}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next(p for p in (os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")) if os.path.exists(p))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        report = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                                text=True, check=True).stderr  # fmt: skip
    spills = re.search(r"(\d+) bytes spill stores", report)
    return int(re.search(r"Used (\d+) registers", report).group(1)), int(spills.group(1)) if spills else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", action="append", default=[], help="e.g. block_m=128,block_n=64,num_warps=8")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, sm_90a; registers / spilled bytes per thread")
    for text in args.tiles or TILE_SWEEP:
        tiles = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3, **parse_triton_tiles(text)}
        blocks = dict(BLOCK_M=tiles["block_m"], BLOCK_N=tiles["block_n"], BLOCK_D=64, PRECISION="tf32")
        launch = (tiles["num_warps"], tiles["num_stages"])
        cells = []
        for backward in (False, True):
            query = dict(BACKWARD=backward, BANDS=2, HAS_MEMORY=True, BLOCK_S=64, **blocks)
            cells.append(
                "%s %d / %d" % ("dq" if backward else "forward", *compile_report(_query_kernel, query, *launch))
            )
        cells.append("dk, dv %d / %d" % compile_report(_bwd_kv_kernel, dict(MEMORY=False, **blocks), *launch))
        print(f"{text or 'default tiles':40s} " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
