"""Mamba-1 selective scan: a diagonal linear recurrence with a per-channel, per-state decay.

For every batch ``b``, channel ``e`` and state ``n``::

    h_t[e, n] = exp(delta_t[e] * A[e, n]) * h_{t-1}[e, n] + delta_t[e] * B_t[n] * u_t[e]
    y_t[e]    = sum_n C_t[n] * h_t[e, n]

(no ``D`` skip and no gate: the layer adds those). Shapes: ``u, delta [batch, L, E]``, ``A [E, N]``,
``B, C [batch, L, N]``, states ``[batch, E, N]``. Everything is computed in float32; ``y`` comes back
in the dtype of ``u`` and states in float32.

:func:`selective_scan_ref` is the sequential definition, :func:`selective_scan_step` one decoding
step, and :func:`selective_scan` the chunked scan used for training and prefill. On x86 CPUs, channels
that decay by more than ``e^-87`` within a chunk make subnormal floats in the backward pass, which
slow it down (up to about 1.7x); ``torch.set_flush_denormal(True)`` avoids that.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ScanOut = tuple[torch.Tensor, torch.Tensor]


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
    d = delta.float()
    h = torch.exp(d[..., None] * A.float()) * state.float() + (d * u.float())[..., None] * B.float()[:, None, :]
    return torch.einsum("ben,bn->be", h, C.float()).to(u.dtype), h


def _default_chunk_size(length: int) -> int:
    """``sqrt(length)`` rounded up to a power of two, clamped to ``[8, 128]``."""
    return min(128, max(8, 1 << math.ceil(math.log2(max(length, 1)) / 2)))


def _time_major_chunks(x: torch.Tensor, t: int) -> torch.Tensor:
    """``[batch, L, K]`` with ``L % t == 0`` -> ``[t, batch * L // t, K]``: step ``i`` of every chunk."""
    b, length, k = x.shape
    return x.reshape(b, length // t, t, k).permute(2, 0, 1, 3).reshape(t, -1, k)


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
    3. scan every chunk again from its incoming carry and read out ``y``. This equals
       ``h = h_local + cumdecay * carry`` but never materialises ``cumdecay`` or ``h_local`` for all
       ``L`` steps, which is faster on CPU than building them.

    Python loops run ``2T + L / T`` small steps over ``[batch * L / T, E, N]`` tensors; gradients
    come from ordinary autograd. Returns ``(y [batch, L, E], final_state [batch, E, N])``.
    """
    bsz, length, e = u.shape
    a = A.float()
    n = a.shape[1]
    t = chunk_size or _default_chunk_size(length)
    pad = -length % t
    chunks = (length + pad) // t
    d = delta.float()
    d, du, b_in, c_in = (
        _time_major_chunks(F.pad(x, (0, 0, 0, pad)), t) for x in (d, d * u.float(), B.float(), C.float())
    )
    # per step i: decay [bsz*chunks, E, N], and the input as a rank-1 product du [.., E, 1] @ B [.., 1, N]
    decays = [torch.exp_(d_i[..., None] * a) for d_i in d.unbind(0)]
    du_cols, b_rows, c_cols = du[..., None].unbind(0), b_in[:, :, None, :].unbind(0), c_in[..., None].unbind(0)

    h = d.new_zeros(bsz * chunks, e, n)
    for decay, du_i, b_i in zip(decays, du_cols, b_rows):
        h = (decay * h).baddbmm_(du_i, b_i)

    chunk_decay = torch.exp(d.sum(0)[..., None] * a).view(bsz, chunks, e, n)
    carry = d.new_zeros(bsz, e, n) if initial_state is None else initial_state.float()
    carries = []
    for local, decay in zip(h.view(bsz, chunks, e, n).unbind(1), chunk_decay.unbind(1)):
        carries.append(carry)
        carry = decay * carry + local

    h = torch.stack(carries, dim=1).view(bsz * chunks, e, n)
    ys = []
    for decay, du_i, b_i, c_i in zip(decays, du_cols, b_rows, c_cols):
        h = (decay * h).baddbmm_(du_i, b_i)
        ys.append(h @ c_i)
    y = torch.stack(ys).view(t, bsz, chunks, e).permute(1, 2, 0, 3).reshape(bsz, chunks * t, e)
    return y[:, :length].to(u.dtype), carry
