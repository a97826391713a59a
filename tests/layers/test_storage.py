"""Long-term storage: the vector store against brute force, concurrency, persistence, and the mixer's use of it."""

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from bmojo import BMojoCache, BMojoConfig, BMojoForCausalLM
from bmojo.layers import BMojoMixer, MixerState
from bmojo.layers.storage import (
    StorageConfig,
    StorageFileError,
    VectorStore,
    _writer,
    store_membership,
)

D, H, HKV, HD = 32, 4, 2, 8


def rows(n: int, seed: int, heads: int = HKV, dim: int = HD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        np.arange(n),
        rng.standard_normal((n, heads, dim)).astype(np.float32),
        rng.standard_normal((n, heads, dim)).astype(np.float32),
    )


def brute_force(keys: np.ndarray, queries: np.ndarray, r: int) -> np.ndarray:
    """Row indices of the ``r`` largest inner products, ``keys [n, d]``, ``queries [m, d]`` -> ``[m, r]``."""
    return np.argsort(-(queries @ keys.T), axis=1, kind="stable")[:, :r]


def filled_store(sizes: dict[int, int], **kw) -> tuple[VectorStore, dict[int, tuple]]:
    store = VectorStore(HD, HKV, StorageConfig(**kw))
    data = {}
    for seq, n in sizes.items():
        pos, k, v = rows(n, seed=seq)
        store.add(np.full(n, seq), pos * 10 + seq, k, v)
        data[seq] = (pos * 10 + seq, k, v)
    store.flush()
    return store, data


# ---------------------------------------------------------------- the store
def test_exact_search_equals_brute_force_per_sequence_and_head():
    store, data = filled_store({0: 50, 3: 7, 5: 120})
    assert len(store) == 177 and store.sequences() == [0, 3, 5] and not store.is_approximate(5)
    rng = np.random.default_rng(9)
    for seq, (pos, k, v) in data.items():
        q = rng.standard_normal((HKV, 6, HD)).astype(np.float32)
        scores, got = store.search(seq, q, 10)
        for h in range(HKV):
            want = brute_force(k[:, h], q[h], 10)
            n = min(10, len(pos))
            np.testing.assert_array_equal(got[h, :, :n], want[:, :n])
            assert (got[h, :, n:] == -1).all() and np.isneginf(scores[h, :, n:]).all()
            np.testing.assert_allclose(
                scores[h, :, :n], np.take_along_axis(q[h] @ k[:, h].T, want[:, :n], 1), rtol=1e-5
            )


def test_retrieve_gives_each_query_head_the_top_keys_of_its_kv_head():
    store, data = filled_store({0: 40, 1: 3})
    q = torch.randn(2, H, 5, HD)
    keys, values, valid = store.retrieve([0, 1], q, 4)
    assert keys.shape == (2, H, 5, 4, HD) and valid.shape == (2, H, 5, 4)
    for b, seq in enumerate([0, 1]):
        _, k, v = data[seq]
        for h in range(H):
            kv = h // (H // HKV)
            want = brute_force(k[:, kv], q[b, h].numpy(), 4)
            n = min(4, len(k))
            assert valid[b, h, :, :n].all() and not valid[b, h, :, n:].any()
            torch.testing.assert_close(keys[b, h, :, :n], torch.from_numpy(k[want[:, :n], kv]))
            torch.testing.assert_close(values[b, h, :, :n], torch.from_numpy(v[want[:, :n], kv]))


def test_approximate_index_past_threshold_recalls_brute_force():
    store, data = filled_store({0: 60, 1: 600}, approx_threshold=300)
    assert not store.is_approximate(0) and store.is_approximate(1)
    _, k, _ = data[1]
    q = np.random.default_rng(1).standard_normal((HKV, 50, HD)).astype(np.float32)
    _, got = store.search(1, q, 10)
    recall = np.mean(
        [len(set(got[h, i]) & set(brute_force(k[:, h], q[h], 10)[i])) / 10 for h in range(2) for i in range(50)]
    )
    print("HNSW recall@10", recall)
    assert recall >= 0.9


