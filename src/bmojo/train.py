"""Language-model training (``bmojo train``): AdamW, warmup + cosine, resumable checkpoints, DDP and FSDP2.

The core, :func:`train`, takes plain token arrays; :func:`run` loads them with ``bmojo.data`` from the
config. A run directory holds ``metrics.jsonl``, ``loss_curve.png``, ``checkpoints/step_XXXXXXXX/``
(the last ``keep_checkpoints``) and, at the end, ``final/`` (``save_pretrained`` + tokenizer).

Data: every optimiser step draws ``batch_size`` random windows of ``seq_len + 1`` tokens from one
``torch.Generator`` whose state is checkpointed. Every process draws the same global batch and
takes its contiguous shard, split into micro-batches (gradient accumulation), so a run's loss
curve does not depend on the number of processes and a resumed run sees the same batches.

Checkpoints: ``model.safetensors`` (full weights, the tied LM head stored once), ``optimizer.safetensors``
(AdamW moments and step counts keyed ``parameter/name``), ``rng.safetensors`` (the data generator and
torch's CPU generator) and ``state.json`` (step, tokens seen, scheduler, optimizer groups, both configs,
a fingerprint of the training tokens and every file's SHA-256). A checkpoint is written under a temporary
name, fsynced and renamed, so a killed run leaves only complete checkpoints; ``resume`` refuses a corrupt
checkpoint or one written for another model, other training settings or other data. Weights are gathered
to full tensors, so a run may resume with another number of processes or DDP <-> FSDP2.

Weight decay: :func:`bmojo.optim.param_groups` (matrix and convolution weights only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import reprlib
import shutil
import time
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from bmojo.atomic import fsync_path, sha256_file
from bmojo.models import BMojoConfig, BMojoForCausalLM
from bmojo.optim import cosine_lr, param_groups

CHECKPOINT_FORMAT = 1
# Fields that may differ between a checkpoint and the run resuming it: they do not change the weights.
RESUMABLE_CHANGES = frozenset(
    {"out_dir", "progress", "log_every", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "compile",
     "activation_checkpointing", "device", "distributed", "micro_batch_size", "cache_dir", "init_from"}
)  # fmt: skip


# The tensor files of a checkpoint (``<name>.safetensors``) that resuming loads.
CHECKPOINT_TENSORS = ("model", "optimizer", "rng")


class ConfigError(ValueError):
    """A training config (YAML, override or field value) is invalid."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the run that loads it."""


