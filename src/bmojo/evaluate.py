"""Language-model evaluation: perplexity and bits per byte over windows of a token stream, length generalisation."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bmojo.models.modeling import BMojoForCausalLM
from bmojo.ops.loss import linear_cross_entropy


def windows(n: int, context_length: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Evaluation windows over ``n`` tokens as ``(start, end, scored)``.

    A window feeds ``tokens[start:end]`` (at most ``context_length`` tokens) and predicts ``tokens[start+1:end+1]``;
    only its last ``scored`` predictions count, those not scored by an earlier window. Windows start every
    ``stride`` tokens (default ``context_length``: non-overlapping), so every token but the first is scored exactly
    once, with at least ``context_length - stride`` tokens of context after the first window.
    """
    stride = context_length if stride is None else stride
    if context_length < 1 or not 1 <= stride <= context_length:
        raise ValueError(f"need context_length >= 1 and 1 <= stride <= context_length, got {context_length}, {stride}")
    if n < 2:
        raise ValueError(f"need at least 2 tokens to evaluate, got {n}")
    out, start, done = [], 0, 0
    while done < n - 1:
        end = min(start + context_length, n - 1)
        out.append((start, end, end - done))
        done, start = end, start + stride
    return out


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    tokens: np.ndarray | torch.Tensor,
    context_length: int,
    batch_size: int = 4,
    stride: int | None = None,
    num_bytes: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Mean next-token cross-entropy of ``model`` on a 1-D token stream, over :func:`windows`.

    ``model(ids [B, L], use_cache=False, logits_to_keep=k).logits`` gives ``[B, k, V]`` logits; a
    :class:`BMojoForCausalLM` with a ``loss_chunk_size`` is scored through its LM head that many tokens at a
    time, without the windows' logits (``[B, L, V]`` float32 and their log-softmax: 6.6 GB for one window of 16K
    tokens over GPT-2's vocabulary). Returns ``loss``
    (nats per scored token), ``ppl = exp(loss)``, ``tokens`` (scored: ``len(tokens) - 1``), and ``bits_per_byte =
    sum of losses / (ln 2 * num_bytes)`` when ``num_bytes`` (UTF-8 bytes of the text) is given, else ``None``.
    ``on_batch(done, total)`` is called after each batch of windows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = torch.as_tensor(np.asarray(tokens, dtype=np.int64)) if not torch.is_tensor(tokens) else tokens.long()
    if data.dim() != 1:
        raise ValueError(f"tokens must be a 1-D array, got shape {tuple(data.shape)}")
    wins = windows(len(data), context_length, stride)
    groups: dict[tuple[int, int], list[int]] = {}
    for start, end, scored in wins:
        groups.setdefault((end - start, scored), []).append(start)
    batches = [(length, scored, starts[i : i + batch_size])
               for (length, scored), starts in groups.items() for i in range(0, len(starts), batch_size)]  # fmt: skip
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for done, (length, scored, starts) in enumerate(batches, start=1):
            ids = torch.stack([data[s : s + length + 1] for s in starts]).to(device)
            total += _summed_loss(model, ids, scored)
            if on_batch is not None:
                on_batch(done, len(batches))
    finally:
        model.train(was_training)
    count = len(data) - 1
    loss = total / count
    return {
        "context_length": context_length,
        "stride": stride or context_length,
        "tokens": count,
        "loss": loss,
        "ppl": math.exp(loss),
        "bits_per_byte": total / (math.log(2) * num_bytes) if num_bytes else None,
    }


def _summed_loss(model: nn.Module, ids: torch.Tensor, scored: int) -> float:
    """The summed cross-entropy of the last ``scored`` next tokens of each window ``ids [B, L + 1]``."""
    targets = ids[:, -scored:].reshape(-1)
    if isinstance(model, BMojoForCausalLM) and model.loss_chunk_size:
        hidden = model.model(ids[:, :-1], use_cache=False).last_hidden_state[:, -scored:]
        chunk = model.loss_chunk_size
        return linear_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, targets, chunk, num_items=1).item()
    logits = model(ids[:, :-1], use_cache=False, logits_to_keep=scored).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, reduction="sum").item()


def length_generalisation(
    model: nn.Module,
    tokens: np.ndarray | torch.Tensor,
    lengths: list[int],
    batch_size: int = 1,
    num_bytes: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """:func:`perplexity` with non-overlapping windows at each context length in ``lengths`` (e.g. a model trained
    at ``T`` evaluated at ``T, 2T, 4T, 8T``). Every length scores the same tokens, so the rows compare directly."""
    if not lengths:
        raise ValueError("no evaluation lengths given")
    if len(tokens) - 1 < max(lengths):
        raise ValueError(f"{len(tokens)} tokens are too few to fill one window of the longest length {max(lengths)}")
    return [perplexity(model, tokens, n, batch_size, num_bytes=num_bytes, on_batch=on_batch) for n in sorted(lengths)]


def plot_length_generalisation(
    rows: list[dict[str, Any]], path: Path, train_length: int | None = None, title: str = "length generalisation"
) -> Path:
    """Perplexity vs evaluation length (log-2 x axis), a dashed line at the training length; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["context_length"] for r in rows], [r["ppl"] for r in rows], marker="o")
    if train_length is not None:
        ax.axvline(train_length, color="gray", linestyle="--", label=f"training length {train_length}")
        ax.legend()
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["context_length"] for r in rows], [str(r["context_length"]) for r in rows])
    ax.minorticks_off()
    ax.set_xlabel("evaluation context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_rows(rows: list[dict[str, Any]], path: Path) -> tuple[Path, Path]:
    """``rows`` as ``path.csv`` and a Markdown table ``path.md``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0])
    csv_path, md_path = path.with_suffix(".csv"), path.with_suffix(".md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path
