"""Next-token cross-entropy through the LM head, a chunk of rows at a time.

The plain loss, :func:`linear_cross_entropy_reference`, is ``F.cross_entropy(F.linear(hidden, weight).float(),
targets)``: it holds the float32 logits of every position ``[N, V]``, their log-softmax and, in the backward, their
gradient, 3.3 GB each for a 50K vocabulary at 16K tokens a step. :func:`linear_cross_entropy` computes the loss of
``chunk_size`` rows at a time and, when it is trained, their gradients at once (the softmax less the one-hot target,
through the head's products to the rows and the weight), so that one chunk's logits exist at a time and the backward
only scales the gradients kept: the same products as the plain loss, none recomputed (as Liger Kernel's fused linear
cross-entropy does). Under autocast both run the head's products in the autocast dtype, the softmax in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bmojo.ops import check_integers, check_positive, check_shapes

IGNORE_INDEX = -100


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``logits [N, V]`` at ``targets [N]``, summed over the targets that are not ``ignore_index``
    and divided by their count or, given, by ``num_items`` (Hugging Face ``Trainer``'s count over a step's
    micro-batches)."""
    if num_items is None:
        return F.cross_entropy(logits, targets, ignore_index=ignore_index)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum") / num_items


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`cross_entropy` of the logits ``hidden [N, D] @ weight [V, D].T`` (float32) at ``targets [N]``."""
    return cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index, num_items)


def check_targets(targets: torch.Tensor, vocab: int, ignore_index: int, name: str = "targets") -> None:
    """Raise ``TypeError`` unless ``targets`` (called ``name``) are integers and, in eager mode (a read from the
    device), ``ValueError`` naming the first target outside ``[0, vocab)`` that is not ``ignore_index`` (the gather
    would fail on it with an index error, or a device-side assert on CUDA)."""
    check_integers(name, targets)
    if torch.compiler.is_compiling():
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        raise ValueError(f"{name} holds {int(targets[bad][0])}, outside the vocabulary [0, {vocab}) and not the "
                         f"ignore_index {ignore_index}")  # fmt: skip


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 2048,
    ignore_index: int = IGNORE_INDEX,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`linear_cross_entropy_reference`, computed ``chunk_size`` rows at a time (see the module docstring)."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden and weight must be 2-D, got shapes {tuple(hidden.shape)} and {tuple(weight.shape)}")
    check_shapes([("weight", weight, (weight.shape[0], hidden.shape[1])), ("targets", targets, (hidden.shape[0],))])
    check_positive("chunk_size", chunk_size)
    check_targets(targets, weight.shape[0], ignore_index)
    return prechecked_linear_cross_entropy(hidden, weight, targets, chunk_size, ignore_index, num_items)


def prechecked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    ignore_index: int = IGNORE_INDEX,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`linear_cross_entropy` of inputs its caller has checked as it checks them (the targets' range is a read
    from the device: a model that checked its labels need not read them twice)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # the products in the autocast dtype, as F.linear's would be
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device, enabled=False):
        if not torch.is_grad_enabled():  # (an autograd Function would still be asked for its inputs' gradients)
            return _chunked(hidden, weight, targets, chunk_size, ignore_index, num_items, False, False)[0]
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, num_items)


class _LinearCrossEntropy(torch.autograd.Function):
    """The chunked loss; its gradients computed in the forward pass, scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index, num_items):  # type: ignore[override]
        loss, grad_hidden, grad_weight = _chunked(
            hidden, weight, targets, chunk_size, ignore_index, num_items, *ctx.needs_input_grad[:2]
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grads = [None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return *grads, None, None, None, None


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    ignore_index: int,
    num_items: int | torch.Tensor | None,
    grad_hidden: bool,
    grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The loss and, where asked for, its gradients with respect to ``hidden`` (in its dtype) and ``weight`` (summed
    over the chunks in float32)."""
    keep = targets != ignore_index
    scale = 1 / (keep.sum() if num_items is None else num_items)
    picked = torch.where(keep, targets, 0).long()
    loss = hidden.new_zeros((), dtype=torch.float32)
    d_hidden = torch.empty_like(hidden) if grad_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h, t, k = hidden[rows], picked[rows], keep[rows]
        logits = F.linear(h, weight).float()
        lse = torch.logsumexp(logits, dim=-1)
        loss = loss + ((lse - logits.gather(1, t[:, None])[:, 0]) * k).sum()
        if not (grad_hidden or grad_weight):
            continue
        d_logits = logits.sub_(lse[:, None]).exp_()  # the softmax, in place of the logits
        d_logits.scatter_add_(1, t[:, None], torch.full_like(lse[:, None], -1.0))
        d_logits = d_logits.mul_(torch.where(k, scale, 0.0)[:, None]).to(h.dtype)  # (no target: 0, not 0 * inf)
        if grad_hidden:
            d_hidden[rows] = d_logits @ weight
        if grad_weight:
            d_weight += d_logits.t() @ h
    return loss * scale, d_hidden, d_weight