def test_approximate_index_with_tail_of_recent_rows_and_merges(tmp_path):
    """Past the threshold new rows go to an exact tail, merged into a copy of the graph every 1024 rows."""
    store = VectorStore(HD, HKV, StorageConfig(approx_threshold=200))
    pos, k, v = rows(1500, seed=3)
    for i in range(0, 1500, 50):
        store.add(np.zeros(50), pos[i : i + 50], k[i : i + 50], v[i : i + 50])
    store.flush()
    assert store.is_approximate(0) and len(store) == 1500
    q = np.random.default_rng(4).standard_normal((HKV, 40, HD)).astype(np.float32)
    scores, got = store.search(0, q, 10)
    for h in range(HKV):
        np.testing.assert_allclose(scores[h], np.take_along_axis(q[h] @ k[:, h].T, got[h], 1), rtol=1e-5)
        want = brute_force(k[:, h], q[h], 10)
        recall = np.mean([len(set(got[h, i]) & set(want[i])) / 10 for i in range(40)])
        print("recall@10 with tail", recall)
        assert recall >= 0.9
    assert (got >= 1250).any()  # rows still in the tail (merged into the graph at 1250 = 200 + 1050) are found
    store.save(tmp_path / "s.npz")
    loaded = VectorStore(HD, HKV, StorageConfig(approx_threshold=200))
    loaded.load(tmp_path / "s.npz")
    for a, b in zip(store.search(0, q, 10), loaded.search(0, q, 10)):
        np.testing.assert_array_equal(a, b)


def test_norm_tier_holds_the_largest_norms_and_finds_outlying_keys(tmp_path):
    """Among near-identical background keys, a few large outlying keys: the norm tier (updated as the graph grows,
    rebuilt on load) holds the largest norms, and a query equal to an outlier finds it first, with no row twice."""
    rng = np.random.default_rng(5)
    n = 2600
    k = (1 + 0.01 * rng.standard_normal((n, HKV, HD))).astype(np.float32)
    outliers = rng.choice(n, 6, replace=False)
    k[outliers] = 4 * rng.standard_normal((6, HKV, HD)).astype(np.float32)
    store = VectorStore(HD, HKV, StorageConfig(approx_threshold=1000, norm_tier=16))
    for i in range(0, n, 100):
        store.add(np.zeros(100), np.arange(i, i + 100), k[i : i + 100], k[i : i + 100])
    store.flush()
    shard = store._index.shard(0)
    assert 1000 < shard.indexed < n  # the graph was extended once, rows remain in the exact tail
    norms = np.linalg.norm(k[: shard.indexed], axis=2)
    for h in range(HKV):
        assert set(shard.tier[h]) == set(np.argsort(-norms[:, h])[:16])
    q = np.ascontiguousarray(k[outliers].transpose(1, 0, 2))  # [Hkv, 6, d]
    scores, got = store.search(0, q, 3)
    for h in range(HKV):
        assert (got[h, :, 0] == outliers).all()
        assert all(len(set(row)) == 3 for row in got[h])
        np.testing.assert_allclose(scores[h], np.take_along_axis(q[h] @ k[:, h].T, got[h], 1), rtol=1e-5)
    store.save(tmp_path / "s.npz")
    loaded = VectorStore(HD, HKV, StorageConfig(approx_threshold=1000, norm_tier=16))
    loaded.load(tmp_path / "s.npz")
    for a, b in zip(store.search(0, q, 3), loaded.search(0, q, 3)):
        np.testing.assert_array_equal(np.sort(a, axis=2), np.sort(b, axis=2))
    with pytest.raises(ValueError, match="norm_tier"):
        StorageConfig(norm_tier=-1)


