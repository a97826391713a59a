"""Mamba-1 selective scan as Triton kernels, forward and backward; same contract as ``bmojo.ops.selective_scan``.

Forward: one program per (batch element, block of ``BLOCK_E`` channels) keeps the ``[BLOCK_E, N]`` state in
registers and walks the sequence once::

    h[e, n] = exp(delta_t[e] * A[e, n]) * h[e, n] + delta_t[e] * u_t[e] * B_t[n];   y_t[e] = sum_n C_t[n] * h[e, n]

so it reads every input once and writes ``y`` and the final state (and, for the backward, the state at the start of
every chunk of ``CHUNK`` steps), with no ``[L, E, N]`` intermediate. Backward: the same programs walk the chunks in
reverse with the state's gradient in registers; each chunk's states are recomputed from its starting state into a
per-program scratch buffer, then read back step by step in reverse. ``B, C`` gradients come out per block of
channels and are summed afterwards, ``A``'s per batch element. Inputs may be any float dtype and any strides; the
arithmetic is float32. The calls are ``torch.library.triton_op`` custom ops (``torch.compile`` keeps them).
Importing this module imports ``triton``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from bmojo.ops.selective_scan import check_scan_inputs
from bmojo.ops.triton import check_inputs, kernel_op, needs_grad, register_scan_autograd

ScanOut = tuple[torch.Tensor, torch.Tensor]


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, h0_ptr, y_ptr, ht_ptr, chunk_states_ptr,
    length, channels, states,
    su_b, su_t, su_e, sd_b, sd_t, sd_e, sa_e, sa_n, sb_b, sb_t, sb_n, sc_b, sc_t, sc_n,
    sh0_b, sh0_e, sh0_n, sy_b, sy_t, sy_e, sht_b, sht_e, sht_n,
    HAS_H0: tl.constexpr, STORE_STATES: tl.constexpr, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``chunk_states [b, chunks, E, N]`` contiguous: the state before each chunk's first step (``STORE_STATES``)."""
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
    cs = chunk_states_ptr + (batch * tl.cdiv(length, CHUNK) * channels + e[:, None]) * states + n[None, :]
    cs_chunk = tl.cast(channels, tl.int64) * states  # 64-bit: chunk offsets can pass 2**31 (the loop counts in 32)
    for t in range(length):
        if STORE_STATES:
            if t % CHUNK == 0:
                tl.store(cs + (t // CHUNK) * cs_chunk, h, mask=en_ok)
        u = tl.load(u_row + t * su_t, mask=e_ok, other=0.0).to(tl.float32)
        d = tl.load(d_row + t * sd_t, mask=e_ok, other=0.0).to(tl.float32)
        b = tl.load(b_row + t * sb_t, mask=n_ok, other=0.0).to(tl.float32)
        c = tl.load(c_row + t * sc_t, mask=n_ok, other=0.0).to(tl.float32)
        h = tl.exp(d[:, None] * a) * h + (d * u)[:, None] * b[None, :]
        tl.store(y_row + t * sy_t, tl.sum(h * c[None, :], axis=1), mask=e_ok)
    ht = ht_ptr + batch * sht_b + e[:, None] * sht_e + n[None, :] * sht_n
    tl.store(ht, h, mask=en_ok)


@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, chunk_states_ptr, dy_ptr, dht_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, da_ptr, db_ptr, dc_ptr, dh0_ptr,
    length, channels, states,
    su_b, su_t, su_e, sd_b, sd_t, sd_e, sa_e, sa_n, sb_b, sb_t, sb_n, sc_b, sc_t, sc_n, sdy_b, sdy_t, sdy_e,
    sdht_b, sdht_e, sdht_n,
    CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Gradients of one (batch element, block of channels), chunks in reverse, ``dh`` the gradient of the state after
    the current step. ``scratch [programs, CHUNK + 1, BLOCK_E, BLOCK_N]``: slot ``s`` the chunk's state before its
    step ``s``. Outputs contiguous: ``du, ddelta [b, L, E]``, ``da, dh0 [b, E, N]``, ``db, dc [b, L, E blocks, N]``."""
    batch, block = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    e = block * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    e_ok, n_ok = e < channels, n < states
    en_ok = e_ok[:, None] & n_ok[None, :]
    a = tl.load(a_ptr + e[:, None] * sa_e + n[None, :] * sa_n, mask=en_ok, other=0.0).to(tl.float32)
    dh = tl.load(dht_ptr + batch * sdht_b + e[:, None] * sdht_e + n[None, :] * sdht_n, mask=en_ok, other=0.0)
    dh = dh.to(tl.float32)
    da = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    u_row, d_row = u_ptr + batch * su_b + e * su_e, delta_ptr + batch * sd_b + e * sd_e
    b_row, c_row = b_ptr + batch * sb_b + n * sb_n, c_ptr + batch * sc_b + n * sc_n
    dy_row = dy_ptr + batch * sdy_b + e * sdy_e
    n_chunks = tl.cdiv(length, CHUNK)
    blocks = tl.num_programs(1)
    cs = chunk_states_ptr + (batch * n_chunks * channels + e[:, None]) * states + n[None, :]
    cs_chunk, bc_t = tl.cast(channels, tl.int64) * states, tl.cast(blocks, tl.int64) * states  # 64-bit, as above
    tile = tl.arange(0, BLOCK_E)[:, None] * BLOCK_N + n[None, :]
    scratch = scratch_ptr + (batch * blocks + block) * (CHUNK + 1) * BLOCK_E * BLOCK_N + tile
    grad_row = batch * length * channels + e  # (batch, t = 0, e) in the [b, L, E] outputs
    bc_row = (batch * length * blocks + block) * states + n  # (batch, t = 0, block, n) in the [b, L, blocks, N] ones
    for back in range(n_chunks):
        start = (n_chunks - 1 - back) * CHUNK
        h = tl.load(cs + (start // CHUNK) * cs_chunk, mask=en_ok, other=0.0)
        tl.store(scratch, h)
        for s in range(CHUNK):  # steps past the end have delta = u = 0: they leave the state as it is
            t = start + s
            e_t, n_t = e < tl.where(t < length, channels, 0), n < tl.where(t < length, states, 0)
            u = tl.load(u_row + t * su_t, mask=e_t, other=0.0).to(tl.float32)
            d = tl.load(d_row + t * sd_t, mask=e_t, other=0.0).to(tl.float32)
            b = tl.load(b_row + t * sb_t, mask=n_t, other=0.0).to(tl.float32)
            h = tl.exp(d[:, None] * a) * h + (d * u)[:, None] * b[None, :]
            tl.store(scratch + (s + 1) * BLOCK_E * BLOCK_N, h)
        tl.debug_barrier()
        for r in range(CHUNK):
            s = CHUNK - 1 - r
            t = start + s
            e_t, n_t = e < tl.where(t < length, channels, 0), n < tl.where(t < length, states, 0)
            u = tl.load(u_row + t * su_t, mask=e_t, other=0.0).to(tl.float32)
            d = tl.load(d_row + t * sd_t, mask=e_t, other=0.0).to(tl.float32)
            b = tl.load(b_row + t * sb_t, mask=n_t, other=0.0).to(tl.float32)
            c = tl.load(c_row + t * sc_t, mask=n_t, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + t * sdy_t, mask=e_t, other=0.0).to(tl.float32)
            h = tl.load(scratch + (s + 1) * BLOCK_E * BLOCK_N)
            h_prev = tl.load(scratch + s * BLOCK_E * BLOCK_N)
            dh += dy[:, None] * c[None, :]
            decay = tl.exp(d[:, None] * a)
            grad_decay = dh * decay * h_prev  # dL/d(delta * A) per state
            da += grad_decay * d[:, None]
            tl.store(ddelta_ptr + grad_row + t * channels, tl.sum(grad_decay * a + dh * u[:, None] * b[None, :], 1),
                     mask=e_t)  # fmt: skip
            tl.store(du_ptr + grad_row + t * channels, tl.sum(dh * b[None, :], 1) * d, mask=e_t)
            tl.store(db_ptr + bc_row + t * bc_t, tl.sum(dh * (d * u)[:, None], 0), mask=n_t)
            tl.store(dc_ptr + bc_row + t * bc_t, tl.sum(dy[:, None] * h, 0), mask=n_t)
            dh = dh * decay
        tl.debug_barrier()
    out = (batch * channels + e[:, None]) * states + n[None, :]
    tl.store(da_ptr + out, da, mask=en_ok)
    tl.store(dh0_ptr + out, dh, mask=en_ok)


def _check_shapes(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  initial_state: torch.Tensor | None) -> None:  # fmt: skip
    """``bmojo.ops.selective_scan.check_scan_inputs``, then one device and sizes the kernels' offsets hold."""
    check_scan_inputs(u, delta, A, B, C, initial_state)
    check_inputs(u, delta, A, B, C, initial_state)


def _launch(u: torch.Tensor, block_e: int, block_n: int) -> tuple[tuple[int, int], int]:
    """The grid (batch elements, blocks of channels) and the warps of a program (one for a small state tile)."""
    return (u.shape[0], triton.cdiv(u.shape[2], block_e)), 1 if block_e * block_n <= 512 else 4


@kernel_op("bmojo::selective_scan_fwd")
def _scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              initial_state: torch.Tensor | None, block_e: int, chunk: int,
              store_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(y in u's dtype, final state, the state before each chunk [b, chunks, E, N])`` (the last empty unless
    ``store_states``, which the backward needs)."""
    bsz, length, e = u.shape
    n = A.shape[1]
    y = torch.empty(bsz, length, e, dtype=torch.float32, device=u.device)
    final = torch.empty(bsz, e, n, dtype=torch.float32, device=u.device)
    chunk_states = torch.empty(bsz, triton.cdiv(length, chunk) if store_states else 0, e, n, dtype=torch.float32,
                               device=u.device)
    h0 = final if initial_state is None else initial_state  # never read without HAS_H0
    cs = chunk_states if store_states else final  # never written without STORE_STATES
    block_n = triton.next_power_of_2(n)
    grid, warps = _launch(u, block_e, block_n)
    wrap_triton(_selective_scan_fwd_kernel)[grid](
        u, delta, A, B, C, h0, y, final, cs, length, e, n,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *h0.stride(), *y.stride(),
        *final.stride(), HAS_H0=initial_state is not None, STORE_STATES=store_states, CHUNK=chunk, BLOCK_E=block_e,
        BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return y.to(u.dtype), final, chunk_states


@kernel_op("bmojo::selective_scan_bwd")
def _scan_bwd(dy: torch.Tensor, d_final: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
              B: torch.Tensor, C: torch.Tensor, chunk_states: torch.Tensor, block_e: int,
              chunk: int) -> list[torch.Tensor]:  # fmt: skip
    """Gradients of :func:`_scan_fwd` with respect to ``u, delta, A, B, C`` and the initial state (float32)."""
    bsz, length, e = u.shape
    n = A.shape[1]
    block_n = triton.next_power_of_2(n)
    grid, warps = _launch(u, block_e, block_n)
    du, ddelta = (torch.empty(bsz, length, e, dtype=torch.float32, device=u.device) for _ in range(2))
    da, dh0 = (torch.empty(bsz, e, n, dtype=torch.float32, device=u.device) for _ in range(2))
    db, dc = (torch.empty(bsz, length, grid[1], n, dtype=torch.float32, device=u.device) for _ in range(2))
    scratch = torch.empty(bsz * grid[1], chunk + 1, block_e, block_n, dtype=torch.float32, device=u.device)
    wrap_triton(_selective_scan_bwd_kernel)[grid](
        u, delta, A, B, C, chunk_states, dy, d_final, scratch, du, ddelta, da, db, dc, dh0, length, e, n,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *dy.stride(), *d_final.stride(),
        CHUNK=chunk, BLOCK_E=block_e, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return [du.to(u.dtype), ddelta.to(delta.dtype), da.sum(0).to(A.dtype), db.sum(2).to(B.dtype),
            dc.sum(2).to(C.dtype), dh0]  # fmt: skip


register_scan_autograd(_scan_fwd, _scan_bwd, options=2)  # the backward takes block_e and chunk


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    block_e: int = 16,
    chunk: int = 64,
) -> ScanOut:
    """``(y [batch, L, E] in u's dtype, final_state [batch, E, N] float32)``, equal to ``selective_scan_ref``;
    differentiable (the backward kernel) where an input needs gradients.

    Shapes as in ``bmojo.ops.selective_scan``; ``block_e`` (a power of two) channels per program; ``chunk`` steps
    between the states the forward keeps for the backward (which recomputes the states of one chunk at a time).
    """
    _check_shapes(u, delta, A, B, C, initial_state)
    if block_e < 1 or block_e & (block_e - 1):
        raise ValueError(f"block_e must be a power of two, got {block_e}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    block_e = min(block_e, triton.next_power_of_2(u.shape[2]))
    y, final, _ = _scan_fwd(
        u, delta, A, B, C, initial_state, block_e, chunk, needs_grad(u, delta, A, B, C, initial_state)
    )
    return y, final
