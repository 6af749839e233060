"""Why the stride-2 conv forward is not Winograd'd: the experiment, kept runnable.

A stride-2 kxk correlation is a stride-1 one over the space-to-depth input: pad x so that
``2 * (Ho + r - 1)`` rows are read, fold each 2x2 block into the channels (4C), and fold the
kernel, zero-padded to (2r, 2r), into an (r, r, 4C, O) kernel, r = ceil(k / 2)::

    y[i, j] = sum_{a', b' < r} sum_{p, q < 2} xp[2(i + a') + p, 2(j + b') + q] w[2a' + p, 2b' + q]

The stride-1 3x3 correlation then runs by Winograd F(4x4, 3x3) (``winograd.correlate``).
This times it against numpy_ops' direct conv2d_forward for the discriminator's conv2d_1
(14x14, 64 -> 128, 5x5, stride 2, same), alternating repeats, and checks both against the
float64 direct sum. Measured 2026-12-04 (this script, AMD EPYC, 2 threads, batch 256,
medians of 7): Winograd 26.4-27.6 ms vs direct 20.4-22.2 ms with OpenBLAS's Haswell kernels
(the environment's OPENBLAS_CORETYPE), 26.9 vs 14.3 ms with its SkylakeX kernels
(``env -u OPENBLAS_CORETYPE``): slower, so numpy_ops does not use it.

    python benchmarks/bench_winograd_stride2.py [--batch 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from rawgan.backends import numpy_ops as ops
from rawgan.backends import winograd


def s2d_forward(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x (N, H, W, C) * w (k, k, C, O), stride 2, 'same' -> y (N, ceil(H/2), ceil(W/2), O),
    as a stride-1 Winograd correlation of the space-to-depth input."""
    n, h, wd, c = x.shape
    k, o = w.shape[0], w.shape[3]
    r = -(-k // 2)
    (pt, _), (pl, _) = (ops.conv_pads(h, k, 2, "same"), ops.conv_pads(wd, k, 2, "same", 1))
    ho, wo = -(-h // 2), -(-wd // 2)
    hp, wp = 2 * (ho + r - 1), 2 * (wo + r - 1)
    xp = np.zeros((n, hp, wp, c), x.dtype)
    xp[:, pt:pt + h, pl:pl + wd] = x[:, :hp - pt, :wp - pl]
    xs = xp.reshape(n, hp // 2, 2, wp // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    wz = np.zeros((2 * r, 2 * r, c, o), w.dtype)
    wz[:k, :k] = w
    ws = wz.reshape(r, 2, r, 2, c, o).transpose(0, 2, 1, 3, 4, 5)
    return winograd.correlate(np.ascontiguousarray(xs.reshape(n, hp // 2, wp // 2, 4 * c)),
                              np.ascontiguousarray(ws.reshape(r, r, 4 * c, o)),
                              ((0, 0), (0, 0)), (ho, wo))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 14, 14, 64))
    w = rng.standard_normal((5, 5, 64, 128)) * 0.05
    ref = ops.conv2d_forward(x, w, None, 2, "same")  # float64 direct sum
    x32, w32 = x.astype(np.float32), w.astype(np.float32)
    fns = {"direct": lambda: ops.conv2d_forward(x32, w32, None, 2, "same"),
           "s2d+winograd": lambda: s2d_forward(x32, w32)}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        err = float(np.abs(fn() - ref).max() / np.abs(ref).max())
        print(f"{name}: max error vs float64 direct {err:.1e} of the output's scale")
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts) * 1e3:.1f} ms, "
              f"min {min(ts) * 1e3:.1f} ms ({args.repeats} repeats, batch {args.batch})")


if __name__ == "__main__":
    main()