def test_retrieve_merges_graph_and_tail_into_the_top_r():
    """With rows in the exact tail, each query's retrieved keys are the r best of graph and tail (search()'s rows,
    the same as brute force here), in any order."""
    store = VectorStore(HD, HKV, StorageConfig(approx_threshold=400))
    pos, k, v = rows(700, seed=8)
    store.add(np.zeros(400), pos[:400], k[:400], v[:400])
    store.flush()
    store.add(np.zeros(300), pos[400:], k[400:], v[400:])
    store.flush()
    assert store.is_approximate(0)
    q = torch.randn(1, H, 6, HD)
    keys, values, valid = store.retrieve([0], q, 5)
    assert keys.shape == (1, H, 6, 5, HD) and valid.all()
    g = H // HKV
    _, got = store.search(0, q[0].reshape(HKV, g * 6, HD).numpy(), 5)
    assert (got >= 400).any() and (got < 400).any()  # the top 5 come from both graph and tail
    for h in range(H):
        kv = h // g
        for i in range(6):
            want = got[kv, (h % g) * 6 + i]
            order = torch.argsort(keys[0, h, i] @ q[0, h, i], descending=True)
            torch.testing.assert_close(keys[0, h, i, order], torch.from_numpy(k[want, kv]))
            torch.testing.assert_close(values[0, h, i, order], torch.from_numpy(v[want, kv]))


