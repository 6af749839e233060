"""GPU benchmarks: rawgan's CUDA kernels against cuBLAS (CuPy) and cuDNN (PyTorch), and the
whole DCGAN training step against PyTorch eager and PyTorch with a CUDA graph.

Usage (on a machine with an NVIDIA GPU, CuPy and, for the cuDNN rows, PyTorch with CUDA)::

    python benchmarks/bench_gpu.py                      # batches 64 256 1024, JSON written
    python benchmarks/bench_gpu.py --quick              # batch 64 only, few repeats (smoke)
    python benchmarks/bench_gpu.py --batches 256 --repeats 50 --json OUT.json

What is measured, all in the same run, float32, CUDA-event timing after warm-up (median and
minimum over ``--repeats``):

1. ``sgemm``: C = A @ B at 4096^3 (and the DCGAN's dense shapes) -- rawgan's gemm kernel vs
   ``cupy.matmul`` (cuBLAS, FP32: CuPy does not use TF32 unless CUPY_TF32=1) and ``torch.mm``
   with TF32 off and on; ``rawgan_tf32`` is rawgan's mma.sync path (cupy_ops.TF32), with its
   error against cuBLAS FP32. FLOP = 2 M N K.
2. ``layers``: every GEMM-shaped pass of the DCGAN (forward, backward-data, backward-weights
   of each dense / conv / transposed-conv layer) at batch 64, 256, 1024 -- rawgan's kernel vs
   cuDNN through ``torch.nn.functional.conv*`` / ``torch.ops.aten.convolution_backward`` in
   NCHW and channels_last with TF32 off and on, and vs a cuBLAS GEMM of the same implicit-GEMM
   shape (``cupy.matmul``: the ceiling an implicit GEMM could reach at cuBLAS speed).
   A ``numba`` column times rawgan's Numba CUDA backend (issue 5) on the same tensors.
   FLOP per pass (benchmarks/README.md's convention, taps over padding included):
   dense 2 N in out; conv 2 N Ho Wo kh kw Cin Cout; transposed conv 2 N H W kh kw Cin Cout
   with (H, W) its input size. The three passes of a layer count the same.
3. ``elementwise``: LeakyReLU forward/backward, bias add, batch norm forward/backward, tanh,
   dropout (NumPy's PCG64 numbers made on the GPU; the same numbers drawn on the host and
   uploaded, as for other bit generators; Philox), multi-tensor Adam over the DCGAN's parameters --
   GB/s from the MINIMUM bytes each op must move (stated per row: e.g. LeakyReLU forward reads
   x and writes y, 2 n itemsize), vs the same op written with CuPy elementwise / PyTorch.
4. ``step``: one k = 1 DCGAN training step (images/s = batch / median step time, wall clock,
   the device synchronised after each step):
     * ``rawgan library``: exactly ``rawgan.gan.train_step`` on the cupy backend (what
       ``rawgan train --backend cupy`` runs today: optim.Adam and rawgan.losses as CuPy
       array expressions, NumPy's dropout masks made on the GPU from the layer's PCG64);
     * ``rawgan fused``: ``rawgan.graphed.GraphedStep(capture=False)``, the same algorithm
       with rawgan kernels only (one-launch loss and gradient zeroing, device noise and Philox
       dropout, no host synchronisation inside the step), run eagerly;
     * ``rawgan graphed``: the same ``GraphedStep``, the whole step captured once as a
       CUDA graph and replayed (device noise and dropout, Adam's alpha from device memory),
       what ``rawgan train --backend cupy --cuda-graph`` runs; each step still reads its
       losses and D's outputs back to the host, as the torch rows read theirs;
       ``rawgan graphed tf32``: the same on the TF32 tensor-core tiles (cupy_ops.TF32; the
       torch rows with TF32 on are its like: cuDNN's convolutions default to TF32);
       ``rawgan graphed unfused``: the graphed step with ``Sequential.fuse = False``, every
       LeakyReLU its own kernel (``ratios_vs_graphed`` then reads the fusion's gain);
     * ``torch eager`` (NCHW and channels_last, TF32 off and on) and ``torch cuda graph``
       (the whole step captured once and replayed), bench_step.py's twin architecture.
   The target of issue 4: batch 256 at least 2x PyTorch eager and ahead of the CUDA graph.
5. ``profile``: where the step's GPU time goes -- every kernel launch of one rawgan step
   timed back to back (benchmarks/profile_step.py; FP32 and TF32 tiles), grouped by kernel
   family, against the CUDA-graph replay of the same step; and torch.profiler's per-kernel
   times of the torch eager step (NCHW, TF32 off and on).

The JSON (default ``benchmarks/results/gpu-<device>-<date>-<commit>.json``) holds the device,
driver/runtime versions, CuPy/PyTorch versions, date, commit and dirty flag, the arguments and
every row. Every ratio is ``reference time / rawgan time`` (above 1: rawgan is faster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import cupy as cp  # noqa: E402

from rawgan import backends, gan, models, optim  # noqa: E402
from rawgan.backends import cupy_ops  # noqa: E402
from rawgan.graphed import GraphedStep  # noqa: E402

DEV = "cuda"  # the PyTorch device of the reference rows

try:
    import torch
    import torch.nn.functional as F

    HAVE_TORCH = torch.cuda.is_available()
except ImportError:
    torch = None
    HAVE_TORCH = False


# --------------------------------------------------------------------------- timing

def time_cuda(fn, warmup: int, repeats: int, lib: str = "cupy") -> dict:
    """CUDA-event time of ``fn()`` on the current stream after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if lib == "torch":
        torch.cuda.synchronize()

        def ev():
            return torch.cuda.Event(enable_timing=True)
    else:
        cp.cuda.get_current_stream().synchronize()
        ev = cp.cuda.Event
    times = []
    for _ in range(repeats):
        start, end = ev(), ev()
        start.record()
        fn()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) if lib == "torch" else cp.cuda.get_elapsed_time(start, end)
        times.append(float(ms))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}


