"""Mamba-2 state-space duality (SSD): a linear recurrence with one scalar decay per head.

For every batch ``b`` and head ``h`` (head dim ``P``, state ``N``; head ``h`` reads group
``g = h // (H // G)`` of ``B`` and ``C``)::

    S_t = exp(dt_t[h] * A[h]) * S_{t-1} + dt_t[h] * outer(x_t[h], B_t[g])      # S_t: [P, N]
    y_t[h, p] = sum_n S_t[p, n] * C_t[g, n]

(no ``D`` skip, gate, or ``dt`` bias/softplus: ``dt`` arrives positive). Shapes: ``x [batch, L, H, P]``,
``dt [batch, L, H]``, ``A [H]``, ``B, C [batch, L, G, N]``, states ``[batch, H, P, N]``. Everything is
computed in float32; ``y`` comes back in the dtype of ``x`` and states in float32.

:func:`ssd_scan_ref` is the sequential definition, :func:`ssd_step` one decoding step, and :func:`ssd_scan` the
chunked algorithm used for training and prefill; :func:`mamba2_step` is a Mamba-2 layer's decoding step between its
projections (conv, ``dt`` softplus, :func:`ssd_step`, ``D`` skip, gated norm), in one Triton kernel on CUDA. On x86
CPUs, strong decay within a chunk makes subnormal floats, which slow it down (up to about 2x);
``torch.set_flush_denormal(True)`` avoids that. On CUDA, :func:`ssd_scan` runs our Triton kernels
(``bmojo.ops.triton.ssd``, forward and backward, float32 arithmetic; ``bmojo.ops.triton`` has the switch), or for
states larger than ours were timed at (:data:`OURS_MAX_STATE`), when flash-linear-attention (``fla``) is installed,
its Triton ``chunk_simple_gla`` (forward, and backward where fla supports it: :func:`fla_backward_supported`), which
computes in the inputs' dtype with float32 accumulation.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from bmojo.ops import check_positive, check_shapes
from bmojo.ops.conv import causal_conv1d_step
from bmojo.ops.triton import lookup_once, needs_grad, use_fused_cuda, use_triton

ScanOut = tuple[torch.Tensor, torch.Tensor]


def _heads_per_group(heads: int, groups: int) -> int:
    """``H // G``, checking that the heads split evenly into the groups of ``B`` and ``C``."""
    if heads % groups:
        raise ValueError(f"heads ({heads}) must be a multiple of B/C groups ({groups})")
    return heads // groups


def check_ssd_inputs(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     initial_state: torch.Tensor | None, step: bool = False) -> None:  # fmt: skip
    """Raise ``ValueError`` naming the first input whose shape does not fit ``x [batch, L, H, P]`` (floating point),
    ``B [batch, L, G, N]``: ``dt [batch, L, H]``, ``A [H]``, ``C`` as ``B``, ``initial_state [batch, H, P, N]``;
    ``step``: one time step, every sequence input without its ``L``."""
    if x.dim() != 4 - step or not x.is_floating_point():
        layout = "[batch, heads, head_dim]" if step else "[batch, length, heads, head_dim]"
        raise ValueError(f"x must be floating point {layout}, got {x.dtype} {tuple(x.shape)}")
    if B.dim() != 4 - step:
        raise ValueError(f"B must be [batch, {'' if step else 'length, '}groups, state], got shape {tuple(B.shape)}")
    bsz, *length, heads, p = x.shape
    g, n = B.shape[-2:]
    _heads_per_group(heads, g)
    check_shapes([("dt", dt, (bsz, *length, heads)), ("A", A, (heads,)), ("B", B, (bsz, *length, g, n)),
                  ("C", C, (bsz, *length, g, n)), ("initial_state", initial_state, (bsz, heads, p, n))])  # fmt: skip


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> ScanOut:
    """One recurrent step from ``state [batch, H, P, N]`` with ``x [batch, H, P]``, ``dt [batch, H]``,
    ``B, C [batch, G, N]``. Returns ``(y [batch, H, P], new_state [batch, H, P, N])``."""
    check_ssd_inputs(x, dt, A, B, C, state, step=True)
    bsz, heads, p = x.shape
    g, n = B.shape[1:]
    r = _heads_per_group(heads, g)
    d = dt.float().reshape(bsz, g, r, 1, 1)  # heads split as (group, head in group): B and C broadcast over the group
    s = torch.exp(d * A.float().view(g, r, 1, 1)) * state.float().reshape(bsz, g, r, p, n)
    s = torch.addcmul(s, d * x.float().reshape(bsz, g, r, p, 1), B.float()[:, :, None, None])
    y = (s * C.float()[:, :, None, None]).sum(-1)  # a multiply and sum: 2.2x faster than a product at state 128, CPU
    return y.view(bsz, heads, p).to(x.dtype), s.view(bsz, heads, p, n)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """Mamba-2's output norm: ``rmsnorm(x * silu(z)) * weight`` over each of ``groups`` equal groups of the last axis
    of ``x`` (``z`` alike, ``weight`` its size), in float32; returns ``x``'s dtype."""
    if not x.is_floating_point():
        raise TypeError(f"gated_rms_norm takes floating point x, got {x.dtype}")
    if x.dim() == 0 or weight.shape != x.shape[-1:]:
        raise ValueError(f"x [..., C] must end in the weight's size C, got x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")  # fmt: skip
    check_shapes([("z", z, tuple(x.shape))])
    if not isinstance(groups, int) or groups < 1 or x.shape[-1] % groups:
        raise ValueError(f"groups ({groups!r}) must be a positive integer dividing x's last axis ({x.shape[-1]})")
    y = (x.float() * F.silu(z.float())).unflatten(-1, (groups, -1))
    return (F.rms_norm(y, (y.shape[-1],), eps=eps).flatten(-2) * weight.float()).to(x.dtype)


