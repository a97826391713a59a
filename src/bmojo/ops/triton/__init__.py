"""Triton kernels for CUDA tensors, and the switch that picks them.

``BMOJO_KERNELS`` (read at import; :func:`set_kernels` changes it at run time) chooses the path:

* ``auto`` (default): our Triton kernels for CUDA tensors when :func:`triton_available` (``triton`` importable,
  torch 2.6 or later), else the PyTorch path;
* ``reference``: always the PyTorch path;
* ``triton``: always the Triton kernels, for any device (with ``TRITON_INTERPRET=1`` they run on CPU tensors,
  which is how the tests check them); raises where they are not available.

``triton`` itself is imported only when a kernel runs, never on import of ``bmojo``. Every kernel of ours has a
backward kernel (the selective scan's, the SSD's and the B'MOJO read-out's), so calls with gradients take them too,
compiled or not (they are ``torch.library.triton_op`` custom ops, which ``torch.compile`` keeps whole and
differentiates through).

The same switch governs the fused CUDA paths of other libraries, which also train (:func:`use_fused_cuda`):
FlexAttention for the B'MOJO attention and flash-linear-attention's SSD scan when ``fla`` is installed.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Callable
from typing import Any

import torch

KERNEL_MODES = ("auto", "reference", "triton")


def _check(mode: str) -> str:
    if mode not in KERNEL_MODES:
        raise ValueError(f"BMOJO_KERNELS must be one of {KERNEL_MODES}, got {mode!r}")
    return mode


_mode = _check(os.environ.get("BMOJO_KERNELS", "auto"))


def set_kernels(mode: str) -> None:
    """Choose the kernel path: ``auto``, ``reference`` or ``triton`` (see the module docstring)."""
    global _mode
    _mode = _check(mode)


def kernels() -> str:
    """The kernel path in force."""
    return _mode


def lookup_once(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, a look-up of the environment (is a package installed, what this torch or GPU offers), cached per
    arguments and a constant to ``torch.compile``: dynamo calls it instead of tracing it (it traces through
    ``functools.cache``, and some releases refuse to trace ``importlib``, which broke compiled CUDA models).
    ``.cache_clear()`` forgets the results."""
    cached = functools.cache(fn)

    @torch.compiler.assume_constant_result
    @functools.wraps(fn)
    def lookup(*args: Any, **kwargs: Any) -> Any:
        return cached(*args, **kwargs)

    lookup.cache_clear = cached.cache_clear
    return lookup


@lookup_once
def triton_available() -> bool:
    """Whether our kernels can run: the ``triton`` package can be imported and this torch registers Triton kernels as
    ops (``torch.library.triton_op``, torch 2.6 and later)."""
    return importlib.util.find_spec("triton") is not None and hasattr(torch.library, "triton_op")