def time_wall(fn, warmup: int, repeats: int, sync) -> dict:
    """Wall-clock time of ``fn()`` followed by a device synchronisation (Python included)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}


def rate(r: dict, flop: float | None = None, nbytes: float | None = None) -> dict:
    out = dict(r)
    s = r["median_ms"] / 1e3
    if flop is not None:
        out["gflops"] = flop / s / 1e9
    if nbytes is not None:
        out["gbps"] = nbytes / s / 1e9
    return out


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def rawgan_tf32(fn):
    """``fn`` run with rawgan's TF32 tensor-core kernels (cupy_ops.TF32), then back to FP32."""
    def run():
        before = cupy_ops.TF32
        cupy_ops.TF32 = True
        try:
            return fn()
        finally:
            cupy_ops.TF32 = before
    return run


def ratios(row: dict, ours: str = "rawgan") -> dict:
    """``ref median / rawgan median`` for every reference entry of a row."""
    base = row[ours]["median_ms"]
    return {k: v["median_ms"] / base for k, v in row.items()
            if isinstance(v, dict) and "median_ms" in v and k != ours}


def rel_err(got, want) -> float:
    got, want = cp.asarray(got, dtype=cp.float64), cp.asarray(want, dtype=cp.float64)
    return float(cp.linalg.norm(got - want) / cp.linalg.norm(want))


# --------------------------------------------------------------------------- 1. SGEMM

def bench_sgemm(args, ops) -> list[dict]:
    rows = []
    for size in args.sgemm_sizes:
        m = k = n = size
        a = cp.random.standard_normal((m, k), dtype=cp.float32)
        b = cp.random.standard_normal((k, n), dtype=cp.float32)
        flop = 2.0 * m * n * k
        row = {"shape": [m, k, n], "flop": flop}
        row["rawgan"] = rate(time_cuda(lambda a=a, b=b: ops.dense_forward(a, b, None),
                                       args.warmup, args.repeats), flop)
        row["cublas_cupy"] = rate(time_cuda(lambda a=a, b=b: cp.matmul(a, b), args.warmup,
                                            args.repeats), flop)
        row["max_rel_err_vs_cublas"] = rel_err(ops.dense_forward(a, b, None), cp.matmul(a, b))
        tf = rawgan_tf32(lambda a=a, b=b: ops.dense_forward(a, b, None))
        row["rawgan_tf32"] = rate(time_cuda(tf, args.warmup, args.repeats), flop)
        row["rawgan_tf32_rel_err_vs_cublas_fp32"] = rel_err(tf(), cp.matmul(a, b))
        if HAVE_TORCH:
            ta, tb = torch.as_tensor(a, device=DEV), torch.as_tensor(b, device=DEV)
            for tf32 in (False, True):
                set_tf32(tf32)
                row[f"torch_mm_tf32_{'on' if tf32 else 'off'}"] = rate(time_cuda(
                    lambda ta=ta, tb=tb: torch.mm(ta, tb), args.warmup, args.repeats,
                    "torch"), flop)
            set_tf32(False)
        row["ratios"] = ratios(row)
        row["pct_of_cublas"] = 100.0 * row["ratios"]["cublas_cupy"]
        rows.append(row)
        print(f"sgemm {m}x{k}x{n}: rawgan {row['rawgan']['gflops']:.0f} GFLOP/s, cuBLAS "
              f"{row['cublas_cupy']['gflops']:.0f} GFLOP/s ({row['pct_of_cublas']:.0f}%)")
    return rows


