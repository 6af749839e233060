"""CuPy backend: every op of :mod:`numpy_ops`, on the GPU, launching rawgan's own CUDA kernels.

The op functions have the SAME names and signatures as ``numpy_ops`` (the reference; see its
docstrings for the shapes and the formulas). Each one launches hand-written kernels from the
repository's ``kernels/*.cu`` (one file per op family), compiled at first use by NVRTC through
``cupy.RawModule`` and cached (in memory here, and on disk by CuPy). The op path calls no
cuBLAS or cuDNN: those appear only in ``benchmarks/bench_gpu.py``, as the reference.

Which kernel serves which op (formulas and thread mappings are in the .cu files):

==============================  =========================================================
dense_forward / _backward       gemm.cu: tiled SGEMM/DGEMM (nn: y = x@w + b, nt: dx = dy@w^T,
                                tn: dw = x^T@dy); db: elementwise.cu colsum (two passes)
conv2d_forward                  conv.cu conv_fwd: implicit GEMM, NHWC, no im2col buffer
conv2d_backward                 conv.cu conv_dgrad (stride-phase gather, no zero taps),
                                conv_wgrad (split-K + deterministic reduce), colsum
conv2d_transpose_forward        conv_dgrad (the conv's backward-data IS this forward)
conv2d_transpose_backward       conv_fwd (backward-data IS the conv forward), conv_wgrad
bias_add_*, activations         elementwise.cu
batchnorm_*                     batchnorm.cu
dropout_*                       elementwise.cu (NumPy's PCG64 numbers, or Philox)
==============================  =========================================================

Fusion (``leaky_alpha=``, as numpy_ops): the dense, conv2d and conv2d_transpose forwards
apply a following LeakyReLU in the GEMM epilogue (tile_gemm.cuh ``BiasLeaky``), and
batchnorm_forward in bn_apply; batchnorm_backward folds that LeakyReLU's backward into its
own two passes, recomputing the batch norm's output from x for the slope. Each fusion saves
a launch and a read and a write of the activation; the results are bitwise those of the
separate kernels.

Beyond numpy_ops' op set (the training loop may use them; they run on CuPy arrays only):
``adam_update``, ``sgd_update``, ``rmsprop_update``, ``clip_update`` (multi-tensor optimizer
steps, optim.cu), ``gan_discriminator_loss`` / ``gan_generator_loss`` (losses.cu: value
and gradient in one launch, the loss left on the device), and what a CUDA-graph-captured
step (rawgan/graphed.py) needs so that it launches only rawgan kernels and never touches the
host: ``StepRng`` / ``step_rng`` / ``standard_normal`` (Philox counters offset by a value in
device memory) and ``copy_into``. (``accumulate``, ``grads += g``, and ``zero_grads``, every
gradient of a model in one launch, are numpy_ops' ops, as rawgan kernels here.)

Importing this module never imports CuPy: ``rawgan.backends.get("cupy")`` calls
:func:`check_available`, which raises ``BackendUnavailable`` naming what is missing (the
package, a GPU, or a working NVRTC). ``xp`` resolves to the ``cupy`` module on first access.

Dropout randomness: ``DROPOUT_RNG = "numpy"`` (default) uses exactly the uniforms the
layer's ``numpy.random.Generator`` would draw (numpy_ops' ``rng.random(x.shape)``), so both
backends make the SAME masks from the same seed and leave the generator in the same state.
For PCG64, numpy's default bit generator, the kernel computes those numbers on the GPU from
the generator's state (each thread jumps ahead to its outputs) and the host only skips the
generator past them: nothing drawn on the host, nothing copied. Other bit generators draw on
the host and upload. ``"philox"`` (``set_dropout_rng("philox")`` or the environment variable
``RAWGAN_CUPY_DROPOUT=philox``) draws one 63-bit seed from the generator per call and makes
the mask with Philox-4x32-10, as a captured step (rawgan/graphed.py) does: reproducible from
the model's seed, not NumPy's masks.

TF32: ``TF32 = True`` (``set_tf32(True)`` or ``RAWGAN_TF32=1``) runs the float32 dense and
convolution GEMMs with 128 x 128, 128 x 64 and 64 x 64 tiles on the tensor cores
(mma.sync m16n8k8 .tf32, sm_80+; kernel suffixes ``_tf32_L/M/S``); thin outputs (N <= 16)
and float64 stay on the FMA tiles. The operands are rounded to TF32 (10 mantissa bits, round
to nearest) and the products summed in float32, so a result is within about
``2^-11 * sum_k |a_k b_k|`` of the exact sum: a norm-relative error of ~4e-4 against
float64 on random data in the CPU emulator (the tests allow 3e-3), where the float32 FMA
tiles give ~1e-6. Off by default. GPU verification pending (no GPU run yet).
"""

from __future__ import annotations

import importlib.resources
import os
import re
from pathlib import Path

import numpy as np

from . import BackendUnavailable
from .numpy_ops import (
    conv_geometry,
    conv_pads,
    conv_transpose_geometry,
    leaky_fold_beta,
    pair,
)
from .shapes import check_bias, check_conv
from .streams import claim_uniforms

__all__ = [
    "asarray", "to_numpy", "synchronize", "check_available", "pair", "conv_pads",
    "conv_geometry", "conv_transpose_geometry", "dense_forward", "dense_backward",
    "conv2d_forward", "conv2d_backward", "conv2d_transpose_forward",
    "conv2d_transpose_backward", "bias_add_forward", "bias_add_backward",
    "leaky_relu_forward", "leaky_relu_backward", "relu_forward", "relu_backward",
    "tanh_forward", "tanh_backward", "sigmoid_forward", "sigmoid_backward",
    "batchnorm_forward", "batchnorm_backward", "dropout_forward", "dropout_backward",
    "adam_update", "sgd_update", "rmsprop_update", "clip_update", "gan_discriminator_loss",
    "gan_generator_loss", "set_dropout_rng", "set_tf32", "kernel_source", "StepRng",
    "step_rng", "standard_normal", "copy_into", "accumulate", "zero_grads",
]

name = "cupy"

#: The CUDA sources, one per op family; each is one RawModule, compiled on first use.
KERNEL_FILES = ("gemm.cu", "conv.cu", "elementwise.cu", "batchnorm.cu", "losses.cu",
                "optim.cu")
#: Headers pasted into the sources before compiling (NVRTC gets no include path).
KERNEL_HEADERS = ("common.cuh", "tile_gemm.cuh")
#: NVRTC options. The kernels' names are ``extern "C"``, so no name_expressions are needed.
COMPILE_OPTIONS = ("-std=c++17",)

#: GEMM tile shapes (BM, BN) of the kernel-name suffixes, see kernels/gemm.cu.
TILES = {"L": (128, 128), "M": (128, 64), "S": (64, 64), "T": (256, 4)}
#: Force one tile configuration (tests use it to exercise every kernel); None: heuristic.
FORCE_TILE: str | None = None
_BK = 8            # the K slab of every tile configuration
#: the longest run of a weight gradient's pixel sum one thread does before a split-K boundary
MAX_K_CHUNK = 4096
_THREADS = 256     # threads per block of the GEMM-shaped and elementwise kernels
_CHUNK = 4096      # elements per block of the multi-tensor optimizer kernels


