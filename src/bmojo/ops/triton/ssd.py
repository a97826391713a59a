"""Mamba-2 SSD forward pass as one Triton kernel; same contract as ``bmojo.ops.ssd.ssd_scan``.

One program per (batch element, head, block of ``BLOCK_P`` head dimensions) keeps the ``[BLOCK_P, N]`` state in
registers and walks the sequence chunk by chunk (``BLOCK_Q`` steps)::

    cum_i = sum_{s <= i} dt_s A                                   (log decay from the chunk start, per step)
    y_i   = sum_{j <= i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j + exp(cum_i) S C_i
    S    <- exp(cum_end) S + sum_j exp(cum_end - cum_j) dt_j outer(x_j, B_j)

so it reads every input once and writes ``y`` and the final state, with no ``[chunks, Q, Q]`` intermediate in memory.
Inputs may be any float dtype and any strides; the arithmetic is float32 (float32 products at full precision).
Importing this module imports ``triton``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bmojo.ops.ssd import _heads_per_group

ScanOut = tuple[torch.Tensor, torch.Tensor]


@triton.jit
def _ssd_fwd_kernel(
    x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, h0_ptr, y_ptr, ht_ptr,
    length, heads, head_dim, states, heads_per_group,
    sx_b, sx_t, sx_h, sx_p, sdt_b, sdt_t, sdt_h, sa_h, sb_b, sb_t, sb_g, sb_n, sc_b, sc_t, sc_g, sc_n,
    sh0_b, sh0_h, sh0_p, sh0_n, sy_b, sy_t, sy_h, sy_p, sht_b, sht_h, sht_p, sht_n,
    HAS_H0: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    batch, head = (bh // heads).to(tl.int64), (bh % heads).to(tl.int64)
    group = head // heads_per_group
    p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    q = tl.arange(0, BLOCK_Q)
    p_ok, n_ok = p < head_dim, n < states
    pn_ok = p_ok[:, None] & n_ok[None, :]
    if HAS_H0:
        h0 = h0_ptr + batch * sh0_b + head * sh0_h + p[:, None] * sh0_p + n[None, :] * sh0_n
        state = tl.load(h0, mask=pn_ok, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    a = tl.load(a_ptr + head * sa_h).to(tl.float32)
    x_base = x_ptr + batch * sx_b + head * sx_h + p[None, :] * sx_p
    dt_base = dt_ptr + batch * sdt_b + head * sdt_h
    b_base = b_ptr + batch * sb_b + group * sb_g + n[None, :] * sb_n
    c_base = c_ptr + batch * sc_b + group * sc_g + n[None, :] * sc_n
    y_base = y_ptr + batch * sy_b + head * sy_h + p[None, :] * sy_p
    causal = q[:, None] >= q[None, :]
    for start in range(0, length, BLOCK_Q):
        t = start + q
        t_ok = t < length
        # steps past the end get dt = 0 (no decay, no input) and B = C = x = 0: they change nothing
        x = tl.load(x_base + t[:, None] * sx_t, mask=t_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)
        dt = tl.load(dt_base + t * sdt_t, mask=t_ok, other=0.0).to(tl.float32)
        bq = tl.load(b_base + t[:, None] * sb_t, mask=t_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        cq = tl.load(c_base + t[:, None] * sc_t, mask=t_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        cum = tl.cumsum(dt * a, 0)  # [Q]
        decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))  # [Q, Q]: after j to after i
        scores = tl.dot(cq, tl.trans(bq), input_precision=PRECISION) * decay * dt[None, :]
        y = tl.dot(scores, x, input_precision=PRECISION)  # [Q, P]
        y += tl.exp(cum)[:, None] * tl.dot(cq, tl.trans(state), input_precision=PRECISION)
        tl.store(y_base + t[:, None] * sy_t, y, mask=t_ok[:, None] & p_ok[None, :])
        total = tl.sum(dt * a, 0)
        weight = tl.exp(total - cum) * dt  # [Q]: step j's input decayed to the chunk end
        state = tl.exp(total) * state + tl.dot(tl.trans(x * weight[:, None]), bq, input_precision=PRECISION)
    ht = ht_ptr + batch * sht_b + head * sht_h + p[:, None] * sht_p + n[None, :] * sht_n
    tl.store(ht, state, mask=pn_ok)


def _check_shapes(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  initial_state: torch.Tensor | None) -> None:  # fmt: skip
    """Raise ``ValueError`` naming the first input whose shape does not fit ``x [batch, L, H, P]``,
    ``B [batch, L, G, N]``."""
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, length, heads, head_dim], got shape {tuple(x.shape)}")
    if B.dim() != 4:
        raise ValueError(f"B must be [batch, length, groups, state], got shape {tuple(B.shape)}")
    bsz, length, heads, p = x.shape
    g, n = B.shape[2:]
    _heads_per_group(heads, g)
    expected = {"dt": (dt, (bsz, length, heads)), "A": (A, (heads,)), "B": (B, (bsz, length, g, n)),
                "C": (C, (bsz, length, g, n))}  # fmt: skip
    if initial_state is not None:
        expected["initial_state"] = (initial_state, (bsz, heads, p, n))
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    devices = {t.device for t in (x, dt, A, B, C, initial_state) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def ssd_scan_fwd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 32,
    block_p: int = 32,
) -> ScanOut:
    """``(y [batch, L, H, P] in x's dtype, final_state [batch, H, P, N] float32)``, equal to ``ssd_scan_ref``.

    Shapes as in ``bmojo.ops.ssd``; ``chunk_size`` steps per chunk and ``block_p`` head dimensions per program are
    powers of two (16 or more: the sizes ``tl.dot`` takes; the state size is padded to one too).
    """
    _check_shapes(x, dt, A, B, C, initial_state)
    for name, value in (("chunk_size", chunk_size), ("block_p", block_p)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    bsz, length, heads, p = x.shape
    g, n = B.shape[2:]
    y = torch.empty(bsz, length, heads, p, dtype=torch.float32, device=x.device)
    final = torch.empty(bsz, heads, p, n, dtype=torch.float32, device=x.device)
    h0 = final if initial_state is None else initial_state  # never read without HAS_H0
    block_p = min(block_p, max(16, triton.next_power_of_2(p)))
    grid = (bsz * heads, triton.cdiv(p, block_p))
    _ssd_fwd_kernel[grid](
        x, dt, A, B, C, h0, y, final, length, heads, p, n, heads // g,
        *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *h0.stride(), *y.stride(), *final.stride(),
        HAS_H0=initial_state is not None, BLOCK_Q=chunk_size, BLOCK_P=block_p,
        BLOCK_N=max(16, triton.next_power_of_2(n)), PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return y.to(x.dtype), final
