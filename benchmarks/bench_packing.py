"""Training step time of sequences of mixed lengths packed into one row (padding-free, as Hugging Face's
``DataCollatorWithFlattening`` passes them) and padded on the right (``attention_mask``), both of which the model
runs in groups of similar lengths, against the whole padded batch through the layers at once (what padding cost
before the groups; timed as the same rows without a mask: every row at the longest length), in one process,
alternated.

    python benchmarks/bench_packing.py --preset bmojo --size tiny --sequences 16 --shortest 32 --longest 1024
"""

import argparse
import statistics
import time

import torch

from bmojo import BMojoConfig, BMojoForCausalLM
from bmojo.malloc import keep_freed_memory
from bmojo.models.packing import PackedSequences
from bmojo.train import parse_overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bmojo")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--shortest", type=int, default=32)
    parser.add_argument("--longest", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="config field NAME=VALUE (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as bmojo's commands do (bmojo.malloc)
    gen = torch.Generator().manual_seed(args.seed)
    model = BMojoForCausalLM(
        BMojoConfig.from_preset(args.preset, args.size, **parse_overrides(args.set, nested=False))
    ).train()
    vocab = model.config.vocab_size
    lengths = torch.randint(args.shortest, args.longest + 1, (args.sequences,), generator=gen).tolist()
    seqs = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    flat = torch.cat(seqs)[None]
    ids = torch.stack([torch.cat([s, s.new_zeros(width - len(s))]) for s in seqs])
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    batches = {
        "one batch": {"input_ids": ids, "labels": ids},
        "padded": {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)},
        "packed": {"input_ids": flat, "labels": flat,
                   "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]},
    }  # fmt: skip

    def step(batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = {name: [] for name in batches}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, batch in batches.items():
            times[name].append(step(batch))
    ms = {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}
    tokens = sum(lengths)
    print(f"{args.preset} {args.size}: {args.sequences} sequences of {args.shortest}-{args.longest} tokens "
          f"({tokens} tokens, padded to {args.sequences} x {width} = {args.sequences * width}), "
          f"{args.threads} threads, medians of {args.repeats}")  # fmt: skip
    groups = PackedSequences.find(dict(batches["packed"]), flat).groups
    print(f"  groups: {' + '.join(f'{g.n} x {g.width}' for g in groups)} = {sum(g.n * g.width for g in groups)} "
          f"tokens with the padding")  # fmt: skip
    for name in ms:
        print(f"  {name}: {ms[name]:.1f} ms a step, {tokens / ms[name] * 1e3:,.0f} tokens/s, "
              f"{ms['one batch'] / ms[name]:.2f}x one batch's speed")  # fmt: skip


if __name__ == "__main__":
    main()
