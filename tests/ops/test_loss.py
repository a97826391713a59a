"""The chunked LM-head cross-entropy against the plain one: loss and gradients, chunkings, autocast, compile."""

from __future__ import annotations

import pytest
import torch

from bmojo.ops.loss import linear_cross_entropy, linear_cross_entropy_reference


def inputs(n: int, d: int = 16, vocab: int = 50, seed: int = 0, ignored: int = 3):
    """Rows ``[n, d]``, a weight ``[vocab, d]`` (both leaves that need gradients) and targets with every
    ``ignored``-th ignored, from the second."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = torch.randn(vocab, d, generator=g).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[1::ignored] = -100
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, **kw):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets, **kw)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize(
    ("n", "chunk"), [(1, 4), (2, 1), (37, 8), (40, 8), (64, 64), (10, 100), (33, 1)]
)  # one row; chunks of one; a last short chunk; exact chunks; one chunk; a chunk larger than the rows
def test_matches_reference(n, chunk):
    hidden, weight, targets = inputs(n)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=chunk)
    want = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_divides_by_num_items():
    """Hugging Face ``Trainer``'s ``num_items_in_batch``: the sum over the targets divided by it."""
    hidden, weight, targets = inputs(30)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=7, num_items=50)
    want = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets, num_items=50)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    mean = linear_cross_entropy_reference(hidden, weight, targets)
    torch.testing.assert_close(got[0], mean * (targets != -100).sum() / 50)


def test_every_target_ignored_gives_nan_as_the_reference():
    """A NaN loss, as the plain one's, and zero gradients (not NaN: an optimizer step would spread them)."""
    hidden, weight, targets = inputs(6)
    targets[:] = -100
    got = loss_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=4)
    want = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets)
    assert got[0].isnan() and want[0].isnan()
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b)
        assert not a.any()


@pytest.mark.parametrize("frozen", ["hidden", "weight"])
def test_gradient_of_one_input_only(frozen):
    """A frozen head (or rows that need no gradient): the other's gradient, none computed for it."""
    hidden, weight, targets = inputs(25)
    still, live = (hidden, weight) if frozen == "hidden" else (weight, hidden)
    still.requires_grad_(False)
    want = torch.autograd.grad(linear_cross_entropy_reference(hidden, weight, targets), live)[0]
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=6)
    torch.testing.assert_close(torch.autograd.grad(loss, live)[0], want)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_without_gradients_only_the_loss(mode):
    """Without gradients (evaluation), one product a chunk (the logits), none for gradients."""
    hidden, weight, targets = inputs(25)
    with mode(), torch.profiler.profile() as prof:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=6)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, linear_cross_entropy_reference(hidden, weight, targets).detach())
    products = [e for e in prof.events() if e.name in ("aten::mm", "aten::addmm")]
    assert len(products) == 5  # chunks of 6 rows: 25 = 4 * 6 + 1


def test_scales_by_the_gradient_of_what_uses_it():
    hidden, weight, targets = inputs(20)
    got = loss_and_grads(lambda *a: 3.0 * linear_cross_entropy(*a, chunk_size=6), hidden, weight, targets)
    want = loss_and_grads(lambda *a: 3.0 * linear_cross_entropy_reference(*a), hidden, weight, targets)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_bfloat16_autocast_as_the_reference():
    """Under autocast the head's products in bfloat16, the softmax in float32, gradients in the leaves' float32."""
    hidden, weight, targets = inputs(64, d=32, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=16)
        want = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets)
    assert got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    for a, b in zip(got[1:], want[1:]):  # the weight's gradient sums four chunks' bfloat16 products
        torch.testing.assert_close(a, b, atol=2e-2 * b.abs().max().item(), rtol=0)


def test_bfloat16_inputs():
    hidden, weight, targets = inputs(40)
    hidden, weight = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    got = loss_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=16)
    want = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2 * b.abs().max().item(), rtol=0)


def test_compiles_in_one_graph():
    hidden, weight, targets = inputs(30)
    compiled = torch.compile(linear_cross_entropy, fullgraph=True)
    got = loss_and_grads(compiled, hidden, weight, targets, chunk_size=8)
    want = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h, w, t: (h[0], w, t[:1]), "must be 2-D"),
        (lambda h, w, t: (h, w[:, :5], t), r"weight must have shape \(50, 16\)"),
        (lambda h, w, t: (h, w, t[:-1]), r"targets must have shape \(10,\)"),
    ],
)
def test_rejects_bad_shapes(change, message):
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(*change(*inputs(10)))


@pytest.mark.parametrize("bad", [50, 70, -1, -101])
def test_rejects_targets_outside_the_vocabulary(bad):
    """A target outside ``[0, vocab)`` but the ignore index failed in the gather with an unrelated index error."""
    hidden, weight, targets = inputs(10)
    targets[4] = bad
    for grad in (True, False):
        with (
            torch.set_grad_enabled(grad),
            pytest.raises(ValueError, match=rf"targets holds {bad}, outside .*\[0, 50\)"),
        ):
            linear_cross_entropy(hidden, weight, targets, 4)
    targets[4] = 3
    targets[targets == -100] = -1  # another ignore index, outside the vocabulary too
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, 4, ignore_index=-1),
                               linear_cross_entropy_reference(hidden, weight, targets, ignore_index=-1))  # fmt: skip


def test_rejects_targets_that_are_not_integers():
    hidden, weight, targets = inputs(10)
    with pytest.raises(TypeError, match="targets must be an integer tensor, got torch.float32"):
        linear_cross_entropy(hidden, weight, targets.float())


def test_rejects_a_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        linear_cross_entropy(*inputs(10), chunk_size=0)
