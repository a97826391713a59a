"""The index behind a :class:`~bmojo.layers.storage.VectorStore`: numpy arrays and faiss, no torch.

:class:`Index` keeps, per sequence id, rows of ``(position, keys [Hkv, d], values [Hkv, d])``, searched exactly
(faiss's brute-force ``knn``) while a sequence holds fewer than ``approx_threshold`` rows, and beyond through one
faiss HNSW graph per kv head (``IndexHNSWFlat``, inner-product metric) plus an exact search of the rows added since
the graph was last extended and of the norm tier: the ``norm_tier`` rows with the largest key norms (which the graph
search filters out, so that no row is found twice). An inner product is at most the key's norm times the query's, so
the keys that win by far are large-norm outliers, and a graph walk among many near-identical keys can miss exactly
those; the tier finds them.

One writer calls :meth:`Index.apply`, which publishes new rows and graphs as new, immutable shard objects, so that
readers hold the lock only to pick up the current one. Every method takes and returns numpy arrays and plain Python
values, so that an index can live in another process (``bmojo.layers.storage_process``).
"""

from __future__ import annotations

import copy
import json
import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from bmojo.layers.storage import StorageConfig

FORMAT_VERSION = 1
TAIL_ROWS = 1024  # rows searched exactly beside the HNSW graph before they are merged into it


class StorageFileError(ValueError):
    """A store file is missing pieces, truncated, corrupt or does not match the store it is loaded into."""


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("long-term storage needs faiss: pip install 'bmojo[storage]' (faiss-cpu)") from e
    return faiss


