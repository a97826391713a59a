"""``nn.Linear`` whose few-row products use every CPU thread (``ops.linear.linear``); same parameters and names."""

from __future__ import annotations

import torch
from torch import nn

from bmojo.ops.linear import linear


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`bmojo.ops.linear.linear`: decoding steps on a multi-threaded CPU split the
    weight's output rows across the threads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
