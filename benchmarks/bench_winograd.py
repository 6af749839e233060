"""Winograd vs the direct (im2col / tap-group) convolutions, layer by layer, on the CPU.

For every convolution of the seed DCGAN and each pass (forward, input gradient, weight
gradient) this times numpy_ops with Winograd on and off in the same run (alternating
repeats), prints which passes take Winograd (its cost model decides, see
rawgan/backends/winograd.py), the multiply-adds the model predicted for each path, the
measured speed-up, and the float32 error of the default path against the float64 direct sum.

    python benchmarks/bench_winograd.py [--batch 64 --batch 256] [--repeats 7] [--json F]

MAC counts are per batch: direct = the taps that land on the input (what numpy_ops
multiplies), Winograd = :func:`rawgan.backends.winograd.winograd_macs` (GEMMs + transforms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from rawgan import models
from rawgan.backends import cpu_threads, winograd
from rawgan.backends import numpy_ops as ops
from rawgan.bench import helpers
from rawgan.checkpoint import atomic_write


def layers():
    """(name, kind, input (H, W, C), filters, kernel, stride, padding) of every conv."""
    G, D = models.build("dcgan", seed=0)
    for tag, model in (("G", G), ("D", D)):
        for layer in model.layers:
            kind = type(layer).__name__
            if kind in ("Conv2D", "Conv2DTranspose"):
                yield (f"{tag}.{layer.name}", kind, tuple(layer.input_shape), layer.filters,
                       layer.kernel_size, layer.strides, layer.padding)


def passes(kind, x, w, stride, padding):
    """{pass: (callable, predicted (winograd MACs or None, direct MACs))} for one layer."""
    rng = np.random.default_rng(1)
    if kind == "Conv2D":
        y = ops.conv2d_forward(x, w, None, stride, padding)
        dy = rng.standard_normal(y.shape).astype(x.dtype)
        # the conv maps x (C = w[2]) to y (O = w[3])
        conv_in, conv_out, wc = x.shape[1:3], y.shape[1:3], w.shape
        fns = {"fwd": lambda: ops.conv2d_forward(x, w, None, stride, padding),
               "dx": lambda: ops.conv2d_backward(dy, x, w, stride, padding, need_dw=False),
               "dw": lambda: ops.conv2d_backward(dy, x, w, stride, padding, need_dx=False)}
        gather, scatter = "fwd", "dx"
    else:
        y = ops.conv2d_transpose_forward(x, w, None, stride, padding)
        dy = rng.standard_normal(y.shape).astype(x.dtype)
        # the underlying conv maps y (C = w[2] = filters) back to x (O = w[3])
        conv_in, conv_out, wc = y.shape[1:3], x.shape[1:3], w.shape
        fns = {"fwd": lambda: ops.conv2d_transpose_forward(x, w, None, stride, padding),
               "dx": lambda: ops.conv2d_transpose_backward(dy, x, w, stride, padding,
                                                           need_dw=False),
               "dw": lambda: ops.conv2d_transpose_backward(dy, x, w, stride, padding,
                                                           need_dx=False)}
        gather, scatter = "dx", "fwd"
    s = ops.pair(stride, "strides")
    pads = ops.conv_geometry(*conv_in, wc[0], wc[1], s, padding)[2]
    n = x.shape[0]
    direct = n * ops._direct_macs(wc, conv_in, conv_out, s, pads)
    pred = {}
    stride1 = s == (1, 1)
    pred[gather] = (n * winograd.winograd_macs(wc[:2], conv_out, wc[2], wc[3])
                    if stride1 else None, direct)
    pred["dw"] = pred[gather]
    phased = ops._phase_kernel(w, s, pads, conv_in, conv_out)
    pred[scatter] = (None if phased is None else
                     n * winograd.winograd_macs(phased[0].shape[:2], phased[2], wc[3],
                                                phased[0].shape[3]), direct)
    return fns, pred


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.repeats < 1 or any(b < 1 for b in args.batch or []):
        ap.error(f"--repeats and --batch must be at least 1, got {args.repeats} and "
                 f"{args.batch}")
    batches = args.batch or [64, 256]
    calls = []
    real_corr, real_wgrad = winograd.correlate, winograd.weight_grad
    winograd.correlate = lambda *a, **k: calls.append(1) or real_corr(*a, **k)
    winograd.weight_grad = lambda *a, **k: calls.append(1) or real_wgrad(*a, **k)
    rows = []
    rng = np.random.default_rng(0)
    try:
        for n in batches:
            for name, kind, (h, w_, c), f, k, s, pad in layers():
                x = rng.standard_normal((n, h, w_, c)).astype(np.float32)
                shape = (*k, c, f) if kind == "Conv2D" else (*k, f, c)
                w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
                fns, pred = passes(kind, x, w, s, pad)
                for p, fn in fns.items():
                    calls.clear()
                    fn()
                    used = bool(calls)
                    times = {True: [], False: []}
                    for _ in range(args.repeats):
                        for on in (True, False):
                            winograd.ENABLED = on
                            times[on] += timed(fn, 1)
                    winograd.ENABLED = True
                    err = None
                    if used:  # float32 default path vs the float64 direct sum
                        got = fn()
                        xs = [x.astype(np.float64), w.astype(np.float64)]
                        fns64, _ = passes(kind, *xs, s, pad)
                        winograd.ENABLED = False
                        want = fns64[p]()
                        winograd.ENABLED = True
                        g = got[0] if p == "dx" else got[1] if p == "dw" else got
                        wt = want[0] if p == "dx" else want[1] if p == "dw" else want
                        err = float(np.abs(g - wt).max() / np.abs(wt).max())
                    t_on, t_off = (statistics.median(times[b]) for b in (True, False))
                    wmacs, dmacs = pred[p]
                    rows.append({"batch": n, "layer": name, "pass": p, "winograd": used,
                                 "ms_default": t_on * 1e3, "ms_direct": t_off * 1e3,
                                 "speedup": t_off / t_on,
                                 "predicted_macs_winograd": wmacs, "macs_direct": dmacs,
                                 "predicted_ratio": None if wmacs is None else dmacs / wmacs,
                                 "float32_max_error": err})
    finally:
        winograd.correlate, winograd.weight_grad = real_corr, real_wgrad
        winograd.ENABLED = True
    head = f"{'batch':>5}  {'layer':<24} {'pass':<4} {'path':<8} {'default ms':>10} " \
           f"{'direct ms':>9} {'speed-up':>8} {'predicted':>9} {'f32 err':>8}"
    print(f"threads {cpu_threads.num_threads()}, MARGIN {winograd.MARGIN}")
    print(head)
    print("-" * len(head))
    for r in rows:
        pr = "" if r["predicted_ratio"] is None else f"{r['predicted_ratio']:.2f}x"
        er = "" if r["float32_max_error"] is None else f"{r['float32_max_error']:.1e}"
        print(f"{r['batch']:>5}  {r['layer']:<24} {r['pass']:<4} "
              f"{'winograd' if r['winograd'] else 'direct':<8} {r['ms_default']:>10.1f} "
              f"{r['ms_direct']:>9.1f} {r['speedup']:>7.2f}x {pr:>9} {er:>8}")
    if args.json:  # the machine block bench_step.py writes (date, CPU, versions, git commit)
        info = helpers().machine_info(cpu_threads.num_threads())
        info.update(margin=winograd.MARGIN, repeats=args.repeats,
                    command="python benchmarks/bench_winograd.py")
        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