def mamba2_step(
    xbc: torch.Tensor,
    dt: torch.Tensor,
    z: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """One Mamba-2 decoding step between the input and output projections, updating ``conv_state`` and ``ssm_state``
    in place.

    ``xbc [batch, C]`` (``C = H*P + 2*G*N``: ``x``, then ``B``, then ``C`` of every group) enters the depthwise causal
    conv (``conv_weight [C, 1, K]``, ``conv_bias [C]`` or None) after ``conv_state [batch, C, K-1]``, its last ``K-1``
    inputs (oldest first), then SiLU; :func:`ssd_step` from ``ssm_state [batch, H, P, N]`` (float32) with
    ``dt = softplus(dt + dt_bias)`` (``dt [batch, H]``) and ``A = -exp(A_log)``; ``y + D * x`` then goes through
    :func:`gated_rms_norm` with ``z [batch, H*P]``, ``norm_weight [H*P]`` and ``eps`` per group. Returns ``[batch,
    H*P]`` in ``xbc``'s dtype. CUDA inputs take one Triton kernel (``bmojo.ops.triton.ssd.mamba2_step_triton``),
    which computes in float32 throughout where this rounds the conv's output and ``y`` to ``xbc``'s dtype (as the
    layer's parallel pass does).
    """
    bsz, channels = xbc.shape if xbc.dim() == 2 else (None, None)
    if bsz is None or ssm_state.dim() != 4 or dt.dim() != 2:
        raise ValueError(f"expected xbc [batch, C], dt [batch, H] and ssm_state [batch, H, P, N], got "
                         f"{tuple(xbc.shape)}, {tuple(dt.shape)} and {tuple(ssm_state.shape)}")  # fmt: skip
    _, heads, p, n = ssm_state.shape
    groups, rest = divmod(channels - heads * p, 2 * n)
    if rest or groups < 1:
        raise ValueError(f"xbc's {channels} channels are not H*P + 2*G*N for the state's H={heads}, P={p}, N={n}")
    _heads_per_group(heads, groups)
    k = conv_weight.shape[-1]
    check_shapes([("dt", dt, (bsz, heads)), ("z", z, (bsz, heads * p)),
                  ("conv_state", conv_state, (bsz, channels, k - 1)),
                  ("conv_weight", conv_weight, (channels, 1, k)), ("conv_bias", conv_bias, (channels,)),
                  ("dt_bias", dt_bias, (heads,)), ("A_log", A_log, (heads,)), ("D", D, (heads,)),
                  ("norm_weight", norm_weight, (heads * p,))])  # fmt: skip
    inputs = (xbc, dt, z, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight)
    if use_triton(*inputs):
        from bmojo.ops.triton.ssd import mamba2_step_triton

        return mamba2_step_triton(*inputs, eps)
    window = torch.cat([conv_state.to(xbc.dtype), xbc.unsqueeze(-1)], dim=2)  # [batch, C, K]
    conv_out = causal_conv1d_step(window, conv_weight, conv_bias, silu=True)
    x, b, c = conv_out.split([heads * p, groups * n, groups * n], 1)
    x = x.view(bsz, heads, p)
    y, new_state = ssd_step(ssm_state, x, F.softplus(dt.float() + dt_bias.float()), -torch.exp(A_log.float()),
                            b.view(bsz, groups, n), c.view(bsz, groups, n))  # fmt: skip
    conv_state.copy_(window[:, :, 1:])
    ssm_state.copy_(new_state)
    y = (y.float() + x.float() * D.float()[:, None]).to(xbc.dtype)
    return gated_rms_norm(y.view(bsz, heads * p), z, norm_weight, groups, eps)


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> ScanOut:
    """Sequential scan, one time step at a time: ``(y [batch, L, H, P], final_state [batch, H, P, N])``."""
    bsz, _, heads, p = x.shape
    rep = _heads_per_group(heads, B.shape[2])
    a = A.float()
    s = x.new_zeros(bsz, heads, p, B.shape[3], dtype=torch.float32) if initial_state is None else initial_state.float()
    b, c = B.float().repeat_interleave(rep, dim=2), C.float().repeat_interleave(rep, dim=2)
    ys = []
    for x_t, d_t, b_t, c_t in zip(x.float().unbind(1), dt.float().unbind(1), b.unbind(1), c.unbind(1)):
        s = torch.exp(d_t * a)[..., None, None] * s + (d_t[..., None] * x_t)[..., None] * b_t[:, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", s, c_t))
    if not ys:  # no step: the state passes through
        return x.new_empty(x.shape), s.clone()
    return torch.stack(ys, dim=1).to(x.dtype), s


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """``[..., Q] -> [..., Q, Q]`` with ``out[..., i, j] = a[j+1] + ... + a[i]`` for ``i >= j``, ``-inf`` above.

    A difference of prefix sums taken in float64 (no float64 on MPS), so it stays accurate to the output's rounding
    when the prefix sums are large (strong decay); one fused elementwise pass, where a masked cumsum of the
    ``[Q, Q]`` matrix costs a strided scan forward and backward.
    """
    q = a.shape[-1]
    cum = a.to(torch.float32 if a.device.type == "mps" else torch.float64).cumsum(-1)
    causal = torch.ones(q, q, dtype=torch.bool, device=a.device).tril()
    return (cum[..., :, None] - cum[..., None, :]).to(a.dtype).masked_fill(~causal, float("-inf"))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: a batched product whose output is then permuted gets a
    strided gradient, for which PyTorch's CPU ``bmm`` falls back to one small product per batch entry (the SSD's
    backward ran 20% slower eager)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


_contiguous_grad = _ContiguousGrad.apply


# Our Triton SSD ran its forward in 0.52 ms where fla's chunk_simple_gla took 0.95 ms (an H100, bf16, the 130m
# preset's shapes: state 16; benchmarks/RESULTS.md): fla is taken only for larger states, which ours were not timed at.
OURS_MAX_STATE = 16


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 32,
    initial_state: torch.Tensor | None = None,
) -> ScanOut:
    """Chunked SSD, equal to :func:`ssd_scan_ref` up to float32 rounding.

    The sequence is cut into chunks of ``Q = chunk_size`` steps, padded with ``dt = 0`` steps so the
    final state is exact. Per chunk: the intra-chunk output is the masked quadratic form
    ``(C B^T * exp(segsum(dt A)) * dt) @ x``; each chunk's own final state is ``B``-weighted ``x`` decayed
    to the chunk end; the recurrence over the ``L / Q`` chunks, in closed form (the same segsum over the
    chunks' total decays), gives every chunk's incoming state (starting from ``initial_state``), whose
    decayed read-out through ``C`` is added to ``y``.
    The intra-chunk work grows with ``Q`` and the closed-form recurrence with ``(L / Q)^2``; on CPU, 32 was the
    fastest at 2K tokens (8 heads of 64, state 16: 10.4 ms forward and backward compiled, 11.6 ms with 64).
    Differentiable by autograd. Returns ``(y [batch, L, H, P], final_state [batch, H, P, N])``.
    CUDA inputs take our Triton kernels (with chunks of their own, ``bmojo.ops.triton.ssd.kernel_tiles``), or
    :func:`ssd_scan_fla` for states over :data:`OURS_MAX_STATE` when ``fla`` is installed (see the module
    docstring).
    """
    check_ssd_inputs(x, dt, A, B, C, initial_state)
    check_positive("chunk_size", chunk_size)
    inputs = (x, dt, A, B, C, initial_state)
    if B.shape[-1] > OURS_MAX_STATE and use_fused_cuda(*inputs) and fla_available():
        if not needs_grad(*inputs) or fla_backward_supported(x.device):
            return ssd_scan_fla(*inputs)
    if use_triton(*inputs, differentiable=True):
        from bmojo.ops.triton.ssd import ssd_scan_triton

        return ssd_scan_triton(*inputs)  # its own chunk size, by the state size
    bsz, length, heads, p = x.shape
    g, n = B.shape[2:]
    r = _heads_per_group(heads, g)
    q = chunk_size
    pad = -length % q
    chunks = (length + pad) // q
    # heads split as (group, head in group); time as (chunk, step in chunk)
    xs = F.pad(x.float(), (0, 0, 0, 0, 0, pad)).view(bsz, chunks, q, g, r, p)
    d = F.pad(dt.float(), (0, 0, 0, pad)).view(bsz, chunks, q, g, r).permute(0, 1, 3, 4, 2)  # [b, c, g, r, q]
    bs, cs = (F.pad(t.float(), (0, 0, 0, 0, 0, pad)).view(bsz, chunks, q, g, n) for t in (B, C))
    log_decay = d * A.float().view(g, r, 1)
    decay = torch.exp(_segsum(log_decay))  # [b, c, g, r, q, q]: from after step j to after step i

    scores = torch.einsum("bcign,bcjgn->bcgij", cs, bs)[:, :, :, None] * decay * d[..., None, :]
    y = _contiguous_grad(scores @ xs.permute(0, 1, 3, 4, 2, 5)).permute(0, 1, 4, 2, 3, 5)  # [b, c, q, g, r, p]

    to_end = (decay[..., -1, :] * d).permute(0, 1, 4, 2, 3)[..., None]  # [b, c, q, g, r, 1]
    chunk_states = torch.einsum("bcjgrp,bcjgn->bcgrpn", xs * to_end, bs)
    # the recurrence over chunks in closed form: incoming state of chunk z = sum over j <= z of the states
    # [initial, chunk 0, ..., chunk C-1][j] decayed through chunks j..z-1 (segsum over the per-chunk log decays)
    first = x.new_zeros(bsz, g, r, p, n, dtype=torch.float32) if initial_state is None else initial_state.float()
    states = torch.cat([first.view(bsz, 1, g, r, p, n), chunk_states], dim=1)  # [b, c + 1, g, r, p, n]
    across = torch.exp(_segsum(F.pad(log_decay.sum(-1).permute(0, 2, 3, 1), (1, 0))))  # [b, g, r, c + 1, c + 1]
    carries = torch.einsum("bgrzj,bjgrpn->bzgrpn", across, states)

    from_start = torch.exp(log_decay.cumsum(-1)).permute(0, 1, 4, 2, 3)[..., None]  # [b, c, q, g, r, 1]
    y = y + torch.einsum("bcign,bcgrpn->bcigrp", cs, carries[:, :-1]) * from_start
    y = y.reshape(bsz, chunks * q, heads, p)[:, :length]
    return y.to(x.dtype), carries[:, -1].reshape(bsz, heads, p, n)


