"""RMSNorm and the gated RMSNorm of Mamba-2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bmojo.layers.checks import check_sizes
from bmojo.ops.ssd import gated_rms_norm


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last axis, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        check_sizes(dim=dim)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError(f"RMSNorm takes floating point input, got {x.dtype}")
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2 output norm: ``rmsnorm(x * silu(z))`` over groups of ``dim // n_groups`` channels."""

    def __init__(self, dim: int, n_groups: int = 1, eps: float = 1e-6) -> None:
        super().__init__()
        if n_groups < 1 or dim % n_groups:
            raise ValueError(f"n_groups ({n_groups}) must be >= 1 and divide dim ({dim})")
        self.eps = eps
        self.n_groups = n_groups
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if x.shape != z.shape:
            raise ValueError(f"the gate z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
        return gated_rms_norm(x, z, self.weight, self.n_groups, self.eps)
