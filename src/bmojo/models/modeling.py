"""B'MOJO language model: pre-norm blocks of (RMSNorm -> mixer -> residual -> RMSNorm -> SwiGLU -> residual)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import CompileConfig, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from bmojo.atomic import atomic_write
from bmojo.layers.bmojo import BMojoMixer, MixerState, roll_rows
from bmojo.layers.linear import Linear
from bmojo.layers.norm import GatedRMSNorm, RMSNorm
from bmojo.layers.ssm import Mamba, Mamba2
from bmojo.layers.storage import StorageConfig, StorageFileError, VectorStore, load_stores, save_stores
from bmojo.models.cache import BMojoCache
from bmojo.models.config import BMojoConfig
from bmojo.models.packing import PackedSequences, check_mask_shape
from bmojo.ops.loss import IGNORE_INDEX, check_targets, cross_entropy, prechecked_linear_cross_entropy


def build_mixer(config: BMojoConfig, kind: str, layer_idx: int = 0) -> BMojoMixer:
    """The mixer of one layer kind, configured from ``config``."""
    ssm_type = {"mamba": "mamba", "mamba2": "mamba2", "bmojo-f": config.bmojo_ssm, "bmojo": config.bmojo_ssm}.get(kind)
    if ssm_type == "mamba":
        ssm_kwargs = dict(
            state_size=config.state_size, expand=config.expand, conv_kernel=config.conv_kernel,
            dt_rank=config.time_step_rank, dt_bc_norm=config.mamba_dt_bc_norm, norm_eps=config.rms_norm_eps,
        )  # fmt: skip
    else:
        ssm_kwargs = dict(
            state_size=config.mamba2_state_size or config.state_size, expand=config.expand,
            head_dim=config.mamba2_head_dim, n_groups=config.n_groups, conv_kernel=config.conv_kernel,
            chunk_size=config.ssm_chunk_size, norm_eps=config.rms_norm_eps,
        )  # fmt: skip
    ssm_kwargs.update(bias=config.ssm_bias, conv_bias=config.ssm_conv_bias)
    storage = None
    if config.storage and kind == "bmojo":
        storage = StorageConfig(
            topk=config.storage_topk, write=config.storage_write, in_batch=config.storage_in_batch,
            approx_threshold=config.storage_approx_threshold, write_batch=config.storage_write_batch,
            ef_search=config.storage_ef_search, async_retrieval=config.storage_async_retrieval,
            norm_tier=config.storage_norm_tier, process=config.storage_process,
        )  # fmt: skip
    return BMojoMixer(
        config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        ssm=ssm_type,
        attention=kind not in ("mamba", "mamba2"),
        window=None if kind == "attention" else config.window_size,
        fading=kind in ("bmojo-f", "bmojo"),
        eidetic_size=config.eidetic_size if kind == "bmojo" else 0,
        selection=config.selection,
        chunk_size=config.chunk_size,
        qk_norm=config.qk_norm,
        rope_theta=config.rope_theta,
        attention_bias=config.attention_bias,
        tie_fading_kv=config.tie_fading_kv,
        block_size=config.attention_block_size,
        attention_impl=config.attention_impl,
        ssm_kwargs=ssm_kwargs,
        attention_kwargs=dict(
            norm_eps=config.rms_norm_eps, rope=config.use_rope, rotary_fraction=config.partial_rotary_factor
        ),
        seed=layer_idx,
        storage=storage,
    )


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with Llama's parameter names."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BMojoBlock(GradientCheckpointingLayer):
    """``x + mixer(norm(x))``, then ``+ mlp(norm(x))`` when the config has MLPs. With activation checkpointing
    (``model.activation_checkpointing_enable()``), training keeps only each block's input and recomputes the rest in
    the backward pass."""

    def __init__(self, config: BMojoConfig, layer_idx: int) -> None:
        super().__init__()
        self.kind = config.layer_pattern[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = build_mixer(config, self.kind, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps) if config.use_mlp else None
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size) if config.use_mlp else None

    def forward(
        self, x: torch.Tensor, cache: MixerState | None = None, advance: bool = True, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, aux, _ = self.mixer(self.input_layernorm(x), cache, advance, valid)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, aux


@dataclass
class BMojoModelOutput(ModelOutput):
    """Final hidden states, the cache and the innovation loss; with ``output_hidden_states=True``, ``hidden_states``:
    the embeddings, each block's output, the last through the final norm (``last_hidden_state``), each ``[B, L,
    D]``."""

    last_hidden_state: torch.Tensor | None = None
    cache: BMojoCache | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def past_key_values(self) -> BMojoCache | None:
        """``cache`` under the name older transformers code reads."""
        return self.cache


@dataclass
class BMojoCausalLMOutput(ModelOutput):
    """``loss`` = cross-entropy + ``innovation_loss_weight * aux_loss``; ``aux_loss`` is also returned alone.

    ``cache`` is the :class:`BMojoCache` (``past_key_values`` in transformers' older naming); ``hidden_states``: see
    :class:`BMojoModelOutput`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    cache: BMojoCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def past_key_values(self) -> BMojoCache | None:
        """``cache`` under the name older transformers code reads."""
        return self.cache


class BMojoPreTrainedModel(PreTrainedModel):
    config_class = BMojoConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BMojoBlock"]
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Conv1d):
            module.reset_parameters()
        elif isinstance(module, (RMSNorm, GatedRMSNorm)):
            nn.init.ones_(module.weight)
        elif isinstance(module, (Mamba, Mamba2)):
            module.reset_ssm_parameters()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own BMojoCache


