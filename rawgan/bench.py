"""``rawgan bench``: kernel throughput and the training step, against references timed in the
same run.

::

    rawgan bench                                   # every op + the step, batch 64 and 256, NumPy
    rawgan bench --quick --json smoke.json         # smoke test: tiny batch, a few seconds
    rawgan bench --ops conv2d,step --batch 1024
    rawgan bench --compare benchmarks/results/bench-numpy-2026-05-01.json --plot
    rawgan bench --from NEW.json --compare OLD.json     # compare two files, measure nothing

Rows. One row per (op, pass, DCGAN layer, batch, backend): the seed DCGAN's own layer shapes
(``rawgan.models.build("dcgan")``), passes ``fwd`` / ``dgrad`` (input gradient) / ``wgrad``
(weight gradient, and the bias gradient where the layer has a bias: G's layers have none,
both sides then skip it) for dense, conv2d and conv2d_transpose, ``fwd`` / ``bwd`` for
leaky_relu, batchnorm (training mode) and dropout (rate 0.3); and one ``step`` row per batch:
``rawgan.gan.train_step`` with the DCGAN, BCE, Adam(1e-4), k = 1, in images/s.

Times. Warm-up calls, then at least ``--repeats`` timed calls (and at least ``--min-time``
seconds), the device synchronised after each call; median and minimum are reported, and the
median absolute deviation (MAD) is kept as the row's noise. Inputs rotate over several copies
when one set is smaller than twice the last-level cache (CPU: the largest cache in sysfs; GPU:
L2), so a row measures memory, not cache; at most 32 copies (1 with ``--quick``), and a row whose
copies still add up to less than twice the cache (``rotated_over_cache`` < 2 in the JSON) is
flagged "(cache)" in the table. Other processes' share of the CPU during a row is
measured (/proc/stat); a disturbed row is redone (``--max-retries``, after waiting up to
``--retry-wait`` s for quiet) and flagged when it stays disturbed.

FLOP and byte counts (2 FLOP per multiply-accumulate, float32 = 4 bytes):

* dense: MACs = N * in * out for each of fwd (x @ w), dgrad (dy @ w^T), wgrad (x^T @ dy).
* conv2d: nominal MACs = N * Ho * Wo * kh * kw * c_in * c_out: what an im2col GEMM does,
  taps over the zero padding included (the convention of benchmarks/bench_step.py, PyTorch
  and cuDNN papers). ``flop_useful`` excludes the padding taps:
  N * c_in * c_out * (sum_i valid row taps of output row i) * (sum_j valid column taps);
  numpy_ops skips the padding taps except where kh * kw * c_in < 256 (D's first conv, G's last
  transposed conv), where it pads and multiplies the zeros.
* conv2d_transpose: the adjoint of the conv mapping its output back to its input, so nominal
  MACs = N * H * W * kh * kw * c_in * c_out with (H, W) its INPUT size, useful MACs those of
  that adjoint conv. dgrad and wgrad cost the same as fwd (nominal and useful alike).
* The GFLOP/s column, the % of the matmul ceiling and the roofline use the NOMINAL count;
  the JSON also holds ``rate_useful`` (GFLOP/s from the useful count). The NumPy backend runs
  some convolutions by Winograd (rawgan/backends/winograd.py), which multiplies fewer times
  than either count: those rows can pass 100% of the ceiling.
* Memory-bound ops report GB/s from the MINIMUM bytes they must move (every input read once,
  every output written once; E = elements): leaky_relu fwd 2E (x, y), bwd 3E (dy, x, dx);
  batchnorm fwd 2E, bwd 3E (+ per-channel vectors); dropout fwd 3E (x, y, the float mask
  rawgan returns; the random draw is not counted), bwd 3E (dy, mask, dx). Their FLOP counts,
  used only to place them on the roofline: per element leaky_relu 2 / 2, batchnorm 7 / 9,
  dropout 2 / 1 (fwd / bwd).
* GEMM-shaped rows' bytes (for the roofline's arithmetic intensity): their operands and
  result, each once.

Ceilings, measured in the same run: the float32 matmul throughput of the backend's array
module (``xp.matmul`` on square matrices; NumPy/BLAS on the CPU, cuBLAS on a GPU) and the copy
bandwidth (``copyto`` of an array far larger than the cache; bytes = 2 x size, read + write),
both from the fastest call. Each
row shows its GFLOP/s as a % of the matmul ceiling, or its GB/s as a % of the copy bandwidth.

Reference: PyTorch (when installed) on the same device, the same op and shapes, timed in the
same run: ``torch.mm`` / ``addmm``, ``F.conv2d`` / ``F.conv_transpose2d`` and
``aten.convolution_backward`` (input or weight+bias gradient only), ``F.leaky_relu`` /
``aten.leaky_relu_backward``, ``aten.native_batch_norm(_backward)``,
``aten.native_dropout(_backward)``. On the CPU both NCHW and channels_last are timed and the
faster is the reference (``--quick``: channels_last only); on a GPU TF32 is off in the
reference (and a TF32-on row is kept for context). The step's reference is
benchmarks/bench_step.py's PyTorch twin (same architecture, step structure, batch, device).
ratio = reference median / rawgan median: above 1, rawgan is faster. A time measured while
other processes were busy is marked ``(noisy)``, the reference's too, and a ratio from
either is marked ``?`` (do not quote it).

Before a reference is timed it is checked to compute what rawgan computes: each kernel
twin on the same inputs as rawgan (``twin_agreement``: equal output shapes, values within
1e-4 on PyTorch's symmetric padding; the row's ``twin`` key; a twin that disagrees is not
timed, and the row gets no reference and no ratio), the step twin for the same per-layer
parameter counts and G/D output shapes (``bench_step.twin_problems``; a mismatch is an
error).

JSON (``--json``; default ``benchmarks/results/bench-<backend>-<date>.json`` when run from the
repository, else the current folder; ``--quick`` writes only with ``--json``) holds the keys
``schema``, ``date``, ``machine`` (cpu, cores, BLAS/torch threads, thread variables),
``device``, ``versions`` (python, numpy, numpy's BLAS, torch, torch's build config, rawgan),
``git`` (commit, dirty), ``loadavg_before`` / ``loadavg_after``, ``cpu_busy_before`` /
``cpu_busy_after``, ``args``, ``conventions``, ``ceilings``, ``notes`` (what a reader of
the figures should know about this run) and ``rows``. Each kernel row: ``key``, ``op``,
``pass``, ``layer``, ``batch``, ``shape``, ``backend``, ``dtype``, ``metric``, ``flop``,
``flop_useful``, ``bytes``, ``formula`` (of the count), ``rotation_sets`` and
``rotated_over_cache`` (input copies rotated, and their size over the cache), ``time``
{median, min, mad, p10, p90, n, others_busy, clean; ``times`` itself only when n <= 20},
``rate``, ``rate_useful``, ``pct_of_ceiling``, ``twin`` (when a reference was asked for),
``reference``, ``references``, ``ratio_vs_reference``. The step row has the same keys
except the rotation ones and ``twin``, plus ``gflops``.

``--compare OLD.json`` matches rows by key and backend and prints the change of the median;
a change beyond max(3 x MAD / median of either run, 5%) is flagged (REGRESSION or faster).
``--plot`` writes ``<json>.roofline.png`` (arithmetic intensity vs GFLOP/s with the measured
ceilings) and ``<json>.history.png`` (the step's images/s and each op family's geometric-mean
ratio vs PyTorch across the full runs in ``--results-dir``), with matplotlib (Agg).

The machine checks, the FLOP count of the step and the PyTorch twin come from
benchmarks/bench_step.py (loaded from the repository); without it (an installed wheel) the
step row is skipped and the load checks are off.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np

from . import __version__, backends, models
from .backends import blas_kernels, numpy_ops, winograd
from .backends.numpy_ops import conv_geometry, conv_transpose_geometry

PROG = "rawgan bench"
SCHEMA = "rawgan-bench/1"
REPO = Path(__file__).resolve().parents[1]
OPS = ("dense", "conv2d", "conv2d_transpose", "leaky_relu", "batchnorm", "dropout", "step")
GEMM_OPS = ("dense", "conv2d", "conv2d_transpose")
PASSES = {"dense": ("fwd", "dgrad", "wgrad"), "conv2d": ("fwd", "dgrad", "wgrad"),
          "conv2d_transpose": ("fwd", "dgrad", "wgrad"), "leaky_relu": ("fwd", "bwd"),
          "batchnorm": ("fwd", "bwd"), "dropout": ("fwd", "bwd")}
# FLOP per element of the memory-bound ops (roofline placement only) and bytes per element
ELEMENT_FLOP = {("leaky_relu", "fwd"): 2, ("leaky_relu", "bwd"): 2, ("batchnorm", "fwd"): 7,
                ("batchnorm", "bwd"): 9, ("dropout", "fwd"): 2, ("dropout", "bwd"): 1}
ELEMENT_MOVES = {("leaky_relu", "fwd"): 2, ("leaky_relu", "bwd"): 3, ("batchnorm", "fwd"): 2,
                 ("batchnorm", "bwd"): 3, ("dropout", "fwd"): 3, ("dropout", "bwd"): 3}
DEFAULT_BATCHES = (64, 256)
QUICK_BATCH = 8
NOISE_FLOOR = 0.05  # --compare: changes under 5% are never flagged
ITEMSIZE = 4  # float32


class BenchError(RuntimeError):
    """A clear, user-facing failure of ``rawgan bench`` (printed without a traceback)."""


# --------------------------------------------------------------------------------------
# benchmarks/bench_step.py: machine checks, step FLOPs, the PyTorch twin
# --------------------------------------------------------------------------------------

_SCRIPTS: dict[str, ModuleType | None] = {}


def load_script(name: str) -> ModuleType | None:
    """``benchmarks/<name>.py`` of this checkout as a module (None when not in a checkout)."""
    if name in _SCRIPTS:
        return _SCRIPTS[name]
    module = sys.modules.get(name)
    path = REPO / "benchmarks" / f"{name}.py"
    if module is None and path.is_file():
        bench_dir = str(REPO / "benchmarks")
        if bench_dir not in sys.path:  # bench_gpu.py imports bench_step by name
            sys.path.append(bench_dir)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[name]
            raise
    _SCRIPTS[name] = module
    return module


def _fallback_helpers() -> SimpleNamespace:
    """What bench_step.py provides, reduced, for an installation without the repository."""

    def machine_info(threads):
        return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "cpu": cpu_name(), "cores": os.cpu_count(),
                "cores_available": len(os.sched_getaffinity(0)),
                "python": platform.python_version(), "numpy": np.__version__,
                "numpy_blas": None, "torch": None, "torch_threads": None,
                "torch_config": None, "blas_threads": threads,
                "blas_kernels": blas_kernels.architecture(), "thread_env": {},
                "git_commit": None, "git_dirty": None, "git_modified": None}

    def timed_call(fn, settle=0.0):
        if settle:
            time.sleep(settle)
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0, None

    return SimpleNamespace(
        NOISY=0.10, machine_info=machine_info, timed_call=timed_call,
        wait_quiet=lambda seconds: None, loadavg=lambda: None, cpu_busy=lambda s=0.5: None,
        blas_threads=lambda: len(os.sched_getaffinity(0)), fallback=True)


def helpers():
    """bench_step.py (the machine checks, step FLOPs, PyTorch twin), or a reduced fallback."""
    try:
        module = load_script("bench_step")
    except Exception as exc:  # a broken script must not break the op benchmarks
        print(f"# note: benchmarks/bench_step.py failed to load ({exc}): step row and load "
              f"checks off", file=sys.stderr)
        module = None
    return module if module is not None else _fallback_helpers()


def _torch():
    """PyTorch, or None when it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def set_threads(n: int) -> tuple[object, list[str]]:
    """Run rawgan's CPU ops (``cpu_threads``), BLAS and PyTorch on ``n`` threads; returns
    ``(undo, notes)``: ``undo()`` restores the previous settings."""
    from .backends import cpu_threads

    ops_before = cpu_threads.num_threads()
    cpu_threads.set_num_threads(n)
    undos, notes = [lambda: cpu_threads.set_num_threads(ops_before)], []
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        blas = None
    else:
        blas = ThreadpoolController().select(user_api="blas")
    if not blas or not blas.lib_controllers:
        notes.append("BLAS threads left as they are (no BLAS found that threadpoolctl sets)")
    else:
        undos.append(blas.limit(limits=n).restore_original_limits)
    torch = _torch()
    if torch is not None:
        torch_before = torch.get_num_threads()
        torch.set_num_threads(n)
        undos.append(lambda: torch.set_num_threads(torch_before))

    def undo():
        for u in reversed(undos):
            u()

    return undo, notes


