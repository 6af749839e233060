"""Synchronous data-parallel training on an existing distributed engine: MPI (through
mpi4py) to launch the ranks, find them and all-reduce host buffers, NCCL (through CuPy's
bindings, its unique id broadcast over MPI) to all-reduce GPU buffers.

One purpose: the communicator seam. Everything rawgan needs from the engine is
:class:`Communicator`: ``rank``, ``size``, ``allreduce_sum / allreduce_mean(buffer)``,
``bcast``, ``bcast_object``, ``barrier``, ``abort``. Three implementations:

* :class:`SingleProcess`: size 1, every collective is the identity (no MPI needed);
* :class:`MPICommunicator`: mpi4py over ``MPI.COMM_WORLD`` (``mpiexec -n N``);
* :class:`NCCLCommunicator`: MPI for launch, objects and host buffers; NCCL for CuPy
  (device) buffers, one GPU per rank (the rank's index on its node picks the device).

The algorithm (as PyTorch DDP and Horovod do it), per training step on S ranks::

    every rank draws the SAME global batch (B rows) from the same seeded data-order stream
    and the SAME global noise batch from the same noise stream, and keeps rows
    [r*B/S, (r+1)*B/S)                                                     (shard_rows)
    forward / backward on the shard, with the usual hand-written passes: the loss is the
    shard's mean, so rank r's gradient is g_r = (1/n) sum_{i in shard r} dl_i/dtheta
    before each optimizer step: g <- (1/S) sum_r g_r = (1/B) sum_i dl_i/dtheta, the global
    batch's gradient, with ONE all-reduce per model over a flat buffer
                                                                  (DistributedOptimizer)
    every rank applies the same update to the same parameters, so they stay identical

Dropout (:class:`ShardedDropout`): a rank draws the mask of the GLOBAL batch from the layer's
generator (identical on every rank) and keeps its rows, so the masks, and the generator's
state, are exactly those of one process. The critic sees ``[real; fake]`` (2n rows), whose
single-process rows are ``[real_0..real_S-1; fake_0..fake_S-1]``: a rank's rows are its
block in each half. Each rank draws S times its share of random numbers (the price of
exactness; measured in benchmarks/bench_distributed.py).

Batch normalization: per-rank statistics by default (each rank normalises with its own
shard's mean and variance; the moving statistics, affine in the batch statistics, are
averaged over the ranks before anything is written, :func:`sync_buffers`, so the moving
mean equals the global batch's and the moving variance is the mean of the ranks'
variances). With ``sync_batchnorm`` (:class:`SyncBatchNorm`) the statistics are the global
batch's: one all-reduce of per-channel sums in the forward, one in the backward.

Timeouts. Every collective is non-blocking (``Iallreduce`` / ``Ibcast`` / ``Ibarrier``),
polled with ``Test()`` until ``timeout`` seconds have passed; then the rank prints which
collective, at which step, timed out and calls ``MPI_Abort``, so a rank that died or hangs
ends the job with a message instead of a hang. A rank that fails (an error not raised on
every rank alike) prints its rank and calls ``MPI_Abort`` too, even before its communicator
exists (:func:`abort_job`): a rank that merely exits would leave the others waiting, since
MPI finalizes it as a normal end.

Only rank 0 writes (checkpoints, samples, metrics, progress). A checkpoint holds global
state only (identical weights, optimizer slots and random streams on every rank), so a run
resumes with any number of ranks that divides the batch size.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .backends.streams import skip_uniforms
from .nn import BatchNormalization, Dropout, Sequential

__all__ = [
    "DEFAULT_TIMEOUT",
    "CollectiveTimeout",
    "Communicator",
    "DistributedOptimizer",
    "MPICommunicator",
    "NCCLCommunicator",
    "PeerError",
    "ShardedDropout",
    "SingleProcess",
    "SyncBatchNorm",
    "check_identical",
    "get",
    "mark_agreed",
    "prepare_models",
    "shard_noise",
    "shard_rows",
    "sync_buffers",
]

DEFAULT_TIMEOUT = 300.0  # seconds a rank waits in one collective before aborting the job

_MPI_HINT = ("pip install mpi4py mpich (or: pip install 'rawgan[mpi]' with an MPI library "
             "such as Debian's mpich or openmpi installed)")


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the timeout (raised instead of aborting when
    the communicator was made with ``on_timeout="raise"``). The timed-out collective stays
    pending (MPI cannot cancel one), so every later collective on that communicator raises
    this too: make a new communicator (or end the job)."""


