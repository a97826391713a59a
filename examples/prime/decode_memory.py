"""Decode memory of saved models: bytes of the generation cache after a prefill of N tokens, then one decode step.

From the repository root:

    OMP_NUM_THREADS=1 python examples/prime/decode_memory.py 1024,16384 runs/prime/transformer/final runs/prime/primed

prints a markdown table of cache bytes per model and context length (float32, batch 1).
"""

from __future__ import annotations

import sys

import torch

from bmojo.models import BMojoForCausalLM


@torch.no_grad()
def cache_bytes(model: BMojoForCausalLM, length: int) -> int:
    """Bytes of ``model``'s cache after ``length`` prompt tokens and one generated token (batch 1)."""
    ids = torch.randint(0, model.config.vocab_size, (1, length + 1), generator=torch.Generator().manual_seed(0))
    out = model(ids[:, :length], use_cache=True, logits_to_keep=1)
    out = model(ids[:, length:], cache=out.cache)
    return out.cache.nbytes()


def main(lengths: str, *folders: str) -> None:
    ns = [int(x) for x in lengths.split(",")]
    print("| model | layers | " + " | ".join(f"cache @ {n:,} tokens" for n in ns) + " |")
    print("|---|---|" + "---:|" * len(ns))
    for folder in folders:
        model = BMojoForCausalLM.from_pretrained(folder).eval()
        sizes = [cache_bytes(model, n) for n in ns]
        kinds = ", ".join(model.config.layer_pattern)
        print(f"| {folder} | {kinds} | " + " | ".join(f"{s / 2**20:.2f} MiB" for s in sizes) + " |", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
