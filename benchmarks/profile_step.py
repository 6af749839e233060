"""Where a training step's GPU time goes: every kernel launch of one step, timed.

Usage (on a machine with an NVIDIA GPU and CuPy)::

    python benchmarks/profile_step.py                     # DCGAN, batch 64 and 256, FP32
    python benchmarks/profile_step.py --batches 256 --tf32 --json OUT.json

The step is ``rawgan.graphed.GraphedStep``'s body (rawgan kernels only) run eagerly after
warm-up. Timing an eager step launch by launch would time the host: the GPU finishes a
small kernel before Python has launched the next one. So the step's launches are queued
behind a spin kernel that holds the stream for ``--hold-ms``; the GPU then runs them back to
back, as a graph replay does, and a CUDA event recorded after every launch times each one
(launch i = event i+1 - event i: its run time and the gap to the next kernel; the sum is the
step's GPU time). If the spin ends before the last launch is queued, the profile is refused
(raise ``--hold-ms``). The same step captured as a CUDA graph and replayed is timed too, as
the reference for the sum.

Reported per (batch, TF32 on/off): the kernels grouped by family (``gemm_nn``,
``conv_wgrad``, ``bn_apply``, ``adam_mt``, ...: the name without its dtype and tile suffix),
each family's milliseconds and share of the step, and the slowest launches with their grids.
This is the profile that decides what to optimise next (issue 4: "optimise the ones the
profile says"), e.g. whether fusing LeakyReLU or the batch-norm statistics into GEMM
epilogues could pay: it pays at most the share of the kernels it removes.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from rawgan import models, optim  # noqa: E402
from rawgan.backends import cupy_ops  # noqa: E402
from rawgan.checkpoint import atomic_write  # noqa: E402
from rawgan.graphed import GraphedStep  # noqa: E402

SPIN_SOURCE = r"""
extern "C" __global__ void spin(long long cycles) {  // hold the stream: one thread waits
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {
    }
}
"""
_SUFFIX = re.compile(r"_(?:f32|f64|tf32)(?:_[A-Z])?$")


def family(kernel: str) -> str:
    """``gemm_nn_tf32_M`` -> ``gemm_nn``: a kernel's name without dtype and tile suffix."""
    return _SUFFIX.sub("", kernel)


def gpu_spin(cp, hold_ms: float):
    """A function that, when called, queues a kernel keeping the GPU busy for ~hold_ms."""
    kernel = cp.RawKernel(SPIN_SOURCE, "spin")
    # cudaDevAttrClockRate, in kHz: cycles per millisecond (the attribute, not the property
    # struct's clockRate, which CUDA 13 removed)
    khz = cp.cuda.Device().attributes["ClockRate"]
    cycles = np.int64(hold_ms * khz)
    return lambda: kernel((1,), (1,), (cycles,))


class LaunchTimer:
    """``with LaunchTimer(cp, spin): step()`` records a CUDA event after every rawgan kernel
    launch in the block (cupy_ops.LAUNCH_HOOK), the first launch queued behind ``spin()``.

    ``records()`` -> [(kernel, grid, ms)] in launch order, after the block."""

    def __init__(self, cp, spin) -> None:
        self.cp, self.spin = cp, spin
        self.events: list = []
        self.launches: list[tuple[str, tuple]] = []
        self.caught_up = False   # the GPU finished the spin before every launch was queued

    def _hook(self, kernel: str, grid: tuple, launch) -> None:
        cuda = self.cp.cuda
        if not self.events:
            self.spin()
            first = cuda.Event()
            first.record()
            self.events.append(first)
        elif self.events[0].done:  # the stream drained: launch timings would be host time
            self.caught_up = True
        launch()
        ev = cuda.Event()
        ev.record()
        self.events.append(ev)
        self.launches.append((kernel, grid))

    def __enter__(self) -> LaunchTimer:
        if cupy_ops.LAUNCH_HOOK is not None:
            raise RuntimeError("LaunchTimer: another launch hook is installed")
        cupy_ops.LAUNCH_HOOK = self._hook
        return self

    def __exit__(self, *exc) -> None:
        cupy_ops.LAUNCH_HOOK = None

    def records(self) -> list[tuple[str, tuple, float]]:
        if not self.launches:
            return []
        self.events[-1].synchronize()
        get = self.cp.cuda.get_elapsed_time
        return [(k, g, float(get(self.events[i], self.events[i + 1])))
                for i, (k, g) in enumerate(self.launches)]


