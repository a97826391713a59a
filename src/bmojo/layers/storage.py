"""Long-term eidetic memory "in storage": a per-layer vector store of keys and values (SPEC section 4).

Which tokens are stored (at chunk granularity, chunk ``j`` starts at ``s = j * c``, ``mem(j)`` is the eidetic
memory of chunk ``j``, see ``layers.eidetic``):

- ``write="evicted"``: ``store(j) = (mem(0) | ... | mem(j-1)) - mem(j)``, the tokens the eidetic memory has dropped;
- ``write="all"``: ``store(j) = {p < s - w} - mem(j)``: every token that has left the window and is not kept in the
  eidetic memory. Tokens enter the store at the chunk boundary where they become eidetic candidates (when they leave
  the window), not two windows later, so that store and eidetic memory partition the tokens beyond the window and
  the recurrent state only buffers one chunk of candidates.

The store is disjoint from the window and the eidetic memory, so attending to it is a fourth key/value set of one
softmax (log-sum-exp merge). Each query head retrieves its own top-``r`` keys by inner product with its rotated query
(the attention logit itself) from the index of its key/value head: with grouped-query attention the keys of each
kv head are stored once and each of the group's query heads searches that index with its own query.

:class:`VectorStore` keeps, per sequence id, rows of ``(position, keys [Hkv, d], values [Hkv, d])`` in an index
(``layers.storage_index``: exact search while small, then HNSW graphs beside an exact search of the newest rows and
of the largest-norm keys). Writes go through a queue to a background thread; searches see the store as of the last
completed write, and :meth:`VectorStore.flush` waits for every write submitted before it.
:func:`in_batch_retrieval` computes the same retrieval exactly over the tokens of the current pass (training, and
the part of a prefill not yet in the store; ``O(L^2)`` in the pass length).

In decoding, each step's search runs while the layer's SSM and window attention run (:meth:`VectorStore.retrieve_async`)
and the retrieved keys join the step's softmax: on a retrieval thread (faiss releases the interpreter lock, but the
thread's numpy and Python between faiss calls take it), or with ``process=True`` in a helper process that holds the
index (``layers.storage_process``), which leaves the decoding process's interpreter lock to the decoding step.

Parallel and recurrent modes agree (to float rounding) when every write is searchable before the next token is
processed (``flush()`` between steps, or ``synchronous=True``) and the sequence's index is still exact; with
asynchronous writes a step may miss the latest chunk's rows, with HNSW it may miss a true top-``r`` key.

Streaming with a model whose config has ``storage=True``::

    cache = BMojoCache(len(model.model.layers))
    for piece in document.split(512, dim=1):      # the store grows; the recurrent state and time per token do not
        model(piece, cache=cache, use_cache=True)  # (the first piece is a parallel prefill, the rest token steps)
    logits = model(question, cache=cache, use_cache=True).logits
    model.save_pretrained("dir")  # weights + storage.npz; BMojoCache(n, store_ids=cache[0].store_ids) reads it again
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import os
import queue
import threading
import zipfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bmojo.atomic import atomic_file
from bmojo.layers.storage_index import FORMAT_VERSION, Entry, Index, StorageFileError, _faiss
from bmojo.layers.storage_process import RemoteIndex, _Answer, idle_priority
from bmojo.ops.attention import masked_softmax

__all__ = ["StorageConfig", "StorageFileError", "VectorStore", "in_batch_retrieval", "load_stores", "save_stores"]

WRITES = ("evicted", "all")
Parts = Sequence[torch.Tensor]  # pieces of one array, concatenated along the candidate axis


@dataclass
class StorageConfig:
    """Settings of a layer's long-term memory.

    ``topk``: keys retrieved per query head (``r``); ``write``: ``evicted | all`` (module docstring); ``in_batch``:
    emulate retrieval exactly in forward passes without a recurrent state (training); ``approx_threshold``: rows per
    sequence from which the index is HNSW; ``hnsw_m``, ``ef_search``: HNSW graph degree and search breadth;
    ``write_batch``: rows gathered by :meth:`VectorStore.add` before they go to the background writer as one job
    (fewer, larger writes keep the writer off most decoding steps; :meth:`VectorStore.flush` hands over the rest);
    ``synchronous``: every write completes before ``add`` returns (deterministic results without ``flush``);
    ``async_retrieval``: decoding steps search on the retrieval thread (:meth:`VectorStore.retrieve_async`) while
    the layer's SSM runs, instead of inline; ``process``: the index lives in a helper process
    (``layers.storage_process``, POSIX) and is searched there, so that searching never holds this process's
    interpreter lock (lower decoding latency when cores are few); ``norm_tier``: in approximate mode, the rows with
    the largest key norms (this many per kv head) are also searched exactly, so that outlying keys, which win inner
    products but which graph walks among many similar keys miss, are always found (0: none).
    """

    topk: int = 16
    write: str = "evicted"
    in_batch: bool = False
    approx_threshold: int = 4096
    hnsw_m: int = 16
    ef_search: int = 64
    write_batch: int = 256
    synchronous: bool = False
    async_retrieval: bool = True
    process: bool = False
    norm_tier: int = 256

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise ValueError(f"storage topk must be >= 1, got {self.topk}")
        if self.write not in WRITES:
            raise ValueError(f"storage write must be one of {WRITES}, got {self.write!r}")
        if self.approx_threshold < 1:
            raise ValueError(f"storage approx_threshold must be >= 1, got {self.approx_threshold}")
        if self.write_batch < 1:
            raise ValueError(f"storage write_batch must be >= 1, got {self.write_batch}")
        if self.hnsw_m < 2 or self.ef_search < 1:
            raise ValueError(f"need hnsw_m >= 2 and ef_search >= 1, got {self.hnsw_m}, {self.ef_search}")
        if self.norm_tier < 0:
            raise ValueError(f"storage norm_tier must be >= 0, got {self.norm_tier}")


@functools.cache
def _retriever() -> ThreadPoolExecutor:
    """The retrieval thread, shared by every store."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="bmojo-retrieval")


