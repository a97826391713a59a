"""Mamba-1 selective-scan forward pass as a Triton kernel; same contract as ``bmojo.ops.selective_scan``.

One program per (batch element, block of ``BLOCK_E`` channels) keeps the ``[BLOCK_E, N]`` state in registers and
walks the sequence once::

    h[e, n] = exp(delta_t[e] * A[e, n]) * h[e, n] + delta_t[e] * u_t[e] * B_t[n];   y_t[e] = sum_n C_t[n] * h[e, n]

so it reads every input once and writes ``y`` and the final state, with no ``[L, E, N]`` intermediate. Inputs may
be any float dtype and any strides; the arithmetic is float32. Importing this module imports ``triton``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bmojo.ops.triton import check_inputs

ScanOut = tuple[torch.Tensor, torch.Tensor]


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, h0_ptr, y_ptr, ht_ptr,
    length, channels, states,
    su_b, su_t, su_e, sd_b, sd_t, sd_e, sa_e, sa_n, sb_b, sb_t, sb_n, sc_b, sc_t, sc_n,
    sh0_b, sh0_e, sh0_n, sy_b, sy_t, sy_e, sht_b, sht_e, sht_n,
    HAS_H0: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    batch = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    e_ok, n_ok = e < channels, n < states
    en_ok = e_ok[:, None] & n_ok[None, :]
    # padded channels and states get A = delta = B = C = 0: their state stays 0 and adds nothing to y
    a = tl.load(a_ptr + e[:, None] * sa_e + n[None, :] * sa_n, mask=en_ok, other=0.0).to(tl.float32)
    if HAS_H0:
        h0 = h0_ptr + batch * sh0_b + e[:, None] * sh0_e + n[None, :] * sh0_n
        h = tl.load(h0, mask=en_ok, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    u_row, d_row = u_ptr + batch * su_b + e * su_e, delta_ptr + batch * sd_b + e * sd_e
    b_row, c_row = b_ptr + batch * sb_b + n * sb_n, c_ptr + batch * sc_b + n * sc_n
    y_row = y_ptr + batch * sy_b + e * sy_e
    for t in range(length):
        u = tl.load(u_row + t * su_t, mask=e_ok, other=0.0).to(tl.float32)
        d = tl.load(d_row + t * sd_t, mask=e_ok, other=0.0).to(tl.float32)
        b = tl.load(b_row + t * sb_t, mask=n_ok, other=0.0).to(tl.float32)
        c = tl.load(c_row + t * sc_t, mask=n_ok, other=0.0).to(tl.float32)
        h = tl.exp(d[:, None] * a) * h + (d * u)[:, None] * b[None, :]
        tl.store(y_row + t * sy_t, tl.sum(h * c[None, :], axis=1), mask=e_ok)
    ht = ht_ptr + batch * sht_b + e[:, None] * sht_e + n[None, :] * sht_n
    tl.store(ht, h, mask=en_ok)


def _check_shapes(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  initial_state: torch.Tensor | None) -> None:  # fmt: skip
    """Raise ``ValueError`` naming the first input whose shape does not fit ``u [batch, L, E]``, ``A [E, N]``."""
    if u.dim() != 3:
        raise ValueError(f"u must be [batch, length, channels], got shape {tuple(u.shape)}")
    bsz, length, e = u.shape
    if A.dim() != 2 or A.shape[0] != e:
        raise ValueError(f"A must be [{e}, state], got shape {tuple(A.shape)}")
    n = A.shape[1]
    expected = {"delta": (delta, (bsz, length, e)), "B": (B, (bsz, length, n)), "C": (C, (bsz, length, n))}
    if initial_state is not None:
        expected["initial_state"] = (initial_state, (bsz, e, n))
    check_inputs(expected, u, delta, A, B, C, initial_state)


def selective_scan_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    block_e: int = 16,
) -> ScanOut:
    """``(y [batch, L, E] in u's dtype, final_state [batch, E, N] float32)``, equal to ``selective_scan_ref``.

    Shapes as in ``bmojo.ops.selective_scan``; ``block_e`` (a power of two) channels per program.
    """
    _check_shapes(u, delta, A, B, C, initial_state)
    if block_e < 1 or block_e & (block_e - 1):
        raise ValueError(f"block_e must be a power of two, got {block_e}")
    bsz, length, e = u.shape
    n = A.shape[1]
    y = torch.empty(bsz, length, e, dtype=torch.float32, device=u.device)
    final = torch.empty(bsz, e, n, dtype=torch.float32, device=u.device)
    h0 = final if initial_state is None else initial_state  # never read without HAS_H0
    block_n = triton.next_power_of_2(n)
    block_e = min(block_e, triton.next_power_of_2(e))
    grid = (bsz, triton.cdiv(e, block_e))
    _selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, h0, y, final, length, e, n,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *h0.stride(), *y.stride(),
        *final.stride(), HAS_H0=initial_state is not None, BLOCK_E=block_e, BLOCK_N=block_n,
        num_warps=1 if block_e * block_n <= 512 else 4,
    )  # fmt: skip
    return y.to(u.dtype), final