def test_retrieve_async_gives_what_retrieve_gives():
    store, _ = filled_store({0: 300, 1: 20}, approx_threshold=100)
    q = torch.randn(2, H, 1, HD)
    for a, b in zip(store.retrieve_async([1, 0], q, 6).result(), store.retrieve([1, 0], q, 6)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.skipif(sys.platform != "linux", reason="scheduling policy set on Linux only")
def test_background_writer_runs_at_idle_priority():
    """The writer runs only when a core is free: decoding and retrieval threads preempt it as soon as they wake."""
    filled_store({0: 5})
    assert os.sched_getscheduler(_writer(True)[1].native_id) == os.SCHED_IDLE
    assert os.sched_getscheduler(0) != os.SCHED_IDLE


@pytest.mark.skipif(sys.platform != "linux", reason="scheduling policy set on Linux only")
def test_writer_works_where_idle_priority_is_refused(monkeypatch):
    """A sandbox that refuses ``SCHED_IDLE`` leaves the writer at normal priority, still writing."""

    def refuse(*args):
        raise PermissionError("not allowed here")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    _writer.cache_clear()  # a fresh writer thread, started under the refusal
    try:
        store, data = filled_store({0: 5})
        np.testing.assert_array_equal(store.entries(0)[0], data[0][0])
        assert os.sched_getscheduler(_writer(True)[1].native_id) != os.SCHED_IDLE
    finally:
        _writer.cache_clear()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_store_works_in_a_forked_child():
    """A child forked after the writer and retrieval threads started gets threads of its own."""
    store, _ = filled_store({0: 30})
    store.retrieve_async([0], torch.randn(1, H, 1, HD), 3).result()
    pid = os.fork()
    if pid == 0:  # child: write, flush and search without hanging, then report through the exit code
        ok = False
        signal.alarm(30)  # a hang (no writer thread) ends the child with SIGALRM
        try:
            pos, k, v = rows(5, seed=11)
            store.add(np.full(5, 1), pos, k, v)
            store.flush()
            ok = store.count(1) == 5 and store.retrieve_async([1], torch.randn(1, H, 1, HD), 3).result()[2].all()
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_exit_while_the_writer_frees_a_job_does_not_abort():
    """The interpreter exits while the writer frees a job's tensors (torch gives the interpreter lock up and takes it
    back for each): the exit waits for the writer instead of aborting (``terminate called without an active
    exception``, exit code 134)."""
    script = textwrap.dedent(
        """
        import threading, weakref
        import torch
        from bmojo.layers.storage import StorageConfig, VectorStore

        store, freeing = VectorStore(4, 1, StorageConfig(write_batch=1)), threading.Event()

        def candidates(n):
            skip = torch.full((1, 1), -1)
            weakref.finalize(skip, freeing.set)  # freed first of the job's tensors (a tuple frees its last item first)
            parts = [[torch.zeros(1, 1, 1, 4) for _ in range(n)] for _ in range(2)]
            return torch.zeros(1, dtype=torch.long), [torch.full((1, 1), i) for i in range(n)], *parts, skip

        store.add_candidates(*candidates(20000))
        store.flush()  # the writer now waits for the next job, still holding this one
        store.add_candidates(*candidates(1))  # whose arrival frees this one's 60000 tensors on the writer thread
        freeing.wait()  # and the script ends while it does
        """
    )
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "terminate called" not in done.stderr, (done.returncode, done.stderr)


def test_concurrent_writers_and_readers_lose_no_acknowledged_insert():
    store = VectorStore(HD, HKV, StorageConfig(approx_threshold=150))
    n_writers, batches, per = 4, 40, 5
    expected = {}  # (seq, position) -> key, filled by writers after each acknowledged add
    errors = []

    def writer(w: int) -> None:
        rng = np.random.default_rng(w)
        for i in range(batches):
            seq = np.array([w % 2] * per)
            pos = (w * batches + i) * per + np.arange(per)
            k = rng.standard_normal((per, HKV, HD)).astype(np.float32)
            store.add(seq, pos, k, k + 1)
            expected.update({(int(s), int(p)): k[j] for j, (s, p) in enumerate(zip(seq, pos))})

    def reader(stop: threading.Event) -> None:
        q = torch.randn(2, H, 3, HD)
        while not stop.is_set():
            try:
                keys, values, valid = store.retrieve([0, 1], q, 8)
                torch.testing.assert_close(values[valid], keys[valid] + 1)  # rows are never torn
                store.search(0, q[0, ::2].numpy(), 8)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                return

    stop = threading.Event()
    readers = [threading.Thread(target=reader, args=(stop,)) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(w,)) for w in range(n_writers)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    store.flush()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors
    assert len(store) == n_writers * batches * per == len(expected)
    assert store.is_approximate(0) and store.is_approximate(1)
    for seq in (0, 1):
        pos, k, v = store.entries(seq)
        assert len(set(pos.tolist())) == len(pos) == sum(s == seq for s, _ in expected)
        np.testing.assert_array_equal(k, np.stack([expected[(seq, int(p))] for p in pos]))
        np.testing.assert_array_equal(v, k + 1)


@pytest.mark.parametrize("threshold", [100_000, 100])
def test_save_load_round_trip_gives_identical_retrieval(tmp_path, threshold):
    store, _ = filled_store({2: 30, 7: 250}, approx_threshold=threshold)
    path = tmp_path / "sub" / "store.npz"
    store.save(path)
    loaded = VectorStore(HD, HKV, StorageConfig(approx_threshold=threshold))
    loaded.load(path)
    assert loaded.sequences() == [2, 7] and loaded.is_approximate(7) == (threshold == 100)
    for seq in (2, 7):
        for a, b in zip(store.entries(seq), loaded.entries(seq)):
            np.testing.assert_array_equal(a, b)
    q = torch.randn(2, H, 9, HD)
    for a, b in zip(store.retrieve([7, 2], q, 6), loaded.retrieve([7, 2], q, 6)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert loaded.new_sequences(1) == [8]
    assert not list(tmp_path.glob("sub/.*tmp"))  # no temporary file left behind
    loaded.remove([7])
    assert loaded.sequences() == [2] and len(loaded) == 30
    loaded.remove()
    assert len(loaded) == 0


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_dim"])
def test_corrupt_file_raises_error_naming_it_and_changes_nothing(tmp_path, damage):
    store, _ = filled_store({0: 20})
    path = tmp_path / "store.npz"
    if damage == "wrong_dim":
        VectorStore(HD + 1, HKV).save(path)
    else:
        store.save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:100] + b"\x00" * (len(data) - 100))
    target, _ = filled_store({4: 5})
    with pytest.raises(StorageFileError, match=str(path)):
        target.load(path)
    assert target.sequences() == [4] and target.count(4) == 5