@functools.cache
def _writer(idle: bool = True) -> tuple[queue.Queue, threading.Thread]:
    """The background writer, shared by every store (one thread, so writes never take both cores from decoding):
    its queue of ``(store, job)`` pairs and its thread. Stores whose index is in the helper process have one of
    their own at normal priority (``idle=False``): it only hands rows over, and at idle priority it could be
    preempted while it holds the interpreter lock the decoding thread waits for."""
    jobs: queue.Queue = queue.Queue()
    name = "bmojo-store-writer" if idle else "bmojo-store-sender"
    thread = threading.Thread(target=_write_forever, args=(jobs, idle), daemon=True, name=name)
    thread.start()
    atexit.register(_drain, jobs, thread)
    return jobs, thread


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: start its own when needed
    os.register_at_fork(after_in_child=lambda: (_retriever.cache_clear(), _writer.cache_clear()))


def _write_forever(jobs: queue.Queue, idle: bool) -> None:
    """Apply queued writes in order (at idle priority if ``idle``); each store remembers its first failure."""
    if idle:
        idle_priority()
    while True:
        store, job = jobs.get()
        store._apply(job)
        del store, job  # freed before the job counts as done: once _drain returns, this thread frees nothing
        jobs.task_done()


def _drain(jobs: queue.Queue, thread: threading.Thread) -> None:
    """At exit, before the interpreter shuts down: wait until the writer has applied every queued job and holds
    none. A daemon thread that frees a tensor once shutdown has begun aborts the process (torch takes the
    interpreter lock back inside C++, where the thread's forced exit calls ``std::terminate``). In a forked child
    the writer does not run: nothing to wait for."""
    if thread.is_alive():
        jobs.join()


def _numpy(x: torch.Tensor | np.ndarray, dtype: type, copy: bool = True) -> np.ndarray:
    """``x`` as a numpy array of ``dtype``: a copy of its own, or (``copy=False``) a view where one will do."""
    if isinstance(x, torch.Tensor):  # as few torch calls as will do: each one hands the interpreter lock around
        want = torch.float32 if dtype is np.float32 else torch.int64
        x = x.detach() if x.requires_grad else x
        x = (x if x.device.type == "cpu" and x.dtype == want else x.to("cpu", want)).numpy()
    return np.array(x, dtype=dtype) if copy else np.asarray(x, dtype=dtype)