def _padding(attention_mask: torch.Tensor | None, shape: torch.Size) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """How ``attention_mask [B, L]`` pads the sequences: ``(valid, None)`` where it pads some on the right only (zeros
    after its tokens; ``valid``: the positions kept, as bool: causal layers leave the tokens' outputs as they are, and
    a cache keeps each row's state at its own end), ``(None, pads)`` on the left only (``pads [B]`` zeros before each
    row's tokens, which end at the last position), ``(None, None)`` where it keeps every position. Padding on both
    sides or gaps raise ``NotImplementedError``, a row without tokens ``ValueError``. Reads the mask (under
    ``torch.compile`` a graph break, in a parallel pass only: decoding steps do not read it)."""
    if attention_mask is None:
        return None, None
    check_mask_shape(attention_mask, shape)
    if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold 1 for the tokens and 0 for the padding (not an additive mask of "
                         "0 and -inf), got values " + str(attention_mask.unique()[:4].tolist()))  # fmt: skip
    if bool(attention_mask.all()):
        return None, None
    keep = attention_mask.bool()
    tokens = keep.sum(1)
    if not tokens.all():
        raise ValueError(f"attention_mask keeps no token of sequence {int((tokens == 0).nonzero()[0])}")
    if keep[:, 0].all() and not (keep[:, 1:] & ~keep[:, :-1]).any():
        return keep, None
    if keep[:, -1].all() and not (keep[:, :-1] & ~keep[:, 1:]).any():
        return None, shape[1] - tokens
    raise NotImplementedError("attention_mask pads between tokens or on both sides, which is not supported; "
                              "padding on the right or on the left is")  # fmt: skip