def _env_choice(name: str, default: str, choices: dict[str, str]) -> str:
    """The environment variable ``name`` mapped through ``choices`` (case and surrounding
    blanks ignored; unset or empty: ``default``); any other value is refused, naming the
    variable and what it takes, rather than silently read as the default."""
    raw = os.environ.get(name, "").strip().lower() or default
    if raw not in choices:
        raise ValueError(f"environment variable {name}={os.environ[name]!r}: expected one of "
                         f"{', '.join(sorted(choices))}")
    return choices[raw]


_SWITCH = {**dict.fromkeys(("1", "true", "yes", "on"), "on"),
           **dict.fromkeys(("0", "false", "no", "off"), "off")}
#: float32 GEMMs on TF32 tensor cores (see the module docstring); off by default.
TF32 = _env_choice("RAWGAN_TF32", "off", _SWITCH) == "on"

DROPOUT_MODES = ("numpy", "philox")
# (the modes were called "host" and "device" before the masks were made on the GPU: a stale
# setting is refused, not read as the default)
DROPOUT_RNG = _env_choice("RAWGAN_CUPY_DROPOUT", "numpy", {m: m for m in DROPOUT_MODES})

#: A profiler's hook (benchmarks/profile_step.py): when set, every kernel launch goes through
#: ``LAUNCH_HOOK(kernel, grid, launch)`` with ``launch()`` doing the launch; None: direct.
LAUNCH_HOOK = None

_REPO_KERNELS = Path(__file__).resolve().parents[2] / "kernels"
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.MULTILINE)
_INT32_MAX = 2**31 - 1

_cp = None                                   # the cupy module, once imported
# Compiled modules are loaded into one device's context, and the tables hold one device's
# properties: all three are keyed by the current device's id (cupy.cuda.Device(i) scopes).
_modules: dict[tuple[int, str], object] = {}             # (device, file) -> cupy.RawModule
_functions: dict[tuple[int, str, str], object] = {}      # (device, file, kernel)
_device_info: dict[tuple[int, str], int] = {}            # (device, "sms" | "cc")
_mt_tables: dict[tuple, tuple] = {}          # multi-tensor pointer tables, by pointer tuple


# --------------------------------------------------------------------------------------
# CuPy, lazily
# --------------------------------------------------------------------------------------

def _cupy():
    """The ``cupy`` module, imported on first use (raises BackendUnavailable without it)."""
    global _cp
    if _cp is None:
        try:
            import cupy
        except ImportError as exc:
            raise BackendUnavailable(
                f"backend 'cupy' needs the package 'cupy' (pip install 'rawgan[cuda]', or "
                "'rawgan[cuda13]' for CUDA 13), "
                f"which cannot be imported here: {exc}"
            ) from exc
        _cp = cupy
    return _cp


