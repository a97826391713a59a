"""Mamba-1 selective scan: a diagonal linear recurrence with a per-channel, per-state decay.

For every batch ``b``, channel ``e`` and state ``n``::

    h_t[e, n] = exp(delta_t[e] * A[e, n]) * h_{t-1}[e, n] + delta_t[e] * B_t[n] * u_t[e]
    y_t[e]    = sum_n C_t[n] * h_t[e, n]

(no ``D`` skip and no gate: the layer adds those). Shapes: ``u, delta [batch, L, E]``, ``A [E, N]``,
``B, C [batch, L, N]``, states ``[batch, E, N]``. Everything is computed in float32; ``y`` comes back
in the dtype of ``u`` and states in float32. (:func:`selective_scan` computes in float64 when ``u``
is float64, for ``torch.autograd.gradcheck``; its states are then float64.)

:func:`selective_scan_ref` is the sequential definition, :func:`selective_scan_step` one decoding
step, and :func:`selective_scan` the chunked scan used for training and prefill. On x86 CPUs, channels
that decay by more than ``e^-87`` within a chunk make subnormal floats in the backward pass, which
slow it down (up to about 1.7x); ``torch.set_flush_denormal(True)`` avoids that.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from bmojo.ops import check_positive, check_shapes
from bmojo.ops.triton import use_triton

ScanOut = tuple[torch.Tensor, torch.Tensor]


def check_scan_inputs(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      initial_state: torch.Tensor | None, step: bool = False) -> None:  # fmt: skip
    """Raise ``ValueError`` naming the first input whose shape does not fit ``u [batch, L, E]`` (floating point),
    ``A [E, N]``: ``delta [batch, L, E]``, ``B, C [batch, L, N]``, ``initial_state [batch, E, N]``; ``step``: one time
    step, every sequence input without its ``L``."""
    if u.dim() != 3 - step or not u.is_floating_point():
        layout = "[batch, channels]" if step else "[batch, length, channels]"
        raise ValueError(f"u must be floating point {layout}, got {u.dtype} {tuple(u.shape)}")
    bsz, *length, e = u.shape
    if A.dim() != 2 or A.shape[0] != e:
        raise ValueError(f"A must be [{e}, state], got shape {tuple(A.shape)}")
    n = A.shape[1]
    check_shapes([("delta", delta, (bsz, *length, e)), ("B", B, (bsz, *length, n)), ("C", C, (bsz, *length, n)),
                  ("initial_state", initial_state, (bsz, e, n))])  # fmt: skip


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> ScanOut:
    """Sequential scan, one time step at a time: ``(y [batch, L, E], final_state [batch, E, N])``."""
    a = A.float()
    h = u.new_zeros(u.shape[0], *a.shape, dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    steps = zip(u.float().unbind(1), delta.float().unbind(1), B.float().unbind(1), C.float().unbind(1))
    for u_t, d_t, b_t, c_t in steps:
        h = torch.exp(d_t[..., None] * a) * h + (d_t * u_t)[..., None] * b_t[:, None, :]
        ys.append(torch.einsum("ben,bn->be", h, c_t))
    if not ys:  # no step: the state passes through
        return u.new_empty(u.shape), h.clone()
    return torch.stack(ys, dim=1).to(u.dtype), h


def selective_scan_step(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> ScanOut:
    """One recurrent step from ``state [batch, E, N]`` with ``u, delta [batch, E]``, ``B, C [batch, N]``.

    Returns ``(y [batch, E], new_state [batch, E, N])``.
    """
    check_scan_inputs(u, delta, A, B, C, state, step=True)
    d = delta.float()
    h = torch.addcmul(
        torch.exp(d[..., None] * A.float()) * state.float(), (d * u.float())[..., None], B.float()[:, None]
    )
    return (h * C.float()[:, None]).sum(-1).to(u.dtype), h  # (as ops.ssd.ssd_step: faster than a product on a CPU)


def _default_chunk_size(length: int) -> int:
    """``sqrt(length)`` rounded up to a power of two, clamped to ``[8, 128]``."""
    return min(128, max(8, 1 << math.ceil(math.log2(max(length, 1)) / 2)))


def _chunks(length: int, t: int) -> int:
    """How many chunks of ``t`` steps cover ``length`` steps."""
    return -(-length // t)


_CHECKPOINT_EVERY = 8  # steps between the states that the forward pass saves for the backward pass


def _time_major_chunks(x: torch.Tensor, t: int) -> torch.Tensor:
    """``[batch, L, K] -> [t, batch * chunks, K]``, zero-padded to ``chunks * t`` steps (identity steps); sizes
    spelled out, as an empty batch leaves no ``-1`` to infer."""
    b, length, k = x.shape
    chunks = _chunks(length, t)
    x = F.pad(x, (0, 0, 0, chunks * t - length))
    return x.reshape(b, chunks, t, k).permute(2, 0, 1, 3).reshape(t, b * chunks, k).contiguous()


def _batch_major(x: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Inverse of :func:`_time_major_chunks`: ``[t, batch * chunks, K] -> [batch, length, K]``."""
    t, _, k = x.shape
    chunks = _chunks(length, t)
    return x.reshape(t, batch, chunks, k).permute(1, 2, 0, 3).reshape(batch, chunks * t, k)[:, :length]


