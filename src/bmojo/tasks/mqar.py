"""Multi-query associative recall (MQAR), after Zoology (Arora, Eyuboglu et al., 2023).

Layout of one row (``K = num_kv_pairs``)::

    k1 v1 k2 v2 ... kK vK | x  x  q  x  x  x  q  x ...
    -100 everywhere       |         ^ label = value of q

The first ``2K`` tokens hold the key-value pairs; every key is queried exactly once afterwards, at an
even offset ``2*gap`` into the query region, and the label at a query is that key's value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 22  # bound on the random tensor drawn at once by the samplers


def _check_at_least(name: str, value: int | float, minimum: int | float) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sample_without_replacement(
    num_rows: int, k: int, num_choices: int, generator: torch.Generator, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row, ``k`` distinct indices in ``[0, num_choices)``, drawn one after another with probability
    proportional to ``weights`` [num_choices] (uniform if None) among those not yet drawn, i.e. the law
    of ``np.random.choice(num_choices, k, replace=False, p=weights)``. Long [num_rows, k], draw order.

    Efraimidis-Spirakis: index ``i`` gets the key ``u_i ** (1 / w_i)``, ``u_i ~ U(0, 1)``; the ``k``
    largest keys, in decreasing order, are such a draw.
    """
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // num_choices)
    chunks = []
    for start in range(0, num_rows, rows_per_chunk):
        keys = torch.rand(min(rows_per_chunk, num_rows - start), num_choices, generator=generator)
        if weights is not None:
            keys = keys.log() / weights  # log of u ** (1 / w): same order, no underflow
        chunks.append(keys.topk(k, dim=1).indices)
    return torch.cat(chunks)


def _check_mqar(seq_len: int, vocab_size: int, num_kv_pairs: int, power_a: float) -> None:
    _check_at_least("num_kv_pairs", num_kv_pairs, 1)
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0, got {power_a}")
    if seq_len < 4 * num_kv_pairs:
        raise ValueError(
            f"num_kv_pairs={num_kv_pairs} needs seq_len >= 4*num_kv_pairs={4 * num_kv_pairs}, got {seq_len}"
        )
    if vocab_size < 2 * num_kv_pairs + 2:
        half = vocab_size // 2
        raise ValueError(
            f"vocab_size={vocab_size} too small: keys and values need num_kv_pairs={num_kv_pairs} distinct tokens "
            f"each from [1, {half}) and [{half}, {vocab_size}); "
            f"need vocab_size >= 2*num_kv_pairs+2={2 * num_kv_pairs + 2}"
        )


def mqar(
    num_examples: int,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    seed: int = 0,
    random_non_queries: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall rows, as Zoology's ``multiquery_ar`` builds them.

    Keys are ``num_kv_pairs`` distinct tokens from ``[1, vocab_size//2)``, values distinct tokens from
    ``[vocab_size//2, vocab_size)``. The query region (after the ``2*num_kv_pairs`` context tokens) has
    ``space = (seq_len - 2*num_kv_pairs) // 2`` even slots; the gaps of the ``num_kv_pairs`` queries are
    drawn without replacement with ``p(gap = i-1) ∝ power_a * i**(power_a - 1)``, ``i = 1..space``
    (``power_a = 1`` is uniform; small values put queries close to the context). With
    ``random_non_queries`` every query-region position that holds no query is a uniform token from the
    whole vocabulary (it may repeat a key; such positions stay unlabelled), else it is 0.

    Departures from Zoology: no ``seq_len`` even / ``vocab_size > seq_len`` requirements (the
    construction does not need them), and randomness comes from a ``torch.Generator``.

    Returns ``(inputs, labels)``, long [num_examples, seq_len]; ``labels`` is the value at each query
    position and -100 elsewhere, i.e. exactly ``num_kv_pairs`` labelled positions per row.
    """
    _check_at_least("num_examples", num_examples, 1)
    _check_mqar(seq_len, vocab_size, num_kv_pairs, power_a)
    generator = _make_generator(seed)
    half = vocab_size // 2
    context = 2 * num_kv_pairs

    keys = 1 + _sample_without_replacement(num_examples, num_kv_pairs, half - 1, generator)
    values = half + _sample_without_replacement(num_examples, num_kv_pairs, vocab_size - half, generator)
    space = (seq_len - context) // 2
    slot = torch.arange(1, space + 1, dtype=torch.float64)
    gaps = _sample_without_replacement(num_examples, num_kv_pairs, space, generator, power_a * slot ** (power_a - 1))
    query_pos = context + 2 * gaps

    inputs = torch.zeros(num_examples, seq_len, dtype=torch.long)
    labels = torch.full((num_examples, seq_len), IGNORE_INDEX, dtype=torch.long)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    inputs.scatter_(1, query_pos, keys)
    labels.scatter_(1, query_pos, values)
    if random_non_queries:
        is_filler = torch.ones(num_examples, seq_len, dtype=torch.bool)
        is_filler[:, :context] = False
        is_filler.scatter_(1, query_pos, False)
        filler = torch.randint(vocab_size, (num_examples, seq_len), generator=generator)
        inputs = torch.where(is_filler, filler, inputs)
    return inputs, labels


@dataclass(frozen=True)
class MQARConfig:
    """Parameters of an MQAR task (see :func:`mqar`); validated on construction."""

    seq_len: int
    vocab_size: int
    num_kv_pairs: int
    power_a: float = 0.01
    random_non_queries: bool = True

    def __post_init__(self) -> None:
        _check_mqar(self.seq_len, self.vocab_size, self.num_kv_pairs, self.power_a)

    def generate(self, num_examples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)``, long [num_examples, seq_len]."""
        return mqar(
            num_examples,
            self.seq_len,
            self.vocab_size,
            self.num_kv_pairs,
            power_a=self.power_a,
            seed=seed,
            random_non_queries=self.random_non_queries,
        )
