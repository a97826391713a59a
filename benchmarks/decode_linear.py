"""Decoding steps with the model's few-row products (``ops.linear.linear``: eager, split across the CPU threads;
compiled, a multiply and sum that inductor fuses) against plain ``F.linear``, in one process.

    python benchmarks/decode_linear.py                                  # 130m B'MOJO and Transformer, 1K context
    python benchmarks/decode_linear.py --size tiny --set hidden_size=256 ... --compile   # the bench model, compiled
    python benchmarks/decode_linear.py --batch 8
    python benchmarks/decode_linear.py --shapes 256x256,688x256,3072x768    # single products, split or not

For each preset (the Transformer matched to B'MOJO by ``bench.matched_transformer``): a prefill of ``--length`` tokens,
then decoding steps timed with each product in turn (the two alternated ``--pairs`` times, each a median of 5 runs of
``--steps`` steps; eager, or each through its own ``torch.compile`` graph with ``--compile``). Also the products alone:
every linear layer of the model applied once to ``--batch`` rows, as a step reads them. With ``--shapes``: single
products of each ``OUTxIN`` weight, ``F.linear`` against the split ``bmm`` forced whatever ``MIN_PIECE_BYTES`` says
(one piece a thread), over enough copies of the weight to fill ``--megabytes`` (as a step reads weights that do not
stay in cache): where the split starts to pay.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import bmojo.layers.linear
import bmojo.ops.linear
from bmojo import BMojoConfig, BMojoForCausalLM
from bmojo.bench import matched_transformer
from bmojo.ops.linear import linear
from bmojo.train import parse_overrides

PRODUCTS = {"ops.linear": linear, "F.linear": F.linear}


def ms_per_call(fn: Callable[[], object], calls: int) -> float:
    """Median over 5 runs of ``calls`` calls of ``fn``, in ms per call."""
    fn()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(runs)


def shape_table(shapes: list[tuple[int, int]], batch: int, megabytes: float) -> Table:
    """``F.linear`` against the split product (forced) for single ``(out, in)`` weights, in microseconds a call."""
    table = Table(title=f"one product of {batch} row(s), {torch.get_num_threads()} threads (us)")
    for column in ("weight", "copies", "F.linear", "split", "F.linear / split"):
        table.add_column(column)
    min_bytes, bmojo.ops.linear.MIN_PIECE_BYTES = bmojo.ops.linear.MIN_PIECE_BYTES, 1
    try:
        for out_features, in_features in shapes:
            copies = max(2, int(megabytes * 2**20 / (4 * out_features * in_features)))
            weights = [torch.randn(out_features, in_features) for _ in range(copies)]
            x = torch.randn(batch, 1, in_features)
            us = {label: 1e3 * ms_per_call(lambda p=product: [p(x, w) for w in weights], 20) / copies
                  for label, product in (("F.linear", F.linear), ("split", linear))}  # fmt: skip
            table.add_row(f"{out_features} x {in_features}", str(copies), f"{us['F.linear']:.1f}", f"{us['split']:.1f}",
                          f"{us['F.linear'] / us['split']:.2f}x")  # fmt: skip
    finally:
        bmojo.ops.linear.MIN_PIECE_BYTES = min_bytes
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="130m")
    parser.add_argument("--set", action="append", default=[], help="B'MOJO config field NAME=VALUE (repeatable)")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--shapes", help="time single products of these OUTxIN weights instead (comma-separated)")
    parser.add_argument("--megabytes", type=float, default=20.0, help="weights cycled through per shape (--shapes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.shapes:
        shapes = [tuple(int(n) for n in item.lower().split("x")) for item in args.shapes.split(",")]
        Console().print(shape_table(shapes, args.batch, args.megabytes))
        return
    overrides = parse_overrides(args.set, nested=False)
    config = BMojoConfig.from_preset("bmojo", size=args.size, **overrides)
    table = Table(title=f"decoding step, {args.threads} threads, batch {args.batch}, context {args.length}"
                        f"{', compiled' if args.compile else ', eager'} (ms)")  # fmt: skip
    for column in (
        "model",
        "products alone (eager): F.linear",
        "ops.linear",
        "step: F.linear",
        "ops.linear",
        "step ratio",
    ):
        table.add_column(column)
    for name, cfg in (("bmojo", config), ("transformer", matched_transformer(config, args.size, overrides))):
        torch.manual_seed(0)
        model = BMojoForCausalLM(cfg).eval()
        layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        rows = [torch.randn(args.batch, 1, m.in_features) for m in layers]
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.length))
        alone, step = {}, {}
        with torch.no_grad():
            for label, product in PRODUCTS.items():
                alone[label] = ms_per_call(lambda p=product: [p(x, m.weight) for x, m in zip(rows, layers)], 20)
            runners = {}
            for label, product in PRODUCTS.items():
                bmojo.layers.linear.linear = product
                out = model(ids, use_cache=True, logits_to_keep=1)
                token = out.logits.argmax(-1)
                if args.compile:
                    out.cache.reserve(args.steps * (5 * args.pairs + 8))
                    out.cache.mark_static_addresses()
                forward = torch.compile(model) if args.compile else model
                runners[label] = (forward, out.cache, token)
                for _ in range(3):  # compiles (a graph for the first position, one for the others)
                    forward(token, past_key_values=out.cache, use_cache=True)
            for _ in range(args.pairs):
                for label, (forward, cache, token) in runners.items():
                    bmojo.layers.linear.linear = PRODUCTS[label]
                    time_one = lambda f=forward, c=cache, t=token: f(t, past_key_values=c, use_cache=True)  # noqa: E731
                    step.setdefault(label, []).append(ms_per_call(time_one, args.steps))
        bmojo.layers.linear.linear = linear
        plain, ours = (statistics.median(step[label]) for label in ("F.linear", "ops.linear"))
        table.add_row(name, f"{alone['F.linear']:.2f}", f"{alone['ops.linear']:.2f}", f"{plain:.2f}", f"{ours:.2f}",
                      f"{plain / ours:.2f}x")  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
