"""The store's tests again with its index in the helper process (``StorageConfig(process=True)``), and the helper's
own cases: searches in flight from several threads, a mailbox that grows, errors raised in the helper, a helper
that dies, and a helper that ends with its parent."""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")
if os.name != "posix":
    pytest.skip("the helper process needs POSIX", allow_module_level=True)

from test_storage import (  # noqa: E402, F401 - collected again here, run with the index in the helper
    HD,
    HKV,
    H,
    filled_store,
    test_add_candidates_writes_those_not_negative_or_skipped,
    test_approximate_index_past_threshold_recalls_brute_force,
    test_approximate_index_with_tail_of_recent_rows_and_merges,
    test_concurrent_writers_and_readers_lose_no_acknowledged_insert,
    test_corrupt_file_raises_error_naming_it_and_changes_nothing,
    test_exact_search_equals_brute_force_per_sequence_and_head,
    test_model_decode_equals_in_batch_forward_and_state_stays_constant,
    test_model_save_load_with_storage_and_corrupt_store,
    test_recurrent_with_flush_equals_in_batch_emulation,
    test_retrieve_async_gives_what_retrieve_gives,
    test_retrieve_gives_each_query_head_the_top_keys_of_its_kv_head,
    test_retrieve_merges_graph_and_tail_into_the_top_r,
    test_save_load_round_trip_gives_identical_retrieval,
    test_writes_wait_for_a_full_batch_and_flush_hands_over_the_rest,
)

from bmojo.layers import storage_process  # noqa: E402
from bmojo.layers.storage import StorageConfig, _as_tensors  # noqa: E402
from bmojo.layers.storage_index import Index  # noqa: E402


@pytest.fixture(autouse=True)
def index_in_helper_process(monkeypatch):
    """Every store made in these tests keeps its index in the helper process."""
    checks = StorageConfig.__post_init__

    def in_process(self: StorageConfig) -> None:
        checks(self)
        self.process = True

    monkeypatch.setattr(StorageConfig, "__post_init__", in_process)


def test_index_lives_in_the_helper():
    store, _ = filled_store({0: 10})
    assert isinstance(store._index, storage_process.RemoteIndex)
    assert store._index.helper.process.poll() is None


def test_searches_from_threads_and_a_growing_mailbox_match_a_local_index():
    """Searches of several shapes (the mailbox grows) from several threads at once (one goes through the mailbox,
    the others through the call channel) give what a local index of the same rows gives."""
    data = {0: 300, 1: 40}
    store, _ = filled_store(data)
    local = Index(HKV, HD, store.config)
    for seq, n in data.items():
        local.apply(np.full(n, seq), *store.entries(seq))
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        try:
            for i in range(30):
                b, m = 1 + i % 2, 1 + (seed + 7 * i) % 40
                q = torch.randn(b, H, m, HD, generator=g)
                ids = [i % 2, 1 - i % 2][:b]
                want = _as_tensors(q, local.found(ids, store._queries(q), 5))
                for got, w in zip(store.retrieve_async(ids, q, 5).result(), want):
                    torch.testing.assert_close(got, w, atol=0, rtol=0)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_an_error_in_the_helper_is_raised_here_and_the_store_goes_on():
    store, _ = filled_store({0: 20})
    wrong = torch.randn(1, H, 1, HD + 1)  # queries of the wrong width: faiss refuses them in the helper
    with pytest.raises(Exception):  # noqa: B017 - whatever the helper raised
        store.retrieve_async([0], wrong, 3).result()
    with pytest.raises(Exception):  # noqa: B017
        store.retrieve([0], wrong, 3)
    keys, _, valid = store.retrieve_async([0], torch.randn(1, H, 1, HD), 3).result()
    assert valid.all() and keys.shape == (1, H, 1, 3, HD)


def test_a_dead_helper_gives_a_clear_error_and_a_new_store_starts_a_new_one():
    store, _ = filled_store({0: 20})
    old = store._index.helper
    old.process.kill()
    old.process.wait()
    try:
        with pytest.raises(storage_process.HelperError, match="helper process"):
            store.count(0)
        with pytest.raises(storage_process.HelperError, match="helper process"):
            store.retrieve_async([0], torch.randn(1, H, 1, HD), 3).result()
    finally:
        storage_process.helper.cache_clear()
    fresh, _ = filled_store({0: 20})
    assert fresh._index.helper is not old and fresh.count(0) == 20


def test_helper_ends_with_its_parent_and_leaves_nothing_behind():
    script = textwrap.dedent(
        """
        import numpy as np, torch
        from bmojo.layers.storage import StorageConfig, VectorStore
        store = VectorStore(8, 2, StorageConfig(process=True))
        store.add(np.zeros(3), np.arange(3), np.ones((3, 2, 8)), np.ones((3, 2, 8)))
        store.flush()
        assert store.retrieve_async([0], torch.randn(1, 4, 1, 8), 2).result()[2].all()
        print(store._index.helper.process.pid)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "leaked" not in done.stderr and "Warning" not in done.stderr, done.stderr
    pid = int(done.stdout.split()[-1])
    for _ in range(100):  # the helper sees its sockets close and exits
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        threading.Event().wait(0.05)
    else:
        pytest.fail(f"helper {pid} still runs after its parent exited")