# --------------------------------------------------------------------------- 2. layers

# (name, kind, per-sample input shape HWC or (in,), out channels, kernel, stride)
DCGAN_LAYERS = [
    ("G.dense", "dense", (100,), 7 * 7 * 256, None, None),
    ("G.convT1", "convT", (7, 7, 256), 128, 5, 1),
    ("G.convT2", "convT", (7, 7, 128), 64, 5, 2),
    ("G.convT3", "convT", (14, 14, 64), 1, 5, 2),
    ("D.conv1", "conv", (28, 28, 1), 64, 5, 2),
    ("D.conv2", "conv", (14, 14, 64), 128, 5, 2),
    ("D.dense", "dense", (7 * 7 * 128,), 1, None, None),
]


def _torch_conv_passes(kind, n, shape, co, k, s, channels_last):
    """Closures running cuDNN's forward / backward-data / backward-weights of one layer."""
    h, w, ci = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, ci, h, w, device=DEV).contiguous(memory_format=fmt)
    pad, opad = k // 2, (s - 1 if s > 1 else 0)
    if kind == "conv":
        wt = torch.randn(co, ci, k, k, device=DEV).contiguous(memory_format=fmt)
        y = F.conv2d(x, wt, None, s, pad)
        transposed, op = False, [0, 0]
    else:
        wt = torch.randn(ci, co, k, k, device=DEV).contiguous(memory_format=fmt)
        y = F.conv_transpose2d(x, wt, None, s, pad, opad)
        transposed, op = True, [opad, opad]
    dy = torch.randn_like(y).contiguous(memory_format=fmt)

    def bwd(mask):
        return lambda: torch.ops.aten.convolution_backward(
            dy, x, wt, None, [s, s], [pad, pad], [1, 1], transposed, op, 1, mask)

    def fwd():
        if kind == "conv":
            return F.conv2d(x, wt, None, s, pad)
        return F.conv_transpose2d(x, wt, None, s, pad, opad)

    return {"fwd": fwd, "dgrad": bwd([True, False, False]), "wgrad": bwd([False, True, False])}


def _same_work(flop: float, gemms: dict) -> dict:
    """The cuBLAS reference GEMM of each pass with the layer's MACs: the backward-data
    pass of a stride-s conv (and a transposed conv's forward) gives each output pixel only
    ~k^2/s^2 of the k^2 taps (the stride-phase decomposition), so its (M, k^2 c, N) GEMM
    would do s^2 times the layer's work; K becomes MACs / (M N) there."""
    out = {}
    for name, (m, kk, nn) in gemms.items():
        if 2.0 * m * kk * nn > 1.01 * flop:
            kk = max(1, round(flop / (2.0 * m * nn)))
        out[name] = (m, kk, nn)
    return out