class PeerError(RuntimeError):
    """Rank 0 failed at a step that every rank waits on (its message was printed there);
    the other ranks raise this and exit quietly."""


def mark_agreed(exc: BaseException) -> BaseException:
    """Mark ``exc`` as raised identically on every rank (a config error, a diverged loss
    on the all-reduced statistics, an error rank 0 broadcast): the job then ends cleanly,
    only rank 0 prints it, and no rank calls ``MPI_Abort``."""
    exc.rawgan_agreed = True  # type: ignore[attr-defined]
    return exc


def _is_device_array(buf) -> bool:
    return not isinstance(buf, np.ndarray) and hasattr(buf, "get") and hasattr(buf, "data")


# --------------------------------------------------------------------------------------
# Communicators
# --------------------------------------------------------------------------------------


class Communicator:
    """The seam: rank / size and the collectives a data-parallel run needs.

    ``step`` (set by the training loop) and the ``what`` argument of each collective name
    the place in a timeout message. ``calls``, ``seconds`` and ``bytes`` count the
    all-reduces (``seconds`` is wall time inside them, waiting for slower ranks included).
    """

    rank: int = 0
    size: int = 1
    kind: str = "single"

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not (float(timeout) > 0):
            raise ValueError(f"collective timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.step: int | None = None
        self.calls = 0
        self.seconds = 0.0
        self.bytes = 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def reset_counters(self) -> None:
        self.calls, self.seconds, self.bytes = 0, 0.0, 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"

    # -- collectives (the identity in one process) --------------------------------------
    def allreduce_sum(self, buf, what: str = "all-reduce"):
        """In place: ``buf <- sum over ranks of buf`` (same shape and dtype everywhere).
        Returns ``buf``."""
        return buf

    def allreduce_mean(self, buf, what: str = "all-reduce"):
        """In place: ``buf <- (1/S) sum over ranks of buf`` (a float array: an integer one
        cannot hold the mean, and 1/S would truncate to 0). Returns ``buf``."""
        if buf.dtype.kind != "f":
            raise TypeError(f"{what}: allreduce_mean needs a float array, got {buf.dtype}")
        if self.size > 1:
            self.allreduce_sum(buf, what)
            buf *= buf.dtype.type(1.0 / self.size)
        return buf

    def allreduce_max(self, buf, what: str = "all-reduce"):
        """In place: ``buf <- elementwise max over ranks``. Returns ``buf``."""
        return buf

    def bcast(self, buf, root: int = 0, what: str = "broadcast"):
        """In place: every rank's ``buf`` becomes root's. Returns ``buf``."""
        return buf

    def bcast_object(self, obj: Any, root: int = 0, what: str = "broadcast") -> Any:
        """Root's ``obj`` (any picklable object) on every rank."""
        return obj

    def barrier(self, what: str = "barrier") -> None:
        """Wait until every rank has reached this call."""

    def abort(self, code: int = 1) -> None:
        """End the whole job (every rank) with exit status ``code``."""
        raise SystemExit(code)

    # -- helpers built on the collectives ------------------------------------------------
    def root_first(self, fn: Callable[[], Any], what: str = "setup") -> Any:
        """Run ``fn`` on rank 0, then, if it succeeded, on the other ranks (rank 0 may
        download or build a cache the others then read). An exception on rank 0 is raised
        there and as :class:`PeerError` on the others, marked agreed (as
        :meth:`root_result`, which broadcasts only rank 0's success here, not its result)."""
        mine: list = []

        def on_root() -> None:
            mine.append(fn())

        self.root_result(on_root, what)
        return mine[0] if mine else fn()

    def root_result(self, fn: Callable[[], Any], what: str = "setup") -> Any:
        """Run ``fn`` on rank 0 only and return its result on every rank (broadcast). An
        exception on rank 0 is raised there and as :class:`PeerError` on the others, both
        marked agreed."""
        if self.size == 1:
            return fn()
        if self.is_root:
            try:
                out = fn()
            except BaseException as exc:
                self.bcast_object((False, f"{type(exc).__name__}: {exc}"), what=what)
                mark_agreed(exc)
                raise
            self.bcast_object((True, out), what=what)
            return out
        ok, out = self.bcast_object(None, what=what)
        if not ok:
            raise mark_agreed(PeerError(f"rank 0 failed during {what}: {out}"))
        return out


class SingleProcess(Communicator):
    """One process, no MPI: rank 0 of 1, every collective the identity."""


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"distributed training needs mpi4py and an MPI library "
                          f"({exc}): {_MPI_HINT}") from None
    return MPI