def __getattr__(attr: str):
    # PEP 562: ``cupy_ops.xp`` is the cupy module, imported only when first asked for.
    if attr == "xp":
        return _cupy()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def check_available() -> None:
    """Raise :class:`BackendUnavailable` with the reason when this backend cannot run here:
    CuPy missing, no CUDA GPU (or driver), or NVRTC unable to compile rawgan's kernels."""
    cp = _cupy()
    try:
        count = int(cp.cuda.runtime.getDeviceCount())
    except Exception as exc:  # cupy.cuda.runtime.CUDARuntimeError: no driver, no device
        raise BackendUnavailable(
            f"backend 'cupy': CuPy is installed but finds no CUDA GPU ({exc})") from None
    if count < 1:
        raise BackendUnavailable("backend 'cupy': CuPy is installed but finds no CUDA GPU "
                                 "(0 devices)")
    try:
        _function("elementwise.cu", "mul_f32")
    except Exception as exc:  # NVRTC missing or the sources not found
        raise BackendUnavailable(
            f"backend 'cupy': a GPU is present but rawgan's CUDA kernels cannot be compiled "
            f"({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------------------
# kernel sources and modules
# --------------------------------------------------------------------------------------

def _read_kernel_file(filename: str) -> str:
    """Text of one kernel file: from the installed package (``rawgan/kernels/``, where the
    wheel puts the repository's ``kernels/``), else from the source checkout."""
    for package, parts in (("rawgan.kernels", (filename,)), ("rawgan", ("kernels", filename))):
        try:
            res = importlib.resources.files(package).joinpath(*parts)
            if res.is_file():
                return res.read_text(encoding="utf-8")
        except (FileNotFoundError, ModuleNotFoundError, NotADirectoryError, TypeError):
            pass
    path = _REPO_KERNELS / filename
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise FileNotFoundError(
        f"rawgan kernel source {filename!r} not found in the installed package "
        f"(rawgan/kernels/) nor in the source tree ({path.parent})")


def kernel_source(filename: str) -> str:
    """The source NVRTC compiles for ``kernels/<filename>``: its ``#include "x.cuh"`` lines
    replaced by the headers' text (each header once), ``#pragma once`` removed."""
    seen: set[str] = set()

    def expand(fname: str) -> str:
        text = _PRAGMA_ONCE.sub("", _read_kernel_file(fname))

        def include(m: re.Match) -> str:
            inc = m.group(1)
            if inc in seen:
                return f"// {inc}: already included above"
            seen.add(inc)
            return f"// ---- begin {inc}\n{expand(inc)}\n// ---- end {inc}"

        return _INCLUDE.sub(include, text)

    return expand(filename)


def _device() -> int:
    """The current CUDA device's id (what ``with cupy.cuda.Device(i):`` selects)."""
    return int(_cupy().cuda.runtime.getDevice())


def _module(filename: str, device: int):
    key = (device, filename)
    mod = _modules.get(key)
    if mod is None:
        mod = _cupy().RawModule(code=kernel_source(filename), options=COMPILE_OPTIONS)
        _modules[key] = mod
    return mod


def _function(filename: str, kernel: str):
    key = (_device(), filename, kernel)
    fn = _functions.get(key)
    if fn is None:
        fn = _module(filename, key[0]).get_function(kernel)
        _functions[key] = fn
    return fn


def _launch(filename: str, kernel: str, grid, block, args) -> None:
    fn = _function(filename, kernel)
    if LAUNCH_HOOK is None:
        fn(tuple(grid), tuple(block), tuple(args))
    else:
        LAUNCH_HOOK(kernel, tuple(grid), lambda: fn(tuple(grid), tuple(block), tuple(args)))


# --------------------------------------------------------------------------------------
# array plumbing
# --------------------------------------------------------------------------------------

def asarray(a, dtype=None):
    """Move ``a`` onto this backend (device memory)."""
    return _cupy().asarray(a, dtype=dtype)


def to_numpy(a) -> np.ndarray:
    """Return ``a`` as a NumPy array (a device-to-host copy for CuPy arrays)."""
    cp = _cupy()
    if isinstance(a, cp.ndarray):
        return cp.asnumpy(a)
    return np.asarray(a)


def synchronize() -> None:
    """Wait until the queued kernels have finished (for timing)."""
    _cupy().cuda.get_current_stream().synchronize()


def set_dropout_rng(mode: str) -> None:
    """``"numpy"``: NumPy's masks (its PCG64 numbers, made on the GPU); ``"philox"``:
    Philox-4x32-10 seeded by one draw of the layer's generator."""
    global DROPOUT_RNG
    if mode not in DROPOUT_MODES:
        raise ValueError(f"dropout rng mode must be one of {DROPOUT_MODES}, got {mode!r}")
    DROPOUT_RNG = mode


def set_tf32(on: bool) -> None:
    """Run the float32 dense and convolution GEMMs on TF32 tensor cores (``True``) or on the
    float32 FMA tiles (``False``, the default)."""
    global TF32
    if not isinstance(on, bool):
        raise TypeError(f"set_tf32: expected True or False, got {on!r}")
    TF32 = on


def _empty(shape, dtype):
    """Every output and workspace of the ops is allocated here (tests NaN-poison it)."""
    return _cupy().empty(shape, dtype=dtype)


def _sm_count() -> int:
    key = (_device(), "sms")
    n = _device_info.get(key)
    if n is None:
        n = int(_cupy().cuda.Device().attributes["MultiProcessorCount"])
        _device_info[key] = n
    return n


def _compute_capability() -> int:
    """The device's compute capability as major * 10 + minor (90 for an H100)."""
    key = (_device(), "cc")
    cc = _device_info.get(key)
    if cc is None:
        cc = int(_cupy().cuda.Device().compute_capability)
        _device_info[key] = cc
    return cc


def _dtype(*arrays) -> np.dtype:
    """The common float dtype of the arrays given (None entries skipped), else TypeError."""
    cp = _cupy()
    dt = None
    for a in arrays:
        if a is None:
            continue
        if not isinstance(a, cp.ndarray):
            raise TypeError(f"backend 'cupy' expects CuPy arrays, got {type(a).__name__} "
                            f"(move data with ops.asarray)")
        if a.dtype not in (np.float32, np.float64):
            raise TypeError(f"backend 'cupy' ops take float32 or float64, got {a.dtype}")
        if dt is None:
            dt = a.dtype
        elif a.dtype != dt:
            raise TypeError(f"mixed dtypes {dt} and {a.dtype}: convert one side first")
    return np.dtype(dt)


def _c(a):
    """C-contiguous version of ``a`` (no copy when it already is)."""
    if a is None or a.flags.c_contiguous:
        return a
    return _cupy().ascontiguousarray(a)


def _suffix(dtype) -> str:
    return "f32" if np.dtype(dtype) == np.float32 else "f64"


def _i32(v: int, what: str = "size") -> np.int32:
    if not 0 <= v <= _INT32_MAX:
        raise ValueError(f"{what} {v} does not fit the kernels' 32-bit index arithmetic")
    return np.int32(v)


def _ptr(a) -> int:
    data = a.data
    p = getattr(data, "ptr", None)  # cupy.cuda.MemoryPointer
    return int(p) if p is not None else int(a.ctypes.data)


def _vec(a, ld: int) -> np.int32:
    """1 when rows of ``a`` (leading dimension ``ld``) allow 16-byte vector loads."""
    v = 16 // a.dtype.itemsize
    return np.int32(ld % v == 0 and _ptr(a) % 16 == 0)


def _grid1d(n: int) -> tuple[int, int, int]:
    """Blocks for a grid-stride loop over n elements: enough to fill the GPU, no more."""
    return (max(1, min(-(-n // _THREADS), _sm_count() * 16)), 1, 1)


def _tile(dtype, m: int, n: int) -> tuple[str, int, int]:
    """Kernel-name suffix and (BM, BN) of the tile for an m x n output."""
    if FORCE_TILE is not None:
        cfg = FORCE_TILE
        if np.dtype(dtype) == np.float64 and cfg in ("L", "M"):
            cfg = "S"
    elif n <= 16:
        cfg = "T"
    elif np.dtype(dtype) == np.float64:
        cfg = "S"
    else:
        sms = _sm_count()

        def blocks(c: str) -> int:
            bm, bn = TILES[c]
            return -(-m // bm) * -(-n // bn)

        if n >= 128 and blocks("L") >= sms:
            cfg = "L"
        elif n >= 64 and blocks("M") >= sms:
            cfg = "M"
        else:
            cfg = "S"
    bm, bn = TILES[cfg]
    if TF32 and np.dtype(dtype) == np.float32 and cfg != "T":
        cc = _compute_capability()
        if cc < 80:  # (the _tf32_ kernels of such a device trap: common.cuh)
            raise BackendUnavailable(
                f"TF32 (RAWGAN_TF32=1 / cupy_ops.set_tf32(True)) runs on the tensor cores of "
                f"compute capability 8.0 and newer; this GPU is {cc // 10}.{cc % 10}: leave "
                "TF32 off")
        return f"tf32_{cfg}", bm, bn
    return f"{_suffix(dtype)}_{cfg}", bm, bn


def _splits(rows: int, cols: int) -> tuple[int, int]:
    """(S, rows per split) for the two-pass column reductions: ~4 blocks per SM in total."""
    bx = -(-cols // 32)
    s = max(1, min(-(-rows // 64), (4 * _sm_count()) // bx, 65535))
    per = -(-rows // s)
    return -(-rows // per), per


def _colsum(a2, out=None):
    """Column sums of the (M, C) matrix a2 -> (C,): colsum_partial, then colsum_final."""
    m, c = a2.shape
    out = _empty((c,), a2.dtype) if out is None else out
    if m == 0 or c == 0:  # a sum over no rows is 0
        out.fill(0)
        return out
    suf = _suffix(a2.dtype)
    s, per = _splits(m, c)
    part = out if s == 1 else _empty((s, c), a2.dtype)
    _launch("elementwise.cu", f"colsum_partial_{suf}", (-(-c // 32), s, 1), (32, 8, 1),
            (a2, _i32(m), _i32(c), _i32(per), part))
    if s > 1:
        _launch("elementwise.cu", f"colsum_final_{suf}", _grid1d(c), (_THREADS, 1, 1),
                (part, _i32(s), _i32(c), out))
    return out


# --------------------------------------------------------------------------------------
# GEMM launchers
# --------------------------------------------------------------------------------------

def _act(leaky_alpha, dtype) -> tuple[np.int32, object]:
    """The kernels' ``(act, slope)`` arguments: the fused LeakyReLU, or none."""
    if leaky_alpha is None:
        return np.int32(0), dtype.type(0)
    return np.int32(1), dtype.type(float(leaky_alpha))


def _gemm(layout: str, a, b, m: int, n: int, k: int, lda: int, ldb: int, out, bias=None,
          leaky_alpha=None):
    """out (m, n) = act(op(a) @ op(b) (+ bias)); layout nn / nt / tn as in kernels/gemm.cu,
    act the LeakyReLU(leaky_alpha) in the epilogue, or none."""
    if m == 0 or n == 0:
        return out
    if k == 0:
        out.fill(0)
        if bias is not None:
            out += bias
        if leaky_alpha is not None:
            out[...] = leaky_relu_forward(out, leaky_alpha)
        return out
    suf, bm, bn = _tile(out.dtype, m, n)
    t = out.dtype.type
    _launch("gemm.cu", f"gemm_{layout}_{suf}", (-(-m // bm), -(-n // bn), 1), (_THREADS, 1, 1),
            (_i32(m), _i32(n), _i32(k), a, _i32(lda), b, _i32(ldb), out, _i32(n), t(1), t(0),
             bias, _vec(a, lda), _vec(b, ldb), *_act(leaky_alpha, out.dtype)))
    return out


def _conv_args(x_shape, w_shape, out_hw, stride, pads):
    n, h, w, c = x_shape
    kh, kw, _, o = w_shape
    return (_i32(n), _i32(h), _i32(w), _i32(c), _i32(out_hw[0]), _i32(out_hw[1]), _i32(o),
            _i32(kh), _i32(kw), _i32(stride[0]), _i32(stride[1]), _i32(pads[0][0]),
            _i32(pads[1][0]))


def _conv_fwd(x, w, bias, stride, pads, out_hw, leaky_alpha=None):
    """y (N, Ho, Wo, O) = act(conv(x, w) + bias), implicit GEMM (kernels/conv.cu conv_fwd)."""
    n, _, _, c = x.shape
    kh, kw, _, o = w.shape
    y = _empty((n, out_hw[0], out_hw[1], o), x.dtype)
    m = n * out_hw[0] * out_hw[1]
    _i32(m, "N*Ho*Wo")
    _i32(kh * kw * c, "kh*kw*C")
    if y.size == 0:
        return y
    suf, bm, bn = _tile(x.dtype, m, o)
    _launch("conv.cu", f"conv_fwd_{suf}", (-(-m // bm), -(-o // bn), 1), (_THREADS, 1, 1),
            (x, w, bias, y, *_conv_args(x.shape, w.shape, out_hw, stride, pads),
             _vec(x, c), _vec(w, o), *_act(leaky_alpha, x.dtype)))
    return y


def _conv_dgrad(dy, w, bias, x_shape, stride, pads, leaky_alpha=None):
    """dx (x_shape) = act(the conv's backward-data of dy (+ bias)), by stride phase
    (conv.cu conv_dgrad)."""
    n, h, wd, c = x_shape
    _, ho, wo, o = dy.shape
    sh, sw = stride
    dx = _empty(tuple(x_shape), dy.dtype)
    if dx.size == 0:
        return dx
    m_max = n * -(-h // sh) * -(-wd // sw)  # pixels of the largest phase
    _i32(m_max, "N*H*W")
    _i32(w.shape[0] * w.shape[1] * o, "kh*kw*O")
    suf, bm, bn = _tile(dy.dtype, m_max, c)
    _launch("conv.cu", f"conv_dgrad_{suf}", (-(-m_max // bm), -(-c // bn), sh * sw),
            (_THREADS, 1, 1),
            (dy, w, bias, dx, *_conv_args(x_shape, w.shape, (ho, wo), stride, pads),
             _vec(dy, o), _vec(w, o), *_act(leaky_alpha, dy.dtype)))
    return dx


def _conv_wgrad(x, dy, w_shape, stride, pads):
    """dw (w_shape) = sum over pixels of im2col(x)^T dy, split-K (conv.cu conv_wgrad)."""
    n, _, _, c = x.shape
    _, ho, wo, o = dy.shape
    kh, kw = w_shape[0], w_shape[1]
    k = kh * kw * c
    p = n * ho * wo
    _i32(p, "N*Ho*Wo")
    _i32(k, "kh*kw*C")
    dw = _empty(tuple(w_shape), x.dtype)
    if p == 0:
        dw.fill(0)
        return dw
    suf, bm, bn = _tile(x.dtype, k, o)
    tiles = -(-k // bm) * -(-o // bn)
    slabs = -(-p // _BK)
    s = max(1, min((2 * _sm_count()) // tiles, slabs // 8, 1024))  # >= 8 slabs per split
    # and at most MAX_K_CHUNK pixels summed one after another in one accumulator (float32
    # rounding grows ~sqrt(terms); a batch-1024 weight gradient sums up to 802,816 pixels)
    s = min(max(s, -(-p // MAX_K_CHUNK)), slabs, 1024)
    chunk = -(-slabs // s) * _BK
    s = -(-p // chunk)
    out = dw if s == 1 else _empty((s, k, o), x.dtype)
    _launch("conv.cu", f"conv_wgrad_{suf}", (-(-k // bm), -(-o // bn), s), (_THREADS, 1, 1),
            (x, dy, out, *_conv_args(x.shape, w_shape, (ho, wo), stride, pads), _i32(chunk),
             _vec(x, c), _vec(dy, o)))
    if s > 1:
        size = k * o
        _launch("conv.cu", f"splitk_reduce_{_suffix(x.dtype)}", _grid1d(size),
                (_THREADS, 1, 1), (out, _i32(s), np.int64(size), dw))
    return dw


# --------------------------------------------------------------------------------------
# dense
# --------------------------------------------------------------------------------------

def dense_forward(x, w, b, leaky_alpha=None):
    """``y = x @ w + b``.  x (N, in), w (in, out), b (out,) or None -> y (N, out);
    ``leaky_alpha``: LeakyReLU(y) in the GEMM epilogue."""
    dt = _dtype(x, w, b)
    x, w, b = _c(x), _c(w), _c(b)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"dense_forward: x {tuple(x.shape)} and w {tuple(w.shape)} do not "
                         f"multiply")
    check_bias(b, w.shape[1], "dense_forward")
    n, k = x.shape
    m = w.shape[1]
    y = _empty((n, m), dt)
    return _gemm("nn", x, w, n, m, k, k, m, y, bias=b, leaky_alpha=leaky_alpha)


def dense_backward(dy, x, w, need_dx: bool = True, need_dw: bool = True,
                   need_db: bool = True):
    """Gradients of ``y = x @ w + b``: dx = dy @ w^T (gemm_nt), dw = x^T @ dy (gemm_tn),
    db = sum_n dy (colsum). None where not needed, as numpy_ops."""
    dt = _dtype(dy, x, w)
    dy, x, w = _c(dy), _c(x), _c(w)
    n, k = x.shape
    m = w.shape[1]
    if dy.shape != (n, m) or w.shape != (k, m):
        raise ValueError(f"dense_backward: dy {tuple(dy.shape)}, x {tuple(x.shape)}, "
                         f"w {tuple(w.shape)} are inconsistent")
    dx = _gemm("nt", dy, w, n, k, m, m, m, _empty((n, k), dt)) if need_dx else None
    if not need_dw:
        return dx, None, None
    dw = _gemm("tn", x, dy, k, m, n, k, m, _empty((k, m), dt))
    return dx, dw, _colsum(dy) if need_db else None


# --------------------------------------------------------------------------------------
# conv2d and its adjoint, the transposed conv2d: three kernels, used in both directions
# --------------------------------------------------------------------------------------

def conv2d_forward(x, w, b, stride=1, padding="valid", leaky_alpha=None):
    """2-D convolution (cross-correlation).  x (N, H, W, c_in), w (kh, kw, c_in, c_out),
    b (c_out,) or None -> y (N, Ho, Wo, c_out). Kernel: conv_fwd (implicit GEMM), with
    LeakyReLU(leaky_alpha) in its epilogue when given."""
    _dtype(x, w, b)
    check_conv(x, w, 2, "conv2d_forward")
    check_bias(b, w.shape[3], "conv2d_forward")
    stride = pair(stride, "strides")
    ho, wo, pads = conv_geometry(x.shape[1], x.shape[2], w.shape[0], w.shape[1], stride,
                                 padding)
    return _conv_fwd(_c(x), _c(w), _c(b), stride, pads, (ho, wo), leaky_alpha)


def conv2d_backward(dy, x, w, stride=1, padding="valid", need_dx: bool = True,
                    need_dw: bool = True, need_db: bool = True):
    """Gradients of :func:`conv2d_forward`: dx by conv_dgrad (stride phases), dw by
    conv_wgrad (split-K), db by colsum."""
    _dtype(dy, x, w)
    check_conv(x, w, 2, "conv2d_backward")
    stride = pair(stride, "strides")
    kh, kw, _, co = w.shape
    ho, wo, pads = conv_geometry(x.shape[1], x.shape[2], kh, kw, stride, padding)
    if tuple(dy.shape) != (x.shape[0], ho, wo, co):
        raise ValueError(f"conv2d_backward: dy has shape {tuple(dy.shape)}, expected "
                         f"{(x.shape[0], ho, wo, co)}")
    dy, x, w = _c(dy), _c(x), _c(w)
    dw = db = None
    if need_dw:
        dw = _conv_wgrad(x, dy, w.shape, stride, pads)
        db = _colsum(dy.reshape(-1, co)) if need_db else None
    dx = _conv_dgrad(dy, w, None, x.shape, stride, pads) if need_dx else None
    return dx, dw, db


def conv2d_transpose_forward(x, w, b, stride=1, padding="valid", output_padding=None,
                             leaky_alpha=None):
    """Transposed 2-D convolution = the conv's backward-data (conv_dgrad) with dy := x.
    x (N, H, W, c_in), w (kh, kw, c_out, c_in), b (c_out,) or None -> y (N, Ho, Wo, c_out);
    ``leaky_alpha``: LeakyReLU in the epilogue."""
    _dtype(x, w, b)
    check_conv(x, w, 3, "conv2d_transpose_forward")
    check_bias(b, w.shape[2], "conv2d_transpose_forward")
    stride = pair(stride, "strides")
    kh, kw, co, _ = w.shape
    n, h, wd, _ = x.shape
    ho, wo, pads = conv_transpose_geometry(h, wd, kh, kw, stride, padding, output_padding)
    return _conv_dgrad(_c(x), _c(w), _c(b), (n, ho, wo, co), stride, pads, leaky_alpha)


def conv2d_transpose_backward(dy, x, w, stride=1, padding="valid", output_padding=None,
                              need_dx: bool = True, need_dw: bool = True,
                              need_db: bool = True):
    """Gradients of :func:`conv2d_transpose_forward`: dx = the conv FORWARD of dy (conv_fwd),
    dw = conv_wgrad with the roles read off the adjoint (input dy, output gradient x),
    db = colsum(dy)."""
    _dtype(dy, x, w)
    check_conv(x, w, 3, "conv2d_transpose_backward")
    stride = pair(stride, "strides")
    kh, kw, co, _ = w.shape
    n, h, wd, _ = x.shape
    ho, wo, pads = conv_transpose_geometry(h, wd, kh, kw, stride, padding, output_padding)
    if tuple(dy.shape) != (n, ho, wo, co):
        raise ValueError(f"conv2d_transpose_backward: dy has shape {tuple(dy.shape)}, "
                         f"expected {(n, ho, wo, co)}")
    dy, x, w = _c(dy), _c(x), _c(w)
    dx = _conv_fwd(dy, w, None, stride, pads, (h, wd)) if need_dx else None
    if not need_dw:
        return dx, None, None
    dw = _conv_wgrad(dy, x, w.shape, stride, pads)
    return dx, dw, _colsum(dy.reshape(-1, co)) if need_db else None


# --------------------------------------------------------------------------------------
# bias and activations (elementwise.cu)
# --------------------------------------------------------------------------------------

def _ew(kernel: str, inputs, out_like, *scalars):
    """Launch an elementwise kernel ``kernel(inputs..., out, n, scalars...)``."""
    out = _empty(out_like.shape, out_like.dtype)
    n = out.size
    if n:
        _launch("elementwise.cu", f"{kernel}_{_suffix(out.dtype)}", _grid1d(n),
                (_THREADS, 1, 1), (*inputs, out, np.int64(n), *scalars))
    return out


def _same_shape(what: str, a, b) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")


def bias_add_forward(x, b):
    """``y = x + b`` broadcast over the last (channel) axis.  x (..., C), b (C,)."""
    _dtype(x, b)
    x, b = _c(x), _c(b)
    if b.shape != (x.shape[-1],):
        raise ValueError(f"bias_add_forward: bias {tuple(b.shape)} does not match the "
                         f"{x.shape[-1]} channels of x")
    y = _empty(x.shape, x.dtype)
    if y.size:
        _launch("elementwise.cu", f"bias_add_{_suffix(x.dtype)}", _grid1d(y.size),
                (_THREADS, 1, 1), (x, b, y, np.int64(y.size), _i32(x.shape[-1])))
    return y


def bias_add_backward(dy):
    """dL/db = sum of dy over every axis but the last.  dy (..., C) -> (C,)."""
    _dtype(dy)
    dy = _c(dy)
    return _colsum(dy.reshape(-1, dy.shape[-1]))


def leaky_relu_forward(x, alpha: float = 0.3):
    """``y = x if x > 0 else alpha * x`` (any shape)."""
    _dtype(x)
    x = _c(x)
    return _ew("leaky_relu_fwd", (x,), x, x.dtype.type(alpha))


def leaky_relu_backward(dy, x, alpha: float = 0.3):
    """dL/dx = dy * (1 if x > 0 else alpha)."""
    _dtype(dy, x)
    _same_shape("leaky_relu_backward", dy, x)
    dy, x = _c(dy), _c(x)
    return _ew("leaky_relu_bwd", (dy, x), dy, dy.dtype.type(alpha))


def relu_forward(x):
    """``y = max(x, 0)``."""
    _dtype(x)
    x = _c(x)
    return _ew("relu_fwd", (x,), x)


def relu_backward(dy, x):
    """dL/dx = dy where x > 0, else 0."""
    _dtype(dy, x)
    _same_shape("relu_backward", dy, x)
    dy, x = _c(dy), _c(x)
    return _ew("relu_bwd", (dy, x), dy)


def tanh_forward(x):
    """``y = tanh(x)``."""
    _dtype(x)
    x = _c(x)
    return _ew("tanh_fwd", (x,), x)


def tanh_backward(dy, y):
    """dL/dx = dy * (1 - y^2), from the OUTPUT y."""
    _dtype(dy, y)
    _same_shape("tanh_backward", dy, y)
    dy, y = _c(dy), _c(y)
    return _ew("tanh_bwd", (dy, y), dy)


def sigmoid_forward(x):
    """``y = 1 / (1 + exp(-x))`` without overflow."""
    _dtype(x)
    x = _c(x)
    return _ew("sigmoid_fwd", (x,), x)


def sigmoid_backward(dy, y):
    """dL/dx = dy * y * (1 - y), from the OUTPUT y."""
    _dtype(dy, y)
    _same_shape("sigmoid_backward", dy, y)
    dy, y = _c(dy), _c(y)
    return _ew("sigmoid_bwd", (dy, y), dy)


# --------------------------------------------------------------------------------------
# batch normalization (batchnorm.cu)
# --------------------------------------------------------------------------------------

def _check_stat(a, c: int, what: str, inplace: bool = False) -> None:
    if a.shape != (c,):
        raise ValueError(f"batchnorm: {what} has shape {tuple(a.shape)}, expected ({c},)")
    if inplace and not a.flags.c_contiguous:
        raise ValueError(f"batchnorm: {what} must be contiguous (it is updated in place)")


def batchnorm_forward(x, gamma, beta, moving_mean, moving_variance, momentum: float = 0.99,
                      epsilon: float = 1e-3, training: bool = True, leaky_alpha=None):
    """Batch normalization over every axis but the last; see numpy_ops.batchnorm_forward.
    Returns (y, mean, inv_std); in training the moving statistics are updated IN PLACE.
    ``leaky_alpha``: bn_apply writes LeakyReLU(y) instead of y."""
    dt = _dtype(x, gamma, beta, moving_mean, moving_variance)
    c = x.shape[-1] if x.ndim else 0
    if c == 0:
        raise ValueError(f"batchnorm_forward: x of shape {tuple(x.shape)} has no channel axis "
                         "(or 0 channels)")
    for a, what in ((gamma, "gamma"), (beta, "beta")):
        _check_stat(a, c, what)
    _check_stat(moving_mean, c, "moving_mean", inplace=True)
    _check_stat(moving_variance, c, "moving_variance", inplace=True)
    x, gamma, beta = _c(x), _c(gamma), _c(beta)
    t = dt.type
    m = x.size // c
    suf = _suffix(dt)
    mean, inv_std = _empty((c,), dt), _empty((c,), dt)
    if training:
        if m < 1:
            raise ValueError("batchnorm_forward: empty batch")
        s, per = _splits(m, c)
        part = _empty((s, c), dt)
        grid2 = (-(-c // 32), s, 1)
        _launch("batchnorm.cu", f"bn_sum_partial_{suf}", grid2, (32, 8, 1),
                (x, _i32(m), _i32(c), _i32(per), part))
        _launch("batchnorm.cu", f"bn_mean_final_{suf}", _grid1d(c), (_THREADS, 1, 1),
                (part, _i32(s), _i32(c), t(m), mean))
        _launch("batchnorm.cu", f"bn_sqdev_partial_{suf}", grid2, (32, 8, 1),
                (x, mean, _i32(m), _i32(c), _i32(per), part))
        mo = float(momentum)
        _launch("batchnorm.cu", f"bn_var_final_{suf}", _grid1d(c), (_THREADS, 1, 1),
                (part, _i32(s), _i32(c), t(m), t(float(epsilon)), t(mo), t(1 - mo), mean,
                 moving_mean, moving_variance, inv_std))
    else:
        _launch("batchnorm.cu", f"bn_infer_stats_{suf}", _grid1d(c), (_THREADS, 1, 1),
                (moving_mean, moving_variance, _i32(c), t(float(epsilon)), mean, inv_std))
    y = _empty(x.shape, dt)
    if y.size:
        _launch("batchnorm.cu", f"bn_apply_{suf}", _grid1d(y.size), (_THREADS, 1, 1),
                (x, mean, inv_std, gamma, beta, y, np.int64(y.size), _i32(c),
                 *_act(leaky_alpha, dt)))
    return y, mean, inv_std


def batchnorm_backward(dy, x, gamma, mean, inv_std, training: bool = True, leaky_alpha=None,
                       beta=None):
    """Gradients of :func:`batchnorm_forward` -> (dx, dgamma, dbeta); see numpy_ops. With
    ``leaky_alpha`` (and ``beta``) dy is dL/dz of the fused z = LeakyReLU(y): both passes turn
    it into dL/dy as they read it, y recomputed from x (batchnorm.cu BnGrad)."""
    beta = leaky_fold_beta("batchnorm_backward", leaky_alpha, beta)
    dt = _dtype(dy, x, gamma, mean, inv_std, beta)
    _same_shape("batchnorm_backward", dy, x)
    c = x.shape[-1]
    for a, what in ((gamma, "gamma"), (mean, "mean"), (inv_std, "inv_std"), (beta, "beta")):
        if a is not None:
            _check_stat(a, c, what)
    dy, x, gamma, mean, inv_std, beta = (_c(dy), _c(x), _c(gamma), _c(mean), _c(inv_std),
                                         _c(beta))
    fold = (beta, *_act(leaky_alpha, dt))
    m = x.size // c
    suf = _suffix(dt)
    dgamma, dbeta = _empty((c,), dt), _empty((c,), dt)
    s, per = _splits(max(m, 1), c)
    part = _empty((2, s, c), dt)
    _launch("batchnorm.cu", f"bn_bwd_partial_{suf}", (-(-c // 32), s, 1), (32, 8, 1),
            (dy, x, mean, inv_std, _i32(m), _i32(c), _i32(per), part, gamma, *fold))
    _launch("batchnorm.cu", f"bn_bwd_final_{suf}", _grid1d(c), (_THREADS, 1, 1),
            (part, _i32(s), _i32(c), dgamma, dbeta))
    dx = _empty(x.shape, dt)
    if dx.size:
        _launch("batchnorm.cu", f"bn_bwd_dx_{suf}", _grid1d(dx.size), (_THREADS, 1, 1),
                (dy, x, mean, inv_std, gamma, dgamma, dbeta, dx, np.int64(dx.size), _i32(c),
                 dt.type(m), np.int32(bool(training)), *fold))
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------------------
# dropout (elementwise.cu)
# --------------------------------------------------------------------------------------

def dropout_forward(x, rate: float, rng: np.random.Generator, training: bool = True):
    """Inverted dropout -> (y, mask); see numpy_ops.dropout_forward. The uniforms are the
    numbers ``rng.random(x.shape)`` would return (``DROPOUT_RNG == "numpy"``: NumPy's masks;
    made on the GPU when ``rng`` runs on PCG64, else drawn on the host and uploaded) or come
    from Philox on the device seeded by one draw of ``rng`` (``"philox"``)."""
    if not training or rate == 0.0:
        return x, None
    dt = _dtype(x)
    x = _c(x)
    t = dt.type
    rate_t, scale = t(rate), t(1.0 / (1.0 - rate))
    y, mask = _empty(x.shape, dt), _empty(x.shape, dt)
    n = x.size
    if _STEP_RNG is not None or DROPOUT_RNG == "philox":
        if _STEP_RNG is not None:  # a graph-captured step: counters from device memory
            seed, offset, base = _STEP_RNG.take()
        else:
            seed = np.uint64(int(rng.integers(0, 2**63 - 1, dtype=np.int64)))
            offset, base = np.uint64(0), None
        if n:
            groups = -(-n // (4 if dt == np.float32 else 2))
            _launch("elementwise.cu", f"dropout_philox_{_suffix(dt)}", _grid1d(groups),
                    (_THREADS, 1, 1), (x, y, mask, np.int64(n), seed, offset, base, rate_t,
                                       scale))
        return y, mask
    bg = rng.bit_generator
    if not isinstance(bg, np.random.PCG64):  # exactly numpy_ops' draw, uploaded
        u = _cupy().asarray(rng.random(x.shape, dtype=dt))
        if n:
            _launch("elementwise.cu", f"dropout_host_{_suffix(dt)}", _grid1d(n),
                    (_THREADS, 1, 1), (x, u, y, mask, np.int64(n), rate_t, scale))
        return y, mask
    if n:  # the same numbers, computed on the GPU from the generator's state
        st = claim_uniforms(bg, n, dt)  # rng moved past them first
        s, inc = st["state"]["state"], st["state"]["inc"]
        lo64 = 2**64 - 1
        per = 2 if dt == np.float32 else 1  # numbers per 64-bit output
        slots = -(-n // (per * 32 * 16)) * 32  # runs of 32 x 16 outputs, 32 slots each
        _launch("elementwise.cu", f"dropout_pcg64_{_suffix(dt)}", _grid1d(slots),
                (_THREADS, 1, 1),
                (x, y, mask, np.int64(n), np.uint64(s & lo64), np.uint64(s >> 64),
                 np.uint64(inc & lo64), np.uint64(inc >> 64), np.int32(st["has_uint32"]),
                 np.uint32(st["uinteger"]), rate_t, scale))
    return y, mask


def dropout_backward(dy, mask):
    """dL/dx = dy * mask (the same mask, scale included, as the forward)."""
    if mask is None:
        return dy
    _dtype(dy, mask)
    _same_shape("dropout_backward", dy, mask)
    dy, mask = _c(dy), _c(mask)
    return _ew("mul", (dy, mask), dy)


# --------------------------------------------------------------------------------------
# device-side randomness, copies and gradient bookkeeping for a graph-captured step
# --------------------------------------------------------------------------------------

class StepRng:
    """A Philox-4x32-10 stream for the random numbers of ONE training step, graph-safe.

    Every draw (a noise batch, a dropout mask) takes the next ``offset`` of the step (0, 1,
    2, ...: baked into a captured graph as a kernel argument) and adds ``*base``, a uint64 in
    device memory that the host sets to ``step << 16`` before each step (or replay). Draw
    ``d`` of step ``s`` thus uses Philox counters ``(element group, (s << 16) + d)`` and key
    ``seed``: every step new numbers, a pure function of (seed, step), no host-to-device copy
    inside the step. At most 2^16 draws per step.
    """

    def __init__(self, seed: int, base) -> None:
        self.seed = np.uint64(int(seed) % 2**64)
        self.base = base            # device uint64 array of shape (1,)
        self.offset = 0

    def take(self) -> tuple[np.uint64, np.uint64, object]:
        """(key, offset, base pointer array) for the next draw."""
        if self.offset >= 2**16:
            raise ValueError("StepRng: more than 65536 random draws in one step")
        off = self.offset
        self.offset += 1
        return self.seed, np.uint64(off), self.base


#: The step RNG in effect (set by :func:`step_rng`): dropout then ignores its host
#: Generator and draws from this stream, so the whole step can be captured as a graph.
_STEP_RNG: StepRng | None = None
#: True while a CUDA graph is being captured: nothing may upload host data (see _mt_table).
_CAPTURING = False


class step_rng:  # noqa: N801 (a context manager, used like a function)
    """``with cupy_ops.step_rng(rng):`` route dropout (and :func:`standard_normal`) to ``rng``."""

    def __init__(self, rng: StepRng | None) -> None:
        self.rng, self.prev = rng, None

    def __enter__(self) -> StepRng | None:
        global _STEP_RNG
        self.prev, _STEP_RNG = _STEP_RNG, self.rng
        if self.rng is not None:
            self.rng.offset = 0
        return self.rng

    def __exit__(self, *exc) -> None:
        global _STEP_RNG
        _STEP_RNG = self.prev


def standard_normal(out, rng: StepRng) -> None:
    """Fill ``out`` (any shape, contiguous float) with N(0, 1) draws of ``rng``, in place:
    Box-Muller on Philox (kernels/elementwise.cu normal_philox)."""
    dt = _dtype(out)
    if not out.flags.c_contiguous:
        raise ValueError("standard_normal: out must be contiguous")
    seed, offset, base = rng.take()
    n = out.size
    if n:
        groups = -(-n // (4 if dt == np.float32 else 2))
        _launch("elementwise.cu", f"normal_philox_{_suffix(dt)}", _grid1d(groups),
                (_THREADS, 1, 1), (out, np.int64(n), seed, offset, base))


def copy_into(dst, src) -> None:
    """``dst[...] = src`` (same shape and dtype, both contiguous) with rawgan's copy kernel."""
    _dtype(dst, src)
    _same_shape("copy_into", dst, src)
    if not (dst.flags.c_contiguous and src.flags.c_contiguous):
        raise ValueError("copy_into: both arrays must be contiguous")
    if dst.size:
        _launch("elementwise.cu", f"copy_{_suffix(dst.dtype)}", _grid1d(dst.size),
                (_THREADS, 1, 1), (src, dst, np.int64(dst.size)))


def accumulate(acc, g) -> None:
    """``acc += g`` in place (a layer adding its parameter gradient into ``grads``)."""
    _dtype(acc, g)
    _same_shape("accumulate", acc, g)
    if not acc.flags.c_contiguous:
        raise ValueError("accumulate: the accumulator must be contiguous")
    g = _c(g)
    if acc.size:
        _launch("elementwise.cu", f"accumulate_{_suffix(acc.dtype)}", _grid1d(acc.size),
                (_THREADS, 1, 1), (acc, g, np.int64(acc.size)))


def zero_grads(arrays) -> None:
    """Set every array in ``arrays`` to 0, all in ONE launch (optim.cu zero_mt)."""
    _mt_launch("zero_mt", (list(arrays),))


# --------------------------------------------------------------------------------------
# multi-tensor optimizer steps (optim.cu): one launch per model, not one per parameter
# --------------------------------------------------------------------------------------

def _mt_table(slots):
    """Device tables (ptrs, sizes, chunk_tensor, chunk_start, n_chunks) for slot lists
    [params, grads, state...] of equal-sized tensors; cached by their addresses."""
    params = slots[0]
    for s in slots[1:]:
        if len(s) != len(params) or any(a.shape != p.shape for a, p in zip(s, params,
                                                                          strict=True)):
            raise ValueError("multi-tensor update: every slot list must match the params")
    for s in slots:
        for a in s:
            if not a.flags.c_contiguous:
                raise ValueError("multi-tensor update: tensors must be contiguous")
    key = tuple(_ptr(a) for s in slots for a in s) + tuple(int(p.size) for p in params)
    table = _mt_tables.get(key)
    if table is None:
        if _CAPTURING:
            raise RuntimeError(
                "multi-tensor update: its pointer table is not on the device yet and cannot "
                "be uploaded while a CUDA graph is captured (run the step eagerly first)")
        cp = _cupy()
        ptrs = np.array([_ptr(a) for s in slots for a in s], dtype=np.uint64)
        sizes = np.array([p.size for p in params], dtype=np.int64)
        ct, cs = [], []
        for t, size in enumerate(sizes):
            for start in range(0, int(size), _CHUNK):
                ct.append(t)
                cs.append(start)
        table = (cp.asarray(ptrs), cp.asarray(sizes), cp.asarray(np.array(ct, dtype=np.int32)),
                 cp.asarray(np.array(cs, dtype=np.int64)), len(ct))
        if len(_mt_tables) > 64:
            _mt_tables.clear()
        _mt_tables[key] = table
    return table


def _mt_launch(kernel: str, slots, *scalars) -> None:
    params = list(slots[0])
    if not params:
        return
    dt = _dtype(*(a for s in slots for a in s))
    ptrs, sizes, ct, cs, nchunks = _mt_table([list(s) for s in slots])
    if nchunks == 0:
        return
    t = dt.type

    def arg(s):
        # device pointers (None, a CuPy array) and the int flags pass; every other scalar,
        # a NumPy float32/float64 included, becomes the kernel's T (a NumPy scalar has a
        # .shape too, but would be packed at its own size)
        if s is None or isinstance(s, np.int32) or isinstance(s, _cupy().ndarray):
            return s
        return t(float(s))

    _launch("optim.cu", f"{kernel}_{_suffix(dt)}", (nchunks, 1, 1), (_THREADS, 1, 1),
            (ptrs, _i32(len(params)), sizes, ct, cs, _i32(_CHUNK), *(arg(s) for s in scalars)))


def _clip_arg(clip_value) -> float:
    return 0.0 if clip_value is None else float(clip_value)


def adam_update(params, grads, ms, vs, alpha: float, beta_1: float, beta_2: float,
                epsilon: float, clip_value: float | None = None) -> None:
    """In place, every tensor in ONE launch (rawgan.optim.Adam's rule, Keras form)::

        m += (1 - b1) (g - m);  v += (1 - b2) (g^2 - v);  p -= alpha m / (sqrt(v) + eps)

    ``alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)`` (the caller folds the bias correction in):
    a float, or a one-element device array of the params' dtype that the kernel reads (a
    captured graph's per-step value); then ``p = clip(p, -clip_value, clip_value)`` when
    clip_value is given."""
    if isinstance(alpha, _cupy().ndarray):  # (not a NumPy scalar: that is a float)
        if alpha.size != 1 or alpha.dtype != _dtype(*params):
            raise ValueError(f"adam_update: a device alpha must be one element of the params' "
                             f"dtype, got shape {tuple(alpha.shape)} dtype {alpha.dtype}")
        scalar, ptr = 0.0, alpha
    else:
        scalar, ptr = float(alpha), None
    _mt_launch("adam_mt", (params, grads, ms, vs), scalar, ptr, 1.0 - beta_1, 1.0 - beta_2,
               epsilon, _clip_arg(clip_value))


def sgd_update(params, grads, velocities, lr: float, momentum: float = 0.0,
               nesterov: bool = False, clip_value: float | None = None) -> None:
    """In place: ``v = mu v - lr g; p += v`` (Nesterov ``p += mu v - lr g``); momentum 0:
    ``p -= lr g`` (``velocities`` may then be None). One launch for every tensor."""
    if momentum == 0.0 or velocities is None:
        if momentum != 0.0:
            raise ValueError("sgd_update: momentum != 0 needs the velocity tensors")
        velocities = grads  # slot never read by the kernel when momentum == 0
    _mt_launch("sgd_mt", (params, grads, velocities), lr, momentum,
               np.int32(bool(nesterov)), _clip_arg(clip_value))


def rmsprop_update(params, grads, accumulators, lr: float, rho: float = 0.9,
                   epsilon: float = 1e-7, clip_value: float | None = None) -> None:
    """In place: ``a = rho a + (1 - rho) g^2; p -= lr g / (sqrt(a) + eps)``, one launch."""
    _mt_launch("rmsprop_mt", (params, grads, accumulators), lr, rho, 1.0 - rho, epsilon,
               _clip_arg(clip_value))


def clip_update(params, clip_value: float) -> None:
    """In place: ``p = clip(p, -clip_value, clip_value)`` (WGAN weight clipping)."""
    if not float(clip_value) > 0.0:
        raise ValueError(f"clip_update: clip_value must be > 0, got {clip_value!r}")
    _mt_launch("clip_mt", (params,), float(clip_value))


# --------------------------------------------------------------------------------------
# GAN losses in one launch (losses.cu)
# --------------------------------------------------------------------------------------

LOSS_KINDS = ("bce", "minimax", "wgan", "hinge", "lsgan")


def _loss_kind(kind: str) -> np.int32:
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; valid kinds are {', '.join(LOSS_KINDS)}")
    return np.int32(LOSS_KINDS.index(kind))


def _logits(a, what: str):
    if a.ndim not in (1, 2) or (a.ndim == 2 and a.shape[1] != 1) or a.shape[0] == 0:
        raise ValueError(f"{what} must have shape (N,) or (N, 1) with N >= 1, got "
                         f"{tuple(a.shape)}")
    return _c(a)


def gan_discriminator_loss(kind: str, real_logits, fake_logits):
    """(loss, dL/dreal, dL/dfake) as ``rawgan.losses.discriminator_loss``, in one kernel.

    ``loss`` is a 0-d float64 device array (``float(loss)`` reads it; a NaN or inf logit
    makes it non-finite instead of raising, so nothing waits for the GPU here)."""
    k = _loss_kind(kind)
    dt = _dtype(real_logits, fake_logits)
    r, f = _logits(real_logits, "real_logits"), _logits(fake_logits, "fake_logits")
    if r.shape[1:] != f.shape[1:]:
        raise ValueError(f"real_logits {tuple(r.shape)} and fake_logits {tuple(f.shape)} "
                         f"differ beyond the batch dimension")
    dr, df = _empty(r.shape, dt), _empty(f.shape, dt)
    loss = _empty((1,), np.float64)
    _launch("losses.cu", f"gan_loss_{_suffix(dt)}", (1, 1, 1), (_THREADS, 1, 1),
            (k, np.int32(0), r, _i32(r.size), f, _i32(f.size), dr, df, loss))
    return loss.reshape(()), dr, df


def gan_generator_loss(kind: str, fake_logits):
    """(loss, dL/dfake) as ``rawgan.losses.generator_loss``, in one kernel (loss on device)."""
    k = _loss_kind(kind)
    dt = _dtype(fake_logits)
    f = _logits(fake_logits, "fake_logits")
    df = _empty(f.shape, dt)
    loss = _empty((1,), np.float64)
    _launch("losses.cu", f"gan_loss_{_suffix(dt)}", (1, 1, 1), (_THREADS, 1, 1),
            (k, np.int32(1), None, np.int32(0), f, _i32(f.size), None, df, loss))
    return loss.reshape(()), df


def _reset_caches() -> None:
    """Forget compiled modules and device tables (tests swap the array module)."""
    _modules.clear()
    _functions.clear()
    _device_info.clear()
    _mt_tables.clear()

