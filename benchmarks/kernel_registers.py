"""Registers and spills of our Triton kernels, compiled for an H100 (sm_90a) without a GPU.

    python benchmarks/kernel_registers.py     # the read-out at bench_flex.py's tile sweep, then the scans' kernels
    python benchmarks/kernel_registers.py --tiles block_m=128,block_n=64,num_warps=8

Each kernel is compiled by Triton for ``GPUTarget("cuda", 90, 32)`` at the 130m preset's shapes (bf16 inputs; the
read-out: head dim 64, two bands, 64 eidetic slots; the SSD: states 16, 64 and 128 at the chunks and warps its
kernels take for them; the selective scan: state 16) and its PTX assembled by the ``ptxas`` Triton ships, whose
report gives the registers a thread uses and the bytes it spills to local memory. Spills are what made
FlexAttention's default tile slow on the H200 (benchmarks/RESULTS.md); registers bound how many programs share an
SM (65,536 registers: two programs of 4 warps at 255 registers). ``--tiles``: only the read-out, at those tiles.
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
from bmojo.ops.triton.selective_scan import _selective_scan_bwd_kernel, _selective_scan_fwd_kernel  # noqa: E402
from bmojo.ops.triton.ssd import BWD_BLOCK_P, _ssd_bwd_kernel, _ssd_fwd_kernel, kernel_tiles  # noqa: E402

BF16 = {f"{name}_ptr" for name in ("q", "k", "v", "mk", "mv", "do", "out", "dk", "dv", "x", "b", "c", "dy", "u")}


def pointer_type(name: str) -> str:
    """Inputs and the read-out's outputs in bf16, validity in bytes, the rest (states, gradients) float32."""
    return "*bf16" if name in BF16 else "*u8" if name == "valid_ptr" else "*fp32"


def compile_report(fn, constexprs: dict, num_warps: int, num_stages: int) -> tuple[int, int]:
    """``(registers, spilled bytes)`` of ``fn`` compiled with ``constexprs`` for sm_90a."""
    signature = {name: "constexpr" if name in constexprs else pointer_type(name) if name.endswith("_ptr")
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
        given = parse_triton_tiles(text)
        forward = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}
        forward.update({k: v for k, v in given.items() if not k.startswith("bwd_")})
        backward = {**forward, **{k.removeprefix("bwd_"): v for k, v in given.items() if k.startswith("bwd_")}}
        cells = []
        for name, tiles in (("forward", forward), ("dq", backward), ("dk, dv", backward)):
            blocks = dict(BLOCK_M=tiles["block_m"], BLOCK_N=tiles["block_n"], BLOCK_D=64, PRECISION="tf32")
            kernel, constexprs = (_bwd_kv_kernel, dict(MEMORY=False)) if name == "dk, dv" else (
                _query_kernel, dict(BACKWARD=name == "dq", BANDS=2, HAS_MEMORY=True, BLOCK_S=64))  # fmt: skip
            report = compile_report(kernel, {**constexprs, **blocks}, tiles["num_warps"], tiles["num_stages"])
            cells.append("%s %d / %d" % (name, *report))
        print(f"{text or 'default tiles'}:  " + "   ".join(cells), flush=True)
    if args.tiles:
        return
    for n in (16, 64, 128):  # the presets' state, and converted Mamba-2 checkpoints'
        chunk, warps = kernel_tiles(n)
        ssd = dict(BLOCK_Q=chunk, BLOCK_N=n, PRECISION="tf32")
        forward = compile_report(_ssd_fwd_kernel, dict(HAS_H0=True, STORE_STATES=True, BLOCK_P=32, **ssd), warps, 3)
        backward = compile_report(_ssd_bwd_kernel, dict(BLOCK_P=BWD_BLOCK_P, **ssd), warps, 3)
        print(f"SSD, state {n} ({chunk}-step chunks, {warps} warps): forward %d / %d   backward %d / %d"
              % (*forward, *backward), flush=True)  # fmt: skip
    for block_e in (16, 32, 64):
        warps = 1 if block_e * 16 <= 512 else 4  # as ops.triton.selective_scan launches them
        scan = dict(CHUNK=64, BLOCK_E=block_e, BLOCK_N=16)
        forward = compile_report(_selective_scan_fwd_kernel, dict(HAS_H0=True, STORE_STATES=True, **scan), warps, 3)
        backward = compile_report(_selective_scan_bwd_kernel, scan, warps, 3)
        print(f"selective scan, {block_e} channels a program: forward %d / %d   backward %d / %d"
              % (*forward, *backward), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
