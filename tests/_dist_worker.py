"""A small data-parallel GAN run for tests/test_distributed.py, launched as
``mpiexec -n S python tests/_dist_worker.py --out DIR ...`` (or plain ``python`` for the
one-process reference).

It drives the same pieces ``rawgan train --distributed`` uses (rawgan.distributed's
communicator, prepare_models, DistributedOptimizer, shard_rows, shard_noise,
sync_buffers and gan.train_step) on a DCGAN-like float64 model small enough for CI: a
generator with batch norm and transposed convolutions, a critic with convolutions and
dropout (and, with ``--d-batchnorm``, batch norm too). Each rank writes ``rank_R.npz``:
every weight, optimizer slot and the layers' generator states after ``--steps`` steps.

``--hang-rank R --at-step K`` makes rank R sleep (``--fault hang``) or leave without
taking part (``--fault exit``) at step K, to test the collective timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from rawgan import checkpoint, data, distributed, gan, optim
from rawgan.nn import (
    BatchNormalization,
    Conv2D,
    Conv2DTranspose,
    Dense,
    Dropout,
    Flatten,
    LeakyReLU,
    Reshape,
    Sequential,
    Tanh,
)

NOISE = 6


def build(seed: int, d_batchnorm: bool) -> tuple[Sequential, Sequential]:
    G = Sequential([
        Dense(4 * 4 * 8, use_bias=False), BatchNormalization(), LeakyReLU(),
        Reshape((4, 4, 8)),
        Conv2DTranspose(4, 3, strides=2, padding="same", use_bias=False),
        BatchNormalization(), LeakyReLU(),
        Conv2DTranspose(1, 3, strides=2, padding="same"), Tanh(),
    ], name="generator", seed=seed)._built((None, NOISE), np.float64)
    d_layers = [Conv2D(8, 3, strides=2, padding="same"), LeakyReLU(), Dropout(0.3)]
    if d_batchnorm:
        d_layers.append(BatchNormalization())
    d_layers += [Conv2D(16, 3, strides=2, padding="same"), LeakyReLU(), Dropout(0.3),
                 Flatten(), Dense(1)]
    D = Sequential(d_layers, name="discriminator", seed=seed + 1)._built(
        (None, 16, 16, 1), np.float64)
    return G, D


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--d-steps", type=int, default=2)
    p.add_argument("--sync-batchnorm", action="store_true")
    p.add_argument("--d-batchnorm", action="store_true")
    p.add_argument("--mpi", action="store_true", help="use MPI even in one process")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--hang-rank", type=int, default=None)
    p.add_argument("--at-step", type=int, default=2)
    p.add_argument("--fault", choices=("hang", "exit"), default="hang")
    a = p.parse_args(argv)

    comm = distributed.get("mpi", a.timeout) if a.mpi else None
    if comm is None:
        try:
            from mpi4py import MPI  # noqa: F401  (under mpiexec: the MPI communicator)
            comm = distributed.get("mpi", a.timeout)
        except ImportError:
            comm = distributed.SingleProcess(a.timeout)
    G, D = build(0, a.d_batchnorm)
    opt_g = optim.Adam(G, lr=2e-3, beta_1=0.5)
    opt_d = optim.Adam(D, lr=2e-3, beta_1=0.5)
    step_g, step_d = opt_g, opt_d
    data_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(7).spawn(2))
    if comm.size > 1:
        distributed.prepare_models([G, D], comm, a.batch_size // comm.size, a.sync_batchnorm)
        step_g = distributed.DistributedOptimizer(opt_g, comm, "generator")
        step_d = distributed.DistributedOptimizer(opt_d, comm, "discriminator")
        noise = distributed.shard_noise(noise_rng, NOISE, comm, dtype=np.float64)
    else:
        noise = gan.gaussian_noise(noise_rng, NOISE, dtype=np.float64)
    x = np.tanh(np.random.default_rng(3).standard_normal((64, 16, 16, 1)))
    batches = data.iterate_minibatches(x, a.batch_size, data_rng)
    losses = []
    for step in range(1, a.steps + 1):
        comm.step = step
        if a.hang_rank == comm.rank and step == a.at_step:
            if a.fault == "exit":
                return 0  # leaves without taking part (mpi4py finalizes at exit)
            time.sleep(120)
        reals = [distributed.shard_rows(next(batches), comm) if comm.size > 1
                 else next(batches) for _ in range(a.d_steps)]
        s = gan.train_step(G, D, step_g, step_d, "bce", reals, noise)
        losses.append([s.d_loss, s.g_loss])
    distributed.sync_buffers([G, D], comm)
    arrays = {f"w/{m.name}/{k}": v for m in (G, D) for k, v in m.get_weights().items()}
    for name, opt in (("generator", opt_g), ("discriminator", opt_d)):
        arrays.update({f"slot/{name}/{k}": v for k, v in opt.state_dict()["slots"].items()})
    rng_states = {f"{m.name}/{layer.name}": checkpoint.rng_state(layer.rng)
                  for m in (G, D) for layer in m.layers}
    a.out.mkdir(parents=True, exist_ok=True)
    np.savez(a.out / f"rank_{comm.rank}.npz", losses=np.array(losses),
             rngs=np.array(json.dumps(rng_states, sort_keys=True)), **arrays)
    print(f"rank {comm.rank} of {comm.size}: {a.steps} steps, {comm.calls} all-reduces",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