def test_bad_input_raises():
    store = VectorStore(HD, HKV)
    with pytest.raises(ValueError, match="keys/values"):
        store.add(np.zeros(3), np.zeros(3), np.zeros((3, HKV, HD + 1)), np.zeros((3, HKV, HD + 1)))
    with pytest.raises(ValueError, match="topk"):
        StorageConfig(topk=0)
    with pytest.raises(ValueError, match="write"):
        StorageConfig(write="some")
    with pytest.raises(ValueError, match="write_batch"):
        StorageConfig(write_batch=0)


def test_writes_wait_for_a_full_batch_and_flush_hands_over_the_rest():
    """Rows reach the writer once ``write_batch`` of them wait (as one job); ``flush`` hands over fewer."""
    store = VectorStore(HD, HKV, StorageConfig(write_batch=5))
    pos, k, v = rows(7, seed=0)
    store.add(np.zeros(3), pos[:3], k[:3], v[:3])
    assert store._submitted == 0 and store.count(0) == 0  # waiting, not yet with the writer
    store.add(np.zeros(2), pos[3:5], k[3:5], v[3:5])
    assert store._submitted == 1  # 5 rows: one job
    store.add(np.zeros(2), pos[5:], k[5:], v[5:])
    store.flush()
    assert store._submitted == 2 and store.count(0) == 7
    got_pos, got_k, _ = store.entries(0)
    np.testing.assert_array_equal(got_pos, pos)
    np.testing.assert_array_equal(got_k, k)


def test_add_candidates_writes_those_not_negative_or_skipped():
    """Of each sequence's candidates (given in parts), exactly those with a position >= 0 that its ``skip`` does
    not hold are written (checked against a loop), beside rows added by ``add`` in the same batch."""
    b, n, s = 3, 6, 2
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(-1, 8, (b, n), generator=g)
    skip = torch.randint(-1, 8, (b, s), generator=g)
    k, v = torch.randn(b, HKV, n, HD, generator=g), torch.randn(b, HKV, n, HD, generator=g)
    store = VectorStore(HD, HKV, StorageConfig(write_batch=1000))
    store.add_candidates(
        torch.tensor([4, 5, 6]), (pos[:, :2], pos[:, 2:]), (k[:, :, :2], k[:, :, 2:]), (v[:, :, :2], v[:, :, 2:]), skip
    )
    store.add(np.array([4]), np.array([99]), np.ones((1, HKV, HD)), np.ones((1, HKV, HD)))
    store.flush()
    for i, seq in enumerate([4, 5, 6]):
        want = [j for j in range(n) if pos[i, j] >= 0 and pos[i, j] not in skip[i].tolist()]
        got_pos, got_k, got_v = store.entries(seq)
        extra = [99] if seq == 4 else []
        np.testing.assert_array_equal(got_pos, pos[i, want].tolist() + extra)
        np.testing.assert_array_equal(got_k[: len(want)], k[i, :, want].transpose(0, 1).numpy())
        np.testing.assert_array_equal(got_v[: len(want)], v[i, :, want].transpose(0, 1).numpy())
    with pytest.raises(ValueError, match="add_candidates expects"):
        store.add_candidates(torch.tensor([4, 5, 6]), (pos[:, :2],), (k,), (v,), skip)


# ---------------------------------------------------------------- the mixer
def make(write: str = "evicted", seed: int = 0, **kw) -> BMojoMixer:
    torch.manual_seed(seed)
    storage = StorageConfig(**{"topk": 2, "write": write, "in_batch": True, **kw})
    return BMojoMixer(
        D, num_heads=H, num_kv_heads=HKV, ssm="mamba2", window=4, eidetic_size=2, chunk_size=3, block_size=4,
        ssm_kwargs=dict(state_size=8, head_dim=16, chunk_size=8), storage=storage,
    ).eval()  # fmt: skip


def naive_memories(scores: list[float], n_chunks: int, w: int, c: int, k: int) -> list[set[int]]:
    return [set(sorted(range(max(0, j * c - w)), key=lambda p: (-scores[p], p))[:k]) for j in range(n_chunks)]


