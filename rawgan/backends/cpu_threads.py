"""The CPU backend's threads: an op's rows split across the cores.

NumPy runs every ufunc, copy and reduction on ONE core; only BLAS uses them all. On a small
machine the other cores then idle through every im2col copy, scatter-add and elementwise
pass of a training step (measured on the 2-core machine here: one (512, 14, 14, 64) float32
multiply 2.9 ms on one thread, 1.5 ms on two; an im2col copy 4.5 ms vs 2.2 ms). So the ops
of :mod:`rawgan.backends.numpy_ops` split their work along the batch axis::

    parallel_rows(body, n)      # body(worker, lo, hi) on rows [lo, hi), one range a worker

Each worker runs plain NumPy on its rows (NumPy releases the GIL inside its loops), writing
into disjoint slices of a preallocated output; reductions return one partial per worker and
the caller adds them in worker order, so a result is deterministic for a given thread count.
With ``blas_single=True`` (used by the convolutions and dense layers, whose workers call
GEMMs) BLAS is held at one thread while the workers run: the parallelism is then ours, not
BLAS's, and the cores are not oversubscribed. That needs ``threadpoolctl``; without it such
work runs on the calling thread alone, with BLAS's own threads. So does such work called
from any thread but the main one (an app sampling from its own threads): OpenBLAS ignores a
raise of its thread count made from another thread once it ran at one thread, so rawgan
changes the count only from the main thread (GEMM results off the main thread are then
those of a 1-worker split: reductions may round differently from the main thread's).

The thread count is ``RAWGAN_NUM_THREADS``, else ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS``
(so a process told to use one core, e.g. one MPI rank of several, uses one), else the cores
this process may run on; :func:`set_num_threads` changes it.

Each thread also owns a :class:`Workspace` (:func:`workspace`): the ops' scratch buffers,
reused from call to call. A body may use its own thread's workspace only for what it is done
with when it returns; what it hands back to the caller (a partial sum) must come from the
caller's workspace or be freshly allocated, since a pool thread serves every call, from any
thread: the ops may be called from several threads at once (one pool for all of them).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

#: Below this many elements an elementwise op runs on the calling thread: handing work to
#: another thread costs ~20-50 us, a pass over 64K float32 takes about that long.
MIN_PARALLEL = 1 << 16

_THREAD_VARS = ("RAWGAN_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _default_threads() -> int:
    for var in _THREAD_VARS:
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_state = threading.local()
_lock = threading.Lock()
_threads = _default_threads()
_pool: ThreadPoolExecutor | None = None
_blas = None  # threadpoolctl's BLAS controller, or False when there is none


def num_threads() -> int:
    """Threads the CPU ops use (1: everything on the calling thread)."""
    return _threads


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (>= 1) for the CPU ops from now on."""
    global _threads, _pool
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: expected a positive int, got {n!r}")
    with _lock:
        if _pool is not None and n != _threads:
            _pool.shutdown(wait=True)
            _pool = None
        _threads = n


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_threads - 1,
                                       thread_name_prefix="rawgan-cpu")
        return _pool


