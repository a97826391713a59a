"""Attention projections: queries, keys and values with optional per-head RMSNorm and RoPE.

Names follow Hugging Face Llama/Qwen3 (``q_proj, k_proj, v_proj, o_proj, q_norm, k_norm``). The
attention itself (which keys each query sees) is decided by the B'MOJO mixer; this module only maps
hidden states at given positions to rotated heads and back.
"""

from __future__ import annotations

import torch
from torch import nn

from bmojo.layers.checks import check_sizes
from bmojo.layers.linear import Linear
from bmojo.layers.norm import RMSNorm
from bmojo.layers.rotary import RotaryEmbedding, apply_rotary

Rope = tuple[torch.Tensor, torch.Tensor] | None


class Attention(nn.Module):
    """Grouped-query attention projections ``D -> (H, d)`` for queries and ``D -> (Hkv, d)`` for keys/values.

    ``bias`` puts biases on the query/key/value projections (not on ``o_proj``, as in Qwen2); ``rope=False``
    leaves positions unencoded (Jamba's attention layers); ``rotary_fraction < 1`` rotates only that fraction of
    each head's dimensions (rounded down to even), the rest carrying content alone.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qk_norm: bool = False,
        rope_theta: float = 10000.0,
        bias: bool = False,
        norm_eps: float = 1e-6,
        rope: bool = True,
        rotary_fraction: float = 1.0,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_sizes(hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim or 1)
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"num_attention_heads ({num_heads}) must divide hidden_size ({hidden_size})")
            head_dim = hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_key_value_heads ({num_kv_heads}) must divide num_attention_heads ({num_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        if not 0 < rotary_fraction <= 1:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {rotary_fraction}")
        rotary_dim = int(head_dim * rotary_fraction) // 2 * 2
        if rope and rotary_dim < 2:
            raise ValueError(f"partial_rotary_factor {rotary_fraction} of a head of {head_dim} dimensions rotates "
                             f"{rotary_dim}: RoPE needs at least 2 (raise the factor or the head size)")  # fmt: skip
        self.rotary = RotaryEmbedding(rotary_dim, rope_theta) if rope else None

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)  # [B, n, L, d]

    def rope(self, positions: torch.Tensor) -> Rope:
        """``(cos, sin) [L, r]`` of ``positions [L]`` (``[B, 1, L, r]`` of each sequence's ``positions [B, L]``),
        computed once for :meth:`queries` and :meth:`keys_values` (``None`` without RoPE)."""
        if self.rotary is None:
            return None
        cos, sin = self.rotary(positions)
        return (cos, sin) if positions.dim() == 1 else (cos.unsqueeze(1), sin.unsqueeze(1))

    def queries(self, h: torch.Tensor, rope: Rope) -> torch.Tensor:
        """``h [B, L, D]`` -> queries ``[B, H, L, d]`` rotated by ``rope`` (:meth:`rope` of their positions)."""
        q = self._heads(self.q_proj(h), self.num_heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return q if rope is None else apply_rotary(q, *rope)

    def keys_values(
        self, x: torch.Tensor, rope: Rope, k_proj: nn.Linear | None = None, v_proj: nn.Linear | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, L, D]`` -> keys rotated by ``rope`` (:meth:`rope` of their positions) and values ``[B, Hkv, L, d]``.

        ``k_proj, v_proj`` replace the layer's own projections (untied fading keys/values).
        """
        k = self._heads((k_proj or self.k_proj)(x), self.num_kv_heads)
        v = self._heads((v_proj or self.v_proj)(x), self.num_kv_heads)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return (k if rope is None else apply_rotary(k, *rope)), v

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """Heads ``[B, H, L, d]`` -> ``[B, L, D]``."""
        return self.o_proj(o.transpose(1, 2).flatten(2))
