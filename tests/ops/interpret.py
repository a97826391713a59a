"""Runs calls of our Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``, for the test modules of ``tests/ops``.

The interpreter must be on before ``triton`` is first imported (its own ``tl.sum`` etc. are decorated then), and
other test modules import it earlier through torch, so the calls run in one subprocess started with
``TRITON_INTERPRET=1 BMOJO_KERNELS=triton``; the references run in the tests.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import torch

# the kernels' entry points, whose calls the worker counts
ENTRY_POINTS = (
    ("bmojo.ops.triton.selective_scan", "selective_scan_triton"),
    ("bmojo.ops.triton.ssd", "ssd_scan_triton"),
    ("bmojo.ops.triton.ssd", "mamba2_step_triton"),
    ("bmojo.ops.triton.eidetic", "stage_evicted_triton"),
    ("bmojo.ops.triton.attention", "union_attention_triton"),
)


def probe_loss(out) -> torch.Tensor:
    """A loss over a call's first output (and second, if a tensor) that weighs every element differently (a -inf
    LSE, of a query that sees no key, weighs nothing)."""
    parts = [out[0]] + ([out[1]] if isinstance(out[1], torch.Tensor) else [])
    parts = [t.float().masked_fill(torch.isinf(t), 0.0) for t in parts]
    return sum((t * torch.linspace(-1, 1, t.numel()).view(t.shape)).sum() for t in parts)


def assert_same_gradients(result, loss_ref: torch.Tensor, leaves: list[torch.Tensor], **tolerance: float) -> None:
    """``result = (loss, gradients)`` of a ``_grad`` call equals ``loss_ref`` and its gradients with respect to
    ``leaves`` (``tolerance``: ``rtol``, ``atol``)."""
    loss, grads = result
    grads_ref = torch.autograd.grad(loss_ref, leaves)
    torch.testing.assert_close(loss, loss_ref.detach(), **tolerance)
    assert len(grads) == len(grads_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, **tolerance)


def grad_leaves(args) -> list[torch.Tensor]:
    """The tensors requiring gradients in ``args``, in order, looking into lists, tuples and dataclasses."""
    if isinstance(args, torch.Tensor):
        return [args] if args.requires_grad else []
    if isinstance(args, (list, tuple)):
        return [t for x in args for t in grad_leaves(x)]
    if dataclasses.is_dataclass(args):
        return [t for field in dataclasses.fields(args) for t in grad_leaves(getattr(args, field.name))]
    return []


# A call with ``_grad=True`` runs with gradients and returns ``(probe_loss, gradients of its tensor arguments that
# require them, then of the module's parameters)``; the others run under no_grad and return the output, with
# ``_inputs=True`` as ``(output, arguments after the call)`` (what it updated in place). Each result comes with the
# number of kernel calls it made.
WORKER = (
    """
import dataclasses, importlib, sys, torch
counted = []
for module, name in ENTRY_POINTS:
    module = importlib.import_module(module)
    setattr(module, name, lambda *a, f=getattr(module, name), **k: counted.append(1) or f(*a, **k))
"""
    + inspect.getsource(probe_loss)
    + inspect.getsource(grad_leaves)
    + """
calls, outs = torch.load(sys.argv[1], weights_only=False), {}
for key, (target, args, kwargs) in calls.items():
    if isinstance(target, str):
        module, name = target.split(":")
        target = getattr(importlib.import_module(module), name)
    grad, inputs, before = kwargs.pop("_grad", False), kwargs.pop("_inputs", False), len(counted)
    with torch.set_grad_enabled(grad):
        out = target(*args, **kwargs)
        if grad:
            leaves = grad_leaves(args)
            leaves += list(target.parameters()) if isinstance(target, torch.nn.Module) else []
            loss = probe_loss(out)
            out = (loss.detach(), torch.autograd.grad(loss, leaves))
        elif inputs:
            out = (out, args)
    outs[key] = (out, len(counted) - before)
torch.save(outs, sys.argv[2])
"""
)


def run_interpreted(calls: dict[str, tuple], folder: Path) -> dict[str, tuple]:
    """``{key: (output, kernel calls)}`` of ``calls = {key: (target, args, kwargs)}`` (target a callable, a module
    or ``"module:function"``), run in a subprocess with the Triton interpreter on."""
    torch.save(calls, folder / "calls.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "BMOJO_KERNELS": "triton"}
    code = f"ENTRY_POINTS = {ENTRY_POINTS!r}\n" + WORKER
    proc = subprocess.run([sys.executable, "-c", code, str(folder / "calls.pt"), str(folder / "outs.pt")], env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(folder / "outs.pt", weights_only=False)
