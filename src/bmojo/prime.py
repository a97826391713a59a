"""Priming: a B'MOJO(-F) model made from a pretrained Transformer by replacing some of its attention layers.

Each chosen attention layer becomes a ``bmojo`` (or ``bmojo-f``) mixer whose ``q/k/v/o`` projections (and q/k
norms, biases) are the replaced layer's; its SSM, eidetic predictor and untied fading projections (if
``tie_fading_kv=False``) are fresh, initialised as ``BMojoForCausalLM._init_weights`` does. Every other tensor is
copied by name, so unreplaced layers compute exactly what they computed before. With a window at least as long as
the input, a primed layer sees no fading band and no eidetic token, and equals the attention layer it replaced.

Quality is then recovered by fine-tuning or distilling from the original (``bmojo train`` with ``teacher:``).
"""

from __future__ import annotations

import numbers
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel

from bmojo.data import MARKER
from bmojo.models.config import BMojoConfig
from bmojo.models.convert import from_hf
from bmojo.models.modeling import BMojoForCausalLM

TOKENIZER_FILES = (
    MARKER, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja",
)  # fmt: skip
PRIMED_KINDS = ("bmojo", "bmojo-f")
SOURCE_KINDS = ("attention", "swa")
# submodules of a primed mixer that the attention layer it replaces does not have
FRESH_MODULES = ("ssm", "memory", "fading_k_proj", "fading_v_proj")
_SSM = ("mamba", "mamba2", "bmojo-f", "bmojo")
# mixer overrides -> the layer kinds whose computation each changes
OVERRIDES: dict[str, tuple[str, ...]] = {
    "window_size": ("swa", "bmojo-f", "bmojo"),
    "eidetic_size": ("bmojo",),
    "chunk_size": ("bmojo",),
    "selection": ("bmojo",),
    "bmojo_ssm": ("bmojo-f", "bmojo"),
    "tie_fading_kv": ("bmojo-f", "bmojo"),
    "state_size": ("mamba", "bmojo-f", "bmojo"),
    "mamba2_state_size": ("bmojo-f", "bmojo"),
    "expand": _SSM,
    "conv_kernel": _SSM,
    "time_step_rank": _SSM,
    "mamba2_head_dim": _SSM,
    "n_groups": _SSM,
    "ssm_chunk_size": _SSM,
    "attention_block_size": (),  # a block size of the banded attention: changes speed, not results
}


def load_source(model: BMojoForCausalLM | PreTrainedModel | str | Path) -> BMojoForCausalLM:
    """``model`` as a :class:`BMojoForCausalLM`: as is, from a bmojo folder, or converted from a Hugging Face
    causal LM (a model or a folder) by :func:`bmojo.models.convert.from_hf`."""
    if isinstance(model, BMojoForCausalLM):
        return model
    if isinstance(model, PreTrainedModel):
        return from_hf(model)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
    if AutoConfig.from_pretrained(path).model_type == BMojoConfig.model_type:
        return BMojoForCausalLM.from_pretrained(path)
    return from_hf(path)


def resolve_layers(pattern: list[str], layers: str | Iterable[int]) -> list[int]:
    """Sorted indices of the layers to replace: ``"every-second"`` (the 2nd, 4th, ... attention layer) or a list.

    Raises ``TypeError`` for a non-integer index; ``ValueError`` for an unknown spec, an index out of range, a
    repeated index, a layer that is not an attention layer, or an empty choice.
    """
    n = len(pattern)
    if isinstance(layers, str):
        if layers != "every-second":
            raise ValueError(f"layers must be 'every-second' or a list of layer indices, got {layers!r}")
        attention = [i for i, kind in enumerate(pattern) if kind in SOURCE_KINDS]
        if len(attention) < 2:
            raise ValueError(f"'every-second' chooses no layer: the model has {len(attention)} attention layers")
        return attention[1::2]
    chosen = list(layers)
    if not chosen:
        raise ValueError("layers is empty: name at least one layer to replace")
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"layer indices must be integers, got {i!r}")
        if not 0 <= i < n:
            raise ValueError(f"layer index {i} is out of range: the model has {n} layers (0..{n - 1})")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layer indices repeat: {chosen}")
    for i in chosen:
        if pattern[i] not in SOURCE_KINDS:
            raise ValueError(f"layer {i} is a {pattern[i]!r} layer, not attention: only {SOURCE_KINDS} can be primed")
    return sorted(int(i) for i in chosen)


