"""The four recall/copy tasks of MAD (Poli et al., 2024, "Mechanistic Design and Scaling of Hybrid
Architectures"), following MAD-lab's ``mad/data/instances.py`` and the benchmark baselines in
``configs/tasks/*.yml`` (defaults below). Rows are aligned like MQAR's: ``labels[:, i]`` is the token
to predict after reading ``inputs[:, i]``, -100 where nothing is scored.

As in the MAD benchmark, the recall tasks are the multi-query variants (every repeated key is
scored); MAD's single-query variant (copy-prefix token plus one final query) is not provided. MAD
trains on next-token targets at every position and scores the recall positions; the labels here are
the scored positions only (next-token targets are ``inputs[:, 1:]``).
"""

from __future__ import annotations

import torch

from bmojo.tasks.mqar import (
    _CHUNK_ELEMENTS,
    IGNORE_INDEX,
    _check_at_least,
    _make_generator,
    _sample_without_replacement,
)


def _check_noise(noise_vocab_size: int, frac_noise: float) -> None:
    _check_at_least("noise_vocab_size", noise_vocab_size, 0)
    if not 0 <= frac_noise < 1:
        raise ValueError(f"frac_noise must be in [0, 1), got {frac_noise}")
    if frac_noise > 0 and noise_vocab_size < 1:
        raise ValueError(f"noise_vocab_size must be >= 1 when frac_noise > 0, got {noise_vocab_size}")