# --------------------------------------------------------------------------------------
# cases: the seed DCGAN's layers, their FLOP and byte counts
# --------------------------------------------------------------------------------------

def valid_taps(out_size: int, in_size: int, k: int, s: int, pad: int) -> int:
    """Sum over the output positions i of one axis of the kernel taps a that read a real
    input pixel: ``0 <= i*s - pad + a < in_size`` (padding taps excluded)."""
    return sum(max(0, min(k, in_size + pad - i * s) - max(0, pad - i * s))
               for i in range(out_size))


def _convt_padding(padding) -> tuple:
    """A transposed conv's ``(padding, output_padding)``: its geometry's padding is "same",
    "valid", an int, or PyTorch's pair ``(p, output_padding)`` (:func:`twin_agreement`)."""
    return tuple(padding) if isinstance(padding, tuple) else (padding, None)


def conv_macs(n: int, h: int, w: int, ci: int, co: int, k: int, s: int, padding,
              transpose: bool = False) -> tuple[int, int, tuple[int, int]]:
    """``(nominal, useful, (Ho, Wo))`` multiply-accumulates of one pass of a conv (or a
    transposed conv) on an (n, h, w, ci) input; see the module docstring for the formulas."""
    if not transpose:
        ho, wo, ((pt, _), (pl, _)) = conv_geometry(h, w, k, k, s, padding)
        nominal = n * ho * wo * k * k * ci * co
        useful = n * ci * co * valid_taps(ho, h, k, s, pt) * valid_taps(wo, w, k, s, pl)
        return nominal, useful, (ho, wo)
    ho, wo, ((pt, _), (pl, _)) = conv_transpose_geometry(h, w, k, k, s,
                                                         *_convt_padding(padding))
    nominal = n * h * w * k * k * ci * co  # the adjoint conv maps (ho, wo) -> (h, w)
    useful = n * ci * co * valid_taps(h, ho, k, s, pt) * valid_taps(w, wo, k, s, pl)
    return nominal, useful, (ho, wo)


@dataclass(frozen=True)
class Case:
    """One benchmarked op call: ``op``/``pass_`` of DCGAN layer ``layer`` at ``batch``.

    ``geom``: dense ``(in, out, bias)``; conv/conv_transpose
    ``(h, w, c_in, c_out, k, s, padding, bias)``; the memory-bound ops: the per-sample shape.
    """

    op: str
    pass_: str
    layer: str
    batch: int
    geom: tuple
    flop: int
    flop_useful: int
    nbytes: int
    formula: str

    @property
    def key(self) -> str:
        return f"{self.op}/{self.pass_}/{self.layer}/b{self.batch}"

    @property
    def metric(self) -> str:
        return "GFLOP/s" if self.op in GEMM_OPS else "GB/s"

    @property
    def shape(self) -> str:
        """Per-sample shapes, e.g. ``14x14x64 -> 7x7x128 k5 s2`` (batch in its own column)."""
        if self.op == "dense":
            return f"{self.geom[0]} -> {self.geom[1]}"
        if self.op in ("conv2d", "conv2d_transpose"):
            h, w, ci, co, k, s, padding, _ = self.geom
            _, _, (ho, wo) = conv_macs(1, h, w, ci, co, k, s, padding,
                                       self.op == "conv2d_transpose")
            return f"{h}x{w}x{ci} -> {ho}x{wo}x{co} k{k} s{s}"
        return "x".join(map(str, self.geom))


def _gemm_case(op, pass_, layer, n, geom) -> Case:
    if op == "dense":
        fin, fout, bias = geom
        macs = useful = n * fin * fout
        x, w, y = n * fin, fin * fout, n * fout
        formula = "2 * N * in * out"
    else:
        h, wd, ci, co, k, s, padding, bias = geom
        macs, useful, (ho, wo) = conv_macs(n, h, wd, ci, co, k, s, padding,
                                           op == "conv2d_transpose")
        x, w, y = n * h * wd * ci, k * k * ci * co, n * ho * wo * co
        formula = ("2 * N * Ho * Wo * kh * kw * c_in * c_out (im2col, padding taps included)"
                   if op == "conv2d" else
                   "2 * N * H * W * kh * kw * c_in * c_out, (H, W) the input (adjoint conv's "
                   "im2col, padding taps included)")
    # operands + result once: fwd x, w -> y; dgrad dy, w -> dx; wgrad x, dy -> dw (+ db)
    moved = {"fwd": x + w + y, "dgrad": y + w + x, "wgrad": x + y + w}[pass_]
    return Case(op, pass_, layer, n, tuple(geom), 2 * macs, 2 * useful, ITEMSIZE * moved,
                formula)


def _element_case(op, pass_, layer, n, shape) -> Case:
    e = n * math.prod(shape)
    flop = ELEMENT_FLOP[(op, pass_)] * e
    moves = ELEMENT_MOVES[(op, pass_)]
    channels = shape[-1]
    extra = 4 * channels if op == "batchnorm" else 0  # gamma, beta, mean, inv_std / stats
    return Case(op, pass_, layer, n, tuple(shape), flop, flop,
                ITEMSIZE * (moves * e + extra),
                f"{moves} * E * 4 bytes (minimum traffic; E = N * {'*'.join(map(str, shape))})")


