"""Sequence-mixing kernels in pure PyTorch: attention, Mamba-1 selective scan, Mamba-2 SSD."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def check_shapes(expected: Iterable[tuple[str, torch.Tensor | None, tuple[int, ...]]]) -> None:
    """Raise ``ValueError`` naming the first ``(name, tensor, shape)`` whose tensor has another shape (``None``: an
    absent input, not checked)."""
    for name, t, shape in expected:
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def check_positive(name: str, value: object) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer >= 1 (a size or a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_integers(name: str, value: object) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``value`` is an integer tensor (ids, positions, offsets, targets)."""
    dtype = value.dtype if isinstance(value, torch.Tensor) else None
    if dtype is None or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {type(value) if dtype is None else dtype}")