def naive_store(mems: list[set[int]], j: int, w: int, c: int, write: str) -> set[int]:
    if write == "evicted":
        return set().union(*mems[:j]) - mems[j]
    return set(range(max(0, j * c - w))) - mems[j]


@pytest.mark.parametrize("write", ["evicted", "all"])
def test_store_membership_matches_definition(write):
    torch.manual_seed(0)
    length, w, c, k = 31, 5, 3, 3
    scores = torch.randn(2, length)
    from bmojo.layers.eidetic import chunk_memories

    n = length // c + 1
    mem_pos, _ = chunk_memories(scores, w, c, k, n)
    member = store_membership(mem_pos, length, w, c, write)
    for b in range(2):
        mems = naive_memories(scores[b].tolist(), n, w, c, k)
        for j in range(n):
            assert set(member[b, j].nonzero().flatten().tolist()) == naive_store(mems, j, w, c, write), (b, j)


def naive_mixer_with_store(m: BMojoMixer, h: torch.Tensor) -> torch.Tensor:
    """One softmax per query head over [window | fading band | eidetic | its top-r store keys], all by brute force."""
    b, length, _ = h.shape
    pos = torch.arange(length)
    f = m.ssm(h)[0]
    rope = m.attn.rope(pos)
    q = m.attn.queries(h, rope)
    k, v = m.attn.keys_values(h, rope)
    kf, vf = m.attn.keys_values(f, rope)
    g = H // HKV
    k, v, kf, vf = (x.repeat_interleave(g, 1) for x in (k, v, kf, vf))
    w, c, kmem, r = m.window, m.memory.chunk_size, m.memory.size, m.storage.topk
    scores, _ = m.memory.score(h, torch.cat([torch.zeros_like(f[:, :1]), f[:, :-1]], 1), pos)
    logit = (q @ k.transpose(-1, -2)) * HD**-0.5
    logit_f = (q @ kf.transpose(-1, -2)) * HD**-0.5
    out = torch.zeros_like(q)
    for bi in range(b):
        mems = naive_memories(scores[bi].tolist(), length // c + 1, w, c, kmem)
        for hi in range(H):
            for i in range(length):
                j = i // c
                stored = sorted(naive_store(mems, j, w, c, m.storage.write), key=lambda p: -logit[bi, hi, i, p].item())
                raw = [p for p in range(length) if 0 <= i - p < w] + sorted(mems[j]) + stored[:r]
                fad = [p for p in range(length) if w <= i - p < 2 * w]
                s = torch.cat([logit[bi, hi, i, raw], logit_f[bi, hi, i, fad]]).softmax(0)
                out[bi, hi, i] = s @ torch.cat([v[bi, hi, raw], vf[bi, hi, fad]])
    return m.attn.output(out)


@pytest.mark.parametrize("write", ["evicted", "all"])
def test_in_batch_retrieval_matches_naive_union_softmax(write):
    m = make(write)
    h = torch.randn(2, 26, D)
    with torch.no_grad():
        out, _, _ = m(h)
        ref = naive_mixer_with_store(m, h)
        m.storage.in_batch = False
        plain, _, _ = m(h)
    print(write, "max diff", (out - ref).abs().max().item(), "vs no storage", (out - plain).abs().max().item())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert (out - plain).abs().max() > 1e-3  # the store is used


@pytest.mark.parametrize("write", ["evicted", "all"])
@pytest.mark.parametrize("prefill", [1, 5, 9, 13])
@pytest.mark.parametrize("async_retrieval", [True, False])
def test_recurrent_with_flush_equals_in_batch_emulation(write, prefill, async_retrieval):
    """Equal when every write is searchable before the next step: flush after each step (or synchronous writes);
    the same whether steps search on the retrieval thread or inline."""
    m = make(write, synchronous=prefill == 13, async_retrieval=async_retrieval)
    h = torch.randn(2, 30, D)
    with torch.no_grad():
        full, _, _ = m(h)
        state = MixerState()
        outs = [m(h[:, :prefill], state)[0]]
        for t in range(prefill, 30):
            m.store.flush()
            outs.append(m(h[:, t : t + 1], state)[0])
    out = torch.cat(outs, 1)
    print(write, prefill, "max diff", (out - full).abs().max().item())
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-4)
    # the store holds exactly the store of the chunk after the last one: (30 // 3 + 1)
    m.store.flush()
    scores, _ = m.memory.score(h, torch.cat([torch.zeros_like(h[:, :1]), m.ssm(h)[0][:, :-1]], 1), torch.arange(30))
    for b, seq in enumerate(state.store_ids.tolist()):
        mems = naive_memories(scores[b].tolist(), 11, 4, 3, 2)
        assert set(m.store.entries(seq)[0].tolist()) == naive_store(mems, 10, 4, 3, write)