def _layer_passes(ops, n, kind, shape, co, k, s):
    """rawgan's three passes of one layer, their FLOPs, and the cuBLAS GEMM shapes of the
    same work (:func:`_same_work`)."""
    if kind == "dense":
        fin = shape[0]
        x = cp.random.standard_normal((n, fin), dtype=cp.float32)
        w = cp.random.standard_normal((fin, co), dtype=cp.float32)
        dy = cp.random.standard_normal((n, co), dtype=cp.float32)
        ours = {"fwd": lambda: ops.dense_forward(x, w, None),
                "dgrad": lambda: ops.dense_backward(dy, x, w, need_dw=False),
                "wgrad": lambda: ops.dense_backward(dy, x, w, need_dx=False, need_db=False)}
        return ours, 2.0 * n * fin * co, {"fwd": (n, fin, co), "dgrad": (n, co, fin),
                                          "wgrad": (fin, n, co)}
    h, wd, ci = shape
    x = cp.random.standard_normal((n, h, wd, ci), dtype=cp.float32)
    if kind == "conv":
        w = cp.random.standard_normal((k, k, ci, co), dtype=cp.float32)
        y = ops.conv2d_forward(x, w, None, s, "same")
        ho, wo = y.shape[1:3]
        dy = cp.random.standard_normal(y.shape, dtype=cp.float32)
        ours = {"fwd": lambda: ops.conv2d_forward(x, w, None, s, "same"),
                "dgrad": lambda: ops.conv2d_backward(dy, x, w, s, "same", need_dw=False),
                "wgrad": lambda: ops.conv2d_backward(dy, x, w, s, "same", need_dx=False,
                                                     need_db=False)}
        flop = 2.0 * n * ho * wo * k * k * ci * co
        return ours, flop, _same_work(flop, {
            "fwd": (n * ho * wo, k * k * ci, co), "dgrad": (n * h * wd, k * k * co, ci),
            "wgrad": (k * k * ci, n * ho * wo, co)})
    w = cp.random.standard_normal((k, k, co, ci), dtype=cp.float32)
    y = ops.conv2d_transpose_forward(x, w, None, s, "same")
    ho, wo = y.shape[1:3]
    dy = cp.random.standard_normal(y.shape, dtype=cp.float32)
    ours = {"fwd": lambda: ops.conv2d_transpose_forward(x, w, None, s, "same"),
            "dgrad": lambda: ops.conv2d_transpose_backward(dy, x, w, s, "same", need_dw=False),
            "wgrad": lambda: ops.conv2d_transpose_backward(dy, x, w, s, "same", need_dx=False,
                                                           need_db=False)}
    flop = 2.0 * n * h * wd * k * k * ci * co
    return ours, flop, _same_work(flop, {
        "fwd": (n * ho * wo, k * k * co, ci), "dgrad": (n * h * wd, k * k * ci, co),
        "wgrad": (k * k * co, n * h * wd, ci)})


def _torch_dense_passes(n, fin, co):
    tx = torch.randn(n, fin, device=DEV)
    tw = torch.randn(fin, co, device=DEV)
    tdy = torch.randn(n, co, device=DEV)
    return {"fwd": lambda: torch.mm(tx, tw), "dgrad": lambda: torch.mm(tdy, tw.t()),
            "wgrad": lambda: torch.mm(tx.t(), tdy)}


def _cublas_gemm(m, k, n):
    a = cp.random.standard_normal((m, k), dtype=cp.float32)
    b = cp.random.standard_normal((k, n), dtype=cp.float32)
    return lambda: cp.matmul(a, b)


def _numba_ops():
    """rawgan's Numba backend on this GPU (it takes and returns CuPy arrays), or None."""
    try:
        return backends.get("numba")
    except Exception as exc:  # BackendUnavailable, or numba-cuda failing to load
        print(f"numba backend unavailable, its column is skipped: {exc}")
        return None


def bench_layers(args, ops) -> list[dict]:
    rows = []
    nb = _numba_ops() if args.numba else None
    for n in args.batches:
        for name, kind, shape, co, k, s in DCGAN_LAYERS:
            ours, flop, gemm = _layer_passes(ops, n, kind, shape, co, k, s)
            numba_passes = _layer_passes(nb, n, kind, shape, co, k, s)[0] if nb else {}
            torch_passes = {}
            if HAVE_TORCH and kind == "dense":
                torch_passes["rowmajor"] = _torch_dense_passes(n, shape[0], co)
            elif HAVE_TORCH:
                for cl in (False, True):
                    torch_passes["nhwc" if cl else "nchw"] = _torch_conv_passes(
                        kind, n, shape, co, k, s, cl)
            for pas in ("fwd", "dgrad", "wgrad"):
                row = {"batch": n, "layer": name, "kind": kind, "pass": pas, "flop": flop}
                row["rawgan"] = rate(time_cuda(ours[pas], args.warmup, args.repeats), flop)
                row["rawgan_tf32"] = rate(time_cuda(rawgan_tf32(ours[pas]), args.warmup,
                                                    args.repeats), flop)
                row["cublas_same_gemm"] = rate(time_cuda(_cublas_gemm(*gemm[pas]), args.warmup,
                                                         args.repeats), flop)
                if numba_passes:  # the Numba CUDA kernels (issue 5), same shapes
                    row["numba"] = rate(time_cuda(numba_passes[pas], args.warmup,
                                                  args.repeats), flop)
                for layout, passes in torch_passes.items():
                    for tf32 in (False, True):
                        set_tf32(tf32)
                        key = f"torch_{layout}_tf32_{'on' if tf32 else 'off'}"
                        row[key] = rate(time_cuda(passes[pas], args.warmup, args.repeats,
                                                  "torch"), flop)
                if HAVE_TORCH:
                    set_tf32(False)
                row["ratios"] = ratios(row)
                rows.append(row)
                best = {k: v for k, v in row["ratios"].items() if "tf32_off" in k}
                print(f"N={n:5d} {name:9s} {pas:5s}: rawgan {row['rawgan']['gflops']:8.0f} "
                      f"GFLOP/s  vs cuBLAS-GEMM x{row['ratios']['cublas_same_gemm']:.2f}"
                      + "".join(f"  {k} x{v:.2f}" for k, v in best.items())
                      + (f"  numba {row['numba']['gflops']:.0f} GFLOP/s" if "numba" in row
                         else ""))
    return rows


