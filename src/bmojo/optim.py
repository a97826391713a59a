"""Optimiser settings shared by the recall and language-model trainers: weight-decay groups and the schedule.

Weight decay applies to matrix and convolution weights only: embeddings (and the LM head tied to them), norm
weights, biases and the SSM parameters ``A_log``, ``D`` and ``dt_bias`` are not decayed.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

NO_DECAY_NAMES = ("A_log", "D", "dt_bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups ``[decayed, not decayed]`` for ``model`` (a model with input embeddings; see the module docstring)."""
    embedding = model.get_input_embeddings().weight
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.dim() < 2 or p is embedding or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warmup to 1 over ``warmup`` steps, then cosine decay to 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