def test_in_batch_gradients_reach_stored_tokens():
    m = make().train()
    h = torch.randn(1, 24, D, requires_grad=True)
    out, _, _ = m(h)
    out[:, -3:].sum().backward()
    m2 = make()
    m2.storage.in_batch = False
    h2 = h.detach().clone().requires_grad_(True)
    m2.load_state_dict(m.state_dict())
    m2.train()(h2)[0][:, -3:].sum().backward()
    assert not torch.allclose(h.grad, h2.grad)  # the store path carries gradient to early tokens


def test_bad_storage_configuration_raises():
    with pytest.raises(ValueError, match="storage needs the eidetic memory"):
        BMojoMixer(D, num_heads=H, ssm="mamba2", window=4, eidetic_size=0, storage=StorageConfig())
    with pytest.raises(ValueError, match="storage needs"):
        BMojoConfig.from_preset("bmojo-f", storage=True)
    with pytest.raises(ValueError, match="storage_write"):
        BMojoConfig.from_preset("bmojo", storage=True, storage_write="some")
    for field in ("storage_ef_search", "storage_write_batch"):
        with pytest.raises(ValueError, match=field):
            BMojoConfig.from_preset("bmojo", storage=True, **{field: 0})
    with pytest.raises(ValueError, match="storage_norm_tier"):
        BMojoConfig.from_preset("bmojo", storage=True, storage_norm_tier=-1)


def test_model_config_reaches_each_layer_store():
    model = tiny(
        storage=True,
        storage_ef_search=200,
        storage_write_batch=7,
        storage_approx_threshold=99,
        storage_async_retrieval=False,
        storage_norm_tier=5,
        storage_process=os.name == "posix",
    )
    for store in model.vector_stores().values():
        cfg = store.config
        got = (cfg.ef_search, cfg.write_batch, cfg.approx_threshold, cfg.async_retrieval, cfg.norm_tier, cfg.process)
        assert got == (200, 7, 99, False, 5, os.name == "posix")


# ---------------------------------------------------------------- the model
def tiny(seed: int = 0, **kw) -> BMojoForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(window_size=4, chunk_size=4, eidetic_size=2, storage_topk=2)
    return BMojoForCausalLM(BMojoConfig.from_preset("bmojo", "tiny", **{**cfg, **kw})).eval()


def decode(model: BMojoForCausalLM, ids: torch.Tensor, prefill: int, cache: BMojoCache | None = None):
    with torch.no_grad():
        out = model(ids[:, :prefill], cache=cache, use_cache=True)
        logits = [out.logits]
        for t in range(prefill, ids.shape[1]):
            model.flush_storage()
            logits.append(model(ids[:, t : t + 1], cache=out.cache, use_cache=True).logits)
    return torch.cat(logits, 1), out.cache


def test_storage_off_or_unused_gives_plain_bmojo_logits():
    plain, stored = tiny(), tiny(storage=True)
    stored.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():  # no cache, no in-batch emulation: the store is not consulted
        torch.testing.assert_close(stored(ids, use_cache=False).logits, plain(ids).logits, atol=0, rtol=0)
    short = ids[:, :9]  # no token has left an eidetic memory yet: the store stays empty
    a, _ = decode(stored, short, 3)
    # the prefill with a store computes the union with its LSE (to merge retrieval), the plain one without
    torch.testing.assert_close(a, decode(plain, short, 3)[0], atol=1e-5, rtol=1e-5)
    assert all(len(s) == 0 for s in stored.vector_stores().values())
    long_a, _ = decode(stored, ids, 3)
    assert sum(len(s) for s in stored.vector_stores().values()) > 0
    assert not torch.allclose(long_a, decode(plain, ids, 3)[0])


