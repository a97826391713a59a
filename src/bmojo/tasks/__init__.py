"""Synthetic recall tasks generated on the fly: MQAR (Zoology) and the MAD recall/copy tasks.

Every generator is called as ``fn(num_examples, seq_len, vocab_size, seed, **extra)`` and returns
``(inputs, labels)``, long [num_examples, seq_len], where ``labels[:, i]`` is the token to predict after
reading ``inputs[:, i]`` and -100 marks positions ignored by loss and accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from bmojo.tasks.mad import fuzzy_in_context_recall, in_context_recall, noisy_in_context_recall, selective_copying
from bmojo.tasks.mqar import IGNORE_INDEX, MQARConfig, _check_at_least, mqar

TaskFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]

TASKS: dict[str, TaskFn] = {
    "mqar": mqar,
    "in_context_recall": in_context_recall,
    "noisy_in_context_recall": noisy_in_context_recall,
    "fuzzy_in_context_recall": fuzzy_in_context_recall,
    "selective_copying": selective_copying,
}

MAX_TOP_UP_ROUNDS = 64


def make_split(
    generator_fn: TaskFn,
    num_train: int,
    num_test: int,
    seed: int,
    *,
    test_params: Mapping[str, Any] | None = None,
    **params: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test sets of ``generator_fn(**params)`` sharing no input sequence.

    Train rows use ``seed``; test rows use ``seed + 1, seed + 2, ...`` (``params`` updated by
    ``test_params``, e.g. another ``power_a`` or ``fixed_key_motif_size=True``). Test rows whose inputs
    equal a train row are dropped and fresh rows drawn until ``num_test`` remain (duplicates inside the
    test set are kept). Raises ``ValueError`` if the task has too few distinct sequences for that.

    Returns ``(train_inputs, train_labels, test_inputs, test_labels)``, long [num_train | num_test, seq_len].
    """
    _check_at_least("num_train", num_train, 1)
    _check_at_least("num_test", num_test, 1)
    train_inputs, train_labels = generator_fn(num_examples=num_train, seed=seed, **params)
    test_kwargs = {**params, **(test_params or {})}
    kept_inputs, kept_labels, num_kept = [], [], 0
    for round_ in range(1, MAX_TOP_UP_ROUNDS + 1):
        inputs, labels = generator_fn(num_examples=num_test, seed=seed + round_, **test_kwargs)
        _, row_id = torch.unique(torch.cat([train_inputs, inputs]), dim=0, return_inverse=True)
        fresh = ~torch.isin(row_id[num_train:], row_id[:num_train])
        take = fresh.nonzero().squeeze(1)[: num_test - num_kept]
        kept_inputs.append(inputs[take])
        kept_labels.append(labels[take])
        num_kept += take.numel()
        if num_kept == num_test:
            return train_inputs, train_labels, torch.cat(kept_inputs), torch.cat(kept_labels)
    raise ValueError(
        f"could not draw num_test={num_test} test sequences absent from the train set in {MAX_TOP_UP_ROUNDS} "
        f"rounds (got {num_kept}); the task has too few distinct sequences for num_train={num_train}"
    )


__all__ = [
    "IGNORE_INDEX",
    "MQARConfig",
    "TASKS",
    "fuzzy_in_context_recall",
    "in_context_recall",
    "make_split",
    "mqar",
    "noisy_in_context_recall",
    "selective_copying",
]
