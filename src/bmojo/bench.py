"""``bmojo bench``: throughput and memory of presets against an equal-size SDPA Transformer, vs context length.

For every preset, length and mode the bench measures tokens per second (median of ``repeats`` timed runs after
``warmup`` untimed ones) and peak memory:

* ``train``: one forward + backward of the language-model loss on ``[batch, L]`` tokens (no optimiser step);
* ``prefill``: one forward under ``torch.inference_mode`` over ``[batch, L]`` tokens that fills the cache (logits of
  the last token only);
* ``decode``: after a prefill of ``L`` tokens (not timed), ``decode_steps`` single-token steps through the cache, also
  under ``torch.inference_mode`` (an eager step of the bench model took 16% less time than under ``no_grad``).

Every preset is paired with a Transformer (full causal attention through ``scaled_dot_product_attention``) of the
same hidden size whose depth and MLP width bring its parameter count within 5% of the preset's
(:func:`matched_transformer`). Timed repeats alternate between the models of a point, so load from other processes
on a shared machine falls on all of them alike and the ratios (``vs_baseline``) are the numbers to read.

Peak memory: on CPU the peak resident-set growth of one run, measured in a fresh subprocess per point (so memory
that earlier points freed into the allocator cannot hide it; Linux only, :class:`_Memory`); on CUDA
``torch.cuda.max_memory_allocated`` growth.
For ``decode`` it is the size of the cache after the prefill plus the peak growth while decoding (not what the
prefill freed into the allocator), and ``cache_bytes`` is the cache's exact size after the timed steps. For
``train`` the step's FLOPs are counted by ``torch.utils.flop_counter`` (matmuls and attention as executed,
masked-out entries of banded attention included) and reported as achieved FLOP/s and as a fraction of the measured
matmul peak (on CPU only: compiled CUDA kernels hide their FLOPs from the counter). Every ``train`` point also
reports model FLOPs utilisation (``mfu``): the usual estimate of a step's useful FLOPs (:func:`model_flops`) per
second over the measured matmul peak in the run's dtype. ``dtype="bfloat16"`` runs ``train`` under
``torch.autocast`` (float32 weights, as training keeps them) and ``prefill``/``decode`` on a bfloat16 copy of each
model (as inference runs: autocast would cast every weight at every step, and compiled graphs do not cache those
casts). ``compile=True`` times every mode through ``torch.compile`` of every model (compilation happens in the
warm-up runs; FLOP counts and memory come from the eager model), in ``compile_mode`` with inductor's
``compile_options`` (e.g. ``combo_kernels=True``) on top. The results name the machine (:func:`machine_info`) and the
code that measured them (:func:`code_info`: version, commit, kernel path and settings, optional kernel packages).
"""

from __future__ import annotations

import copy
import importlib.metadata
import inspect
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

import bmojo
from bmojo.malloc import kept
from bmojo.models.config import PRESETS, SIZES, BMojoConfig
from bmojo.models.modeling import BMojoForCausalLM, count_parameters
from bmojo.ops.triton import kernels

MODES = ("train", "prefill", "decode")
BASELINE = "transformer"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile(mode=...)
MATCH_TOLERANCE = 0.05