class DivergedError(RuntimeError):
    """The training loss is no longer finite (NaN or infinite)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (YAML keys are these field names)."""

    # data
    data: list[str] = field(default_factory=list)  # text files for bmojo.data.load_corpus
    tokenizer: str | None = None  # None / "byte", or a local Hugging Face tokenizer folder
    val_fraction: float = 0.05
    cache_dir: str | None = None
    # model: a preset name (with size) or a config.json / model folder; model_args override any field
    model: str = "bmojo"
    size: str = "tiny"
    model_args: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # a saved model folder whose weights start the run (e.g. with model: that folder)
    # optimisation
    steps: int = 1000
    batch_size: int = 32  # global sequences per optimiser step
    micro_batch_size: int | None = None  # sequences per process per forward (default: batch_size / processes)
    seq_len: int = 256
    lr: float = 3e-4  # peak; linear warmup from lr / warmup_steps, cosine decay to 0.1 * lr
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    dtype: str = "auto"  # float32, bfloat16 (autocast) or auto (bfloat16 on GPUs that support it)
    compile: bool = False
    activation_checkpointing: bool = False  # keep each block's input only, recompute the rest in the backward
    device: str = "auto"  # auto, cpu or cuda
    distributed: str = "ddp"  # ddp or fsdp, used when launched with several processes (torchrun)
    seed: int = 0
    # distillation: loss += distill_weight * T^2 * KL(teacher || student) on logits at temperature T
    teacher: str | None = None
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    # run directory, logging and checkpoints
    out_dir: str = "runs/train"
    log_every: int = 10
    eval_every: int = 200  # 0 disables validation
    eval_batches: int = 4  # validation windows = eval_batches * batch_size
    save_every: int = 200  # 0: checkpoint only at the end
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _HINTS[f.name]))
        positive = ("steps", "batch_size", "seq_len", "log_every", "eval_batches", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "weight_decay", "grad_clip", "eval_every", "save_every", "distill_weight")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.distill_temperature <= 0:
            raise ConfigError(f"lr and distill_temperature must be > 0, got {self.lr} and {self.distill_temperature}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        known = BMojoConfig.field_names()
        unknown = sorted(map(str, set(self.model_args) - known))
        if unknown:
            raise ConfigError(f"unknown model_args fields {unknown}; the model's fields are {sorted(known)}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        choices = {"dtype": ("auto", "float32", "bfloat16"), "device": ("auto", "cpu", "cuda"),
                   "distributed": ("ddp", "fsdp")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; unknown keys raise :class:`ConfigError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


_HINTS = typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the type hint of field ``name`` (YAML's '1e-3' strings become floats)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must be given a value")
    target = next(a for a in args if a is not type(None)) if optional else hint
    origin = typing.get_origin(target) or target
    if origin is list:
        value = [value] if isinstance(value, (str, os.PathLike)) else value
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, os.PathLike)) for v in value):
            raise ConfigError(f"{name} must be a list of paths, got {value!r}")
        return [str(v) for v in value]
    if origin is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, origin) or (origin is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be of type {origin.__name__}, got {value!r}")
    return value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file and ``KEY=VALUE`` overrides (values parsed as YAML).

    Dotted keys set entries of mapping fields: ``model_args.window_size=32``.
    """
    raw = {} if path is None else read_yaml_mapping(path, "training config keys")
    return TrainConfig.from_dict(parse_overrides(overrides, raw))


def read_yaml_mapping(path: str | Path, of: str) -> dict[str, Any]:
    """The YAML mapping (of ``of``, for the message) in the file ``path`` (empty: ``{}``); :class:`ConfigError` naming
    the file if it is missing, not text, not YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a UTF-8 text file ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a YAML mapping of {of}")
    return raw


def parse_overrides(items: Sequence[str], into: dict[str, Any] | None = None, nested: bool = True) -> dict[str, Any]:
    """``KEY=VALUE`` strings (values parsed as YAML) set in ``into`` (default: a new dict), which is returned.

    Dotted keys set entries of mappings: ``model_args.window_size=32``; with ``nested=False`` they stay whole keys
    (inductor's option names have dots: ``triton.cudagraphs``).
    """
    raw = {} if into is None else into
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form KEY=VALUE")
        *parents, leaf = key.split(".") if nested else [key]
        target = raw
        for p in parents:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {p} is not a mapping")
        try:
            target[leaf] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from e
    return raw


# ----------------------------------------------------------------------------------------------- model pieces


def build_model_config(cfg: TrainConfig, vocab_size: int, eos_token_id: int | None = None) -> BMojoConfig:
    """The model's config: a preset at ``cfg.size`` or a config.json / model folder, plus ``cfg.model_args``.

    ``vocab_size`` is the tokenizer's; a larger one from the config file or ``model_args`` is kept (padding).
    """
    source = Path(cfg.model)
    from_file = source.is_dir() or source.suffix == ".json"
    if from_file and not source.exists():
        raise ConfigError(f"model config {source} does not exist")
    try:
        loaded = BMojoConfig.from_pretrained(source) if source.is_dir() else None
        if from_file and loaded is None:
            loaded = BMojoConfig.from_json_file(source)
        args = {**(loaded.to_dict() if loaded is not None else {}), **cfg.model_args}
        if args.get("vocab_size", vocab_size) < vocab_size:
            raise ConfigError(
                f"the model's vocab_size={args['vocab_size']} is smaller than the tokenizer's {vocab_size}"
            )
        args.setdefault("vocab_size", vocab_size)
        if args.get("eos_token_id") is None and eos_token_id is not None:
            args["eos_token_id"] = eos_token_id
        return BMojoConfig.from_dict(args) if from_file else BMojoConfig.from_preset(cfg.model, cfg.size, **args)
    except (ValueError, TypeError, OSError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot build the model from model={cfg.model!r}, size={cfg.size!r}: {e}") from e


def load_initial_weights(model: BMojoForCausalLM, folder: str) -> None:
    """Copy the weights of a saved model folder (``save_pretrained``) into ``model``, which must match it."""
    if not (Path(folder) / "config.json").is_file():
        raise ConfigError(f"init_from {folder} is not a saved model folder (no config.json)")
    source = BMojoForCausalLM.from_pretrained(folder)
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as e:
        raise ConfigError(f"init_from {folder} does not match the configured model: {e}") from e


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * mean over positions of KL(softmax(teacher / T) || softmax(student / T))``; logits ``[..., V]``."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} do not match student logits {tuple(student_logits.shape)}"
        )
    vocab = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


def load_teacher(path: str, vocab_size: int, device: torch.device) -> nn.Module:
    """A frozen teacher in eval mode: a bmojo model folder, or any local Hugging Face causal LM folder."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"teacher {path} is not a model folder with a config.json")
    if json.loads((folder / "config.json").read_text()).get("model_type") == "bmojo":
        teacher = BMojoForCausalLM.from_pretrained(folder)
    else:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    if teacher.config.vocab_size != vocab_size:
        raise ConfigError(f"teacher vocab_size {teacher.config.vocab_size} differs from the student's {vocab_size}")
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


# ------------------------------------------------------------------------------------------------------ data


def sample_windows(tokens: np.ndarray, n: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random windows of ``seq_len + 1`` consecutive tokens of 1-D ``tokens`` -> int64 ``[n, seq_len + 1]``.

    ``tokens`` may be a memory-mapped array: only the windows are read.
    """
    starts = torch.randint(0, len(tokens) - seq_len, (n,), generator=generator)
    index = (starts[:, None] + torch.arange(seq_len + 1)).numpy()
    return torch.from_numpy(np.asarray(tokens)[index].astype(np.int64))


def micro_batches(windows: torch.Tensor, rank: int, world: int, micro: int) -> tuple[torch.Tensor, ...]:
    """This rank's contiguous shard of the global batch ``[B, L]``, split into ``[micro, L]`` pieces."""
    per_rank = windows.shape[0] // world
    return windows[rank * per_rank : (rank + 1) * per_rank].split(micro)


def _as_tokens(name: str, tokens: Any, seq_len: int, vocab_size: int) -> np.ndarray:
    """``tokens`` as a 1-D integer array (not copied), checked to hold a window and ids inside the vocabulary."""
    array = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ConfigError(f"{name} must be a 1-D integer array, got shape {array.shape} and dtype {array.dtype}")
    if len(array) <= seq_len:
        raise ConfigError(f"{name} has {len(array)} tokens: it needs more than seq_len={seq_len}")
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi >= vocab_size:
        raise ConfigError(f"{name} holds token ids in [{lo}, {hi}], outside [0, {vocab_size})")
    return array


def _fingerprint(tokens: np.ndarray, block: int = 1 << 22) -> str:
    """SHA-256 of the token ids as int64, whatever their storage type (ties a checkpoint to its training data)."""
    h = hashlib.sha256()
    for i in range(0, len(tokens), block):
        h.update(np.ascontiguousarray(tokens[i : i + block], dtype=np.int64).data)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int
    world: int
    device: torch.device
    initialized_here: bool


def setup_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; start the process group (nccl or gloo) if needed."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    initialized = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        initialized = True
    return DistInfo(rank, world, dev, initialized)


def wrap_model(model: BMojoForCausalLM, mode: str, info: DistInfo) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` on every block, then the root) when there are several processes."""
    if info.world == 1:
        return model
    if mode == "ddp":
        return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP2) on all but the last micro-batch."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world > 1:
        dist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------------------------- checkpoints


def _tied_aliases(model: BMojoForCausalLM) -> dict[str, str]:
    """State-dict keys that alias an earlier parameter (tied LM head) -> the key they alias."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def check_out_dir(out_dir: Path) -> None:
    """Raise :class:`ConfigError` if ``out_dir``, or the nearest of its parents that exists, is not a folder."""
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"out_dir {out_dir} cannot be a folder: {existing} exists and is not a folder")


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (``step_XXXXXXXX`` folders), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def write_checkpoint(
    root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any], keep: int
) -> Path:
    """Write ``{name}.safetensors`` per entry of ``tensors`` and ``state.json`` atomically as ``root/step_XXXXXXXX``.

    The folder is written under a temporary name, fsynced and renamed; then all but the last ``keep``
    checkpoints are deleted. ``state.json`` records each file's SHA-256.
    """
    final = root / f"step_{step:08d}"
    if final.exists():
        return final
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {}
    for name, group in tensors.items():
        path = tmp / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in group.items()}, path)
        files[path.name] = sha256_file(path)
    (tmp / "state.json").write_text(json.dumps({**state, "format": CHECKPOINT_FORMAT, "step": step, "files": files}))
    for path in tmp.iterdir():
        fsync_path(path)
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """``state.json`` and every tensor file of a checkpoint, verified against the recorded checksums.

    Raises :class:`CheckpointError` naming the file that is missing, unreadable or corrupt.
    """
    state_path = path / "state.json"
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no state.json: it is incomplete or not a checkpoint")
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: state.json is corrupt ({e})") from e
    check_state(state, path)
    tensors = {}
    for name, digest in state["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if sha256_file(file) != digest:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt (its SHA-256 does not match state.json)")
        try:
            tensors[name.removesuffix(".safetensors")] = load_file(file)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint {path}: cannot read {name} ({e})") from e
    return state, tensors


