"""MQAR generator, its config, and make_split."""

import pytest
import torch

from bmojo.tasks import TASKS, MQARConfig, make_split, mqar

IGNORE = -100


def check_mqar(inputs: torch.Tensor, labels: torch.Tensor, vocab_size: int, num_kv_pairs: int) -> None:
    """Every MQAR invariant, row by row."""
    half, context = vocab_size // 2, 2 * num_kv_pairs
    assert inputs.dtype == labels.dtype == torch.long
    assert inputs.shape == labels.shape
    assert ((inputs >= 0) & (inputs < vocab_size)).all()
    for row, lab in zip(inputs.tolist(), labels.tolist()):
        keys, values = row[0:context:2], row[1:context:2]
        assert len(set(keys)) == len(set(values)) == num_kv_pairs
        assert all(1 <= k < half for k in keys) and all(half <= v < vocab_size for v in values)
        value_of = dict(zip(keys, values))
        queried = [i for i, y in enumerate(lab) if y != IGNORE]
        assert len(queried) == num_kv_pairs
        assert sorted(row[i] for i in queried) == sorted(keys)  # every key queried exactly once
        for i in queried:
            assert i >= context and (i - context) % 2 == 0
            assert lab[i] == value_of[row[i]]


def test_two_pairs_fill_every_query_slot():
    # seq_len=8, K=2: context is positions 0..3, the query region has exactly 2 even slots (4 and 6),
    # so both keys are queried there; keys come from {1, 2}, values from {3, 4, 5}.
    inputs, labels = mqar(num_examples=20, seq_len=8, vocab_size=6, num_kv_pairs=2, seed=3, random_non_queries=False)
    for row, lab in zip(inputs.tolist(), labels.tolist()):
        assert sorted(row[0:4:2]) == [1, 2] and set(row[1:4:2]) <= {3, 4, 5}
        assert sorted([row[4], row[6]]) == [1, 2]
        assert row[5] == row[7] == 0
        value_of = {row[0]: row[1], row[2]: row[3]}
        assert lab == [IGNORE] * 4 + [value_of[row[4]], IGNORE, value_of[row[6]], IGNORE]


def test_single_pair():
    # vocab_size=4: the only key is 1, values are 2 or 3; the single query sits right after the pair.
    inputs, labels = mqar(num_examples=10, seq_len=4, vocab_size=4, num_kv_pairs=1, seed=0, random_non_queries=False)
    for row, lab in zip(inputs.tolist(), labels.tolist()):
        assert row[0] == 1 and row[1] in (2, 3) and row[2:] == [1, 0]
        assert lab == [IGNORE, IGNORE, row[1], IGNORE]


def test_random_fill_touches_only_non_query_positions():
    kwargs = dict(num_examples=16, seq_len=64, vocab_size=128, num_kv_pairs=8, seed=5)
    plain_inputs, plain_labels = mqar(**kwargs, random_non_queries=False)
    inputs, labels = mqar(**kwargs, random_non_queries=True)
    assert torch.equal(labels, plain_labels)
    is_query = labels != IGNORE
    is_query[:, :16] = True  # context
    assert torch.equal(inputs[is_query], plain_inputs[is_query])
    assert (plain_inputs[~is_query] == 0).all()
    assert (inputs[~is_query] != 0).float().mean() > 0.9


@pytest.mark.parametrize(
    "seq_len,vocab_size,num_kv_pairs,power_a,seed",
    [(16, 10, 4, 0.01, 0), (64, 64, 8, 0.01, 1), (64, 34, 16, 1.0, 2), (65, 200, 3, 0.3, 3), (256, 8192, 64, 0.01, 4)],
)
def test_invariants(seq_len, vocab_size, num_kv_pairs, power_a, seed):
    inputs, labels = mqar(32, seq_len, vocab_size, num_kv_pairs, power_a=power_a, seed=seed)
    assert inputs.shape == (32, seq_len)
    check_mqar(inputs, labels, vocab_size, num_kv_pairs)


def test_gaps_follow_power_law_drawn_without_replacement():
    # K=2, 3 query slots: P(first key at gap a, second at gap b) = p_a * p_b / (1 - p_a).
    power_a, n = 0.3, 40_000
    p = power_a * torch.arange(1, 4, dtype=torch.float64) ** (power_a - 1)
    p = p / p.sum()
    inputs, labels = mqar(n, 10, 6, 2, power_a=power_a, seed=0, random_non_queries=False)
    gap_of_first = (inputs[:, 4:] == inputs[:, :1]).float().argmax(1) // 2
    gap_of_second = (inputs[:, 4:] == inputs[:, 2:3]).float().argmax(1) // 2
    for a in range(3):
        for b in range(3):
            if a != b:
                freq = ((gap_of_first == a) & (gap_of_second == b)).double().mean()
                assert abs(freq - p[a] * p[b] / (1 - p[a])) < 0.01
    assert (gap_of_first != gap_of_second).all()


