"""A store's index in a helper process, so that searching it never takes the decoding process's interpreter lock.

With ``StorageConfig(process=True)`` a :class:`~bmojo.layers.storage.VectorStore` keeps its
:class:`~bmojo.layers.storage_index.Index` in a helper process (one per Python process, shared by every such store,
started at first use) and reaches it two ways:

- calls over two socket pairs, each served by one helper thread: ``write`` for the background writer's inserts
  (the helper extends its graphs on that thread, at idle priority) and ``call`` for everything else;
- decoding steps' searches through a :class:`Mailbox` in shared memory: the decoding thread writes the queries and
  bumps a job number, the helper's search thread (which polls for it, and sleeps between polls when idle) writes the
  answer and bumps the done number, and the decoding thread reads it after the layer's SSM has run. No system call,
  no wake-up, no interpreter lock is shared on the way.

Why: on a machine with few cores, a search on a thread of the decoding process holds the interpreter lock between
its faiss calls, and every small torch op of the decoding step waits for it; a socket round trip with pickling costs
the decoding thread about as much (``benchmarks/RESULTS.md``). The helper exits when the process that started it
closes its sockets (exits). POSIX only; the mailbox relies on x86-64's store ordering, so elsewhere searches go
through the ``call`` socket, one at a time.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import pickle
import platform
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.connection import Connection

import numpy as np

from bmojo.layers.storage_index import Index

CHANNELS = ("write", "call")
SPIN_S = 0.0005  # after an answer, how long the helper polls without sleeping for the next search
NAP_S = (5e-5, 2e-4, 5e-3)  # then its sleeps between polls: the first, the longest while active, the longest idle
IDLE_S = 1.0  # no search for this long: idle
OUT_OF_BAND = 1 << 20  # bytes: arrays sent as they are, after the pickle stream
MAILBOX = platform.machine().lower() in ("x86_64", "amd64")


class HelperError(RuntimeError):
    """The helper process is gone or answered with something that cannot be read."""


class Mailbox:
    """One search at a time in shared memory: ``header [16] int64`` (0: job number, 1: done number, 2: index key,
    3: ``r``, 4-7: query shape ``B, Hkv, n, d``, 8: 1 if the search failed), then ``seq_ids [B]`` int64,
    ``queries [B, Hkv, n, d]`` float32, ``keys, values [B, Hkv, n, r, d]`` float32 and ``valid [B, Hkv, n, r]``."""

    def __init__(self, size: int, name: str | None = None) -> None:
        self.shm = shared_memory.SharedMemory(name=name, create=name is None, size=size if name is None else 0)
        if name is not None:  # attached, not owned: the creator unlinks it (Python < 3.13 tracks it either way)
            resource_tracker.unregister(self.shm._name, "shared_memory")
        self.header = np.ndarray((16,), np.int64, self.shm.buf)
        self.views: dict[tuple[int, ...], tuple[np.ndarray, ...]] = {}

    @staticmethod
    def size(b: int, heads: int, n: int, d: int, r: int) -> int:
        return 8 * (16 + b) + 4 * b * heads * n * d * (1 + 2 * r) + b * heads * n * r

    def arrays(self, b: int, heads: int, n: int, d: int, r: int) -> tuple[np.ndarray, ...]:
        """Views of ``seq_ids, queries, keys, values, valid`` for queries ``[b, heads, n, d]`` and top ``r``."""
        shape = (b, heads, n, d, r)
        if shape not in self.views:
            out, offset = [], 8 * 16
            for dims, dtype in (
                [((b,), np.int64), ((b, heads, n, d), np.float32)]
                + [((b, heads, n, r, d), np.float32)] * 2
                + [((b, heads, n, r), np.bool_)]
            ):
                out.append(np.ndarray(dims, dtype, self.shm.buf, offset))
                offset += out[-1].nbytes
            self.views[shape] = tuple(out)
        return self.views[shape]

    def close(self) -> None:
        self.header, self.views = None, {}
        with contextlib.suppress(BufferError):
            self.shm.close()


def idle_priority() -> None:
    """Run the calling thread only when a core is idle, preempted by any waking thread (Linux ``SCHED_IDLE``); where
    a sandbox refuses it, the thread stays at normal priority."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _send(conn: Connection, obj: object) -> None:
    """Send ``obj`` with its large arrays out of band: the pickle stream and the arrays' sizes, then each array's
    bytes as they are (no copy on this side; the writes release the interpreter lock). Arrays under ``OUT_OF_BAND``
    bytes go in the stream: one copy costs less than a write, which takes the interpreter lock again after it."""
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(obj, protocol=5, buffer_callback=lambda b: b.raw().nbytes < OUT_OF_BAND or buffers.append(b))
    raw = [b.raw() for b in buffers]
    conn.send_bytes(pickle.dumps((stream, [r.nbytes for r in raw]), protocol=5))
    for r in raw:
        conn.send_bytes(r)