def _as_numpy(entry: Entry) -> Entry:
    """A job entry with its tensors as numpy arrays (views where they already are float32 / int64 on the CPU)."""
    if entry[0] == "rows":
        return entry
    kind, seq, positions, keys, values, skip = entry
    return (
        kind,
        seq,
        [_numpy(p, np.int64, copy=False) for p in positions],
        *([_numpy(x, np.float32, copy=False) for x in xs] for xs in (keys, values)),
        _numpy(skip, np.int64, copy=False),
    )


def _as_tensors(q: torch.Tensor, found: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arrays from :meth:`Index.found` as :meth:`VectorStore.retrieve` returns them: shaped per query head
    ``[B, H, M, ...]``, in ``q``'s dtype and on its device (views of the arrays where they already are)."""
    b, nh, m, _ = q.shape
    keys, values, valid = (torch.from_numpy(x.reshape(b, nh, m, *x.shape[3:])) for x in found)
    if keys.dtype != q.dtype or q.device.type != "cpu":
        keys, values = keys.to(q.device, q.dtype), values.to(q.device, q.dtype)
    return keys, values, valid.to(q.device)


class Retrieval:
    """A search under way (:meth:`VectorStore.retrieve_async`): :meth:`result` waits for it."""

    def __init__(self, pending: Future | _Answer, q: torch.Tensor) -> None:
        self._pending, self._q = pending, q

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What :meth:`VectorStore.retrieve` returns (converted on the calling thread)."""
        return _as_tensors(self._q, self._pending.result())


class VectorStore:
    """Per-layer store of key/value vectors for many sequences, searched by inner product.

    Rows are ``(sequence id, position, keys [Hkv, d], values [Hkv, d])``. :meth:`add` takes the rows and returns
    (the insert is acknowledged); once ``config.write_batch`` rows are waiting they go to the background writer as
    one job. :meth:`search` and :meth:`retrieve` see every write completed so far; :meth:`flush` hands over the
    waiting rows and waits for every write submitted before it. The rows live in an
    :class:`~bmojo.layers.storage_index.Index`, here or (``config.process``) in the helper process.
    """

    def __init__(self, head_dim: int, num_kv_heads: int = 1, config: StorageConfig | None = None) -> None:
        if head_dim < 1 or num_kv_heads < 1:
            raise ValueError(f"head_dim and num_kv_heads must be >= 1, got {head_dim}, {num_kv_heads}")
        _faiss()
        self.config = config or StorageConfig()
        self.head_dim, self.num_kv_heads = head_dim, num_kv_heads
        self._index: Index | RemoteIndex = (RemoteIndex if self.config.process else Index)(
            num_kv_heads, head_dim, self.config
        )
        self._submit_lock = threading.Lock()
        self._submitted = 0
        self._waiting: list[Entry] = []
        self._waiting_rows = 0
        self._next_seq = 0
        self._done = threading.Condition()  # the writer thread's progress: jobs applied, first failure
        self._applied = 0
        self._error: BaseException | None = None

    # ---------------------------------------------------------------- writing
    def new_sequences(self, n: int) -> list[int]:
        """Reserve ``n`` fresh sequence ids."""
        with self._submit_lock:
            ids = list(range(self._next_seq, self._next_seq + n))
            self._next_seq += n
        return ids

    def add(
        self,
        seq_ids: torch.Tensor | np.ndarray,
        positions: torch.Tensor | np.ndarray,
        keys: torch.Tensor | np.ndarray,
        values: torch.Tensor | np.ndarray,
    ) -> None:
        """Submit rows ``seq_ids [n], positions [n], keys [n, Hkv, d], values [n, Hkv, d]`` (copied now)."""
        seq, pos = _numpy(seq_ids, np.int64).reshape(-1), _numpy(positions, np.int64).reshape(-1)
        k, v = _numpy(keys, np.float32), _numpy(values, np.float32)
        shape = (len(seq), self.num_kv_heads, self.head_dim)
        if len(pos) != len(seq) or k.shape != shape or v.shape != shape:
            raise ValueError(
                f"add expects seq_ids [n], positions [n], keys/values {list(shape)}; got {len(seq)}, {len(pos)}, "
                f"{list(k.shape)}, {list(v.shape)}"
            )
        if len(seq):
            self._enqueue(("rows", seq, pos, k, v), len(seq))

    def add_candidates(
        self, seq_ids: torch.Tensor, positions: Parts, keys: Parts, values: Parts, skip: torch.Tensor
    ) -> None:
        """Submit, of each sequence's candidates, those whose position is ``>= 0`` and not in its ``skip [B, s]``
        (positions kept elsewhere). The candidates come in parts, concatenated along the candidate axis: ``positions
        [B, n_i]``, ``keys, values [B, Hkv, n_i, d]``, for sequence ids ``seq_ids [B]``. The concatenation, the
        choice and the conversion happen on the writer thread, so a decoding step hands its tensors over in a few
        microseconds: they are taken over, not copied, and must not be modified afterwards."""
        b, shape = len(seq_ids), (self.num_kv_heads, self.head_dim)
        if not (len(positions) == len(keys) == len(values) and skip.shape[0] == b) or any(
            p.shape != (b, k.shape[2]) or k.shape != v.shape or (k.shape[1], k.shape[3]) != shape
            for p, k, v in zip(positions, keys, values)
        ):
            raise ValueError(
                f"add_candidates expects seq_ids [B], parts of positions [B, n], keys/values [B, {shape[0]}, n, "
                f"{shape[1]}], and skip [B, s]; got {list(seq_ids.shape)}, {[list(p.shape) for p in positions]}, "
                f"{[list(k.shape) for k in keys]}, {[list(v.shape) for v in values]}, {list(skip.shape)}"
            )
        n = sum(p.shape[1] for p in positions)
        if b * n:
            self._enqueue(("candidates", _numpy(seq_ids, np.int64), positions, keys, values, skip), b * n)

    def _enqueue(self, entry: Entry, n: int) -> None:
        """Queue a job entry (:meth:`Index.apply_job`; at most ``n`` rows) for the writer thread."""
        self._raise_error()
        with self._submit_lock:
            self._next_seq = max(self._next_seq, int(entry[1].max()) + 1)
            self._waiting.append(entry)
            self._waiting_rows += n
            if self._waiting_rows >= self.config.write_batch or self.config.synchronous:
                self._submit()
            ticket = self._submitted
        if self.config.synchronous:
            self._wait(ticket)

    def _submit(self) -> None:
        """Hand the waiting rows to the writer thread as one job (under ``_submit_lock``)."""
        if not self._waiting:
            return
        _writer(not self.config.process)[0].put((self, self._waiting))
        self._waiting, self._waiting_rows = [], 0
        self._submitted += 1

    def _apply(self, job: list[Entry]) -> None:
        """On the writer thread: insert a job's rows into the index (unless a write failed before) and count it."""
        try:
            if self._error is None:
                self._index.apply_job([_as_numpy(entry) for entry in job])
        except BaseException as e:  # noqa: BLE001 - reported by the next flush/add
            self._error = e
        finally:
            with self._done:
                self._applied += 1
                self._done.notify_all()

    def flush(self) -> None:
        """Hand over the waiting rows, then wait until every write so far is searchable; re-raise a writer failure."""
        with self._submit_lock:
            self._submit()
            ticket = self._submitted
        self._wait(ticket)

    def _wait(self, ticket: int) -> None:
        with self._done:
            self._done.wait_for(lambda: self._applied >= ticket)
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"a background write to the vector store failed: {self._error!r}")

    def remove(self, seq_ids: list[int] | None = None) -> None:
        """Drop the rows of ``seq_ids`` (default: every sequence), after pending writes complete."""
        self.flush()
        self._index.remove(None if seq_ids is None else [int(s) for s in seq_ids])

    # ---------------------------------------------------------------- reading
    def __len__(self) -> int:
        """Rows written so far (completed writes)."""
        return self._index.count()

    def count(self, seq_id: int) -> int:
        """Rows of one sequence (completed writes)."""
        return self._index.count(int(seq_id))

    def sequences(self) -> list[int]:
        """Sequence ids with at least one row."""
        return self._index.sequences()

    def is_approximate(self, seq_id: int) -> bool:
        """Whether the sequence is searched with HNSW (else exactly)."""
        return self._index.is_approximate(int(seq_id))

    def entries(self, seq_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of one sequence's ``positions [n], keys [n, Hkv, d], values [n, Hkv, d]`` in insertion order."""
        return self._index.entries(int(seq_id))

    def search(self, seq_id: int, queries: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``r`` rows by inner product for ``queries [Hkv, M, d]`` (kv head ``h`` searches its own keys).

        Returns ``(scores [Hkv, M, r], rows [Hkv, M, r])``, best first, with rows ``-1`` (score ``-inf``) where the
        sequence holds fewer than ``r`` rows.
        """
        return self._index.search(int(seq_id), queries, r)

    def retrieve(self, seq_ids: list[int], q: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values retrieved for queries ``q [B, H, M, d]`` of sequences ``seq_ids [B]``.

        Query head ``h`` searches kv head ``h // (H // Hkv)``. Returns each query's top ``r``, unsorted: ``keys,
        values [B, H, M, r, d]`` and ``valid [B, H, M, r]`` (False where fewer than ``r`` rows exist; those
        keys/values are meaningless), in ``q``'s dtype and on its device.
        """
        return _as_tensors(q, self._index.found([int(s) for s in seq_ids], self._queries(q), r))

    def retrieve_async(self, seq_ids: list[int], q: torch.Tensor, r: int) -> Retrieval:
        """:meth:`retrieve` with the search under way while the caller goes on; ``.result()`` gives what
        :meth:`retrieve` returns (or raises what it raised). The search runs on the retrieval thread (one, shared by
        every store; it runs numpy and faiss only, so that it rarely holds the interpreter lock the decoding step
        needs) or, with ``config.process``, in the helper process. With ``config.async_retrieval`` off, the search
        runs now."""
        seq_ids, qn = [int(s) for s in seq_ids], self._queries(q)
        if not self.config.async_retrieval:
            pending: Future | _Answer = Future()
            pending.set_result(self._index.found(seq_ids, qn, r))
        elif self.config.process:
            pending = self._index.found_async(seq_ids, qn, r)
        else:
            pending = _retriever().submit(self._index.found, seq_ids, qn, r)
        return Retrieval(pending, q)

    def _queries(self, q: torch.Tensor) -> np.ndarray:
        """``q [B, H, M, d]`` -> float32 ``[B, Hkv, H // Hkv * M, d]``: the queries of each kv head."""
        b, nh, m, d = q.shape
        return q.detach().to("cpu", torch.float32).reshape(b, self.num_kv_heads, nh // self.num_kv_heads * m, d).numpy()

    # ---------------------------------------------------------------- persistence
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Every row (with a sequence id column) and the serialised HNSW indexes, after pending writes."""
        self.flush()
        arrays = self._index.state()
        meta = dict(
            version=FORMAT_VERSION, head_dim=self.head_dim, num_kv_heads=self.num_kv_heads, next_seq=self._next_seq
        )
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        return arrays

    def load_arrays(self, arrays: dict[str, np.ndarray], name: str = "store") -> None:
        """Replace the content by ``arrays`` (from :meth:`state_arrays`); on any mismatch raise and change nothing."""
        self._install(self._index.stage(arrays, name))

    def __deepcopy__(self, memo: dict) -> "VectorStore":
        """A new store (its own writer and, with ``config.process``, its own helper) holding this one's rows, after
        its pending writes: what ``copy.deepcopy`` of a model gives (EMA, ``AveragedModel``)."""
        copy = VectorStore(self.head_dim, self.num_kv_heads, self.config)
        copy.load_arrays(self.state_arrays(), "a deep copy")
        return copy

    def _install(self, next_seq: int) -> None:
        """Replace the content by what the index staged last (:meth:`Index.stage`)."""
        self.flush()
        self._index.commit()
        with self._submit_lock:
            self._next_seq = next_seq

    def save(self, path: str | os.PathLike) -> None:
        """Write the store to ``path`` atomically (see :func:`save_stores`)."""
        save_stores({"store": self}, path)

    def load(self, path: str | os.PathLike) -> None:
        """Replace the content by the store saved at ``path``; a bad file raises :class:`StorageFileError`."""
        load_stores({"store": self}, path)


def save_stores(stores: dict[str, VectorStore], path: str | os.PathLike) -> None:
    """Write named stores to one ``.npz`` file atomically: a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    arrays = {f"{name}/{k}": v for name, store in stores.items() for k, v in store.state_arrays().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        np.savez(f, **arrays)


def load_stores(stores: dict[str, VectorStore], path: str | os.PathLike) -> None:
    """Load named stores from a file written by :func:`save_stores`; all of them or, on error, none.

    Raises :class:`StorageFileError` naming ``path`` if it is truncated, corrupt or lacks one of the stores.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise StorageFileError(f"cannot read vector store file {path}: truncated or corrupt ({e!r})") from e
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        name, _, field = key.rpartition("/")
        grouped.setdefault(name, {})[field] = value
    missing = sorted(set(stores) - set(grouped))
    if missing:
        raise StorageFileError(f"vector store file {path} has no store named {missing}")
    staged = {
        name: store._index.stage(grouped[name], f"vector store file {path} [{name}]") for name, store in stores.items()
    }
    for name, store in stores.items():
        store._install(staged[name])


# -------------------------------------------------------------------- retrieval as a key/value set of the softmax
def store_membership(mem_pos: torch.Tensor, length: int, window: int, chunk: int, write: str) -> torch.Tensor:
    """Which positions ``< length`` are in the store of each chunk: ``[B, n_chunks, length]`` boolean.

    ``mem_pos [B, n_chunks, k]`` are the eidetic memories of chunks ``0..n_chunks-1`` (``-1`` = empty).
    """
    b, nc, _ = mem_pos.shape
    in_mem = torch.zeros(b, nc, length + 1, dtype=torch.bool, device=mem_pos.device)
    in_mem.scatter_(2, torch.where(mem_pos >= 0, mem_pos, length), True)
    in_mem = in_mem[..., :length]
    if write == "evicted":
        before = torch.cumsum(in_mem.int(), 1) - in_mem.int() > 0  # in the memory of an earlier chunk
        return before & ~in_mem
    starts = torch.arange(nc, device=mem_pos.device).view(nc, 1) * chunk
    left = torch.arange(length, device=mem_pos.device).view(1, length) < starts - window
    return left & ~in_mem


def _top(logits: torch.Tensor, r: int, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The ``r`` largest of ``logits [..., n]`` and their rows of each ``x [..., n, d]`` (all when ``n <= r``)."""
    if logits.shape[-1] <= r:
        return logits, *xs
    logits, idx = logits.topk(r, dim=-1)
    return logits, *(x.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1])) for x in xs)


def topk_attention(
    logits: torch.Tensor, values: torch.Tensor, r: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the ``r`` largest of ``logits [..., n]`` (``-inf`` = absent) with ``values [..., n, d]``.

    Returns ``(o [..., d], lse [...])`` in float32 (``lse = -inf`` and ``o = 0`` when nothing is present).
    """
    logits, values = _top(logits, r, values)
    p, lse = masked_softmax(logits.float() * scale)
    return (p.unsqueeze(-2) @ values.float()).squeeze(-2), lse


def in_batch_retrieval(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    member: torch.Tensor,
    chunk: int,
    r: int,
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact retrieval attention: each query attends to its top-``r`` keys of its chunk's store.

    ``q [B, H, L, d]``, ``k, v [B, Hkv, L, d]`` (rotated, aligned positions), ``member [B, >= n_chunks, L]`` from
    :func:`store_membership`. ``extra = (keys, values [B, H, L, r', d], valid [B, H, L, r'])`` are further candidates
    per query (rows already in a :class:`VectorStore`); the top ``r`` is taken over the union. Returns
    ``(o [B, H, L, d], lse [B, H, L])``. Cost ``O(L^2)``: one chunk of queries at a time against earlier keys.
    """
    b, nh, length, d = q.shape
    g = nh // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    outs, lses = [], []
    for j, start in enumerate(range(0, length, chunk)):
        qj = q[:, :, start : start + chunk]
        c = qj.shape[2]
        # store members of chunk j are < start - w: score the chunk's queries against the keys before it
        logits = qj @ k[:, :, :start].transpose(-1, -2)
        logits = logits.masked_fill(~member[:, j, :start].view(b, 1, 1, start), float("-inf"))
        logits, vals = _top(logits, r, v[:, :, :start].unsqueeze(2).expand(b, nh, c, start, d))
        if extra is not None:
            ek, ev, ok = (x[:, :, start : start + chunk] for x in extra)
            elogits = (ek.to(qj.dtype) @ qj.unsqueeze(-1)).squeeze(-1).masked_fill(~ok, float("-inf"))
            logits, vals = torch.cat([logits, elogits], -1), torch.cat([vals, ev.to(vals.dtype)], -2)
        o, lse = topk_attention(logits, vals, r, d**-0.5)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)
