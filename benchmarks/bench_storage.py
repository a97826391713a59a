"""Long-term storage: recall far beyond the window, and decode latency with the store on vs off.

Task (MQAR-style, "far recall"): ``K`` key-value pairs, then ``gap`` filler tokens, then the ``K`` keys again; the
label at each repeated key is its value. Keys, values and filler come from disjoint thirds of the vocabulary.

1. Train a 2-layer B'MOJO (window ``w``, eidetic memory ``k``, store top-``r``, ``storage_write`` from ``--write``,
   default ``all``; RoPE on ``--rope-fraction`` of each head, default none, so that matching does not depend on
   distance) with the in-batch storage emulation at gaps of 0 to 8 windows; the weights are saved under
   ``--out``/model, and ``--load`` skips training.
2. Stream rows with a gap of ``--gap`` tokens (default 65,536) through the cached model, one token at a time after
   a short prefill, with the store on and, for the same weights, off; report answer accuracy, the store size, and
   per-token decode latency (p50/p99 over every step, and the mean over the first and last 1,000 steps).

Usage (about 30 minutes on one CPU core at the defaults; ``--gap 4096`` for a quicker run)::

    OMP_NUM_THREADS=1 python benchmarks/bench_storage.py --gap 65536 --out runs/bench_storage
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bmojo import BMojoCache, BMojoConfig, BMojoForCausalLM
from bmojo.optim import cosine_lr


def far_recall(
    n: int, pairs: int, gap: int, vocab: int, generator: torch.Generator, background: str = "random"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` long ``[n, 2 * pairs + gap + pairs]``; labels ``-100`` except at the repeated keys.

    The gap is random tokens from the top third of the vocabulary (``background="random"``) or token 0 (``"zero"``,
    the MQAR background of the demo)."""
    third = vocab // 3
    keys = 1 + torch.rand(n, third - 1, generator=generator).argsort(1)[:, :pairs]
    values = third + torch.rand(n, third, generator=generator).argsort(1)[:, :pairs]
    filler = 2 * third + torch.randint(vocab - 2 * third, (n, gap), generator=generator)
    if background == "zero":
        filler = torch.zeros_like(filler)
    order = torch.rand(n, pairs, generator=generator).argsort(1)
    context = torch.stack([keys, values], 2).flatten(1)
    inputs = torch.cat([context, filler, keys.gather(1, order)], 1)
    labels = torch.full_like(inputs, -100)
    labels[:, -pairs:] = values.gather(1, order)
    return inputs, labels


def build(args: argparse.Namespace, storage: bool) -> BMojoForCausalLM:
    config = BMojoConfig.from_preset(
        "bmojo", "tiny", vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, window_size=args.window, chunk_size=args.window, eidetic_size=args.eidetic, storage=storage,
        storage_topk=args.topk, storage_write=args.write, storage_in_batch=storage, use_rope=args.rope_fraction > 0,
        partial_rotary_factor=args.rope_fraction or 1.0,
        storage_approx_threshold=args.approx_threshold, storage_ef_search=args.ef_search,
        storage_async_retrieval=not args.sync_retrieval, storage_process=args.process,
    )  # fmt: skip
    return BMojoForCausalLM(config)


def train(args: argparse.Namespace) -> BMojoForCausalLM:
    """AdamW with warmup + cosine on fresh rows with in-batch storage emulation. Gaps are uniform in ``[0, 8w]``:
    at short gaps the pairs are in the window, where plain attention learns the association; at long gaps only the
    store holds them, searched with the same query/key projections."""
    torch.manual_seed(args.seed)
    model = build(args, storage=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.steps, 50))
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        gap = int(torch.randint(0, 8 * args.window + 1, (1,), generator=gen))
        x, y = far_recall(args.batch, args.pairs, gap, args.vocab, gen, args.background)
        out = model(x, use_cache=False)
        loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        loss = loss + model.config.innovation_loss_weight * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps:
            acc = (out.logits.argmax(-1)[y != -100] == y[y != -100]).float().mean().item()
            print(f"step {step:5d}  loss {loss.item():.3f}  batch accuracy {acc:.3f}  {time.perf_counter() - t0:.0f}s")
    return model.eval()


