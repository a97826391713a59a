"""Mamba-2 SSD as Triton kernels, forward and backward; same contract as ``bmojo.ops.ssd.ssd_scan``.

Forward, per chunk of ``BLOCK_Q`` steps with incoming state ``S``::

    cum_i = sum_{s <= i} dt_s A                                   (log decay from the chunk start, per step)
    y_i   = sum_{j <= i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j + exp(cum_i) S C_i
    S    <- exp(cum_end) S + sum_j exp(cum_end - cum_j) dt_j outer(x_j, B_j)

in three kernels: every chunk's own part of its outgoing state (the sum), all chunks at once; a program per (batch
element, head, block of ``BLOCK_P`` head dimensions) walking the chunks in order with the ``[BLOCK_P, N]`` state in
registers (no products), writing each chunk's incoming state (which the backward reads too) and the final state;
then every chunk's outputs at once. No ``[chunks, Q, Q]`` intermediate reaches memory.

Backward, two kernels: a program per (batch element, head, block of head dimensions, :func:`kernel_tiles`) walks the
chunks in reverse carrying only the gradient of the state (one product a chunk) and writes each chunk's
outgoing-state gradient; then a program per (chunk, head, batch element, block of head dimensions), all chunks at
once, recomputes its chunk's products and writes its gradients. ``dt, B, C`` and ``A`` gradients come out per head
and block of head dimensions (``A``'s per chunk too) and are summed over them (and the batch) afterwards.

Inputs may be any float dtype and any strides; the arithmetic is float32, its matrix products at full float32
precision for float32 inputs (unless ``torch.set_float32_matmul_precision`` allows TF32) and in TF32 for 16-bit ones
(:func:`bmojo.ops.triton.dot_precision`), which rounds the float32 states and gradients entering them too (to about
1e-3 relative, against the interpreter's exact float32).
The calls are ``torch.library.triton_op`` custom ops, so ``torch.compile`` keeps the kernels and differentiates
through them. Importing this module imports ``triton``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from bmojo.ops.ssd import check_ssd_inputs
from bmojo.ops.triton import (
    check_inputs,
    dot_precision,
    dot_tile,
    kernel_op,
    needs_grad,
    register_scan_autograd,
)

ScanOut = tuple[torch.Tensor, torch.Tensor]


@triton.jit
def _tile(ptr, t, cols, stride_t, stride_c, t_ok, cols_ok):
    """The float32 tile ``ptr[t, cols]`` (steps by columns), zeros outside ``t_ok`` and ``cols_ok``: padded steps get
    no input, so they change nothing."""
    mask = t_ok[:, None] & cols_ok[None, :]
    return tl.load(ptr + t[:, None] * stride_t + cols[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _chunk_program(heads, heads_per_group, first, count, blocks, length, head_dim, states, BLOCK_Q: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """This program's ``(batch element, head, B/C group, chunk, block, head dims p, states n, steps t, and whether
    each of p, n and t is in range)``, all int64, in a grid of ``batch * heads * count * blocks`` programs along its
    first axis (the others stop at 65535), the block of ``BLOCK_P`` head dimensions varying fastest, then the chunk
    from chunk ``first``."""
    pid = tl.program_id(0).to(tl.int64)
    rest = pid // blocks // count
    batch, head, chunk, block = rest // heads, rest % heads, pid // blocks % count, pid % blocks
    p, n = block * BLOCK_P + tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N).to(tl.int64)
    t = (first + chunk) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    return batch, head, head // heads_per_group, chunk, block, p, n, t, p < head_dim, n < states, t < length


@triton.jit
def _walk_program(heads, head_dim, states, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """A walk over the chunks on a grid of (``batch * heads``, blocks of ``BLOCK_P`` head dimensions): this program's
    ``(batch element, head, batch element * heads + head, head dims p, states n, a chunk's steps q, whether p and n
    are in range, and the offsets of its [p, n] rows in a contiguous [P, N] state)``, all int64 (a step's offset
    into ``dy``, whose strides no check bounds, can pass 2**31)."""
    bh = tl.program_id(0).to(tl.int64)
    p, n = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N).to(tl.int64)
    pn = p[:, None] * states + n[None, :]
    return bh // heads, bh % heads, bh, p, n, tl.arange(0, BLOCK_Q).to(tl.int64), p < head_dim, n < states, pn


@triton.jit
def _ssd_fwd_own_kernel(
    x_ptr, dt_ptr, a_ptr, b_ptr, cs_ptr, length, heads, head_dim, states, heads_per_group, first, count, n_chunks,
    blocks,
    sx_b, sx_t, sx_h, sx_p, sdt_b, sdt_t, sdt_h, sa_h, sb_b, sb_t, sb_g, sb_n,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Each chunk's own part of its outgoing state, ``sum_j exp(cum_end - cum_j) dt_j outer(x_j, B_j) [P, N]``, into
    ``cs [b, H, n_chunks, P, N]`` (contiguous), for the ``count`` chunks from chunk ``first``: a program per (batch
    element, head, chunk, block of head dimensions)."""
    batch, head, group, chunk, block, p, n, t, p_ok, n_ok, t_ok = _chunk_program(
        heads, heads_per_group, first, count, blocks, length, head_dim, states, BLOCK_Q, BLOCK_P, BLOCK_N
    )
    x = _tile(x_ptr + batch * sx_b + head * sx_h, t, p, sx_t, sx_p, t_ok, p_ok)
    dt = tl.load(dt_ptr + batch * sdt_b + head * sdt_h + t * sdt_t, mask=t_ok, other=0.0).to(tl.float32)
    bq = _tile(b_ptr + batch * sb_b + group * sb_g, t, n, sb_t, sb_n, t_ok, n_ok)
    a = tl.load(a_ptr + head * sa_h).to(tl.float32)
    cum = tl.cumsum(dt * a, 0)
    weight = tl.exp(tl.sum(dt * a, 0) - cum) * dt  # [Q]: step j's input decayed to the chunk end
    own = tl.dot(tl.trans(x * weight[:, None]), bq, input_precision=PRECISION)
    cs = cs_ptr + (((batch * heads + head) * n_chunks + chunk) * head_dim + p[:, None]) * states + n[None, :]
    tl.store(cs, own, mask=p_ok[:, None] & n_ok[None, :])


