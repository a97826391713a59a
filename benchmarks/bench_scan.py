"""Scan-kernel benchmarks on CPU (fp32): chunked scans against their sequential references.

    python benchmarks/bench_scan.py                      # both, 2 threads, batch 1, L=2048
    python benchmarks/bench_scan.py --only mamba --chunk-size 32
    python benchmarks/bench_scan.py --dt large --flush-denormal

Mamba-1: ``selective_scan`` vs ``selective_scan_ref`` at E=512 (D=256, expand 2), N=16, ``A = -(1..N)``.
Mamba-2: ``ssd_scan`` vs ``ssd_scan_ref`` at H=8, P=64, N=64, G=1, ``A`` uniform in ``[-16, -1]``.
Time steps: ``--dt init`` (default) as the layers make them at initialisation, ``softplus(bias + noise)``
with ``softplus(bias)`` log-uniform in ``[1e-3, 1e-1]`` per channel; ``--dt large`` is
``softplus(randn) / 2``, so fast channels decay by ``e^-87`` within a chunk and gradients inside a
chunk pass through subnormal floats, which x86 CPUs process slowly (``--flush-denormal`` avoids it).

Each row: warm-up, then the median of ``--repeats`` runs of forward (no grad) and of forward+backward
(gradients w.r.t. every input), the chunked scan and its reference alternating run by run. The load
average is printed: other processes on the same cores slow the references' many small steps most.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bmojo.ops.selective_scan import _default_chunk_size, selective_scan, selective_scan_ref
from bmojo.ops.ssd import ssd_scan, ssd_scan_ref


def median_ms(fns: list[Callable[[], None]], repeats: int, warmup: int = 1) -> list[float]:
    """Median ms of each of ``fns``, run in turn every repeat so that changes in load hit all of them alike."""
    for fn in fns * warmup:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(ts) for ts in times]


def time_scans(scans: list[Callable], inputs: list[torch.Tensor], repeats: int) -> list[tuple[float, float]]:
    """For each scan, median ms of ``scan(*inputs)`` without grad and of forward+backward."""

    def forward(scan: Callable) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                scan(*inputs)

        return run

    def forward_backward(scan: Callable) -> Callable[[], None]:
        def run() -> None:
            leaves = [t.detach().requires_grad_(True) for t in inputs]
            y, state = scan(*leaves)
            (y.square().sum() + state.square().sum()).backward()

        return run

    fwd = median_ms([forward(s) for s in scans], repeats)
    both = median_ms([forward_backward(s) for s in scans], repeats)
    return list(zip(fwd, both))


def time_steps(kind: str, length: int, channels: int) -> torch.Tensor:
    """Positive time steps ``[1, length, channels]`` (see ``--dt``)."""
    if kind == "large":
        return F.softplus(torch.randn(1, length, channels)) * 0.5
    dt0 = torch.exp(torch.empty(channels).uniform_(math.log(1e-3), math.log(1e-1)))
    return F.softplus(torch.log(torch.expm1(dt0)) + 0.5 * torch.randn(1, length, channels))


def mamba_inputs(length: int, dt: str, e: int = 512, n: int = 16) -> list[torch.Tensor]:
    """``(u, delta, A, B, C)`` with the S4D-real ``A = -(1..N)`` of Mamba-1."""
    torch.manual_seed(0)
    a = -torch.arange(1, n + 1, dtype=torch.float32).expand(e, n).contiguous()
    u, b, c = torch.randn(1, length, e), torch.randn(1, length, n), torch.randn(1, length, n)
    return [u, time_steps(dt, length, e), a, b, c]


def ssd_inputs(length: int, dt: str, h: int = 8, p: int = 64, n: int = 64, g: int = 1) -> list[torch.Tensor]:
    """``(x, dt, A, B, C)`` with ``A`` uniform in ``[-16, -1]`` as in Mamba-2."""
    torch.manual_seed(0)
    a = -torch.empty(h).uniform_(1, 16)
    x, b, c = torch.randn(1, length, h, p), torch.randn(1, length, g, n), torch.randn(1, length, g, n)
    return [x, time_steps(dt, length, h), a, b, c]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--chunk-size", type=int, help="selective_scan chunk length (default: its own choice)")
    ap.add_argument("--ssd-chunk-size", type=int, default=64)
    ap.add_argument("--dt", choices=["init", "large"], default="init")
    ap.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True) first")
    ap.add_argument("--only", choices=["mamba", "ssd"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(args.flush_denormal)
    length = args.length
    rows = []
    if args.only in (None, "mamba"):
        t = args.chunk_size or _default_chunk_size(length)
        inputs = mamba_inputs(length, args.dt)
        scans = [lambda *a: selective_scan(*a, chunk_size=t), selective_scan_ref]
        fast, ref = time_scans(scans, inputs, args.repeats)
        rows.append((f"Mamba-1 E=512 N=16: selective_scan (T={t})", fast, ref))
    if args.only in (None, "ssd"):
        q = args.ssd_chunk_size
        inputs = ssd_inputs(length, args.dt)
        fast, ref = time_scans([lambda *a: ssd_scan(*a, chunk_size=q), ssd_scan_ref], inputs, args.repeats)
        rows.append((f"Mamba-2 H=8 P=64 N=64 G=1: ssd_scan (Q={q})", fast, ref))

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    flush = ", denormals flushed" if args.flush_denormal else ""
    print(f"\nbatch 1, L={length}, fp32, dt {args.dt}{flush}, {args.threads} threads, torch {torch.__version__}")
    print(f"load average {load}")
    print(f"{'':46s} {'fwd ms':>8s} {'ref':>8s} {'speed-up':>8s}   {'fwd+bwd':>8s} {'ref':>8s} {'speed-up':>8s}")
    for name, (f_fwd, f_both), (r_fwd, r_both) in rows:
        print(
            f"{name:46s} {f_fwd:8.1f} {r_fwd:8.1f} {r_fwd / f_fwd:7.1f}x   {f_both:8.1f} {r_both:8.1f} {r_both / f_both:7.1f}x"
        )


if __name__ == "__main__":
    main()
