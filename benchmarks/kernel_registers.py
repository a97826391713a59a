"""Registers and spills of our Triton kernels, compiled for an H100 (sm_90a) without a GPU.

    python benchmarks/kernel_registers.py     # the read-out at bench_flex.py's tile sweep, the scans' kernels, then
                                              # the decoding-step kernels
    python benchmarks/kernel_registers.py --tiles block_m=128,block_n=64,num_warps=8

Each kernel is compiled by Triton for ``GPUTarget("cuda", 90, 32)`` at the 130m preset's shapes (bf16 inputs; the
read-out: head dim 64, two bands, 64 eidetic slots; the SSD: states 16, 64 and 128 at the chunks and warps its
kernels take for them; the selective scan: state 16) and its PTX assembled by the ``ptxas`` Triton ships, whose
report gives the registers a thread uses and the bytes it spills to local memory. Spills are what made
FlexAttention's default tile slow on the H200 (benchmarks/RESULTS.md); registers bound how many programs share an
SM (65,536 registers: two programs of 4 warps at 255 registers). ``--tiles``: only the read-out, at those tiles.
Needs ``triton`` with its NVIDIA backend (the Linux wheels); no GPU, no driver.

    python benchmarks/kernel_registers.py --shared   # the read-out's shared memory against its bound, per GPU

``--shared``: for an A100 (sm_80, 163 KiB of shared memory a block), an RTX 3090 (sm_86, 99 KiB) and an H100 (sm_90,
227 KiB), inputs in bf16 and float32 (full float32 products, PyTorch's default) and head dims 64, 128 and 256 (64
eidetic slots): the tiles ``fit_tiles`` picks from the defaults, then each kernel compiled at them, its shared memory
against ``shared_bound`` (the bound must hold, and so the limit).
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
from bmojo.ops.triton.attention import fit_tiles, readout_kernels, shared_bound  # noqa: E402
from bmojo.ops.triton.eidetic import _stage_evicted_kernel  # noqa: E402
from bmojo.ops.triton.selective_scan import _selective_scan_bwd_kernel, _selective_scan_fwd_kernel  # noqa: E402
from bmojo.ops.triton.ssd import (  # noqa: E402
    _mamba2_step_kernel,
    _ssd_bwd_chunk_kernel,
    _ssd_bwd_states_kernel,
    _ssd_fwd_output_kernel,
    _ssd_fwd_own_kernel,
    _ssd_fwd_states_kernel,
    kernel_tiles,
)

BF16 = {f"{name}_ptr" for name in ("q", "k", "v", "mk", "mv", "do", "out", "dk", "dv", "x", "b", "c", "dy", "u")}


# The decoding-step kernels at the 130m preset's shapes (a Mamba-2 layer of 24 heads of 64, state 16, conv of 4; an
# eidetic memory of 64 slots, heads of 64), bf16 activations, float32 states, the norm's eps as torch.compile passes
# it (float64)
STEP_KERNELS = (
    (_mamba2_step_kernel, {**{name: "*bf16" for name in ("xbc", "dt", "z", "conv_state", "weight", "bias", "out")},
                           **{name: "*fp32" for name in ("ssm_state", "dt_bias", "A_log", "D", "norm_weight", "gated")},
                           "eps": "fp64"}, dict(K=4, BLOCK_K=4, BLOCK_P=64, BLOCK_N=16, HAS_BIAS=True)),
    (_stage_evicted_kernel, {**{name: "*bf16" for name in ("keys", "values", "stage_k", "stage_v")},
                             **{name: "*i64" for name in ("positions", "pos", "stage_pos")},
                             **{name: "*fp32" for name in ("win_score", "stage_score")}}, dict(BLOCK_K=64, BLOCK_D=64)),
)  # fmt: skip
SHARED_LIMITS = {80: 166912, 86: 101376, 90: 232448}  # bytes of shared memory a block may use, by compute capability


def pointer_type(name: str, dtype: str = "bf16") -> str:
    """Inputs and the read-out's outputs in ``dtype``, validity in bytes, the rest (states, gradients) float32."""
    return f"*{dtype}" if name in BF16 else "*u8" if name == "valid_ptr" else "*fp32"


def compile_kernel(fn, constexprs: dict, num_warps: int, num_stages: int, arch: int = 90, dtype: str = "bf16",
                   scale: str = "fp32", types: dict[str, str] | None = None):  # fmt: skip
    """``fn`` compiled by Triton with ``constexprs`` for ``sm_<arch>``, its inputs in ``dtype``, its float arguments
    (the ``*scale`` ones) of type ``scale`` (``"fp64"``: as ``torch.compile``'s generated code launches it); ``types``:
    the Triton types of arguments named otherwise (the decoding-step kernels')."""
    signature = {name: "constexpr" if name in constexprs else pointer_type(name, dtype) if name.endswith("_ptr")
                 else scale if name.endswith("scale") else "i32" for name in fn.arg_names}  # fmt: skip
    signature.update(types or {})
    options = {"num_warps": num_warps, "num_stages": num_stages}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


DTYPES = {"bf16": (2, "tf32"), "fp32": (4, "ieee")}  # itemsize and products (float32: PyTorch's default, full)


