"""Where a compiled decoding step's time goes: wall time per token, device-busy time and kernels launched per token.

    python benchmarks/decode_profile.py                      # CUDA: 130m, 32K context, batch 1, bf16, CUDA graphs
    python benchmarks/decode_profile.py --batch 8 --mode default
    python benchmarks/decode_profile.py --reference-steps    # B'MOJO also without our step kernels (an A/B)
    python benchmarks/decode_profile.py --option combo_kernels=true   # inductor options on top of the mode's
    python benchmarks/decode_profile.py --host-profile 25    # the 25 functions taking the most host time (cProfile)
    python benchmarks/decode_profile.py --length 1024 --set hidden_size=256 ...   # CPU: the bench model's counts
    python benchmarks/decode_profile.py --gpu-kernels --set num_hidden_layers=1    # CPU: a GPU step's kernels, a layer

For B'MOJO and the equal-size Transformer (``bench.matched_transformer``), each with bfloat16 weights on CUDA
(float32 on CPU): a prefill of ``--length`` tokens, room reserved and the cache's addresses marked static, the model
through ``torch.compile(mode=--mode)``, warm-up steps, then ``--steps`` timed steps (median of 3 runs), then a
profile of ``--steps`` steps counting the device kernels (CUDA) and their total time per token, and the host's
time per token (until the calls return). At batch 1 a step is small: many small kernels (a few microseconds each
even replayed from a CUDA graph) and the host's work per call (guards, CUDA-graph input checks) can bound it rather
than the bytes it reads (the Transformer reads its whole KV cache every token); ``--host-profile N`` prints where
the host's time goes. ``--option NAME=VALUE`` sets an
inductor option on top of the mode's (``combo_kernels=True`` launches independent kernels, such as the writes to
several state buffers, as one). On a CPU (float32, the ``tiny`` size, 256 tokens of context unless ``--length``)
it counts instead the PyTorch operations of an eager step (under a dispatch mode, views included) and the kernel
calls of the compiled step's generated code (inductor's fused kernels, its calls of matrix products and its
fallbacks to PyTorch's own ops, such as the CPU attention kernel); ``--gpu-kernels`` adds those of the code inductor
generates for a GPU (:func:`gpu_kernel_calls`), a closer proxy for what a GPU step launches. ``--set NAME=VALUE``
overrides the B'MOJO config (the Transformer is matched to it).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import re
import statistics
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch._inductor.graph import GraphLowering
from torch._inductor.utils import run_and_get_code
from torch.utils._python_dispatch import TorchDispatchMode

import bmojo.layers.linear
from bmojo import BMojoConfig, BMojoForCausalLM
from bmojo.bench import compile_kwargs, cuda_kernels, matched_transformer
from bmojo.ops.linear import MAX_ROWS
from bmojo.ops.triton import kernels, set_kernels
from bmojo.train import parse_overrides


class _CountOps(TorchDispatchMode):
    """Counts the PyTorch operations dispatched under it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _kernel_mode(mode: str) -> Iterator[None]:
    """Run a block with ``BMOJO_KERNELS=mode`` (``bmojo.ops.triton.set_kernels``), restoring the mode after."""
    before = kernels()
    set_kernels(mode)
    try:
        yield
    finally:
        set_kernels(before)