# --------------------------------------------------------------------------- 3. elementwise

def _elementwise_cases(ops, n, rng) -> tuple[tuple, dict]:
    """name -> (rawgan fn, {reference name: fn}, minimum bytes moved), on (n, 14, 14, 64)."""
    shape = (n, 14, 14, 64)  # the DCGAN's most common activation
    x = cp.random.standard_normal(shape, dtype=cp.float32)
    dy = cp.random.standard_normal(shape, dtype=cp.float32)
    b = cp.random.standard_normal(shape[-1], dtype=cp.float32)
    g, be = cp.ones(64, cp.float32), cp.zeros(64, cp.float32)
    mm, mv = cp.zeros(64, cp.float32), cp.ones(64, cp.float32)
    _, mean, inv = ops.batchnorm_forward(x, g, be, mm, mv)
    y = ops.tanh_forward(x)
    nb = x.size * 4
    other = np.random.Generator(np.random.SFC64(0))  # not PCG64: host draw
    cases = {
        "leaky_relu_fwd": (lambda: ops.leaky_relu_forward(x, 0.3),
                           {"cupy": lambda: cp.maximum(x, 0.3 * x)}, 2 * nb),
        "leaky_relu_bwd": (lambda: ops.leaky_relu_backward(dy, x, 0.3),
                           {"cupy": lambda: cp.where(x > 0, dy, 0.3 * dy)}, 3 * nb),
        "bias_add": (lambda: ops.bias_add_forward(x, b), {"cupy": lambda: x + b}, 2 * nb),
        "bias_grad": (lambda: ops.bias_add_backward(dy),
                      {"cupy": lambda: dy.reshape(-1, 64).sum(axis=0)}, nb),
        "tanh_fwd": (lambda: ops.tanh_forward(x), {"cupy": lambda: cp.tanh(x)}, 2 * nb),
        "tanh_bwd": (lambda: ops.tanh_backward(dy, y), {"cupy": lambda: dy * (1 - y * y)},
                     3 * nb),
        "batchnorm_fwd": (lambda: ops.batchnorm_forward(x, g, be, mm, mv), {}, 2 * nb),
        "batchnorm_bwd": (lambda: ops.batchnorm_backward(dy, x, g, mean, inv), {}, 3 * nb),
        "dropout_pcg64": (lambda: _dropout(ops, "numpy", x, rng), {}, 3 * nb),
        "dropout_upload": (lambda: _dropout(ops, "numpy", x, other), {}, 3 * nb),
        "dropout_philox": (lambda: _dropout(ops, "philox", x, rng), {}, 3 * nb),
    }
    if HAVE_TORCH:
        tx = torch.as_tensor(x, device=DEV).permute(0, 3, 1, 2)  # NHWC memory
        tdy = torch.as_tensor(dy, device=DEV).permute(0, 3, 1, 2)
        bn = torch.nn.BatchNorm2d(64, eps=1e-3, momentum=0.01).to(DEV).train()
        cases["leaky_relu_fwd"][1]["torch"] = lambda: F.leaky_relu(tx, 0.3)
        cases["leaky_relu_bwd"][1]["torch"] = lambda: torch.where(tx > 0, tdy, 0.3 * tdy)
        cases["tanh_fwd"][1]["torch"] = lambda: torch.tanh(tx)
        cases["batchnorm_fwd"][1]["torch"] = lambda: bn(tx)
        cases["dropout_philox"][1]["torch"] = lambda: F.dropout(tx, 0.3, True)
    return shape, cases