@triton.jit
def _ssd_fwd_states_kernel(
    dt_ptr, a_ptr, h0_ptr, ht_ptr, cs_ptr, length, heads, head_dim, states, first, count, n_chunks,
    sdt_b, sdt_t, sdt_h, sa_h, sh0_b, sh0_h, sh0_p, sh0_n,
    HAS_H0: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The ``count`` chunks from chunk ``first`` in order, for one (batch element, head, block of head dimensions):
    replaces each chunk's own part in ``cs [b, H, n_chunks, P, N]`` (:func:`_ssd_fwd_own_kernel`) by its incoming
    state ``S``, from ``S = h0`` (or 0) and ``S <- exp(cum_end) S + own``, and writes the last outgoing state into
    ``ht [b, H, P, N]`` (contiguous; ``h0`` may be ``ht``: each program reads its rows before it writes them)."""
    batch, head, bh, p, n, q, p_ok, n_ok, pn = _walk_program(heads, head_dim, states, BLOCK_Q, BLOCK_P, BLOCK_N)
    pn_ok = p_ok[:, None] & n_ok[None, :]
    if HAS_H0:
        h0 = h0_ptr + batch * sh0_b + head * sh0_h + p[:, None] * sh0_p + n[None, :] * sh0_n
        state = tl.load(h0, mask=pn_ok, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    a = tl.load(a_ptr + head * sa_h).to(tl.float32)
    dt_base = dt_ptr + batch * sdt_b + head * sdt_h
    cs_base = cs_ptr + bh * n_chunks * head_dim * states + pn
    for chunk in range(count):
        t = (first + chunk) * BLOCK_Q + q
        dt = tl.load(dt_base + t * sdt_t, mask=t < length, other=0.0).to(tl.float32)
        cs = cs_base + tl.cast(chunk, tl.int64) * head_dim * states  # can pass 2**31
        own = tl.load(cs, mask=pn_ok, other=0.0)
        tl.store(cs, state, mask=pn_ok)
        state = tl.exp(tl.sum(dt * a, 0)) * state + own
    tl.store(ht_ptr + bh * head_dim * states + pn, state, mask=pn_ok)


@triton.jit
def _ssd_fwd_output_kernel(
    x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, cs_ptr, y_ptr, length, heads, head_dim, states, heads_per_group, first,
    count, n_chunks, blocks, sx_b, sx_t, sx_h, sx_p, sdt_b, sdt_t, sdt_h, sa_h, sb_b, sb_t, sb_g, sb_n,
    sc_b, sc_t, sc_g, sc_n, sy_b, sy_t, sy_h, sy_p,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Each chunk's outputs given its incoming state ``S`` (``cs``, :func:`_ssd_fwd_states_kernel`): ``y_i =
    sum_{j <= i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j + exp(cum_i) S C_i``, a program per (chunk, head, batch
    element, block of head dimensions), for the ``count`` chunks from chunk ``first`` (``cs`` holds ``n_chunks``)."""
    batch, head, group, chunk, block, p, n, t, p_ok, n_ok, t_ok = _chunk_program(
        heads, heads_per_group, first, count, blocks, length, head_dim, states, BLOCK_Q, BLOCK_P, BLOCK_N
    )
    x = _tile(x_ptr + batch * sx_b + head * sx_h, t, p, sx_t, sx_p, t_ok, p_ok)
    dt = tl.load(dt_ptr + batch * sdt_b + head * sdt_h + t * sdt_t, mask=t_ok, other=0.0).to(tl.float32)
    bq = _tile(b_ptr + batch * sb_b + group * sb_g, t, n, sb_t, sb_n, t_ok, n_ok)
    cq = _tile(c_ptr + batch * sc_b + group * sc_g, t, n, sc_t, sc_n, t_ok, n_ok)
    cs = cs_ptr + (((batch * heads + head) * n_chunks + chunk) * head_dim + p[:, None]) * states + n[None, :]
    state = tl.load(cs, mask=p_ok[:, None] & n_ok[None, :], other=0.0)
    a = tl.load(a_ptr + head * sa_h).to(tl.float32)
    cum = tl.cumsum(dt * a, 0)  # [Q]
    causal = t[:, None] >= t[None, :]
    decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))  # [Q, Q]: after j to after i
    scores = tl.dot(cq, tl.trans(bq), input_precision=PRECISION) * decay * dt[None, :]
    y = tl.dot(scores, x, input_precision=PRECISION)  # [Q, P]
    y += tl.exp(cum)[:, None] * tl.dot(cq, tl.trans(state), input_precision=PRECISION)
    tl.store(
        y_ptr + batch * sy_b + head * sy_h + t[:, None] * sy_t + p[None, :] * sy_p,
        y,
        mask=t_ok[:, None] & p_ok[None, :],
    )