def test_model_decode_equals_in_batch_forward_and_state_stays_constant():
    model = tiny(storage=True, storage_in_batch=True, storage_write="all")
    ids = torch.randint(0, 128, (1, 60))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    step, cache = decode(model, ids, 10)
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
    sizes, counts = [], []
    with torch.no_grad():  # streaming: feed a document chunk by chunk
        for _ in range(8):
            model(torch.randint(0, 128, (1, 5)), cache=cache, use_cache=True)
            model.flush_storage()
            sizes.append(cache.nbytes())
            counts.append(sum(len(s) for s in model.vector_stores().values()))
    assert len(set(sizes)) == 1 and counts[-1] > counts[0]  # the store grows, the recurrent state does not
    with pytest.raises(ValueError, match="one sequence id per batch row"):
        model(ids[:, :5].expand(2, -1), cache=BMojoCache(2, store_ids=torch.tensor([0])), use_cache=True)


def test_a_deep_copy_of_a_model_with_storage_holds_its_own_copy_of_the_stores():
    """``copy.deepcopy`` (EMA, ``AveragedModel``) raised on the stores' locks: the copy's stores hold the same rows,
    retrieve the same, and take writes of their own."""
    import copy

    model = tiny(storage=True)
    decode(model, torch.randint(0, 128, (2, 40)), 5)
    twin = copy.deepcopy(model)
    q = torch.randn(2, H, 3, 16)
    for name, store in model.vector_stores().items():
        other = twin.vector_stores()[name]
        assert other is not store and other.sequences() == store.sequences() == [0, 1] and len(other) == len(store)
        for a, b in zip(store.retrieve([0, 1], q, 2), other.retrieve([0, 1], q, 2)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    decode(twin, torch.randint(0, 128, (1, 40)), 2)
    twin.flush_storage()
    assert all(len(twin.vector_stores()[n]) > len(s) for n, s in model.vector_stores().items())


def test_model_save_load_with_storage_and_corrupt_store(tmp_path):
    model = tiny(storage=True)
    ids = torch.randint(0, 128, (2, 40))
    decode(model, ids, 5)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "storage.npz").is_file()
    loaded = BMojoForCausalLM.from_pretrained(tmp_path).eval()
    for name, store in model.vector_stores().items():
        other = loaded.vector_stores()[name]
        assert other.sequences() == store.sequences() == [0, 1]
        q = torch.randn(2, H, 3, 16)
        for a, b in zip(store.retrieve([0, 1], q, 2), other.retrieve([0, 1], q, 2)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    # continuing stored sequences: the same questions see the same memory
    question = torch.randint(0, 128, (2, 6))
    a, _ = decode(model, question, 2, BMojoCache(2, store_ids=torch.tensor([0, 1])))
    b, _ = decode(loaded, question, 2, BMojoCache(2, store_ids=torch.tensor([0, 1])))
    torch.testing.assert_close(a, b, atol=0, rtol=0)

    path = tmp_path / "storage.npz"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(StorageFileError, match="storage.npz.*load_storage=False"):
        BMojoForCausalLM.from_pretrained(tmp_path)
    usable = BMojoForCausalLM.from_pretrained(tmp_path, load_storage=False).eval()
    assert all(len(s) == 0 for s in usable.vector_stores().values())
    with pytest.raises(StorageFileError, match="storage.npz"):
        loaded.load_storage(path)
    assert loaded.vector_stores()["layer_0"].sequences() == [0, 1]
    with torch.no_grad():
        torch.testing.assert_close(usable(ids).logits, model(ids).logits, atol=0, rtol=0)