def bench_elementwise(args, ops) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for n in args.batches:
        shape, cases = _elementwise_cases(ops, n, rng)
        for name, (fn, refs, nbytes) in cases.items():
            row = {"batch": n, "op": name, "shape": list(shape), "min_bytes": nbytes,
                   "rawgan": rate(time_cuda(fn, args.warmup, args.repeats), nbytes=nbytes)}
            for rname, rfn in refs.items():
                row[rname] = rate(time_cuda(rfn, args.warmup, args.repeats,
                                            "torch" if rname == "torch" else "cupy"),
                                  nbytes=nbytes)
            row["ratios"] = ratios(row)
            rows.append(row)
            print(f"N={n:5d} {name:15s}: rawgan {row['rawgan']['gbps']:7.0f} GB/s"
                  + "".join(f"  {k} x{v:.2f}" for k, v in row["ratios"].items()))
    # multi-tensor Adam over the DCGAN's parameters (one launch) vs one CuPy expression each
    G, D = models.build("dcgan", seed=0, backend=ops)
    params = [p for mdl in (G, D) for _, p, _ in mdl.parameters()]
    grads = [cp.random.standard_normal(p.shape, dtype=p.dtype) for p in params]
    ms, vs = [cp.zeros_like(p) for p in params], [cp.zeros_like(p) for p in params]
    count = sum(p.size for p in params)
    nbytes = 7 * 4 * count  # read p g m v, write p m v

    def cupy_adam():
        for p, gr, m, v in zip(params, grads, ms, vs, strict=True):
            m += 0.1 * (gr - m)
            v += 0.001 * (gr * gr - v)
            p -= 1e-4 * m / (cp.sqrt(v) + 1e-7)

    row = {"op": "adam_all_params", "elements": count, "min_bytes": nbytes,
           "rawgan": rate(time_cuda(lambda: ops.adam_update(params, grads, ms, vs, 1e-4, 0.9,
                                                            0.999, 1e-7),
                                    args.warmup, args.repeats), nbytes=nbytes),
           "cupy_per_param": rate(time_cuda(cupy_adam, args.warmup, args.repeats),
                                  nbytes=nbytes)}
    if HAVE_TORCH:
        tp = [torch.nn.Parameter(torch.as_tensor(p, device=DEV).clone()) for p in params]
        for t, gr in zip(tp, grads, strict=True):
            t.grad = torch.as_tensor(gr, device=DEV).clone()
        for fused in (False, True):
            topt = torch.optim.Adam(tp, lr=1e-4, eps=1e-7, foreach=not fused, fused=fused)
            row[f"torch_adam_{'fused' if fused else 'foreach'}"] = rate(
                time_cuda(topt.step, args.warmup, args.repeats, "torch"), nbytes=nbytes)
    row["ratios"] = ratios(row)
    rows.append(row)
    print(f"adam ({count:,} params): rawgan {row['rawgan']['gbps']:.0f} GB/s"
          + "".join(f"  {k} x{v:.2f}" for k, v in row["ratios"].items()))
    return rows


def _dropout(ops, mode, x, rng):
    ops.set_dropout_rng(mode)
    try:
        return ops.dropout_forward(x, 0.3, rng)
    finally:
        ops.set_dropout_rng("numpy")


# --------------------------------------------------------------------------- 4. step

def torch_step_fns(n, channels_last, seed=0):
    """bench_step.py's twin DCGAN on the GPU: the eager step, and a CUDA-graph replay."""
    from bench_step import torch_models

    G, D = torch_models(channels_last, seed)
    G, D = G.to(DEV).train(), D.to(DEV).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    real = (torch.rand(n, 1, 28, 28, device=DEV) * 2 - 1).contiguous(memory_format=fmt)
    ones, zeros = torch.ones(n, 1, device=DEV), torch.zeros(n, 1, device=DEV)
    bce = F.binary_cross_entropy_with_logits
    d_params = list(D.parameters())

    def make_opts(capturable):
        return (torch.optim.Adam(G.parameters(), lr=1e-4, eps=1e-7, capturable=capturable),
                torch.optim.Adam(D.parameters(), lr=1e-4, eps=1e-7, capturable=capturable))

    def body(z, opt_g, opt_d):
        fake = G(z)
        logits = D(torch.cat([real, fake.detach()]))
        d_loss = bce(logits[:n], ones) + bce(logits[n:], zeros)
        opt_d.zero_grad(set_to_none=False)
        d_loss.backward()
        opt_d.step()
        for p in d_params:
            p.requires_grad_(False)
        g_loss = bce(D(fake), ones)
        opt_g.zero_grad(set_to_none=False)
        g_loss.backward()
        for p in d_params:
            p.requires_grad_(True)
        opt_g.step()
        return d_loss, g_loss

    eager_opts = make_opts(False)

    def eager():
        d, g = body(torch.randn(n, 100, device=DEV), *eager_opts)
        return d.item(), g.item()  # as a training loop logs them

    def graphed():
        opt_g, opt_d = make_opts(True)
        static_z = torch.randn(n, 100, device=DEV)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                body(static_z, opt_g, opt_d)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_d, static_g = body(static_z, opt_g, opt_d)

        def replay():
            static_z.normal_()
            graph.replay()
            return static_d.item(), static_g.item()

        return replay

    return eager, graphed


