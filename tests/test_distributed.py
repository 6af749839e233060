"""Tests for rawgan.distributed: data-parallel training equals one process.

Unit tests run S "ranks" as threads of this process behind a small in-memory communicator
(no MPI needed): the flat-buffer gradient average, synchronised batch norm, sharded dropout,
the consistency check. The MPI tests launch ``mpiexec -n 2`` (mpi4py + an MPI library, as
.ci/run installs them; skipped where either is missing) on tiny float64 runs and compare
with one process: weights and optimizer state to 1e-10, ranks bit-identical, a 2-rank
checkpoint resumed by 1 rank, the collective timeout, a batch that does not split.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rawgan import checkpoint, distributed, optim
from rawgan.nn import BatchNormalization, Dense, Dropout, Sequential
from rawgan.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_dist_worker.py"
TOL = 1e-10


# --------------------------------------------------------------------------------------
# An in-process group of ranks (threads) for unit tests
# --------------------------------------------------------------------------------------


class _Group:
    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list = [None] * size
        self.barrier = threading.Barrier(size, timeout=30)


class ThreadComm(distributed.Communicator):
    """Rank ``rank`` of a :class:`_Group`: reductions in rank order (the same result on
    every rank), as an MPI library gives them."""

    kind = "threads"

    def __init__(self, group: _Group, rank: int) -> None:
        super().__init__()
        self.group, self.rank, self.size = group, rank, group.size

    def _reduce(self, buf, fn):
        g = self.group
        g.slots[self.rank] = np.array(buf, copy=True)
        g.barrier.wait()
        out = g.slots[0].copy()
        for r in range(1, self.size):
            out = fn(out, g.slots[r])
        g.barrier.wait()
        buf[...] = out
        self.calls += 1
        self.bytes += buf.nbytes
        return buf

    def allreduce_sum(self, buf, what="all-reduce"):
        return self._reduce(buf, np.add)

    def allreduce_max(self, buf, what="all-reduce"):
        return self._reduce(buf, np.maximum)

    def bcast_object(self, obj, root=0, what="broadcast"):
        g = self.group
        if self.rank == root:
            g.slots[root] = obj
        g.barrier.wait()
        out = g.slots[root]
        g.barrier.wait()
        return out


def run_ranks(size: int, fn):
    """``[fn(comm_0), ..., fn(comm_{S-1})]``, each in its own thread; re-raises."""
    group = _Group(size)
    results: list = [None] * size
    errors: list = []

    def target(r):
        try:
            results[r] = fn(ThreadComm(group, r))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# --------------------------------------------------------------------------------------
# Unit tests
# --------------------------------------------------------------------------------------


def test_single_process_communicator_is_the_identity():
    c = distributed.SingleProcess()
    buf = np.arange(5.0)
    assert c.allreduce_mean(buf) is buf and np.array_equal(buf, np.arange(5.0))
    assert c.allreduce_sum(buf) is buf and c.allreduce_max(buf) is buf
    assert c.bcast(buf) is buf and c.bcast_object({"a": 1}) == {"a": 1}
    c.barrier()
    assert (c.rank, c.size, c.is_root) == (0, 1, True)
    assert c.root_first(lambda: 3) == 3 and c.root_result(lambda: 4) == 4
    with pytest.raises(ValueError, match="timeout must be > 0"):
        distributed.SingleProcess(timeout=0)
    with pytest.raises(ValueError, match="unknown communicator"):
        distributed.get("carrier-pigeon")


def test_missing_mpi4py_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py -> ImportError
    with pytest.raises(ImportError, match="pip install mpi4py mpich"):
        distributed.get("mpi")


def _mlp(seed=0):
    return Sequential([Dense(5), Dense(3)], seed=seed)._built((None, 4), np.float64)


def _grads(model, x):
    model.zero_grad()
    y = model.forward(x)
    model.backward(np.ones_like(y) / len(x))  # L = mean over rows of sum(y)


def test_distributed_optimizer_in_one_process_is_the_plain_update():
    a, b = _mlp(), _mlp()
    oa, ob = optim.Adam(a, lr=1e-2), distributed.DistributedOptimizer(
        optim.Adam(b, lr=1e-2), distributed.SingleProcess(), "m")
    x = np.random.default_rng(0).standard_normal((6, 4))
    for _ in range(3):
        _grads(a, x)
        oa.step()
        _grads(b, x)
        ob.step()
    for (_, p, _), (_, q, _) in zip(a.parameters(), b.parameters(), strict=True):
        assert p.tobytes() == q.tobytes()
    assert ob.iterations == 3 and ob.state_dict()["iterations"] == 3  # the wrapped one's
    assert ob.calls == 0  # one process: nothing to all-reduce


def test_gradient_average_is_one_allreduce_and_equals_the_global_batch():
    """Two ranks on halves of a batch of 8 == one process on the whole batch (float64),
    with exactly one all-reduce per optimizer step over all parameters."""
    x = np.random.default_rng(1).standard_normal((8, 4))
    ref = _mlp()
    ref_opt = optim.SGD(ref, lr=0.1, momentum=0.5)
    for _ in range(3):
        _grads(ref, x)
        ref_opt.step()

    def rank(comm):
        m = _mlp()
        opt = distributed.DistributedOptimizer(optim.SGD(m, lr=0.1, momentum=0.5), comm, "m")
        for _ in range(3):
            _grads(m, distributed.shard_rows(x, comm))
            opt.step()
        return m.get_weights(), comm.calls, opt.calls

    out = run_ranks(2, rank)
    for w, calls, opt_calls in out:
        assert calls == 3 and opt_calls == 3
        for k, v in ref.get_weights().items():
            assert np.abs(w[k] - v).max() < 1e-14, k
    assert all(out[0][0][k].tobytes() == out[1][0][k].tobytes() for k in out[0][0])


def test_shard_rows_and_noise_partition_the_global_batch():
    x = np.arange(24.0).reshape(12, 2)
    parts = run_ranks(3, lambda c: distributed.shard_rows(x, c))
    assert np.array_equal(np.concatenate(parts), x)
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        run_ranks(3, lambda c: distributed.shard_rows(x[:10], c))
    ref = np.random.default_rng(5).standard_normal((12, 3))

    def noise(comm):
        draw = distributed.shard_noise(np.random.default_rng(5), 3, comm, dtype=np.float64)
        return draw(4)

    assert np.array_equal(np.concatenate(run_ranks(3, noise)), ref)


@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bitgen", ["pcg64", "pcg64-buffered", "philox"])
def test_sharded_dropout_draws_the_global_mask(blocks, dtype, bitgen):
    """blocks=2 is the critic's [real; fake]: a rank's rows are its block of each half.
    PCG64 (what models use): a rank draws only its own uniforms and skips the others';
    "buffered": a float32 half is waiting in the generator; Philox: the full mask is drawn
    and sliced. Either way: the same mask bits and generator state as one process."""
    n, size = 3, 2
    rng = np.random.default_rng(2)
    x = rng.standard_normal((blocks * size * n, 4, 5)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)

    def model():
        m = Sequential([Dropout(0.4)], seed=9)._built((None, 4, 5), dtype)
        if bitgen == "philox":
            m.layers[0].rng = np.random.Generator(np.random.Philox(9))
        if bitgen == "pcg64-buffered":
            m.layers[0].rng.random(3, dtype=np.float32)
        return m

    ref = model()
    y_ref = ref.forward(x)
    dx_ref = ref.backward(dy)

    def rows(r):
        return np.concatenate([np.arange(b * size * n + r * n, b * size * n + (r + 1) * n)
                               for b in range(blocks)])

    def rank(comm):
        m = model()
        distributed.prepare_models([m], comm, rows=n)
        assert isinstance(m.layers[0], distributed.ShardedDropout)
        assert m.layers[0].kind == "Dropout" and m.layers[0].name == "dropout"
        idx = rows(comm.rank)
        y = m.forward(x[idx])
        dx = m.backward(dy[idx])
        return idx, y, dx, checkpoint.rng_state(m.layers[0].rng)

    for idx, y, dx, state in run_ranks(size, rank):
        assert y.dtype == dtype
        assert np.array_equal(y, y_ref[idx]) and np.array_equal(dx, dx_ref[idx])
        assert state == checkpoint.rng_state(ref.layers[0].rng)  # the generator advanced alike


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 3, 2)])
def test_sync_batchnorm_equals_batchnorm_on_the_global_batch(shape):
    size = 2
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape) * 2.0 + 0.7
    dy = rng.standard_normal(shape)
    c = shape[-1]

    def layer():
        bn = BatchNormalization(momentum=0.9)
        bn.build(shape, np.float64)
        bn.params["gamma"][:] = np.linspace(0.5, 1.5, c)
        bn.params["beta"][:] = np.linspace(-1, 1, c)
        bn.params["moving_mean"][:] = 0.3
        return bn

    ref = layer()
    y_ref = ref.forward(x)
    dx_ref = ref.backward(dy)

    def rank(comm):
        m = Sequential([layer()])
        m.build(shape, np.float64)
        distributed.prepare_models([m], comm, rows=shape[0] // size, sync_batchnorm=True)
        bn = m.layers[0]
        assert isinstance(bn, distributed.SyncBatchNorm) and bn.kind == "BatchNormalization"
        xs, dys = distributed.shard_rows(x, comm), distributed.shard_rows(dy, comm)
        y = bn.forward(xs)
        dx = bn.backward(dys)
        return y, dx, {k: v.copy() for k, v in bn.grads.items()}, dict(bn.params), comm.calls

    out = run_ranks(size, rank)
    n = shape[0] // size
    for r, (y, dx, _grads, params, calls) in enumerate(out):
        assert calls == 3  # two all-reduces in the forward (mean, variance), one backward
        assert np.abs(y - y_ref[r * n:(r + 1) * n]).max() < 1e-12
        assert np.abs(dx - dx_ref[r * n:(r + 1) * n]).max() < 1e-12
        for k in ("moving_mean", "moving_variance"):
            assert np.abs(params[k] - ref.params[k]).max() < 1e-14, k
    for k in ("gamma", "beta"):  # local sums; their sum over ranks is the global gradient
        assert np.abs(out[0][2][k] + out[1][2][k] - ref.grads[k]).max() < 1e-12, k


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (100.0, 0.1), (300.0, 0.05)])
def test_sync_batchnorm_float32_is_as_accurate_as_batchnorm(mean, std):
    """A mean large against the spread (the moving mean starts at 0 and lags): the global
    two-pass statistics keep float32 SyncBatchNorm within rounding of BatchNormalization
    (the one-pass E[x^2] - E[x]^2 it had was 4e-2 off at mean 100, std 0.1)."""
    size, shape = 2, (16, 4)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * std + mean).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)

    def layer(dtype):
        bn = BatchNormalization()
        bn.build(shape, dtype)
        return bn

    truth = layer(np.float64)
    y64, dx64 = truth.forward(x.astype(np.float64)), truth.backward(dy.astype(np.float64))
    ref = layer(np.float32)
    y_ref, dx_ref = ref.forward(x), ref.backward(dy)

    def rank(comm):
        m = Sequential([layer(np.float32)])
        m.build(shape, np.float32)
        distributed.prepare_models([m], comm, rows=shape[0] // size, sync_batchnorm=True)
        bn = m.layers[0]
        xs, dys = distributed.shard_rows(x, comm), distributed.shard_rows(dy, comm)
        return bn.forward(xs), bn.backward(dys)

    ys, dxs = zip(*run_ranks(size, rank), strict=True)
    y, dx = np.concatenate(ys), np.concatenate(dxs)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    # as close to the float64 truth as the single-process float32 layer is (with room)
    assert rel(y, y64) <= 4 * rel(y_ref, y64) + 1e-6
    assert rel(dx, dx64) <= 4 * rel(dx_ref, dx64) + 1e-6


def test_allreduce_mean_refuses_integer_buffers():
    def rank(comm):
        with pytest.raises(TypeError, match="needs a float array, got int64"):
            comm.allreduce_mean(np.array([2, 4, 6]) * (comm.rank + 1))
        return comm.allreduce_mean(np.array([2.0, 4.0, 6.0]) * (comm.rank + 1))

    for out in run_ranks(2, rank):
        np.testing.assert_array_equal(out, [3.0, 6.0, 9.0])


def test_sync_buffers_and_the_consistency_check():
    def rank(comm):
        m = Sequential([Dense(3), BatchNormalization()], seed=0)._built((None, 2), np.float64)
        bn = m.layers[1]
        bn.params["moving_mean"][:] = comm.rank  # ranks 0, 1 -> their mean 0.5
        distributed.sync_buffers([m, None], comm)
        same = bn.params["moving_mean"].copy()
        distributed.check_identical({"weights": list(m.weights().values())}, comm)
        bn.params["gamma"][0] += comm.rank  # rank 1 drifts
        try:
            distributed.check_identical({"weights": list(m.weights().values()),
                                         "other": [np.zeros(2)]}, comm)
        except RuntimeError as exc:
            return same, str(exc), getattr(exc, "rawgan_agreed", False)
        return same, None, False

    for same, msg, agreed in run_ranks(2, rank):
        assert np.array_equal(same, np.full(3, 0.5))
        assert msg is not None and "hold different weights" in msg and "other" not in msg
        assert agreed  # every rank raises it: the job ends cleanly


def test_root_first_reports_rank0_failure_to_the_others():
    def rank(comm):
        def setup():
            if comm.rank == 0:
                raise FileNotFoundError("no data here")
            return "loaded"

        try:
            comm.root_first(setup, what="loading the data")
        except (FileNotFoundError, distributed.PeerError) as exc:
            return type(exc).__name__, str(exc), getattr(exc, "rawgan_agreed", False)

    out = run_ranks(2, rank)
    assert out[0] == ("FileNotFoundError", "no data here", True)
    assert out[1][0] == "PeerError" and "rank 0 failed during loading the data" in out[1][1]


def test_config_options_and_validation():
    cfg = TrainConfig(distributed=True, sync_batchnorm=True, collective_timeout=5,
                      dtype="FLOAT64")
    assert cfg.dtype == "float64" and cfg.collective_timeout == 5.0
    with pytest.raises(ValueError, match="collective_timeout must be a positive"):
        TrainConfig(collective_timeout=0)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="float16")


def test_a_run_saved_before_these_options_existed_resumes(tmp_path):
    """A checkpoint whose config lacks dtype / distributed / ... (saved by an older
    rawgan) is the same run as one with their defaults."""
    pytest.importorskip("PIL.Image")
    pytest.importorskip("matplotlib")
    from rawgan.train import train

    kw = {"model": "mlp", "data": "ring", "num_examples": 256, "batch_size": 64,
          "noise_dim": 2, "progress": False, "out": str(tmp_path / "old")}
    train(TrainConfig(**kw, max_steps=2))
    import h5py

    with h5py.File(tmp_path / "old" / "checkpoint.h5", "r+") as f:
        config = json.loads(f.attrs["config"])
        for key in ("dtype", "distributed", "sync_batchnorm", "collective_timeout"):
            del config[key]
        f.attrs["config"] = json.dumps(config)
        f.attrs["format_version"] = 1  # as that rawgan wrote it: format 1, no checksum
        del f.attrs["sha256"]
    assert train(TrainConfig(**kw, max_steps=3), resume=True)["steps"] == 3


# --------------------------------------------------------------------------------------
# MPI: mpiexec -n 2 against one process
# --------------------------------------------------------------------------------------

def _find_mpiexec() -> str | None:
    """The mpiexec beside this Python (the PyPI mpich wheel puts it there), else on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.is_file() else shutil.which("mpiexec")