def _is_int(value: Any, minimum: int) -> bool:
    """An ``int`` (not a ``bool``) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_digests(files: Any) -> bool:
    """A mapping of plain ``*.safetensors`` file names to SHA-256 hex digests (strings)."""
    return isinstance(files, dict) and all(
        isinstance(k, str) and Path(k).name == k and k.endswith(".safetensors") and isinstance(v, str)
        for k, v in files.items()
    )


# state.json fields that resuming reads: (name, test, what the test wants)
STATE_FIELDS = (
    ("files", _is_digests, "a mapping of *.safetensors file names to SHA-256 digests"),
    ("step", lambda v: _is_int(v, 1), "an integer >= 1"),
    ("tokens", lambda v: _is_int(v, 0), "an integer >= 0"),
    ("scheduler", lambda v: isinstance(v, dict), "a mapping (the LR scheduler's state)"),
    ("optimizer_groups", lambda v: isinstance(v, list) and all(isinstance(g, dict) for g in v),
     "a list of mappings (the optimizer's parameter groups)"),
    ("model_config", lambda v: isinstance(v, dict), "a mapping (the model's config)"),
    ("train_config", lambda v: isinstance(v, dict), "a mapping (the training config)"),
    ("data", lambda v: isinstance(v, str), "a string (the training data's fingerprint)"),
)  # fmt: skip


def check_state(state: Any, path: Path) -> None:
    """Raise :class:`CheckpointError` naming the first field of a checkpoint's ``state.json`` that is missing, of the
    wrong type or out of range, or that disagrees with the others."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path}: state.json is not a bmojo checkpoint of format {CHECKPOINT_FORMAT}")
    for name, valid, wanted in STATE_FIELDS:
        if name not in state:
            raise CheckpointError(f"checkpoint {path}: state.json has no {name!r} field")
        if not valid(state[name]):
            raise CheckpointError(
                f"checkpoint {path}: state.json field {name!r} must be {wanted}, got {reprlib.repr(state[name])}"
            )
    missing = [f"{n}.safetensors" for n in CHECKPOINT_TENSORS if f"{n}.safetensors" not in state["files"]]
    if missing:
        raise CheckpointError(f"checkpoint {path}: state.json field 'files' lacks {missing}")
    if state["scheduler"].get("last_epoch") != state["step"]:
        raise CheckpointError(
            f"checkpoint {path}: state.json field 'scheduler' is at step {state['scheduler'].get('last_epoch')!r}, "
            f"not at the checkpoint's step {state['step']}"
        )