@dataclass
class BenchSettings:
    """What to measure; see the module docstring. ``overrides`` set config fields of every model."""

    presets: list[str] = field(default_factory=lambda: ["bmojo"])
    size: str = "tiny"
    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    batch: int = 1
    repeats: int = 3
    warmup: int = 1
    decode_steps: int = 16
    threads: int | None = None
    device: str = "cpu"
    overrides: dict[str, Any] = field(default_factory=dict)
    memory: bool = True
    seed: int = 0
    dtype: str = "float32"
    compile: bool = False
    compile_mode: str = "default"
    compile_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        unknown = [p for p in self.presets if p not in PRESETS]
        if not self.presets or unknown:
            raise ValueError(f"presets must be a non-empty subset of {PRESETS}, got {self.presets}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {tuple(SIZES)}")
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive integers, got {self.lengths}")
        for name in ("batch", "repeats", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.compile_options:
            if not self.compile:
                raise ValueError("compile_options need compile=True (--compile)")
            unknown = sorted(set(self.compile_options) - set(torch._inductor.list_options()))
            if unknown:
                raise ValueError(f"unknown inductor options in compile_options: {unknown}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        fields = inspect.signature(BMojoConfig.__init__).parameters
        unknown = sorted(k for k in self.overrides if k not in fields or k == "kwargs")
        if unknown:
            raise ValueError(f"unknown config fields in overrides: {unknown}")
        for preset in self.presets:  # a bad value of a field raises here, naming it
            BMojoConfig.from_preset(preset, self.size, **self.overrides)
        parse_device(self.device)


def parse_device(name: str) -> torch.device:
    """``torch.device(name)``; ``ValueError`` for an unknown device, or an accelerator (``cuda``, ``mps``, ``xpu``)
    this machine does not have."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}") from e
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu
    if device.type != "cpu" and not getattr(backend, "is_available", lambda: False)():
        raise ValueError(f"device {name!r} requested but {device.type.upper()} is not available")
    return device


def matched_transformer(target: BMojoConfig, size: str, overrides: dict[str, Any] | None = None) -> BMojoConfig:
    """The ``transformer`` preset at ``target``'s hidden size with its parameter count within 5% of ``target``'s.

    The depth is the one that comes closest with the preset's MLP width; the MLP width is then solved for the
    remaining difference (each layer's SwiGLU holds ``3 * hidden * width`` parameters).
    """
    goal = count_parameters(target)
    fields = {k: v for k, v in (overrides or {}).items() if k not in ("num_hidden_layers", "layer_pattern")}

    def build(layers: int, width: int | None = None) -> BMojoConfig:
        extra = {} if width is None else {"intermediate_size": width}
        return BMojoConfig.from_preset(BASELINE, size, **{**fields, **extra, "num_hidden_layers": layers})

    one, two = count_parameters(build(1)), count_parameters(build(2))
    per_layer, base = two - one, 2 * one - two
    layers = max(1, round((goal - base) / per_layer))
    config = build(layers)
    width = config.intermediate_size + round((goal - count_parameters(config)) / (3 * config.hidden_size * layers))
    if width >= 1:
        config = build(layers, width)
    got = count_parameters(config)
    if abs(got - goal) > MATCH_TOLERANCE * goal:
        raise ValueError(f"no transformer within {MATCH_TOLERANCE:.0%} of {goal:,} parameters (closest {got:,})")
    return config


def machine_info(device: str) -> dict[str, Any]:
    """CPU model, cores, threads, torch version, device name, platform, load average, and whether freed memory is kept
    in the process (``bmojo.malloc``)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    dev = torch.device(device)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type} ({cpu})",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "keep_freed_memory": kept(),
    }


def code_info() -> dict[str, Any]:
    """What measured: bmojo's version and, run from a git checkout, its commit (``+``: with uncommitted changes); the
    kernel path in force (``BMOJO_KERNELS``) and the other ``BMOJO_*`` settings in the environment (kernel tiles);
    the optional kernel packages' versions (``None``: not installed)."""
    package = Path(bmojo.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()  # fmt: skip

    commit = None
    try:  # only this project's own checkout (an installed copy may sit inside some other repository)
        if Path(git("rev-parse", "--show-toplevel")) / "src" / "bmojo" == package:
            commit = git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for name in ("triton", "fla-core"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "bmojo": bmojo.__version__,
        "commit": commit,
        "kernels": kernels(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("BMOJO_")},
        **versions,
    }


def _sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (accelerators run kernels asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        getattr(torch, device.type).synchronize()  # torch.mps, torch.xpu: their current device


def matmul_peak_flops(device: str, n: int | None = None, repeats: int = 5, dtype: str = "float32") -> float:
    """Measured ``n x n`` matmul FLOP/s in ``dtype``, the best of ``repeats`` (n = 1024 on CPU, 8192 on CUDA)."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 1024)
    a, b = (torch.randn(n, n, device=dev, dtype=DTYPES[dtype]) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        a @ b
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def _attention_keys(mixer: torch.nn.Module, length: int) -> float:
    """Keys an attention mixer's queries see, summed over positions ``0..L-1`` (exactly, from its masks)."""
    i = torch.arange(length, dtype=torch.float64)
    w = mixer.window
    keys = (i + 1).clamp(max=length if w is None else w)
    if mixer.fading:
        keys += (i - w + 1).clamp(min=0, max=w)
    if mixer.memory is not None:
        c = mixer.memory.chunk_size
        keys += ((i // c) * c - w).clamp(min=0, max=mixer.memory.size)
    return float(keys.sum())


def model_flops(model: BMojoForCausalLM, batch: int, length: int) -> float:
    """Useful FLOPs of one training step (forward + backward) on ``[batch, L]`` tokens, the PaLM/nanoGPT way.

    ``6`` per matmul weight per token (every parameter except the input embedding, with the LM head) plus, per
    attention layer, ``12 * heads * head_dim`` per key a query sees (:func:`_attention_keys`: causal, window,
    fading band and eidetic memory counted exactly). The SSM scans' own FLOPs are left out.
    """
    from bmojo.layers.bmojo import BMojoMixer

    weights = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    weights += model.lm_head.weight.numel() if model.lm_head.weight is model.get_input_embeddings().weight else 0
    attention = sum(12 * m.attn.num_heads * m.attn.head_dim * _attention_keys(m, length)
                    for m in model.modules() if isinstance(m, BMojoMixer) and m.attn is not None)  # fmt: skip
    return batch * (6 * weights * length + attention)


def _ids(config: BMojoConfig, batch: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=gen).to(device)


def _build(config: BMojoConfig, seed: int, device: torch.device) -> BMojoForCausalLM:
    torch.manual_seed(seed)
    return BMojoForCausalLM(config).to(device)


def inference_model(model: BMojoForCausalLM, dtype: str) -> BMojoForCausalLM:
    """``model`` for ``prefill`` and ``decode`` in ``dtype``: itself if its weights are in it, else a copy in it."""
    target = DTYPES[dtype]
    return model if next(model.parameters()).dtype == target else copy.deepcopy(model).to(target)


def _prefill(model: torch.nn.Module, ids: torch.Tensor) -> Any:
    with torch.inference_mode():
        return model.eval()(ids, use_cache=True, logits_to_keep=1).cache


def _autocast(device: torch.device, dtype: str) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``, disabled for float32 (as ``bmojo.train`` does)."""
    return torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "float32")


def compile_kwargs(mode: str = "default", options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``torch.compile`` keywords for ``mode`` with inductor ``options`` on top of the mode's own (``torch.compile``
    takes a mode or options, not both)."""
    if not options:
        return {"mode": mode}
    return {"options": {**torch._inductor.list_mode_options(mode), **options}}


def make_runner(model: BMojoForCausalLM, mode: str, ids: torch.Tensor, decode_steps: int, dtype: str = "float32",
                compile: bool = False, compile_mode: str = "default", runs: int = 1,
                compile_options: dict[str, Any] | None = None) -> Callable[[], None]:  # fmt: skip
    """A function running one unit of ``mode`` on ``ids [batch, L]``: ``train`` under autocast to ``dtype``,
    ``prefill`` and ``decode`` with the weights in ``dtype`` (:func:`inference_model`; for ``decode`` the prefill
    happens now); ``compile``: the model runs through ``torch.compile`` in ``compile_mode`` (with inductor's
    ``compile_options`` on top), for ``train`` and ``prefill`` with a graph per length, for ``decode`` with one
    graph for every position (after a first one for the first) and the cache's addresses marked static
    (``"reduce-overhead"``: CUDA graphs), its full-attention buffers sized for ``runs`` calls of ``decode_steps`` (a
    compiled step reads all of them)."""
    if mode != "train":
        model = inference_model(model, dtype)
    forward = model
    if compile:
        dynamic = False if mode != "decode" else None
        forward = torch.compile(model, dynamic=dynamic, **compile_kwargs(compile_mode, compile_options))
    if mode == "train":
        model.train()

        def train() -> None:
            model.zero_grad(set_to_none=True)
            with _autocast(ids.device, dtype):
                loss = forward(ids, labels=ids, use_cache=False).loss
            loss.backward()

        return train
    if mode == "prefill":

        def prefill() -> None:
            _prefill(forward, ids)

        return prefill
    cache, token = _prefill(model, ids), ids[:, -1:]
    if compile:
        cache.reserve(decode_steps * runs)

    def decode() -> None:
        if compile:  # room for the steps first (if called more than ``runs`` times): the state then stays put
            cache.reserve(decode_steps)
            cache.mark_static_addresses()
        with torch.inference_mode():
            for _ in range(decode_steps):
                forward(token, cache=cache, use_cache=True)

    decode.cache = cache  # type: ignore[attr-defined]
    return decode


class _Memory:
    """Peak-memory probe: CUDA's allocator counters; on a CPU the resident set, its current size (``statm``) and its
    peak since :meth:`reset` (``VmHWM``, set back through ``clear_refs``) from Linux's ``/proc``. Elsewhere (a CPU on
    macOS or Windows, other accelerators) ``None``: a CPU's only peak there is the process's lifetime one, which its
    imports' transients already set above the size a small model's run reaches."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # (no /proc: no peak either)

    def current(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        if self.device.type != "cpu":
            return None
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * mmap.PAGESIZE
        except OSError:
            return None

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.device.type != "cpu":
            return None
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
        except (OSError, StopIteration):
            return None


def memory_point(config: BMojoConfig, mode: str, batch: int, length: int, decode_steps: int, seed: int,
                 device: str, dtype: str = "float32") -> int | None:  # fmt: skip
    """Peak memory growth in bytes of one run of ``mode``; for ``decode``, the cache plus the peak growth during
    decoding after the prefill. None on a CPU outside Linux (:class:`_Memory`)."""
    dev = torch.device(device)
    model, ids = _build(config, seed, dev), _ids(config, batch, length, seed, dev)
    if mode != "train":  # the inference copy is not part of the run's memory
        model = inference_model(model, dtype)
    probe = _Memory(dev)
    _sync(dev)
    before = probe.current()
    if before is None:
        return None
    probe.reset()
    run = make_runner(model, mode, ids, decode_steps, dtype)
    if mode == "decode":  # count the cache, not what the prefill left in the allocator
        _sync(dev)
        before = probe.current() - run.cache.nbytes()  # type: ignore[attr-defined]
        probe.reset()
    run()
    _sync(dev)
    return max(0, probe.peak() - before)


def _memory_main() -> None:
    """Subprocess entry: ``argv[1]`` is JSON of :func:`memory_point`'s arguments (config as a dict)."""
    args = json.loads(sys.argv[1])
    torch.set_num_threads(args.pop("threads"))
    config = BMojoConfig.from_dict(args.pop("config"))
    print(json.dumps({"peak_mem_bytes": memory_point(config, **args)}))


def _memory_in_subprocess(config: BMojoConfig, **kwargs: Any) -> int | None:
    """:func:`memory_point` in a fresh Python process."""
    args = json.dumps({"config": config.to_dict(), "threads": torch.get_num_threads(), **kwargs})
    code = "from bmojo.bench import _memory_main; _memory_main()"
    proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"memory measurement failed ({kwargs}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mem_bytes"]


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds ``fn()`` takes, with ``device`` synchronised before and after (CUDA kernels run asynchronously)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def median_ms(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``repeats`` :func:`timed` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats)) * 1e3


def cuda_kernels(fn: Callable[[], None]) -> tuple[int, float]:
    """``(kernels, device ms)``: the CUDA kernels one call of ``fn`` launches and their summed time (torch.profiler;
    device copies and fills count as kernels), what a call costs the GPU whatever the host's share of its wall
    time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels), sum(e.device_time for e in kernels) / 1e3


def device_column(fn: Callable[[], None]) -> str:
    """A benchmark row's device cost, ``"   device 1.234 ms in 56 kernels"`` for one call of ``fn`` on CUDA
    (:func:`cuda_kernels`), what the GPU spends apart from the host's share of the wall time; ``""`` without CUDA."""
    if not torch.cuda.is_available():
        return ""
    kernels, ms = cuda_kernels(fn)
    return f"   device {ms:7.3f} ms in {kernels} kernels"


def build_models(settings: BenchSettings) -> dict[str, dict[str, Any]]:
    """Name -> ``{"preset", "baseline" (name of its Transformer, None for one), "config", "params"}``."""
    models: dict[str, dict[str, Any]] = {}
    for preset in settings.presets:
        config = BMojoConfig.from_preset(preset, settings.size, **settings.overrides)
        baseline = None
        if preset != BASELINE:
            base_config = matched_transformer(config, settings.size, settings.overrides)
            baseline = f"{BASELINE}~{preset}"
            models[baseline] = {"preset": BASELINE, "baseline": None, "config": base_config}
        models[preset] = {"preset": preset, "baseline": baseline, "config": config}
    for entry in models.values():
        entry["params"] = count_parameters(entry["config"])
    return models


def run_bench(settings: BenchSettings, on_point: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure every (length, mode, model) point; returns the JSON-ready result (see the module docstring)."""
    settings.validate()
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings, on_point)
    finally:
        torch.set_num_threads(threads)


def _run(settings: BenchSettings, on_point: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """:func:`run_bench` once the thread count is set."""
    dev = torch.device(settings.device)
    models = build_models(settings)
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(settings.device),
        "code": code_info(),
        "settings": asdict(settings),
        "matmul_peak_flops": matmul_peak_flops(settings.device, dtype=settings.dtype),
        "models": {k: {**v, "config": v["config"].to_dict()} for k, v in models.items()},
        "points": [],
    }
    built = {name: _build(m["config"], settings.seed, dev) for name, m in models.items()}
    for length in settings.lengths:
        for mode in settings.modes:
            points = _measure(settings, models, built, mode, length, result["matmul_peak_flops"])
            result["points"].extend(points)
            for p in points:
                if on_point is not None:
                    on_point(p)
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result


def _measure(settings: BenchSettings, models: dict[str, dict[str, Any]], built: dict[str, BMojoForCausalLM],
             mode: str, length: int, peak: float) -> list[dict[str, Any]]:  # fmt: skip
    """One (mode, length) for every model, timed repeats interleaved across the models (``peak``: matmul FLOP/s)."""
    dev, steps = torch.device(settings.device), settings.decode_steps
    ids = {name: _ids(models[name]["config"], settings.batch, length, settings.seed, dev) for name in built}
    runs = settings.warmup + settings.repeats
    compiled = {"compile": settings.compile, "compile_mode": settings.compile_mode, "runs": runs,
                "compile_options": settings.compile_options}  # fmt: skip
    runners = {
        name: make_runner(model, mode, ids[name], steps, settings.dtype, **compiled) for name, model in built.items()
    }
    for _ in range(settings.warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(settings.repeats):
        for name, run in runners.items():
            times[name].append(timed(run, dev))
    tokens = settings.batch * (steps if mode == "decode" else length)
    points = {}
    for name, run in runners.items():
        median = statistics.median(times[name])
        point: dict[str, Any] = {
            "model": name, "preset": models[name]["preset"], "mode": mode, "length": length,
            "batch": settings.batch, "tokens": tokens, "seconds": times[name], "median_s": median,
            "tokens_per_s": tokens / median,
        }  # fmt: skip
        if mode == "decode":
            point["cache_bytes"] = run.cache.nbytes()  # type: ignore[attr-defined]
            point["decode_steps"] = steps
        if mode == "train":
            point["model_flops"] = model_flops(built[name], settings.batch, length)
            point["mfu"] = point["model_flops"] / median / peak
        if mode == "train" and dev.type == "cpu":
            counter = FlopCounterMode(display=False)
            eager = make_runner(built[name], mode, ids[name], steps, settings.dtype)
            with counter:
                eager()
            point["flops"] = counter.get_total_flops()
            point["flops_per_s"] = point["flops"] / median
        if settings.memory:
            kwargs = {
                "mode": mode,
                "batch": settings.batch,
                "length": length,
                "decode_steps": steps,
                "seed": settings.seed,
                "dtype": settings.dtype,
            }
            config = models[name]["config"]
            point["peak_mem_bytes"] = (
                _memory_in_subprocess(config, device=settings.device, **kwargs)
                if dev.type == "cpu"
                else memory_point(config, device=settings.device, **kwargs)
            )
        points[name] = point
    for name, point in points.items():
        base = points.get(models[name]["baseline"])
        if base is not None:
            point["vs_baseline"] = point["tokens_per_s"] / base["tokens_per_s"]
            if settings.memory and base["peak_mem_bytes"]:
                point["mem_vs_baseline"] = point["peak_mem_bytes"] / base["peak_mem_bytes"]
    return list(points.values())


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return ""
    return f"{n / 2**10:,.1f} KiB" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


def _rows(result: dict[str, Any]) -> list[list[str]]:
    peak = result["matmul_peak_flops"]
    rows = []
    for p in result["points"]:
        ratio = p.get("vs_baseline")
        flops, mfu = p.get("flops_per_s"), p.get("mfu")
        rows.append([
            p["model"], f"{result['models'][p['model']]['params'] / 1e6:,.1f}M", p["mode"], f"{p['length']:,}",
            f"{p['tokens_per_s']:,.0f}", "" if ratio is None else f"{ratio:.2f}x", _fmt_bytes(p.get("peak_mem_bytes")),
            _fmt_bytes(p.get("cache_bytes")), "" if flops is None else f"{flops / 1e9:.1f} ({flops / peak:.0%})",
            "" if mfu is None else f"{mfu:.1%}",
        ])  # fmt: skip
    return rows


COLUMNS = ["model", "params", "mode", "L", "tokens/s", "vs baseline", "peak memory", "cache", "GFLOP/s (of peak)",
           "MFU"]  # fmt: skip
_TERMINAL_HEADERS = {
    "vs baseline": "vs\nbaseline",
    "peak memory": "peak\nmemory",
    "GFLOP/s (of peak)": "GFLOP/s\n(of peak)",
}


def results_table(result: dict[str, Any]) -> Table:
    """The points as a rich table, without the columns no point fills (memory with ``--no-memory``, FLOP/s outside
    training), the wider headers on two lines and the cells' padding shared (a table of one mode about fits 80
    columns); in a terminal too narrow for it the numbers wrap, never the model names and modes."""
    m = result["machine"]
    rows = _rows(result)
    table = Table(
        title=f"bmojo bench on {m['device']}, {m['threads']} threads, {result['date']}",
        show_edge=False,
        collapse_padding=True,
    )
    filled = [i for i in range(len(COLUMNS)) if any(row[i] for row in rows)]
    for i in filled:
        name = COLUMNS[i]
        table.add_column(_TERMINAL_HEADERS.get(name, name), justify="left" if name in ("model", "mode") else "right",
                         no_wrap=name in ("model", "mode"), overflow="fold")  # fmt: skip
    for row in rows:
        table.add_row(*(row[i] for i in filled))
    return table


def markdown(result: dict[str, Any]) -> str:
    """The points as a Markdown table with the machine, the code that measured them and the date."""
    m, s = result["machine"], result["settings"]
    machine = (
        f"Machine: {m['device']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, {m['platform']}; "
        f"load average {m['load_average']} at the start. Measured {s['dtype']} matmul peak: "
        f"{result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s. Freed memory kept in the process (bmojo.malloc): "
        f"{'yes' if m.get('keep_freed_memory') else 'no'}."
    )
    c = result["code"]
    code = (
        f"Code: bmojo {c['bmojo']}{' (commit ' + c['commit'] + ')' if c['commit'] else ''}, kernels {c['kernels']}, "
        f"triton {c['triton']}, fla-core {c['fla-core']}{''.join(f', {k}={v}' for k, v in c['env'].items())}."
    )
    run = (
        f"Size {s['size']}, batch {s['batch']}, {s['repeats']} repeats after {s['warmup']} warm-up (medians), "
        f"{s['decode_steps']} decode steps, overrides {s['overrides'] or 'none'}"
        f"{', through torch.compile (mode ' + s.get('compile_mode', 'default') + ')' if s.get('compile') else ''}"
        f"{', inductor options ' + str(s['compile_options']) if s.get('compile_options') else ''}."
    )
    lines = [
        f"# bmojo bench ({result['date']})", "", machine, "", code, "", run, "",
        "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
    ]  # fmt: skip
    lines += ["| " + " | ".join(row) + " |" for row in _rows(result)]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], key: str, path: Path, ylabel: str) -> Path:
    """``key`` vs length, one panel per mode and one line per model (log-log axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(p["mode"] == m and p.get(key) for p in result["points"])]
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(4.5 * max(1, len(modes)), 3.6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for model in result["models"]:
            pts = sorted((p["length"], p[key]) for p in result["points"]
                         if p["model"] == model and p["mode"] == mode and p.get(key))  # fmt: skip
            if pts:
                ax.plot(*zip(*pts), marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(mode)
        ax.set_xlabel("context length")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """``bench.json``, ``bench.md``, ``tokens_per_s_vs_length.png`` and (with memory) ``memory_vs_length.png``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md"]
    paths[0].write_text(json.dumps(result, indent=1))
    paths[1].write_text(markdown(result))
    paths.append(plot(result, "tokens_per_s", out / "tokens_per_s_vs_length.png", "tokens / s"))
    if any(p.get("peak_mem_bytes") for p in result["points"]):
        paths.append(plot(result, "peak_mem_bytes", out / "memory_vs_length.png", "peak memory (bytes)"))
    return paths


def ratio_summary(result: dict[str, Any]) -> list[str]:
    """One line per (model, mode): its tokens/s relative to its Transformer at every length."""
    lines = []
    for model, entry in result["models"].items():
        if entry["baseline"] is None:
            continue
        for mode in MODES:
            pts = sorted((p["length"], p["vs_baseline"]) for p in result["points"]
                         if p["model"] == model and p["mode"] == mode)  # fmt: skip
            if pts:
                ratios = ", ".join(f"{r:.2f}x at {n:,}" for n, r in pts)
                lines.append(f"{model} {mode}: {ratios} the tokens/s of {entry['baseline']}")
    return lines