@lookup_once
def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter, on CPU tensors (``TRITON_INTERPRET=1``: it decides so when it
    defines a kernel, as our kernel modules are imported). Imports ``triton``."""
    import triton

    knobs = getattr(triton, "knobs", None)  # (Triton 3.4 and later; before, the variable alone)
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET", "0") == "1"


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will differentiate through a call on ``tensors`` (grad mode on, some input requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def offsets_fit(x: torch.Tensor) -> bool:
    """Whether every element of ``x``, and of a contiguous tensor of its shape (the kernels' outputs), lies within
    ``2**31`` elements of its batch entry's first: the kernels take 32-bit offsets within a batch entry (64-bit across
    entries)."""
    span = sum((size - 1) * abs(stride) for size, stride in zip(x.shape[1:], x.stride()[1:]))
    return max(span, math.prod(x.shape[1:]) - 1) < 2**31


def use_triton(*tensors: torch.Tensor | None, differentiable: bool = False) -> bool:
    """Whether a call on ``tensors`` should run our Triton kernel.

    Never when any input is float64 (the kernels compute in float32), nor when an input needs a gradient under grad
    mode, unless the kernel is ``differentiable`` (has a backward kernel); otherwise always in ``triton`` mode, and in
    ``auto`` mode when every tensor is on a CUDA device, ``triton`` is importable and every tensor's offsets fit the
    kernels' (:func:`offsets_fit`).
    """
    present = [t for t in tensors if t is not None]
    if _mode == "reference":
        return False
    if needs_grad(*present) and not differentiable:
        return False
    if any(t.dtype == torch.float64 for t in present):
        return False
    if _mode == "triton":
        if not triton_available():
            raise RuntimeError("BMOJO_KERNELS=triton needs the triton package (pip install triton) and torch >= 2.6")
        return True
    return all(t.is_cuda and offsets_fit(t) for t in present) and triton_available()


def check_inputs(*tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` if ``tensors`` lie on more than one device, on one that is not CUDA outside Triton's
    interpreter (:func:`interpreting`; eager calls only: compiled code may be traced for a GPU on a CPU), or one of
    them is too large for the kernels' offsets (:func:`offsets_fit`); their shapes are checked beside the PyTorch ops
    (``bmojo.ops.check_shapes``)."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    device = next(iter(devices), None)
    if device is not None and device.type != "cuda" and not torch.compiler.is_compiling() and not interpreting():
        raise ValueError(f"the Triton kernels take CUDA tensors, got {device.type} ones (TRITON_INTERPRET=1 runs them "
                         "on CPU tensors)")  # fmt: skip
    for t in tensors:
        if t is not None and not offsets_fit(t):
            raise ValueError(f"an input of shape {tuple(t.shape)} spans 2**31 elements or more within one batch "
                             "entry: too large for the Triton kernels' 32-bit offsets (BMOJO_KERNELS=reference runs "
                             "it)")  # fmt: skip


def register_scan_autograd(forward, backward, options: int) -> None:
    """Differentiate the scan op ``forward(x, dt, A, B, C, initial_state, *options..., store_states) -> (y, final,
    chunk_states)`` by the op ``backward(dy, d_final, x, dt, A, B, C, chunk_states, *the first `options` options)
    -> (dx, ddt, dA, dB, dC, d_initial)`` (the initial state's gradient cast to its dtype, or none without one)."""

    def setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:5], output[2])
        ctx.options, ctx.non_tensors = inputs[6 : 6 + options], len(inputs) - 6
        ctx.initial_dtype = None if inputs[5] is None else inputs[5].dtype

    def grads(ctx, dy: torch.Tensor, d_final: torch.Tensor, _):
        *rest, d_initial = backward(dy, d_final, *ctx.saved_tensors, *ctx.options)
        d_initial = None if ctx.initial_dtype is None else d_initial.to(ctx.initial_dtype)
        return *rest, d_initial, *(None,) * ctx.non_tensors

    forward.register_autograd(grads, setup_context=setup)


def kernel_op(name: str, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """``torch.library.triton_op(name, mutates_args=...)`` of a function that launches Triton kernels, run with its
    first argument's CUDA device current: Triton launches on the current device, not on its arguments' (tensors on
    ``cuda:1`` while ``cuda:0`` is current would fault or race); compiled code guards its launches' devices itself."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def on_device(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if x.is_cuda and not torch.compiler.is_compiling():
                with torch.cuda.device(x.device):
                    return fn(x, *args, **kwargs)
            return fn(x, *args, **kwargs)

        return torch.library.triton_op(name, mutates_args=mutates_args)(on_device)

    return register


def dot_tile(n: int) -> int:
    """A tile dimension covering ``n``: the power of two at least ``n`` and 16 (``tl.dot``'s minimum)."""
    return max(16, 1 << (n - 1).bit_length())


def dot_precision(x: torch.Tensor) -> str:
    """``tl.dot`` precision for inputs like ``x``: TF32 (10-bit mantissas, finer than bfloat16's 7) on the tensor cores
    for 16-bit inputs, which rounds float32 intermediates entering a product (the SSD's states and gradients) as well;
    for float32 inputs what PyTorch's matrix products use (``torch.set_float32_matmul_precision``: full float32 at
    ``"highest"``, the default, else TF32)."""
    if x.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def use_fused_cuda(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on ``tensors`` should take a fused CUDA path (FlexAttention, flash-linear-attention):
    every tensor on a CUDA device, none float64, and the kernel mode not ``reference``."""
    present = [t for t in tensors if t is not None]
    return _mode != "reference" and all(t.is_cuda and t.dtype != torch.float64 for t in present)
