"""Where a compiled decoding step's time goes: wall time per token, device-busy time and kernels launched per token.

    python benchmarks/decode_profile.py                      # CUDA: 130m, 32K context, batch 1, bf16, CUDA graphs
    python benchmarks/decode_profile.py --batch 8 --mode default

For B'MOJO and the equal-size Transformer (``bench.matched_transformer``), each with bfloat16 weights on CUDA
(float32 on CPU): a prefill of ``--length`` tokens, room reserved and the cache's addresses marked static, the model
through ``torch.compile(mode=--mode)``, warm-up steps, then ``--steps`` timed steps (median of 3 runs), then a
profile of ``--steps`` steps counting the device kernels (CUDA) and their total time per token. At batch 1 a step
with many small kernels is bound by their count (a few microseconds each even replayed from a CUDA graph) rather
than by the bytes it reads; the Transformer reads its whole KV cache every token. On a CPU it runs tiny shapes to
check the script (no kernel counts).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bmojo import BMojoConfig, BMojoForCausalLM
from bmojo.bench import matched_transformer


def measure(model: BMojoForCausalLM, ids: torch.Tensor, steps: int, mode: str) -> dict[str, float]:
    """Per-token wall ms (median of 3 runs of ``steps``), and device-busy ms and kernels per token (CUDA)."""
    cuda = ids.is_cuda
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, token = out.cache, out.logits.argmax(-1)
        cache.reserve(steps * 8)
        cache.mark_static_addresses()
        step = torch.compile(model, mode=mode)

        def run() -> float:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(token, past_key_values=cache, use_cache=True)
            if cuda:
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / steps * 1e3

        for _ in range(2):
            run()
        result = {"wall_ms": statistics.median(run() for _ in range(3))}
        if cuda:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            result["kernels"] = len(kernels) / steps
            result["device_ms"] = sum(e.device_time for e in kernels) / 1e3 / steps
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="130m")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dev, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    size, length = (args.size, args.length) if cuda else ("tiny", 256)
    overrides = {"window_size": 512, "chunk_size": 512} if cuda else {}
    bmojo = BMojoConfig.from_preset("bmojo", size, **overrides)
    configs = {"transformer": matched_transformer(bmojo, size, overrides), "bmojo": bmojo}
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}; {size}, context {length}, "
          f"batch {args.batch}, {args.steps} steps, torch.compile mode {args.mode}")  # fmt: skip
    for name, config in configs.items():
        torch.manual_seed(0)
        model = BMojoForCausalLM(config).to(dev, dtype).eval()
        ids = torch.randint(0, config.vocab_size, (args.batch, length), device=dev)
        r = measure(model, ids, args.steps, args.mode)
        extra = f"  device busy {r['device_ms']:.3f} ms  kernels {r['kernels']:.0f}" if cuda else ""
        print(f"{name:12s} {r['wall_ms']:8.3f} ms/token  {args.batch / r['wall_ms'] * 1e3:9.1f} tokens/s{extra}",
              flush=True)  # fmt: skip
        del model
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