MPIEXEC = _find_mpiexec()


def _mpi_available() -> bool:
    try:
        import importlib.util

        return MPIEXEC is not None and importlib.util.find_spec("mpi4py") is not None
    except (ImportError, ValueError):
        return False


needs_mpi = pytest.mark.skipif(not _mpi_available(),
                               reason="needs mpi4py and mpiexec (pip install mpi4py mpich)")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _run(argv: list[str], ranks: int | None, timeout: float = 180
         ) -> subprocess.CompletedProcess:
    cmd = ([MPIEXEC, "-n", str(ranks)] if ranks else []) + [sys.executable, *argv]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _train(out: Path, ranks: int | None, *args: str) -> subprocess.CompletedProcess:
    argv = ["-m", "rawgan.cli", "train", "--quiet", "--out", str(out), *args]
    if ranks:
        argv.append("--distributed")
    res = _run(argv, ranks)
    assert res.returncode == 0, res.stderr
    return res


RING = ["--model", "mlp", "--data", "ring", "--num-examples", "512", "--batch-size", "64",
        "--noise-dim", "2", "--dtype", "float64", "--lr-g", "1e-3", "--lr-d", "1e-3"]


def _max_diff(a: checkpoint.Checkpoint, b: checkpoint.Checkpoint) -> float:
    assert a.weights.keys() == b.weights.keys()
    d = 0.0
    for n in a.weights:
        assert a.weights[n].keys() == b.weights[n].keys()
        for k in a.weights[n]:
            d = max(d, float(np.abs(a.weights[n][k] - b.weights[n][k]).max()))
    for n in a.optimizers:
        sa, sb = a.optimizers[n]["slots"], b.optimizers[n]["slots"]
        assert sa.keys() == sb.keys() and a.optimizers[n]["iterations"] == b.optimizers[n][
            "iterations"]
        for k in sa:
            d = max(d, float(np.abs(sa[k] - sb[k]).max()))
    assert a.rngs == b.rngs and a.layer_rngs == b.layer_rngs
    return d