def _differences(saved: dict[str, Any], current: dict[str, Any], ignore: frozenset[str] = frozenset()) -> list[str]:
    """``key: saved -> current`` for every key whose JSON value differs."""
    current = json.loads(json.dumps(current))
    keys = sorted((set(saved) | set(current)) - ignore)
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def check_compatible(state: dict[str, Any], path: Path, cfg: TrainConfig, config: BMojoConfig, data_id: str) -> None:
    """Raise :class:`CheckpointError` if the checkpoint was written by a different run (model, settings or data)."""
    model_diff = _differences(state.get("model_config", {}), config.to_dict(), frozenset({"transformers_version"}))
    if model_diff:
        raise CheckpointError(f"checkpoint {path} holds a different model: " + "; ".join(model_diff))
    train_diff = _differences(state.get("train_config", {}), asdict(cfg), RESUMABLE_CHANGES)
    if train_diff:
        raise CheckpointError(f"checkpoint {path} was written with other training settings: " + "; ".join(train_diff))
    if state.get("data") != data_id:
        raise CheckpointError(f"checkpoint {path} was trained on different token data (fingerprint mismatch)")


# ----------------------------------------------------------------------------------------------- the trainer


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast when asked for (or ``auto`` on a GPU that supports it), else nothing."""
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if cfg.dtype == "bfloat16" and device.type == "cuda" and not bf16_gpu:
        raise ConfigError("dtype=bfloat16 but this GPU does not support bfloat16")
    enabled = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and bf16_gpu)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _objective(
    model: nn.Module, windows: torch.Tensor, cfg: TrainConfig, teacher: nn.Module | None, aux_weight: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training loss on windows ``[b, L + 1]``: cross-entropy of next tokens + innovation loss (+ distillation)."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    if teacher is None:  # the model's own loss, which in training needs no logits (config.loss_chunk_size)
        return model(input_ids=inputs, shift_labels=targets, use_cache=False).loss, None
    out = model(input_ids=inputs, use_cache=False)
    loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    if out.aux_loss is not None:
        loss = loss + aux_weight * out.aux_loss
    with torch.no_grad():
        teacher_logits = teacher(input_ids=inputs, use_cache=False).logits
    kl = distill_kl(out.logits, teacher_logits, cfg.distill_temperature)
    return loss + cfg.distill_weight * kl, kl


@torch.no_grad()
def evaluate(model: nn.Module, val: np.ndarray, cfg: TrainConfig, info: DistInfo, micro: int) -> float:
    """Mean next-token cross-entropy over ``eval_batches * batch_size`` fixed validation windows."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    windows = sample_windows(val, cfg.eval_batches * cfg.batch_size, cfg.seq_len, generator)
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for mb in micro_batches(windows, info.rank, info.world, micro):
        mb = mb.to(info.device)
        with _autocast(cfg, info.device):
            logits = model(input_ids=mb[:, :-1], use_cache=False).logits
        total[0] += F.cross_entropy(logits.flatten(0, 1).float(), mb[:, 1:].flatten(), reduction="sum").item()
        total[1] += mb[:, 1:].numel()
    model.train()
    total = _all_reduce_sum(total, info)
    return float(total[0] / total[1])