def dcgan_cases(ops=OPS, batches=DEFAULT_BATCHES) -> list[Case]:
    """Every (op, pass, layer, batch) case of the seed DCGAN for the ops in ``ops``.

    Layers are read off ``rawgan.models.build("dcgan")``; a memory-bound op is benchmarked
    once per distinct per-sample shape it sees (named after its first layer with that shape).
    """
    G, D = models.build("dcgan", seed=0)
    found: list[tuple[str, str, tuple]] = []
    seen = set()
    for tag, model in (("G", G), ("D", D)):
        for layer in model.layers:
            kind = type(layer).__name__
            name = f"{tag}.{layer.name}"
            if kind == "Dense":
                found.append(("dense", name, (layer.input_shape[0], layer.units,
                                              layer.use_bias)))
                continue
            if kind in ("Conv2D", "Conv2DTranspose"):
                h, w, ci = layer.input_shape
                kh, kw = layer.kernel_size
                sh, sw = layer.strides
                if kh != kw or sh != sw:
                    raise BenchError(f"{name}: non-square kernels/strides are not benchmarked")
                op = "conv2d" if kind == "Conv2D" else "conv2d_transpose"
                found.append((op, name, (h, w, ci, layer.filters, kh, sh, layer.padding,
                                         layer.use_bias)))
                continue
            op = {"LeakyReLU": "leaky_relu", "BatchNormalization": "batchnorm",
                  "Dropout": "dropout"}.get(kind)
            if op is not None and (op, tuple(layer.input_shape)) not in seen:
                seen.add((op, tuple(layer.input_shape)))
                found.append((op, name, tuple(layer.input_shape)))
    cases = []
    for n in batches:
        for op in OPS:
            if op not in ops or op == "step":
                continue
            for o, name, geom in found:
                if o != op:
                    continue
                for p in PASSES[op]:
                    cases.append(_gemm_case(op, p, name, n, geom) if op in GEMM_OPS
                                 else _element_case(op, p, name, n, geom))
    return cases


# --------------------------------------------------------------------------------------
# the callables: rawgan's op on a backend, PyTorch's op on a device
# --------------------------------------------------------------------------------------

def _cycle(fns: list):
    """Call the input sets in turn (one set: the call itself)."""
    if len(fns) == 1:
        return fns[0]
    it = itertools.cycle(fns)
    return lambda: next(it)()


def cache_bytes(ops) -> int:
    """Size of the cache a row's inputs should not fit in: the GPU's L2, else the largest
    CPU cache listed in sysfs (32 MiB when unknown)."""
    if ops.name != "numpy" and ops.xp is not np:
        try:
            return int(ops.xp.cuda.Device().attributes["L2CacheSize"])
        except Exception:  # no attribute: assume a large L2
            return 64 << 20
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        digits = size.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or 32 << 20


def rotation_sets(case: Case, cache: int, cap: int) -> int:
    """Input copies to rotate over so that one pass over them exceeds twice the cache."""
    return max(1, min(cap, math.ceil(2 * cache / max(case.nbytes, 1))))


def case_inputs(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One set of float32 standard-normal inputs of ``case`` in rawgan's layouts (NHWC
    activations, Keras kernels): ``x``, ``dy`` and, by op, ``w``, ``b`` (None without bias),
    ``gamma``, ``beta``. :func:`rawgan_fn` and :func:`torch_fn` both draw from here, so with
    the same seed they compute on the same values (:func:`twin_agreement` checks it)."""

    def rnd(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    n = case.batch
    if case.op == "dense":
        fin, fout, bias = case.geom
        return {"x": rnd(n, fin), "w": rnd(fin, fout), "dy": rnd(n, fout),
                "b": rnd(fout) if bias else None}
    if case.op in ("conv2d", "conv2d_transpose"):
        h, wd, ci, co, k, s, padding, bias = case.geom
        _, _, (ho, wo) = conv_macs(1, h, wd, ci, co, k, s, padding,
                                   case.op == "conv2d_transpose")
        x, dy = rnd(n, h, wd, ci), rnd(n, ho, wo, co)
        b = rnd(co) if bias else None
        w = rnd(k, k, ci, co) if case.op == "conv2d" else rnd(k, k, co, ci)
        return {"x": x, "dy": dy, "b": b, "w": w}
    x, dy = rnd(n, *case.geom), rnd(n, *case.geom)
    if case.op == "batchnorm":
        c = case.geom[-1]
        return {"x": x, "dy": dy, "gamma": rnd(c), "beta": rnd(c)}
    return {"x": x, "dy": dy}


def rawgan_fn(case: Case, ops, sets: int = 1, seed: int = 0):
    """A no-argument callable running ``case`` on backend ``ops`` (float32 random inputs
    from :func:`case_inputs`, rotating over ``sets`` input copies); it returns the op's
    outputs."""
    rng = np.random.default_rng(seed)
    p = case.pass_

    def one():
        a = {k: None if v is None else ops.asarray(v) for k, v in case_inputs(case, rng).items()}
        x, dy = a["x"], a["dy"]
        if case.op == "dense":
            w, b = a["w"], a["b"]
            return {"fwd": lambda: ops.dense_forward(x, w, b),
                    "dgrad": lambda: ops.dense_backward(dy, x, w, need_dw=False),
                    "wgrad": lambda: ops.dense_backward(dy, x, w, need_dx=False,
                                                        need_db=b is not None)}[p]
        if case.op in ("conv2d", "conv2d_transpose"):
            _, _, _, _, _, s, padding, _ = case.geom
            w, b = a["w"], a["b"]
            if case.op == "conv2d":
                return {"fwd": lambda: ops.conv2d_forward(x, w, b, s, padding),
                        "dgrad": lambda: ops.conv2d_backward(dy, x, w, s, padding,
                                                             need_dw=False),
                        "wgrad": lambda: ops.conv2d_backward(dy, x, w, s, padding,
                                                             need_dx=False,
                                                             need_db=b is not None)}[p]
            pad, opad = _convt_padding(padding)
            return {"fwd": lambda: ops.conv2d_transpose_forward(x, w, b, s, pad, opad),
                    "dgrad": lambda: ops.conv2d_transpose_backward(dy, x, w, s, pad, opad,
                                                                   need_dw=False),
                    "wgrad": lambda: ops.conv2d_transpose_backward(dy, x, w, s, pad, opad,
                                                                   need_dx=False,
                                                                   need_db=b is not None)}[p]
        if case.op == "leaky_relu":
            return {"fwd": lambda: ops.leaky_relu_forward(x, 0.3),
                    "bwd": lambda: ops.leaky_relu_backward(dy, x, 0.3)}[p]
        if case.op == "dropout":
            drop_rng = np.random.default_rng(seed + 1)
            _, mask = ops.dropout_forward(x, 0.3, drop_rng, training=True)
            return {"fwd": lambda: ops.dropout_forward(x, 0.3, drop_rng, training=True),
                    "bwd": lambda: ops.dropout_backward(dy, mask)}[p]
        c = case.geom[-1]
        gamma, beta = a["gamma"], a["beta"]
        mm, mv = ops.asarray(np.zeros(c, np.float32)), ops.asarray(np.ones(c, np.float32))
        _, mean, inv_std = ops.batchnorm_forward(x, gamma, beta, mm, mv, 0.99, 1e-3, True)
        return {"fwd": lambda: ops.batchnorm_forward(x, gamma, beta, mm, mv, 0.99, 1e-3, True),
                "bwd": lambda: ops.batchnorm_backward(dy, x, gamma, mean, inv_std, True)}[p]

    return _cycle([one() for _ in range(sets)])


def _torch_pads(case: Case) -> tuple[int, int] | None:
    """PyTorch's symmetric ``(padding, output_padding)`` giving the case's output size (TF's
    "same" split pads (1, 2) where PyTorch pads 2 and 2: same shapes and FLOPs, windows one
    pixel apart), or None when no symmetric padding does."""
    h, wd, ci, co, k, s, padding, _ = case.geom
    if case.op == "conv2d":
        ho, wo, ((pt, pb), (pl, pr)) = conv_geometry(h, wd, k, k, s, padding)
        p = max(pt, pb, pl, pr)
        ok = ((h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1) == (ho, wo)
        return (p, 0) if ok else None
    ho, wo, ((pt, pb), (pl, pr)) = conv_transpose_geometry(h, wd, k, k, s,
                                                           *_convt_padding(padding))
    p = max(pt, pb, pl, pr)
    op_h, op_w = ho - ((h - 1) * s - 2 * p + k), wo - ((wd - 1) * s - 2 * p + k)
    return (p, op_h) if op_h == op_w and 0 <= op_h < max(s, 1) else None


def torch_fn(case: Case, device: str = "cpu", channels_last: bool = True, sets: int = 1,
             seed: int = 0):
    """PyTorch's twin of :func:`rawgan_fn` on ``device`` (None when PyTorch cannot express
    the case). Activations NCHW, in channels_last memory when ``channels_last``."""
    torch = _torch()
    if torch is None:
        return None
    import torch.nn.functional as F

    aten = torch.ops.aten
    rng = np.random.default_rng(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def tensor(a: np.ndarray | None, kernel: bool = False):
        """rawgan layout -> PyTorch's: NHWC -> NCHW (in ``fmt`` memory); a Keras kernel
        (kh, kw, in, out) -> (out, in, kh, kw), a Conv2DTranspose one (kh, kw, out, in) ->
        (in, out, kh, kw): the same permutation."""
        if a is None:
            return None
        t = torch.from_numpy(a)
        if t.dim() == 4:
            t = t.permute(3, 2, 0, 1) if kernel else t.permute(0, 3, 1, 2)
        t = t.to(device)
        return t.contiguous(memory_format=fmt) if t.dim() == 4 and not kernel else \
            t.contiguous()

    p = case.pass_
    pads = _torch_pads(case) if case.op in ("conv2d", "conv2d_transpose") else None
    if case.op in ("conv2d", "conv2d_transpose") and pads is None:
        return None

    def one():
        a = case_inputs(case, rng)
        x, dy = tensor(a["x"]), tensor(a["dy"])
        if case.op == "dense":
            w, b = tensor(a["w"]), tensor(a["b"])
            return {"fwd": (lambda: torch.addmm(b, x, w)) if b is not None
                    else (lambda: torch.mm(x, w)),
                    "dgrad": lambda: torch.mm(dy, w.t()),
                    "wgrad": (lambda: (torch.mm(x.t(), dy), dy.sum(0))) if b is not None
                    else (lambda: (torch.mm(x.t(), dy), None))}[p]
        if case.op in ("conv2d", "conv2d_transpose"):
            _, _, _, co, _, s, _, bias = case.geom
            pad, opad = pads
            w, b = tensor(a["w"], kernel=True), tensor(a["b"])
            transposed = case.op == "conv2d_transpose"
            bias_sizes = [co] if bias else None

            def bwd(mask):
                return lambda: aten.convolution_backward(
                    dy, x, w, bias_sizes, [s, s], [pad, pad], [1, 1], transposed,
                    [opad, opad], 1, mask)

            fwd = ((lambda: F.conv_transpose2d(x, w, b, s, pad, opad)) if transposed
                   else (lambda: F.conv2d(x, w, b, s, pad)))
            return {"fwd": fwd, "dgrad": bwd([True, False, False]),
                    "wgrad": bwd([False, True, bool(bias)])}[p]
        if case.op == "leaky_relu":
            return {"fwd": lambda: F.leaky_relu(x, 0.3),
                    "bwd": lambda: aten.leaky_relu_backward(dy, x, 0.3, False)}[p]
        if case.op == "dropout":
            _, mask = aten.native_dropout(x, 0.3, True)
            return {"fwd": lambda: aten.native_dropout(x, 0.3, True),
                    "bwd": lambda: aten.native_dropout_backward(dy, mask, 1 / 0.7)}[p]
        c = case.geom[-1]
        gamma, beta = tensor(a["gamma"]), tensor(a["beta"])
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        _, mean, invstd = aten.native_batch_norm(x, gamma, beta, rm, rv, True, 0.01, 1e-3)
        return {"fwd": lambda: aten.native_batch_norm(x, gamma, beta, rm, rv, True, 0.01, 1e-3),
                "bwd": lambda: aten.native_batch_norm_backward(
                    dy, x, gamma, rm, rv, mean, invstd, True, 1e-3, [True, True, True])}[p]

    with torch.no_grad():  # no input requires grad: no autograd graph is built either way
        return _cycle([one() for _ in range(sets)])


#: ``twin_agreement``: ||rawgan - PyTorch|| / ||PyTorch|| allowed per output (both float32,
#: TF32 off; sums of up to 2e5 terms in different orders)
TWIN_TOL = 1e-4


def _slots(out, case: Case, torch_side: bool) -> list:
    """An op's outputs as a list in rawgan's order: backward GEMM passes ``[dx, dw, db]``
    (None where not computed), the rest as the op returns them."""
    if case.op == "dense" and torch_side and case.pass_ != "fwd":
        return [out, None, None] if case.pass_ == "dgrad" else [None, *out]
    return list(out) if isinstance(out, tuple | list) else [out]


def _rawgan_layout(t, kernel: bool) -> np.ndarray:
    """A PyTorch output -> NumPy in rawgan's layout (NCHW -> NHWC; OIHW -> Keras HWIO)."""
    if t.dim() == 4:
        t = t.permute(2, 3, 1, 0) if kernel else t.permute(0, 2, 3, 1)
    return t.detach().cpu().numpy()


