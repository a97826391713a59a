"""``BMojoConfig``: a Hugging Face config whose per-layer pattern makes every special case one model.

Layer kinds (``layer_pattern``):

============  ======  ================  ======  =======  ===========
kind          SSM     attention         fading  eidetic  is
============  ======  ================  ======  =======  ===========
attention     -       full causal       -       -        Transformer
swa           -       window ``w``      -       -        Mistral-style SWA
mamba         Mamba   -                 -       -        Mamba
mamba2        Mamba2  -                 -       -        Mamba-2
bmojo-f       ``ssm`` window ``w``      yes     -        B'MOJO-F
bmojo         ``ssm`` window ``w``      yes     ``k``    B'MOJO
============  ======  ================  ======  =======  ===========

A Jamba-style hybrid interleaves ``mamba`` and ``attention`` layers.

``storage=True`` gives every ``bmojo`` layer a long-term vector store (``bmojo.layers.storage``):
``storage_topk`` keys retrieved per query head, ``storage_write`` (``evicted | all``: what is stored),
``storage_in_batch`` (exact in-batch emulation in forward passes without a cache, for training),
``storage_approx_threshold`` (rows per sequence from which search is approximate, HNSW), ``storage_ef_search``
(HNSW search breadth: higher finds more of the true top rows, slower), ``storage_write_batch`` (rows gathered
before one background write), ``storage_async_retrieval`` (in decoding, search on the retrieval thread while the
layer's SSM runs: faster for wide layers; off is faster when Python overhead dominates, as in very small models),
``storage_process`` (the stores' indexes live in a helper process, searched there: decoding latency with the store
close to that without it when cores are few; POSIX)
and ``storage_norm_tier`` (with HNSW, this many rows per kv head with the largest key norms are searched exactly
too: outlying keys that graph walks miss; 0: none).

``attention_impl`` picks the read-out's implementation in every layer with a window, fading band or eidetic memory
(``bmojo.ops.attention.union_attention``'s ``impl``): ``auto`` (default: the fastest that applies), ``triton``,
``flex``, ``blocks`` or ``merge``; full causal attention layers always use SDPA.

``loss_chunk_size``: tokens a chunk with which a loss goes through the LM head without the batch's logits
(``bmojo.ops.loss.linear_cross_entropy``): ``BMojoForCausalLM`` computes its loss so in training (training mode,
gradients on; the output's logits are then ``None``), and ``bmojo.evaluate`` its scores; a forward pass in evaluation
mode returns the logits as always. 0: through the logits everywhere.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from transformers import PretrainedConfig

from bmojo.layers.eidetic import SELECTIONS
from bmojo.layers.storage import WRITES
from bmojo.ops import check_positive
from bmojo.ops.attention import ATTENTION_IMPLS

LAYER_KINDS = ("attention", "swa", "mamba", "mamba2", "bmojo-f", "bmojo")
BOOL_FIELDS = ("use_mlp", "storage", "storage_in_batch", "storage_async_retrieval", "storage_process", "tie_fading_kv",
               "qk_norm", "use_rope", "attention_bias", "ssm_bias", "ssm_conv_bias", "mamba_dt_bc_norm",
               "use_cache")  # fmt: skip
PRESETS = ("transformer", "swa", "mamba", "mamba2", "jamba", "bmojo-f", "bmojo")

# size -> (hidden_size, heads, target parameter count); the depth is chosen to hit the target.
SIZES: dict[str, tuple[int, int, int | None]] = {
    "tiny": (64, 4, None),
    "130m": (768, 12, 130_000_000),
    "370m": (1024, 16, 370_000_000),
    "790m": (1536, 24, 790_000_000),
    "1.4b": (2048, 32, 1_400_000_000),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def jamba_pattern(n_layers: int, period: int = 8) -> list[str]:
    """Jamba's interleave: one ``attention`` layer per ``period`` (at offset ``period // 2``), the rest ``mamba``."""
    period = max(2, min(period, n_layers))
    return ["attention" if i % period == period // 2 else "mamba" for i in range(n_layers)]


def preset_layers(name: str, n_layers: int) -> list[str]:
    """The layer pattern of a preset."""
    if name == "jamba":
        return jamba_pattern(n_layers)
    kind = {"transformer": "attention"}.get(name, name)
    return [kind] * n_layers


class BMojoConfig(PretrainedConfig):
    """Configuration of a B'MOJO language model (see the module docstring for ``layer_pattern``).

    Fields that let converted Hugging Face models be reproduced exactly (``bmojo.convert``):
    ``use_rope`` (``False``: attention without positional encoding, as in Jamba), ``partial_rotary_factor``
    (the fraction of each head's dimensions that RoPE rotates, as in GPT-NeoX and Phi), ``attention_bias``
    (biases on q/k/v, none on o, as in Qwen2), ``ssm_bias`` / ``ssm_conv_bias`` (biases of the SSM
    in/out projections and conv), ``mamba_dt_bc_norm`` (Jamba's RMSNorm on dt, B, C of Mamba layers),
    and ``hf_config`` (the source config's non-default fields, which ``to_hf`` restores).
    """

    model_type = "bmojo"
    # outputs that Hugging Face Trainer's evaluation leaves out of the predictions it gathers (the logits remain)
    keys_to_ignore_at_inference = ["cache", "aux_loss"]

    def __init__(
        self,
        vocab_size: int = 50280,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        layer_pattern: list[str] | None = None,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int | None = None,
        use_mlp: bool = True,
        window_size: int = 2048,
        chunk_size: int | None = None,
        eidetic_size: int = 64,
        selection: str = "innovation",
        innovation_loss_weight: float = 0.01,
        storage: bool = False,
        storage_topk: int = 16,
        storage_write: str = "evicted",
        storage_in_batch: bool = False,
        storage_approx_threshold: int = 4096,
        storage_write_batch: int = 256,
        storage_ef_search: int = 64,
        storage_async_retrieval: bool = True,
        storage_process: bool = False,
        storage_norm_tier: int = 256,
        bmojo_ssm: str = "mamba2",
        tie_fading_kv: bool = True,
        state_size: int = 16,
        mamba2_state_size: int | None = None,
        expand: int = 2,
        conv_kernel: int = 4,
        time_step_rank: int | None = None,
        mamba2_head_dim: int = 64,
        n_groups: int = 1,
        ssm_chunk_size: int = 32,
        qk_norm: bool = False,
        rope_theta: float = 10000.0,
        use_rope: bool = True,
        partial_rotary_factor: float = 1.0,
        attention_bias: bool = False,
        attention_block_size: int = 64,
        attention_impl: str = "auto",
        loss_chunk_size: int = 2048,
        ssm_bias: bool = False,
        ssm_conv_bias: bool = True,
        mamba_dt_bc_norm: bool = False,
        hf_config: dict[str, Any] | None = None,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.layer_pattern = list(layer_pattern) if layer_pattern is not None else ["bmojo"] * num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        default_mlp = 256 * math.ceil(8 * hidden_size / 3 / 256) if isinstance(hidden_size, int) else None
        self.intermediate_size = default_mlp if intermediate_size is None else intermediate_size
        self.use_mlp = use_mlp
        self.window_size = window_size
        self.chunk_size = chunk_size
        self.eidetic_size = eidetic_size
        self.selection = selection
        self.innovation_loss_weight = innovation_loss_weight
        self.storage = storage
        self.storage_topk = storage_topk
        self.storage_write = storage_write
        self.storage_in_batch = storage_in_batch
        self.storage_approx_threshold = storage_approx_threshold
        self.storage_write_batch = storage_write_batch
        self.storage_ef_search = storage_ef_search
        self.storage_async_retrieval = storage_async_retrieval
        self.storage_process = storage_process
        self.storage_norm_tier = storage_norm_tier
        self.bmojo_ssm = bmojo_ssm
        self.tie_fading_kv = tie_fading_kv
        self.state_size = state_size
        self.mamba2_state_size = mamba2_state_size
        self.expand = expand
        self.conv_kernel = conv_kernel
        self.time_step_rank = time_step_rank
        self.mamba2_head_dim = mamba2_head_dim
        self.n_groups = n_groups
        self.ssm_chunk_size = ssm_chunk_size
        self.qk_norm = qk_norm
        self.rope_theta = rope_theta
        self.use_rope = use_rope
        self.partial_rotary_factor = partial_rotary_factor
        self.attention_bias = attention_bias
        self.attention_block_size = attention_block_size
        self.attention_impl = attention_impl
        self.loss_chunk_size = loss_chunk_size
        self.ssm_bias = ssm_bias
        self.ssm_conv_bias = ssm_conv_bias
        self.mamba_dt_bc_norm = mamba_dt_bc_norm
        self.hf_config = hf_config
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self.validate_bmojo()

    def validate_bmojo(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "state_size", "expand", "conv_kernel", "mamba2_head_dim", "n_groups",
                    "ssm_chunk_size", "attention_block_size", "storage_topk", "storage_approx_threshold",
                    "storage_write_batch", "storage_ef_search")  # fmt: skip
        optional = ("head_dim", "window_size", "chunk_size", "mamba2_state_size", "time_step_rank")  # None: derived
        for name in positive + optional:
            if getattr(self, name) is not None or name in positive:
                check_positive(name, getattr(self, name))
        for name in ("eidetic_size", "loss_chunk_size", "storage_norm_tier"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name, zero_ok in (("rope_theta", False), ("rms_norm_eps", False), ("initializer_range", True),
                              ("innovation_loss_weight", True), ("partial_rotary_factor", False)):  # fmt: skip
            value = getattr(self, name)
            if not _is_number(value) or not (value >= 0 if zero_ok else value > 0):
                raise ValueError(f"{name} must be a finite number {'>= 0' if zero_ok else '> 0'}, got {value!r}")
        if self.partial_rotary_factor > 1:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.storage:
            if "bmojo" not in self.layer_pattern or self.eidetic_size == 0 or self.selection == "none":
                raise ValueError("storage needs 'bmojo' layers with an eidetic memory (eidetic_size > 0, a selection)")
            if self.storage_write not in WRITES:
                raise ValueError(f"storage_write must be one of {WRITES}, got {self.storage_write!r}")
        if self.bmojo_ssm not in ("mamba", "mamba2"):
            raise ValueError(f"bmojo_ssm must be 'mamba' or 'mamba2', got {self.bmojo_ssm!r}")
        if len(self.layer_pattern) != self.num_hidden_layers:
            raise ValueError(
                f"layer_pattern has {len(self.layer_pattern)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        for kind in self.layer_pattern:
            if kind not in LAYER_KINDS:
                raise ValueError(f"unknown layer kind {kind!r}; expected one of {LAYER_KINDS}")
        if any(k != "mamba" and k != "mamba2" for k in self.layer_pattern):
            if self.hidden_size % self.num_attention_heads and self.head_dim is None:
                raise ValueError(
                    f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size})"
                )
            if self.num_attention_heads % self.num_key_value_heads:
                raise ValueError(
                    f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                    f"num_attention_heads ({self.num_attention_heads})"
                )

    @classmethod
    def field_names(cls) -> set[str]:
        """The names a config takes: this class's arguments and Hugging Face ``PretrainedConfig``'s attributes."""
        return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"} | set(PretrainedConfig().__dict__)

    @classmethod
    def from_preset(cls, name: str, size: str = "tiny", **overrides: Any) -> "BMojoConfig":
        """A preset architecture (``transformer, swa, mamba, mamba2, jamba, bmojo-f, bmojo``) at a size.

        ``tiny`` is for tests; ``130m, 370m, 790m, 1.4b`` pick the depth that brings the parameter
        count closest to the name. ``overrides`` set any config field.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; expected one of {tuple(SIZES)}")
        unknown = sorted(set(overrides) - cls.field_names())
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(unknown)}")
        hidden, heads, target = SIZES[size]
        base: dict[str, Any] = dict(
            hidden_size=hidden, num_attention_heads=heads, use_mlp=name not in ("mamba", "mamba2")
        )
        if size == "tiny":
            base.update(
                vocab_size=128, num_hidden_layers=2, num_key_value_heads=2, intermediate_size=128,
                window_size=8, eidetic_size=4, state_size=8, mamba2_head_dim=16, ssm_chunk_size=8,
                attention_block_size=8,
            )  # fmt: skip
        base.update(overrides)
        if target is not None and "num_hidden_layers" not in overrides:
            base["num_hidden_layers"] = _depth_for(name, base, target)
        base.setdefault("num_hidden_layers", 12)
        if "layer_pattern" not in overrides:
            base["layer_pattern"] = preset_layers(name, base["num_hidden_layers"])
        return cls(**base)


def _depth_for(name: str, fields: dict[str, Any], target: int) -> int:
    """Number of layers whose parameter count (counted on the meta device) is closest to ``target``."""
    from bmojo.models.modeling import count_parameters

    def count(kinds: list[str]) -> int:
        return count_parameters(BMojoConfig(**{**fields, "num_hidden_layers": len(kinds), "layer_pattern": kinds}))

    kinds = sorted(set(preset_layers(name, 8)))
    per_layer = {k: count([k, k]) - count([k]) for k in kinds}
    base = count([kinds[0]]) - per_layer[kinds[0]]
    return min(range(1, 129), key=lambda n: abs(base + sum(per_layer[k] for k in preset_layers(name, n)) - target))
