"""Conversion between Hugging Face causal language models and :class:`BMojoForCausalLM`.

Supported families: Llama, Mistral (sliding window), Qwen2 (q/k/v biases, per-layer sliding window),
Qwen3 (per-head q/k RMSNorm), Mamba, Mamba-2 and Jamba (dense layers: mixture-of-experts is refused).
Every family is a configuration of our one block (``RMSNorm -> mixer -> residual -> RMSNorm -> SwiGLU
-> residual``), so conversion is a renaming of tensors plus a translation of the config. A config feature
we do not reproduce exactly (a RoPE scaling type, another activation, MoE, ...) raises ``ValueError``
naming it: a conversion never succeeds with different outputs. Fields that only shape initialisation
(``initializer_range``, Mamba's ``time_step_*`` init ranges, ``rescale_prenorm_residual``) do not matter.
Outputs agree to float32 rounding in float32; in lower precision they differ by rounding, as Mamba's
``residual_in_fp32`` keeps its residual stream in float32 where ours stays in the model's dtype.

- :func:`from_hf` / :func:`to_hf`: in memory, model to model (``to_hf(from_hf(m))`` has ``m``'s tensors).
- :func:`convert_checkpoint`: folder to folder, one safetensors file at a time, in either direction.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from bmojo.models.config import BMojoConfig
from bmojo.models.modeling import BMojoForCausalLM

# (Hugging Face prefix, bmojo prefix); "{i}" stands for a layer index. Keys no rule matches keep their name.
Renames = tuple[tuple[str, str], ...]

_ATTENTION_RENAMES: Renames = (("model.layers.{i}.self_attn.", "model.layers.{i}.mixer.attn."),)
_MAMBA_RENAMES: Renames = (
    ("backbone.embeddings.", "model.embed_tokens."),
    ("backbone.layers.{i}.norm.", "model.layers.{i}.input_layernorm."),
    ("backbone.layers.{i}.mixer.", "model.layers.{i}.mixer.ssm."),
    ("backbone.norm_f.", "model.norm."),
)
_JAMBA_RENAMES: Renames = (
    *_ATTENTION_RENAMES,
    ("model.layers.{i}.mamba.", "model.layers.{i}.mixer.ssm."),
    ("model.layers.{i}.feed_forward.", "model.layers.{i}.mlp."),
    ("model.layers.{i}.pre_ff_layernorm.", "model.layers.{i}.post_attention_layernorm."),
    ("model.final_layernorm.", "model.norm."),
)


@dataclass(frozen=True)
class Family:
    """A Hugging Face model family: its causal-LM class name and how its tensor names map to ours."""

    hf_class: str
    renames: Renames


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", _ATTENTION_RENAMES),
    "mistral": Family("MistralForCausalLM", _ATTENTION_RENAMES),
    "qwen2": Family("Qwen2ForCausalLM", _ATTENTION_RENAMES),
    "qwen3": Family("Qwen3ForCausalLM", _ATTENTION_RENAMES),
    "mamba": Family("MambaForCausalLM", _MAMBA_RENAMES),
    "mamba2": Family("Mamba2ForCausalLM", _MAMBA_RENAMES),
    "jamba": Family("JambaForCausalLM", _JAMBA_RENAMES),
}
SILU = ("silu", "swish")


def _family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def rename_key(key: str, renames: Renames, reverse: bool = False) -> str:
    """``key`` renamed by the first matching prefix rule (Hugging Face -> bmojo, or back with ``reverse``)."""
    for hf, ours in renames:
        src, dst = (ours, hf) if reverse else (hf, ours)
        m = re.match(re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)"), key)
        if m:
            return (dst.replace("{i}", m["i"]) if "{i}" in src else dst) + key[m.end() :]
    return key


def pattern_summary(kinds: list[str]) -> str:
    """Run-length summary of a layer pattern, e.g. ``"mamba x3, attention, mamba x4"``."""
    runs = [(kind, len(list(group))) for kind, group in groupby(kinds)]
    return ", ".join(kind if n == 1 else f"{kind} x{n}" for kind, n in runs)


# ---------------------------------------------------------------- configs: Hugging Face -> bmojo
def _refuse(model_type: str, feature: str) -> ValueError:
    return ValueError(f"cannot convert {model_type}: {feature} is not supported by bmojo")


def _common_fields(cfg: PretrainedConfig) -> dict[str, Any]:
    """Fields every family shares; refuses activations other than SiLU."""
    act = getattr(cfg, "hidden_act", "silu")
    if act not in SILU:
        raise _refuse(cfg.model_type, f"hidden_act={act!r} (bmojo's MLP and SSM activations are SiLU)")
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        tie_word_embeddings=bool(cfg.tie_word_embeddings), initializer_range=cfg.initializer_range,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )  # fmt: skip


def _attention_fields(cfg: PretrainedConfig) -> dict[str, Any]:
    """Attention and MLP fields of a Llama-like config; refuses RoPE scaling, partial RoPE and MLP biases."""
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise _refuse(cfg.model_type, f"rope_scaling / rope_parameters with rope_type={rope_type!r}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(cfg.model_type, f"partial_rotary_factor={rope['partial_rotary_factor']}")
    if getattr(cfg, "mlp_bias", False):
        raise _refuse(cfg.model_type, "mlp_bias=True")
    if getattr(cfg, "attention_dropout", 0.0):
        raise _refuse(cfg.model_type, f"attention_dropout={cfg.attention_dropout}")
    return dict(
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_norm_eps, use_mlp=True,
        rope_theta=rope.get("rope_theta", getattr(cfg, "default_theta", 10000.0)),
    )  # fmt: skip


def _layer_kinds(cfg: PretrainedConfig) -> list[str]:
    """``attention`` / ``swa`` per layer from Qwen-style ``layer_types`` (``sliding_window=None``: all full)."""
    kinds = []
    for t in cfg.layer_types:
        if t not in ("full_attention", "sliding_attention"):
            raise _refuse(cfg.model_type, f"layer type {t!r}")
        kinds.append("swa" if t == "sliding_attention" and cfg.sliding_window is not None else "attention")
    return kinds


def _expand(cfg: PretrainedConfig, intermediate: int) -> int:
    if intermediate % cfg.hidden_size:
        raise _refuse(cfg.model_type, f"an SSM width {intermediate} that is not a multiple of hidden_size")
    return intermediate // cfg.hidden_size


def _llama_fields(cfg: PretrainedConfig) -> dict[str, Any]:
    if cfg.attention_bias:
        raise _refuse(cfg.model_type, "attention_bias=True (biases on q/k/v and o_proj)")
    return dict(_attention_fields(cfg), layer_pattern=["attention"] * cfg.num_hidden_layers)


def _mistral_fields(cfg: PretrainedConfig) -> dict[str, Any]:
    window = cfg.sliding_window
    kind = "attention" if window is None else "swa"
    fields = dict(_attention_fields(cfg), layer_pattern=[kind] * cfg.num_hidden_layers)
    return fields if window is None else dict(fields, window_size=window)


def _qwen_fields(cfg: PretrainedConfig) -> dict[str, Any]:
    kinds = _layer_kinds(cfg)
    fields = dict(_attention_fields(cfg), layer_pattern=kinds)
    if cfg.model_type == "qwen2":
        fields["attention_bias"] = True  # Qwen2: q/k/v biases, none on o_proj
    else:
        if cfg.attention_bias:
            raise _refuse(cfg.model_type, "attention_bias=True (biases on q/k/v and o_proj)")
        fields["qk_norm"] = True
    return fields if "swa" not in kinds else dict(fields, window_size=cfg.sliding_window)


def _mamba_fields(cfg: PretrainedConfig) -> dict[str, Any]:
    return dict(
        layer_pattern=["mamba"] * cfg.num_hidden_layers, use_mlp=False, state_size=cfg.state_size,
        expand=_expand(cfg, cfg.intermediate_size), conv_kernel=cfg.conv_kernel,
        time_step_rank=int(cfg.time_step_rank), ssm_bias=cfg.use_bias, ssm_conv_bias=cfg.use_conv_bias,
        rms_norm_eps=cfg.layer_norm_epsilon,
    )  # fmt: skip


def _mamba2_fields(cfg: PretrainedConfig) -> dict[str, Any]:
    limit = tuple(float(x) for x in cfg.time_step_limit)
    if limit != (0.0, math.inf):
        raise _refuse(cfg.model_type, f"time_step_limit={limit} (dt clamping)")
    e = int(cfg.expand * cfg.hidden_size)
    if cfg.num_heads * cfg.head_dim != e:
        raise _refuse(cfg.model_type, f"num_heads * head_dim ({cfg.num_heads} * {cfg.head_dim}) != {e}")
    return dict(
        layer_pattern=["mamba2"] * cfg.num_hidden_layers, use_mlp=False, state_size=cfg.state_size,
        expand=_expand(cfg, e), mamba2_head_dim=cfg.head_dim, n_groups=cfg.n_groups, conv_kernel=cfg.conv_kernel,
        ssm_chunk_size=cfg.chunk_size, ssm_bias=cfg.use_bias, ssm_conv_bias=cfg.use_conv_bias,
        rms_norm_eps=cfg.layer_norm_epsilon,
    )  # fmt: skip


def _jamba_fields(cfg: PretrainedConfig) -> dict[str, Any]:
    moe = [i for i, n in enumerate(cfg.layers_num_experts) if n > 1]
    if moe:
        raise _refuse(cfg.model_type, f"mixture-of-experts (MoE) layers {moe} with num_experts={cfg.num_experts}")
    if getattr(cfg, "sliding_window", None) is not None:
        raise _refuse(cfg.model_type, f"sliding_window={cfg.sliding_window}")
    fields = _attention_fields(cfg)
    return dict(
        fields, layer_pattern=["attention" if t == "attention" else "mamba" for t in cfg.layers_block_type],
        use_rope=False, mamba_dt_bc_norm=True, state_size=cfg.mamba_d_state, expand=cfg.mamba_expand,
        conv_kernel=cfg.mamba_d_conv, time_step_rank=int(cfg.mamba_dt_rank), ssm_bias=cfg.mamba_proj_bias,
        ssm_conv_bias=cfg.mamba_conv_bias,
    )  # fmt: skip


_TO_BMOJO: dict[str, Callable[[PretrainedConfig], dict[str, Any]]] = {
    "llama": _llama_fields, "mistral": _mistral_fields, "qwen2": _qwen_fields, "qwen3": _qwen_fields,
    "mamba": _mamba_fields, "mamba2": _mamba2_fields, "jamba": _jamba_fields,
}  # fmt: skip


def bmojo_config_from_hf(cfg: PretrainedConfig) -> BMojoConfig:
    """The :class:`BMojoConfig` of a Hugging Face config; ``ValueError`` naming any feature we do not reproduce."""
    _family(cfg.model_type)
    fields = {**_common_fields(cfg), **_TO_BMOJO[cfg.model_type](cfg)}
    hf = {k: v for k, v in cfg.to_diff_dict().items() if k != "transformers_version"}
    return BMojoConfig(**fields, hf_config=hf, dtype=getattr(cfg, "dtype", None))


# ---------------------------------------------------------------- configs: bmojo -> Hugging Face
def _cannot(model_type: str, feature: str) -> ValueError:
    return ValueError(f"cannot express this bmojo model as {model_type}: {feature}")


def infer_family(cfg: BMojoConfig) -> str:
    """The Hugging Face family a bmojo config corresponds to (``ValueError`` when none does)."""
    kinds = set(cfg.layer_pattern)
    if kinds in ({"mamba"}, {"mamba2"}) and not cfg.use_mlp and not cfg.mamba_dt_bc_norm:
        return kinds.pop()
    if kinds <= {"attention", "mamba"} and ("mamba" in kinds or not cfg.use_rope):
        return "jamba"
    if kinds <= {"attention", "swa"}:
        if cfg.qk_norm:
            return "qwen3"
        if cfg.attention_bias:
            return "qwen2"
        if len(kinds) == 1:
            return "mistral" if kinds == {"swa"} else "llama"
    raise ValueError(
        f"no supported Hugging Face family ({', '.join(FAMILIES)}) has this layer pattern and these options: "
        f"{pattern_summary(cfg.layer_pattern)} (use_mlp={cfg.use_mlp}, use_rope={cfg.use_rope}, "
        f"qk_norm={cfg.qk_norm}, attention_bias={cfg.attention_bias}, mamba_dt_bc_norm={cfg.mamba_dt_bc_norm})"
    )


def _require(ok: bool, model_type: str, feature: str) -> None:
    if not ok:
        raise _cannot(model_type, feature)


def _hf_attention(cfg: BMojoConfig, model_type: str, kinds: set[str]) -> dict[str, Any]:
    """Llama-like attention/MLP fields, after checking the layer kinds and options the family allows."""
    bad = sorted(set(cfg.layer_pattern) - kinds)
    _require(not bad, model_type, f"layer kinds {bad} (it has only {sorted(kinds)})")
    _require(cfg.use_mlp, model_type, "use_mlp=False (it always has an MLP)")
    _require(cfg.use_rope or model_type == "jamba", model_type, "use_rope=False (it always applies RoPE)")
    _require(cfg.partial_rotary_factor == 1.0 or not cfg.use_rope, model_type,
             f"partial_rotary_factor={cfg.partial_rotary_factor} (it rotates whole heads)")  # fmt: skip
    _require(not cfg.qk_norm or model_type == "qwen3", model_type, "qk_norm=True")
    _require(not cfg.attention_bias or model_type == "qwen2", model_type, "attention_bias=True (q/k/v biases)")
    return dict(
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        rms_norm_eps=cfg.rms_norm_eps, hidden_act="silu",
    )  # fmt: skip


def _rope(cfg: BMojoConfig) -> dict[str, Any]:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}


def _hf_llama(cfg: BMojoConfig) -> dict[str, Any]:
    return {**_hf_attention(cfg, "llama", {"attention"}), **_rope(cfg), "attention_bias": False, "mlp_bias": False}


def _hf_mistral(cfg: BMojoConfig) -> dict[str, Any]:
    fields = _hf_attention(cfg, "mistral", {"attention", "swa"})
    _require(len(set(cfg.layer_pattern)) == 1, "mistral", "a mix of full and sliding-window attention layers")
    return {**fields, **_rope(cfg), "sliding_window": cfg.window_size if "swa" in cfg.layer_pattern else None}


def _hf_qwen(cfg: BMojoConfig, model_type: str) -> dict[str, Any]:
    fields = {**_hf_attention(cfg, model_type, {"attention", "swa"}), **_rope(cfg)}
    if model_type == "qwen2":
        _require(cfg.attention_bias, model_type, "attention_bias=False (Qwen2 always has q/k/v biases)")
    else:
        _require(cfg.qk_norm, model_type, "qk_norm=False (Qwen3 always normalises q and k)")
        fields["attention_bias"] = False
    sliding = "swa" in cfg.layer_pattern
    return dict(
        fields, use_sliding_window=sliding, sliding_window=cfg.window_size if sliding else None,
        layer_types=["sliding_attention" if k == "swa" else "full_attention" for k in cfg.layer_pattern],
    )  # fmt: skip


def _hf_ssm(cfg: BMojoConfig, model_type: str) -> dict[str, Any]:
    _require(set(cfg.layer_pattern) == {model_type}, model_type, f"layer kinds other than {model_type!r}")
    _require(not cfg.use_mlp, model_type, "use_mlp=True (it has no MLP)")
    _require(not cfg.mamba_dt_bc_norm, model_type, "mamba_dt_bc_norm=True (dt/B/C RMSNorms are Jamba's)")
    fields = dict(
        expand=cfg.expand, conv_kernel=cfg.conv_kernel, use_bias=cfg.ssm_bias, use_conv_bias=cfg.ssm_conv_bias,
        layer_norm_epsilon=cfg.rms_norm_eps, hidden_act="silu",
    )  # fmt: skip
    if model_type == "mamba":
        return dict(fields, state_size=cfg.state_size, time_step_rank=cfg.time_step_rank or "auto")
    return dict(
        fields, state_size=cfg.mamba2_state_size or cfg.state_size, head_dim=cfg.mamba2_head_dim,
        num_heads=cfg.expand * cfg.hidden_size // cfg.mamba2_head_dim, n_groups=cfg.n_groups,
        chunk_size=cfg.ssm_chunk_size, time_step_limit=(0.0, math.inf),
    )  # fmt: skip


def _jamba_period(kinds: list[str], source: dict[str, Any]) -> tuple[int, int]:
    """``(attn_layer_period, attn_layer_offset)`` reproducing ``kinds``: the source config's if they do, else the
    smallest."""
    preferred = [(source["attn_layer_period"], source["attn_layer_offset"])] if "attn_layer_period" in source else []
    for period, offset in [*preferred, *((p, o) for p in range(1, len(kinds) + 2) for o in range(p))]:
        if all((k == "attention") == (i % period == offset) for i, k in enumerate(kinds)):
            return period, offset
    raise _cannot("jamba", f"the layer pattern {pattern_summary(kinds)} is not periodic (attn_layer_period/offset)")


def _hf_jamba(cfg: BMojoConfig) -> dict[str, Any]:
    fields = _hf_attention(cfg, "jamba", {"attention", "mamba"})
    kinds = cfg.layer_pattern
    _require(not cfg.use_rope or "attention" not in kinds, "jamba", "use_rope=True (Jamba attention has no RoPE)")
    _require(cfg.mamba_dt_bc_norm or "mamba" not in kinds, "jamba", "mamba_dt_bc_norm=False (Jamba norms dt/B/C)")
    source = cfg.hf_config if (cfg.hf_config or {}).get("model_type") == "jamba" else {}
    period, offset = _jamba_period(kinds, {**CONFIG_MAPPING["jamba"]().to_dict(), **source})
    return dict(
        fields, attn_layer_period=period, attn_layer_offset=offset, num_experts=1,
        mamba_d_state=cfg.state_size, mamba_d_conv=cfg.conv_kernel, mamba_expand=cfg.expand,
        mamba_dt_rank=cfg.time_step_rank or "auto", mamba_conv_bias=cfg.ssm_conv_bias,
        mamba_proj_bias=cfg.ssm_bias,
    )  # fmt: skip


_TO_HF: dict[str, Callable[[BMojoConfig], dict[str, Any]]] = {
    "llama": _hf_llama, "mistral": _hf_mistral, "qwen2": lambda c: _hf_qwen(c, "qwen2"),
    "qwen3": lambda c: _hf_qwen(c, "qwen3"), "mamba": lambda c: _hf_ssm(c, "mamba"),
    "mamba2": lambda c: _hf_ssm(c, "mamba2"), "jamba": _hf_jamba,
}  # fmt: skip


def hf_config_from_bmojo(cfg: BMojoConfig, model_type: str | None = None) -> PretrainedConfig:
    """The Hugging Face config of a bmojo config, as ``model_type`` (default: the family it came from, or inferred).

    Fields bmojo does not use (``max_position_embeddings``, initialisation ranges, ...) come from
    ``cfg.hf_config`` when it is of the same family.
    """
    source = dict(cfg.hf_config or {})
    model_type = model_type or source.get("model_type") or infer_family(cfg)
    _family(model_type)
    if "bmojo" in cfg.layer_pattern or "bmojo-f" in cfg.layer_pattern:
        raise _cannot(model_type, "B'MOJO layers (bmojo / bmojo-f) have no Hugging Face equivalent")
    base = source if source.get("model_type") == model_type else {}
    for key in ("model_type", "transformers_version"):
        base.pop(key, None)
    fields = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        architectures=[FAMILIES[model_type].hf_class], **_TO_HF[model_type](cfg),
    )  # fmt: skip
    config_cls = CONFIG_MAPPING[model_type]
    if not hasattr(config_cls, "head_dim") and fields.get("head_dim") == cfg.hidden_size // cfg.num_attention_heads:
        del fields["head_dim"]  # Qwen2, Jamba: no such field, derived the same way
    hf = config_cls(**{**base, **fields})
    if getattr(cfg, "dtype", None) is not None:
        hf.dtype = cfg.dtype
    return hf


# ---------------------------------------------------------------- models
def _expected_shapes(cls: type[PreTrainedModel], config: PretrainedConfig) -> dict[str, torch.Size]:
    """Tensor names and shapes of ``cls(config)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in cls(config).state_dict().items()}