def primed_config(config: BMojoConfig, layers: list[int], kind: str, **overrides: Any) -> BMojoConfig:
    """``config`` with ``layers`` turned into ``kind`` and mixer ``overrides`` applied.

    Raises ``ValueError`` for an unknown kind, a field that is not a mixer override, or an override that would
    change an unreplaced layer (e.g. ``window_size`` while sliding-window layers stay).
    """
    if kind not in PRIMED_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {PRIMED_KINDS}")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"{unknown} cannot be overridden when priming; mixer overrides are {sorted(OVERRIDES)}")
    pattern = [kind if i in layers else k for i, k in enumerate(config.layer_pattern)]
    new = BMojoConfig.from_dict({**config.to_dict(), **overrides, "layer_pattern": pattern})
    kept = {k for i, k in enumerate(config.layer_pattern) if i not in layers}
    mamba2_state = config.mamba2_state_size or config.state_size, new.mamba2_state_size or new.state_size
    changed = {name: OVERRIDES[name] for name in overrides if getattr(config, name) != getattr(new, name)}
    if mamba2_state[0] != mamba2_state[1]:
        changed["mamba2 state size"] = ("mamba2",)
    for name, kinds in changed.items():
        hit = sorted(kept & set(kinds))
        if hit:
            raise ValueError(f"overriding {name} would change the unreplaced {hit} layers; prime those too or keep it")
    return new


def fresh_parameter_names(model: BMojoForCausalLM, layers: Iterable[int]) -> list[str]:
    """Names of the parameters of ``layers`` in ``model`` that priming initialises fresh (:data:`FRESH_MODULES`)."""
    prefixes = tuple(f"model.layers.{i}.mixer.{m}." for i in layers for m in FRESH_MODULES)
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


def prime(
    model: BMojoForCausalLM | PreTrainedModel | str | Path,
    layers: str | list[int] = "every-second",
    kind: str = "bmojo",
    seed: int | None = None,
    **overrides: Any,
) -> BMojoForCausalLM:
    """A B'MOJO(-F) model made from a Transformer: ``layers`` become ``kind`` mixers, every other weight is copied.

    ``model``: a :class:`BMojoForCausalLM`, a bmojo folder, or a Hugging Face causal LM / folder (via ``from_hf``).
    ``layers``: ``"every-second"`` (the 2nd, 4th, ... attention layer) or layer indices. ``overrides``: mixer
    fields (:data:`OVERRIDES`: ``window_size``, ``eidetic_size``, ``chunk_size``, ``bmojo_ssm``, ``state_size``,
    ``mamba2_state_size``, ...). The replaced layers keep their ``q/k/v/o`` projections; the parameters
    :func:`fresh_parameter_names` lists are initialised as the model's ``_init_weights`` does, from ``seed``
    (``None``: the global torch RNG). Raises ``ValueError`` naming any tensor that is missing, unexpected or of
    another shape.
    """
    source = load_source(model)
    chosen = resolve_layers(source.config.layer_pattern, layers)
    config = primed_config(source.config, chosen, kind, **overrides)
    state = source.state_dict()
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        primed = BMojoForCausalLM._from_config(config, dtype=dtype).to(next(iter(state.values())).device)
    expected = primed.state_dict()
    fresh = set(fresh_parameter_names(primed, chosen))
    missing = sorted(set(expected) - set(state) - fresh)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"the source's tensors do not map onto the primed model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            shapes = f"{tuple(tensor.shape)} in the source, {tuple(expected[name].shape)} in the primed model"
            raise ValueError(f"tensor {name} changes shape: {shapes}")
    primed.load_state_dict(state, strict=False)  # checked above: exactly the fresh tensors are not copied
    return primed.train(source.training)


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files of folder ``src`` (:data:`TOKENIZER_FILES` present there) into ``dst``; their names."""
    src, dst = Path(src), Path(dst)
    names = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in names:
        shutil.copy2(src / name, dst / name)
    return names