def _blas_controller():
    """threadpoolctl's controller of the BLAS libraries, made once (under the lock: two
    threads making their own would each save and restore the thread count through another
    object), or False when there is none."""
    global _blas
    if _blas is None:
        with _blas_lock:
            if _blas is None:
                try:
                    from threadpoolctl import ThreadpoolController

                    ctl = ThreadpoolController().select(user_api="blas")
                except Exception:  # not installed, or it cannot inspect this process's libs
                    _blas = False
                else:
                    _blas = ctl if ctl.lib_controllers else False
    return _blas


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's worker threads: start afresh (a pool that
    believes its threads exist would never run a task)."""
    global _pool, _lock, _blas_lock, _blas_depth
    _pool, _blas_depth = None, 0
    _lock, _blas_lock = threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_blas_lock = threading.Lock()
_blas_depth = 0
_blas_saved: list[int] = []


@contextlib.contextmanager
def _blas_single():
    """BLAS at one thread until the last of any overlapping holders (threads) leaves; then
    back to what it was before the first one came."""
    global _blas_depth, _blas_saved
    libs = _blas_controller().lib_controllers
    with _blas_lock:
        if _blas_depth == 0:
            _blas_saved = [lib.get_num_threads() for lib in libs]
            for lib in libs:
                lib.set_num_threads(1)
        _blas_depth += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_depth -= 1
            if _blas_depth == 0:
                for lib, n in zip(libs, _blas_saved, strict=True):
                    lib.set_num_threads(n)


def workers_for(n_rows: int, size: int = MIN_PARALLEL, blas_single: bool = False) -> int:
    """How many workers :func:`parallel_rows` will use for ``n_rows`` rows of ``size``
    elements in all (1 for small work, for nested calls, or GEMM work without threadpoolctl)."""
    if _threads <= 1 or n_rows < 2 or size < MIN_PARALLEL or getattr(_state, "inside", False):
        return 1
    if blas_single and not _blas_controller():
        return 1
    return min(_threads, n_rows)


def parallel_rows(body: Callable[[int, int, int], object], n_rows: int, *,
                  size: int = MIN_PARALLEL, blas_single: bool = False) -> list:
    """Call ``body(worker, lo, hi)`` on contiguous row ranges covering ``[0, n_rows)``.

    ``worker`` numbers the ranges 0, 1, ... in row order (range 0 runs on the calling thread)
    and is the thread's identity for per-worker scratch buffers; returns the bodies' results
    in that order. ``size`` (elements touched) below :data:`MIN_PARALLEL` runs everything as
    one range, and so does a call made inside a body (it keeps that body's worker number).

    ``blas_single``: the body calls GEMMs. BLAS is then held at ONE thread while the bodies
    run, even when there is only one of them: the workers are the parallelism, and a
    multi-threaded BLAS call would leave BLAS's own threads spinning on the other cores
    (OpenBLAS busy-waits for new work after each call), where they slow down the next
    parallel NumPy loop. An exception in any body is re-raised after every body finished.
    """
    if getattr(_state, "inside", False):
        return [body(_state.worker, 0, n_rows)]
    if blas_single and threading.current_thread() is not threading.main_thread():
        # OpenBLAS ignores a raise of its thread count made from a thread other than the
        # one that started it once BLAS has run at one thread (measured: OpenBLAS 0.3.31),
        # so holding it at one thread from here could leave the whole process there (an
        # app calling sample() from its threads): these GEMMs run as ONE range, with BLAS's
        # own threads, and the count is never touched
        return [_run_one(body, n_rows)]
    t = workers_for(n_rows, size, blas_single)
    limit = _blas_single() if blas_single and _blas_controller() else contextlib.nullcontext()
    bounds = [n_rows * k // t for k in range(t + 1)]

    def run(k: int):
        _state.inside, _state.worker = True, k
        try:
            return body(k, bounds[k], bounds[k + 1])
        finally:
            _state.inside = False

    with limit:
        if t == 1:
            return [run(0)]
        futures = [_get_pool().submit(run, k) for k in range(1, t)]
        try:
            first = run(0)
        finally:
            wait(futures)  # every body has finished before an error propagates
    return [first, *(f.result() for f in futures)]


def _run_one(body: Callable[[int, int, int], object], n_rows: int):
    """``body(0, 0, n_rows)`` as worker 0 (nested parallel_rows calls run inline)."""
    _state.inside, _state.worker = True, 0
    try:
        return body(0, 0, n_rows)
    finally:
        _state.inside = False


class Workspace:
    """Reusable scratch buffers, one per tag, grown on demand.

    Large ``np.empty`` calls are served by fresh ``mmap`` pages that fault in on
    first touch; for a DCGAN step that is hundreds of MB per step. Temporaries
    that never escape an op (padded inputs, im2col columns) use these buffers.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, np.dtype], np.ndarray] = {}

    def get(self, tag: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = math.prod(shape)
        buf = self._buffers.get((tag, dtype))
        if buf is None or buf.size < size:
            buf = np.empty(size, dtype=dtype)
            self._buffers[(tag, dtype)] = buf
        return buf[:size].reshape(shape)

    def clear(self) -> None:
        self._buffers.clear()


_local = threading.local()


def workspace() -> Workspace:
    """This thread's scratch buffers (every worker thread, and every caller, has its own)."""
    ws = getattr(_local, "workspace", None)
    if ws is None:
        ws = _local.workspace = Workspace()
    return ws