def twin_agreement(case: Case, ops, device: str = "cpu", channels_last: bool = True,
                   seed: int = 0) -> dict | None:
    """Does the PyTorch twin compute what rawgan computes? One call of each on the same
    inputs (:func:`case_inputs`, same seed), before either is timed.

    Shapes are compared on the case itself. Values are compared on its PyTorch-padding
    variant (the padding geometry replaced by PyTorch's symmetric ``p`` and
    ``output_padding``, which rawgan also takes): TF's "same" pads stride-2 layers (1, 2)
    where PyTorch pads (2, 2), so the case's own windows sit one pixel apart. Dropout's
    values are not compared (two random masks). Returns ``{"ok", "shapes", "max_rel_err",
    "values_compared", "padding"}``, or None when PyTorch is absent or cannot express the
    case; ``ok`` means equal shapes and every compared output within :data:`TWIN_TOL`.
    """
    torch = _torch()
    if torch is None:
        return None
    conv = case.op in ("conv2d", "conv2d_transpose")
    pads = _torch_pads(case) if conv else None
    if conv and pads is None:
        return None
    if device != "cpu":
        _tf32(torch, device, False)

    def run(c: Case) -> tuple[list, list]:
        mine = _slots(rawgan_fn(c, ops, 1, seed)(), c, False)
        twin = _slots(torch_fn(c, device, channels_last, 1, seed)(), c, True)
        mine = [None if a is None else np.asarray(ops.to_numpy(a)) for a in mine]
        kernel_slot = 1 if conv and c.pass_ == "wgrad" else -1
        twin = [None if t is None else _rawgan_layout(t, i == kernel_slot)
                for i, t in enumerate(twin)]
        return mine, twin

    mine, twin = run(case)
    shapes = [(None if a is None else tuple(a.shape), None if t is None else tuple(t.shape))
              for a, t in zip(mine, twin, strict=False)]
    same_shapes = len(mine) == len(twin) and all(
        a == t for a, t in shapes if a is not None and t is not None)
    padding = None
    if conv:
        geom = list(case.geom)
        geom[6] = pads[0] if case.op == "conv2d" else pads
        padding = geom[6]
        mine, twin = run(replace(case, geom=tuple(geom)))
    errors = []
    if case.op != "dropout":
        for a, t in zip(mine, twin, strict=False):
            if a is None or t is None or a.shape != t.shape:
                continue
            ref = float(np.linalg.norm(t.astype(np.float64)))
            err = float(np.linalg.norm(a.astype(np.float64) - t.astype(np.float64)))
            errors.append(err / max(ref, 1e-30))
    worst = max(errors) if errors else None
    return {"ok": bool(same_shapes and (worst is None or worst <= TWIN_TOL)),
            "shapes": [[None if a is None else list(a), None if t is None else list(t)]
                       for a, t in shapes],
            "max_rel_err": worst, "values_compared": len(errors), "padding": padding}


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------

@dataclass
class Budget:
    """How long each row is timed, and how disturbed rows are retried."""

    warmup: int = 2
    repeats: int = 10
    min_time: float = 0.25
    settle: float = 0.3
    max_retries: int = 10  # for the whole run
    retry_wait: float = 30.0
    max_calls: int = 1000


KEEP_TIMES = 20  # rows with more timed calls keep quantiles, not every time, in the JSON


def summarize(times: list[float]) -> dict:
    """median, min, MAD (median absolute deviation), 10th/90th percentiles and n of a list of
    seconds; the times themselves when there are at most KEEP_TIMES."""
    med = statistics.median(times)
    q = np.quantile(times, [0.1, 0.9]) if len(times) > 1 else (times[0], times[0])
    out = {"median": med, "min": min(times),
           "mad": statistics.median(abs(t - med) for t in times), "p10": float(q[0]),
           "p90": float(q[1]), "n": len(times)}
    if len(times) <= KEEP_TIMES:
        out["times"] = [float(f"{t:.4g}") for t in times]
    return out


def measure(fn, sync, budget: Budget, h, prepare=None) -> dict:
    """Time ``fn`` (``sync()`` after each call) per ``budget``; ``h``: the bench_step helpers
    (their ``timed_call`` measures the share of the CPU other processes used meanwhile)."""
    while True:
        times: list[float] = []

        def block(times=times):
            if prepare is not None:
                prepare()
            for _ in range(budget.warmup):
                fn()
            sync()
            t_end = time.perf_counter() + budget.min_time
            while len(times) < budget.repeats or (time.perf_counter() < t_end
                                                  and len(times) < budget.max_calls):
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)

        _, others = h.timed_call(block, settle=budget.settle)
        if others is not None:  # windows near the 10 ms tick can read above 1
            others = min(others, 1.0)
        noisy = others is not None and others > h.NOISY
        if not noisy or budget.max_retries <= 0:
            break
        budget.max_retries -= 1
        h.wait_quiet(budget.retry_wait)
    return {**summarize(times), "others_busy": others, "clean": not noisy}


def _rate(case_flop, nbytes, metric, seconds):
    return (case_flop if metric == "GFLOP/s" else nbytes) / seconds / 1e9


# --------------------------------------------------------------------------------------
# ceilings
# --------------------------------------------------------------------------------------