def _decay(d: torch.Tensor, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``exp(d[..., None, :] * a)`` written into ``out [..., N, E]``: ``d [..., E]``, ``a [N, E]``."""
    return torch.mul(d[..., None, :], a, out=out).exp_()


def _carry(local: torch.Tensor, chunk_decay: torch.Tensor, first: torch.Tensor, reverse: bool = False) -> ScanOut:
    """Carry ``c' = chunk_decay * c + local`` from chunk to chunk (backwards in time if ``reverse``).

    ``local, chunk_decay [batch, chunks, N, E]``, ``first [batch, N, E]``. Returns the carry entering
    every chunk, flattened to ``[batch * chunks, N, E]``, and the one leaving the last chunk.
    """
    entering = torch.empty_like(local)
    carry = first
    chunks = local.shape[1]
    for j in reversed(range(chunks)) if reverse else range(chunks):
        entering[:, j] = carry
        carry = torch.addcmul(local[:, j], chunk_decay[:, j], carry)
    return entering.flatten(0, 1), carry


class _SelectiveScanFn(torch.autograd.Function):
    """Chunked scan with a hand-written backward pass; see :func:`selective_scan`.

    Layout: ``t`` steps of ``M = batch * chunks`` chunks that advance together, per-step inputs
    ``[t, M, E]`` or ``[t, M, N]``, states ``[M, N, E]`` (channels last, so the readout and most
    reductions are row-vector times matrix products). Each step touches only ``[M, N, E]`` buffers:
    decays are recomputed rather than stored for all steps, so the work stays in cache.
    """

    @staticmethod
    def forward(
        ctx: Any,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        initial_state: torch.Tensor | None,
        t: int,
    ) -> ScanOut:
        bsz, length, e = u.shape
        dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
        a = A.to(dtype).t()
        n = a.shape[0]
        d, uu, b, c = (_time_major_chunks(x.to(dtype), t) for x in (delta, u, B, C))
        m = d.shape[1]
        du_rows, b_cols, c_rows = (d * uu)[:, :, None, :], b[..., None], c[:, :, None, :]
        decay = d.new_empty(m, n, e)

        h = d.new_zeros(m, n, e)
        for i in range(t):
            h.mul_(_decay(d[i], a, decay)).baddbmm_(b_cols[i], du_rows[i])

        chunks = _chunks(length, t)
        chunk_decay = torch.exp_(d.sum(0)[:, None, :] * a).view(bsz, chunks, n, e)
        first = d.new_zeros(bsz, n, e) if initial_state is None else initial_state.to(dtype).transpose(1, 2)
        h, final = _carry(h.view(bsz, chunks, n, e), chunk_decay, first)

        every = _CHECKPOINT_EVERY
        checkpoints = d.new_empty(-(-t // every), m, n, e)
        y = d.new_empty(t, m, 1, e)
        for i in range(t):
            if i % every == 0:
                checkpoints[i // every] = h
            h.mul_(_decay(d[i], a, decay)).baddbmm_(b_cols[i], du_rows[i])
            torch.bmm(c_rows[i], h, out=y[i])

        ctx.save_for_backward(a, d, uu, b, c, checkpoints)
        ctx.length = length
        ctx.dtypes = [x.dtype for x in (u, delta, A, B, C, first if initial_state is None else initial_state)]
        return _batch_major(y.squeeze(2), bsz, length).to(u.dtype), final.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, dfinal: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """``dh_t = C_t dy_t + decay_{t+1} dh_{t+1}``, scanned like the forward pass, backwards in time.

        Within each block of ``_CHECKPOINT_EVERY`` steps the states are recomputed forwards from the
        saved checkpoint, then the block is walked backwards. ``w_t = dh_t * decay_t * h_{t-1}`` is
        the gradient of the log-decay ``delta_t * A``.
        """
        a, d, uu, b, c, checkpoints = ctx.saved_tensors
        t, m, e = d.shape
        n = a.shape[0]
        bsz, length = dy.shape[0], ctx.length
        need_u, need_delta, need_a, need_b, need_c, need_h0 = ctx.needs_input_grad[:6]
        dy = _time_major_chunks(dy.to(d.dtype), t)
        du = d * uu
        du_rows, b_rows, b_cols = du[:, :, None, :], b[:, :, None, :], b[..., None]
        dy_rows, c_cols = dy[:, :, None, :], c[..., None]

        g = d.new_zeros(m, n, e)
        decay = d.new_empty(m, n, e)
        for i in reversed(range(t)):
            g.baddbmm_(c_cols[i], dy_rows[i]).mul_(_decay(d[i], a, decay))
        chunks = _chunks(length, t)
        chunk_decay = torch.exp_(d.sum(0)[:, None, :] * a).view(bsz, chunks, n, e)
        g, dh0 = _carry(g.view(bsz, chunks, n, e), chunk_decay, dfinal.to(d.dtype).transpose(1, 2), reverse=True)

        every = _CHECKPOINT_EVERY
        decays, hs = d.new_empty(every, m, n, e), d.new_empty(every + 1, m, n, e)
        ddu, dd_log = d.new_empty(t, m, 1, e), d.new_empty(t, m, e)
        db, dc = d.new_empty(t, m, 1, n), d.new_empty(t, m, 1, n)
        da = d.new_zeros(m, n, e)
        for k in reversed(range(checkpoints.shape[0])):
            i0, i1 = k * every, min(k * every + every, t)
            _decay(d[i0:i1], a, decays[: i1 - i0])
            hs[0] = checkpoints[k]
            for j, i in enumerate(range(i0, i1)):
                torch.mul(decays[j], hs[j], out=hs[j + 1]).baddbmm_(b_cols[i], du_rows[i])
                if need_c:
                    torch.bmm(dy_rows[i], hs[j + 1].transpose(1, 2), out=dc[i])
            for j in reversed(range(i1 - i0)):
                i = i0 + j
                g.baddbmm_(c_cols[i], dy_rows[i])
                if need_u or need_delta:
                    torch.bmm(b_rows[i], g, out=ddu[i])
                if need_b:
                    torch.bmm(du_rows[i], g.transpose(1, 2), out=db[i])
                g = decays[j].mul_(g)
                if need_delta or need_a:
                    w = hs[j].mul_(g)
                    if need_a:
                        da.addcmul_(w, d[i, :, None, :])
                    if need_delta:
                        torch.sum(w.mul_(a), 1, out=dd_log[i])
            g = g.clone()  # it lives in `decays`, which the next block overwrites

        grads: list[torch.Tensor | None] = [None] * 6
        ddu = ddu.squeeze(2)
        if need_u:
            grads[0] = _batch_major(ddu * d, bsz, length)
        if need_delta:
            grads[1] = _batch_major(dd_log.addcmul_(ddu, uu), bsz, length)
        if need_a:
            grads[2] = da.sum(0).t()
        if need_b:
            grads[3] = _batch_major(db.squeeze(2), bsz, length)
        if need_c:
            grads[4] = _batch_major(dc.squeeze(2), bsz, length)
        if need_h0:
            grads[5] = dh0.transpose(1, 2)
        return *(None if x is None else x.to(dt) for x, dt in zip(grads, ctx.dtypes)), None


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> ScanOut:
    """Chunked parallel scan, equal to :func:`selective_scan_ref` up to float32 rounding.

    The sequence is cut into chunks of ``T`` steps (default :func:`_default_chunk_size`), padded with
    identity steps (``delta = 0``) so the final state is exact. All chunks advance together:

    1. scan every chunk from a zero state, giving its local final state;
    2. carry the state across chunks, ``carry_{c+1} = exp(A * sum(delta in c)) * carry_c + local_c``,
       starting from ``initial_state``;
    3. scan every chunk again from its incoming carry and read out ``y``.

    The backward pass is hand-written (:class:`_SelectiveScanFn`): the forward pass saves its
    inputs and every ``_CHECKPOINT_EVERY``-th state (``1/8`` of all states); the backward pass runs
    the same three steps backwards in time for ``dL/dh``, recomputing the states block by block from
    the checkpoints. Python loops run about ``4T + 2L / T`` small steps over ``[batch * L / T, N, E]``
    tensors. Computes in float64 when ``u`` is float64, else float32.
    CUDA inputs run the Triton kernels ``bmojo.ops.triton.selective_scan`` (forward and backward; see
    ``bmojo.ops.triton`` for the switch). Returns ``(y [batch, L, E], final_state [batch, E, N])``.
    """
    check_scan_inputs(u, delta, A, B, C, initial_state)
    if chunk_size is not None:
        check_positive("chunk_size", chunk_size)
    if use_triton(u, delta, A, B, C, initial_state, differentiable=True):
        from bmojo.ops.triton.selective_scan import selective_scan_triton

        return selective_scan_triton(u, delta, A, B, C, initial_state)
    t = _default_chunk_size(u.shape[1]) if chunk_size is None else chunk_size
    return _SelectiveScanFn.apply(u, delta, A, B, C, initial_state, t)