def generated_kernel_calls(codes: list[str]) -> dict[str, int]:
    """Kernel calls in the ``call`` functions of inductor's generated code (every graph of a step): fused kernels,
    our Triton kernels (``ours``), external calls (``extern_kernels.mm`` and the like) and fallbacks to PyTorch's own
    ops (``torch.ops.aten.*``), by kind."""
    pattern = r"^\s+(?:\w+ = )?(cpp_fused_\w+|\w+\.run|extern_kernels\.\w+|torch\.ops\.\w+\.\w+)[(.]"
    kinds: dict[str, int] = {}
    for code in codes:
        for name in re.findall(pattern, code[code.index("def call(") :], re.M):
            if name.endswith(".run"):
                kind = "fused" if name.startswith("triton_") else "ours"
            else:
                kind = "fused" if name.startswith("cpp_fused") else name.rsplit(".", 1)[1]
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def reduction_products(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with few rows computed as a broadcast multiply and sum (``--products reduction``) on any device:
    inductor then generates the product itself, a reduction it can fuse with the elementwise work around it, where on
    CUDA it calls a matrix-vector kernel (cuBLAS) for each projection; an experiment for batch-1 GPU decoding, bound
    by kernel count. (On CPU ``ops.linear`` computes few-row products so under ``torch.compile`` already.)"""
    if x.numel() // x.shape[-1] > MAX_ROWS:
        return F.linear(x, weight, bias)
    y = (x.unsqueeze(-2) * weight).sum(-1)
    return y if bias is None else y + bias


def _prefilled(model: BMojoForCausalLM, ids: torch.Tensor, room: int) -> tuple[Any, torch.Tensor]:
    """The cache of a prefill of ``ids`` with room for ``room`` more tokens and its addresses marked static (what
    compiled steps need), and the next token (call under ``torch.no_grad``)."""
    out = model(ids, use_cache=True, logits_to_keep=1)
    out.cache.reserve(room)
    out.cache.mark_static_addresses()
    return out.cache, out.logits.argmax(-1)


def _listed(counts: dict[str, int]) -> str:
    """Kernel calls by kind, as ``"3 fused, 2 mm"``."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))


def cpu_counts(model: BMojoForCausalLM, ids: torch.Tensor) -> dict[str, Any]:
    """PyTorch operations of one eager decoding step, and the kernel calls of the compiled step's generated code."""
    with torch.no_grad():
        eager = model(ids, use_cache=True, logits_to_keep=1).cache
        compiled, token = _prefilled(model, ids, 4)
        model(token, past_key_values=eager, use_cache=True)
        counter = _CountOps()
        with counter:
            model(token, past_key_values=eager, use_cache=True)
        torch._dynamo.reset()
        step = torch.compile(model)
        step(token, past_key_values=compiled, use_cache=True)  # the first position has a graph of its own
        _, codes = run_and_get_code(step, token, past_key_values=compiled, use_cache=True)
    return {"ops": counter.count, "kernels": generated_kernel_calls(codes)}


@contextlib.contextmanager
def gpu_codegen(codes: list[str], **inductor: Any) -> Iterator[None]:
    """Within it, ``torch.compile`` writes code for a GPU on a CPU and appends every graph's to ``codes``: inductor's
    Triton backend for CPU tensors (``cpu_backend="triton"``, concatenations fused as on CUDA; ``inductor``: more of
    its options) with Triton aimed at a stand-in H100, products through ``F.linear`` and our Triton kernels
    (``BMOJO_KERNELS=triton``) as on CUDA, backward graphs lowered with their forward. The kernels are not compiled,
    and the block ends at the first launch of one (the code is written by then)."""
    import torch._inductor.async_compile as async_compile
    import triton
    from triton.backends.compiler import GPUTarget

    class StandInH100:  # a Triton driver naming an H100 as its target
        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

    class Launched(Exception):
        pass

    class Uncompiled:  # a kernel that stops the block when launched
        def run(self, *args: Any, **kwargs: Any) -> None:
            raise Launched

        def __getattr__(self, name: str) -> Any:  # (set-up calls)
            return lambda *args, **kwargs: None

    torch._dynamo.reset()
    previous = getattr(triton.runtime.driver, "_active", None)  # None until a driver was needed
    triton.runtime.driver.set_active(StandInH100())
    try:
        with (
            _kernel_mode("triton"),
            torch._inductor.config.patch(cpu_backend="triton", force_pointwise_cat=True, compile_threads=1,
                                         **inductor),
            torch._functorch.config.patch(force_non_lazy_backward_lowering=True),
            mock.patch.object(async_compile.AsyncCompile, "triton", lambda self, *args, **kwargs: Uncompiled()),
            mock.patch.object(bmojo.layers.linear, "linear", F.linear),
            mock.patch.object(GraphLowering, "save_output_code", codes.append),
        ):  # fmt: skip
            yield
    except Launched:
        pass
    finally:
        triton.runtime.driver.set_active(previous)  # (reset_active would look for a GPU)
        torch._dynamo.reset()


def gpu_kernel_calls(model: BMojoForCausalLM, ids: torch.Tensor) -> dict[str, int]:
    """Kernel calls of the compiled decoding step as inductor generates it for a GPU, counted on a CPU
    (:func:`gpu_codegen`; the prefill before it on the PyTorch path). A proxy for a GPU step's launches (CUDA's
    attention and matrix products may launch more than one kernel a call, and CUDA-graph replays copy inputs)."""
    codes: list[str] = []
    with torch.no_grad():
        with _kernel_mode("reference"):
            cache, token = _prefilled(model, ids, 4)
        with gpu_codegen(codes):
            torch.compile(model)(token, past_key_values=cache, use_cache=True)
    return generated_kernel_calls(codes)


def measure(
    model: BMojoForCausalLM,
    ids: torch.Tensor,
    steps: int,
    compile_args: dict[str, Any],
    host_profile: int = 0,
    step_kernels: str | None = None,
) -> dict[str, float]:
    """Per-token wall ms (median of 3 runs of ``steps``) of the model through ``torch.compile(**compile_args)``;
    on CUDA also the host's ms per token (until the last step's call returns: near the wall time, the GPU waits on
    the host), device-busy ms and kernels per token. ``host_profile``: print that many of the functions taking the
    most host time in one more run (cProfile). ``step_kernels``: the kernel mode of the steps (``BMOJO_KERNELS``;
    the prefill takes the one in force)."""
    cuda = ids.is_cuda
    with torch.no_grad():
        cache, token = _prefilled(model, ids, steps * 8)
    with torch.no_grad(), _kernel_mode(step_kernels or kernels()):
        step = torch.compile(model, **compile_args)

        def run() -> tuple[float, float]:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(token, past_key_values=cache, use_cache=True)
            issued = time.perf_counter()
            if cuda:
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / steps * 1e3, (issued - t0) / steps * 1e3

        for _ in range(2):
            run()
        wall, host = zip(*(run() for _ in range(3)))
        result = {"wall_ms": statistics.median(wall)}
        if cuda:
            result["host_ms"] = statistics.median(host)
            launched, device_ms = cuda_kernels(run)
            result["kernels"], result["device_ms"] = launched / steps, device_ms / steps
        if host_profile:
            profiler = cProfile.Profile()
            profiler.runcall(run)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(host_profile)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="130m")
    parser.add_argument("--length", type=int, help="context (default: 32768 on CUDA, 256 on CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode")
    parser.add_argument("--option", action="append", default=[], help="inductor option NAME=VALUE (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="B'MOJO config field NAME=VALUE (repeatable)")
    parser.add_argument("--gpu-kernels", action="store_true",
                        help="CPU: also the kernel calls inductor generates for a GPU (gpu_kernel_calls)")  # fmt: skip
    parser.add_argument("--host-profile", type=int, default=0, metavar="N",
                        help="print the N functions taking the most host time in a run (cProfile)")  # fmt: skip
    parser.add_argument("--products", choices=["linear", "reduction"], default="linear",
                        help="few-row products as the model computes them, or as a multiply and sum")  # fmt: skip
    parser.add_argument("--reference-steps", action="store_true",
                        help="B'MOJO again with its steps on the PyTorch path (BMOJO_KERNELS=reference: without our "
                             "step kernels), in the same run")  # fmt: skip
    args = parser.parse_args()
    if args.products == "reduction":
        bmojo.layers.linear.linear = reduction_products
    options = compile_kwargs(args.mode, parse_overrides(args.option, nested=False))
    cuda = torch.cuda.is_available()
    dev, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    size, length = (args.size, args.length or 32768) if cuda else ("tiny", args.length or 256)
    overrides = {**({"window_size": 512, "chunk_size": 512} if cuda else {}), **parse_overrides(args.set, nested=False)}
    config = BMojoConfig.from_preset("bmojo", size, **overrides)
    rows = [("transformer", matched_transformer(config, size, overrides), None), ("bmojo", config, None)]
    rows += [("bmojo-ref", config, "reference")] if args.reference_steps else []
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}; {size}, context {length}, "
          f"batch {args.batch}, {args.steps} steps, torch.compile {options}, "
          f"products {args.products}")  # fmt: skip
    for name, config, step_kernels in rows:
        torch.manual_seed(0)
        model = BMojoForCausalLM(config).to(dev, dtype).eval()
        ids = torch.randint(0, config.vocab_size, (args.batch, length), device=dev)
        if args.host_profile:
            print(f"{name}: where the host's time goes in a run of {args.steps} steps")
        r = measure(model, ids, args.steps, options, args.host_profile, step_kernels)
        if cuda:
            extra = f"  host {r['host_ms']:.3f} ms  device busy {r['device_ms']:.3f} ms  kernels {r['kernels']:.0f}"
        else:
            counts = cpu_counts(model, ids)
            extra = f"  eager ops {counts['ops']}  compiled kernel calls: {_listed(counts['kernels'])}"
            if args.gpu_kernels:
                extra += f"  as for a GPU: {_listed(gpu_kernel_calls(model, ids))}"
        print(f"{name:12s} {r['wall_ms']:8.3f} ms/token  {args.batch / r['wall_ms'] * 1e3:9.1f} tokens/s{extra}",
              flush=True)  # fmt: skip
        del model
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
