"""The eidetic memory's decoding-step update as one Triton kernel; same contract as
``bmojo.layers.eidetic.stage_evicted``.

A program per sequence reads the candidate (the token in the window ring's slot about to be overwritten, the slot
computed from the position it reads) and the staging memory's scores and positions, finds the slot
:func:`bmojo.layers.eidetic.insert_slot` picks (the lowest score, the newest position among equal ones) and, where the
candidate scores strictly higher, writes its keys and values (every head), score and position there: one kernel where
inductor launched two (the choice, a reduction, then the write of the keys and values across the memory). The call
is a ``torch.library.triton_op`` custom op, so ``torch.compile`` keeps the kernel. Importing this module imports
``triton``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from bmojo.ops.triton import check_inputs, kernel_op


@triton.jit
def _stage_evicted_kernel(
    keys, values, positions, win_score, pos, window, stage_k, stage_v, stage_score, stage_pos, heads, head_dim, size,
    stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd, stride_pb, stride_ps,
    stride_wb, stride_ws, stride_skb, stride_skh, stride_sks, stride_skd, stride_svb, stride_svh, stride_svs,
    stride_svd, stride_ssb, stride_sss, stride_spb, stride_sps, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """A program per sequence (see the module docstring)."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.load(pos) % window
    cand_pos = tl.load(positions + b * stride_pb + s * stride_ps)
    cand_score = tl.load(win_score + b * stride_wb + s * stride_ws).to(tl.float32)
    cand_score = tl.where(cand_pos < 0, float("-inf"), cand_score)
    j = tl.arange(0, BLOCK_K)
    ok = j < size
    score = tl.load(stage_score + b * stride_ssb + j * stride_sss, mask=ok, other=float("inf"))
    held = tl.load(stage_pos + b * stride_spb + j * stride_sps, mask=ok, other=-2)
    worst = tl.min(score, 0)
    at = tl.argmax(tl.where(ok & (score == worst), held, -2), 0)  # (the first of equal ones, as torch.argmax)
    enter = cand_score > worst
    tl.store(stage_score + b * stride_ssb + at * stride_sss, cand_score.to(stage_score.dtype.element_ty), mask=enter)
    tl.store(stage_pos + b * stride_spb + at * stride_sps, cand_pos, mask=enter)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < tl.where(enter, head_dim, 0)  # (no head dimension unless the candidate enters)
    for h in range(heads):
        k = tl.load(keys + b * stride_kb + h * stride_kh + s * stride_ks + d * stride_kd, mask=d_ok)
        v = tl.load(values + b * stride_vb + h * stride_vh + s * stride_vs + d * stride_vd, mask=d_ok)
        tl.store(stage_k + b * stride_skb + h * stride_skh + at * stride_sks + d * stride_skd, k, mask=d_ok)
        tl.store(stage_v + b * stride_svb + h * stride_svh + at * stride_svs + d * stride_svd, v, mask=d_ok)


@kernel_op("bmojo::stage_evicted", mutates_args=("stage_k", "stage_v", "stage_score", "stage_pos"))
def stage_evicted_triton(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, win_score: torch.Tensor,
                         pos: torch.Tensor, window: int, stage_k: torch.Tensor, stage_v: torch.Tensor,
                         stage_score: torch.Tensor, stage_pos: torch.Tensor) -> None:  # fmt: skip
    """``bmojo.layers.eidetic.stage_evicted`` in one kernel (the staging memory's keys and values in the window's
    dtype)."""
    check_inputs(keys, values, positions, win_score, pos, stage_k, stage_v, stage_score, stage_pos)
    b, heads, _, d = keys.shape
    size = stage_pos.shape[1]
    if stage_k.shape != (b, heads, size, d) or stage_v.shape != stage_k.shape or pos.numel() != 1:
        raise ValueError(f"expected staging keys/values {(b, heads, size, d)} and one position, got "
                         f"{tuple(stage_k.shape)}, {tuple(stage_v.shape)} and {tuple(pos.shape)}")  # fmt: skip
    wrap_triton(_stage_evicted_kernel)[(b,)](
        keys, values, positions, win_score, pos, window, stage_k, stage_v, stage_score, stage_pos, heads, d, size,
        *keys.stride(), *values.stride(), *positions.stride(), *win_score.stride(), *stage_k.stride(),
        *stage_v.stride(), *stage_score.stride(), *stage_pos.stride(),
        BLOCK_K=triton.next_power_of_2(size), BLOCK_D=triton.next_power_of_2(d),
    )  # fmt: skip
