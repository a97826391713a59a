"""A linear map of a few rows, split across the CPU's threads.

For the one to few rows of a decoding step (``x [..., in]`` with at most :data:`MAX_ROWS` rows), PyTorch's CPU
matrix-vector products run on one thread however many it has, and a step reads every weight once, so a model's
decoding is bound by one core's memory bandwidth. :func:`linear` gives each thread an equal share of the weight's
output rows, as one batched product of ``min(threads, out // MIN_PIECE, weight bytes // MIN_PIECE_BYTES)`` pieces
(``bmm`` runs the batch on the threads; the last ``out % pieces`` rows, if any, are one more small product): on a
2-core machine a ``3072 x 768`` product takes 2-6x less time, a ``688 x 256`` one about 1.5x less, while for pieces
of less than about 192 KiB the split's extra calls cost more than it saves (``benchmarks/RESULTS.md``). Under
``torch.compile`` the same products, of any size, are a broadcast multiply and sum, which inductor computes in its own
loops on every thread, fused with the elementwise work around them; this assumes inductor, as a backend that runs
the graph op by op would hold the ``[rows, out, in]`` products in memory. More rows, fewer than two pieces, CUDA,
autocast, mixed dtypes or ``torch.export`` keep ``F.linear``, the reference (with its errors for shapes that do not
fit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_ROWS = 16
MIN_PIECE = 32  # output rows per piece at least
MIN_PIECE_BYTES = 192 * 1024  # weight bytes per piece at least, eager (below, the split's extra calls cost more than
# they save); none under torch.compile, where the product adds no call of its own


@torch.compiler.assume_constant_result
def _threads() -> int:
    """``torch.get_num_threads()``, read once per graph by ``torch.compile`` (a constant of the graph)."""
    return torch.get_num_threads()


def exporting() -> bool:
    """Whether ``torch.export`` is tracing: ``torch.compiler``'s flag, read directly where it exists, as torch 2.11's
    dynamo takes ``is_exporting()`` to be true under ``torch.compile`` too; else ``is_exporting()`` (torch >= 2.5)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return flag if flag is not None else getattr(torch.compiler, "is_exporting", bool)()


def _pieces(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, min_bytes: int) -> int:
    """How many pieces :func:`linear` cuts the weight's output rows into; below 2 it calls ``F.linear``."""
    if x.device.type != "cpu" or x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        return 0
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype) or torch.is_autocast_enabled("cpu"):
        return 0
    if exporting():  # an exported graph keeps the matrix product
        return 0
    rows = x.numel() // max(1, x.shape[-1])
    if not 0 < rows <= MAX_ROWS:
        return 0
    return min(_threads(), weight.shape[0] // MIN_PIECE, weight.numel() * weight.element_size() // min_bytes)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in] @ weight [out, in].T (+ bias [out])`` -> ``[..., out]``, as ``F.linear``."""
    compiling = torch.compiler.is_compiling()
    parts = _pieces(x, weight, bias, 1 if compiling else MIN_PIECE_BYTES)
    if parts < 2:
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    if compiling:  # inductor generates the product itself, in loops fused with the work around it
        y = (x.unsqueeze(-2) * weight).sum(-1)
        return y if bias is None else y + bias
    even = out_features - out_features % parts  # the first rows, shared out; the few others (< parts) by F.linear
    flat = x.reshape(-1, in_features)
    rows = flat.shape[0]
    pieces = (weight if even == out_features else weight[:even]).reshape(parts, -1, in_features)
    # each piece's weight rows times the inputs as columns: the weight read as stored and, for one input row, the
    # output in order (the inputs times the transposed pieces took up to 2.2x longer; benchmarks/RESULTS.md)
    y = torch.bmm(pieces, flat.t().expand(parts, in_features, rows)).view(even, rows).t()
    if even < out_features:
        y = torch.cat([y, F.linear(flat, weight[even:])], dim=1)
    y = y.reshape(*x.shape[:-1], out_features)
    return y if bias is None else y + bias