def left_padded(
    sequences: list[list[int]], pad_id: int = 0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one batch padded on the left, as ``generate`` takes prompts of different lengths:
    ``(input_ids, attention_mask) [B, max length]``, ``pad_id`` and 0 before each sequence."""
    width = max(map(len, sequences))
    ids = [[pad_id] * (width - len(seq)) + list(seq) for seq in sequences]
    mask = [[0] * (width - len(seq)) + [1] * len(seq) for seq in sequences]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def new_tokens(out: torch.Tensor, prompt_width: int, eos_id: int | None) -> list[list[int]]:
    """Each row's new tokens in ``generate``'s output ``out [B, prompt_width + n]``, up to and including its first
    ``eos_id`` (after which ``generate`` pads a row that ended before the others)."""
    rows = out[:, prompt_width:].tolist()
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]


def _check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Shape, dtype and, in eager mode, the id range (reading min/max would break a ``torch.compile`` graph)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [batch, length], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.long, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError("empty sequence: input_ids has length 0")
    if input_ids.shape[0] == 0:
        raise ValueError("empty batch: input_ids has no sequences")
    if torch.compiler.is_compiling():
        return
    lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one read from the device for both
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def _output_hidden_states(kwargs: dict[str, Any], config: BMojoConfig) -> bool:
    """Whether the call asks for every block's hidden states (``output_hidden_states``, else the config's); asking
    for attention weights (``output_attentions``), which the fused attention kernels never form, raises."""
    attentions, record = (kwargs.get(name) for name in ("output_attentions", "output_hidden_states"))
    if config.output_attentions if attentions is None else attentions:
        raise NotImplementedError("output_attentions is not supported: the layers' attention runs in fused kernels "
                                  "that never form its weights")  # fmt: skip
    record = config.output_hidden_states if record is None else record
    if not isinstance(record, bool):
        raise TypeError(f"output_hidden_states must be True or False (hidden states are not selected by index "
                        f"here), got {record!r}")  # fmt: skip
    return record


def _kept_positions(logits_to_keep: int | torch.Tensor, length: int) -> slice | torch.Tensor | None:
    """The positions of ``length`` whose logits a call keeps: ``logits_to_keep`` an int ``k`` (the last ``k``; 0: all,
    ``None``) or a 1-D tensor of positions, as Hugging Face models take it."""
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() != 1 or logits_to_keep.dtype.is_floating_point or logits_to_keep.dtype == torch.bool:
            raise ValueError(f"logits_to_keep as a tensor must be 1-D integer positions, got "
                             f"{logits_to_keep.dtype} of shape {tuple(logits_to_keep.shape)}")  # fmt: skip
        outside = (logits_to_keep < -length) | (logits_to_keep >= length)
        if not torch.compiler.is_compiling() and bool(outside.any()):
            raise ValueError(f"logits_to_keep holds position {int(logits_to_keep[outside][0])}, outside the "
                             f"{length} positions")  # fmt: skip
        return logits_to_keep
    if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be a count >= 0 (0: every position) or a tensor of positions, got "
                         f"{logits_to_keep!r}")  # fmt: skip
    return slice(-logits_to_keep, None) if logits_to_keep else None


def _targets(
    labels: torch.Tensor | None, shift_labels: torch.Tensor | None, shape: torch.Size, vocab_size: int
) -> torch.Tensor | None:
    """Each position's target token, flat ``[B * L]``: ``shift_labels`` as given, else ``labels`` shifted left by one
    (the last position's ignored); ``None`` without either. Checks shapes and, in eager mode, the ids' range."""
    given, name = (shift_labels, "shift_labels") if shift_labels is not None else (labels, "labels")
    if given is None:
        return None
    if given.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (the inputs'), got {tuple(given.shape)}")
    check_targets(given, vocab_size, IGNORE_INDEX, name)
    if shift_labels is None:
        given = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return given.flatten().long()


# config fields that shape a layer's recurrent state (``BMojoModel.cache_layout``)
_LAYOUT_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "window_size",
                  "eidetic_size", "chunk_size", "bmojo_ssm", "state_size", "mamba2_state_size", "mamba2_head_dim",
                  "expand", "conv_kernel", "n_groups", "tie_fading_kv", "storage")  # fmt: skip


class BMojoModel(BMojoPreTrainedModel):
    """Embedding, ``num_hidden_layers`` blocks, final RMSNorm."""

    def __init__(self, config: BMojoConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(BMojoBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # the config's fields that shaped the layers' states, which a cache must have been filled under
        self.cache_layout = (*((name, getattr(config, name)) for name in _LAYOUT_FIELDS),
                             ("layer_pattern", tuple(config.layer_pattern)))  # fmt: skip
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: BMojoCache | None = None,
        use_cache: bool | None = None,
        cache: BMojoCache | None = None,
        advance: bool = True,
        packed: PackedSequences | None = None,
        **kwargs: Any,
    ) -> BMojoModelOutput:
        """``input_ids [B, L]`` (or ``inputs_embeds [B, L, D]``) -> hidden states; continues ``cache`` if given.

        ``advance=False``: a continued cache's token count is left for the caller to advance, last, outside compiled
        code (``cache.advance(L)``, as ``BMojoForCausalLM`` does; see ``BMojoMixer.forward``); its position tensor,
        which the layers share after a prefill, is advanced here.

        Sequences packed into one row (Hugging Face's ``DataCollatorWithFlattening``: ``position_ids`` that restart
        at 0, ``seq_idx`` or ``cu_seq_lens_q``; or ``packed``, read from them by the caller) run as batches of one
        sequence a row, in groups of similar lengths (:mod:`bmojo.models.packing`), each token's output that of its
        sequence alone without a cache (with storage, retrieving only with ``storage_in_batch``); they fill no
        cache. So do padded rows without a cache, eagerly (their padding's outputs zeros)."""
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            _check_input_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids if input_ids.dtype == torch.int32 else input_ids.long())
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be [batch, length, {self.config.hidden_size}], got {tuple(inputs_embeds.shape)}"
            )
        if cache is not None and not isinstance(cache, BMojoCache):
            raise TypeError(f"cache must be a BMojoCache, got {type(cache).__name__}")
        packed = packed if packed is not None else PackedSequences.find(kwargs, inputs_embeds, attention_mask)
        if packed is not None and (cache is not None or use_cache):
            raise ValueError("sequences packed into one row cannot fill or continue a cache (use_cache=False): pass "
                             "them as a batch, one sequence a row (padded), to cache them")  # fmt: skip
        use_cache = packed is None and (self.config.use_cache if use_cache is None else use_cache)
        training = self.training and torch.is_grad_enabled()
        if (use_cache or cache is not None) and training and self.is_activation_checkpointing:
            raise ValueError("activation checkpointing recomputes each layer in the backward pass, which would fill a "
                             "cache twice: train with use_cache=False and no cache (or call model.eval())")  # fmt: skip
        if use_cache and cache is None:
            cache = BMojoCache(len(self.layers))
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers but the model has {len(self.layers)}")
        stepping = cache is not None and cache.started  # else the layers run in parallel (prefill)
        if stepping and cache.layout != self.cache_layout:
            theirs, ours = dict(cache.layout or ()), dict(self.cache_layout)
            differ = ", ".join(f"{k} {theirs.get(k)} there, {v} here" for k, v in ours.items() if theirs.get(k) != v)
            raise ValueError(f"this cache was filled by another kind of model: {differ}")
        length = inputs_embeds.shape[1]
        if stepping and length > 1 and attention_mask is not None and not bool(attention_mask[:, -length:].all()):
            raise NotImplementedError("attention_mask pads some of the tokens that continue this cache, which is not "
                                      "supported: continue it with unpadded tokens")  # fmt: skip
        record = _output_hidden_states(kwargs, self.config)
        valid = pads = None
        if not stepping and packed is None:
            valid, pads = _padding(attention_mask, inputs_embeds.shape[:2])
        if cache is None and (valid is not None or pads is not None) and not torch.compiler.is_compiling():
            packed = PackedSequences.from_mask(attention_mask.bool())  # padded rows, no state to keep: as packed
            # (compiled, the batch runs at once, keeping the shapes of its graph)
        if packed is not None:  # each group of sequences as a batch, one sequence a row, padded on the right
            runs = [self._blocks(packed.unpack(inputs_embeds, g), None, g.valid, record) for g in packed.groups]
            x, aux_losses, hidden = zip(*runs)
            x, aux_loss = packed.pack(x), None if aux_losses[0] is None else packed.mean(aux_losses)
            hidden = [packed.pack(h) for h in zip(*hidden)] if record else None
        else:
            x = inputs_embeds
            if pads is not None:  # left padding: each row's tokens moved to its start (right padding), and back after
                x, valid = roll_rows(x, pads), torch.arange(length, device=x.device) < length - pads[:, None]
            x, aux_loss, hidden = self._blocks(x, cache, valid, record)
            if pads is not None:
                x = roll_rows(x, -pads)
                hidden = None if hidden is None else [roll_rows(h, -pads) for h in hidden]
        x = self.norm(x)
        out = BMojoModelOutput(x, cache, aux_loss, None if hidden is None else (*hidden, x))
        if stepping:
            cache.advance_positions(x.shape[1])
            if advance:
                cache.advance(x.shape[1])
        elif cache is not None:
            cache.layout = self.cache_layout
            cache.prefilled()
        return out

    def _blocks(
        self, x: torch.Tensor, cache: BMojoCache | None, valid: torch.Tensor | None, record: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
        """Every block on ``x [B, L, D]``: the last's output, the layers' mean innovation loss (``None`` without
        one) and, where ``record``, each block's input."""
        hidden = [] if record else None
        aux_losses = []
        for i, layer in enumerate(self.layers):
            if hidden is not None:
                hidden.append(x)
            x, aux = layer(x, cache=None if cache is None else cache[i], advance=False, valid=valid)  # (advanced after)
            if aux is not None:
                aux_losses.append(aux)
        return x, torch.stack(aux_losses).mean() if aux_losses else None, hidden


STORAGE_FILE = "storage.npz"
# Written beside every saved model, with ``auto_map`` in its config, so that a process that never imported bmojo
# loads it with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` (and so ``lm_eval --model hf``
# does): the file only imports the installed package.
AUTO_MODULE = "bmojo_auto"
AUTO_SOURCE = (
    '"""Loads bmojo\'s classes for the Hugging Face Auto classes (``trust_remote_code=True``); needs ``pip install bmojo``."""\n'
    "from bmojo.models.config import BMojoConfig  # noqa: F401\n"
    "from bmojo.models.modeling import BMojoForCausalLM, BMojoModel  # noqa: F401\n"
)


class BMojoForCausalLM(BMojoPreTrainedModel, GenerationMixin):
    """B'MOJO model with a language-modelling head (tied to the embedding by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BMojoConfig) -> None:
        super().__init__(config)
        self.model = BMojoModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def vector_stores(self) -> dict[str, VectorStore]:
        """The long-term stores of the layers that have one, named ``layer_{i}``."""
        return {f"layer_{i}": b.mixer.store for i, b in enumerate(self.model.layers) if b.mixer.store is not None}

    def flush_storage(self) -> None:
        """Wait until every store write submitted so far is searchable."""
        for store in self.vector_stores().values():
            store.flush()

    def save_storage(self, path: str | os.PathLike) -> None:
        """Write every layer's store to one file, atomically."""
        save_stores(self.vector_stores(), path)

    def load_storage(self, path: str | os.PathLike) -> None:
        """Replace every layer's store by those saved at ``path``; a bad file raises ``StorageFileError`` naming it
        and leaves the stores unchanged."""
        load_stores(self.vector_stores(), path)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Hugging Face ``save_pretrained``, plus the stores in ``storage.npz`` beside the weights and the
        ``bmojo_auto.py`` loader named by the config's ``auto_map`` (see ``AUTO_SOURCE``)."""
        self.config.auto_map = {
            auto: f"{AUTO_MODULE}.{cls}"
            for auto, cls in (("AutoConfig", "BMojoConfig"), ("AutoModel", "BMojoModel"),
                              ("AutoModelForCausalLM", "BMojoForCausalLM"))
        }  # fmt: skip
        super().save_pretrained(save_directory, *args, **kwargs)
        atomic_write(Path(save_directory) / f"{AUTO_MODULE}.py", AUTO_SOURCE.encode())
        if self.vector_stores():
            self.save_storage(Path(save_directory) / STORAGE_FILE)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, load_storage: bool = True, **kwargs: Any
    ) -> "BMojoForCausalLM":
        """Hugging Face ``from_pretrained``; also loads ``storage.npz`` found beside the weights unless
        ``load_storage=False`` (the way to load the model when that file is corrupt). A local path that does not
        exist or a folder without ``config.json`` (and no ``config``) raises ``FileNotFoundError``, a file
        ``NotADirectoryError``, unreadable weights ``OSError``, each naming the path."""
        name = str(pretrained_model_name_or_path)
        local = Path(name).expanduser()
        if name.startswith(("/", ".", "~")) and not local.exists():  # a path, not a hub id
            raise FileNotFoundError(f"no model folder at {name}")
        if local.is_file():
            raise NotADirectoryError(f"{name} is a file: from_pretrained takes the folder save_pretrained wrote")
        folder = local / kwargs.get("subfolder", "")
        if local.is_dir() and kwargs.get("config") is None and not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {name}: not a folder save_pretrained wrote")
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as e:
            raise OSError(f"the weights in {name} are unreadable ({e}): the file is truncated or corrupt") from e
        if pretrained_model_name_or_path is None or not (load_storage and model.vector_stores()):
            return model
        path = Path(pretrained_model_name_or_path) / STORAGE_FILE
        if path.is_file():
            try:
                model.load_storage(path)
            except StorageFileError as e:
                raise StorageFileError(f"{e}; pass load_storage=False to load the model without its store") from e
        return model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: BMojoCache | None = None,
        use_cache: bool | None = None,
        cache: BMojoCache | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BMojoCausalLMOutput:
        """Logits ``[B, L, V]`` (float32) and, given ``labels [B, L]``, the loss: the cross-entropy of each position's
        next token (``labels`` shifted left by one; ``-100`` ignored, as are positions ``attention_mask`` pads and a
        packed sequence's last token) plus the innovation loss. ``shift_labels [B, L]``
        (a keyword, as Hugging Face's models take it, so that ``Trainer`` finds ``labels`` alone as the label
        argument): each position's own target, already shifted (used instead of ``labels``).
        ``num_items_in_batch`` (Hugging Face ``Trainer``'s count of targets over a step's micro-batches): the
        cross-entropy's sum is divided by it instead of by this batch's count, and the innovation loss weighed by
        this batch's share of the targets, so that the micro-batches' losses add up to the step's (the innovation loss,
        a mean over tokens, exactly where the micro-batches' targets are in proportion to their tokens). In training
        (training mode, gradients on) with ``config.loss_chunk_size``, the loss is computed without the batch's
        logits (``bmojo.ops.loss.linear_cross_entropy``), which are then ``None``."""
        cache = cache if cache is not None else past_key_values
        stepping = isinstance(cache, BMojoCache) and cache.started
        packed = PackedSequences.find(kwargs, input_ids if input_ids is not None else inputs_embeds, attention_mask)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and packed is None
        out = self.model(input_ids, attention_mask, inputs_embeds, cache=cache, use_cache=use_cache, advance=False,
                         packed=packed, **kwargs)  # fmt: skip
        hidden = out.last_hidden_state
        if num_items_in_batch is not None and not torch.compiler.is_compiling():
            count = torch.as_tensor(num_items_in_batch)  # read where that needs no device sync (Trainer's, on a GPU)
            if count.numel() != 1:
                raise ValueError(f"num_items_in_batch must be one count, got shape {tuple(count.shape)}")
            if count.device.type == "cpu" and bool(count <= 0):
                raise ValueError(f"num_items_in_batch counts the step's targets and must be >= 1, got "
                                 f"{num_items_in_batch}")  # fmt: skip
        targets = _targets(labels, kwargs.get("shift_labels"), hidden.shape[:2], self.config.vocab_size)
        if targets is not None and packed is not None:  # a packed sequence's last token has no target
            targets = targets.masked_fill(packed.last, IGNORE_INDEX)
        if targets is not None and attention_mask is not None and attention_mask.shape == hidden.shape[:2]:
            targets = targets.masked_fill(attention_mask.flatten() == 0, IGNORE_INDEX)  # nor does the padding
        keep = _kept_positions(logits_to_keep, hidden.shape[1])
        if targets is not None and keep is not None:
            raise ValueError("labels need the logits of every position: pass logits_to_keep=0 with them")
        if keep is not None:
            hidden = hidden[:, keep]
        logits = loss = None
        chunk = self.loss_chunk_size if self.training and torch.is_grad_enabled() else 0
        if targets is not None and chunk:
            loss = prechecked_linear_cross_entropy(  # (the labels checked by _targets)
                hidden.flatten(0, 1), self.lm_head.weight, targets, chunk, IGNORE_INDEX, num_items_in_batch
            )
        else:
            logits = self.lm_head(hidden).float()
            if targets is not None:
                loss = cross_entropy(logits.flatten(0, 1), targets, IGNORE_INDEX, num_items_in_batch)
        if loss is not None and out.aux_loss is not None:
            share = 1 if num_items_in_batch is None else (targets != IGNORE_INDEX).sum() / num_items_in_batch
            loss = loss + self.config.innovation_loss_weight * out.aux_loss * share
        output = BMojoCausalLMOutput(loss, logits, out.aux_loss, out.cache, out.hidden_states)
        if stepping:  # last: the graph break this makes under torch.compile leaves nothing after it to compile
            cache.advance(out.last_hidden_state.shape[1])
        return output

    @property
    def loss_chunk_size(self) -> int:
        """Tokens a chunk with which a loss goes through the LM head without the batch's logits
        (``config.loss_chunk_size``); 0: through the logits (also for a head with a bias, which the chunks omit)."""
        return self.config.loss_chunk_size if self.lm_head.bias is None else 0

    def _prepare_cache_for_generation(
        self, generation_config: GenerationConfig, model_kwargs: dict[str, Any], generation_mode: Any, batch_size: int,
        max_cache_length: int,
    ) -> None:  # fmt: skip
        """Hugging Face ``generate``'s cache set-up: ``cache_implementation="static"`` makes a static
        :class:`BMojoCache` for ``max_cache_length`` tokens, whose decoding steps ``generate`` then compiles as its
        ``compile_config`` says (by default with CUDA graphs), by itself on CUDA and elsewhere where the config's
        ``_compile_all_devices`` is set (``bmojo generate --compile``); without it (or with ``"dynamic"``) the model
        makes its cache at the prefill; a cache passed in is used as it is."""
        if model_kwargs.get("cache") is not None or not generation_config.use_cache:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        if generation_config.cache_implementation not in (None, "dynamic", "static"):
            raise ValueError(f"cache_implementation must be None, 'dynamic' (the model's cache made at the prefill) or "
                             f"'static' for B'MOJO models, got {generation_config.cache_implementation!r}")  # fmt: skip
        if generation_config.cache_implementation == "static":
            model_kwargs["cache"] = BMojoCache(len(self.model.layers), max_length=max_cache_length)
        return None

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: BMojoCache | None = None,
        cache: BMojoCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed only the tokens the cache has not seen (the whole prompt on the first call). A prompt given as
        ``inputs_embeds`` comes before ``input_ids``, which then hold only the generated tokens. Other keywords
        (``output_hidden_states``) pass on to :meth:`forward`."""
        cache = cache if cache is not None else past_key_values
        seen = 0 if cache is None else cache.get_seq_length()
        if seen == 0 and attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError("generate reads each prompt's next token at the last position: pad the prompts on the "
                             "left (a tokenizer's padding_side='left'), not on the right")  # fmt: skip
        if inputs_embeds is None and seen >= input_ids.shape[1]:
            raise ValueError(f"the cache has seen {seen} tokens and input_ids holds {input_ids.shape[1]}: input_ids "
                             f"must hold the tokens the cache has seen and at least one more")  # fmt: skip
        inputs: dict[str, Any] = {**kwargs, "cache": cache, "use_cache": use_cache, "attention_mask": attention_mask}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            embedded = 0 if inputs_embeds is None else inputs_embeds.shape[1]
            inputs["input_ids"] = input_ids[:, max(0, seen - embedded) :]
        return inputs


def compile_steps_config(device: torch.device | str) -> CompileConfig:
    """How Hugging Face ``generate`` compiles the decoding steps of a static cache (``cache_implementation="static"``)
    on ``device``: as CUDA graphs on CUDA (``mode="reduce-overhead"``, what ``generate`` does there by itself), with
    inductor's default mode elsewhere, where ``generate`` compiles only when the config's ``_compile_all_devices``
    says so."""
    config = CompileConfig(mode="reduce-overhead" if torch.device(device).type == "cuda" else "default")
    config._compile_all_devices = True
    return config


def count_parameters(config: BMojoConfig) -> int:
    """Parameters of ``BMojoForCausalLM(config)``, counted without allocating memory (tied weights once)."""
    with torch.device("meta"):
        model = BMojoForCausalLM(config)
    return sum(p.numel() for p in model.parameters())