def _step_row(args, ops, n) -> dict:
    row = {"batch": n}
    sync = ops.synchronize
    G, D = models.build("dcgan", seed=0, backend=ops)
    opt_g, opt_d = optim.Adam(G, lr=1e-4), optim.Adam(D, lr=1e-4)
    real = cp.random.uniform(-1, 1, (n, 28, 28, 1), dtype=cp.float32)
    noise = gan.gaussian_noise(np.random.default_rng(0), 100, ops=ops)
    row["rawgan_library"] = time_wall(
        lambda: gan.train_step(G, D, opt_g, opt_d, "bce", [real], noise),
        args.warmup, args.step_repeats, sync)
    for key, capture, tf32, fuse in (("rawgan_fused", False, False, True),
                                     ("rawgan_graphed", True, False, True),
                                     ("rawgan_graphed_unfused", True, False, False),
                                     ("rawgan_graphed_tf32", True, True, True)):
        # the kernels (FMA or TF32 tiles) are chosen while the step is captured, then baked in
        before, cupy_ops.TF32 = cupy_ops.TF32, tf32
        G3, D3 = models.build("dcgan", seed=0, backend=ops)
        G3.fuse = D3.fuse = fuse
        graphed = GraphedStep(G3, D3, optim.Adam(G3, lr=1e-4), optim.Adam(D3, lr=1e-4),
                              "bce", batch_size=n, d_steps=1, noise_dim=100, seed=0,
                              capture=capture)
        try:
            for _ in range(3):  # 2 eager warm-up steps and the capture, then only replays
                graphed([real])
            row[key] = time_wall(lambda g=graphed: g([real]), args.warmup,
                                 args.step_repeats, sync)
            row[key]["replays"] = graphed.launches
        except Exception as exc:  # first GPU runs of the capture: record a failure, go on
            row[key] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            cupy_ops.TF32 = before
    if HAVE_TORCH:
        for cl in (False, True):
            for tf32 in (False, True):
                set_tf32(tf32)
                tag = f"{'nhwc' if cl else 'nchw'}_tf32_{'on' if tf32 else 'off'}"
                eager, graphed = torch_step_fns(n, cl)
                row[f"torch_eager_{tag}"] = time_wall(eager, args.warmup, args.step_repeats,
                                                      torch.cuda.synchronize)
                try:
                    row[f"torch_graph_{tag}"] = time_wall(
                        graphed(), args.warmup, args.step_repeats, torch.cuda.synchronize)
                except Exception as exc:  # capture can fail on some versions: record it
                    row[f"torch_graph_{tag}"] = {"error": f"{type(exc).__name__}: {exc}"}
        set_tf32(False)
    for v in row.values():
        if isinstance(v, dict) and "median_ms" in v:
            v["images_per_s"] = n / (v["median_ms"] / 1e3)
    row["ratios_vs_fused"] = ratios(row, "rawgan_fused")
    if "median_ms" in row["rawgan_graphed"]:
        row["ratios_vs_graphed"] = ratios(row, "rawgan_graphed")
    row["ratios_vs_library"] = ratios(row, "rawgan_library")
    return row


def bench_step(args, ops) -> list[dict]:
    rows = []
    for n in args.batches:
        row = _step_row(args, ops, n)
        rows.append(row)
        print(f"step N={n}: " + ", ".join(
            f"{k} {v['images_per_s']:.0f} img/s" for k, v in row.items()
            if isinstance(v, dict) and "images_per_s" in v))
    return rows


# --------------------------------------------------------------------------- 5. profile

def torch_profile(n: int, channels_last: bool, tf32: bool, steps: int = 3) -> dict:
    """Per-kernel CUDA time of the torch eager step (torch.profiler, CUDA activity only),
    averaged over ``steps`` steps after warm-up: what cuDNN spends where rawgan's profile
    shows its own kernels."""
    from torch.profiler import ProfilerActivity, profile

    set_tf32(tf32)
    try:
        eager, _ = torch_step_fns(n, channels_last)
        for _ in range(3):
            eager()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                eager()
            torch.cuda.synchronize()
    finally:
        set_tf32(False)
    rows = []
    for e in prof.key_averages():
        kind = str(getattr(e, "device_type", "CUDA"))
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if "CUDA" in kind and us > 0:
            rows.append({"kernel": e.key[:160], "calls": e.count / steps,
                         "ms": us / 1e3 / steps})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    return {"batch": n, "layout": "nhwc" if channels_last else "nchw", "tf32": tf32,
            "kernel_ms_sum": total, "kernels": len(rows), "top": rows[:20]}