def plot_loss_curve(records: list[dict[str, Any]], path: Path) -> Path:
    """Training and validation loss against step from metrics records, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key == "val_loss" else None, markersize=4, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class _Metrics:
    """``metrics.jsonl`` of a run (rank 0 writes); on resume, records after the checkpoint step are dropped."""

    def __init__(self, out_dir: Path, start_step: int, active: bool) -> None:
        self.path, self.active, self.records = out_dir / "metrics.jsonl", active, []
        if not active:
            return
        if start_step and self.path.is_file():
            self.records = [r for r in read_metrics(out_dir) if r["step"] <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict[str, Any]) -> None:
        if self.active:
            self.records.append(record)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _progress(active: bool, total: int, start: int) -> tuple[Any, Any]:
    """A rich progress bar (loss, tokens/s) and its task id; disabled off rank 0 or when ``active`` is False."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(), disable=not active,
    )  # fmt: skip
    return bar, bar.add_task("train", total=total, completed=start, loss="-", tps="-")


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (gathered, CPU) model and flattened optimizer state dicts; empty on ranks other than 0."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    return model_sd, optim_sd


def flatten_optimizer_state(optim_sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """A full optimizer state dict (parameters named by FQN) -> tensors keyed ``fqn/name`` and the param groups."""
    tensors = {f"{fqn}/{name}": v for fqn, state in optim_sd["state"].items() for name, v in state.items()}
    return tensors, optim_sd["param_groups"]


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        fqn, _, name = key.rpartition("/")
        state.setdefault(fqn, {})[name] = value
    return {"state": state, "param_groups": groups}


def train(
    cfg: TrainConfig,
    train_tokens: Any,
    val_tokens: Any,
    tokenizer: Any | None = None,
    vocab_size: int | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train on 1-D token arrays; return ``{step, loss, val_loss, final}`` (rank 0's view).

    ``vocab_size`` defaults to ``tokenizer.vocab_size``. With ``resume``, continue from the latest
    checkpoint in ``cfg.out_dir`` (an error if there is none); without it, an error if there is one.
    """
    info = setup_distributed(cfg.device)
    try:
        return _train(cfg, train_tokens, val_tokens, tokenizer, vocab_size, resume, info)
    finally:
        if info.initialized_here:
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig, train_tokens: Any, val_tokens: Any, tokenizer: Any | None, vocab_size: int | None, resume: bool,
    info: DistInfo,
) -> dict[str, Any]:  # fmt: skip
    if vocab_size is None:
        if tokenizer is None:
            raise ConfigError("pass a tokenizer or vocab_size")
        vocab_size = tokenizer.vocab_size
    config = build_model_config(cfg, vocab_size, getattr(tokenizer, "eos_id", None))
    train_t = _as_tokens("training data", train_tokens, cfg.seq_len, config.vocab_size)
    val_t = _as_tokens("validation data", val_tokens, cfg.seq_len, config.vocab_size) if cfg.eval_every else None
    if cfg.batch_size % info.world:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {info.world} processes")
    micro = cfg.micro_batch_size or cfg.batch_size // info.world
    if (cfg.batch_size // info.world) % micro:
        raise ConfigError(
            f"micro_batch_size={micro} does not divide the per-process batch {cfg.batch_size // info.world}"
        )
    data_id = _fingerprint(train_t)

    out_dir, is_main = Path(cfg.out_dir), info.rank == 0
    check_out_dir(out_dir)
    ckpt_root = out_dir / "checkpoints"
    existing = list_checkpoints(ckpt_root)
    if resume and not existing:
        raise CheckpointError(f"--resume given but {ckpt_root} holds no checkpoint")
    if existing and not resume:
        raise CheckpointError(f"{ckpt_root} already holds checkpoints: pass --resume, or choose another out_dir")
    state, tensors = read_checkpoint(existing[-1]) if resume else ({}, {})

    torch.manual_seed(cfg.seed)
    base = BMojoForCausalLM(config)
    if cfg.init_from and not resume:
        load_initial_weights(base, cfg.init_from)
    base = base.to(info.device)
    if resume:
        check_compatible(state, existing[-1], cfg, config, data_id)
    aliases = _tied_aliases(base)
    if cfg.activation_checkpointing:
        base.activation_checkpointing_enable()
    if cfg.compile and cfg.distributed != "fsdp":
        base.compile()
    model = wrap_model(base, cfg.distributed, info)
    if cfg.compile and cfg.distributed == "fsdp":
        base.compile()
    optimizer = torch.optim.AdamW(
        param_groups(base, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, cfg.steps, cfg.warmup_steps))
    generator = torch.Generator().manual_seed(cfg.seed)
    start = tokens = 0
    if resume:
        _restore(existing[-1], state, tensors, model, optimizer, scheduler, generator, aliases)
        start, tokens = state["step"], state["tokens"]
    teacher = load_teacher(cfg.teacher, config.vocab_size, info.device) if cfg.teacher else None

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    metrics = _Metrics(out_dir, start, is_main)
    bar, task = _progress(is_main and cfg.progress, cfg.steps, start)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=info.device)  # [loss, kl] summed since the last log
    last: dict[str, Any] = {"step": start}
    t0, tokens0, since_log = time.perf_counter(), tokens, 0
    model.train()
    with bar:
        for step in range(start + 1, cfg.steps + 1):
            windows = sample_windows(train_t, cfg.batch_size, cfg.seq_len, generator)
            pieces = micro_batches(windows, info.rank, info.world, micro)
            loss_sum += _accumulate_gradients(model, pieces, cfg, info, teacher, config.innovation_loss_weight)
            norm = torch.nn.utils.clip_grad_norm_(base.parameters(), cfg.grad_clip or math.inf)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += cfg.batch_size * cfg.seq_len
            since_log += 1

            saving = (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps
            if step % cfg.log_every == 0 or saving:
                reduced = _all_reduce_sum(loss_sum.clone(), info) / (info.world * since_log)
                if not bool(reduced.isfinite().all()):  # (before a checkpoint could keep the weights it made)
                    raise DivergedError(f"the training loss is {float(reduced[0])} at step {step} (diverged): "
                                        f"lower lr or set grad_clip, and resume from the last checkpoint in "
                                        f"{ckpt_root}")  # fmt: skip
            if step % cfg.log_every == 0 or step == cfg.steps:
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                tps = (tokens - tokens0) / (time.perf_counter() - t0)
                last = {"step": step, "loss": float(reduced[0]), "lr": lr, "grad_norm": float(norm), "tokens": tokens,
                        "tokens_per_s": tps}  # fmt: skip
                if teacher is not None:
                    last["kl"] = float(reduced[1])
                metrics.log(last)
                loss_sum.zero_()
                since_log = 0
                bar.update(task, loss=f"{last['loss']:.4f}", tps=f"{tps:,.0f}")
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                val_loss = evaluate(model, val_t, cfg, info, micro)
                metrics.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
                if is_main:
                    plot_loss_curve(metrics.records, out_dir / "loss_curve.png")
            if saving:
                _save(model, optimizer, scheduler, generator, aliases, cfg, config, data_id, step, tokens, info)
            bar.update(task, completed=step)

    final = _save_final(model, config, tokenizer, out_dir, info)
    if is_main:
        plot_loss_curve(metrics.records, out_dir / "loss_curve.png")
    val = [r["val_loss"] for r in metrics.records if "val_loss" in r]
    return {"step": cfg.steps, "loss": last.get("loss"), "val_loss": val[-1] if val else None, "final": final}


def _accumulate_gradients(
    model: nn.Module, pieces: Sequence[torch.Tensor], cfg: TrainConfig, info: DistInfo, teacher: nn.Module | None,
    aux_weight: float,
) -> torch.Tensor:  # fmt: skip
    """Backward of the mean objective over this rank's micro-batches; returns ``[mean loss, mean KL]`` (float64)."""
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    for i, mb in enumerate(pieces):
        with _gradient_sync(model, i == len(pieces) - 1):
            with _autocast(cfg, info.device):
                loss, kl = _objective(model, mb.to(info.device), cfg, teacher, aux_weight)
            (loss / len(pieces)).backward()
        total[0] += loss.detach() / len(pieces)
        if kl is not None:
            total[1] += kl.detach() / len(pieces)
    return total


def _restore(
    path: Path, state: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]], model: nn.Module,
    optimizer: torch.optim.Optimizer, scheduler: Any, generator: torch.Generator, aliases: dict[str, str],
) -> None:  # fmt: skip
    """Load a checkpoint read by :func:`read_checkpoint` into the (possibly wrapped) model, optimizer and RNGs."""
    model_sd = dict(tensors["model"])
    model_sd.update({alias: model_sd[target] for alias, target in aliases.items() if target in model_sd})
    try:
        set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True))
        optim_sd = unflatten_optimizer_state(tensors["optimizer"], state["optimizer_groups"])
        set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(tensors["rng"]["data"])
        torch.set_rng_state(tensors["rng"]["torch"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model and optimizer: {e}") from e


def _save(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, generator: torch.Generator,
    aliases: dict[str, str], cfg: TrainConfig, config: BMojoConfig, data_id: str, step: int, tokens: int,
    info: DistInfo,
) -> None:  # fmt: skip
    """Gather the full state on rank 0 and write one checkpoint (a collective call: every rank enters)."""
    model_sd, optim_sd = _state_dicts(model, optimizer)
    if info.rank == 0:
        optim_tensors, optim_groups = flatten_optimizer_state(optim_sd)
        tensors = {
            "model": {k: v for k, v in model_sd.items() if k not in aliases},
            "optimizer": optim_tensors,
            "rng": {"data": generator.get_state(), "torch": torch.get_rng_state()},
        }
        state = {
            "tokens": tokens, "train_config": asdict(cfg), "model_config": config.to_dict(), "data": data_id,
            "world_size": info.world, "scheduler": scheduler.state_dict(),
            "optimizer_groups": optim_groups,
        }  # fmt: skip
        write_checkpoint(Path(cfg.out_dir) / "checkpoints", step, tensors, state, cfg.keep_checkpoints)
    if info.world > 1:
        dist.barrier()


def _save_final(model: nn.Module, config: BMojoConfig, tokenizer: Any | None, out_dir: Path, info: DistInfo) -> Path:
    """``out_dir/final``: ``save_pretrained`` of the gathered weights plus the tokenizer (rank 0 writes)."""
    model_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = out_dir / "final"
    if info.rank == 0:
        clean = BMojoForCausalLM(config)
        clean.load_state_dict(model_sd)
        tmp = out_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        clean.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if info.world > 1:
        dist.barrier()
    return final


def run(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Load the tokenizer and corpus named by ``cfg`` (``bmojo.data``), then :func:`train`."""
    if not cfg.data:
        raise ConfigError("data: no training text files given")
    check_out_dir(Path(cfg.out_dir))  # before the corpus is read and tokenized
    from bmojo.data import load_corpus, load_tokenizer

    info = setup_distributed(cfg.device)
    try:
        if info.rank != 0:
            dist.barrier()  # rank 0 tokenizes first and fills the cache
        tok = load_tokenizer(cfg.tokenizer)
        corpus = load_corpus(
            cfg.data, tokenizer=tok, cache_dir=cfg.cache_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
            progress=cfg.progress and info.rank == 0,
        )  # fmt: skip
        if info.world > 1 and info.rank == 0:
            dist.barrier()
        return train(cfg, corpus.train, corpus.val, tokenizer=tok, resume=resume)
    finally:
        if info.initialized_here:
            dist.destroy_process_group()


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``; a line torn by a killed process is skipped."""
    records = []
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records
