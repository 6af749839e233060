"""Data-parallel scaling on the CPU: DCGAN training steps per second on 1 and 2 MPI ranks.

Usage::

    python benchmarks/bench_distributed.py [--batch 256] [--steps 6] [--warmup 2]
                                           [--json benchmarks/results/NAME.json]

Runs, each in its own process(es), the seed DCGAN (float32, numpy backend, bce, Adam 1e-4,
k = 1) on a GLOBAL batch of ``--batch`` synthetic images (tanh of normal noise: the speed
does not depend on the pixels), exactly the step ``rawgan train --distributed`` takes
(rawgan.distributed: sharded batch and noise, sharded dropout masks, one flat-buffer
gradient all-reduce per model, one all-reduce of the step's statistics):

* ``1 rank, 2 threads``: one process with both cores to OpenBLAS, the honest single-process
  baseline on this machine;
* ``1 rank, 1 thread``: one process, one core (the per-rank budget of the 2-rank runs);
* ``2 ranks, 1 thread each``: ``mpiexec -n 2``, per-rank batch norm (the default);
* ``2 ranks, 1 thread each, --sync-batchnorm``.

Reported per run: median and min step time after the warm-up steps, steps/s, images/s,
time in all-reduces per step (gradients, statistics, batch norm; wall time inside the
collective, so waiting for the slower rank is included), speedup and scaling efficiency
(speedup / ranks) against the 1-rank 1-thread run and the speedup against the 2-thread
one. Prints a table and writes JSON with the machine, date and commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def worker(args: argparse.Namespace) -> None:
    """One rank of a measured run: writes one JSON line (rank 0) to ``args.out``."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from rawgan import data, distributed, gan, models, optim

    comm = distributed.get("mpi", 600.0) if args.mpi else distributed.SingleProcess()
    G, D = models.build("dcgan", seed=0)
    opt_g, opt_d = optim.Adam(G, lr=1e-4), optim.Adam(D, lr=1e-4)
    step_g, step_d = opt_g, opt_d
    data_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(0).spawn(2))
    if comm.size > 1:
        distributed.prepare_models([G, D], comm, args.batch // comm.size, args.sync_batchnorm)
        step_g = distributed.DistributedOptimizer(opt_g, comm, "generator")
        step_d = distributed.DistributedOptimizer(opt_d, comm, "discriminator")
        noise = distributed.shard_noise(noise_rng, models.NOISE_DIM, comm)
    else:
        noise = gan.gaussian_noise(noise_rng, models.NOISE_DIM)
    n_images = args.batch * (args.steps + args.warmup)
    x = np.tanh(np.random.default_rng(1).standard_normal((n_images, 28, 28, 1),
                                                         dtype=np.float32))
    batches = data.iterate_minibatches(x, args.batch, data_rng)
    def grad_seconds() -> tuple[float, float]:  # (all-reduce, pack + unpack) so far
        return (sum(getattr(o, "seconds", 0.0) for o in (step_g, step_d)),
                sum(getattr(o, "pack_seconds", 0.0) for o in (step_g, step_d)))

    times, comm_s, grad_s, pack_s = [], [], [], []
    for i in range(args.warmup + args.steps):
        comm.barrier()  # every rank starts the step together
        c0, (g0, p0) = comm.seconds, grad_seconds()
        t0 = time.perf_counter()
        real = next(batches)
        real = distributed.shard_rows(real, comm) if comm.size > 1 else real
        s = gan.train_step(G, D, step_g, step_d, "bce", [real], noise)
        if comm.size > 1:  # as rawgan.train does: the global batch's statistics
            comm.allreduce_sum(np.array([s.d_loss, s.g_loss, s.d_real, s.d_fake, 0.0]),
                               what="training-statistics all-reduce")
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            g1, p1 = grad_seconds()
            times.append(dt)
            comm_s.append(comm.seconds - c0)
            grad_s.append(g1 - g0)
            pack_s.append(p1 - p0)
    # the slowest rank sets the pace: report rank 0's timings (they include its waits)
    if comm.is_root:
        grad_bytes = sum(int(np.prod(p.shape)) * 4 for m in (G, D) for _, p, _ in m.parameters())
        rec = {"label": args.label, "ranks": comm.size, "threads": os.environ.get(
                   "OPENBLAS_NUM_THREADS"), "sync_batchnorm": bool(args.sync_batchnorm),
               "batch": args.batch, "rows_per_rank": args.batch // comm.size,
               "steps": args.steps, "warmup": args.warmup,
               "step_s_median": statistics.median(times), "step_s_min": min(times),
               "step_s_all": [round(t, 4) for t in times],
               "steps_per_s": 1.0 / statistics.median(times),
               "images_per_s": args.batch / statistics.median(times),
               "allreduce_s_per_step": statistics.median(comm_s),
               "gradient_allreduce_s_per_step": statistics.median(grad_s),
               "pack_unpack_s_per_step": statistics.median(pack_s),
               "allreduce_calls_total": comm.calls,
               "gradient_buffer_bytes": grad_bytes, "d_loss_last": s.d_loss,
               "rawgan_from": str(Path(distributed.__file__).parents[1])}
        with open(args.out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all cores busy over ``seconds`` (from /proc/stat), before a run: other
    work on the machine would skew the timings, so it is recorded with each run."""
    def read():
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(f), f[3] + f[4]  # total, idle + iowait

    try:
        t0, i0 = read()
        time.sleep(seconds)
        t1, i1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (i1 - i0) / max(t1 - t0, 1), 3)


def _machine() -> dict:
    import numpy as np

    from rawgan.bench import cpu_name

    cpu = cpu_name()
    try:
        import mpi4py  # (not mpi4py.MPI: this driver process stays out of MPI)

        mpi = {"mpi4py": mpi4py.__version__}
        lib = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; "
                              "print(MPI.Get_library_version().splitlines()[0])"],
                             capture_output=True, text=True).stdout.strip()
        mpi["library"] = lib
    except ImportError:
        mpi = None
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "cpu": cpu, "cores_available": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "numpy": np.__version__, "mpi": mpi,
            "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty_files": (_git("status", "--porcelain") or "").splitlines(),
            "loadavg_start": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256, help="global batch (default: 256)")
    p.add_argument("--steps", type=int, default=6, help="measured steps (default: 6)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps (default: 2)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--rounds", type=int, default=2,
                   help="run every configuration this many times, interleaved; each reports "
                        "its round with the lowest median step (default: 2)")
    p.add_argument("--wait-quiet", type=float, default=300.0, metavar="S",
                   help="before each run wait up to S seconds for the cores to be idle "
                        "(< 15%% busy over 1 s), as other work skews timings (default: 300)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mpi", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sync-batchnorm", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--label", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.is_file() else shutil.which("mpiexec")
    if mpiexec is None:
        print("bench_distributed: needs mpiexec (pip install mpi4py mpich)", file=sys.stderr)
        return 1
    machine = _machine()
    lines = REPO / "benchmarks" / "results" / ".bench_distributed.jsonl"
    lines.unlink(missing_ok=True)
    runs = [("1 rank, 2 threads", 1, 2, False), ("1 rank, 1 thread", 1, 1, False),
            ("2 ranks, 1 thread each", 2, 1, False),
            ("2 ranks, 1 thread each, sync BN", 2, 1, True)]
    base = [sys.executable, str(Path(__file__).resolve()), "--worker", "--batch",
            str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--out", str(lines)]
    busy: list[float | None] = []
    for rnd in range(args.rounds):
        for label, ranks, threads, sync in runs:
            env = dict(os.environ, **{v: str(threads) for v in THREAD_VARS})
            cmd = ([mpiexec, "-n", str(ranks)] if ranks > 1 else []) + base + ["--label", label]
            cmd += ["--mpi"] if ranks > 1 else []
            cmd += ["--sync-batchnorm"] if sync else []
            deadline = time.monotonic() + args.wait_quiet
            while (b := cpu_busy()) is not None and b > 0.15 and time.monotonic() < deadline:
                pass
            busy.append(b)
            print(f"round {rnd + 1}: {label} (cores busy before: {b}) ...", file=sys.stderr,
                  flush=True)
            subprocess.run(cmd, env=env, check=True, cwd=REPO)
    every = [json.loads(line) for line in lines.read_text().splitlines()]
    for r, b in zip(every, busy, strict=True):
        r["cpu_busy_before"] = b
    lines.unlink()
    results = []
    for label, *_ in runs:
        mine = [r for r in every if r["label"] == label]
        best = min(mine, key=lambda r: r["step_s_median"])
        best["rounds_step_s_median"] = [round(r["step_s_median"], 4) for r in mine]
        results.append(best)
    machine["loadavg_end"] = list(os.getloadavg())
    by = {r["label"]: r for r in results}
    one, two_threads = by["1 rank, 1 thread"], by["1 rank, 2 threads"]
    for r in results:
        r["speedup_vs_1rank_1thread"] = r["steps_per_s"] / one["steps_per_s"]
        r["scaling_efficiency"] = r["speedup_vs_1rank_1thread"] / r["ranks"]
        r["speedup_vs_1rank_2threads"] = r["steps_per_s"] / two_threads["steps_per_s"]
        r["allreduce_fraction"] = r["allreduce_s_per_step"] / r["step_s_median"]

    hdr = (f"{'run (global batch ' + str(args.batch) + ')':36} {'step s':>7} {'steps/s':>8} "
           f"{'img/s':>6} {'allred s':>8} {'(grads)':>8} {'eff.':>5} {'vs 2thr':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r['label']:36} {r['step_s_median']:7.3f} {r['steps_per_s']:8.3f} "
              f"{r['images_per_s']:6.0f} {r['allreduce_s_per_step']:8.4f} "
              f"{r['gradient_allreduce_s_per_step']:8.4f} {r['scaling_efficiency']:5.2f} "
              f"{r['speedup_vs_1rank_2threads']:7.2f}")
    print("eff. = steps/s / (ranks x steps/s of 1 rank, 1 thread); vs 2thr = steps/s over "
          "the 1-process 2-thread run's; allred = wall time in all-reduces per step "
          "(waits for the slower rank included)")
    out = {"benchmark": "bench_distributed", "args": vars(args) | {"json": str(args.json)},
           "note": "each configuration's least disturbed round (lowest median step time); "
                   "rounds_step_s_median lists all rounds, cpu_busy_before the cores' load "
                   "just before that run (other work on the machine)",
           "model": "dcgan (seed), float32, numpy backend, bce, Adam 1e-4, d_steps 1",
           "machine": machine, "runs": results}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        from rawgan.checkpoint import atomic_write

        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