def bench_profile(args, ops) -> list[dict]:
    """Where each step's GPU time goes (benchmarks/profile_step.py), rawgan FP32 and TF32,
    next to torch.profiler's per-kernel times of the torch eager step (NCHW, TF32 off/on)."""
    from profile_step import profile_step, report

    rows = []
    for n in args.batches:
        for tf32 in (False, True):
            try:
                r = profile_step(ops, n, tf32=tf32, replays=args.step_repeats)
                print(report(r))
            except Exception as exc:  # a failed profile must not lose the other rows
                r = {"batch": n, "tf32": tf32, "error": f"{type(exc).__name__}: {exc}"}
                print(f"profile N={n} tf32={tf32}: {r['error']}")
            rows.append({"rawgan": r})
            if HAVE_TORCH:
                try:
                    t = torch_profile(n, False, tf32)
                    print(f"torch eager nchw tf32={tf32}: {t['kernels']} kernels, "
                          f"{t['kernel_ms_sum']:.3f} ms; top: " + ", ".join(
                              f"{k['kernel'][:40]} {k['ms']:.3f}" for k in t["top"][:4]))
                except Exception as exc:
                    t = {"batch": n, "tf32": tf32, "error": f"{type(exc).__name__}: {exc}"}
                rows[-1]["torch"] = t
    return rows


# --------------------------------------------------------------------------- main

def machine_info() -> dict:
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    name = props["name"]
    return {
        "device": name.decode() if isinstance(name, bytes) else str(name),
        "compute_capability": f"{props['major']}.{props['minor']}",
        "sm_count": props["multiProcessorCount"],
        "memory_gib": props["totalGlobalMem"] / 2**30,
        "cuda_driver": cp.cuda.runtime.driverGetVersion(),
        "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
        "cupy": cp.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "cudnn": torch.backends.cudnn.version() if HAVE_TORCH else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": os.environ.get("RAWGAN_COMMIT") or git("rev-parse", "HEAD"),
        "dirty": None if (st := git("status", "--porcelain")) is None else bool(st),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--repeats", type=int, default=30, help="timed calls per kernel")
    p.add_argument("--step-repeats", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--sgemm-sizes", type=int, nargs="+", default=[4096, 2048, 8192],
                   help="square SGEMM sizes (the issue's target is 4096)")
    p.add_argument("--quick", action="store_true", help="batch 64 only, few repeats")
    p.add_argument("--no-numba", dest="numba", action="store_false",
                   help="leave out the Numba backend's column of the layer table")
    # run in this order, the two headline figures (SGEMM vs cuBLAS, the step vs
    # PyTorch) first: the JSON is rewritten after every section, so a run cut short by a
    # time limit (a GPU session's few minutes) still keeps them
    sections = ["sgemm", "step", "profile", "layers", "elementwise"]
    p.add_argument("--only", nargs="+", choices=sections, default=sections,
                   help="sections to run, in the order given")
    p.add_argument("--json", type=Path, default=None, help="output file (default: "
                   "benchmarks/results/gpu-<device>-<date>-<commit>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.repeats, args.step_repeats, args.warmup = [64], 5, 5, 2
        args.sgemm_sizes = [4096]
    ops = backends.get("cupy")
    info = machine_info()
    print(f"{info['device']} (sm_{info['compute_capability'].replace('.', '')}, "
          f"{info['sm_count']} SMs), CuPy {info['cupy']}, torch {info['torch']}, "
          f"commit {str(info['commit'])[:10]}{' (dirty)' if info['dirty'] else ''}")
    if not HAVE_TORCH:
        print("PyTorch with CUDA not found: the cuDNN / PyTorch rows are skipped")
    result = {"machine": info, "args": {k: (str(v) if isinstance(v, Path) else v)
                                        for k, v in vars(args).items()},
              "kernel_tiles": cupy_ops.TILES}
    benches = {"sgemm": bench_sgemm, "layers": bench_layers, "elementwise": bench_elementwise,
               "step": bench_step, "profile": bench_profile}
    out = args.json
    if out is None:
        dev = re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-").lower()
        out = REPO / "benchmarks" / "results" / (
            f"gpu-{dev}-{info['date'][:10]}-{str(info['commit'])[:8]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for key in args.only:
        print(f"\n== {key}")
        result[key] = benches[key](args, ops)
        # rewritten after every section: a run stopped by a time limit keeps what it measured
        tmp = out.with_suffix(".part")
        tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
        tmp.replace(out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