def summarize(records: list[tuple[str, tuple, float]], top: int = 15) -> dict:
    """Group launch records by kernel family: launches, ms, share of the sum; the slowest."""
    total = sum(ms for _, _, ms in records)
    fam: dict[str, list[float]] = defaultdict(list)
    for kernel, _, ms in records:
        fam[family(kernel)].append(ms)
    families = sorted(({"family": f, "launches": len(v), "ms": sum(v),
                        "share": sum(v) / total if total else 0.0} for f, v in fam.items()),
                      key=lambda r: -r["ms"])
    slowest = sorted(records, key=lambda r: -r[2])[:top]
    return {"launches": len(records), "sum_ms": total, "families": families,
            "slowest": [{"kernel": k, "grid": list(g), "ms": ms} for k, g, ms in slowest]}


def _step(ops, model: str, n: int, capture: bool) -> GraphedStep:
    G, D = models.build(model, seed=0, backend=ops)
    return GraphedStep(G, D, optim.Adam(G, lr=1e-4), optim.Adam(D, lr=1e-4), "bce",
                       batch_size=n, d_steps=1, noise_dim=G.input_shape[0], seed=0,
                       capture=capture)


def profile_step(ops, n: int, *, model: str = "dcgan", tf32: bool = False,
                 hold_ms: float = 100.0, replays: int = 10, spin=None) -> dict:
    """Profile one ``model`` training step at batch ``n`` (k = 1, BCE, Adam): see the module
    docstring. ``spin`` (tests) replaces the GPU spin kernel."""
    cp = ops.xp
    before, cupy_ops.TF32 = cupy_ops.TF32, bool(tf32)
    try:
        eager = _step(ops, model, n, capture=False)
        real = [cp.asarray(np.random.default_rng(0).uniform(
            -1, 1, (n, *eager.image_shape)).astype(eager.dtype))]
        for _ in range(2):   # warm-up: compile the kernels, upload the pointer tables
            eager(real)
        timer = LaunchTimer(cp, spin if spin is not None else gpu_spin(cp, hold_ms))
        with timer:
            eager(real)
        if timer.caught_up:
            raise RuntimeError(f"profile_step: the GPU finished the {hold_ms} ms spin before "
                               "the step was queued; use a larger hold_ms")
        out = {"model": model, "batch": n, "tf32": bool(tf32), "hold_ms": hold_ms}
        out.update(summarize(timer.records()))
        graphed = _step(ops, model, n, capture=True)
        for _ in range(3):   # 2 eager warm-up steps, the capture and its launch
            graphed(real)
        times = []
        stream = graphed._stream
        for _ in range(replays):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            graphed.graph.launch(stream=stream)
            end.record(stream)
            end.synchronize()
            times.append(float(cp.cuda.get_elapsed_time(start, end)))
        out["graph_replay_ms"] = statistics.median(times)
        return out
    finally:
        cupy_ops.TF32 = before


def report(p: dict) -> str:
    lines = [f"{p['model']} step, batch {p['batch']}, TF32 {'on' if p['tf32'] else 'off'}: "
             f"{p['launches']} launches, {p['sum_ms']:.3f} ms back to back, graph replay "
             f"{p['graph_replay_ms']:.3f} ms"]
    lines.append(f"  {'family':<22}{'launches':>9}{'ms':>10}{'share':>8}")
    for r in p["families"]:
        lines.append(f"  {r['family']:<22}{r['launches']:>9}{r['ms']:>10.3f}"
                     f"{100 * r['share']:>7.1f}%")
    lines.append("  slowest launches:")
    for r in p["slowest"][:8]:
        lines.append(f"    {r['kernel']:<24} grid {str(tuple(r['grid'])):<16} {r['ms']:.3f} ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--model", choices=["dcgan", "mlp"], default="dcgan")
    p.add_argument("--tf32", action="store_true", help="profile the TF32 tiles too")
    p.add_argument("--hold-ms", type=float, default=100.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from rawgan import backends

    ops = backends.get("cupy")
    rows = []
    for n in args.batches:
        for tf32 in (False, True) if args.tf32 else (False,):
            rows.append(profile_step(ops, n, model=args.model, tf32=tf32,
                                     hold_ms=args.hold_ms))
            print(report(rows[-1]) + "\n")
    if args.json is not None:
        from bench_gpu import machine_info  # the device, versions, date and commit

        doc = {"machine": machine_info(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(args).items()},
               "profiles": rows}
        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
