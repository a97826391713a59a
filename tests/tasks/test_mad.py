"""MAD tasks: in-context recall (plain, noisy, fuzzy) and selective copying, plus the task registry."""

import pytest
import torch

from bmojo.tasks import (
    TASKS,
    fuzzy_in_context_recall,
    in_context_recall,
    make_split,
    noisy_in_context_recall,
    selective_copying,
)

IGNORE = -100


def check_recall(inputs: torch.Tensor, labels: torch.Tensor, vocab_size: int, noise_vocab_size: int) -> list[int]:
    """In-context-recall invariants; returns the number of noise pairs per row."""
    num_tokens = vocab_size - noise_vocab_size
    num_keys = num_tokens // 2
    assert inputs.dtype == labels.dtype == torch.long and inputs.shape == labels.shape
    noise_pairs = []
    for row, lab in zip(inputs.tolist(), labels.tolist()):
        value_of, num_noise = {}, 0
        assert lab[1::2] == [IGNORE] * (len(row) // 2)
        for j in range(0, len(row), 2):
            key, value = row[j], row[j + 1]
            if key >= num_tokens:  # noise pair
                assert num_tokens <= value < vocab_size and j < len(row) - 2 and lab[j] == IGNORE
                num_noise += 1
                continue
            assert 0 <= key < num_keys <= value < num_tokens
            repeated = key in value_of
            assert value_of.setdefault(key, value) == value  # one value per key
            assert lab[j] == (value if repeated else IGNORE)
        assert lab[-2] == row[-1]  # the final pair is always a scored query
        noise_pairs.append(num_noise)
    return noise_pairs


def test_in_context_recall_smallest_case():
    # vocab_size=2: key 0, value 1; seq_len=4: one context pair and the query pair.
    for seed in range(3):
        inputs, labels = in_context_recall(3, seq_len=4, vocab_size=2, seed=seed)
        assert inputs.tolist() == [[0, 1, 0, 1]] * 3
        assert labels.tolist() == [[IGNORE, IGNORE, 1, IGNORE]] * 3


def test_noisy_in_context_recall_smallest_case():
    # key 0, value 1, noise token 2; two context pairs, at most one of them noise, then the query.
    inputs, labels = noisy_in_context_recall(200, seq_len=6, vocab_size=3, seed=0, noise_vocab_size=1, frac_noise=0.5)
    expected = {
        (0, 1, 0, 1, 0, 1): (IGNORE, IGNORE, 1, IGNORE, 1, IGNORE),
        (2, 2, 0, 1, 0, 1): (IGNORE, IGNORE, IGNORE, IGNORE, 1, IGNORE),
        (0, 1, 2, 2, 0, 1): (IGNORE, IGNORE, IGNORE, IGNORE, 1, IGNORE),
    }
    rows = list(zip(map(tuple, inputs.tolist()), map(tuple, labels.tolist())))
    assert all(expected[row] == lab for row, lab in rows)
    assert {row for row, _ in rows} == set(expected)


@pytest.mark.parametrize(
    "seq_len,vocab_size,noise_vocab_size,frac_noise,seed",
    [(128, 16, 0, 0.0, 0), (64, 8, 0, 0.0, 1), (128, 32, 16, 0.2, 2), (256, 48, 16, 0.8, 3), (32, 5, 1, 0.5, 4)],
)
def test_in_context_recall_invariants(seq_len, vocab_size, noise_vocab_size, frac_noise, seed):
    inputs, labels = in_context_recall(
        24, seq_len, vocab_size, seed, noise_vocab_size=noise_vocab_size, frac_noise=frac_noise
    )
    assert inputs.shape == (24, seq_len)
    noise_pairs = check_recall(inputs, labels, vocab_size, noise_vocab_size)
    assert all(n < seq_len // 2 - 1 for n in noise_pairs)  # one context pair is always kept
    if frac_noise == 0:
        assert noise_pairs == [0] * 24


def test_noise_fraction():
    inputs, labels = noisy_in_context_recall(400, seed=0, frac_noise=0.4)  # MAD defaults otherwise
    num_context_pairs = 128 // 2 - 1
    frac = sum(check_recall(inputs, labels, 32, 16)) / (400 * num_context_pairs)
    # one of the context pairs is forced to be a key-value pair
    assert abs(frac - 0.4 * (num_context_pairs - 1) / num_context_pairs) < 0.01


def test_recall_defaults_follow_mad_baselines():
    inputs, _ = in_context_recall(64)
    assert inputs.shape == (64, 128) and inputs.max() < 16
    inputs, _ = noisy_in_context_recall(64)
    assert inputs.shape == (64, 128) and inputs.max() == 31 and ((inputs >= 16).float().mean() > 0.1)
    inputs, _ = fuzzy_in_context_recall(64)
    assert inputs.shape == (64, 128) and inputs.max() == 15
    inputs, _ = selective_copying(64)
    assert inputs.shape == (64, 256) and inputs.max() == 15


def parse_fuzzy(full: list[int], vocab_size: int, noise_vocab_size: int):
    """Split a full fuzzy row (inputs plus the final token) into key/value motif pairs.

    Returns ``[(key, value, value_start)]`` and checks the layout: leading pads, then noise runs
    and key runs each followed by a value run.
    """
    pad, num_tokens = vocab_size - 1, vocab_size - 1 - noise_vocab_size
    num_keys = num_tokens // 2
    kind = ["pad" if t == pad else "noise" if t >= num_tokens else "key" if t < num_keys else "value" for t in full]
    runs, start = [], 0
    for i in range(1, len(full) + 1):
        if i == len(full) or kind[i] != kind[start]:
            runs.append((kind[start], start, i))
            start = i
    assert "pad" not in [k for k, _, _ in runs[1:]]
    pairs, r = [], 1 if runs[0][0] == "pad" else 0
    while r < len(runs):
        if runs[r][0] == "noise":
            r += 1
            continue
        (k_kind, k0, k1), (v_kind, v0, v1) = runs[r], runs[r + 1]
        assert (k_kind, v_kind) == ("key", "value")
        pairs.append((tuple(full[k0:k1]), tuple(full[v0:v1]), v0))
        r += 2
    return pairs


def check_fuzzy(inputs, labels, vocab_size, k_motif_size, v_motif_size, noise_vocab_size=0, fixed_key=False):
    """Labels are exactly the values of repeated keys, shifted onto the preceding token."""
    assert inputs.dtype == labels.dtype == torch.long and inputs.shape == labels.shape
    seq_len = inputs.shape[1]
    full_rows = torch.cat([inputs, labels[:, -1:]], dim=1).tolist()
    for full, lab in zip(full_rows, labels.tolist()):
        pairs = parse_fuzzy(full, vocab_size, noise_vocab_size)
        expected, value_of = [IGNORE] * seq_len, {}
        for key, value, v0 in pairs:
            assert 1 <= len(key) <= k_motif_size and 1 <= len(value) <= v_motif_size
            assert len(set(key)) == len(key) and len(set(value)) == len(value)
            assert not fixed_key or len(key) == k_motif_size
            if key in value_of:
                assert value_of[key] == value
                expected[v0 - 1 : v0 - 1 + len(value)] = value
            value_of[key] = value
        assert pairs[-1][0] in [key for key, _, _ in pairs[:-1]]  # the final query is answerable
        assert pairs[-1][2] + len(pairs[-1][1]) == seq_len + 1  # and ends the row
        assert lab == expected


def test_fuzzy_smallest_case():
    # vocab_size=4: pad 3, key 0, values {1, 2}; seq_len=6 leaves room for the probe pair only,
    # so every row is [pad, pad, pad, 0, v, 0] and the query is scored with v.
    inputs, labels = fuzzy_in_context_recall(20, seq_len=6, vocab_size=4, seed=1, k_motif_size=1, v_motif_size=1)
    for row, lab in zip(inputs.tolist(), labels.tolist()):
        assert row[:4] == [3, 3, 3, 0] and row[4] in (1, 2) and row[5] == 0
        assert lab == [IGNORE] * 5 + [row[4]]


@pytest.mark.parametrize(
    "seq_len,vocab_size,k,v,noise_vocab_size,frac_noise,seed",
    [(128, 16, 3, 3, 0, 0.0, 0), (64, 8, 2, 1, 0, 0.0, 1), (96, 24, 2, 3, 6, 0.3, 2), (256, 64, 3, 3, 0, 0.0, 3)],
)
def test_fuzzy_invariants(seq_len, vocab_size, k, v, noise_vocab_size, frac_noise, seed):
    kwargs = dict(k_motif_size=k, v_motif_size=v, noise_vocab_size=noise_vocab_size, frac_noise=frac_noise)
    inputs, labels = fuzzy_in_context_recall(24, seq_len, vocab_size, seed, **kwargs)
    assert inputs.shape == (24, seq_len)
    check_fuzzy(inputs, labels, vocab_size, k, v, noise_vocab_size)


def test_fuzzy_motif_sizes():
    inputs, labels = fuzzy_in_context_recall(24, seed=0)
    sizes = {
        (len(key), len(value))
        for row in torch.cat([inputs, labels[:, -1:]], 1).tolist()
        for key, value, _ in parse_fuzzy(row, 16, 0)
    }
    assert sizes == {(a, b) for a in (1, 2, 3) for b in (1, 2, 3)}
    inputs, labels = fuzzy_in_context_recall(24, seed=0, fixed_key_motif_size=True)
    check_fuzzy(inputs, labels, 16, 3, 3, fixed_key=True)


def test_selective_copying_smallest_case():
    # vocab_size=3: data token 0, blank 1, copy 2; seq_len=4 with one token: one blank before it.
    inputs, labels = selective_copying(2, seq_len=4, vocab_size=3, seed=0, num_tokens_to_copy=1)
    assert inputs.tolist() == [[1, 0, 2, 1]] * 2
    assert labels.tolist() == [[IGNORE, IGNORE, IGNORE, 0]] * 2


@pytest.mark.parametrize(
    "seq_len,vocab_size,num_tokens_to_copy,seed", [(256, 16, 16, 0), (40, 5, 8, 1), (64, 128, 31, 2)]
)
def test_selective_copying_invariants(seq_len, vocab_size, num_tokens_to_copy, seed):
    inputs, labels = selective_copying(32, seq_len, vocab_size, seed, num_tokens_to_copy=num_tokens_to_copy)
    assert inputs.shape == labels.shape == (32, seq_len) and inputs.dtype == labels.dtype == torch.long
    blank, copy, k = vocab_size - 2, vocab_size - 1, num_tokens_to_copy
    for row, lab in zip(inputs.tolist(), labels.tolist()):
        region = row[: seq_len - k - 1]
        data = [t for t in region if t != blank]
        assert all(0 <= t < blank for t in data) and region[-1] != blank
        assert row[seq_len - k - 1 :] == [copy] + [blank] * k
        assert lab == [IGNORE] * (seq_len - k) + data


def test_selective_copying_blank_placement():
    # each blank precedes a uniformly chosen data token: on average (j+1)/k of them precede token j
    k, num_blanks = 4, 40
    inputs, _ = selective_copying(2000, 2 * k + 1 + num_blanks, 16, 0, num_tokens_to_copy=k)
    data_pos = (inputs[:, : k + num_blanks] != 14).nonzero()[:, 1].view(2000, k).double()
    blanks_before = data_pos - torch.arange(k)
    assert torch.allclose(blanks_before.mean(0), torch.arange(1, k + 1, dtype=torch.float64) * num_blanks / k, atol=0.5)


@pytest.mark.parametrize(
    "name", ["in_context_recall", "noisy_in_context_recall", "fuzzy_in_context_recall", "selective_copying"]
)
def test_determinism(name):
    fn = TASKS[name]
    a, b, c = fn(8, seed=3), fn(8, seed=3), fn(8, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_registry_common_call():
    assert set(TASKS) == {
        "mqar",
        "in_context_recall",
        "noisy_in_context_recall",
        "fuzzy_in_context_recall",
        "selective_copying",
    }
    for name, fn in TASKS.items():
        extra = {"num_kv_pairs": 4} if name == "mqar" else {}
        inputs, labels = fn(num_examples=3, seq_len=64, vocab_size=32, seed=0, **extra)
        assert inputs.shape == labels.shape == (3, 64) and inputs.dtype == labels.dtype == torch.long
        assert ((inputs >= 0) & (inputs < 32)).all()
        assert ((labels == IGNORE) | ((labels >= 0) & (labels < 32))).all()
        assert (labels != IGNORE).any(dim=1).all()


def test_make_split_mad():
    x_train, _, x_test, y_test = make_split(
        fuzzy_in_context_recall, 64, 64, 0, test_params={"fixed_key_motif_size": True}, seq_len=64, vocab_size=16
    )
    assert not set(map(tuple, x_train.tolist())) & set(map(tuple, x_test.tolist()))
    check_fuzzy(x_test, y_test, 16, 3, 3, fixed_key=True)
    # in_context_recall with seq_len=4, vocab_size=6 has 9 sequences; the train set holds some of them
    x_train, _, x_test, _ = make_split(in_context_recall, 4, 50, 1, seq_len=4, vocab_size=6)
    assert x_test.shape == (50, 4)
    assert not set(map(tuple, x_train.tolist())) & set(map(tuple, x_test.tolist()))


@pytest.mark.parametrize(
    "fn,kwargs,message",
    [
        (in_context_recall, dict(seq_len=127), r"seq_len must be even \(key-value pairs\), got 127"),
        (in_context_recall, dict(seq_len=2), r"seq_len must be >= 4, got 2"),
        (in_context_recall, dict(num_examples=0), r"num_examples must be >= 1, got 0"),
        (in_context_recall, dict(vocab_size=1), r"vocab_size=1 too small: noise_vocab_size=0 leaves 1 tokens"),
        (
            noisy_in_context_recall,
            dict(vocab_size=17),
            r"vocab_size=17 too small: .* need vocab_size >= noise_vocab_size\+2=18",
        ),
        (noisy_in_context_recall, dict(frac_noise=1.0), r"frac_noise must be in \[0, 1\), got 1.0"),
        (noisy_in_context_recall, dict(frac_noise=-0.1), r"frac_noise must be in \[0, 1\)"),
        (
            noisy_in_context_recall,
            dict(noise_vocab_size=0),
            r"noise_vocab_size must be >= 1 when frac_noise > 0, got 0",
        ),
        (in_context_recall, dict(noise_vocab_size=-1), r"noise_vocab_size must be >= 0, got -1"),
        (fuzzy_in_context_recall, dict(seq_len=17), r"need seq_len >= 3\*\(k_motif_size\+v_motif_size\)=18, got 17"),
        (
            fuzzy_in_context_recall,
            dict(vocab_size=6),
            r"vocab_size=6 too small: key motifs need k_motif_size=3 .* need vocab_size >= 7",
        ),
        (
            fuzzy_in_context_recall,
            dict(vocab_size=7, v_motif_size=4),
            r"vocab_size=7 too small: .* need vocab_size >= 8",
        ),
        (fuzzy_in_context_recall, dict(k_motif_size=0), r"k_motif_size must be >= 1, got 0"),
        (fuzzy_in_context_recall, dict(v_motif_size=0), r"v_motif_size must be >= 1, got 0"),
        (fuzzy_in_context_recall, dict(frac_noise=0.5), r"noise_vocab_size must be >= 1 when frac_noise > 0"),
        (
            selective_copying,
            dict(seq_len=33),
            r"num_tokens_to_copy=16 needs seq_len >= 2\*num_tokens_to_copy\+2=34, got 33",
        ),
        (
            selective_copying,
            dict(vocab_size=2),
            r"vocab_size must be >= 3 \(blank, copy and at least one data token\), got 2",
        ),
        (selective_copying, dict(num_tokens_to_copy=0), r"num_tokens_to_copy must be >= 1, got 0"),
    ],
)
def test_bad_parameters(fn, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fn(**{"num_examples": 2, **kwargs})
