"""Selective state-space mixers (fading memory): Mamba-1 and Mamba-2 (SSD).

Parameter names and shapes follow Hugging Face ``MambaMixer`` and ``Mamba2Mixer`` so that their
state dicts load 1:1. Each mixer maps ``h [B, L, D] -> y [B, L, D]`` and optionally carries an
:class:`SSMState` (conv window + SSM state), so one call can prefill and later calls continue the
sequence, one token or many at a time, with exactly the result of a single call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bmojo.layers.checks import check_hidden_states, check_sizes
from bmojo.layers.linear import Linear
from bmojo.layers.norm import GatedRMSNorm, RMSNorm
from bmojo.ops import check_shapes
from bmojo.ops.conv import causal_conv1d, causal_conv1d_step
from bmojo.ops.selective_scan import selective_scan, selective_scan_step
from bmojo.ops.ssd import mamba2_step, ssd_scan


@dataclass
class SSMState:
    """Recurrent state of one SSM mixer: ``conv [B, C, K-1]`` (last conv inputs) and ``ssm`` (float32)."""

    conv: torch.Tensor
    ssm: torch.Tensor


def _causal_conv(x: torch.Tensor, conv: nn.Conv1d, prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv of ``x [B, L, C]`` continuing from ``prev [B, C, K-1]`` (zeros when None).

    Returns ``silu(conv(x)) [B, L, C]`` and the new conv state ``[B, C, K-1]`` (for one token continuing a state:
    a view of the window of the last ``K`` inputs, which the caller copies).
    """
    k = conv.kernel_size[0]
    if prev is not None and x.shape[1] == 1:  # decoding
        window = torch.cat([prev.to(x.dtype), x.transpose(1, 2)], dim=2)  # [B, C, K]
        return causal_conv1d_step(window, conv.weight, conv.bias, silu=True).unsqueeze(1), window[:, :, 1:]
    if prev is None:
        prev = x.new_zeros(x.shape[0], x.shape[2], k - 1)
    x = torch.cat([prev.transpose(1, 2).to(x.dtype), x], dim=1)
    state = x[:, x.shape[1] - (k - 1) :].transpose(1, 2).contiguous()
    return causal_conv1d(x, conv.weight, conv.bias, silu=True), state