@lookup_once
def fla_available() -> bool:
    """Whether flash-linear-attention (``fla``) can be imported."""
    return importlib.util.find_spec("fla") is not None


@lookup_once
def fla_backward_supported(device: torch.device) -> bool:
    """Whether fla's SSD backward runs on ``device``: fla refuses it on Hopper GPUs with Triton >= 3.4 and < 3.7.1
    (wrong results there, fla issue #640) unless ``tilelang`` is installed."""
    import triton
    from packaging.version import Version

    hopper = torch.cuda.get_device_capability(device)[0] == 9
    broken = Version("3.4") <= Version(triton.__version__) < Version("3.7.1")
    return not (hopper and broken) or importlib.util.find_spec("tilelang") is not None


def ssd_scan_fla(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> ScanOut:
    """:func:`ssd_scan` through flash-linear-attention's ``chunk_simple_gla`` (CUDA, forward and backward).

    SSD is gated linear attention with one log-decay per head and step: queries ``C``, keys ``B``, values
    ``dt * x``, log-decay ``dt * A``, scale 1; the state ``[P, N]`` is fla's value-first layout.
    """
    from fla.ops.simple_gla import chunk_simple_gla

    rep = _heads_per_group(x.shape[2], B.shape[2])
    q, k = C.to(x.dtype).repeat_interleave(rep, dim=2), B.to(x.dtype).repeat_interleave(rep, dim=2)
    v = (x * dt.unsqueeze(-1)).to(x.dtype)
    y, state = chunk_simple_gla(q, k, v, g=dt.float() * A.float(), scale=1.0,
                                initial_state=None if initial_state is None else initial_state.float(),
                                output_final_state=True, state_v_first=True)  # fmt: skip
    return y.to(x.dtype), state.float()