@triton.jit
def _ssd_bwd_states_kernel(
    dt_ptr, a_ptr, c_ptr, dy_ptr, dht_ptr, d_out_ptr, dh0_ptr,
    length, heads, head_dim, states, heads_per_group, n_chunks,
    sdt_b, sdt_t, sdt_h, sa_h, sc_b, sc_t, sc_g, sc_n, sdy_b, sdy_t, sdy_h, sdy_p, sdht_b, sdht_h, sdht_p, sdht_n,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The gradient ``dS`` of every chunk's outgoing state, chunks in reverse, for one (batch element, head, block of
    ``BLOCK_P`` head dimensions): ``dS`` of the last is ``dht``, and a chunk's incoming state (the outgoing state
    of the chunk before) reaches its outputs and, decayed, its outgoing state, so ``dS_prev = sum_i exp(cum_i)
    outer(dy_i, C_i) + exp(total) dS``. Writes ``d_out [b, H, chunks, P, N]`` (contiguous) and the initial state's
    gradient ``dh0 [b, H, P, N]``."""
    batch, head, bh, p, n, q, p_ok, n_ok, pn = _walk_program(heads, head_dim, states, BLOCK_Q, BLOCK_P, BLOCK_N)
    group = head // heads_per_group
    pn_ok = p_ok[:, None] & n_ok[None, :]
    dht = dht_ptr + batch * sdht_b + head * sdht_h + p[:, None] * sdht_p + n[None, :] * sdht_n
    d_state = tl.load(dht, mask=pn_ok, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + head * sa_h).to(tl.float32)
    dy_base = dy_ptr + batch * sdy_b + head * sdy_h
    dt_base = dt_ptr + batch * sdt_b + head * sdt_h
    c_base = c_ptr + batch * sc_b + group * sc_g
    out_base = d_out_ptr + bh * n_chunks * head_dim * states + pn
    for back in range(n_chunks):
        chunk = n_chunks - 1 - back
        tl.store(out_base + tl.cast(chunk, tl.int64) * head_dim * states, d_state, mask=pn_ok)  # can pass 2**31
        t = chunk * BLOCK_Q + q
        t_ok = t < length
        dy = _tile(dy_base, t, p, sdy_t, sdy_p, t_ok, p_ok)
        dt = tl.load(dt_base + t * sdt_t, mask=t_ok, other=0.0).to(tl.float32)
        cq = _tile(c_base, t, n, sc_t, sc_n, t_ok, n_ok)
        cum = tl.cumsum(dt * a, 0)
        dz = tl.exp(cum)[:, None] * dy
        d_state = tl.dot(tl.trans(dz), cq, input_precision=PRECISION) + tl.exp(tl.sum(dt * a, 0)) * d_state
    tl.store(dh0_ptr + bh * head_dim * states + pn, d_state, mask=pn_ok)


@triton.jit
def _ssd_bwd_chunk_kernel(
    x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, chunk_states_ptr, dy_ptr, d_out_ptr,
    dx_ptr, ddt_ptr, da_ptr, db_ptr, dc_ptr,
    length, heads, head_dim, states, heads_per_group, n_chunks, blocks,
    sx_b, sx_t, sx_h, sx_p, sdt_b, sdt_t, sdt_h, sa_h, sb_b, sb_t, sb_g, sb_n, sc_b, sc_t, sc_g, sc_n,
    scs_b, scs_h, scs_c, scs_p, scs_n, sdy_b, sdy_t, sdy_h, sdy_p,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Gradients of one chunk of one (batch element, head, block of ``BLOCK_P`` head dimensions), given its incoming
    state (``chunk_states``) and its outgoing state's gradient (``d_out``, :func:`_ssd_bwd_states_kernel`): every
    chunk at once. Outputs are contiguous: ``dx [b, L, H, P]`` and the sums over head dimensions per block of them,
    ``ddt [b, L, H, blocks]``, ``da [b, H, chunks, blocks]``, ``db, dc [b, L, H, blocks, N]`` (per head)."""
    batch, head, group, chunk, block, p, n, t, p_ok, n_ok, t_ok = _chunk_program(
        heads, heads_per_group, 0, n_chunks, blocks, length, head_dim, states, BLOCK_Q, BLOCK_P, BLOCK_N
    )
    q = tl.arange(0, BLOCK_Q)
    pn_ok = p_ok[:, None] & n_ok[None, :]
    tp_ok, tn_ok = t_ok[:, None] & p_ok[None, :], t_ok[:, None] & n_ok[None, :]
    x = _tile(x_ptr + batch * sx_b + head * sx_h, t, p, sx_t, sx_p, t_ok, p_ok)
    dy = _tile(dy_ptr + batch * sdy_b + head * sdy_h, t, p, sdy_t, sdy_p, t_ok, p_ok)
    dt = tl.load(dt_ptr + batch * sdt_b + head * sdt_h + t * sdt_t, mask=t_ok, other=0.0).to(tl.float32)
    bq = _tile(b_ptr + batch * sb_b + group * sb_g, t, n, sb_t, sb_n, t_ok, n_ok)
    cq = _tile(c_ptr + batch * sc_b + group * sc_g, t, n, sc_t, sc_n, t_ok, n_ok)
    cs = chunk_states_ptr + batch * scs_b + head * scs_h + chunk * scs_c
    state = tl.load(cs + p[:, None] * scs_p + n[None, :] * scs_n, mask=pn_ok, other=0.0)
    out = d_out_ptr + (((batch * heads + head) * n_chunks + chunk) * head_dim + p[:, None]) * states + n[None, :]
    d_state = tl.load(out, mask=pn_ok, other=0.0)
    a = tl.load(a_ptr + head * sa_h).to(tl.float32)
    causal = q[:, None] >= q[None, :]
    cum = tl.cumsum(dt * a, 0)
    total = tl.sum(dt * a, 0)
    decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
    cb = tl.dot(cq, tl.trans(bq), input_precision=PRECISION)  # [Q, Q]
    w = cb * decay * dt[None, :]
    # within the chunk: y_i += sum_j w_ij x_j
    dw = tl.dot(dy, tl.trans(x), input_precision=PRECISION)  # [Q, Q]: dy_i . x_j
    dx = tl.dot(tl.trans(w), dy, input_precision=PRECISION)  # [Q, P]
    g = dw * w
    d_cum = tl.sum(g, 1) - tl.sum(g, 0)
    d_dt = tl.sum(dw * cb * decay, 0)
    d_cb = dw * decay * dt[None, :]
    dc = tl.dot(d_cb, bq, input_precision=PRECISION)  # [Q, N]
    db = tl.dot(tl.trans(d_cb), cq, input_precision=PRECISION)
    # from the incoming state: y_i += exp(cum_i) S C_i
    e_cum = tl.exp(cum)
    z = tl.dot(cq, tl.trans(state), input_precision=PRECISION)  # [Q, P]
    dc += tl.dot(e_cum[:, None] * dy, state, input_precision=PRECISION)
    d_cum += e_cum * tl.sum(dy * z, 1)
    # into the outgoing state: S' = exp(total) S + sum_j u_j outer(x_j, B_j), u_j = exp(total - cum_j) dt_j
    u = tl.exp(total - cum) * dt
    xds = tl.dot(x, d_state, input_precision=PRECISION)  # [Q, N]: x_j^T dS'
    r = tl.sum(xds * bq, 1)
    dx += u[:, None] * tl.dot(bq, tl.trans(d_state), input_precision=PRECISION)
    db += u[:, None] * xds
    d_dt += tl.exp(total - cum) * r
    d_total = tl.sum(tl.sum(d_state * state, 1), 0) * tl.exp(total) + tl.sum(u * r, 0)
    d_cum += tl.where(q == BLOCK_Q - 1, d_total, 0.0) - u * r  # total = cum of the last step (padding adds 0)
    d_log_decay = tl.cumsum(d_cum, 0, reverse=True)  # cum_i sums the log decays of steps <= i
    d_dt += d_log_decay * a
    out_t = (batch * length + t) * heads + head  # [Q]: (batch, t, head) in [b, L, H]
    part = out_t * blocks + block  # [Q]: (batch, t, head, block) in [b, L, H, blocks]
    tl.store(dx_ptr + out_t[:, None] * head_dim + p[None, :], dx, mask=tp_ok)
    tl.store(ddt_ptr + part, d_dt, mask=t_ok)
    tl.store(db_ptr + part[:, None] * states + n[None, :], db, mask=tn_ok)
    tl.store(dc_ptr + part[:, None] * states + n[None, :], dc, mask=tn_ok)
    tl.store(da_ptr + ((batch * heads + head) * n_chunks + chunk) * blocks + block, tl.sum(d_log_decay * dt, 0))