@torch.no_grad()
def stream(models: dict[str, BMojoForCausalLM], x: torch.Tensor, y: torch.Tensor, prefill: int) -> dict[str, dict]:
    """Prefill ``prefill`` tokens, then decode the rest one token at a time, the models taking turns at every token
    (so that they see the same machine load); accuracy at labelled positions and per-token latency of each."""
    caches = {
        n: m(x[:, :prefill], cache=BMojoCache(len(m.model.layers)), use_cache=True).cache for n, m in models.items()
    }
    answers_from = x.shape[1] - int((y[0] != -100).sum())
    preds: dict[str, list[torch.Tensor]] = {n: [] for n in models}
    times: dict[str, list[float]] = {n: [] for n in models}
    for t in range(prefill, x.shape[1]):
        for n, m in models.items():
            t0 = time.perf_counter()
            logits = m(x[:, t : t + 1], cache=caches[n], use_cache=True).logits
            times[n].append(time.perf_counter() - t0)
            if t >= answers_from:
                preds[n].append(logits[:, -1].argmax(-1))
    out = {}
    for n, m in models.items():
        ms = np.array(times[n]) * 1e3
        m.flush_storage()
        stores = m.vector_stores()
        out[n] = {
            "accuracy": (torch.stack(preds[n], 1) == y[:, answers_from:]).float().mean().item(),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "first_1000_mean_ms": float(ms[:1000].mean()),
            "last_1000_mean_ms": float(ms[-1000:].mean()),
            "mean_ms_by_position": {  # tokens [2^i, 2^(i+1)) of the stream: how time per token grows with the store
                f"{lo}-{min(2 * lo, len(ms)) - 1}": float(ms[lo : 2 * lo].mean())
                for lo in 2 ** np.arange(10, 20)
                if lo < len(ms)
            },
            "store_rows_per_sequence": sum(len(s) for s in stores.values()) / max(1, len(stores)) / x.shape[0],
            "state_bytes": caches[n].nbytes(),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gap", type=int, default=65536, help="filler tokens between the pairs and their queries")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--vocab", type=int, default=96)
    p.add_argument("--background", choices=("random", "zero"), default="random", help="what fills the gap")
    p.add_argument("--hidden", type=int, default=64, help="model width")
    p.add_argument("--layers", type=int, default=2, help="model depth")
    p.add_argument("--window", type=int, default=16)
    p.add_argument(
        "--rope-fraction",
        type=float,
        default=0.0,
        help="fraction of each head's dimensions rotated by RoPE (0: no RoPE; the rest stay position-free)",
    )
    p.add_argument("--eidetic", type=int, default=4)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--approx-threshold", type=int, default=4096, help="rows per sequence from which search is HNSW")
    p.add_argument("--ef-search", type=int, default=64, help="HNSW search breadth")
    p.add_argument("--write", choices=("all", "evicted"), default="all", help="which tokens the store receives")
    p.add_argument("--sync-retrieval", action="store_true", help="search inline in decoding steps, not on a thread")
    p.add_argument("--process", action="store_true", help="the stores' indexes in a helper process (storage_process)")
    p.add_argument("--steps", type=int, default=1200, help="training steps (0: latency of an untrained model)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/bench_storage"))
    p.add_argument("--load", type=Path, default=None, help="a model saved by an earlier run (skips training)")
    args = p.parse_args()

    if args.load is None:
        model = train(args)
        model.save_pretrained(args.out / "model")
    else:
        model = BMojoForCausalLM.from_pretrained(
            args.load,
            storage_approx_threshold=args.approx_threshold,
            storage_ef_search=args.ef_search,
            storage_async_retrieval=not args.sync_retrieval,
            storage_process=args.process,
            storage_write=args.write,
        ).eval()
    x, y = far_recall(
        args.eval_rows, args.pairs, args.gap, args.vocab, torch.Generator().manual_seed(args.seed + 1), args.background
    )
    plain = build(args, storage=False).eval()
    plain.load_state_dict(model.state_dict())
    prefill = 2 * args.pairs + args.window
    t0 = time.perf_counter()
    rows = stream({"store on": model, "store off": plain}, x, y, prefill)
    print(f"streamed {x.shape[1]} tokens x {x.shape[0]} rows in {time.perf_counter() - t0:.0f}s", json.dumps(rows))
    ratio = rows["store on"]["p99_ms"] / rows["store off"]["p99_ms"]
    print(
        f"\nfar recall, {args.pairs} pairs, gap {args.gap} tokens, window {args.window}, eidetic {args.eidetic}, "
        f"top-{args.topk}, batch {args.eval_rows}"
    )
    print("| store | accuracy | p50 ms/token | p99 ms/token | first 1K mean | last 1K mean | rows/sequence/layer |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['accuracy']:.3f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['first_1000_mean_ms']:.2f} "
            f"| {r['last_1000_mean_ms']:.2f} | {r['store_rows_per_sequence']:.0f} |"
        )
    print(f"p99 on / off: {ratio:.2f}x (target <= 1.3x)")
    for name, r in rows.items():
        print(
            f"{name}, mean ms/token by stream position:",
            ", ".join(f"{k}: {v:.2f}" for k, v in r["mean_ms_by_position"].items()),
        )
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "results.json").write_text(json.dumps({"args": meta, "results": rows, "p99_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
