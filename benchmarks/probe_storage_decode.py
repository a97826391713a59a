"""Where decode latency with a store goes: an in-process probe of the 512-wide model of ``bench_storage.py``.

Two copies of one untrained model, store on and off, decode a random stream in turns (so that both see the same
machine load); every step's time is kept. Printed: p50 and p99 of each and their ratios, the chunk-end steps (which
hand rows to the store) against the rest, and the CPU time of each thread. ``--search`` swaps the faiss search for a
stub that only waits ``--stub-us`` where the search would run (on the retrieval thread, or inline with
``--sync-retrieval``), to tell the cost of handing the search over from the cost of the search itself. ``--process``
keeps the indexes in the helper process (``StorageConfig(process=True)``, real search only).

    OMP_NUM_THREADS=1 python benchmarks/probe_storage_decode.py --tokens 4000 --search stub
    OMP_NUM_THREADS=1 python benchmarks/probe_storage_decode.py --tokens 4000 --process
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_storage  # noqa: E402

from bmojo.layers.storage_index import Index  # noqa: E402
from bmojo.models.cache import BMojoCache  # noqa: E402


def install_stub(wait_us: float) -> None:
    """Replace the index's search by a stub that sleeps ``wait_us`` and returns fixed arrays of the right shapes."""
    answers: dict[tuple, tuple[np.ndarray, ...]] = {}

    def found(self, seq_ids, qn, r):
        if wait_us:
            time.sleep(wait_us * 1e-6)
        key = (id(self), qn.shape, r)
        if key not in answers:
            shape = (*qn.shape[:3], r)
            kv = np.random.default_rng(0).standard_normal((2, *shape, qn.shape[3]), dtype=np.float32)
            answers[key] = (kv[0], kv[1], np.ones(shape, bool))
        return answers[key]

    Index.found = found


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each live thread of this process, by thread name (Linux)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        name = names.get(int(tid), f"thread {tid}")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=6000, help="stream length (the first 1,000 steps are not counted)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--approx-threshold", type=int, default=2048, help="rows per sequence from which search is HNSW")
    p.add_argument("--ef-search", type=int, default=64)
    p.add_argument("--search", choices=("faiss", "stub"), default="faiss")
    p.add_argument("--stub-us", type=float, default=250.0, help="how long a stub search takes")
    p.add_argument("--sync-retrieval", action="store_true", help="search inline in decoding steps, not on a thread")
    p.add_argument("--process", action="store_true", help="the real search, with the index in a helper process")
    p.add_argument("--out", type=Path, default=None, help="a .npz file for the per-step times")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.search == "stub":
        if args.process:
            p.error("--search stub runs in this process: not with --process")
        install_stub(args.stub_us)
    build = argparse.Namespace(
        vocab=96, hidden=args.hidden, layers=args.layers, window=16, eidetic=4, topk=8, write="all", rope_fraction=0.0,
        approx_threshold=args.approx_threshold, ef_search=args.ef_search, sync_retrieval=args.sync_retrieval,
        process=args.process,
    )  # fmt: skip
    models = {}
    for on in (True, False):
        torch.manual_seed(0)
        models[on] = bench_storage.build(build, on).eval()
    models[False].load_state_dict(models[True].state_dict())
    ids = torch.randint(0, build.vocab, (1, args.tokens))
    prefill = 2 * build.window + 4
    times: dict[bool, list[float]] = {True: [], False: []}
    with torch.no_grad():
        caches = {
            on: m(ids[:, :prefill], cache=BMojoCache(args.layers), use_cache=True).cache for on, m in models.items()
        }
        cpu0 = thread_cpu()
        for t in range(prefill, args.tokens):
            for on, m in models.items():
                t0 = time.perf_counter()
                m(ids[:, t : t + 1], cache=caches[on], use_cache=True)
                times[on].append(time.perf_counter() - t0)
    cpu = {k: round(v - cpu0.get(k, 0.0), 1) for k, v in thread_cpu().items()}
    on, off = (np.array(times[x][1000:]) * 1e3 for x in (True, False))
    chunk_end = (np.arange(len(on)) + prefill + 1000 + 1) % build.window == 0

    def ratio(q: float, rows: np.ndarray) -> float:
        return float(np.percentile(on[rows], q) / np.percentile(off[rows], q))

    every = np.ones(len(on), bool)
    summary = {
        "search": args.search
        + (" inline" if args.sync_retrieval else " in the helper process" if args.process else ""),
        "p50_ms_on_off": [float(np.percentile(on, 50)), float(np.percentile(off, 50))],
        "p99_ms_on_off": [float(np.percentile(on, 99)), float(np.percentile(off, 99))],
        "p50_ratio": ratio(50, every),
        "p99_ratio": ratio(99, every),
        "p99_ratio_without_chunk_ends": ratio(99, ~chunk_end),
        "chunk_end_excess_ms": float(np.median((on - off)[chunk_end])),
        "other_excess_ms": float(np.median((on - off)[~chunk_end])),
        "thread_cpu_s": cpu,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        np.savez(args.out, on=on, off=off)


if __name__ == "__main__":
    main()
