"""The Mamba-2 SSD at the 130m preset's training shapes on CUDA: every path ``ssd_scan`` can take, timed alike.

    python benchmarks/bench_ssd.py                 # B=8, L=2048, 24 heads of 64, state 16, one B/C group, bf16
    python benchmarks/bench_ssd.py --dtype float32
    python benchmarks/bench_ssd.py --state 128          # a converted Mamba-2 checkpoint's state (fla's domain)
    python benchmarks/bench_ssd.py --chunks 16,64          # our kernels at other chunk sizes too
    python benchmarks/bench_ssd.py --block-p 16,64 --bwd-block-p 32,64   # and other head dims per program

Rows: the PyTorch chunked SSD eager (``BMOJO_KERNELS=reference``) and through ``torch.compile``, our Triton kernels
(``ops.triton.ssd``; with each of ``--chunks`` too, e.g. ``--chunks 16,64``, and of ``--block-p`` and ``--bwd-block-p``,
head dimensions per forward and backward program, the latter at each chunk size), and flash-linear-attention's
``chunk_simple_gla`` when ``fla`` is installed (its backward only where ``fla_backward_supported``). Each row: forward
without gradients, and forward + backward (gradients of every input), medians of ``--repeats`` runs after warm-up;
on CUDA also the device time and kernel count of one forward + backward (or forward). On a CPU it runs the PyTorch
rows on tiny shapes, to check the script (the Triton kernels run on CPU only under ``TRITON_INTERPRET=1``, in
``tests/ops/test_triton.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

import bmojo.ops.triton as kernels
from bmojo.bench import device_column, median_ms
from bmojo.ops.ssd import fla_available, fla_backward_supported, ssd_scan, ssd_scan_fla


def reference(*inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ssd_scan`` on its PyTorch path."""
    before = kernels.kernels()
    kernels.set_kernels("reference")
    try:
        return ssd_scan(*inputs[:5], initial_state=inputs[5])
    finally:
        kernels.set_kernels(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--state", type=int, default=16, help="state size N on CUDA (converted Mamba-2: 128)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--chunks", default="", help="comma-separated chunk sizes of our kernels to time as well")
    parser.add_argument("--block-p", default="", help="comma-separated head dims per forward program to time as well")
    parser.add_argument(
        "--bwd-block-p", default="", help="the same for the backward's programs (its own: kernel_tiles)"
    )
    args = parser.parse_args()
    chunks, block_ps, bwd_block_ps = (_sizes(listed) for listed in (args.chunks, args.block_p, args.bwd_block_p))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    b, length, h, p, n = (8, 2048, 24, 64, args.state) if cuda else (1, 256, 4, 16, 8)
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    torch.manual_seed(0)
    x = torch.randn(b, length, h, p, device=dev, dtype=dtype)
    dt = F.softplus(torch.randn(b, length, h, device=dev) - 1).to(dtype)
    a = -torch.rand(h, device=dev) * 2 - 0.1
    bc = [torch.randn(b, length, 1, n, device=dev, dtype=dtype) for _ in range(2)]
    inputs = [x, dt, a, *bc, torch.zeros(b, h, p, n, device=dev)]
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}; B={b} L={length} H={h} "
          f"P={p} N={n}, {dtype}")  # fmt: skip
    # name, scan, whether to time its backward, attributes of ops.triton.ssd to set while timing it
    rows: list[tuple[str, Callable, bool, dict[str, Any]]] = [
        ("PyTorch chunked SSD, eager", reference, True, {}),
        ("PyTorch chunked SSD, torch.compile", torch.compile(reference, dynamic=False), True, {}),
    ]
    if cuda:
        import bmojo.ops.triton.ssd as ours

        rows.append(("our Triton kernels (ops.triton.ssd)", ours.ssd_scan_triton, True, {}))
        for chunk in chunks:
            rows.append((f"ours, {chunk}-step chunks", functools.partial(ours.ssd_scan_triton, chunk_size=chunk), True,
                         {}))  # fmt: skip
        for block in block_ps:
            rows.append((f"ours, forward programs of {block} head dims",
                         functools.partial(ours.ssd_scan_triton, block_p=block), True, {}))  # fmt: skip
        for block, chunk in ((block, chunk) for block in bwd_block_ps for chunk in [None, *chunks]):
            tiles = functools.partial(lambda n, block, own=ours.kernel_tiles: (*own(n)[:2], block), block=block)
            rows.append((f"ours, backward programs of {block} head dims" + (f", {chunk}-step chunks" if chunk else ""),
                         functools.partial(ours.ssd_scan_triton, chunk_size=chunk), True,
                         {"kernel_tiles": tiles}))  # fmt: skip
        if fla_available():
            rows.append(("fla chunk_simple_gla", ssd_scan_fla, fla_backward_supported(dev), {}))
    for name, scan, backward, settings in rows:

        def forward(scan: Callable = scan) -> None:
            with torch.no_grad():
                scan(*inputs)

        def both(scan: Callable = scan) -> None:
            leaves = [t.detach().requires_grad_() for t in inputs]
            y, state = scan(*leaves)
            torch.autograd.grad(y.float().sum() + state.sum(), leaves)

        with mock.patch.multiple("bmojo.ops.triton.ssd", **settings) if settings else contextlib.nullcontext():
            both_ms = f"{median_ms(both, dev, args.repeats):9.3f}" if backward else "        -"
            print(f"{name:44s} forward {median_ms(forward, dev, args.repeats):9.3f} ms   forward+backward {both_ms} "
                  f"ms{device_column(both if backward else forward)}", flush=True)  # fmt: skip


def _sizes(listed: str) -> list[int]:
    """``"16,64"`` -> ``[16, 64]``: powers of two, 16 or more (the tiles ``tl.dot`` takes)."""
    sizes = [int(size) for size in listed.split(",") if size]
    if any(size < 16 or size & (size - 1) for size in sizes):
        raise SystemExit(f"sizes must be powers of two >= 16, got {listed}")
    return sizes


if __name__ == "__main__":
    main()