def test_small_power_a_puts_queries_near_the_context():
    def mean_query_pos(power_a):
        _, labels = mqar(500, 256, 512, 8, power_a=power_a, seed=0)
        return (labels != IGNORE).nonzero()[:, 1].double().mean()

    assert mean_query_pos(0.01) + 30 < mean_query_pos(1.0)


def test_determinism():
    a = mqar(8, 64, 100, 8, seed=7)
    b = mqar(8, 64, 100, 8, seed=7)
    c = mqar(8, 64, 100, 8, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_config_generates_like_function():
    config = MQARConfig(seq_len=64, vocab_size=100, num_kv_pairs=8, power_a=0.5)
    inputs, labels = config.generate(4, seed=2)
    ref_inputs, ref_labels = mqar(4, 64, 100, 8, power_a=0.5, seed=2)
    assert torch.equal(inputs, ref_inputs) and torch.equal(labels, ref_labels)
    assert TASKS["mqar"] is mqar


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(seq_len=128, vocab_size=8192, num_kv_pairs=40),
            r"num_kv_pairs=40 needs seq_len >= 4\*num_kv_pairs=160, got 128",
        ),
        (
            dict(seq_len=128, vocab_size=32, num_kv_pairs=16),
            r"vocab_size=32 too small: keys and values need num_kv_pairs=16",
        ),
        (dict(seq_len=128, vocab_size=33, num_kv_pairs=16), r"need vocab_size >= 2\*num_kv_pairs\+2=34"),
        (dict(seq_len=64, vocab_size=64, num_kv_pairs=0), r"num_kv_pairs must be >= 1, got 0"),
        (dict(seq_len=64, vocab_size=64, num_kv_pairs=4, power_a=0.0), r"power_a must be > 0, got 0.0"),
        (dict(seq_len=64, vocab_size=64, num_kv_pairs=4, num_examples=0), r"num_examples must be >= 1, got 0"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mqar(**{"num_examples": 2, **kwargs})


def test_config_validates_on_construction():
    with pytest.raises(ValueError, match=r"needs seq_len >= 4\*num_kv_pairs=64, got 32"):
        MQARConfig(seq_len=32, vocab_size=256, num_kv_pairs=16)


def test_make_split_shares_no_sequence():
    params = dict(seq_len=16, vocab_size=12, num_kv_pairs=2, random_non_queries=False)
    x_train, y_train, x_test, y_test = make_split(mqar, 300, 100, seed=0, **params)
    assert x_train.shape == y_train.shape == (300, 16) and x_test.shape == y_test.shape == (100, 16)
    train_rows = set(map(tuple, x_train.tolist()))
    assert not train_rows & set(map(tuple, x_test.tolist()))
    check_mqar(x_test, y_test, 12, 2)
    again = make_split(mqar, 300, 100, seed=0, **params)
    assert all(torch.equal(u, v) for u, v in zip(again, (x_train, y_train, x_test, y_test)))


def test_make_split_tops_up_dropped_rows():
    # Only two sequences exist ([1, 2, 1, 0] and [1, 3, 1, 0]); one train row holds one of them, so
    # every test row must be the other, after dropping roughly half of each drawn batch.
    params = dict(seq_len=4, vocab_size=4, num_kv_pairs=1, random_non_queries=False)
    x_train, _, x_test, y_test = make_split(mqar, 1, 40, seed=0, **params)
    assert x_test.shape == (40, 4)
    assert (x_test != x_train).any(dim=1).all()
    assert (x_test == x_test[0]).all() and (y_test[:, 2] == x_test[:, 1]).all()
    with pytest.raises(ValueError, match="could not draw num_test=5 test sequences absent from the train set"):
        make_split(mqar, 200, 5, seed=0, **params)


def test_make_split_test_params():
    params = dict(seq_len=32, vocab_size=64, num_kv_pairs=4)
    x_train, _, x_test, y_test = make_split(mqar, 50, 50, 0, test_params={"random_non_queries": False}, **params)
    assert (x_train[:, 8:] != 0).float().mean() > 0.9
    assert ((x_test[:, 8:] == 0) | (y_test[:, 8:] != IGNORE)).all()
    with pytest.raises(ValueError, match="num_test must be >= 1, got 0"):
        make_split(mqar, 10, 0, 0, **params)
