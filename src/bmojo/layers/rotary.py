"""Rotary position embedding (RoPE) at explicit integer positions, in the rotate-half layout of Llama.

Partial RoPE (GPT-NeoX, Phi: ``partial_rotary_factor``) rotates only the first ``rotary_dim`` dimensions of each
head and leaves the rest position-free, which keeps a content-only part in every query-key inner product.
"""

from __future__ import annotations

import torch
from torch import nn

from bmojo.ops.linear import exporting

# compiled, at least this many positions (of a sequence) get their cos/sin as a table (:func:`rotary_table`)
TABLE_ROWS = 3


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@torch.library.custom_op("bmojo::rotary_table", mutates_args=())
def rotary_table(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [..., 2 * len(inv_freq)]`` of the angles ``positions [...] * inv_freq`` (float32).

    An opaque op, so that ``torch.compile`` keeps them as buffers which the rotations read: inductor otherwise inlines
    them into every kernel that rotates queries or keys (or their gradients), which then computes a power, a cosine
    and a sine for every element of every head (130-170 us a call on an H200 in the 130m bench models' 2K training
    steps, several times what moving the tensor's bytes takes). A decoding step's one or two positions stay inline (a
    table would add kernels of its own to the step).
    """
    return _cos_sin(positions, inv_freq)


@rotary_table.register_fake
def _(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*positions.shape, 2 * inv_freq.shape[0])
    return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32)


class RotaryEmbedding(nn.Module):
    """Produces ``cos, sin`` of shape ``[..., head_dim]`` for integer positions of any shape (``head_dim``: the
    rotated dimensions, all of a head's or its first ``rotary_dim``)."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2 or head_dim < 2:
            raise ValueError(f"RoPE needs an even number of rotated dimensions >= 2, got {head_dim}")
        if not theta > 0 or theta == float("inf"):
            raise ValueError(f"rope_theta must be a finite number > 0, got {theta!r}")
        self.head_dim, self.theta = head_dim, theta
        self._inv_freq: torch.Tensor | None = None

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """``theta^(-2i/d)`` for ``i < d/2``: cached per device in eager mode (eager decoding would recompute it at
        every token; not a buffer, so meta-device loading cannot miss it), computed in compiled code (which folds
        it into a constant, and so never sees the cache change)."""
        if torch.compiler.is_compiling():
            return self._frequencies(device)
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = self._frequencies(device)
        return self._inv_freq

    def _frequencies(self, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / self.theta**exponents

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq(positions.device)
        if torch.compiler.is_compiling() and not exporting() and positions.shape[-1] >= TABLE_ROWS:
            return rotary_table(positions, inv_freq)
        return _cos_sin(positions, inv_freq)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``r`` dimensions of ``x [B, H, L, d]`` by angles ``cos, sin`` broadcastable to
    ``[B, 1, L, r]`` (``r <= d``); the other ``d - r`` pass unchanged."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