def _check_tensors(shapes: dict[str, torch.Size], expected: dict[str, torch.Size], tied: bool, target: str) -> None:
    """``ValueError`` naming missing, unexpected or mis-shaped tensors (a tied ``lm_head`` may be absent)."""
    missing = sorted(set(expected) - set(shapes) - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(f"tensors do not match {target}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, shape in shapes.items():
        if tuple(shape) != tuple(expected[k]):
            raise ValueError(f"tensor {k} has shape {tuple(shape)} but {target} expects {tuple(expected[k])}")


def _build(cls: type[PreTrainedModel], config: PretrainedConfig, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """``cls(config)`` holding copies of the tensors in ``state`` (checked against the expected names and shapes)."""
    expected = _expected_shapes(cls, config)
    _check_tensors({k: v.shape for k, v in state.items()}, expected, config.tie_word_embeddings, cls.__name__)
    model = cls._from_config(config, dtype=next(v.dtype for v in state.values() if v.is_floating_point()))
    model.load_state_dict(state, strict=False)  # checked above; only a tied lm_head may be absent
    return model.eval()


def _load_hf(model_or_path: PreTrainedModel | str | Path) -> PreTrainedModel:
    if isinstance(model_or_path, PreTrainedModel):
        return model_or_path
    path = Path(model_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no config.json)")
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto")


def from_hf(model_or_path: PreTrainedModel | str | Path) -> BMojoForCausalLM:
    """A :class:`BMojoForCausalLM` computing the same function as a Hugging Face causal LM (or a saved folder).

    The returned model holds its own copies of the weights. Raises ``ValueError`` naming any feature
    of the source config that bmojo does not reproduce exactly.
    """
    hf = _load_hf(model_or_path)
    family = _family(hf.config.model_type)
    if type(hf).__name__ != family.hf_class:
        raise ValueError(f"expected a {family.hf_class}, got {type(hf).__name__}")
    config = bmojo_config_from_hf(hf.config)
    state = {rename_key(k, family.renames): v for k, v in hf.state_dict().items()}
    return _build(BMojoForCausalLM, config, state)


def to_hf(model: BMojoForCausalLM, model_type: str | None = None) -> PreTrainedModel:
    """The Hugging Face causal LM of ``model`` (family ``model_type``; default: where it came from, or inferred)."""
    if not isinstance(model, BMojoForCausalLM):
        raise TypeError(f"expected a BMojoForCausalLM, got {type(model).__name__}")
    config = hf_config_from_bmojo(model.config, model_type)
    family = FAMILIES[config.model_type]
    state = {rename_key(k, family.renames, reverse=True): v for k, v in model.state_dict().items()}
    return _build(getattr(transformers, family.hf_class), config, state)


# ---------------------------------------------------------------- checkpoint folders
def _weight_files(folder: Path) -> list[str]:
    """Safetensors weight files of a checkpoint folder (sharded or not)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FileNotFoundError(f"no safetensors weights (model.safetensors or its index) in {folder}")


@dataclass
class Conversion:
    """What :func:`convert_checkpoint` did: the source and written configs and the number of tensors."""

    source: PretrainedConfig
    target: PretrainedConfig
    num_tensors: int

    @property
    def bmojo_config(self) -> BMojoConfig:
        """The bmojo side of the conversion."""
        return self.target if isinstance(self.target, BMojoConfig) else self.source


def convert_checkpoint(
    src: str | Path, dst: str | Path, on_tensor: Callable[[int, int], None] | None = None
) -> Conversion:
    """Convert a local safetensors checkpoint folder: Hugging Face -> bmojo, or bmojo -> Hugging Face.

    The direction follows ``src``'s ``model_type``. Tensors are renamed file by file (one shard in
    memory at a time) after checking every name and shape against the target model; the config is
    translated, and other files (tokenizer, generation config) are copied. ``on_tensor(done, total)``
    reports progress.
    """
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a checkpoint folder (no config.json)")
    if src.resolve() == dst.resolve():
        raise ValueError("SRC and DST must be different folders")
    source = AutoConfig.from_pretrained(src)
    if isinstance(source, BMojoConfig):
        target = hf_config_from_bmojo(source)
        family = FAMILIES[target.model_type]
        renames, reverse, cls = family.renames, True, getattr(transformers, family.hf_class)
    else:
        target = bmojo_config_from_hf(source)
        renames, reverse, cls = _family(source.model_type).renames, False, BMojoForCausalLM
        target.architectures = [cls.__name__]
    files = _weight_files(src)
    shapes: dict[str, torch.Size] = {}
    for name in files:
        with safe_open(src / name, framework="pt") as f:
            for k in f.keys():
                shapes[rename_key(k, renames, reverse)] = torch.Size(f.get_slice(k).get_shape())
    _check_tensors(shapes, _expected_shapes(cls, target), target.tie_word_embeddings, cls.__name__)

    dst.mkdir(parents=True, exist_ok=True)
    done, weight_map = 0, {}
    for name in files:
        tensors = {}
        with safe_open(src / name, framework="pt") as f:
            for k in f.keys():
                tensors[rename_key(k, renames, reverse)] = f.get_tensor(k)
                done += 1
                if on_tensor is not None:
                    on_tensor(done, len(shapes))
        save_file(tensors, dst / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    if (src / "model.safetensors.index.json").is_file():
        index = json.loads((src / "model.safetensors.index.json").read_text())
        index["weight_map"] = dict(sorted(weight_map.items()))
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    target.save_pretrained(dst)
    skip = {"config.json", "model.safetensors.index.json", *files}
    for item in src.iterdir():
        if item.is_file() and item.name not in skip:
            shutil.copy2(item, dst / item.name)
    return Conversion(source, target, len(shapes))