def _check_shapes(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  initial_state: torch.Tensor | None) -> None:  # fmt: skip
    """``bmojo.ops.ssd.check_ssd_inputs``, then one device and sizes the kernels' offsets hold."""
    check_ssd_inputs(x, dt, A, B, C, initial_state)
    check_inputs(x, dt, A, B, C, initial_state)


# Without gradients the forward walks the sequence in pieces whose chunks' states take at most this many bytes by
# default (the backward needs every chunk's, in one piece)
STATES_BYTES = 64 << 20


def _forward(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             initial_state: torch.Tensor | None, chunk_size: int, block_p: int, states_bytes: int,
             store_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(y [b, L, H, P] in x's dtype, final [b, H, P, N], chunk_states [b, H, chunks, P, N])``, the last each chunk's
    incoming state if ``store_states``, else those of the last piece of at most ``states_bytes`` (one piece for a
    length symbolic under ``torch.compile``, which pieces would specialize)."""
    bsz, length, heads, p = x.shape
    g, n = B.shape[2:]
    n_chunks = triton.cdiv(length, chunk_size)
    if store_states or not isinstance(n_chunks, int):
        pieces = [(0, n_chunks)]
    else:
        piece = max(1, states_bytes // max(1, bsz * heads * p * n * 4))  # (an empty batch: one piece)
        pieces = [(first, min(piece, n_chunks - first)) for first in range(0, n_chunks, piece)]
    block_p = _block_p(block_p, p)
    blocks = triton.cdiv(p, block_p)
    y = torch.empty(bsz, length, heads, p, dtype=x.dtype, device=x.device)
    final = torch.empty(bsz, heads, p, n, dtype=torch.float32, device=x.device)
    held = pieces[0][1]  # chunk states held at once
    chunk_states = torch.empty(bsz, heads, held, p, n, dtype=torch.float32, device=x.device)
    sizes = dict(BLOCK_Q=chunk_size, BLOCK_P=block_p, BLOCK_N=dot_tile(n), num_warps=kernel_tiles(n)[1])
    dims = (length, heads, p, n)
    for first, count in pieces:
        has_h0 = first > 0 or initial_state is not None  # the given state, then the piece before's final one
        h0 = final if first > 0 or initial_state is None else initial_state  # (never read without has_h0)
        wrap_triton(_ssd_fwd_own_kernel)[(bsz * heads * count * blocks,)](
            x, dt, A, B, chunk_states, *dims, heads // g, first, count, held, blocks,
            *x.stride(), *dt.stride(), *A.stride(), *B.stride(), PRECISION=dot_precision(x), **sizes,
        )  # fmt: skip
        wrap_triton(_ssd_fwd_states_kernel)[(bsz * heads, blocks)](
            dt, A, h0, final, chunk_states, *dims, first, count, held, *dt.stride(), *A.stride(), *h0.stride(),
            HAS_H0=has_h0, **sizes,
        )  # fmt: skip
        wrap_triton(_ssd_fwd_output_kernel)[(bsz * heads * count * blocks,)](
            x, dt, A, B, C, chunk_states, y, *dims, heads // g, first, count, held, blocks,
            *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *y.stride(),
            PRECISION=dot_precision(x), **sizes,
        )  # fmt: skip
    return y, final, chunk_states


def kernel_tiles(n: int) -> tuple[int, int, int]:
    """``(steps per chunk, warps, head dimensions per backward program)`` of the kernels for state size ``n``.

    Steps and warps keep the tiles in registers, compiled for sm_90a (benchmarks/kernel_registers.py): 32 steps for
    a state of 16 or less (64 spill 32 bytes a thread in the backward's chunk kernel), 16 above (at 32 steps a state
    of 64 spills 88 bytes there, 128 352); 8 warps from a state of 128 (the forward's walk over the states spills 52
    bytes at 4). Head dimensions per backward program: 64 for a state of 16 or less, where the chunk kernel spills
    236 bytes a thread but recomputes each chunk's ``[Q, Q]`` products for 4x fewer programs (forward + backward
    1.90 -> 1.22 ms of device time on an H200 at the 130m shapes, against 1.42 at 32; benchmarks/RESULTS.md), 16
    above (no spills; untimed). Independent of the model's ``ssm_chunk_size``, tuned for the PyTorch path
    (converted Mamba-2 checkpoints say 256: a ``[256, 256]`` tile per program)."""
    n = dot_tile(n)
    return (32 if n <= 16 else 16), (8 if n >= 128 else 4), (64 if n <= 16 else 16)


def _block_p(block_p: int, p: int) -> int:
    """Head dimensions per program: ``block_p``, or fewer for a small head (16 at least: ``tl.dot``'s minimum)."""
    return min(block_p, dot_tile(p))


@kernel_op("bmojo::ssd_fwd")
def _ssd_fwd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             initial_state: torch.Tensor | None, chunk_size: int, block_p: int, states_bytes: int,
             store_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(y in x's dtype, final state, each chunk's incoming state)`` (the last empty unless ``store_states``, which
    the backward needs)."""
    y, final, chunk_states = _forward(x, dt, A, B, C, initial_state, chunk_size, block_p, states_bytes, store_states)
    return y, final, chunk_states if store_states else x.new_empty(0)


@kernel_op("bmojo::ssd_bwd")
def _ssd_bwd(dy: torch.Tensor, d_final: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
             B: torch.Tensor, C: torch.Tensor, chunk_states: torch.Tensor,
             chunk_size: int) -> list[torch.Tensor]:  # fmt: skip
    """Gradients of :func:`_ssd_fwd` with respect to ``x, dt, A, B, C`` and the initial state (float32)."""
    bsz, length, heads, p = x.shape
    g, n = B.shape[2:]
    n_chunks = chunk_states.shape[2]
    block_p = _block_p(kernel_tiles(n)[2], p)
    blocks = triton.cdiv(p, block_p)
    d_out = torch.empty(bsz, heads, n_chunks, p, n, dtype=torch.float32, device=x.device)
    dh0 = torch.empty(bsz, heads, p, n, dtype=torch.float32, device=x.device)
    dx = torch.empty(bsz, length, heads, p, dtype=x.dtype, device=x.device)
    ddt = torch.empty(bsz, length, heads, blocks, dtype=torch.float32, device=x.device)
    da = torch.empty(bsz, heads, n_chunks, blocks, dtype=torch.float32, device=x.device)
    db, dc = (torch.empty(bsz, length, heads, blocks, n, dtype=torch.float32, device=x.device) for _ in range(2))
    sizes = dict(BLOCK_Q=chunk_size, BLOCK_P=block_p, BLOCK_N=dot_tile(n), PRECISION=dot_precision(x),
                 num_warps=kernel_tiles(n)[1])  # fmt: skip
    wrap_triton(_ssd_bwd_states_kernel)[(bsz * heads, blocks)](
        dt, A, C, dy, d_final, d_out, dh0, length, heads, p, n, heads // g, n_chunks,
        *dt.stride(), *A.stride(), *C.stride(), *dy.stride(), *d_final.stride(), **sizes,
    )  # fmt: skip
    wrap_triton(_ssd_bwd_chunk_kernel)[(bsz * heads * n_chunks * blocks,)](
        x, dt, A, B, C, chunk_states, dy, d_out, dx, ddt, da, db, dc, length, heads, p, n, heads // g, n_chunks, blocks,
        *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *chunk_states.stride(), *dy.stride(),
        **sizes,
    )  # fmt: skip
    per_group = (bsz, length, g, heads // g * blocks, n)  # B and C serve every head of their group
    dB, dC = (d.view(per_group).sum(3).to(B.dtype) for d in (db, dc))
    return [dx, ddt.sum(3).to(dt.dtype), da.sum((0, 2, 3)).to(A.dtype), dB, dC, dh0]


register_scan_autograd(_ssd_fwd, _ssd_bwd, options=1)  # the backward takes chunk_size (its own head blocks)


def ssd_scan_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
    block_p: int = 32,
    states_bytes: int = STATES_BYTES,
) -> ScanOut:
    """``(y [batch, L, H, P] in x's dtype, final_state [batch, H, P, N] float32)``, equal to ``ssd_scan_ref``;
    differentiable (the backward kernel) where an input needs gradients.

    Shapes as in ``bmojo.ops.ssd``; ``chunk_size`` steps per chunk (default: :func:`kernel_tiles` of the state size)
    and ``block_p`` head dimensions per forward program (the backward's: :func:`kernel_tiles`) are powers of two
    (16 or more: the sizes ``tl.dot`` takes; the state size is padded to one too). Without gradients the chunks'
    incoming states (float32, ``[batch, H, P, N]`` a chunk) are held ``states_bytes`` at most at a time: a longer
    sequence is walked in pieces.
    """
    _check_shapes(x, dt, A, B, C, initial_state)
    chunk_size = kernel_tiles(B.shape[-1])[0] if chunk_size is None else chunk_size
    for name, value in (("chunk_size", chunk_size), ("block_p", block_p)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    if x.shape[1] == 0:  # no step: the state passes through
        b, _, h, p = x.shape
        final = x.new_zeros(b, h, p, B.shape[-1], dtype=torch.float32) if initial_state is None else initial_state
        return x.new_empty(x.shape), final.float().clone()
    store_states = needs_grad(x, dt, A, B, C, initial_state)
    y, final, _ = _ssd_fwd(x, dt, A, B, C, initial_state, chunk_size, block_p, states_bytes, store_states)
    return y, final


@triton.jit
def _conv_silu(xbc, conv_state, weight, bias, ch, ch_ok, stride_xc, stride_sc, stride_sk, stride_wc, stride_wk,
               K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """For channels ``ch`` of one sequence: ``silu(conv)`` over its last ``K - 1`` inputs (``conv_state``) and the new
    one (``xbc``), float32, and the channels' next conv state (the window without its oldest input), to store once
    every program has read the old one."""
    k = tl.arange(0, BLOCK_K)[None, :]
    rows = ch[:, None]
    new = tl.load(xbc + ch * stride_xc, mask=ch_ok, other=0.0)
    old = tl.load(conv_state + rows * stride_sc + k * stride_sk, mask=ch_ok[:, None] & (k < K - 1), other=0.0)
    window = tl.where(k == K - 1, new[:, None].to(tl.float32), old.to(tl.float32))
    w = tl.load(weight + rows * stride_wc + k * stride_wk, mask=ch_ok[:, None] & (k < K), other=0.0)
    out = tl.sum(window * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        out += tl.load(bias + ch, mask=ch_ok, other=0.0).to(tl.float32)
    shifted = tl.load(conv_state + rows * stride_sc + (k + 1) * stride_sk, mask=ch_ok[:, None] & (k < K - 2), other=0.0)
    shifted = tl.where(k == K - 2, new[:, None].to(shifted.dtype), shifted)
    return out * tl.sigmoid(out), shifted


@triton.jit
def _store_conv_state(conv_state, shifted, ch, ch_ok, stride_sc, stride_sk, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Store ``shifted`` (:func:`_conv_silu`) as the conv state of channels ``ch``."""
    k = tl.arange(0, BLOCK_K)[None, :]
    tl.store(conv_state + ch[:, None] * stride_sc + k * stride_sk, shifted, mask=ch_ok[:, None] & (k < K - 1))


@triton.jit
def _mamba2_step_kernel(
    xbc, dt, z, conv_state, ssm_state, weight, bias, dt_bias, A_log, D, norm_weight, gated, out,
    heads_per_group, n_groups, head_dim, state_size, eps,
    stride_xb, stride_xc, stride_db, stride_dh, stride_zb, stride_zc, stride_sb, stride_sc, stride_sk,
    stride_hb, stride_hh, stride_hp, stride_hn, stride_wc, stride_wk, stride_ob, stride_oc,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """A program per (sequence, B/C group): the group's ``B`` and ``C`` through the conv, then each of its heads' conv,
    state update, skip and gate (into ``gated``, float32), then the group's RMS norm. It alone reads and writes those
    channels' conv state (so no other program can see a half-updated one), storing each after a barrier behind its
    reads."""
    b, g = tl.program_id(0).to(tl.int64), tl.program_id(1)
    xbc += b * stride_xb
    dt += b * stride_db
    z += b * stride_zb
    conv_state += b * stride_sb
    ssm_state += b * stride_hb
    out += b * stride_ob
    gated += b * stride_ob
    p, n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    p_ok, n_ok = p < head_dim, n < state_size
    conv = (xbc, conv_state, weight, bias)
    strides = (stride_xc, stride_sc, stride_sk, stride_wc, stride_wk)
    b_ch = heads_per_group * n_groups * head_dim + g * state_size + n
    c_ch = b_ch + n_groups * state_size
    bv, b_next = _conv_silu(*conv, b_ch, n_ok, *strides, K, BLOCK_K, HAS_BIAS)
    cv, c_next = _conv_silu(*conv, c_ch, n_ok, *strides, K, BLOCK_K, HAS_BIAS)
    squares = 0.0
    for i in range(heads_per_group):
        h = g * heads_per_group + i
        x_ch = h * head_dim + p
        xv, x_next = _conv_silu(*conv, x_ch, p_ok, *strides, K, BLOCK_K, HAS_BIAS)
        d = tl.load(dt + h * stride_dh).to(tl.float32) + tl.load(dt_bias + h).to(tl.float32)
        d = tl.where(d > 20.0, d, tl.log(1.0 + tl.exp(tl.minimum(d, 20.0))))  # softplus, as torch's (threshold 20)
        decay = tl.exp(-d * tl.exp(tl.load(A_log + h).to(tl.float32)))
        at = ssm_state + h * stride_hh + p[:, None] * stride_hp + n[None, :] * stride_hn
        ok = p_ok[:, None] & n_ok[None, :]
        s = decay * tl.load(at, mask=ok, other=0.0) + (d * xv)[:, None] * bv[None, :]
        tl.store(at, s, mask=ok)
        y = tl.sum(s * cv[None, :], axis=1) + tl.load(D + h).to(tl.float32) * xv
        gate = tl.load(z + x_ch * stride_zc, mask=p_ok, other=0.0).to(tl.float32)
        y *= gate * tl.sigmoid(gate)
        squares += tl.sum(y * y)
        tl.store(gated + x_ch * stride_oc, y, mask=p_ok)
        tl.debug_barrier()
        _store_conv_state(conv_state, x_next, x_ch, p_ok, stride_sc, stride_sk, K, BLOCK_K)
    tl.debug_barrier()
    _store_conv_state(conv_state, b_next, b_ch, n_ok, stride_sc, stride_sk, K, BLOCK_K)
    _store_conv_state(conv_state, c_next, c_ch, n_ok, stride_sc, stride_sk, K, BLOCK_K)
    eps = tl.cast(eps, tl.float32)  # (torch.compile passes it as a float64)
    scale = 1.0 / tl.sqrt(squares / (heads_per_group * head_dim) + eps)
    for i in range(heads_per_group):
        x_ch = (g * heads_per_group + i) * head_dim + p
        y = tl.load(gated + x_ch * stride_oc, mask=p_ok, other=0.0)
        y *= scale * tl.load(norm_weight + x_ch, mask=p_ok, other=0.0).to(tl.float32)
        tl.store(out + x_ch * stride_oc, y.to(out.dtype.element_ty), mask=p_ok)


@kernel_op("bmojo::mamba2_step", mutates_args=("conv_state", "ssm_state"))
def mamba2_step_triton(xbc: torch.Tensor, dt: torch.Tensor, z: torch.Tensor, conv_state: torch.Tensor,
                       ssm_state: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                       dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor, norm_weight: torch.Tensor,
                       eps: float) -> torch.Tensor:  # fmt: skip
    """``bmojo.ops.ssd.mamba2_step`` (same contract, shapes checked there) in one kernel: conv, ``dt`` softplus, state
    update, skip and gated norm, float32 arithmetic; ``ssm_state`` must be float32."""
    check_inputs(xbc, dt, z, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight)
    if ssm_state.dtype != torch.float32:
        raise ValueError(f"ssm_state must be float32, got {ssm_state.dtype}")
    bsz, heads, p, n = ssm_state.shape
    k = conv_weight.shape[-1]
    groups = (xbc.shape[1] - heads * p) // (2 * n)
    out = xbc.new_empty(bsz, heads * p)
    gated = torch.empty(out.shape, dtype=torch.float32, device=out.device)  # (y before the norm)
    weight = conv_weight[:, 0]
    wrap_triton(_mamba2_step_kernel)[(bsz, groups)](
        xbc, dt, z, conv_state, ssm_state, weight, conv_bias, dt_bias, A_log, D, norm_weight, gated, out,
        heads // groups, groups, p, n, eps, *xbc.stride(), *dt.stride(), *z.stride(), *conv_state.stride(),
        *ssm_state.stride(), *weight.stride(), *out.stride(),
        K=k, BLOCK_K=triton.next_power_of_2(k), BLOCK_P=triton.next_power_of_2(p), BLOCK_N=triton.next_power_of_2(n),
        HAS_BIAS=conv_bias is not None,
    )  # fmt: skip
    return out
