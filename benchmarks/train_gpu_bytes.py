"""Bytes the fused kernels of a compiled training step move on a GPU, estimated on a CPU: B'MOJO against its
equal-size Transformer.

    python benchmarks/train_gpu_bytes.py                        # 130m, 2,048 tokens, batch 1, bf16 autocast
    python benchmarks/train_gpu_bytes.py --length 8192 --top 15

Inductor writes the forward and backward code of a compiled training step (bf16 autocast, our Triton kernels as on
CUDA) for a GPU (``decode_profile.gpu_codegen``), with its estimate of the bytes each Triton kernel reads and writes
(``benchmark_kernel``: ``kernel_num_gb``); nothing runs on a GPU. Those kernels, the elementwise and reduction work
between the matrix products, attention and our scan kernels (whose own bytes are not counted), are bound by memory
bandwidth on a GPU, so their bytes over the GPU's bandwidth bound their time from below. Each model is generated
with 1 and 2 layers: the difference is a layer's share, the rest the embedding, final norm, LM head and loss; the
full depth is their sum. ``--top N`` lists the N kernels of a layer that move the most.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from typing import Any

import torch
from decode_profile import gpu_codegen

from bmojo import BMojoConfig, BMojoForCausalLM
from bmojo.bench import matched_transformer
from bmojo.train import parse_overrides

KERNEL = re.compile(r"^(triton_\w+) = async_compile\.triton\(", re.M)
GB = re.compile(r"'kernel_num_gb': ([0-9.e+-]+)")


def kernel_bytes(codes: list[str]) -> dict[str, tuple[float, int]]:
    """``{kernel: (bytes a call, calls)}`` of inductor's Triton kernels over the graphs' generated ``codes`` (each
    graph's kernels prefixed with its index), counting the calls of the graph's ``call`` (not the per-kernel
    benchmark harnesses that ``benchmark_kernel`` adds, which launch with ``*args``)."""
    out: dict[str, tuple[float, int]] = {}
    for g, code in enumerate(codes):
        body = code[code.rindex("def call(") :]
        for match in KERNEL.finditer(code):
            name = match.group(1)
            gb = GB.search(code, match.end())
            calls = len(re.findall(rf"^\s+{name}\.run\((?!\*args)", body, re.M))
            out[f"{g}:{name}"] = (float(gb.group(1)) * 1e9 if gb else float("nan"), calls)
    return out


def step_bytes(config: BMojoConfig, length: int, batch: int) -> dict[str, tuple[float, int]]:
    """:func:`kernel_bytes` of one compiled training step of ``config`` on ``[batch, length]`` tokens."""
    torch.manual_seed(0)
    model = BMojoForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (batch, length))
    codes: list[str] = []
    with (
        gpu_codegen(codes, benchmark_kernel=True),
        torch.autocast("cpu", dtype=torch.bfloat16),
        contextlib.redirect_stdout(io.StringIO()),  # (inductor prints each module's path when benchmarking kernels)
    ):
        torch.compile(model)(ids, labels=ids, use_cache=False).loss.backward()
    return kernel_bytes(codes)


def total(kernels: dict[str, tuple[float, int]]) -> tuple[float, int]:
    """(bytes, kernel calls) of a step."""
    return sum(b * n for b, n in kernels.values() if b == b), sum(n for _, n in kernels.values())


def _kinds(kernels: dict[str, tuple[float, int]]) -> dict[tuple[str, float], int]:
    """Calls by (graph and kernel name without inductor's numbering, bytes a call)."""
    kinds: dict[tuple[str, float], int] = {}
    for name, (b, calls) in kernels.items():
        key = (re.sub(r"_\d+$", "", name), b)
        kinds[key] = kinds.get(key, 0) + calls
    return kinds


def split(config: BMojoConfig, length: int, batch: int) -> dict[str, Any]:
    """A layer's and the rest's (bytes, kernel calls), from ``config`` (one kind of layer) at 1 and 2 layers, and
    the layer's kernels, ``{(name, bytes a call): calls}`` (those the second layer adds calls of)."""
    if len(set(config.layer_pattern)) > 1:
        raise ValueError(f"one kind of layer needed, got {sorted(set(config.layer_pattern))}")

    def depth(n: int) -> BMojoConfig:
        fields = {**config.to_dict(), "num_hidden_layers": n, "layer_pattern": config.layer_pattern[:n]}
        return BMojoConfig.from_dict(fields)

    one, two = (step_bytes(depth(n), length, batch) for n in (1, 2))
    (b1, k1), (b2, k2) = total(one), total(two)
    kinds1, kinds2 = _kinds(one), _kinds(two)
    layer = {key: n - kinds1.get(key, 0) for key, n in kinds2.items() if n > kinds1.get(key, 0)}
    return {"layer": (b2 - b1, k2 - k1), "rest": (2 * b1 - b2, 2 * k1 - k2), "kernels": layer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="130m")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=8, help="list the N kernels of a layer moving the most bytes")
    parser.add_argument("--bandwidth", type=float, default=4.0, help="TB/s for the time bound (H200: 4.8, H100: 3.35)")
    parser.add_argument("--set", action="append", default=[], help="B'MOJO config field NAME=VALUE (repeatable)")
    args = parser.parse_args()
    overrides = parse_overrides(args.set, nested=False)
    config = BMojoConfig.from_preset("bmojo", args.size, **overrides)
    models = {"transformer": matched_transformer(config, args.size, overrides), "bmojo": config}
    print(f"{args.size}, {args.length} tokens x {args.batch}, bf16 autocast, code for a GPU written on a CPU; bytes of "
          f"inductor's Triton kernels, time bound at {args.bandwidth} TB/s")  # fmt: skip
    for name, cfg in models.items():
        parts = split(cfg, args.length, args.batch)
        (lb, lk), (rb, rk) = parts["layer"], parts["rest"]
        n = cfg.num_hidden_layers
        step = rb + n * lb
        print(f"{name:12s} {n:3d} layers  {step / 1e9:7.3f} GB a step ({step / args.bandwidth / 1e9:6.2f} ms)  "
              f"a layer {lb / 1e9:6.3f} GB in {lk} kernels  head and loss {rb / 1e9:6.3f} GB in {rk}")  # fmt: skip
        top = sorted(parts["kernels"].items(), key=lambda kv: -kv[0][1] * kv[1])[: args.top]
        for (kernel, b), calls in top:
            graph = "forward " if kernel.startswith("0:") else "backward"
            print(f"    {b * calls / 1e6:8.1f} MB  {graph} x{calls} {kernel[2:][:110]}")


if __name__ == "__main__":
    main()