def shared_report(limits: dict[int, int] = SHARED_LIMITS, dtypes: tuple[str, ...] = ("bf16", "fp32"),
                  head_dims: tuple[int, ...] = (64, 128, 256)) -> list[str]:  # fmt: skip
    """The read-out's tiles by ``fit_tiles`` per GPU (compute capability: shared memory), dtype and head dim, and its
    kernels' shared memory at them against ``shared_bound``: a printed line each, also returned."""
    print(f"triton {triton.__version__}; tiles fitted from the defaults; KiB of shared memory: compiled / bound")
    lines = []
    for arch, limit in limits.items():
        for dtype in dtypes:
            itemsize, precision = DTYPES[dtype]
            for d in head_dims:
                tiles = fit_tiles((64, 64, 0, 0, 64, 64, 0, 0), d, 64, itemsize, limit)
                if tiles is None:
                    lines.append(f"sm_{arch} {dtype} d={d}: no tiles fit (the model takes FlexAttention)")
                    print(lines[-1], flush=True)
                    continue
                cells = []
                for backward, (block_m, block_n, _, stages) in ((False, tiles[:4]), (True, tiles[4:])):
                    bound = shared_bound(backward, block_m, block_n, stages, d, 64, itemsize)
                    for name, fn, constexprs in readout_kernels(backward, 2, 64, block_m, block_n, d, precision):
                        used = compile_kernel(fn, constexprs, 4, stages, arch, dtype).metadata.shared
                        flag = "" if used <= bound <= limit else "  EXCEEDS"
                        cells.append(f"{name} {used / 1024:.0f} / {bound / 1024:.0f}{flag}")
                lines.append(f"sm_{arch} {dtype} d={d}: forward {tiles[0]}x{tiles[1]}, {tiles[3]} stages; backward "
                             f"{tiles[4]}x{tiles[5]}, {tiles[7]} stages:  " + "   ".join(cells))  # fmt: skip
                print(lines[-1], flush=True)
    return lines


def compile_report(fn, constexprs: dict, num_warps: int, num_stages: int,
                   types: dict[str, str] | None = None) -> tuple[int, int]:  # fmt: skip
    """``(registers, spilled bytes)`` of ``fn`` compiled with ``constexprs`` (and ``types``, :func:`compile_kernel`)
    for sm_90a."""
    kernel = compile_kernel(fn, constexprs, num_warps, num_stages, types=types)
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
    parser.add_argument("--shared", action="store_true", help="the read-out's shared memory per GPU instead")
    args = parser.parse_args()
    if args.shared:
        shared_report()
        return
    print(f"triton {triton.__version__}, sm_90a; registers / spilled bytes per thread")
    for text in args.tiles or TILE_SWEEP:
        given = parse_triton_tiles(text)
        forward = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}
        forward.update({k: v for k, v in given.items() if not k.startswith("bwd_")})
        backward = {**forward, **{k.removeprefix("bwd_"): v for k, v in given.items() if k.startswith("bwd_")}}
        cells = []
        for backward, tiles in ((False, forward), (True, backward)):
            for name, kernel, constexprs in readout_kernels(backward, 2, 64, tiles["block_m"], tiles["block_n"], 64,
                                                            "tf32")[:2]:  # fmt: skip
                report = compile_report(kernel, constexprs, tiles["num_warps"], tiles["num_stages"])
                cells.append("%s %d / %d" % (name, *report))
        print(f"{text or 'default tiles'}:  " + "   ".join(cells), flush=True)
    if args.tiles:
        return
    for n in (16, 64, 128):  # the presets' state, and converted Mamba-2 checkpoints'
        chunk, warps, bwd_block_p = kernel_tiles(n)
        tf32 = {"PRECISION": "tf32"}
        kernels = ((_ssd_fwd_own_kernel, 32, tf32), (_ssd_fwd_states_kernel, 32, {"HAS_H0": True}),
                   (_ssd_fwd_output_kernel, 32, tf32), (_ssd_bwd_states_kernel, bwd_block_p, tf32),
                   (_ssd_bwd_chunk_kernel, bwd_block_p, tf32))  # fmt: skip
        cells = []
        for kernel, block_p, extra in kernels:  # the forward's 32 head dims a program: ssd_scan_triton's default
            report = compile_report(kernel, dict(BLOCK_Q=chunk, BLOCK_N=n, BLOCK_P=block_p, **extra), warps, 3)
            cells.append("%s %d / %d" % (kernel.__name__.removeprefix("_ssd_").removesuffix("_kernel"), *report))
        print(f"SSD, state {n} ({chunk}-step chunks, {warps} warps): " + "   ".join(cells), flush=True)
    for block_e in (16, 32, 64):
        warps = 1 if block_e * 16 <= 512 else 4  # as ops.triton.selective_scan launches them
        scan = dict(CHUNK=64, BLOCK_E=block_e, BLOCK_N=16)
        forward = compile_report(_selective_scan_fwd_kernel, dict(HAS_H0=True, STORE_STATES=True, **scan), warps, 3)
        backward = compile_report(_selective_scan_bwd_kernel, scan, warps, 3)
        print(f"selective scan, {block_e} channels a program: forward %d / %d   backward %d / %d"
              % (*forward, *backward), flush=True)  # fmt: skip
    cells = []
    for kernel, types, constexprs in STEP_KERNELS:
        name = kernel.__name__.strip("_").removesuffix("_kernel")
        cells.append("%s %d / %d" % (name, *compile_report(kernel, constexprs, 4, 1, types)))
    print("decoding steps: " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