class MPICommunicator(Communicator):
    """mpi4py over ``comm`` (default ``MPI.COMM_WORLD``). Host (NumPy) buffers travel as
    they are; device buffers are copied to the host and back (use :class:`NCCLCommunicator`
    for GPUs). Under plain ``python`` (no ``mpiexec``) MPI starts as a singleton: size 1."""

    kind = "mpi"

    #: polling: the first ``_SPIN`` seconds of a wait call ``Test()`` back to back, then
    #: sleep between calls, doubling from 20 microseconds to at most 1 ms
    _SPIN = 2e-4

    def __init__(self, comm=None, timeout: float = DEFAULT_TIMEOUT,
                 on_timeout: str = "abort") -> None:
        super().__init__(timeout)
        if on_timeout not in ("abort", "raise"):
            raise ValueError(f"on_timeout must be 'abort' or 'raise', got {on_timeout!r}")
        self.MPI = _import_mpi()
        self.comm = comm if comm is not None else self.MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.on_timeout = on_timeout
        self._timed_out_at: str | None = None  # a collective left pending by a raise

    # -- waiting with a deadline ---------------------------------------------------------
    def _wait(self, request, what: str) -> None:
        if self._timed_out_at is not None:
            # MPI cannot cancel a collective: the one that timed out is still pending, so
            # this one would pair with the wrong call on the other ranks
            raise CollectiveTimeout(f"rawgan distributed: rank {self.rank}: {what}: this "
                                    f"communicator is unusable since {self._timed_out_at} "
                                    "timed out (on_timeout='raise')")
        t0 = time.perf_counter()
        deadline = t0 + self.timeout
        pause = 2e-5
        while not request.Test():
            now = time.perf_counter()
            if now > deadline:
                self._timed_out(what, now - t0)
            if now - t0 > self._SPIN:
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)

    def _timed_out(self, what: str, waited: float) -> None:
        where = f" at step {self.step}" if self.step is not None else ""
        msg = (f"rawgan distributed: rank {self.rank} of {self.size}: {what}{where} did not "
               f"complete within {self.timeout:g} s (--collective-timeout): another rank has "
               f"died or hangs; ending the job")
        if self.on_timeout == "raise":
            self._timed_out_at = what + where
            raise CollectiveTimeout(msg)
        print(msg, file=sys.stderr, flush=True)
        self.abort(1)

    def abort(self, code: int = 1) -> None:
        _abort(self.comm, code)

    # -- collectives -------------------------------------------------------------------
    def _host_op(self, buf, what: str, op) -> Any:
        if self.size == 1:
            return buf
        t0 = time.perf_counter()
        host = buf.get() if _is_device_array(buf) else buf
        if not (isinstance(host, np.ndarray) and host.flags.c_contiguous):
            raise ValueError(f"{what}: the buffer must be a C-contiguous array")
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, host, op=op), what)
        if host is not buf:
            buf.set(host)
        self.calls += 1
        self.bytes += host.nbytes
        self.seconds += time.perf_counter() - t0
        return buf

    def allreduce_sum(self, buf, what: str = "all-reduce"):
        return self._host_op(buf, what, self.MPI.SUM)

    def allreduce_max(self, buf, what: str = "all-reduce"):
        return self._host_op(buf, what, self.MPI.MAX)

    def bcast(self, buf, root: int = 0, what: str = "broadcast"):
        if self.size == 1:
            return buf
        host = buf.get() if _is_device_array(buf) else buf
        self._wait(self.comm.Ibcast(host, root=root), what)
        if host is not buf:
            buf.set(host)
        return buf

    def bcast_object(self, obj: Any, root: int = 0, what: str = "broadcast") -> Any:
        """Pickle on root, broadcast the length, then the bytes (two ``Ibcast`` calls, each
        under the timeout)."""
        if self.size == 1:
            return obj
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if (
            self.rank == root) else b""
        n = np.array([len(payload)], dtype=np.int64)
        self.bcast(n, root, what)
        data = (np.frombuffer(payload, dtype=np.uint8).copy() if self.rank == root
                else np.empty(int(n[0]), dtype=np.uint8))
        self.bcast(data, root, what)
        return obj if self.rank == root else pickle.loads(data.tobytes())

    def barrier(self, what: str = "barrier") -> None:
        if self.size > 1:
            self._wait(self.comm.Ibarrier(), what)