def measure_ceilings(ops, sync, budget: Budget, h, quick: bool, torch_device) -> dict:
    """The float32 matmul ceiling and the copy bandwidth of backend ``ops``, this run."""
    xp = ops.xp
    rng = np.random.default_rng(0)
    b = Budget(warmup=1, repeats=3 if quick else 5, min_time=0.0 if quick else 0.5,
               settle=budget.settle, max_retries=budget.max_retries,
               retry_wait=budget.retry_wait)
    out: dict = {"matmul": [], "copy": []}
    torch = _torch() if torch_device else None
    for size in ((256,) if quick else (1024, 2048)):
        a = ops.asarray(rng.standard_normal((size, size), dtype=np.float32))
        c = ops.asarray(rng.standard_normal((size, size), dtype=np.float32))
        flop = 2 * size ** 3
        t = measure(lambda a=a, c=c: xp.matmul(a, c), sync, b, h)
        row = {"shape": [size, size, size], "flop": flop, "time": t,
               "gflops": flop / t["min"] / 1e9}
        if torch is not None:
            ta = torch.from_numpy(ops.to_numpy(a)).to(torch_device)
            tc = torch.from_numpy(ops.to_numpy(c)).to(torch_device)
            tsync = torch.cuda.synchronize if torch_device != "cpu" else (lambda: None)
            tt = measure(lambda ta=ta, tc=tc: torch.mm(ta, tc), tsync, b, h,
                         prepare=lambda: _tf32(torch, torch_device, False))
            row["torch_mm_gflops"] = flop / tt["min"] / 1e9
        out["matmul"].append(row)
    b.repeats = 3 if quick else 5
    # 4 MiB (smoke); else 128 MiB per array, or 4x the cache (at most 1 GiB) if that is more
    elems = (1 << 20) if quick else min(1 << 28, max(1 << 25, 4 * cache_bytes(ops) // ITEMSIZE))
    elems -= elems % 256
    src = ops.asarray(rng.standard_normal((256, elems // 256), dtype=np.float32))
    dst = xp.empty_like(src)
    copies = {"copyto": lambda: xp.copyto(dst, src)}
    for name, fn in copies.items():
        t = measure(fn, sync, b, h)
        moved = 2 * src.size * ITEMSIZE
        out["copy"].append({"how": name, "bytes": moved, "time": t,
                            "gbps": moved / t["min"] / 1e9,
                            "array_over_cache": round(src.size * ITEMSIZE / cache_bytes(ops),
                                                      3)})
    out["matmul_gflops"] = max(r["gflops"] for r in out["matmul"])
    out["copy_gbps"] = max(r["gbps"] for r in out["copy"])
    out["note"] = ("fastest call; matmul: xp.matmul of square float32 matrices, 2 n^3 FLOP; "
                   "copy: 2 x array bytes (read + write)")
    return out


def _tf32(torch, device, on: bool) -> None:
    if device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


# --------------------------------------------------------------------------------------
# the backend(s) to run
# --------------------------------------------------------------------------------------

def available_backends() -> tuple[list[str], list[str]]:
    """``(names, notes)``: the backends ``backends.get`` can load for benchmarking here; the
    numba backend in the CUDA simulator is left out (far too slow to time)."""
    names, notes = ["numpy"], []
    for name in ("cupy", "numba"):
        try:
            ops = backends.get(name)
        except backends.BackendUnavailable as exc:
            notes.append(f"{name}: skipped ({exc})")
            continue
        except Exception as exc:  # an import error inside the backend
            notes.append(f"{name}: skipped ({type(exc).__name__}: {exc})")
            continue
        if getattr(ops, "SIMULATOR", False):
            notes.append(f"{name}: skipped (runs in the CUDA simulator here, no GPU: far too "
                         f"slow to benchmark)")
            continue
        names.append(name)
    return names, notes


def _select_backends(choice: str) -> tuple[list[str], list[str]]:
    if choice == "all-available":
        return available_backends()
    ops = backends.get(choice)  # raises BackendUnavailable with the reason
    if getattr(ops, "SIMULATOR", False):
        raise BenchError(f"backend {choice!r} runs in the CUDA simulator here (no GPU): far too "
                         f"slow to benchmark")
    return [choice], []


def device_name(ops) -> str:
    if ops is numpy_ops or ops.xp is np:
        return "cpu"
    try:
        props = ops.xp.cuda.runtime.getDeviceProperties(ops.xp.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return "gpu"


# --------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------

def _ref_specs(device: str, quick: bool, layout: str) -> list[tuple[str, dict]]:
    """``(label, torch_fn kwargs)`` of the PyTorch reference variants to time."""
    if device == "cpu":
        layouts = ({"best": ("channels_last", "nchw"), "nchw": ("nchw",),
                    "channels_last": ("channels_last",)}[layout] if not quick
                   else ("channels_last",))
        return [(f"torch cpu {lay}", {"channels_last": lay == "channels_last", "tf32": False})
                for lay in layouts]
    return [("torch cuda channels_last tf32 off", {"channels_last": True, "tf32": False}),
            ("torch cuda channels_last tf32 on", {"channels_last": True, "tf32": True})]


def kernel_row(case: Case, backend: str, ops, budget: Budget, h, ceilings: dict,
               refs: list, torch_device, cap: int) -> dict:
    cache = cache_bytes(ops)
    sets = rotation_sets(case, cache, cap)
    t = measure(rawgan_fn(case, ops, sets), ops.synchronize, budget, h)
    rate = _rate(case.flop, case.nbytes, case.metric, t["median"])
    ceiling = ceilings["matmul_gflops"] if case.metric == "GFLOP/s" else ceilings["copy_gbps"]
    row = {"key": case.key, "op": case.op, "pass": case.pass_, "layer": case.layer,
           "batch": case.batch, "shape": case.shape, "backend": backend, "dtype": "float32",
           "metric": case.metric, "flop": case.flop, "flop_useful": case.flop_useful,
           "bytes": case.nbytes, "formula": case.formula, "rotation_sets": sets,
           # the rotated inputs over the cache: under 2 (the rotation cap reached), a repeat
           # may find part of its inputs still cached
           "rotated_over_cache": round(sets * case.nbytes / cache, 3), "time": t,
           "rate": rate, "rate_useful": case.flop_useful / t["median"] / 1e9,
           "pct_of_ceiling": 100 * rate / ceiling, "references": []}
    torch = _torch()
    if refs and torch is not None:
        # before any reference is timed: the twin must compute what rawgan computes, or the
        # ratio would compare two different ops (then no reference is timed at all)
        row["twin"] = twin_agreement(case, ops, torch_device, True)
        if row["twin"] is not None and not row["twin"]["ok"]:
            print(f"WARNING: {case.key}: the PyTorch twin disagrees with rawgan "
                  f"({row['twin']}); no reference timed, no ratio", file=sys.stderr)
            refs = []
    for label, kw in refs:
        fn = torch_fn(case, torch_device, kw["channels_last"], sets)
        if fn is None:
            continue
        tsync = torch.cuda.synchronize if torch_device != "cpu" else (lambda: None)
        tt = measure(fn, tsync, budget, h,
                     prepare=lambda tf=kw["tf32"]: _tf32(torch, torch_device, tf))
        row["references"].append({"name": label, "time": tt,
                                  "rate": _rate(case.flop, case.nbytes, case.metric,
                                                tt["median"])})
    if torch_device and torch_device != "cpu":
        _tf32(torch, torch_device, False)
    _pick_reference(row)
    return row


def _pick_reference(row: dict) -> None:
    """The reference of the ratio: the fastest non-TF32 PyTorch variant."""
    cands = [r for r in row["references"] if "tf32 on" not in r["name"]]
    best = min(cands, key=lambda r: r["time"]["median"]) if cands else None
    row["reference"] = best
    row["ratio_vs_reference"] = (None if best is None
                                 else best["time"]["median"] / row["time"]["median"])


def _from_interleaved(r: dict) -> dict:
    """bench_step.bench_interleaved's summary of one benchmark -> this module's time dict."""
    times = r["times"] if len(r["times"]) >= 3 else r["times"] + r["noisy_times"]
    others = [o for o in r.get("others_busy", []) if o is not None]
    return {**summarize(times), "others_busy": max(others) if others else None,
            "clean": r["clean"]}


def rawgan_step_fn(ops, batch: int, seed: int, h):
    """``(G, D, step)``: one ``rawgan.gan.train_step`` of the seed DCGAN (BCE, Adam 1e-4,
    k = 1) on backend ``ops``, the device synchronised after it. NumPy: bench_step.py's
    ``rawgan_setup``, exactly what bench_step.py times."""
    if ops is numpy_ops:
        G, D, _, _, step, _ = h.rawgan_setup(batch, seed)
        return G, D, step
    from . import gan, optim

    G, D = models.build("dcgan", seed=seed, backend=ops)
    opt_g, opt_d = optim.Adam(G, lr=1e-4), optim.Adam(D, lr=1e-4)
    rng = np.random.default_rng(seed)
    real = ops.asarray(rng.uniform(-1, 1, (batch, *models.IMAGE_SHAPE)).astype(np.float32))
    noise = gan.gaussian_noise(rng, models.NOISE_DIM, ops=ops)

    def step():
        out = gan.train_step(G, D, opt_g, opt_d, "bce", [real], noise)
        ops.synchronize()
        return out

    return G, D, step


def step_row(batch: int, backend: str, ops, budget: Budget, h, ceilings: dict, refs: list,
             torch_device, seed: int = 0) -> dict | None:
    """The full training step (images/s): rawgan.gan.train_step vs bench_step's twin."""
    if getattr(h, "fallback", False):
        return None
    torch = _torch()
    G, D, r_step = rawgan_step_fn(ops, batch, seed, h)
    if ops is numpy_ops:
        benches = {"rawgan": r_step}
        if torch is not None:
            for label, kw in refs:
                benches[label] = h.torch_setup(batch, seed, kw["channels_last"])[0]
        if budget.settle > 0:  # interleaved rounds, 0.3 s apart, disturbed repeats retried
            res = h.bench_interleaved(benches, budget.warmup, budget.repeats,
                                      budget.max_retries, budget.retry_wait)
            times = {k: _from_interleaved(v) for k, v in res.items()}
        else:  # --quick: one block each, no pauses
            times = {k: measure(fn, ops.synchronize, budget, h) for k, fn in benches.items()}
    else:  # a GPU backend: synchronised wall time; the twin via bench_gpu.py
        times = {"rawgan": measure(r_step, ops.synchronize, budget, h)}
        gpu = load_script("bench_gpu") if torch_device not in (None, "cpu") else None
        for label, kw in refs if gpu is not None else ():
            eager, _ = gpu.torch_step_fns(batch, kw["channels_last"], seed)
            times[label] = measure(eager, torch.cuda.synchronize, budget, h,
                                   prepare=lambda tf=kw["tf32"]: _tf32(torch, torch_device, tf))
        if torch is not None and torch_device not in (None, "cpu"):
            _tf32(torch, torch_device, False)
    flop = sum(h.step_flops(G, D, batch).values())
    t = times.pop("rawgan")
    row = {"key": f"step/train/dcgan/b{batch}", "op": "step", "pass": "train",
           "layer": "dcgan k=1 bce adam", "batch": batch,
           "shape": "28x28x1, noise 100", "backend": backend, "dtype": "float32",
           "metric": "images/s", "flop": flop, "flop_useful": None, "bytes": None,
           "formula": "bench_step.step_flops: 2 * MACs of every GEMM pass of a k=1 step "
                      "(padding taps included)", "rotation_sets": 1, "time": t,
           "rate": batch / t["median"], "gflops": flop / t["median"] / 1e9,
           "pct_of_ceiling": 100 * flop / t["median"] / 1e9 / ceilings["matmul_gflops"],
           "references": [{"name": k, "time": v, "rate": batch / v["median"]}
                          for k, v in times.items()]}
    _pick_reference(row)
    return row


# --------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------

COLUMNS = (("op", 16), ("pass", 5), ("layer", 22), ("batch", 5), ("shape", 28),
           ("backend", 7), ("median/min ms", 27), ("rate", 16), ("%ceil", 6),
           ("reference", 26), ("ref ms", 17), ("ratio", 7))


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}" if seconds < 0.01 else \
        f"{seconds * 1e3:.1f}"


def format_row(row: dict) -> str:
    t, ref = row["time"], row.get("reference")
    unit = row["metric"]
    rate = f"{row['rate']:.0f} {unit}" if unit == "images/s" else f"{row['rate']:.1f} {unit}"
    flag = "" if t.get("clean", True) else " (noisy)"
    if row.get("rotated_over_cache", 2) < 2:  # inputs may partly stay in cache
        flag += " (cache)"
    ref_flag = "" if ref is None or ref["time"].get("clean", True) else " (noisy)"
    ratio = row["ratio_vs_reference"]
    cells = (row["op"], row["pass"], row["layer"], str(row["batch"]), row["shape"],
             row["backend"], f"{_ms(t['median'])} / {_ms(t['min'])}{flag}", rate,
             f"{row['pct_of_ceiling']:.0f}%", "-" if ref is None else ref["name"],
             "-" if ref is None else _ms(ref["time"]["median"]) + ref_flag,
             "-" if ratio is None else f"{ratio:.2f}"
             + ("?" if not t.get("clean", True) or ref_flag else ""))
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)).rstrip()


def table_header() -> str:
    head = "  ".join(name.ljust(w) for name, w in COLUMNS).rstrip()
    return head + "\n" + "-" * len(head)


# --------------------------------------------------------------------------------------
# JSON in and out
# --------------------------------------------------------------------------------------

def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def write_json(result: dict, path: Path) -> None:
    """Write atomically (``checkpoint.atomic_write``: a temporary file renamed over the target)."""
    from .checkpoint import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")


def load_result(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BenchError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise BenchError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(
            data.get("rows"), list):
        raise BenchError(f"{path}: not a rawgan bench result (expected \"schema\": {SCHEMA!r} "
                         f"and a \"rows\" list)")
    for i, r in enumerate(data["rows"]):
        t = r.get("time") if isinstance(r, dict) else None
        ok = (isinstance(r, dict) and isinstance(r.get("key"), str)
              and isinstance(r.get("backend"), str) and isinstance(t, dict)
              and isinstance(t.get("median"), int | float) and t["median"] > 0)
        if not ok:
            raise BenchError(f"{path}: row {i} is not a bench row (needs \"key\", \"backend\" "
                             f"and a positive \"time\".\"median\"): {str(r)[:120]}")
    for key in ("machine", "git"):
        if not isinstance(data.get(key) or {}, dict):
            raise BenchError(f"{path}: {key!r} must be an object")
    return data


def default_json_path(backend_label: str, date: str) -> Path:
    """benchmarks/results/bench-<backend>-<date>.json when run inside the repository, else
    the current folder; ``-2``, ``-3``, ... appended rather than overwriting."""
    cwd = Path.cwd().resolve()
    inside = (REPO / "benchmarks").is_dir() and (cwd == REPO or REPO in cwd.parents)
    folder = REPO / "benchmarks" / "results" if inside else cwd
    path = folder / f"bench-{backend_label}-{date}.json"
    i = 2
    while path.exists():
        path = folder / f"bench-{backend_label}-{date}-{i}.json"
        i += 1
    return path


# --------------------------------------------------------------------------------------
# --compare
# --------------------------------------------------------------------------------------

def _rel_mad(t: dict) -> float:
    return t.get("mad", 0.0) / t["median"] if t.get("median") else 0.0


def compare(old: dict, new: dict, out=print) -> dict:
    """Print the change of every row's median time from ``old`` to ``new``; flag changes beyond
    max(3 MAD / median of either run, NOISE_FLOOR). Returns the counts and flagged keys."""
    olds = {(r["key"], r["backend"]): r for r in old["rows"]}
    news = {(r["key"], r["backend"]): r for r in new["rows"]}
    for what in ("cpu", "cores_available", "blas_threads", "blas_kernels"):
        a, b = (old.get("machine") or {}).get(what), (new.get("machine") or {}).get(what)
        if a != b and not (what == "blas_kernels" and None in (a, b)):  # older files lack it
            out(f"# note: {what} differs: {a!r} (old) vs {b!r} (new): the change mixes machines "
                "or BLAS settings")
    if old.get("device") != new.get("device"):
        out(f"# note: device differs: {old.get('device')!r} vs {new.get('device')!r}")
    if bool((old.get("args") or {}).get("quick")) != bool((new.get("args") or {}).get("quick")):
        out("# note: one run is --quick (smaller sizes, inputs not rotated): rows differ in kind")
    out(f"# old: {old.get('date')} commit {str((old.get('git') or {}).get('commit'))[:10]}   "
        f"new: {new.get('date')} commit {str((new.get('git') or {}).get('commit'))[:10]}")
    head = (f"{'row':<52}{'backend':<8}{'old ms':>10}{'new ms':>10}{'change':>9}{'noise':>8}"
            f"{'ratio vs ref old->new':>24}  flag")
    out(head)
    out("-" * len(head))
    regressions, faster = [], []
    for k, r in news.items():
        o = olds.get(k)
        if o is None:
            continue
        mo, mn = o["time"]["median"], r["time"]["median"]
        change = mn / mo - 1
        noise = max(NOISE_FLOOR, 3 * _rel_mad(o["time"]), 3 * _rel_mad(r["time"]))
        flag = ""
        if change > noise:
            flag = "REGRESSION"
            regressions.append(r["key"])
        elif change < -noise:
            flag = "faster"
            faster.append(r["key"])
        if flag and not (o["time"].get("clean", True) and r["time"].get("clean", True)):
            flag += " (noisy run)"  # other processes were busy during a repeat
        ro, rn = o.get("ratio_vs_reference"), r.get("ratio_vs_reference")
        ratios = f"{'-' if ro is None else f'{ro:.2f}'} -> {'-' if rn is None else f'{rn:.2f}'}"
        out(f"{r['key']:<52}{r['backend']:<8}{_ms(mo):>10}{_ms(mn):>10}{100 * change:>+8.1f}%"
            f"{100 * noise:>7.1f}%{ratios:>24}  {flag}")
    only_new = sorted(set(news) - set(olds))
    only_old = sorted(set(olds) - set(news))
    summary = {"compared": len(set(news) & set(olds)), "regressions": regressions,
               "faster": faster, "only_new": len(only_new), "only_old": len(only_old)}
    out(f"compared {summary['compared']} rows: {len(regressions)} regression(s), "
        f"{len(faster)} faster beyond the noise; {len(only_new)} rows only in the new run, "
        f"{len(only_old)} only in the old one")
    return summary


# --------------------------------------------------------------------------------------
# --plot
# --------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'rawgan[train]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roofline(result: dict, path: Path) -> Path:
    """Arithmetic intensity (FLOP/byte) vs achieved GFLOP/s of every op row, rawgan filled,
    its PyTorch reference hollow, under the measured roofs of each backend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 6))
    rows = [r for r in result["rows"] if r["op"] != "step" and r.get("bytes")]
    colors = {op: f"C{i}" for i, op in enumerate(OPS)}
    markers = {"fwd": "o", "dgrad": "s", "wgrad": "^", "bwd": "D"}
    if rows:
        ai = [r["flop"] / r["bytes"] for r in rows]
        xs = np.logspace(math.log10(min(ai) / 2), math.log10(max(ai) * 2), 200)
    else:
        xs = np.logspace(-1, 3, 200)
    for i, (backend, c) in enumerate(result["ceilings"].items()):
        peak, bw = c["matmul_gflops"], c["copy_gbps"]
        ax.plot(xs, np.minimum(peak, bw * xs), color="k", ls=("-", "--", ":")[i % 3], lw=1.2,
                label=f"{backend} roof: matmul {peak:.0f} GFLOP/s, copy {bw:.1f} GB/s")
    seen = set()
    for r in rows:
        x = r["flop"] / r["bytes"]
        label = r["op"] if r["op"] not in seen else None
        seen.add(r["op"])
        ax.scatter(x, r["flop"] / r["time"]["median"] / 1e9, color=colors[r["op"]],
                   marker=markers.get(r["pass"], "o"), label=label, zorder=3)
        ref = r.get("reference")
        if ref is not None:
            ax.scatter(x, r["flop"] / ref["time"]["median"] / 1e9, facecolors="none",
                       edgecolors=colors[r["op"]], marker=markers.get(r["pass"], "o"),
                       zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte, nominal FLOP, minimum bytes)")
    ax.set_ylabel("achieved GFLOP/s (median)")
    ax.set_title(f"rawgan roofline: {result.get('device')} ({result.get('machine', {}).get('cpu')})"
                 f"\n{result.get('date')} commit {str(result.get('git', {}).get('commit'))[:10]}"
                 f"; filled: rawgan, hollow: PyTorch; o fwd, s dgrad, ^ wgrad, D bwd",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def history_results(folder: Path | None, current: dict | None) -> list[dict]:
    """Full (not --quick) rawgan bench results in ``folder``, plus ``current``, by date."""
    out = []
    if folder is not None and folder.is_dir():
        for f in sorted(folder.glob("*.json")):
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if (isinstance(data, dict) and data.get("schema") == SCHEMA
                    and not data.get("args", {}).get("quick")):
                data["_file"] = str(f)
                out.append(data)
    if current is not None and not any(d.get("date") == current.get("date")
                                       and d.get("git") == current.get("git") for d in out):
        out.append(current)
    return sorted(out, key=lambda d: str(d.get("date")))


def plot_history(results: list[dict], path: Path) -> Path:
    """The step's images/s (rawgan solid, PyTorch dashed) and each op family's geometric-mean
    ratio vs PyTorch, per backend and batch, across runs."""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    labels = [f"{str(d.get('date'))[:10]}\n{str(d.get('git', {}).get('commit'))[:7]}"
              for d in results]
    xs = list(range(len(results)))
    series: dict = {}
    ratios: dict = {}
    for i, d in enumerate(results):
        fam: dict = {}
        for r in d["rows"]:
            if r["op"] == "step":
                series.setdefault((r["backend"], r["batch"], "rawgan"), []).append((i, r["rate"]))
                if r.get("reference"):
                    series.setdefault((r["backend"], r["batch"], "PyTorch"), []).append(
                        (i, r["batch"] / r["reference"]["time"]["median"]))
            elif r.get("ratio_vs_reference"):
                fam.setdefault((r["backend"], r["op"], r["batch"]), []).append(
                    r["ratio_vs_reference"])
        for k, v in fam.items():
            ratios.setdefault(k, []).append((i, math.exp(sum(map(math.log, v)) / len(v))))
    for (backend, batch, who), pts in sorted(series.items()):
        a1.plot(*zip(*pts, strict=True), marker="o", ls="-" if who == "rawgan" else "--",
                label=f"{who} b={batch}" + (f" ({backend})" if who == "rawgan" else
                                             f" (reference of {backend})"))
    a1.set_ylabel("train step, images/s")
    a1.set_title("rawgan bench history (full runs in the results folder)")
    for (backend, op, batch), pts in sorted(ratios.items()):
        a2.plot(*zip(*pts, strict=True), marker="o", label=f"{op} b={batch} ({backend})")
    a2.axhline(1.0, color="k", lw=0.8)
    a2.set_ylabel("PyTorch time / rawgan time\n(geomean per op family; > 1: rawgan faster)")
    a2.set_xticks(xs, labels, fontsize=7)
    for ax in (a1, a2):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------

def _parse_ops(values: list[str] | None) -> list[str]:
    if not values:
        return list(OPS)
    ops = []
    for v in values:
        for name in filter(None, (s.strip() for s in v.split(","))):
            if name not in OPS:
                raise BenchError(f"--ops: unknown op {name!r}: expected a comma-separated "
                                 f"subset of {','.join(OPS)}")
            if name not in ops:
                ops.append(name)
    if not ops:
        raise BenchError(f"--ops: no op named (got {', '.join(map(repr, values))}); expected "
                         f"a comma-separated subset of {','.join(OPS)}")
    return ops


def run(args, ops_names: list[str], batches: list[int], out=print) -> dict:
    """Measure everything asked for; returns the result dict (the JSON)."""
    h = helpers()
    names, notes = _select_backends(args.backend)
    for note in notes:
        out(f"# {note}")
    torch = _torch()
    undo = None
    if args.threads is not None:
        undo, thread_notes = set_threads(args.threads)
        notes = notes + thread_notes
        threads = args.threads
    else:
        threads = h.blas_threads()
        if torch is not None:  # both sides on the same cores; restored afterwards
            before = torch.get_num_threads()
            torch.set_num_threads(threads)

            def undo():
                torch.set_num_threads(before)
    try:
        return _run(args, ops_names, batches, out, h, names, notes, torch, threads)
    finally:
        if undo is not None:
            undo()


def _run(args, ops_names, batches, out, h, names, notes, torch, threads) -> dict:
    budget = (Budget(warmup=1, repeats=max(1, args.repeats or 3), min_time=0.0, settle=0.0,
                     max_retries=0, retry_wait=0.0)
              if args.quick else
              Budget(repeats=args.repeats or 10, min_time=args.min_time,
                     max_retries=args.max_retries, retry_wait=args.retry_wait))
    cap = 1 if args.quick else 32
    info = h.machine_info(threads)
    busy_before = h.cpu_busy(0.2 if args.quick else 0.5)
    result = {
        "schema": SCHEMA, "date": info["date"],
        "machine": {k: info.get(k) for k in ("cpu", "cores", "cores_available", "blas_threads",
                                             "blas_kernels", "torch_threads", "thread_env")},
        "device": None,
        "versions": {"python": info.get("python"), "numpy": info.get("numpy"),
                     "numpy_blas": info.get("numpy_blas"), "torch": info.get("torch"),
                     "torch_config": info.get("torch_config"), "rawgan": __version__},
        "git": {"commit": info.get("git_commit"), "dirty": info.get("git_dirty"),
                "modified": info.get("git_modified")},
        "loadavg_before": h.loadavg(), "cpu_busy_before": busy_before,
        "args": {"ops": ops_names, "backend": args.backend, "batch": batches,
                 "quick": args.quick, "repeats": budget.repeats, "warmup": budget.warmup,
                 "min_time": budget.min_time, "torch_layout": args.torch_layout,
                 "threads": args.threads,
                 "max_retries": budget.max_retries, "retry_wait": budget.retry_wait},
        "conventions": {
            "flop": "2 FLOP per multiply-accumulate; GFLOP/s and % of ceiling use the NOMINAL "
                    "count (im2col GEMM, padding taps included); flop_useful/rate_useful "
                    "exclude the padding taps",
            "bytes": "minimum traffic: every input read once, every output written once",
            "ratio": "reference median / rawgan median (> 1: rawgan faster); the reference is "
                     "the fastest PyTorch variant with TF32 off",
            "time": "seconds; median, min and MAD over the timed calls after warm-up",
            "ceilings": "fastest call of xp.matmul on square float32 matrices, and of a copy "
                        "(2 x bytes) far larger than the cache"},
        "ceilings": {}, "rows": [], "notes": notes,
    }
    if getattr(h, "fallback", False):
        result["notes"].append("benchmarks/bench_step.py not found: no step row, no load checks")
    out(f"# rawgan bench  {info['date']}  commit {str(info.get('git_commit'))[:10]}"
        f"{' (dirty)' if info.get('git_dirty') else ''}")
    out(f"# {info.get('cpu')}, {info.get('cores_available')} cores; numpy {np.__version__} "
        f"(BLAS threads {threads}); torch {None if torch is None else torch.__version__}")
    if (advice := blas_kernels.hint()) is not None:
        out(f"# note: {advice}")
        result["notes"].append(advice)
    if busy_before is not None and busy_before > h.NOISY:
        out(f"# CPU busy before the run: {100 * busy_before:.0f}% of all cores: OTHER "
            f"PROCESSES ARE RUNNING, timings will be noisy")
    devices = []
    for backend in names:
        ops = backends.get(backend)
        dev = device_name(ops)
        devices.append(dev)
        torch_device = None
        if torch is not None:
            torch_device = "cpu" if dev == "cpu" else ("cuda" if torch.cuda.is_available()
                                                       else None)
        refs = _ref_specs(dev, args.quick, args.torch_layout) if torch_device else []
        ceil = measure_ceilings(ops, ops.synchronize, budget, h, args.quick, torch_device)
        result["ceilings"][backend] = ceil
        out(f"\n# {backend} on {dev}: matmul ceiling {ceil['matmul_gflops']:.1f} GFLOP/s, "
            f"copy bandwidth {ceil['copy_gbps']:.1f} GB/s (measured now)"
            + ("" if refs else "; no PyTorch reference on this device"))
        if backend == "numpy" and winograd.ENABLED:
            out("# numpy runs some convolutions by Winograd (fewer multiplies than the nominal "
                "count): those rows can pass 100% of the ceiling")
        out(table_header())
        for case in dcgan_cases(ops_names, batches):
            row = kernel_row(case, backend, ops, budget, h, ceil, refs, torch_device, cap)
            result["rows"].append(row)
            out(format_row(row))
        if "step" in ops_names:
            for n in batches:
                row = step_row(n, backend, ops, budget, h, ceil, refs, torch_device, args.seed)
                if row is None:
                    out("# step: skipped (needs benchmarks/bench_step.py from the repository)")
                    break
                result["rows"].append(row)
                out(format_row(row) + f"  [{row['gflops']:.1f} GFLOP/s]")
    result["device"] = ", ".join(dict.fromkeys(devices))
    result["loadavg_after"] = h.loadavg()
    result["cpu_busy_after"] = busy_after = h.cpu_busy(0.2 if args.quick else 0.5)
    noisy = sum(not r["time"].get("clean", True)
                or not all(ref["time"].get("clean", True) for ref in r.get("references", []))
                for r in result["rows"])
    if noisy or (busy_after is not None and busy_after > h.NOISY):
        out(f"# WARNING: other processes were running ({noisy} row(s) disturbed; CPU busy after "
            f"the run {100 * (busy_after or 0):.0f}%): do not commit these timings")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time rawgan's ops on the seed DCGAN's layer shapes and the full training "
                    "step, against PyTorch and the measured matmul / copy ceilings, in the same "
                    "run. Prints a table and writes JSON.",
        epilog="examples:\n"
               "  rawgan bench --quick --json smoke.json\n"
               "  rawgan bench --batch 64 --batch 256 --batch 1024 --plot\n"
               "  rawgan bench --ops conv2d,conv2d_transpose --compare OLD.json\n"
               "  rawgan bench --from NEW.json --compare OLD.json --plot\n"
               "FLOP/byte conventions, references and JSON keys: see rawgan/bench.py.")
    p.add_argument("--ops", action="append", metavar="LIST",
                   help=f"comma-separated subset of {','.join(OPS)} (default: all; repeatable)")
    p.add_argument("--backend", default="numpy",
                   choices=("numpy", "cupy", "numba", "all-available"),
                   help="backend(s) to time (default numpy; all-available: every backend that "
                        "loads, numba only on a real GPU)")
    p.add_argument("--batch", type=int, action="append", metavar="N",
                   help="batch size, repeatable (default: 64 and 256; --quick: 8)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: batch 8, 3 timed calls, tiny ceilings, no retries (seconds)")
    p.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="timed calls per row, at least (default 10; --quick 3)")
    p.add_argument("--min-time", type=float, default=0.25, metavar="SECONDS",
                   help="time each row for at least this long (default 0.25)")
    p.add_argument("--threads", type=int, default=None, metavar="T",
                   help="threads for OpenBLAS and PyTorch, both sides "
                        "alike (default: as the environment sets them, else every core)")
    p.add_argument("--torch-layout", choices=("best", "nchw", "channels_last"), default="best",
                   help="PyTorch CPU reference layout; best: time both, use the faster")
    p.add_argument("--max-retries", type=int, default=10, metavar="N",
                   help="rows to redo, in all, when other processes disturbed them (default 10)")
    p.add_argument("--retry-wait", type=float, default=30.0, metavar="SECONDS",
                   help="before a retry, wait up to SECONDS for the CPU to be quiet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="OUT",
                   help="results file (default benchmarks/results/bench-<backend>-<date>.json "
                        "in the repository, else ./; --quick writes only with --json)")
    p.add_argument("--from", dest="from_", type=Path, default=None, metavar="RESULTS",
                   help="measure nothing: read this results JSON (for --compare / --plot)")
    p.add_argument("--compare", type=Path, default=None, metavar="OLD",
                   help="print the change per row against OLD.json, flagging regressions "
                        "beyond max(3 MAD, 5%%)")
    p.add_argument("--fail-on-regression", action="store_true",
                   help="exit with status 3 when --compare flags a regression")
    p.add_argument("--plot", action="store_true",
                   help="write <json>.roofline.png and <json>.history.png (needs matplotlib)")
    p.add_argument("--plot-dir", type=Path, default=None, metavar="DIR",
                   help="folder for the PNGs (default: next to the JSON, else ./)")
    p.add_argument("--results-dir", type=Path, default=None, metavar="DIR",
                   help="results folder of the history plot (default benchmarks/results in the "
                        "repository, else the JSON's folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``rawgan bench``. Exit status: 0 done, 1 a run-time error, 2 a usage error, 3 a
    regression flagged with ``--fail-on-regression``."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        for flag, value, least in (("--repeats", args.repeats, 1), ("--threads", args.threads, 1),
                                   ("--batch", min(args.batch or [1]), 1),
                                   ("--max-retries", args.max_retries, 0),
                                   ("--min-time", args.min_time, 0),
                                   ("--retry-wait", args.retry_wait, 0)):
            if value is not None and value < least:
                parser.error(f"{flag} must be at least {least}")
        if args.from_ is not None:  # nothing is measured: the measuring options do nothing
            given = [flag for flag, value, default in (
                ("--ops", args.ops, None), ("--backend", args.backend, "numpy"),
                ("--batch", args.batch, None), ("--quick", args.quick, False),
                ("--repeats", args.repeats, None), ("--min-time", args.min_time, 0.25),
                ("--threads", args.threads, None), ("--max-retries", args.max_retries, 10),
                ("--retry-wait", args.retry_wait, 30.0), ("--seed", args.seed, 0),
                ("--json", args.json, None)) if value != default]
            if given:
                parser.error(f"--from measures nothing: {', '.join(given)} would be ignored")
        try:
            args.ops = _parse_ops(args.ops)
        except BenchError as exc:
            parser.error(str(exc))
        if args.from_ is not None and not (args.compare or args.plot):
            parser.error("--from only makes sense with --compare or --plot")
        if args.fail_on_regression and args.compare is None:
            parser.error("--fail-on-regression needs --compare OLD.json")
        if args.plot_dir is not None and args.plot_dir.exists() and not args.plot_dir.is_dir():
            parser.error(f"--plot-dir {args.plot_dir}: exists and is not a folder")
        if args.plot_dir is not None and not args.plot:
            parser.error("--plot-dir needs --plot")
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        return _main(args)
    except (BenchError, backends.BackendUnavailable, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


def _main(args) -> int:
    json_path = args.json
    # what is read or written after the measurement is checked before it (a full run takes
    # minutes: a typo must not lose it)
    old = load_result(args.compare) if args.compare is not None else None
    if args.plot:
        _pyplot()  # matplotlib missing would otherwise show after the measurement
    if args.plot and args.quick and json_path is None and args.from_ is None:
        raise BenchError("--quick --plot without --json: the plots would be written, the "
                         "results they show would not (add --json OUT.json)")
    if json_path is not None and args.from_ is None and (
            Path(json_path).is_dir() or not Path(json_path).parent.is_dir()):
        raise BenchError(f"--json {json_path}: not a file in an existing folder")
    if args.from_ is not None:
        result = load_result(args.from_)
        json_path = args.from_
    else:
        ops_names = args.ops
        batches = list(dict.fromkeys(args.batch or ([QUICK_BATCH] if args.quick
                                                    else list(DEFAULT_BATCHES))))
        result = run(args, ops_names, batches)
        label = "all" if args.backend == "all-available" else args.backend
        if json_path is None and not args.quick:
            json_path = default_json_path(label, str(result["date"])[:10])
        if json_path is not None:
            write_json(result, json_path)
            print(f"\nwrote {json_path}")
    code = 0
    if args.compare is not None:
        print()
        summary = compare(old, result)
        if summary["regressions"] and args.fail_on_regression:
            code = 3
    if args.plot:
        folder = args.plot_dir or (json_path.parent if json_path is not None else Path.cwd())
        folder.mkdir(parents=True, exist_ok=True)
        stem = json_path.stem if json_path is not None else "bench"
        roof = plot_roofline(result, folder / f"{stem}.roofline.png")
        hist_dir = args.results_dir
        if hist_dir is None:
            hist_dir = (REPO / "benchmarks" / "results" if (REPO / "benchmarks").is_dir()
                        else json_path.parent if json_path is not None else None)
        hist = plot_history(history_results(hist_dir, result), folder / f"{stem}.history.png")
        print(f"wrote {roof}\nwrote {hist}")
    return code


if __name__ == "__main__":
    sys.exit(main())