def _recv(conn: Connection) -> object:
    """What :func:`_send` sent (its arrays in writable buffers of their own)."""
    stream, sizes = pickle.loads(conn.recv_bytes())
    buffers = [bytearray(n) for n in sizes]
    for buffer in buffers:
        conn.recv_bytes_into(buffer)
    return pickle.loads(stream, buffers=buffers)


def _wait(condition: Callable[[], bool], process: subprocess.Popen) -> None:
    """Poll ``condition()`` until true; every 10 ms, check that ``process`` still runs."""
    check = time.perf_counter() + 0.01
    while not condition():
        if time.perf_counter() > check:
            if process.poll() is not None:
                raise HelperError(f"the storage helper process exited (code {process.returncode})")
            check = time.perf_counter() + 0.01


class Helper:
    """The client side: the helper process, one connection (with its lock) per channel, and the mailbox."""

    def __init__(self) -> None:
        if os.name != "posix":
            raise OSError("StorageConfig(process=True) needs a POSIX system")
        pairs = {name: socket.socketpair() for name in CHANNELS}
        theirs = [b.fileno() for _, b in pairs.values()]
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"import sys; from {__name__} import main; main(sys.argv[1:])"]
            + [str(fd) for fd in theirs],
            pass_fds=theirs,
            stdin=subprocess.DEVNULL,
        )
        self.conns = {name: Connection(a.detach()) for name, (a, _) in pairs.items()}
        for _, b in pairs.values():
            b.close()
        self.locks = {name: threading.Lock() for name in CHANNELS}
        self.search_lock = threading.Lock()  # held from a mailbox search's post to its result
        self.mailbox: Mailbox | None = None
        self.keys = itertools.count()  # of the indexes made in the helper
        atexit.register(self.close_mailbox)

    def call(self, channel: str, key: int, method: str, *args: object) -> object:
        """Run ``method(*args)`` on index ``key`` in the helper; re-raise what it raised there."""
        conn = self.conns[channel]
        with self.locks[channel]:
            try:
                _send(conn, (key, method, args))
                ok, value = _recv(conn)
            except (EOFError, OSError) as e:
                raise HelperError(
                    f"the storage helper process (pid {self.process.pid}) is gone (exit code {self.process.poll()})"
                ) from e
        if not ok:
            raise value
        return value

    def post(self, key: int, seq_ids: list[int], qn: np.ndarray, r: int) -> int:
        """Write a search of index ``key`` into the mailbox (the caller holds ``search_lock``); its job number."""
        need = Mailbox.size(*qn.shape, r)
        if self.mailbox is None or need > self.mailbox.shm.size:
            jobs = 0 if self.mailbox is None else int(self.mailbox.header[0])
            self.close_mailbox()
            self.mailbox = Mailbox(max(need, 1 << 16))
            self.mailbox.header[:2] = jobs  # job numbers go on where the old mailbox left them
            self.call("call", -1, "mailbox", self.mailbox.shm.name)
        header = self.mailbox.header
        header[2:8] = key, r, *qn.shape
        seq, queries, *_ = self.mailbox.arrays(*qn.shape, r)
        seq[:], queries[:] = seq_ids, qn
        header[0] += 1
        return int(header[0])

    def close_mailbox(self) -> None:
        if self.mailbox is not None:
            self.mailbox.shm.unlink()
            self.mailbox.close()
            self.mailbox = None

    def answer(self, job: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Wait for job ``job`` of the mailbox; copies of its ``keys, values, valid``, or ``None`` if it failed."""
        header = self.mailbox.header
        _wait(lambda: header[1] == job, self.process)
        if header[8]:
            return None
        return tuple(x.copy() for x in self.mailbox.arrays(*header[4:8].tolist(), int(header[3]))[2:])


@functools.cache
def helper() -> Helper:
    """This process's helper, started at first use."""
    return Helper()


if hasattr(os, "register_at_fork"):  # a forked child cannot share its parent's connections
    os.register_at_fork(after_in_child=helper.cache_clear)


class RemoteIndex:
    """An :class:`~bmojo.layers.storage_index.Index` in the helper process: its methods are calls to it (inserts on
    the ``write`` channel, the rest on ``call``), and :meth:`found_async` posts a search to the mailbox."""

    def __init__(self, heads: int, dim: int, config: object) -> None:
        self.helper = helper()
        self.key = next(self.helper.keys)
        self.helper.call("call", self.key, "create", heads, dim, config)
        weakref.finalize(self, _drop, self.helper, self.key)

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        return functools.partial(self.helper.call, "call", self.key, method)

    def apply_job(self, entries: list[tuple]) -> None:
        self.helper.call("write", self.key, "apply_job", entries)

    def found_async(self, seq_ids: list[int], qn: np.ndarray, r: int) -> _Answer:
        """:meth:`Index.found` posted now; ``.result()`` waits for it. While another search is in flight (another
        thread's, or one whose answer was never collected), or without a mailbox, the search runs now."""
        lock = self.helper.search_lock
        if not MAILBOX or not lock.acquire(blocking=False):
            return _Answer(self, None, value=self.found(seq_ids, qn, r))
        try:
            job = self.helper.post(self.key, seq_ids, qn, r)
        except BaseException:
            lock.release()
            raise
        return _Answer(self, job, (seq_ids, qn, r))


class _Answer:
    """A search posted to the mailbox as job ``job`` (or, with ``job=None``, its ``value`` already)."""

    def __init__(self, index: RemoteIndex, job: int | None, args: tuple = (), value: object = None) -> None:
        self._index, self._job, self._args, self._value = index, job, args, value

    def result(self) -> object:
        if self._job is not None:
            try:
                self._value = self._index.helper.answer(self._job)
            finally:
                self._index.helper.search_lock.release()
                self._job = None
            if self._value is None:  # the search failed in the helper: run it again to raise its error here
                self._value = self._index.found(*self._args)
        return self._value


def _drop(helper: Helper, key: int) -> None:
    """Free an index whose store is gone (quietly: this may run while the interpreter shuts down)."""
    with contextlib.suppress(Exception):
        helper.call("call", key, "drop")


# -------------------------------------------------------------------- the helper process
class _Server:
    """The helper's side: the indexes by key, the mailbox, and one thread per channel plus the search thread."""

    def __init__(self) -> None:
        self.indexes: dict[int, Index] = {}
        self.mailbox: Mailbox | None = None
        self.closed = threading.Event()

    def dispatch(self, key: int, method: str, args: tuple) -> object:
        """Run one call: ``create`` (an index under ``key``), ``drop`` (it), ``mailbox`` (attach the shared memory
        named ``args[0]``), or a public method of the index."""
        if method == "create":
            self.indexes[key] = Index(*args)
        elif method == "drop":
            self.indexes.pop(key, None)
        elif method == "mailbox":
            self.mailbox = Mailbox(0, args[0])  # the old one stays mapped: the search thread may still hold it
        elif method.startswith("_"):
            raise AttributeError(f"no such index method: {method}")
        else:
            return getattr(self.indexes[key], method)(*args)
        return None

    def serve(self, conn: Connection, channel: str) -> None:
        """Answer one channel's calls ``(key, method, args)`` with ``(True, result)`` or ``(False, exception)``
        until the other end closes, then end the process."""
        if channel == "write":  # graph building yields to searches and to decoding
            idle_priority()
        while True:
            try:
                key, method, args = _recv(conn)
            except (EOFError, OSError):
                self.closed.set()
                return
            try:
                answer = (True, self.dispatch(key, method, args))
            except Exception as e:  # noqa: BLE001 - sent back and raised by the caller
                answer = (False, e)
            try:
                _send(conn, answer)
            except OSError:
                self.closed.set()
                return
            except Exception as e:  # noqa: BLE001 - an answer that does not pickle
                _send(conn, (False, HelperError(f"{method} answered with something that cannot be sent: {e!r}")))

    def search_forever(self) -> None:
        """Answer the mailbox's jobs: poll for ``SPIN_S`` after each answer, then sleep between polls, longer and
        longer up to ``NAP_S[1]`` (``NAP_S[2]`` after ``IDLE_S`` without a search)."""
        last, answered, nap = 0, time.perf_counter(), NAP_S[0]
        while True:
            box = self.mailbox
            if box is None or box.header[0] == last:
                idle = time.perf_counter() - answered
                if idle > SPIN_S:
                    time.sleep(nap)
                    nap = min(2 * nap, NAP_S[2] if idle > IDLE_S else NAP_S[1])
                continue
            last = int(box.header[0])
            key, r, *shape = box.header[2:8].tolist()
            seq, queries, keys, values, valid = box.arrays(*shape, r)
            try:
                keys[:], values[:], valid[:] = self.indexes[key].found(seq.tolist(), queries, r)
                box.header[8] = 0
            except Exception:  # noqa: BLE001 - the caller runs the search again on the call channel to raise it
                box.header[8] = 1
            box.header[1] = last
            answered, nap = time.perf_counter(), NAP_S[0]


def main(argv: list[str]) -> None:
    """Serve the channels on the socket descriptors ``argv`` (in ``CHANNELS`` order) until one closes."""
    server = _Server()
    for channel, fd in zip(CHANNELS, argv):
        name = f"bmojo-helper-{channel}"
        threading.Thread(target=server.serve, args=(Connection(int(fd)), channel), daemon=True, name=name).start()
    threading.Thread(target=server.search_forever, daemon=True, name="bmojo-helper-search").start()
    server.closed.wait()
