"""Hugging Face ``generate`` tokens per second, eager against a static cache with compiled steps, for B'MOJO and the
equal-size Transformer (``bench.matched_transformer``), in one process.

    python benchmarks/generate_speed.py                                  # CPU: the tiny preset, 1K prompt, 2 threads
    python benchmarks/generate_speed.py --length 16384 --set hidden_size=256 ...   # the bench model (RESULTS.md)
    python benchmarks/generate_speed.py --length 32768 --size 130m       # CUDA (bf16): compiled steps as CUDA graphs

For each model and way, under ``torch.inference_mode``: greedy ``generate`` of ``--new-tokens`` tokens after a random
prompt of ``--length`` and of one token after it, each the median of ``--repeats`` runs after a warm-up (which
compiles); the decoding rate is ``new_tokens - 1`` over the difference, so the prefill (eager in both ways) drops
out. ``static`` is ``cache_implementation="static"`` with ``modeling.compile_steps_config``: CUDA graphs on CUDA,
inductor's default mode elsewhere.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bmojo import BMojoConfig, BMojoForCausalLM
from bmojo.bench import matched_transformer
from bmojo.malloc import keep_freed_memory
from bmojo.models.modeling import compile_steps_config
from bmojo.train import parse_overrides


def generate_seconds(model: BMojoForCausalLM, ids: torch.Tensor, new_tokens: int, repeats: int, **kwargs) -> float:
    """Median wall time of ``model.generate(ids, max_new_tokens=new_tokens, ...)`` over ``repeats`` runs after one."""
    times = []
    for i in range(repeats + 1):
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0, **kwargs)  # fmt: skip
        if ids.is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--set", action="append", default=[], help="B'MOJO config field NAME=VALUE (repeatable)")
    parser.add_argument("--length", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=257)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    dev, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    overrides = parse_overrides(args.set, nested=False)
    config = BMojoConfig.from_preset("bmojo", args.size, **overrides)
    ways = {"eager": {}, "static": {"cache_implementation": "static", "compile_config": compile_steps_config(dev)}}
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, {args.threads} threads; "
          f"{args.size} {overrides}, prompt {args.length}, batch {args.batch}, "
          f"{args.new_tokens} new tokens")  # fmt: skip
    for name, cfg in (("transformer", matched_transformer(config, args.size, overrides)), ("bmojo", config)):
        torch.manual_seed(0)
        model = BMojoForCausalLM(cfg).to(dev, dtype).eval()
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.length), device=dev)
        rates = {}
        with torch.inference_mode():
            for way, kwargs in ways.items():
                full = generate_seconds(model, ids, args.new_tokens, args.repeats, **kwargs)
                first = generate_seconds(model, ids, 1, args.repeats, **kwargs)
                rates[way] = args.batch * (args.new_tokens - 1) / (full - first)
        print(f"{name:12s} " + "  ".join(f"{way} {rate:8.1f} tokens/s" for way, rate in rates.items()), flush=True)
        del model


if __name__ == "__main__":
    main()
