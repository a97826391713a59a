"""Eidetic selection against a brute-force loop, and the innovation score against its formula."""

import pytest
import torch

from bmojo.layers.eidetic import (
    EideticMemory,
    chunk_memories,
    insert_slot,
    memory_before,
    merge_topk,
    position_hash,
)


def brute_force_memory(scores: torch.Tensor, window: int, chunk: int, k: int, j: int) -> list[list[int]]:
    """Chunk j's memory: the k best positions < j*chunk - window by (score desc, position asc)."""
    out = []
    for row in scores.tolist():
        limit = max(0, j * chunk - window)
        ranked = sorted(range(min(limit, len(row))), key=lambda p: (-row[p], p))[:k]
        out.append(ranked + [-1] * (k - len(ranked)))
    return out


@pytest.mark.parametrize("length,window,chunk,k", [(1, 1, 1, 1), (37, 4, 4, 3), (50, 8, 5, 6), (64, 3, 8, 10)])
def test_chunk_memories_match_brute_force(length, window, chunk, k):
    g = torch.Generator().manual_seed(length)
    scores = torch.randint(0, 6, (3, length), generator=g).float()  # many ties
    n_chunks = -(-length // chunk) + 1
    pos, (stage_score, stage_pos) = chunk_memories(scores, window, chunk, k, n_chunks)
    for j in range(n_chunks):
        assert pos[:, j].tolist() == brute_force_memory(scores, window, chunk, k, j)
    final = [sorted(range(max(0, length - window)), key=lambda p: (-row[p], p))[:k] for row in scores.tolist()]
    assert stage_pos.tolist() == [f + [-1] * (k - len(f)) for f in final]
    assert torch.isinf(stage_score[stage_pos < 0]).all()


@pytest.mark.parametrize("k", [1, 4, 40])
def test_memory_before_each_rows_limit_keeps_the_best_positions_below_it(k):
    """Rows ending at different positions (limits 0, 1, 13 and 30, many tied scores): each row's memory is the ``k``
    best of its positions below its limit by (score desc, position asc), as ``chunk_memories``' running memory
    (``k`` above the positions too)."""
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 4, (4, 30), generator=g).float()
    limits = torch.tensor([0, 1, 13, 30])
    score, pos = memory_before(scores, limits, k)
    for row, limit in enumerate(limits.tolist()):
        best = sorted(range(limit), key=lambda p: (-scores[row, p].item(), p))[:k]
        assert pos[row].tolist() == best + [-1] * (k - len(best))
    assert torch.isinf(score[pos < 0]).all() and torch.equal(
        score[pos >= 0], scores.gather(1, pos.clamp(min=0))[pos >= 0]
    )
    _, (_, running) = chunk_memories(scores, 0, 1, k, 1)
    assert torch.equal(memory_before(scores, torch.full((4,), 30), k)[1], running)


def test_merge_topk_one_at_a_time_equals_all_at_once():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (2, 30), generator=g).float()
    positions = torch.arange(30).expand(2, 30)
    ms, mp = torch.full((2, 5), float("-inf")), torch.full((2, 5), -1)
    for t in range(30):
        ms, mp, _ = merge_topk(ms, mp, scores[:, t : t + 1], positions[:, t : t + 1], 5)
    _, all_pos, _ = merge_topk(torch.full((2, 5), float("-inf")), torch.full((2, 5), -1), scores, positions, 5)
    assert mp.tolist() == all_pos.tolist()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_insert_slot_one_at_a_time_keeps_what_merge_topk_keeps(k):
    """Decoding's in-place insertion (unsorted memory, many tied scores, a shuffled start) keeps the same set of
    positions as merge_topk over all candidates at once, ties going to the earlier position."""
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 4, (3, 40), generator=g).float()
    positions = torch.arange(40).expand(3, 40)
    ms, mp, _ = merge_topk(
        torch.full((3, k), float("-inf")), torch.full((3, k), -1), scores[:, :10], positions[:, :10], k
    )
    perm = torch.randperm(k, generator=g)
    ms, mp = ms[:, perm].clone(), mp[:, perm].clone()
    for t in range(10, 40):
        at, enter = insert_slot(ms, mp, scores[:, t : t + 1])
        ms.scatter_(1, at, torch.where(enter, scores[:, t : t + 1], ms.gather(1, at)))
        mp.scatter_(1, at, torch.where(enter, positions[:, t : t + 1], mp.gather(1, at)))
        empty = (torch.full((3, k), float("-inf")), torch.full((3, k), -1))
        _, kept, _ = merge_topk(*empty, scores[:, : t + 1], positions[:, : t + 1], k)
        assert mp.sort(1).values.tolist() == kept.sort(1).values.tolist(), t


def test_innovation_score_formula_and_aux_loss():
    torch.manual_seed(0)
    mem = EideticMemory(hidden_size=12, size=4, window=4, chunk_size=4, selection="innovation")
    h, f_prev = torch.randn(2, 7, 12), torch.randn(2, 7, 12)
    scores, aux = mem.score(h, f_prev, torch.arange(7))
    target = h / h.pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float32).eps).sqrt()
    expected = (target - f_prev @ mem.predictor.weight.T).pow(2).sum(-1) / 12
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux, expected.mean(), atol=1e-5, rtol=1e-5)
    aux.backward()
    assert mem.predictor.weight.grad is not None and not scores.requires_grad


def test_recency_and_random_scores():
    pos = torch.arange(100)
    rec = EideticMemory(8, 2, 4, 4, "recency").score(torch.zeros(1, 100, 8), torch.zeros(1, 100, 8), pos)[0]
    assert rec[0].tolist() == pos.float().tolist()
    r = position_hash(pos, seed=3)
    assert ((r >= 0) & (r < 1)).all() and len(set(r.tolist())) == 100
    assert torch.equal(r, position_hash(pos, seed=3)) and not torch.equal(r, position_hash(pos, seed=4))


def test_bad_selection_and_sizes_raise():
    with pytest.raises(ValueError, match="unknown selection"):
        EideticMemory(8, 2, 4, 4, "lru")
    with pytest.raises(ValueError, match="eidetic_size"):
        EideticMemory(8, -1, 4, 4, "recency")
    with pytest.raises(ValueError, match="chunk_size"):
        EideticMemory(8, 1, 4, 0, "recency")