def _losses(out: Path) -> np.ndarray:
    from rawgan.train import read_metrics

    return np.array([[r["d_loss"], r["g_loss"], r["d_real"], r["d_fake"]]
                     for r in read_metrics(out / "metrics.jsonl") if "d_loss" in r])


@needs_mpi
def test_two_ranks_equal_one_process_and_only_rank0_writes(tmp_path):
    """MLP GAN on the ring, float64, EMA on, 2 critic steps per step, 6 steps across an
    epoch boundary with a checkpoint per epoch: weights, Adam slots, EMA and every random
    stream equal the one-process run's (to 1e-10), the logged losses are the global batch's,
    and rank 0 alone wrote (the same files as one process)."""
    args = [*RING, "--max-steps", "6", "--d-steps", "2", "--ema", "0.9", "--save-every", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    _train(one, None, *args)
    res = _train(two, 2, *args)
    assert res.stdout.count("run folder:") == 1  # rank 0 reports, rank 1 is silent
    a, b = (checkpoint.load_checkpoint(p / "checkpoint.h5") for p in (one, two))
    assert _max_diff(a, b) < TOL
    assert b.meta["world_size"] == 2 and b.meta["step"] == 6
    assert np.abs(_losses(one) - _losses(two)).max() < TOL
    files = sorted(str(p.relative_to(two)) for p in two.rglob("*"))
    assert files == sorted(str(p.relative_to(one)) for p in one.rglob("*"))
    summary = json.loads((two / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["allreduce_calls"] >= 6 * 3


@needs_mpi
def test_two_rank_checkpoint_resumes_on_one_rank_and_on_two(tmp_path):
    """4 steps on 2 ranks, then 4 more on 1 (and, separately, on 2): the same weights as 8
    steps in one process."""
    full, mixed, same = tmp_path / "full", tmp_path / "mixed", tmp_path / "same"
    _train(full, None, *RING, "--max-steps", "8")
    _train(mixed, 2, *RING, "--max-steps", "4")
    shutil.copytree(mixed, same)
    _train(mixed, None, *RING, "--max-steps", "8", "--resume")
    _train(same, 2, *RING, "--max-steps", "8", "--resume")
    ref = checkpoint.load_checkpoint(full / "checkpoint.h5")
    for run in (mixed, same):
        ck = checkpoint.load_checkpoint(run / "checkpoint.h5")
        assert ck.meta["step"] == 8 and _max_diff(ref, ck) < TOL, run
        assert np.abs(_losses(full) - _losses(run)).max() < TOL


def _worker(out: Path, ranks: int | None, *args: str) -> list[dict[str, np.ndarray]]:
    res = _run([str(WORKER), "--out", str(out), *args], ranks)
    assert res.returncode == 0, res.stderr
    files = sorted(out.glob("rank_*.npz"))
    assert len(files) == (ranks or 1)
    return [dict(np.load(f)) for f in files]


def _params(d: dict) -> dict:
    return {k: v for k, v in d.items() if k.startswith(("w/", "slot/"))}


@needs_mpi
@pytest.mark.parametrize("flags, exact", [
    (["--sync-batchnorm"], True),                    # G: batch norm; D: dropout on [real; fake]
    (["--sync-batchnorm", "--d-batchnorm"], True),   # D with batch norm: two passes
    ([], False),                                     # per-rank batch norm
], ids=["sync-bn", "sync-bn-critic-bn", "per-rank-bn"])
def test_conv_gan_with_batchnorm_and_dropout(tmp_path, flags, exact):
    """A DCGAN-like float64 model (transposed convolutions + batch norm in G, convolutions
    + dropout in D), 4 steps of 2 critic updates: with synchronised batch norm 2 ranks equal
    1 process to 1e-10 (dropout masks included); with per-rank batch norm they do not (each
    rank normalises with its own 4 rows), but the ranks stay bit-identical either way."""
    args = ["--steps", "4", "--d-steps", "2", *flags]
    ref = _worker(tmp_path / "one", None, *args)[0]
    r0, r1 = _worker(tmp_path / "two", 2, *args)
    assert _params(r0).keys() == _params(ref).keys()
    for k in _params(r0):
        assert r0[k].tobytes() == r1[k].tobytes(), k  # ranks hold identical parameters
    assert r0["rngs"] == r1["rngs"] == ref["rngs"]  # dropout generators as one process's
    diff = max(float(np.abs(r0[k] - ref[k]).max()) for k in _params(r0))
    if exact:
        assert diff < TOL
    else:
        assert diff > 1e-6  # per-rank statistics are not the global batch's (documented)


@needs_mpi
def test_four_ranks_equal_one_process(tmp_path):
    """4 ranks (oversubscribing the 2 cores; 2 rows each of a batch of 8), batch norm in G
    and D synchronised, dropout in D: equal to 1 process to 1e-10, ranks bit-identical; and
    a 4-rank `rawgan train` checkpoint resumed on 2 ranks equals 1 process throughout."""
    args = ["--steps", "3", "--d-steps", "2", "--sync-batchnorm", "--d-batchnorm"]
    ref = _worker(tmp_path / "one", None, *args)[0]
    ranks = _worker(tmp_path / "four", 4, *args)
    for r in ranks[1:]:
        assert all(r[k].tobytes() == ranks[0][k].tobytes() for k in _params(r))
    assert max(float(np.abs(ranks[0][k] - ref[k]).max()) for k in _params(ref)) < TOL
    full, mixed = tmp_path / "full", tmp_path / "mixed"
    _train(full, None, *RING, "--max-steps", "6")
    _train(mixed, 4, *RING, "--max-steps", "3")
    _train(mixed, 2, *RING, "--max-steps", "6", "--resume")
    a, b = (checkpoint.load_checkpoint(p / "checkpoint.h5") for p in (full, mixed))
    assert _max_diff(a, b) < TOL and b.meta["world_size"] == 2


@needs_mpi
@pytest.mark.parametrize("fault", ["hang", "exit"])
def test_a_dead_rank_ends_the_job_with_a_message(tmp_path, fault):
    """Rank 1 hangs (or leaves) at step 2: rank 0's all-reduce times out after 2 s, it
    names itself and the step, and the job ends instead of hanging."""
    t0 = time.perf_counter()
    res = _run([str(WORKER), "--out", str(tmp_path), "--steps", "4", "--hang-rank", "1",
                "--at-step", "2", "--fault", fault, "--timeout", "2"], 2, timeout=90)
    elapsed = time.perf_counter() - t0
    assert res.returncode != 0
    assert ("rank 0 of 2: discriminator gradient all-reduce at step 2 did not complete "
            "within 2 s") in res.stderr
    assert "another rank has died or hangs" in res.stderr
    assert elapsed < 60
    assert not list(tmp_path.glob("rank_*.npz"))


@needs_mpi
def test_ctrl_c_stops_every_rank_at_the_same_step_and_saves(tmp_path):
    """SIGINT to mpiexec (it forwards Ctrl-C to the ranks): the ranks agree on the step to
    stop after (through the statistics all-reduce), rank 0 saves there and says so once,
    exit status 130; the run then resumes on one rank."""
    out = tmp_path / "run"
    argv = [MPIEXEC, "-n", "2", sys.executable, "-m", "rawgan.cli", "train", "--quiet",
            "--distributed", "--out", str(out), *RING, "--num-examples", "100000",
            "--epochs", "50"]
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait for some steps
            log = out / "metrics.jsonl"
            if log.is_file() and len(log.read_text().splitlines()) > 20:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.count("rawgan train: interrupted") == 1, err
    ck = checkpoint.load_checkpoint(out / "checkpoint.h5")
    assert ck.meta["step"] == len(_losses(out)) > 20
    _train(out, None, *RING, "--num-examples", "100000", "--epochs", "50", "--max-steps",
           str(ck.meta["step"] + 2), "--resume")


@needs_mpi
def test_a_rank_failing_before_its_communicator_ends_the_job():
    """Rank 1 fails while rank 0 already waits in a blocking call (as in the NCCL setup):
    abort_job names the rank and ends the job; without it rank 0 would wait for ever (MPI
    finalizes a rank that exits with an error as a normal end)."""
    code = ("import sys, time\n"
            "from mpi4py import MPI\n"
            "from rawgan import distributed\n"
            "if MPI.COMM_WORLD.Get_rank() == 1:\n"
            "    distributed.abort_job(RuntimeError('no CUDA device'))\n"
            "    sys.exit('abort_job returned')\n"
            "MPI.COMM_WORLD.Barrier()\n")
    t0 = time.perf_counter()
    res = _run(["-c", code], 2, timeout=60)
    assert res.returncode != 0
    assert "rank 1 of 2: RuntimeError: no CUDA device; ending the job" in res.stderr
    assert "abort_job returned" not in res.stderr
    assert time.perf_counter() - t0 < 30


@needs_mpi
def test_weights_that_overflow_stop_every_rank_alike(tmp_path):
    """Finite losses, but G's float32 update overflows to inf: the finiteness check before
    the save is one all-reduce, so every rank raises the same TrainingDiverged, printed once,
    and no checkpoint is written (not an abort from one rank)."""
    out = tmp_path / "run"
    argv = [a for a in RING if a not in ("--dtype", "float64")]
    res = _run(["-m", "rawgan.cli", "train", "--quiet", "--distributed", "--out", str(out),
                *argv, "--optimizer", "sgd", "--lr-g", "1e300", "--max-steps", "1"], 2)
    assert res.returncode == 1, res.stderr
    assert res.stderr.count("training diverged at step 1") == 1, res.stderr
    assert "generator weights hold NaN or inf" in res.stderr
    assert "MPI_Abort" not in res.stderr and "ending the job" not in res.stderr
    assert not (out / "checkpoint.h5").exists()


@needs_mpi
def test_batch_that_does_not_split_is_a_clear_error(tmp_path):
    res = _run(["-m", "rawgan.cli", "train", "--quiet", "--distributed", "--out",
                str(tmp_path / "bad"), *RING, "--batch-size", "63", "--max-steps", "1"], 2)
    assert res.returncode != 0
    msg = "batch_size 63 does not split over 2 ranks"
    assert res.stderr.count(msg) == 1, res.stderr  # printed by rank 0 only
    assert "multiple of 2" in res.stderr
    assert not (tmp_path / "bad").exists()  # nothing written


@needs_mpi
def test_distributed_without_mpiexec_is_one_rank(tmp_path):
    """--distributed under plain python: MPI starts as a singleton, size 1, same result."""
    _train(tmp_path / "plain", None, *RING, "--max-steps", "2")
    argv = ["-m", "rawgan.cli", "train", "--quiet", "--distributed", "--out",
            str(tmp_path / "single"), *RING, "--max-steps", "2"]
    res = _run(argv, None)
    assert res.returncode == 0, res.stderr
    a, b = (checkpoint.load_checkpoint(tmp_path / p / "checkpoint.h5")
            for p in ("plain", "single"))
    assert _max_diff(a, b) == 0.0 and b.meta["world_size"] == 1


@needs_mpi
def test_dcgan_seed_model_on_mnist_two_ranks_sync_bn(tmp_path, mnist_dir):
    """The seeds' DCGAN (batch norm in G, dropout in D) on real MNIST, float64, batch 8,
    3 steps, synchronised batch norm: 2 ranks equal 1 process to 1e-10."""
    args = ["--model", "dcgan", "--data-dir", str(mnist_dir), "--split", "test",
            "--no-download", "--num-examples", "64", "--batch-size", "8", "--dtype",
            "float64", "--max-steps", "3", "--sync-batchnorm", "--grid-size", "4"]
    _train(tmp_path / "one", None, *args)
    _train(tmp_path / "two", 2, *args)
    a, b = (checkpoint.load_checkpoint(tmp_path / p / "checkpoint.h5") for p in ("one", "two"))
    assert _max_diff(a, b) < TOL


@needs_mpi
def test_dcgan_per_rank_batchnorm_with_ema_keeps_ranks_identical(tmp_path, mnist_dir):
    """Per-rank batch norm, float32, EMA, a checkpoint and a sample grid every epoch: the
    moving statistics are averaged before each (else the consistency check at every
    checkpoint stops the run), and the run resumes on one rank."""
    args = ["--model", "dcgan", "--data-dir", str(mnist_dir), "--split", "test",
            "--no-download", "--num-examples", "32", "--batch-size", "8", "--ema", "0.9",
            "--save-every", "1", "--grid-size", "4"]
    run = tmp_path / "run"
    _train(run, 2, *args, "--epochs", "2")
    ck = checkpoint.load_checkpoint(run / "checkpoint.h5")
    assert ck.meta["world_size"] == 2 and ck.meta["step"] == 8
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["epoch_0001.png",
                                                                  "epoch_0002.png"]
    _train(run, None, *args, "--epochs", "3", "--resume")
    assert checkpoint.load_checkpoint(run / "checkpoint.h5").meta["step"] == 12


@pytest.mark.gpu
def test_nccl_allreduce_on_two_gpus(tmp_path):
    """NCCL all-reduce of a CuPy buffer over 2 ranks, one GPU each (needs 2 GPUs)."""
    cupy = pytest.importorskip("cupy")
    if not _mpi_available():
        pytest.skip("needs mpi4py and mpiexec")
    try:
        n_dev = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no driver
        n_dev = 0
    if n_dev < 2:
        pytest.skip("needs 2 CUDA GPUs (one per rank)")
    script = tmp_path / "nccl.py"
    script.write_text(
        "import cupy, numpy as np\n"
        "from rawgan import distributed\n"
        "c = distributed.get('nccl', timeout=60)\n"
        "x = cupy.full(1000, c.rank + 1.0)\n"
        "c.allreduce_mean(x, what='test')\n"
        "assert float(x[0]) == 1.5 and c.calls == 1, x[:3]\n"
        "print('ok', c.rank, c.device.id)\n")
    res = _run([str(script)], 2, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("ok") == 2


def _mpmd(per_rank: list[tuple[dict, list[str]]], timeout: float = 120
          ) -> subprocess.CompletedProcess:
    """One job, each rank its own environment additions and `rawgan train` arguments."""
    cmd = [MPIEXEC]
    for i, (env, argv) in enumerate(per_rank):
        cmd += ([":"] if i else []) + ["-n", "1", "env", *(f"{k}={v}" for k, v in env.items()),
                                        sys.executable, "-m", "rawgan.cli", "train",
                                        "--quiet", "--distributed", *argv]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@needs_mpi
def test_ranks_launched_with_other_settings_stop_at_once(tmp_path):
    """A rank with another --max-steps would hang in an all-reduce rank 0 never makes."""
    base = RING + ["--out", str(tmp_path / "run"), "--collective-timeout", "30"]
    res = _mpmd([({}, base + ["--max-steps", "4"]), ({}, base + ["--max-steps", "6"])])
    assert res.returncode != 0
    assert "rank 1 of 2: settings differ from rank 0's: max_steps: 4 -> 6" in res.stderr
    assert "rank 1 of 2 does not have rank 0's settings" in res.stderr
    assert "did not complete" not in res.stderr  # no timeout: a clean, agreed stop
    assert not (tmp_path / "run" / "checkpoint.h5").exists()


@needs_mpi
def test_ranks_with_other_training_data_stop_at_once(tmp_path, mnist_dir):
    """Each rank reads its own data folder (RAWGAN_DATA): other bytes are refused."""
    import gzip

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        raw = gzip.decompress((mnist_dir / f"{name}.gz").read_bytes())
        (a / name).write_bytes(raw)
        if "images" in name:  # the same header, the pixels inverted
            raw = raw[:16] + bytes(255 - v for v in raw[16:])
        (b / name).write_bytes(raw)
    args = ["--model", "mlp", "--split", "test", "--no-download", "--num-examples", "64",
            "--batch-size", "16", "--max-steps", "2", "--out", str(tmp_path / "run")]
    res = _mpmd([({"RAWGAN_DATA": a}, args), ({"RAWGAN_DATA": b}, args)])
    assert res.returncode != 0
    assert "rank 1 of 2: training data differ from rank 0's: data_sha256:" in res.stderr
    assert "rank 1 of 2 does not have rank 0's training data" in res.stderr


@needs_mpi
def test_a_divergence_on_every_rank_is_one_clean_agreed_stop(tmp_path):
    """lr 1e300: the logits overflow at the first step; the job ends printed once, no
    MPI_Abort. (lr 1e30 overflowed at step 4 on one CPU, at step 6 on another: with weights
    of 1e90 a logit's sign, and so whether BCE's gradient is 0, depends on the rounding.)"""
    res = _mpmd([({}, RING + ["--optimizer", "sgd", "--lr-d", "1e300", "--max-steps", "4",
                              "--out", str(tmp_path / "run")])] * 2)
    assert res.returncode == 1, res.stderr
    assert res.stderr.count("training diverged at step") == 1, res.stderr
    assert "MPI_Abort" not in res.stderr and "Abort(" not in res.stderr, res.stderr


_TIMEOUT_SCRIPT = r"""
import os, sys, time
import numpy as np
from rawgan import distributed
comm = distributed.MPICommunicator(timeout=0.5, on_timeout="raise")
if comm.rank == 0:
    msgs = []
    for _ in range(2):
        try:
            comm.allreduce_sum(np.ones(3), what="test all-reduce")
        except distributed.CollectiveTimeout as exc:
            msgs.append(str(exc))
    print("|".join(msgs), flush=True)
else:
    time.sleep(1.5)  # never joins: rank 0's all-reduce times out
sys.stdout.flush()
os._exit(0)  # (no MPI_Finalize with a collective pending)
"""


@needs_mpi
def test_a_timed_out_collective_leaves_the_communicator_unusable():
    """on_timeout='raise': MPI cannot cancel the pending collective, so the next one would
    pair with the wrong call on the other ranks; it raises instead."""
    res = _run(["-c", _TIMEOUT_SCRIPT], 2, timeout=60)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.strip().split("|")
    assert "test all-reduce did not complete within 0.5 s" in first
    assert "communicator is unusable since test all-reduce timed out" in second
