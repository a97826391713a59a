"""Input checks shared by the mixers, so that bad input fails with a message naming it rather than deep inside torch."""

from __future__ import annotations

import torch

from bmojo.ops import check_positive


def check_sizes(**sizes: int) -> None:
    """``ValueError`` naming the first of ``sizes`` (a layer's constructor arguments) not an integer >= 1."""
    for name, value in sizes.items():
        check_positive(name, value)


def check_hidden_states(h: torch.Tensor, hidden_size: int, dtype: torch.dtype) -> None:
    """``ValueError`` unless ``h`` is ``[batch >= 1, length >= 1, hidden_size]``; ``TypeError`` unless it is of the
    layer's weights' ``dtype`` (any floating dtype under autocast)."""
    if h.dim() != 3 or h.shape[-1] != hidden_size:
        raise ValueError(f"expected hidden states [batch, length, {hidden_size}], got shape {tuple(h.shape)}")
    if h.shape[1] == 0:
        raise ValueError("empty sequence: length must be >= 1")
    if h.shape[0] == 0:
        raise ValueError("empty batch: batch size must be >= 1")
    if not h.is_floating_point() or (h.dtype != dtype and not torch.is_autocast_enabled(h.device.type)):
        raise TypeError(f"hidden states are {h.dtype} but the layer's weights are {dtype}: cast one to the other's "
                        "dtype, or run under torch.autocast")  # fmt: skip