def in_context_recall(
    num_examples: int,
    seq_len: int = 128,
    vocab_size: int = 16,
    seed: int = 0,
    *,
    noise_vocab_size: int = 0,
    frac_noise: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAD in-context recall: ``seq_len // 2`` key-value pairs from a per-row random key->value map.

    The ``vocab_size - noise_vocab_size`` recall tokens split into keys (lower half) and values (upper
    half); the top ``noise_vocab_size`` tokens are noise. Each pair draws its key uniformly (with
    repetition) and carries that key's value; the map draws each key's value uniformly, so two keys may
    share a value. Each context pair is replaced, with probability ``frac_noise``, by two uniform noise
    tokens, except one random context pair that is always kept. The last pair repeats a key, uniform
    over the distinct keys shown. The label at a key position is its value when the key appeared in an
    earlier pair (so the last pair is always scored).

    Departures from MAD-lab: MAD returns ``seq_len - 1`` tokens in this mode; here the final value is
    kept as an unlabelled last input so rows are ``seq_len`` long. MAD may pick the final pair as the
    kept one (leaving no context pair); here the kept pair is a context pair.

    Returns ``(inputs, labels)``, long [num_examples, seq_len].
    """
    _check_at_least("num_examples", num_examples, 1)
    _check_noise(noise_vocab_size, frac_noise)
    if seq_len % 2:
        raise ValueError(f"seq_len must be even (key-value pairs), got {seq_len}")
    _check_at_least("seq_len", seq_len, 4)
    num_tokens = vocab_size - noise_vocab_size
    if num_tokens < 2:
        raise ValueError(
            f"vocab_size={vocab_size} too small: noise_vocab_size={noise_vocab_size} leaves {num_tokens} tokens "
            f"for keys and values; need vocab_size >= noise_vocab_size+2={noise_vocab_size + 2}"
        )
    generator = _make_generator(seed)
    n, num_pairs = num_examples, seq_len // 2
    num_keys = num_tokens // 2
    slot = torch.arange(num_pairs).expand(n, -1)

    keys = torch.randint(num_keys, (n, num_pairs), generator=generator)
    kv_map = num_keys + torch.randint(num_tokens - num_keys, (n, num_keys), generator=generator)
    is_noise = torch.zeros(n, num_pairs, dtype=torch.bool)
    if frac_noise > 0:
        is_noise = torch.rand(n, num_pairs, generator=generator) < frac_noise
        is_noise[:, -1] = False
        is_noise[torch.arange(n), torch.randint(num_pairs - 1, (n,), generator=generator)] = False

    # first context slot showing each key; column num_keys collects noise slots
    column = torch.where(is_noise, num_keys, keys)[:, :-1]
    first_seen = torch.full((n, num_keys + 1), num_pairs).scatter_reduce(1, column, slot[:, :-1], "amin")
    shown = first_seen[:, :num_keys] < num_pairs
    score = torch.rand(n, num_keys, generator=generator).masked_fill(~shown, -1.0)
    keys[:, -1] = score.argmax(dim=1)

    values = kv_map.gather(1, keys)
    pairs = torch.stack([keys, values], dim=-1)
    if frac_noise > 0:
        noise = num_tokens + torch.randint(noise_vocab_size, (n, num_pairs, 2), generator=generator)
        pairs = torch.where(is_noise[..., None], noise, pairs)
    scored = ~is_noise & (first_seen.gather(1, keys) < slot)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    labels[:, 0::2] = torch.where(scored, values, IGNORE_INDEX)
    return pairs.reshape(n, seq_len), labels


def noisy_in_context_recall(
    num_examples: int,
    seq_len: int = 128,
    vocab_size: int = 32,
    seed: int = 0,
    *,
    noise_vocab_size: int = 16,
    frac_noise: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAD noisy in-context recall: :func:`in_context_recall` with MAD's noise defaults (``vocab_size``
    includes the ``noise_vocab_size`` noise tokens). Returns long [num_examples, seq_len] twice."""
    return in_context_recall(
        num_examples, seq_len, vocab_size, seed, noise_vocab_size=noise_vocab_size, frac_noise=frac_noise
    )


def _fuzzy_row(
    seq_len: int,
    pad: int,
    max_pair_len: int,
    key_size: list[int],
    value_size: list[int],
    key_motif: list[list[int]],
    value_motif: list[list[int]],
    is_noise: list[bool],
    noise: list[list[int]] | None,
    probe_u: float,
) -> tuple[list[int], list[int]]:
    """One fuzzy-recall row from its pre-drawn randomness; segment 0 is the probe pair."""
    probe_key = tuple(key_motif[0][: key_size[0]])
    probe_value = tuple(value_motif[0][: value_size[0]])
    probe_len = len(probe_key) + len(probe_value)
    budget = seq_len + 1 - max_pair_len - 2 * probe_len  # room for a late probe pair and the final query
    probe_at = int(probe_u * budget)
    tokens: list[int] = []
    targets: list[int] = []
    seen: dict[tuple[int, ...], tuple[int, ...]] = {}

    def add_pair(key: tuple[int, ...], value: tuple[int, ...]) -> None:
        tokens.extend(key + value)
        targets.extend([IGNORE_INDEX] * len(key) + (list(value) if key in seen else [IGNORE_INDEX] * len(value)))
        seen[key] = value

    probe_shown = False
    s = 1
    while len(tokens) < budget:
        if not probe_shown and len(tokens) >= probe_at:
            add_pair(probe_key, probe_value)
            probe_shown = True
            continue
        if is_noise[s]:
            segment = noise[s][: key_size[s] + value_size[s]]
            tokens.extend(segment)
            targets.extend([IGNORE_INDEX] * len(segment))
        else:
            key = tuple(key_motif[s][: key_size[s]])
            if key == probe_key:
                value, probe_shown = probe_value, True
            else:
                value = seen.get(key, tuple(value_motif[s][: value_size[s]]))
            add_pair(key, value)
        s += 1
    if not probe_shown:
        add_pair(probe_key, probe_value)
    add_pair(probe_key, probe_value)
    num_pad = seq_len + 1 - len(tokens)
    tokens = [pad] * num_pad + tokens
    targets = [IGNORE_INDEX] * num_pad + targets
    return tokens[:-1], targets[1:]


def fuzzy_in_context_recall(
    num_examples: int,
    seq_len: int = 128,
    vocab_size: int = 16,
    seed: int = 0,
    *,
    k_motif_size: int = 3,
    v_motif_size: int = 3,
    noise_vocab_size: int = 0,
    frac_noise: float = 0.0,
    fixed_key_motif_size: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAD fuzzy in-context recall: keys and values are motifs of several adjacent tokens.

    Token ``vocab_size - 1`` is padding; the ``noise_vocab_size`` tokens below it are noise; the rest
    split into key (lower half) and value (upper half) tokens. A key motif is 1..``k_motif_size``
    distinct key tokens (always ``k_motif_size`` with ``fixed_key_motif_size``, MAD's test-time
    setting), a value motif 1..``v_motif_size`` distinct value tokens, sizes and tokens uniform. Pairs
    follow each other until the row is nearly full; a repeated key carries its first value, and a pair
    is noise (as many noise tokens) with probability ``frac_noise``. A random probe pair is placed at a
    uniform position in the context and repeated at the end; rows are left-padded to ``seq_len``.
    Scored positions: the last key token and all but the last value token of every repeated pair, with
    the next value token as label (the final query is always scored).

    Departure from MAD-lab: MAD can run out of room before inserting the probe pair, leaving the final
    query unanswerable; here room is reserved, so rows carry at most ``probe length - 1`` more padding.

    Returns ``(inputs, labels)``, long [num_examples, seq_len].
    """
    _check_at_least("num_examples", num_examples, 1)
    _check_at_least("k_motif_size", k_motif_size, 1)
    _check_at_least("v_motif_size", v_motif_size, 1)
    _check_noise(noise_vocab_size, frac_noise)
    max_pair_len = k_motif_size + v_motif_size
    if seq_len < 3 * max_pair_len:
        raise ValueError(
            f"k_motif_size={k_motif_size}, v_motif_size={v_motif_size} need "
            f"seq_len >= 3*(k_motif_size+v_motif_size)={3 * max_pair_len}, got {seq_len}"
        )
    num_tokens = vocab_size - 1 - noise_vocab_size
    num_keys = num_tokens // 2
    num_values = num_tokens - num_keys
    if num_keys < k_motif_size or num_values < v_motif_size:
        need = 1 + noise_vocab_size + max(2 * k_motif_size, 2 * v_motif_size - 1)
        raise ValueError(
            f"vocab_size={vocab_size} too small: key motifs need k_motif_size={k_motif_size} distinct key tokens and "
            f"value motifs v_motif_size={v_motif_size} distinct value tokens (after 1 pad and "
            f"noise_vocab_size={noise_vocab_size} noise tokens); need vocab_size >= {need}"
        )
    generator = _make_generator(seed)
    num_segments = seq_len // 2 + 2  # probe + the most pairs that fit (each >= 2 tokens)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (num_segments * max(num_keys, num_values)))
    inputs, labels = [], []
    for start in range(0, num_examples, rows_per_chunk):
        c = min(rows_per_chunk, num_examples - start)
        shape = (c, num_segments)
        if fixed_key_motif_size:
            key_size = torch.full(shape, k_motif_size)
        else:
            key_size = torch.randint(1, k_motif_size + 1, shape, generator=generator)
        value_size = torch.randint(1, v_motif_size + 1, shape, generator=generator)
        key_motif = _sample_without_replacement(c * num_segments, k_motif_size, num_keys, generator)
        value_motif = num_keys + _sample_without_replacement(c * num_segments, v_motif_size, num_values, generator)
        is_noise = torch.rand(shape, generator=generator) < frac_noise
        noise = None
        if frac_noise > 0:
            noise = num_keys + num_values + torch.randint(noise_vocab_size, (*shape, max_pair_len), generator=generator)
        probe_u = torch.rand(c, generator=generator)
        motifs = (key_motif.view(*shape, k_motif_size), value_motif.view(*shape, v_motif_size))
        draws = [t.tolist() for t in (key_size, value_size, *motifs, is_noise, probe_u)]
        noise_rows = noise.tolist() if noise is not None else [None] * c
        for ks, vs, km, vm, nz, u, nt in zip(*draws, noise_rows, strict=True):
            row_inputs, row_labels = _fuzzy_row(seq_len, vocab_size - 1, max_pair_len, ks, vs, km, vm, nz, nt, u)
            inputs.append(row_inputs)
            labels.append(row_labels)
    return torch.tensor(inputs, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def selective_copying(
    num_examples: int,
    seq_len: int = 256,
    vocab_size: int = 16,
    seed: int = 0,
    *,
    num_tokens_to_copy: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAD selective copying: copy the data tokens scattered among blanks, in order.

    Token ``vocab_size - 1`` is the copy token, ``vocab_size - 2`` the blank; data tokens are uniform
    (with repetition) in ``[0, vocab_size - 2)``. Layout::

        [num_tokens_to_copy data tokens among seq_len - 2*num_tokens_to_copy - 1 blanks] COPY [blank]*num_tokens_to_copy

    As in MAD-lab, each blank goes before a uniformly chosen data token (so the region always ends with
    a data token). The label at the j-th trailing blank is the j-th data token; -100 elsewhere.

    Returns ``(inputs, labels)``, long [num_examples, seq_len].
    """
    _check_at_least("num_examples", num_examples, 1)
    _check_at_least("num_tokens_to_copy", num_tokens_to_copy, 1)
    if seq_len < 2 * num_tokens_to_copy + 2:
        raise ValueError(
            f"num_tokens_to_copy={num_tokens_to_copy} needs seq_len >= 2*num_tokens_to_copy+2="
            f"{2 * num_tokens_to_copy + 2}, got {seq_len}"
        )
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be >= 3 (blank, copy and at least one data token), got {vocab_size}")
    generator = _make_generator(seed)
    n, k = num_examples, num_tokens_to_copy
    num_blanks = seq_len - 2 * k - 1
    blank, copy = vocab_size - 2, vocab_size - 1

    data = torch.randint(vocab_size - 2, (n, k), generator=generator)
    gap = torch.randint(k, (n, num_blanks), generator=generator)
    blanks_before = torch.zeros(n, k, dtype=torch.long).scatter_add_(1, gap, torch.ones_like(gap)).cumsum(dim=1)
    inputs = torch.full((n, seq_len), blank, dtype=torch.long)
    inputs.scatter_(1, torch.arange(k) + blanks_before, data)
    inputs[:, k + num_blanks] = copy
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    labels[:, seq_len - k :] = data
    return inputs, labels