def _inverse_softplus_dt(n: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> torch.Tensor:
    """Biases ``b`` with ``softplus(b)`` log-uniform in ``[dt_min, dt_max]`` (the Mamba time-step init)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class SegmentedSSM(nn.Module):
    """Runs a long sequence as consecutive segments of ``segment_length`` tokens, carrying the state.

    The result equals one pass over the whole sequence (the scans are exact recurrences), but each
    segment's activations stay small enough for the CPU caches, so time grows linearly with length.
    """

    segment_length: int = 4096

    def forward(
        self, h: torch.Tensor, state: SSMState | None = None, inplace: bool = False, tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, SSMState]:
        """``h [B, L, D] -> (y [B, L, D], state after the last token)``, continuing from ``state``; ``inplace``: the
        state after the last token is written into ``state``'s tensors, which keep their storage (a compiled decoding
        step's static addresses), and ``state`` is returned (else a new state; ``state`` is left as it was).
        ``tokens [B, L]`` (bool): the positions that are tokens; the others (padding before a row's tokens) enter the
        conv as zeros and take no step (``dt = 0``), so the state is that of the row's tokens alone (their outputs,
        not)."""
        self._check_inputs(h, state)
        if tokens is not None and tokens.shape != h.shape[:2]:
            raise ValueError(f"tokens must be [batch, length] {tuple(h.shape[:2])}, got {tuple(tokens.shape)}")
        if state is not None and not inplace:
            state = SSMState(state.conv.clone(), state.ssm.clone())
        outs, new = [], state
        segments = h.split(self.segment_length, dim=1)
        masks = [None] * len(segments) if tokens is None else tokens.split(self.segment_length, dim=1)
        for part, part_tokens in zip(segments, masks):
            y, new = self._forward(part, new, part_tokens)
            outs.append(y)
        if state is not None and new is not state:
            state.conv.copy_(new.conv)
            state.ssm.copy_(new.ssm)
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0], new if state is None else state

    def _forward(
        self, h: torch.Tensor, state: SSMState | None, tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, SSMState]:
        """One segment: its outputs and the state after it (a new one, or ``state`` updated in place); ``tokens``:
        see :meth:`forward`."""
        raise NotImplementedError

    def state_shapes(self, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def _check_inputs(self, h: torch.Tensor, state: SSMState | None) -> None:
        """An error naming what does not fit: ``h`` (:func:`check_hidden_states`), or a state not of
        :meth:`state_shapes`."""
        check_hidden_states(h, self.hidden_size, self.in_proj.weight.dtype)
        if state is not None:
            check_shapes(zip(("state.conv", "state.ssm"), (state.conv, state.ssm), self.state_shapes(h.shape[0])))


class Mamba(SegmentedSSM):
    """Mamba-1 selective SSM: per-channel diagonal ``A [E, N]``, input-dependent ``dt, B, C``.

    ``dt_bc_norm`` adds Jamba's RMSNorms (eps ``norm_eps``) on ``dt``, ``B`` and ``C`` before the scan.
    """

    def __init__(
        self,
        hidden_size: int,
        state_size: int = 16,
        expand: int = 2,
        conv_kernel: int = 4,
        dt_rank: int | None = None,
        bias: bool = False,
        conv_bias: bool = True,
        dt_bc_norm: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        check_sizes(hidden_size=hidden_size, state_size=state_size, expand=expand, conv_kernel=conv_kernel,
                    dt_rank=dt_rank or 1)  # fmt: skip
        self.hidden_size = hidden_size
        self.intermediate_size = e = expand * hidden_size
        self.ssm_state_size = n = state_size
        self.time_step_rank = r = dt_rank or math.ceil(hidden_size / 16)
        self.in_proj = Linear(hidden_size, 2 * e, bias=bias)
        self.conv1d = nn.Conv1d(e, e, conv_kernel, groups=e, padding=conv_kernel - 1, bias=conv_bias)
        self.x_proj = Linear(e, r + 2 * n, bias=False)
        self.dt_proj = Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.empty(e, n))
        self.D = nn.Parameter(torch.empty(e))
        self.out_proj = Linear(e, hidden_size, bias=bias)
        # Jamba: RMSNorm on dt, B and C before the scan
        self.dt_layernorm = RMSNorm(r, norm_eps) if dt_bc_norm else None
        self.b_layernorm = RMSNorm(n, norm_eps) if dt_bc_norm else None
        self.c_layernorm = RMSNorm(n, norm_eps) if dt_bc_norm else None
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """S4D-real ``A``, unit ``D``, and the Mamba ``dt`` initialisation."""
        n = self.ssm_state_size
        self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)
        std = self.time_step_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        self.dt_proj.bias.copy_(_inverse_softplus_dt(self.intermediate_size))

    def state_shapes(self, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the conv and SSM states for a batch."""
        e = self.intermediate_size
        return (batch, e, self.conv1d.kernel_size[0] - 1), (batch, e, self.ssm_state_size)

    def _forward(
        self, h: torch.Tensor, state: SSMState | None = None, tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, SSMState]:
        x, z = self.in_proj(h).chunk(2, dim=-1)
        if tokens is not None:
            x = x * tokens[..., None]
        x, conv_state = _causal_conv(x, self.conv1d, None if state is None else state.conv)
        dt, b, c = self.x_proj(x).split([self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1)
        if self.dt_layernorm is not None:
            dt, b, c = self.dt_layernorm(dt), self.b_layernorm(b), self.c_layernorm(c)
        delta = F.softplus(self.dt_proj(dt).float())
        if tokens is not None:
            delta = delta * tokens[..., None]
        a = -torch.exp(self.A_log.float())
        if state is not None and h.shape[1] == 1:
            y, ssm_state = selective_scan_step(state.ssm, x[:, 0], delta[:, 0], a, b[:, 0], c[:, 0])
            y = y.unsqueeze(1)
        else:
            y, ssm_state = selective_scan(x, delta, a, b, c, initial_state=None if state is None else state.ssm)
        y = (y.float() + x.float() * self.D.float()) * F.silu(z.float())
        return self.out_proj(y.to(h.dtype)), SSMState(conv_state, ssm_state)


class Mamba2(SegmentedSSM):
    """Mamba-2 (SSD) selective SSM: ``H`` heads of size ``P`` with a scalar decay each, ``G`` groups of ``B, C``."""

    def __init__(
        self,
        hidden_size: int,
        state_size: int = 64,
        expand: int = 2,
        head_dim: int = 64,
        n_groups: int = 1,
        conv_kernel: int = 4,
        chunk_size: int = 32,
        bias: bool = False,
        conv_bias: bool = True,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_sizes(hidden_size=hidden_size, state_size=state_size, expand=expand, head_dim=head_dim,
                    n_groups=n_groups, conv_kernel=conv_kernel, chunk_size=chunk_size)  # fmt: skip
        self.hidden_size = hidden_size
        self.intermediate_size = e = expand * hidden_size
        if e % head_dim:
            raise ValueError(f"expand * hidden_size ({e}) must be divisible by the Mamba-2 head_dim ({head_dim})")
        self.head_dim = head_dim
        self.num_heads = nh = e // head_dim
        if nh % n_groups:
            raise ValueError(f"Mamba-2 heads ({nh}) must be divisible by n_groups ({n_groups})")
        self.n_groups = n_groups
        self.ssm_state_size = n = state_size
        self.chunk_size = chunk_size
        self.conv_dim = e + 2 * n_groups * n
        self.in_proj = Linear(hidden_size, 2 * e + 2 * n_groups * n + nh, bias=bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, padding=conv_kernel - 1, bias=conv_bias
        )
        self.dt_bias = nn.Parameter(torch.empty(nh))
        self.A_log = nn.Parameter(torch.empty(nh))
        self.D = nn.Parameter(torch.empty(nh))
        self.norm = GatedRMSNorm(e, n_groups, eps=norm_eps)
        self.out_proj = Linear(e, hidden_size, bias=bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """``A`` uniform in ``[-16, -1]``, unit ``D``, the Mamba ``dt`` bias initialisation."""
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(1, 16)))
        self.D.fill_(1.0)
        self.dt_bias.copy_(_inverse_softplus_dt(self.num_heads))

    def state_shapes(self, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the conv and SSM states for a batch."""
        return (batch, self.conv_dim, self.conv1d.kernel_size[0] - 1), (
            batch,
            self.num_heads,
            self.head_dim,
            self.ssm_state_size,
        )

    def _forward(
        self, h: torch.Tensor, state: SSMState | None = None, tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, SSMState]:
        bsz, length, _ = h.shape
        e, gn = self.intermediate_size, self.n_groups * self.ssm_state_size
        z, xbc, dt = self.in_proj(h).split([e, self.conv_dim, self.num_heads], dim=-1)
        if tokens is not None:
            xbc = xbc * tokens[..., None]
        if state is not None and length == 1 and not torch.is_grad_enabled():  # decoding: the state in place
            y = mamba2_step(xbc[:, 0], dt[:, 0], z[:, 0], state.conv, state.ssm, self.conv1d.weight, self.conv1d.bias,
                            self.dt_bias, self.A_log, self.D, self.norm.weight, self.norm.eps)  # fmt: skip
            return self.out_proj(y.unsqueeze(1)), state
        xbc, conv_state = _causal_conv(xbc, self.conv1d, None if state is None else state.conv)
        x, b, c = xbc.split([e, gn, gn], dim=-1)
        x = x.reshape(bsz, length, self.num_heads, self.head_dim)
        b = b.reshape(bsz, length, self.n_groups, self.ssm_state_size)
        c = c.reshape(bsz, length, self.n_groups, self.ssm_state_size)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if tokens is not None:
            dt = dt * tokens[..., None]
        a = -torch.exp(self.A_log.float())
        init = None if state is None else state.ssm
        y, ssm_state = ssd_scan(x, dt, a, b, c, chunk_size=self.chunk_size, initial_state=init)
        y = y.float() + x * self.D.float()[:, None]  # (x kept in its own dtype for D's gradient, not in float32)
        y = self.norm(y.reshape(bsz, length, e).to(h.dtype), z)
        return self.out_proj(y), SSMState(conv_state, ssm_state)