class NCCLCommunicator(MPICommunicator):
    """NCCL for device (CuPy) buffers, MPI for everything else; one GPU per rank.

    Setup: the rank's index among the ranks on its node (``MPI_COMM_TYPE_SHARED``) picks
    ``cupy.cuda.Device(local_rank % device_count)``; rank 0 makes the NCCL unique id
    (``nccl.get_unique_id()``), MPI broadcasts it, every rank builds
    ``nccl.NcclCommunicator(size, uid, rank)``. An all-reduce is ``ncclAllReduce(SUM)`` in
    place on the current stream; the wait polls a CUDA event recorded after it until the
    deadline (then ``ncclCommAbort`` and ``MPI_Abort``). Not run on a GPU so far.
    """

    kind = "nccl"

    def __init__(self, comm=None, timeout: float = DEFAULT_TIMEOUT,
                 on_timeout: str = "abort") -> None:
        super().__init__(comm, timeout, on_timeout)
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError as exc:
            raise ImportError(f"NCCL all-reduce needs CuPy with NCCL ({exc}): pip install "
                              "cupy-cuda12x (NCCL ships with it)") from None
        self.cupy, self.nccl = cupy, nccl
        local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, local_size = local.Get_rank(), local.Get_size()
        local.Free()
        n_dev = cupy.cuda.runtime.getDeviceCount()
        if n_dev < 1:
            raise RuntimeError("NCCLCommunicator: no CUDA device visible on this node")
        if local_size > n_dev:  # NCCL refuses two ranks on one GPU
            raise RuntimeError(f"NCCLCommunicator: {local_size} ranks on this node but "
                               f"{n_dev} GPU(s): start at most one rank per GPU")
        self.device = cupy.cuda.Device(self.local_rank)
        self.device.use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.bcast_object(uid, what="NCCL unique id broadcast")
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                       np.dtype(np.float64): nccl.NCCL_FLOAT64}

    def _wait_event(self, event, what: str) -> None:
        t0 = time.perf_counter()
        pause = 2e-5
        while not event.done:
            now = time.perf_counter()
            if now - t0 > self.timeout:
                self.nccl_comm.abort()
                self._timed_out(what, now - t0)
            if now - t0 > self._SPIN:
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)

    def allreduce_sum(self, buf, what: str = "all-reduce"):
        if not _is_device_array(buf):
            return super().allreduce_sum(buf, what)
        if self.size == 1:
            return buf
        if np.dtype(buf.dtype) not in self._types or not buf.flags.c_contiguous:
            raise ValueError(f"{what}: NCCL buffers must be C-contiguous float32/float64")
        t0 = time.perf_counter()
        stream = self.cupy.cuda.get_current_stream()
        self.nccl_comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size,
                                 self._types[np.dtype(buf.dtype)], self.nccl.NCCL_SUM,
                                 stream.ptr)
        event = stream.record()
        self._wait_event(event, what)
        self.calls += 1
        self.bytes += buf.nbytes
        self.seconds += time.perf_counter() - t0
        return buf


