"""``nn.Linear`` whose few-row products use every CPU thread (``ops.linear.linear``); same parameters and names."""

from __future__ import annotations

import torch
from torch import nn

from bmojo.ops.linear import linear


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`bmojo.ops.linear.linear`: on a multi-threaded CPU, a decoding step's products
    run on every thread."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
