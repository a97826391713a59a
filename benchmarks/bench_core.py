"""Core-layer benchmarks on CPU (fp32): Mamba-1 layer speed, B'MOJO layer scaling in L, decode cost vs context.

    python benchmarks/bench_core.py                # all three, 2 threads, writes benchmarks/core_results.json
    python benchmarks/bench_core.py --only mamba   # one of: mamba, scaling, decode

Each measurement: warm-up, then the median of ``--repeats`` runs. Peak memory of the B'MOJO layer is
the process's peak RSS after one forward+backward minus its RSS just before, measured in a fresh subprocess per
length so earlier runs do not hide it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

import bmojo.layers.ssm as ssm_module
from bmojo.layers import BMojoMixer, Mamba, MixerState
from bmojo.ops.selective_scan import selective_scan, selective_scan_ref


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, call=None):
    def run():
        layer.zero_grad(set_to_none=True)
        y = call(layer, x) if call else layer(x)
        y = y[0] if isinstance(y, tuple) else y
        y.float().pow(2).mean().backward()

    return run


def bench_mamba(repeats: int, length: int = 2048, d: int = 256, n: int = 16) -> list[dict]:
    """Mamba-1 layer fwd+bwd: bmojo chunked scan vs the sequential reference, HF MambaMixer, mambapy."""
    torch.manual_seed(0)
    x = torch.randn(1, length, d)
    rows = []
    ours = Mamba(d, state_size=n)
    rows.append({"impl": "bmojo Mamba (chunked scan)", "s": median_time(fwd_bwd(ours, x), repeats)})
    ssm_module.selective_scan = lambda u, dt, a, b, c, initial_state=None: selective_scan_ref(u, dt, a, b, c, initial_state)
    try:
        rows.append({"impl": "bmojo Mamba (sequential reference scan)", "s": median_time(fwd_bwd(ours, x), 1, 0)})
    finally:
        ssm_module.selective_scan = selective_scan
    try:
        from transformers import MambaConfig
        from transformers.models.mamba.modeling_mamba import MambaMixer

        cfg = MambaConfig(hidden_size=d, state_size=n, intermediate_size=2 * d, use_mambapy=False)
        hf = MambaMixer(cfg, layer_idx=0)
        rows.append({"impl": "transformers MambaMixer (torch path)", "s": median_time(fwd_bwd(hf, x), repeats)})
        cfg = MambaConfig(hidden_size=d, state_size=n, intermediate_size=2 * d, use_mambapy=True)
        hf = MambaMixer(cfg, layer_idx=0)
        rows.append({"impl": "transformers MambaMixer (use_mambapy)", "s": median_time(fwd_bwd(hf, x), repeats)})
    except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
        rows.append({"impl": f"transformers MambaMixer: unavailable ({type(e).__name__}: {e})", "s": None})
    try:
        from mambapy.mamba import MambaBlock
        from mambapy.mamba import MambaConfig as PyConfig

        block = MambaBlock(PyConfig(d_model=d, n_layers=1, d_state=n, pscan=True))
        rows.append({"impl": "mambapy MambaBlock (pscan)", "s": median_time(fwd_bwd(block, x), repeats)})
    except ImportError:
        rows.append({"impl": "mambapy: not installed (pip install mambapy)", "s": None})
    base = rows[0]["s"]
    for r in rows:
        r["vs_bmojo"] = None if r["s"] is None else r["s"] / base
    return rows


def scaling_layer() -> BMojoMixer:
    torch.manual_seed(0)
    return BMojoMixer(
        256, num_heads=4, ssm="mamba2", window=256, eidetic_size=64, ssm_kwargs=dict(state_size=64, head_dim=64)
    )


def scaling_point(length: int, repeats: int) -> dict:
    """Time and peak-RSS growth of one B'MOJO layer fwd+bwd at ``length`` (run in its own process)."""
    layer = scaling_layer()
    x = torch.randn(1, length, 256)
    run = fwd_bwd(layer, x)
    before_kib = _current_rss_kib()
    run()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib
    return {"L": length, "s": median_time(run, repeats, warmup=0), "peak_rss_growth_mib": peak_kib / 1024}


def _current_rss_kib() -> int:
    """Resident set size of this process now (Linux), in KiB; ``ru_maxrss`` is the peak in the same unit."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def bench_scaling(repeats: int, lengths=(2048, 16384)) -> list[dict]:
    rows = []
    for n in lengths:
        code = (
            "import json,sys,torch; torch.set_num_threads(%d); sys.path.insert(0, %r); import bench_core as b; "
            "print(json.dumps(b.scaling_point(%d, %d)))" % (torch.get_num_threads(), str(Path(__file__).parent), n, repeats)
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in rows:
        r["time_ratio"] = r["s"] / rows[0]["s"]
        r["mem_ratio"] = r["peak_rss_growth_mib"] / rows[0]["peak_rss_growth_mib"]
    return rows


def bench_decode(steps: int, contexts=(1024, 16384)) -> list[dict]:
    """Per-token time of recurrent decoding after a prefill of ``context`` tokens, and the state size."""
    layer = scaling_layer().eval()
    rows = []
    for n in contexts:
        torch.manual_seed(1)
        state = MixerState()
        with torch.no_grad():
            layer(torch.randn(1, n, 256), state)
            tokens = torch.randn(steps + 10, 1, 1, 256)
            for t in range(10):
                layer(tokens[t], state)
            times = []
            for t in range(10, steps + 10):
                t0 = time.perf_counter()
                layer(tokens[t], state)
                times.append(time.perf_counter() - t0)
        rows.append({"context": n, "ms_per_token": 1e3 * statistics.median(times), "state_bytes": state.nbytes()})
    for r in rows:
        r["ratio"] = r["ms_per_token"] / rows[0]["ms_per_token"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["mamba", "scaling", "decode"])
    ap.add_argument("--out", default=str(Path(__file__).with_name("core_results.json")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
                     "torch": torch.__version__, "date": date.today().isoformat()}  # fmt: skip
    if args.only in (None, "mamba"):
        results["mamba"] = bench_mamba(args.repeats)
        print("\nMamba-1 layer fwd+bwd, B=1 L=2048 D=256 N=16 fp32")
        for r in results["mamba"]:
            s = "n/a" if r["s"] is None else f"{1e3 * r['s']:9.1f} ms  {r['vs_bmojo']:6.2f}x bmojo"
            print(f"  {r['impl']:45s} {s}")
    if args.only in (None, "scaling"):
        results["scaling"] = bench_scaling(args.repeats)
        print("\nB'MOJO layer fwd+bwd (D=256, w=256, k=64, Mamba-2 N=64)")
        for r in results["scaling"]:
            print(f"  L={r['L']:6d} {1e3 * r['s']:9.1f} ms ({r['time_ratio']:.2f}x)  peak RSS +{r['peak_rss_growth_mib']:.0f} MiB ({r['mem_ratio']:.2f}x)")
    if args.only in (None, "decode"):
        results["decode"] = bench_decode(200)
        print("\nB'MOJO layer recurrent decoding")
        for r in results["decode"]:
            print(f"  context {r['context']:6d}: {r['ms_per_token']:.3f} ms/token ({r['ratio']:.2f}x), state {r['state_bytes']} bytes")
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