def _abort(comm, code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(0.5)  # let mpiexec forward this rank's last output before it kills the job
    comm.Abort(code)
    os._exit(code)  # MPICH's MPI_Abort may return to the caller before the job is killed


def abort_job(exc: BaseException, what: str = "rawgan train") -> None:
    """From a rank of an MPI job that failed before (or while) its communicator was made:
    print the rank and the error, then ``MPI_Abort`` the whole job. Returns (and the caller
    raises) when there is no MPI or only one process."""
    mod = sys.modules.get("mpi4py.MPI")
    if mod is None or not mod.Is_initialized() or mod.Is_finalized():
        return
    world = mod.COMM_WORLD
    if world.Get_size() == 1:
        return
    print(f"{what}: rank {world.Get_rank()} of {world.Get_size()}: {type(exc).__name__}: "
          f"{exc}; ending the job", file=sys.stderr, flush=True)
    _abort(world, 1)


def get(kind: str = "mpi", timeout: float = DEFAULT_TIMEOUT) -> Communicator:
    """``get("single" | "mpi" | "nccl", timeout)``: a communicator (MPI or NCCL needs
    mpi4py; a clear ImportError names what is missing)."""
    key = str(kind).lower()
    if key == "single":
        return SingleProcess(timeout)
    if key == "mpi":
        return MPICommunicator(timeout=timeout)
    if key == "nccl":
        return NCCLCommunicator(timeout=timeout)
    raise ValueError(f"unknown communicator {kind!r}: expected single, mpi or nccl")


# --------------------------------------------------------------------------------------
# Gradient averaging
# --------------------------------------------------------------------------------------


class DistributedOptimizer:
    """Wrap an optimizer (as Horovod's DistributedOptimizer does): ``step()`` packs every
    gradient of the model into ONE preallocated flat buffer, all-reduces it (mean over the
    ranks, one call), unpacks it into the gradients and runs the wrapped update::

        flat = [g_1.ravel(); g_2.ravel(); ...]        (P values, the model's dtype)
        flat <- (1/S) sum_r flat_r                    (allreduce_mean)
        g_k <- flat[o_k : o_k + |g_k|].reshape(g_k.shape);  optimizer.step()

    Everything else (``lr``, ``iterations``, ``state_dict``, ...) is the wrapped
    optimizer's, which is what checkpoints store. ``seconds`` / ``calls`` count its
    all-reduces (time inside the collective); ``pack_seconds`` the copies in and out.
    """

    def __init__(self, optimizer, comm: Communicator, name: str = "model") -> None:
        self.optimizer = optimizer
        self.comm = comm
        self.name = name
        self._flat = None
        self.calls = 0
        self.seconds = 0.0
        self.pack_seconds = 0.0

    def __getattr__(self, attr: str):
        return getattr(self.optimizer, attr)

    def _buffer(self, grads: Sequence) -> Any:
        total = sum(int(g.size) for g in grads)
        dtype = grads[0].dtype
        if self._flat is None or self._flat.size != total or self._flat.dtype != dtype:
            self._flat = self.optimizer.model.ops.xp.empty(total, dtype=dtype)
        return self._flat

    def reset_counters(self) -> None:
        self.calls, self.seconds, self.pack_seconds = 0, 0.0, 0.0

    def step(self) -> None:
        """Average the gradients over the ranks (one all-reduce), then update."""
        if self.comm.size > 1:
            grads = [g for _, _, g in self.optimizer._params()]
            if grads:
                t0 = time.perf_counter()
                flat = self._buffer(grads)
                o = 0
                for g in grads:
                    flat[o:o + g.size] = g.reshape(-1)
                    o += g.size
                t1, c1 = time.perf_counter(), self.comm.seconds
                self.comm.allreduce_mean(flat, what=f"{self.name} gradient all-reduce")
                t2 = time.perf_counter()
                o = 0
                for g in grads:
                    g[...] = flat[o:o + g.size].reshape(g.shape)
                    o += g.size
                self.calls += 1
                self.seconds += self.comm.seconds - c1  # inside the collective
                self.pack_seconds += (t1 - t0) + (time.perf_counter() - t2)
        self.optimizer.step()


# --------------------------------------------------------------------------------------
# Sharding: data, noise, dropout
# --------------------------------------------------------------------------------------


def shard_rows(batch, comm: Communicator):
    """Rank r's contiguous rows ``[r*B/S, (r+1)*B/S)`` of a global batch (B, ...): a copy.

    Raises ValueError (marked agreed) when S does not divide B."""
    b = batch.shape[0]
    if b % comm.size:
        raise mark_agreed(ValueError(
            f"a global batch of {b} rows does not split evenly over {comm.size} ranks"))
    n = b // comm.size
    return batch[comm.rank * n:(comm.rank + 1) * n].copy()


def shard_noise(rng: np.random.Generator, noise_dim: int, comm: Communicator, ops=None,
                dtype=np.float32) -> Callable[[int], Any]:
    """``noise(n)`` for a rank holding n of every S*n rows: draws the GLOBAL batch
    (S*n, noise_dim) from ``rng`` (the same stream on every rank, the same numbers as
    :func:`rawgan.gan.gaussian_noise` in one process) and returns this rank's rows."""

    def noise(n: int):
        z = rng.standard_normal((n * comm.size, noise_dim), dtype=dtype)
        z = z[comm.rank * n:(comm.rank + 1) * n]
        return z if ops is None else ops.asarray(np.ascontiguousarray(z))

    return noise


def _swap(layer, cls, **attrs):
    """A ``cls`` instance sharing ``layer``'s state (params, grads, rng, name)."""
    new = object.__new__(cls)
    new.__dict__.update(layer.__dict__)
    new.__dict__.update(attrs)
    return new


def _row_uniforms(rng: np.random.Generator, starts: Sequence[int], rows: int, total: int,
                  row_shape: tuple[int, ...], dtype) -> np.ndarray:
    """The uniforms ``rng.random((total, *row_shape), dtype)[rows r0 .. r0 + rows - 1 for
    each r0 in starts]`` would give, drawing only those (the rest is skipped with
    PCG64.advance); ``rng`` ends where the full draw leaves it."""
    per = int(np.prod(row_shape, dtype=np.int64))
    pos, parts = 0, []
    for r0 in starts:
        skip_uniforms(rng.bit_generator, r0 * per - pos, dtype)
        parts.append(rng.random((rows, *row_shape), dtype=dtype))
        pos = (r0 + rows) * per
    skip_uniforms(rng.bit_generator, total * per - pos, dtype)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


_FAST_MASKS: dict[tuple, bool] = {}


def _fast_masks_ok(ops, dtype, rate: float) -> bool:
    """Whether drawing only a rank's uniforms reproduces ``ops.dropout_forward``'s global
    mask rows and final generator state exactly (checked once per backend, dtype and rate
    on a small case, from a buffered and an unbuffered PCG64 state); else the full mask is
    drawn."""
    key = (getattr(ops, "__name__", id(ops)), np.dtype(dtype).str, float(rate))
    if key not in _FAST_MASKS:
        ok = getattr(ops, "xp", None) is np
        for pre in (0, 1):
            if not ok:
                break
            shape = (2 * 3 * 2, 5, 3)  # 2 blocks, 3 ranks, 2 rows each
            ref = np.random.Generator(np.random.PCG64(12345))
            ref.random(pre, dtype=dtype)
            mine = np.random.Generator(np.random.PCG64(12345))
            mine.random(pre, dtype=dtype)
            state = mine.bit_generator.state
            _, full = ops.dropout_forward(np.ones(shape, dtype=dtype), rate, ref, True)
            for r in range(3):
                mine.bit_generator.state = state
                u = _row_uniforms(mine, [r * 2, 6 + r * 2], 2, 12, shape[1:], dtype)
                got = _mask_from_uniforms(u, rate)
                want = np.concatenate([full[r * 2:r * 2 + 2], full[6 + r * 2:8 + r * 2]])
                ok = ok and got.dtype == want.dtype and np.array_equal(got, want) and (
                    mine.bit_generator.state == ref.bit_generator.state)
        _FAST_MASKS[key] = bool(ok)
    return _FAST_MASKS[key]


def _mask_from_uniforms(u: np.ndarray, rate: float) -> np.ndarray:
    """numpy_ops.dropout_forward's mask from its uniforms: (u >= rate) / (1 - rate)."""
    np.greater_equal(u, rate, out=u, casting="unsafe")
    u *= 1.0 / (1.0 - rate)
    return u


class ShardedDropout(Dropout):
    """Dropout whose mask is rank r's rows of the mask one process draws for the global
    batch.

    The input of n_in rows is k blocks of ``rows`` (this rank's batch; k = 2 for the
    critic's ``[real; fake]``). The global batch is k blocks of S*rows, and one process
    draws ``mask = ops.dropout_forward(ones(k*S*rows, ...), rate, rng)`` from the layer's
    generator (the same state on every rank); rank r keeps rows
    ``[b*S*rows + r*rows, b*S*rows + (r+1)*rows)`` of each block b, and ``y = x * mask``,
    ``dL/dx = dy * mask`` as in :class:`Dropout`.

    On the NumPy backend with a PCG64 generator a rank draws only its own uniforms and
    skips the others' (``PCG64.advance``), so the draw costs 1/S of the full one; that
    this gives the same bits as the full draw is checked once per dtype and rate
    (:func:`_fast_masks_ok`), else (and on other backends) the full mask is drawn.
    """

    comm: Communicator
    rows: int

    @property
    def kind(self) -> str:
        return "Dropout"

    def _describe(self) -> str:
        return f", rate={self.rate}, sharded {self.comm.rank}/{self.comm.size}"

    def _forward(self, x, training):
        if not training or self.rate == 0.0 or self.comm.size == 1:
            return super()._forward(x, training)
        n = self.rows
        if x.shape[0] % n:
            raise ValueError(f"{self._where()}: input of {x.shape[0]} rows is not a whole "
                             f"number of blocks of this rank's {n} rows")
        k, s, r = x.shape[0] // n, self.comm.size, self.comm.rank
        if isinstance(self.rng.bit_generator, np.random.PCG64) and _fast_masks_ok(
                self.ops, x.dtype, self.rate):
            u = _row_uniforms(self.rng, [(b * s + r) * n for b in range(k)], n, k * s * n,
                              tuple(x.shape[1:]), x.dtype)
            mask = _mask_from_uniforms(u, self.rate)
            return x * mask, {"mask": mask, "y_shape": tuple(x.shape)}
        xp = self.ops.xp
        ones = xp.broadcast_to(xp.ones(1, dtype=x.dtype), (k * s * n, *x.shape[1:]))
        _, mask = self.ops.dropout_forward(ones, self.rate, self.rng, True)
        mask = xp.ascontiguousarray(mask.reshape(k, s, n, *x.shape[1:])[:, r]).reshape(x.shape)
        return x * mask, {"mask": mask, "y_shape": tuple(x.shape)}


class SyncBatchNorm(BatchNormalization):
    """Batch normalization with the GLOBAL batch's statistics (all ranks' rows).

    Forward (training), per channel over the m rows of this rank and M = S*m of all, the
    two passes of BatchNormalization, each finished by an all-reduce::

        mean = sum_all(x) / M,   var = sum_all((x - mean)^2) / M     (biased, as Keras)
        y = gamma * (x - mean) * inv_std + beta,   inv_std = 1 / sqrt(var + eps)

    (Two all-reduces, not one of ``[sum x, sum x^2]``: the one-pass ``E[x^2] - E[x]^2``
    cancels catastrophically in float32 when the mean is large against the spread, even
    shifted by the lagging moving mean: 4e-2 relative error of y at mean 100, std 0.1.)
        moving = momentum * moving + (1 - momentum) * (mean, var)

    Backward, ONE all-reduce of ``[sum dy, sum dy * xhat]`` (xhat = (x - mean) * inv_std)::

        dL/dx = gamma * inv_std * (dy - sum_all(dy) / M - xhat * sum_all(dy * xhat) / M)
        dL/dbeta = sum_local dy,   dL/dgamma = sum_local dy * xhat

    The parameter gradients stay this rank's sums: :class:`DistributedOptimizer` averages
    them with the rest. Inference uses the moving statistics, as BatchNormalization does.
    """

    comm: Communicator
    fuses_leaky_relu = False  # its own forward and backward (all-reduces) fuse nothing
    folds_leaky_relu_backward = False

    @property
    def kind(self) -> str:
        return "BatchNormalization"

    def _describe(self) -> str:
        return super()._describe() + f", synchronised over {self.comm.size} ranks"

    def _forward(self, x, training):
        if not training or self.comm.size == 1:
            return super()._forward(x, training)
        xp = self.ops.xp
        c = x.shape[-1]
        x2 = x.reshape(-1, c)
        m_all = x2.shape[0] * self.comm.size
        if m_all < 2:
            raise ValueError(f"{self._where()}: training needs at least 2 values per channel "
                             f"over all ranks, got {m_all}")
        p = self.params
        total = x2.sum(axis=0)
        self.comm.allreduce_sum(total, what=f"{self._where()} mean all-reduce")
        mean = total / m_all
        xc = x2 - mean
        sq = xp.einsum("mc,mc->c", xc, xc)
        self.comm.allreduce_sum(sq, what=f"{self._where()} variance all-reduce")
        var = sq / m_all
        mom = float(self.momentum)
        p["moving_mean"] *= mom
        p["moving_mean"] += (1 - mom) * mean
        p["moving_variance"] *= mom
        p["moving_variance"] += (1 - mom) * var
        inv_std = 1 / xp.sqrt(var + float(self.epsilon))
        xc *= p["gamma"] * inv_std
        xc += p["beta"]
        y = xc.reshape(x.shape)
        return y, {"x": x, "mean": mean, "inv_std": inv_std, "training": True,
                   "y_shape": tuple(y.shape), "m_all": m_all}

    def _backward(self, dy, cache, input_grad, param_grads):
        if "m_all" not in cache:
            return super()._backward(dy, cache, input_grad, param_grads)
        xp = self.ops.xp
        c = dy.shape[-1]
        dy2 = dy.reshape(-1, c)
        xhat = (cache["x"].reshape(-1, c) - cache["mean"]) * cache["inv_std"]
        dbeta = dy2.sum(axis=0)
        dgamma = xp.einsum("mc,mc->c", dy2, xhat)
        if param_grads:
            self._accumulate("gamma", dgamma)
            self._accumulate("beta", dbeta)
        if not input_grad:
            return None
        buf = xp.concatenate([dbeta, dgamma])
        self.comm.allreduce_sum(buf, what=f"{self._where()} gradient-sums all-reduce")
        m_all = cache["m_all"]
        xhat *= buf[c:] / m_all
        xhat += buf[:c] / m_all
        dx = (dy2 - xhat) * (self.params["gamma"] * cache["inv_std"])
        return dx.reshape(dy.shape)


def _layers(model) -> Iterable[tuple[list, int]]:
    for i, layer in enumerate(model.layers):
        if isinstance(layer, Sequential):
            yield from _layers(layer)
        else:
            yield model.layers, i


def prepare_models(models: Sequence[Sequential], comm: Communicator, rows: int,
                   sync_batchnorm: bool = False) -> None:
    """Swap, in place, every Dropout of ``models`` for a :class:`ShardedDropout` (``rows``:
    this rank's rows of a global batch) and, with ``sync_batchnorm``, every
    BatchNormalization for a :class:`SyncBatchNorm`. The new layers share the old ones'
    parameters, gradients, generators and names. Nothing changes when ``comm.size == 1``.
    """
    if comm.size == 1:
        return
    for model in models:
        for layers, i in _layers(model):
            layer = layers[i]
            if isinstance(layer, Dropout) and not isinstance(layer, ShardedDropout):
                layers[i] = _swap(layer, ShardedDropout, comm=comm, rows=int(rows))
            elif (sync_batchnorm and isinstance(layer, BatchNormalization)
                  and not isinstance(layer, SyncBatchNorm)):
                layers[i] = _swap(layer, SyncBatchNorm, comm=comm)


# --------------------------------------------------------------------------------------
# Keeping the ranks identical
# --------------------------------------------------------------------------------------


def _buffers(models: Iterable[Sequential]) -> list:
    out = []
    for model in models:
        for layers, i in _layers(model):
            layer = layers[i]
            out += [layer.params[k] for k in sorted(layer.params) if k not in layer.trainable]
    return out


def sync_buffers(models: Sequence[Sequential], comm: Communicator) -> None:
    """Average every non-trainable weight (BatchNorm's moving statistics) of ``models`` over
    the ranks, in one all-reduce (float64). The moving update ``m <- a m + (1 - a) b_r`` is
    affine with the same coefficients on every rank, so the ranks' average of m is the
    moving average of the ranks' mean batch statistic, whenever it is taken: for the mean,
    the global batch's mean. Training never reads these statistics (it normalises with the
    batch's), so averaging changes no training step. Does nothing in one process."""
    models = [m for m in models if m is not None]
    if comm.size == 1 or not models:
        return
    bufs = _buffers(models)
    if not bufs:
        return
    xp = models[0].ops.xp
    flat = xp.concatenate([b.reshape(-1).astype(np.float64) for b in bufs])
    comm.allreduce_mean(flat, what="moving-statistics all-reduce")
    o = 0
    for b in bufs:
        b[...] = flat[o:o + b.size].reshape(b.shape)
        o += b.size


def _digest(arrays: Iterable) -> np.ndarray:
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        host = a.get() if _is_device_array(a) else np.asarray(a)
        h.update(np.ascontiguousarray(host).tobytes())
    return np.frombuffer(h.digest(), dtype=np.int64).copy()


def check_identical(named: dict[str, Iterable], comm: Communicator) -> None:
    """Raise RuntimeError (marked agreed) unless every rank holds bit-identical arrays in
    each group of ``named`` (e.g. ``{"generator weights": [...], ...}``): one all-reduce of
    ``[d, -d]`` with MAX per group digest d, so max == -max(-d) == min on every rank."""
    if comm.size == 1:
        return
    names = list(named)
    d = np.concatenate([_digest(named[k]) for k in names])
    buf = np.concatenate([d, -d])
    comm.allreduce_max(buf, what="parameter consistency check")
    k = len(names)
    differ = [names[i] for i in range(k) if buf[i] != -buf[k + i]]
    if differ:
        raise mark_agreed(RuntimeError(
            f"the {comm.size} ranks hold different {', '.join(differ)}"
            f"{f' at step {comm.step}' if comm.step is not None else ''}; data-parallel "
            f"training keeps them identical, so this is a bug (or a non-deterministic "
            f"backend)"))