class _Shard:
    """The rows of one sequence, as published to readers: ``positions [cap]``, ``keys, values [Hkv, cap, d]`` with
    rows ``[0, size)`` visible, and (approximate mode) one HNSW graph per kv head over rows ``[0, indexed)`` and the
    norm tier: per kv head, the rows ``tier [Hkv, T]`` of ``[0, indexed)`` with the largest key norms. The exact set
    ``exact_rows [Hkv, E]``, ``exact_keys [Hkv, E, d]`` (the tier, then rows ``[indexed, size)``) is searched
    exactly beside the graph, whose search parameters (``search_params``, one per kv head) filter the tier out.

    A published shard never changes: the writer writes new rows past ``size`` (or into larger copies of the arrays)
    and adds to copies of the graphs, then publishes a new shard object under the store's lock. Readers take the
    current object under the lock and search it without the lock. While exact (no graphs) every row is searched
    exactly. Every search is a faiss call, which releases the interpreter lock.
    """

    def __init__(self, heads: int, dim: int, capacity: int = 64) -> None:
        self.size = self.indexed = 0
        self.positions = np.empty(capacity, np.int64)
        self.keys = np.empty((heads, capacity, dim), np.float32)
        self.values = np.empty((heads, capacity, dim), np.float32)
        self.graphs: list | None = None
        self.search_params: list | None = None
        self.tier: np.ndarray | None = None
        self.exact_rows: np.ndarray | None = None
        self.exact_keys: np.ndarray | None = None

    @property
    def approx(self) -> bool:
        return self.graphs is not None

    def appended(self, positions: np.ndarray, keys: np.ndarray, values: np.ndarray) -> _Shard:
        """A new shard with rows ``positions [n], keys, values [n, Hkv, d]`` added (this one stays as it is)."""
        new, n = copy.copy(self), len(positions)
        if self.size + n > len(self.positions):
            cap = max(2 * len(self.positions), self.size + n)
            new.positions = np.empty(cap, np.int64)
            new.positions[: self.size] = self.positions[: self.size]
            new.keys, new.values = (
                np.empty((x.shape[0], cap, x.shape[2]), np.float32) for x in (self.keys, self.values)
            )
            new.keys[:, : self.size] = self.keys[:, : self.size]
            new.values[:, : self.size] = self.values[:, : self.size]
        new.positions[self.size : self.size + n] = positions
        new.keys[:, self.size : self.size + n] = keys.transpose(1, 0, 2)
        new.values[:, self.size : self.size + n] = values.transpose(1, 0, 2)
        new.size = self.size + n
        if self.approx:
            new.exact_rows = np.concatenate([self.exact_rows, _row_range(len(self.keys), self.size, new.size)], 1)
            new.exact_keys = np.concatenate([self.exact_keys, new.keys[:, self.size : new.size]], 1)
        return new

    def indexed_to(self, graphs: list, indexed: int, tier: int) -> _Shard:
        """A new shard whose rows ``[0, indexed)`` are searched through ``graphs`` and a norm tier of ``tier`` rows
        per kv head (this shard's tier and the newly indexed rows compete for it)."""
        faiss, new, heads = _faiss(), copy.copy(self), len(self.keys)
        new.graphs, new.indexed, new.tier = graphs, indexed, None
        new.search_params = [faiss.SearchParametersHNSW(efSearch=graph.hnsw.efSearch) for graph in graphs]
        if tier:
            fresh = _row_range(heads, self.indexed, indexed)
            rows = fresh if self.tier is None else np.concatenate([self.tier, fresh], 1)
            if rows.shape[1] > tier:
                norms = np.linalg.norm(np.take_along_axis(self.keys, rows[:, :, None], 1), axis=2)
                rows = np.take_along_axis(rows, np.argpartition(-norms, tier - 1, axis=1)[:, :tier], 1)
            new.tier = np.ascontiguousarray(rows)
            for h, params in enumerate(new.search_params):
                outside = np.ones(indexed, bool)
                outside[new.tier[h]] = False
                params.bitmap = np.packbits(outside, bitorder="little")  # kept alive beside the selector using it
                params.selector = faiss.IDSelectorBitmap(indexed, faiss.swig_ptr(params.bitmap))
                params.sel = params.selector
        tail = _row_range(heads, indexed, self.size)
        new.exact_rows = tail if new.tier is None else np.concatenate([new.tier, tail], 1)
        new.exact_keys = np.ascontiguousarray(np.take_along_axis(self.keys, new.exact_rows[:, :, None], 1))
        return new

    def search(self, queries: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``r`` ``(scores, rows) [Hkv, m, r]`` for ``queries [Hkv, m, d]`` (kv head ``h`` searches its own keys),
        unsorted, rows ``-1`` and scores ``-inf`` where absent: the graph's top ``r`` outside the tier and the exact
        top ``r`` of the exact set, merged; while exact, the exact top ``r`` of every row."""
        faiss, (heads, m, _) = _faiss(), queries.shape
        ip = faiss.METRIC_INNER_PRODUCT
        if not self.approx:
            found = [faiss.knn(queries[h], self.keys[h, : self.size], r, ip) for h in range(heads)]
            scores, rows = np.stack([d for d, _ in found]), np.stack([i for _, i in found])
            return np.where(rows >= 0, scores, -np.inf), rows
        scores, rows = np.empty((heads, m, 2 * r), np.float32), np.full((heads, m, 2 * r), -1, np.int64)
        for h, (graph, params) in enumerate(zip(self.graphs, self.search_params)):
            scores[h, :, :r], rows[h, :, :r] = graph.search(queries[h], r, params=params)
            if self.exact_rows.shape[1]:
                scores[h, :, r:], index = faiss.knn(queries[h], self.exact_keys[h], r, ip)
                rows[h, :, r:] = np.where(index >= 0, self.exact_rows[h][index], -1)
        scores = np.where(rows >= 0, scores, -np.inf)
        best = np.argpartition(-scores, r - 1, axis=2)[:, :, :r]
        return np.take_along_axis(scores, best, 2), np.take_along_axis(rows, best, 2)


def _row_range(heads: int, start: int, stop: int) -> np.ndarray:
    """Rows ``start..stop-1`` for every kv head: ``[heads, stop - start]`` (a read-only broadcast view)."""
    return np.broadcast_to(np.arange(start, stop), (heads, stop - start))


def _hnsw(keys: np.ndarray, m: int, ef_search: int):
    """An HNSW inner-product index over ``keys [n, d]``."""
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(keys.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = ef_search
    index.add(np.ascontiguousarray(keys))
    return index


Entry = tuple  # of a writer job: ("rows", seq, positions, keys, values) or ("candidates", ..., skip), see apply_job


def leaving(
    seq: np.ndarray, positions: list[np.ndarray], keys: list[np.ndarray], values: list[np.ndarray], skip: np.ndarray
) -> tuple[np.ndarray, ...]:
    """The rows a batch of candidates leaves to the store: candidate ``(b, j)`` of the parts ``positions [B, n_i]``,
    ``keys, values [B, Hkv, n_i, d]``, concatenated, is written iff its position is ``>= 0`` and not in ``skip [B,
    s]``. Returns ``seq, positions [n], keys, values [n, Hkv, d]`` (``seq [B]``: the batch's sequence ids)."""
    pos, k, v = np.concatenate(positions, 1), np.concatenate(keys, 2), np.concatenate(values, 2)
    b, j = ((pos >= 0) & ~(pos[:, :, None] == skip[:, None, :]).any(-1)).nonzero()
    return seq[b], pos[b, j], k[b, :, j], v[b, :, j]


class Index:
    """The rows of every sequence of one store, as published shards (:class:`_Shard`), and the lock that guards
    their swap. One writer calls :meth:`apply`; any thread may read."""

    def __init__(self, heads: int, dim: int, config: StorageConfig) -> None:
        self.heads, self.dim, self.config = heads, dim, config
        self.shards: dict[int, _Shard] = {}
        self.lock = threading.Lock()
        self.staged: tuple[dict[int, _Shard], int] | None = None

    def shard(self, seq_id: int) -> _Shard | None:
        """The published shard of a sequence (searched without the lock: it never changes)."""
        with self.lock:
            return self.shards.get(int(seq_id))

    def _publish(self, seq: int, old: _Shard | None, new: _Shard) -> bool:
        """Replace ``old`` by ``new`` unless the sequence was removed or replaced meanwhile."""
        with self.lock:
            if self.shards.get(seq) is not old:
                return False
            self.shards[seq] = new
            return True

    # ---------------------------------------------------------------- writing
    def apply(self, seq: np.ndarray, positions: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
        """Insert rows ``seq, positions [n], keys, values [n, Hkv, d]``: publish them (searched exactly at first),
        then, past ``approx_threshold`` rows or every ``TAIL_ROWS`` exact rows, build or extend the graphs off the
        lock and publish those."""
        faiss, cfg = _faiss(), self.config
        for s in np.unique(seq):
            rows = seq == s
            old = self.shard(s)
            shard = (old or _Shard(self.heads, self.dim)).appended(positions[rows], keys[rows], values[rows])
            if not self._publish(int(s), old, shard):
                continue
            if shard.approx and shard.size - shard.indexed >= TAIL_ROWS:
                graphs = [faiss.clone_index(graph) for graph in shard.graphs]
                for h, graph in enumerate(graphs):
                    graph.add(np.ascontiguousarray(shard.keys[h, shard.indexed : shard.size]))
            elif not shard.approx and shard.size >= cfg.approx_threshold:
                graphs = [_hnsw(shard.keys[h, : shard.size], cfg.hnsw_m, cfg.ef_search) for h in range(self.heads)]
            else:
                continue
            self._publish(int(s), shard, shard.indexed_to(graphs, shard.size, cfg.norm_tier))

    def apply_job(self, entries: list[Entry]) -> None:
        """Insert the rows of a writer job, as one :meth:`apply`: entries ``("rows", seq, positions, keys, values)``
        (rows as they are) or ``("candidates", seq, positions, keys, values, skip)`` (see :func:`leaving`)."""
        rows = [entry[1:] if entry[0] == "rows" else leaving(*entry[1:]) for entry in entries]
        self.apply(*(np.concatenate(parts) for parts in zip(*rows)))

    def remove(self, seq_ids: list[int] | None = None) -> None:
        """Drop the rows of ``seq_ids`` (default: every sequence)."""
        with self.lock:
            for s in list(self.shards) if seq_ids is None else seq_ids:
                self.shards.pop(int(s), None)

    # ---------------------------------------------------------------- reading
    def count(self, seq_id: int | None = None) -> int:
        """Rows of one sequence, or (``None``) of all."""
        with self.lock:
            shards = list(self.shards.values()) if seq_id is None else [self.shards.get(int(seq_id))]
        return sum(s.size for s in shards if s is not None)

    def sequences(self) -> list[int]:
        """Sequence ids with at least one row."""
        with self.lock:
            return sorted(self.shards)

    def is_approximate(self, seq_id: int) -> bool:
        """Whether the sequence is searched with HNSW (else exactly)."""
        shard = self.shard(seq_id)
        return shard is not None and shard.approx

    def entries(self, seq_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of one sequence's ``positions [n], keys [n, Hkv, d], values [n, Hkv, d]`` in insertion order."""
        shard = self.shard(seq_id) or _Shard(self.heads, self.dim, 0)
        n = shard.size
        return (shard.positions[:n].copy(), *(x[:, :n].transpose(1, 0, 2).copy() for x in (shard.keys, shard.values)))

    def search(self, seq_id: int, queries: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``r`` ``(scores, rows) [Hkv, M, r]`` of ``queries [Hkv, M, d]``, best first (see
        :meth:`VectorStore.search <bmojo.layers.storage.VectorStore.search>`)."""
        shard = self.shard(seq_id) or _Shard(self.heads, self.dim, 0)
        scores, rows = shard.search(np.ascontiguousarray(queries, np.float32), r)
        best = np.argsort(-scores, axis=2, kind="stable")
        return np.take_along_axis(scores, best, 2), np.take_along_axis(rows, best, 2)

    def found(self, seq_ids: list[int], qn: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The top ``r`` of queries ``qn [B, Hkv, n, d]`` of sequences ``seq_ids [B]``, unsorted: ``keys, values [B,
        Hkv, n, r, d]`` and ``valid [B, Hkv, n, r]`` (False where absent; those keys/values are zeros or any row)."""
        keys = np.zeros((*qn.shape[:3], r, qn.shape[3]), np.float32)
        values = np.zeros_like(keys)
        rows = np.full(keys.shape[:4], -1, np.int64)
        heads = np.arange(self.heads)[:, None, None]
        for i, s in enumerate(seq_ids):
            shard = self.shard(s)
            if shard is None:
                continue
            rows[i] = shard.search(qn[i], r)[1]
            found = np.maximum(rows[i], 0)  # rows -1 (absent) read row 0, masked below
            keys[i], values[i] = shard.keys[heads, found], shard.values[heads, found]
        return keys, values, rows >= 0

    # ---------------------------------------------------------------- persistence
    def state(self) -> dict[str, np.ndarray]:
        """Every row (with a sequence id column) and the serialised HNSW graphs."""
        faiss = _faiss()
        with self.lock:
            shards = sorted(self.shards.items())
        arrays: dict[str, np.ndarray] = {
            "seq_ids": np.concatenate([np.full(s.size, i, np.int64) for i, s in shards] or [np.empty(0, np.int64)]),
            "positions": np.concatenate([s.positions[: s.size] for _, s in shards] or [np.empty(0, np.int64)]),
        }
        for name in ("keys", "values"):
            rows = [getattr(s, name)[:, : s.size].transpose(1, 0, 2) for _, s in shards]
            arrays[name] = np.concatenate(rows or [np.empty((0, self.heads, self.dim), np.float32)])
        for i, s in shards:
            for h, graph in enumerate(s.graphs or []):
                arrays[f"hnsw_{i}_{h}"] = faiss.serialize_index(graph)
        return arrays

    def stage(self, arrays: dict[str, np.ndarray], name: str) -> int:
        """Validate ``arrays`` (:meth:`state` and a ``meta`` entry) and build their shards, to be installed by
        :meth:`commit`; raise :class:`StorageFileError` naming ``name`` on any mismatch. Returns the next free
        sequence id."""
        faiss = _faiss()
        try:
            meta = json.loads(bytes(arrays["meta"]).decode())
            seq, pos, keys, values = (arrays[k] for k in ("seq_ids", "positions", "keys", "values"))
        except (KeyError, ValueError) as e:
            raise StorageFileError(f"{name}: not a vector store ({e!r})") from e
        shape = (len(seq), self.heads, self.dim)
        if meta.get("version") != FORMAT_VERSION or (meta.get("num_kv_heads"), meta.get("head_dim")) != shape[1:]:
            raise StorageFileError(
                f"{name}: store format {meta} does not match head_dim={shape[2]}, kv heads={shape[1]}"
            )
        if len(pos) != len(seq) or keys.shape != shape or values.shape != shape:
            raise StorageFileError(
                f"{name}: inconsistent array shapes {len(seq)}, {len(pos)}, {keys.shape}, {values.shape}"
            )
        shards: dict[int, _Shard] = {}
        for s in np.unique(seq):
            rows = seq == s
            shard = _Shard(self.heads, self.dim, int(rows.sum()))
            shard = shards[int(s)] = shard.appended(pos[rows], keys[rows], values[rows])
            if f"hnsw_{s}_0" in arrays:
                try:
                    graphs = [faiss.deserialize_index(arrays[f"hnsw_{s}_{h}"]) for h in range(self.heads)]
                except (KeyError, RuntimeError) as e:
                    raise StorageFileError(f"{name}: HNSW index of sequence {s} is unreadable ({e!r})") from e
                n = graphs[0].ntotal
                if any(not isinstance(g, faiss.IndexHNSW) or g.ntotal != n for g in graphs) or n > shard.size:
                    raise StorageFileError(f"{name}: HNSW index of sequence {s} does not match its rows")
                for graph in graphs:
                    graph.hnsw.efSearch = self.config.ef_search
                shards[int(s)] = shard.indexed_to(graphs, n, self.config.norm_tier)
        next_seq = max(int(meta.get("next_seq", 0)), int(seq.max()) + 1 if len(seq) else 0)
        self.staged = shards, next_seq
        return next_seq

    def commit(self) -> None:
        """Replace every sequence by those of the last :meth:`stage`."""
        with self.lock:
            self.shards, self.staged = self.staged[0], None
