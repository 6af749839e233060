"""Numba CUDA backend: every op of rawgan as a CUDA kernel written in Python.

The same op functions with the same signatures and semantics as :mod:`numpy_ops` (the
reference), so a layer runs unchanged on ``backend="numba"``. The kernels read like the
NumPy code they replace; each carries a comment with the formula it computes and how
threads map onto it. Three algorithms carry all of the linear algebra:

1. ONE tiled shared-memory GEMM, ``C = A @ B``, whose A and B tiles are read through small
   "loader" device functions. Dense layers read plain matrices; a convolution reads A as an
   *implicit* im2col of the NHWC input (the loader computes the input pixel from the output
   pixel and the kernel tap: no column matrix is ever materialised); a weight gradient
   reads the transposed im2col, so the GEMM's inner dimension is the N*Ho*Wo pixels it
   reduces over (split over ``blockIdx.z`` when that is long, the partial products then
   summed by the reduction kernel).
2. ONE gather kernel for a convolution's backward-data, which IS the transposed
   convolution's forward: each input pixel sums over exactly the taps that reached it,
   ``a = (h + pt) mod sh, + sh, ...`` (stride-phase aware: no zeros inserted, none
   multiplied).
3. ONE per-channel reduction kernel (bias gradients, batch-norm statistics and gradients,
   the split-K partial sums), a shared-memory tree over each block's rows.

The transposed convolution writes no kernel of its own (DESIGN.md: "write the math once"):
its forward is (2), its backward-data is the conv forward (1), its weight gradient is the
conv weight gradient (1) with the roles of input and output gradient swapped.

Where it runs
-------------
* Real GPU: ``numba.cuda.is_available()``. Arrays live in **CuPy** (``xp = cupy``): the
  layers, losses and optimizers do array arithmetic (``+=``, ``np.clip(out=)``,
  ``xp.concatenate``) that a bare numba device array does not support, and rebuilding
  that would be re-writing CuPy. The ops accept any GPU array that exports
  ``__cuda_array_interface__`` (CuPy, numba device arrays, PyTorch CUDA tensors), or host
  arrays (copied over), and return CuPy arrays. So a GPU run needs ``cupy-cuda12x`` (the
  ``rawgan[cuda]`` extra installs both).
* Simulator: ``NUMBA_ENABLE_CUDASIM=1`` (set before numba is first imported) runs the very
  same kernels on the CPU, each CUDA thread a Python thread. Arrays are NumPy in and out
  (``xp = numpy``). It is slow (~0.3 ms per thread launched), so launch sizes shrink there
  (``TILE = 4``, grid-stride loops over few threads) while the indexing logic under test is
  the one the GPU runs. CI tests every op this way (tests/test_numba_ops.py).

Randomness: :func:`dropout_forward` uses exactly the uniform numbers ``numpy_ops`` draws
(``rng.random(x.shape)``), so a seed gives the same mask on every backend: for PCG64,
numpy's default bit generator, a kernel computes them on the device from the generator's
state and the host only skips the generator past them (nothing drawn on the host, nothing
copied); other bit generators draw on the host and the numbers are copied over.

Debugging aid: ``poison_outputs = True`` fills every fresh output buffer with NaN before
its kernel runs, so an element a kernel forgets to write shows up (the tests set it).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .numpy_ops import (  # noqa: F401  (conv_pads: re-exported, as cupy_ops does)
    Padding,
    conv_geometry,
    conv_pads,
    conv_transpose_geometry,
    leaky_fold_beta,
    pair,
)
from .shapes import (
    check_bias,
    check_channels,
    check_conv,
    check_dense,
    check_grad,
    check_same_shape,
)
from .streams import claim_uniforms

try:  # numba is only imported when backend "numba" is asked for (rawgan.backends.get)
    from numba import cuda
except Exception as exc:  # ImportError, or numba-cuda refusing to load (no CUDA bindings)
    _IMPORT_ERROR: Exception | None = exc

    class _NoCuda:
        """Stand-in for ``numba.cuda`` so this module imports and check_available() can
        say what is missing; the kernels below are then plain, never-called functions."""

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    cuda = _NoCuda()
else:
    _IMPORT_ERROR = None

name = "numba"

#: True when numba.cuda is Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1 at its import).
SIMULATOR = _IMPORT_ERROR is None and cuda.jit.__module__.startswith("numba.cuda.simulator")

if _IMPORT_ERROR is not None or SIMULATOR:
    xp = np
else:
    try:
        import cupy as xp
    except ImportError:  # check_available() explains
        xp = None

#: Side of the GEMM tile and of the reduction block (a power of two). 16x16 = 256 threads
#: on a GPU; 4x4 in the simulator, where every thread is a Python thread.
TILE = 4 if SIMULATOR else 16
#: Threads per block of the 1-D (elementwise, gather) kernels, and the most blocks they
#: launch: grid-stride loops make any grid correct, so the simulator runs few threads.
THREADS_1D = 8 if SIMULATOR else 256
#: the longest run of one GEMM's inner dimension a thread sums before a split-K boundary
MAX_K_CHUNK = 4096
MAX_BLOCKS_1D = 2 if SIMULATOR else 65535

#: Fill fresh outputs with NaN before the kernel that should overwrite them (tests).
poison_outputs = False


# --------------------------------------------------------------------------------------
# availability and array plumbing
# --------------------------------------------------------------------------------------

def check_available() -> None:
    """Raise :class:`BackendUnavailable` with the reason when this backend cannot run."""
    from . import BackendUnavailable

    if _IMPORT_ERROR is not None:
        raise BackendUnavailable(
            f"numba backend: needs the packages numba and numba-cuda (pip install numba-cuda); "
            f"importing numba.cuda failed: {_IMPORT_ERROR}"
        )
    if SIMULATOR:
        return
    if not cuda.is_available():
        raise BackendUnavailable(
            "numba backend: no CUDA GPU found (set NUMBA_ENABLE_CUDASIM=1 to run the kernels "
            "in Numba's CUDA simulator on the CPU)"
        )
    if xp is None:
        raise BackendUnavailable(
            "numba backend: on a GPU its arrays are CuPy arrays: pip install cupy-cuda12x "
            "(or pip install 'rawgan[cuda]', 'rawgan[cuda13]' for CUDA 13)"
        )


def asarray(a, dtype=None):
    """Move ``a`` onto this backend: a CuPy array on a GPU, a NumPy array in the simulator."""
    if xp is np:
        if hasattr(a, "get") and not isinstance(a, np.ndarray):  # a CuPy array
            a = a.get()
        return np.asarray(a, dtype=dtype)
    return xp.asarray(a, dtype=dtype)


def to_numpy(a) -> np.ndarray:
    """Return ``a`` as a NumPy array in host memory."""
    if xp is np or isinstance(a, np.ndarray):
        return np.asarray(a)
    return xp.asnumpy(a)


def synchronize() -> None:
    """Wait until every queued kernel has finished (for timings)."""
    if _IMPORT_ERROR is None:
        cuda.synchronize()


def _dev(a):
    """An op's input as a C-contiguous array on this backend (no copy when it already is);
    a 0-d input stays 0-d (``numpy.ascontiguousarray`` returns it with shape (1,))."""
    b = xp.ascontiguousarray(a if xp is np else xp.asarray(a))
    return b if b.ndim == np.ndim(a) else b.reshape(())


def _empty(shape, dtype):
    """A fresh output buffer; NaN-filled when ``poison_outputs`` (every kernel must write
    every element it owns)."""
    out = xp.empty(shape, dtype=dtype)
    if poison_outputs:
        out.fill(np.nan)
    return out


def _scalar(dtype):
    """The NumPy scalar type of ``dtype`` (np.float32 / np.float64): kernels are compiled
    per dtype with it, so float32 math stays float32 on the GPU (no silent float64)."""
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"numba backend: arrays must be float32 or float64, got {dt}")
    return dt.type


def _grid_1d(n: int) -> tuple[int, int]:
    """(blocks, threads) for a grid-stride loop over n items."""
    return max(1, min(-(-n // THREADS_1D), MAX_BLOCKS_1D)), THREADS_1D


@functools.cache
def _target_blocks() -> int:
    """How many blocks keep the device busy: two per multiprocessor (4 in the simulator)."""
    if SIMULATOR:
        return 4
    return 2 * cuda.get_current_device().MULTIPROCESSOR_COUNT


# --------------------------------------------------------------------------------------
# kernel 1: the tiled GEMM and its loaders
# --------------------------------------------------------------------------------------
#
# geo = (H, W, C, Ho, Wo, kh, kw, sh, sw, pt, pl): a conv from an (N, H, W, C) input to an
# (N, Ho, Wo, O) output, kernel (kh, kw), strides (sh, sw), padding top/left (pt, pl).
# The im2col matrix of that conv has one row per output pixel r = (n, i, j) and one column
# per tap k = (a, b, c):  X[r, k] = x[n, i*sh - pt + a, j*sw - pl + b, c]  (0 off the image).

NO_GEO = (0,) * 11  # dense layers: the plain loaders ignore the geometry


@cuda.jit(device=True)
def load_plain(m, r, k, geo, zero):
    """A[r, k] = m[r, k]."""
    return m[r, k]


@cuda.jit(device=True)
def load_transposed(m, r, k, geo, zero):
    """A[r, k] = m[k, r]."""
    return m[k, r]


@cuda.jit(device=True)
def load_im2col(x, r, k, geo, zero):
    """A[r, k] = X[r, k], the implicit im2col of x (r: output pixel, k: tap)."""
    H, W, C, Ho, Wo, kh, kw, sh, sw, pt, pl = geo
    j = r % Wo
    i = (r // Wo) % Ho
    n = r // (Wo * Ho)
    c = k % C
    b = (k // C) % kw
    a = k // (C * kw)
    h = i * sh - pt + a
    w = j * sw - pl + b
    if 0 <= h < H and 0 <= w < W:
        return x[n, h, w, c]
    return zero  # the zero padding, never stored


@cuda.jit(device=True)
def load_im2col_t(x, r, k, geo, zero):
    """A[r, k] = X[k, r], the transposed im2col (r: tap, k: output pixel): weight grads."""
    return load_im2col(x, k, r, geo, zero)


@functools.cache
def _gemm_kernel(load_a, load_b, scalar):
    """Compile (once per loader pair and dtype) the tiled GEMM reading A, B through loaders."""
    T = TILE
    ZERO = scalar(0)

    @cuda.jit
    def gemm(a, b, bias, out, M, N, K, k_chunk, geo, has_bias):
        # out[z, r, c] = bias[c] (z == 0 only) + sum_{k in chunk z} A[r, k] * B[k, c],
        # chunk z = [z * k_chunk, (z + 1) * k_chunk) of the inner dimension (split-K).
        # Threads: a (T, T) block owns a T x T tile of out; thread (ty, tx) owns
        # out[z, bx*T + ty, by*T + tx] (rows on grid x, whose limit is 2^31 - 1). Per step
        # the block stages a T-wide slab of A and a T-high slab of B in shared memory (each
        # thread loads one element of each), then every thread does T multiply-adds from
        # shared memory: each global element is read once per tile instead of once per
        # output.
        As = cuda.shared.array((T, T), scalar)
        Bs = cuda.shared.array((T, T), scalar)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        row = cuda.blockIdx.x * T + ty
        col = cuda.blockIdx.y * T + tx
        z = cuda.blockIdx.z
        k_begin = z * k_chunk
        k_end = min(K, k_begin + k_chunk)
        acc = ZERO
        for k0 in range(k_begin, k_end, T):
            if row < M and k0 + tx < k_end:
                As[ty, tx] = load_a(a, row, k0 + tx, geo, ZERO)
            else:
                As[ty, tx] = ZERO
            if k0 + ty < k_end and col < N:
                Bs[ty, tx] = load_b(b, k0 + ty, col, geo, ZERO)
            else:
                Bs[ty, tx] = ZERO
            cuda.syncthreads()
            for kk in range(T):
                acc += As[ty, kk] * Bs[kk, tx]
            cuda.syncthreads()
        if row < M and col < N:
            if has_bias and z == 0:
                acc += bias[col]
            out[z, row, col] = acc

    return gemm


def _gemm(load_a, a, load_b, b, M: int, N: int, K: int, geo=NO_GEO, bias=None,
          splits: int | None = None):
    """``C (M, N) = A @ B (+ bias)`` with A, B read through the loaders.

    ``splits`` cuts the inner dimension K into chunks run by different blocks (a long
    reduction over few output tiles: weight gradients); ``None`` picks it from the sizes.
    The partial products (splits, M, N) are then summed by the reduction kernel.
    """
    dtype = a.dtype
    if M == 0 or N == 0 or K == 0:  # an empty product: no kernel; a sum over K = 0 is 0
        out = xp.zeros((M, N), dtype=dtype)
        if bias is not None:
            out += bias
        return out
    tiles = -(-M // TILE) * -(-N // TILE)
    if splits is None:
        splits = 1 if K <= 8 * TILE else min(max(1, _target_blocks() // tiles),
                                              K // (4 * TILE), 64)
        # and at most MAX_K_CHUNK terms summed one after another in a float32 accumulator
        # (~sqrt(K) eps rounding: a batch-1024 weight gradient sums K = 200,704 pixels)
        splits = max(splits, min(64, -(-K // MAX_K_CHUNK)))
    splits = max(1, min(int(splits), -(-K // TILE)))
    k_chunk = -(-K // (splits * TILE)) * TILE  # >= K / splits, a multiple of TILE
    splits = -(-K // k_chunk)  # no empty chunk
    out = _empty((splits, M, N), dtype)
    has_bias = bias is not None
    bias_arr = bias if has_bias else _empty((1,), dtype)
    kernel = _gemm_kernel(load_a, load_b, _scalar(dtype))
    grid = (-(-M // TILE), -(-N // TILE), splits)
    kernel[grid, (TILE, TILE)](a, b, bias_arr, out, M, N, K, k_chunk, tuple(geo), has_bias)
    if splits == 1:
        return out[0]
    return _reduce(term_sum, out.reshape(splits, M * N)).reshape(M, N)


# --------------------------------------------------------------------------------------
# kernel 2: conv backward-data = transposed conv forward, a stride-phase-aware gather
# --------------------------------------------------------------------------------------

@functools.cache
def _gather_kernel(scalar):
    ZERO = scalar(0)

    @cuda.jit
    def conv_backward_data(dy, w, bias, dx, geo, has_bias):
        # The adjoint of y = conv(x, w): input pixel h received output pixel i through tap a
        # iff  i*sh - pt + a = h,  i.e.  a = h + pt - i*sh.  So
        #   dx[n,h,q,c] = bias[c] + sum_{a,b} sum_o dy[n, (h+pt-a)/sh, (q+pl-b)/sw, o] w[a,b,c,o]
        # over the taps with (h + pt - a) % sh == 0 (and likewise b): a runs from
        # (h + pt) % sh in steps of sh, so the (sh*sw - 1) of every sh*sw taps that a
        # zero-stuffed input would multiply by zero are never visited.
        # Threads: one per dx element (grid-stride loop), c fastest (coalesced stores).
        H, W, C, Ho, Wo, kh, kw, sh, sw, pt, pl = geo
        O = dy.shape[3]
        total = dx.shape[0] * H * W * C
        for e in range(cuda.grid(1), total, cuda.gridsize(1)):
            c = e % C
            q = (e // C) % W
            h = (e // (C * W)) % H
            n = e // (C * W * H)
            acc = ZERO
            for a in range((h + pt) % sh, kh, sh):
                i = (h + pt - a) // sh  # exact: a has the phase of h + pt
                if i < 0:
                    break  # larger taps only move further above the output
                if i >= Ho:
                    continue
                for b in range((q + pl) % sw, kw, sw):
                    j = (q + pl - b) // sw
                    if j < 0:
                        break
                    if j >= Wo:
                        continue
                    for o in range(O):
                        acc += dy[n, i, j, o] * w[a, b, c, o]
            if has_bias:
                acc += bias[c]
            dx[n, h, q, c] = acc

    return conv_backward_data


def _conv_backward_data(dy, w, x_shape, geo, bias=None):
    """dx (x_shape) of the conv with geometry ``geo`` and kernel w (kh, kw, C, O)."""
    dx = _empty(tuple(x_shape), dy.dtype)
    has_bias = bias is not None
    kernel = _gather_kernel(_scalar(dy.dtype))
    kernel[_grid_1d(dx.size)](dy, w, bias if has_bias else _empty((1,), dy.dtype), dx,
                              tuple(geo), has_bias)
    return dx


# --------------------------------------------------------------------------------------
# kernel 3: per-channel reductions
# --------------------------------------------------------------------------------------
#
# out[c] = post * sum_m term(m, c) over the rows of an (M, C) matrix, the term being:

@cuda.jit(device=True)
def term_sum(a, b, mu, scale, m, c):
    """a[m, c]: bias gradients, dbeta, batch means, split-K partial sums."""
    return a[m, c]


@cuda.jit(device=True)
def term_sqdev(a, b, mu, scale, m, c):
    """(a[m, c] - mu[c])^2: batch variance (two-pass, as the NumPy reference)."""
    d = a[m, c] - mu[c]
    return d * d


@cuda.jit(device=True)
def term_dot_xhat(a, b, mu, scale, m, c):
    """b[m, c] * (a[m, c] - mu[c]) * scale[c] = dy * xhat: dgamma of batch norm."""
    return b[m, c] * ((a[m, c] - mu[c]) * scale[c])


@functools.cache
def _reduce_kernel(term, scalar):
    T = TILE
    ZERO = scalar(0)

    @cuda.jit
    def channel_reduce(a, b, mu, scale, out, rows_per_split, post):
        # out[s, c] = post * sum_{m in split s} term(a, b, mu, scale, m, c),
        # split s = rows [s * rows_per_split, (s + 1) * rows_per_split).
        # Threads: a (T, T) block per (T columns, split s): thread (ty, tx) owns column
        # c = bx*T + tx (adjacent threads read adjacent channels: coalesced) and sums rows
        # ty, ty + T, ...; the T partial sums of a column are then added in shared memory
        # by a tree (T/2, T/4, ..., 1 threads), synchronising between levels.
        part = cuda.shared.array((T, T), scalar)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        c = cuda.blockIdx.x * T + tx
        s = cuda.blockIdx.y
        M = a.shape[0]
        C = a.shape[1]
        m_begin = s * rows_per_split
        m_end = min(M, m_begin + rows_per_split)
        acc = ZERO
        if c < C:
            for m in range(m_begin + ty, m_end, T):
                acc += term(a, b, mu, scale, m, c)
        part[ty, tx] = acc
        cuda.syncthreads()
        step = T // 2
        while step > 0:
            if ty < step:
                part[ty, tx] += part[ty + step, tx]
            cuda.syncthreads()
            step //= 2
        if ty == 0 and c < C:
            out[s, c] = part[0, tx] * post

    return channel_reduce


def _reduce(term, a, b=None, mu=None, scale=None, post: float = 1.0, splits: int | None = None):
    """``out (C,) = post * sum_m term(m, c)`` over a (M, C) matrix ``a``.

    Long columns are split over ``blockIdx.y`` into partial sums (splits, C), which a second
    launch (term_sum) adds up: the GPU stays busy however few channels there are.
    """
    M, C = a.shape
    dtype = a.dtype
    scalar = _scalar(dtype)
    if M == 0 or C == 0:  # a sum over no rows is 0
        return xp.zeros((C,), dtype=dtype)
    dummy = _empty((1,), dtype)
    col_blocks = -(-C // TILE)
    if splits is None:
        splits = 1 if M <= 32 * TILE else min(max(1, _target_blocks() // col_blocks),
                                               M // (8 * TILE), 256)
    splits = max(1, min(int(splits), M))
    rows = -(-M // splits)
    splits = -(-M // rows)
    out = _empty((splits, C), dtype)
    kernel = _reduce_kernel(term, scalar)
    kernel[(col_blocks, splits), (TILE, TILE)](
        a, a if b is None else b, dummy if mu is None else mu,
        dummy if scale is None else scale, out, rows, scalar(1 if splits > 1 else post))
    if splits == 1:
        return out[0]
    return _reduce(term_sum, out, post=post, splits=1)


# --------------------------------------------------------------------------------------
# elementwise kernels (one thread per element, grid-stride loop)
# --------------------------------------------------------------------------------------

@functools.cache
def _elementwise_kernels(scalar):
    """Compile the elementwise kernels for one dtype (ONE, ZERO are constants of it)."""
    ZERO = scalar(0)
    ONE = scalar(1)

    @cuda.jit
    def bias_add(x, b, y):
        # y[e] = x[e] + b[e % C]   (x flat, channels last)
        C = b.shape[0]
        for e in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            y[e] = x[e] + b[e % C]

    @cuda.jit
    def leaky_relu_fwd(x, alpha, y):
        # y = x if x > 0 else alpha * x
        for e in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            v = x[e]
            y[e] = v if v > ZERO else alpha * v

    @cuda.jit
    def leaky_relu_bwd(dy, x, alpha, dx):
        # dL/dx = dy if x > 0 else alpha * dy   (the slope at 0 taken as alpha)
        for e in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            dx[e] = dy[e] if x[e] > ZERO else alpha * dy[e]

    @cuda.jit
    def relu_fwd(x, y):
        # y = max(x, 0)
        for e in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            v = x[e]
            y[e] = v if v > ZERO else ZERO

    @cuda.jit
    def relu_bwd(dy, x, dx):
        # dL/dx = dy where x > 0, else 0
        for e in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            dx[e] = dy[e] if x[e] > ZERO else ZERO

    @cuda.jit
    def tanh_fwd(x, y):
        # y = tanh(x)
        for e in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            y[e] = math.tanh(x[e])

    @cuda.jit
    def tanh_bwd(dy, y, dx):
        # dL/dx = dy * (1 - y^2), from the OUTPUT y = tanh(x)
        for e in range(cuda.grid(1), y.shape[0], cuda.gridsize(1)):
            v = y[e]
            dx[e] = dy[e] * (ONE - v * v)

    @cuda.jit
    def sigmoid_fwd(x, y):
        # y = 1 / (1 + exp(-x)), as 1/(1+e) for x >= 0 and e/(1+e) for x < 0 with
        # e = exp(-|x|) <= 1: exp never overflows.
        for e in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            v = x[e]
            t = math.exp(-abs(v))
            y[e] = ONE / (ONE + t) if v >= ZERO else t / (ONE + t)

    @cuda.jit
    def sigmoid_bwd(dy, y, dx):
        # dL/dx = dy * y * (1 - y), from the OUTPUT y = sigmoid(x)
        for e in range(cuda.grid(1), y.shape[0], cuda.gridsize(1)):
            v = y[e]
            dx[e] = dy[e] * v * (ONE - v)

    @cuda.jit
    def dropout_fwd(x, u, rate, scale, y, mask):
        # mask = scale if u >= rate else 0  (u uniform in [0, 1), drawn on the host);
        # y = x * mask
        for e in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            m = scale if u[e] >= rate else ZERO
            mask[e] = m
            y[e] = x[e] * m

    @cuda.jit
    def multiply(a, b, out):
        # out = a * b   (dropout backward: dL/dx = dy * mask)
        for e in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
            out[e] = a[e] * b[e]

    @cuda.jit
    def bn_normalize(x, mean, inv_std, gamma, beta, y):
        # y = (x - mean[c]) * (gamma[c] * inv_std[c]) + beta[c],  c = e % C
        C = mean.shape[0]
        for e in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            c = e % C
            y[e] = (x[e] - mean[c]) * (gamma[c] * inv_std[c]) + beta[c]

    @cuda.jit
    def bn_backward_dx(dy, x, mean, inv_std, gamma, dgamma, dbeta, m, training, dx):
        # training:  dx = gamma*inv_std * (dy - xhat * dgamma/m - dbeta/m),
        #            xhat = (x - mean) * inv_std   (mean and var depend on x);
        # inference: dx = gamma*inv_std * dy      (the statistics are constants)
        C = mean.shape[0]
        for e in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            c = e % C
            g = gamma[c] * inv_std[c]
            if training:
                xhat = (x[e] - mean[c]) * inv_std[c]
                dx[e] = (dy[e] - (xhat * (dgamma[c] / m) + dbeta[c] / m)) * g
            else:
                dx[e] = dy[e] * g

    @cuda.jit
    def bn_statistics(var, inv_std, mean, moving_mean, moving_var, momentum, epsilon, update):
        # per channel c:  inv_std = 1 / sqrt(var + eps);  in training (update) also
        # moving = momentum * moving + (1 - momentum) * batch, IN PLACE.
        for c in range(cuda.grid(1), var.shape[0], cuda.gridsize(1)):
            inv_std[c] = ONE / math.sqrt(var[c] + epsilon)
            if update:
                moving_mean[c] = momentum * moving_mean[c] + (ONE - momentum) * mean[c]
                moving_var[c] = momentum * moving_var[c] + (ONE - momentum) * var[c]

    return {k: v for k, v in locals().items() if k not in ("ZERO", "ONE", "scalar")}


def _same_dtype(what: str, *arrays) -> None:
    """One float dtype for every array of an op (the kernels are compiled per dtype; mixing
    would stage one operand in the other's precision): a TypeError otherwise, as cupy_ops."""
    dts = {np.dtype(a.dtype) for a in arrays if a is not None}
    if len(dts) > 1:
        raise TypeError(f"{what}: mixed dtypes {', '.join(sorted(map(str, dts)))}: convert "
                        "one side first")


# --------------------------------------------------------------------------------------
# dropout's random numbers: numpy's PCG64, on the device
# --------------------------------------------------------------------------------------
#
# numpy.random.PCG64 (PCG XSL-RR 128/64, O'Neill 2014; numpy's default bit generator): a
# 128-bit state s <- s * A + inc (mod 2^128); each step outputs v = rotr64(hi ^ lo, hi >> 58)
# of the new s. Generator.random turns v into u = (v >> 11) * 2^-53 (float64), or takes 32
# bits at a time, the low half of v then its high half, u = (b >> 8) * 2^-24 (float32); a
# spare high half waits in the generator (state["has_uint32"], ["uinteger"]) and comes
# first. m steps compose to one affine map, s_m = A^m s + (A^(m-1) + ... + A + 1) inc,
# built from the binary digits of m in O(log m) (numpy's pcg_advance_lcg_128). The outputs
# are cut into runs of W * R; slot (run, lane) takes outputs run * W * R + lane + W j, j < R:
# on a GPU the 32 threads of a warp hold 32 neighbouring slots and write neighbouring
# elements (coalesced); a slot jumps to its first output, then steps W at a time.
# 128-bit numbers are tuples of four 32-bit limbs held in uint64 (limb 0 lowest): a product
# of two limbs fits in 64 bits, so no operation ever overflows (the simulator runs this on
# NumPy scalars, which warn when one does).

PCG64_W, PCG64_R = 32, 16
_LOW64 = 2**64 - 1
_M32, _S32 = np.uint64(0xFFFFFFFF), np.uint64(32)
_U0, _U1 = np.uint64(0), np.uint64(1)
_PCG64_A = tuple(np.uint64(((2549297995355413924 << 64) + 4865540595714422341) >> (32 * k)
                           & 0xFFFFFFFF) for k in range(4))
_ONE128 = (_U1, _U0, _U0, _U0)


@cuda.jit(device=True)
def _limbs(lo, hi):
    """The 128-bit number hi * 2^64 + lo as four 32-bit limbs."""
    return (lo & _M32, lo >> _S32, hi & _M32, hi >> _S32)


@cuda.jit(device=True)
def _add128(a, b):
    """a + b mod 2^128, limb by limb with the carry."""
    s0 = a[0] + b[0]
    s1 = a[1] + b[1] + (s0 >> _S32)
    s2 = a[2] + b[2] + (s1 >> _S32)
    s3 = a[3] + b[3] + (s2 >> _S32)
    return (s0 & _M32, s1 & _M32, s2 & _M32, s3 & _M32)


@cuda.jit(device=True)
def _mul128(a, b):
    """a * b mod 2^128, schoolbook: limb k of the result sums the low halves of the products
    a[i] b[k-i], the high halves of limb k-1's products and limb k-1's carry (each term
    < 2^32, a sum of at most 9 of them far below 2^64)."""
    p00 = a[0] * b[0]
    p01, p10 = a[0] * b[1], a[1] * b[0]
    p02, p11, p20 = a[0] * b[2], a[1] * b[1], a[2] * b[0]
    p03, p12, p21, p30 = a[0] * b[3], a[1] * b[2], a[2] * b[1], a[3] * b[0]
    s1 = (p00 >> _S32) + (p01 & _M32) + (p10 & _M32)
    s2 = ((s1 >> _S32) + (p01 >> _S32) + (p10 >> _S32)
          + (p02 & _M32) + (p11 & _M32) + (p20 & _M32))
    s3 = ((s2 >> _S32) + (p02 >> _S32) + (p11 >> _S32) + (p20 >> _S32)
          + (p03 & _M32) + (p12 & _M32) + (p21 & _M32) + (p30 & _M32))
    return (p00 & _M32, s1 & _M32, s2 & _M32, s3 & _M32)


@cuda.jit(device=True)
def _pcg64_jump(inc, m):
    """The map of m steps, s -> mult * s + plus: returns (mult, plus) = (A^m,
    (A^(m-1) + ... + 1) inc), composing the maps of 2^b steps for the set bits b of m."""
    mult, plus = _ONE128, (_U0, _U0, _U0, _U0)
    cur_mult, cur_plus = _PCG64_A, inc
    while m > _U0:
        if m & _U1:
            mult = _mul128(mult, cur_mult)
            plus = _add128(_mul128(plus, cur_mult), cur_plus)
        cur_plus = _mul128(_add128(cur_mult, _ONE128), cur_plus)
        cur_mult = _mul128(cur_mult, cur_mult)
        m >>= _U1
    return mult, plus


@cuda.jit(device=True)
def _pcg64_output(s):
    """XSL-RR: the 64-bit output of state s, rotr64(hi ^ lo, hi >> 58)."""
    hi = (s[3] << _S32) | s[2]
    lo = (s[1] << _S32) | s[0]
    v = hi ^ lo
    r = hi >> np.uint64(58)
    return (v >> r) | (v << ((np.uint64(64) - r) & np.uint64(63)))


@functools.cache
def _pcg64_dropout_kernel(scalar):
    """Dropout with numpy's PCG64 numbers, for one dtype (see the section comment)."""
    ZERO = scalar(0)
    PER = 2 if scalar is np.float32 else 1   # numbers per output
    SHIFT = np.uint64(8 if PER == 2 else 11)  # u = (bits >> SHIFT) * UNIT
    UNIT = scalar(2.0**-24 if PER == 2 else 2.0**-53)
    BITS = _M32 if PER == 2 else np.uint64(_LOW64)  # the 32 or 64 bits of a number
    W, R = PCG64_W, PCG64_R

    @cuda.jit
    def dropout_pcg64(x, s_lo, s_hi, inc_lo, inc_hi, has, held, rate, scale, y, mask):
        # element e of x takes u_e = the e-th number of rng.random(x.size):
        # float32: u_0 = the buffered half when has, then output k gives elements
        # first + 2k (low half) and first + 2k + 1 (high half); float64: output k, element k.
        # mask = scale if u >= rate else 0;  y = x * mask.  Grid-stride over the slots.
        n = x.shape[0]
        first = 1 if PER == 2 and has != 0 else 0
        outputs = (n - first + PER - 1) // PER
        slots = (outputs + W * R - 1) // (W * R) * W
        start, inc = _limbs(s_lo, s_hi), _limbs(inc_lo, inc_hi)
        w_mult, w_plus = _pcg64_jump(inc, np.uint64(W))  # the map of W steps
        if first and cuda.grid(1) == 0:
            u = scalar(held >> SHIFT) * UNIT
            m = scale if u >= rate else ZERO
            mask[0] = m
            y[0] = x[0] * m
        for slot in range(cuda.grid(1), slots, cuda.gridsize(1)):
            k = slot // W * (W * R) + slot % W  # this slot's first output
            mult, plus = _pcg64_jump(inc, np.uint64(k + 1))  # output k: the state k+1 on
            s = _add128(_mul128(mult, start), plus)
            for _ in range(R):
                if k >= outputs:
                    break
                v = _pcg64_output(s)
                for q in range(PER):
                    e = first + k * PER + q
                    if e < n:
                        u = scalar(((v >> (_S32 * np.uint64(q))) & BITS) >> SHIFT) * UNIT
                        m = scale if u >= rate else ZERO
                        mask[e] = m
                        y[e] = x[e] * m
                s = _add128(_mul128(w_mult, s), w_plus)
                k += W

    return dropout_pcg64


def _elementwise(kernel_name: str, *arrays, args=(), out_count: int = 1, shape=None):
    """Run elementwise kernel ``kernel_name`` over flat views of ``arrays`` (plus scalar
    ``args``, placed after the arrays); returns its ``out_count`` fresh outputs. Callers
    check the shapes (the kernels index every array by the first's flat length)."""
    _same_dtype(kernel_name, *arrays)
    first = arrays[0]
    shape = first.shape if shape is None else shape
    flats = [_dev(a).reshape(-1) for a in arrays]
    outs = [_empty(first.size, first.dtype) for _ in range(out_count)]
    kernel = _elementwise_kernels(_scalar(first.dtype))[kernel_name]
    kernel[_grid_1d(first.size)](*flats, *args, *outs)
    outs = [o.reshape(shape) for o in outs]
    return outs[0] if out_count == 1 else tuple(outs)


# --------------------------------------------------------------------------------------
# dense
# --------------------------------------------------------------------------------------

def _then_leaky(y, leaky_alpha):
    """The ``leaky_alpha=`` of the forward ops, as numpy_ops._then_leaky: this backend runs
    the LeakyReLU kernel after the op (it does not fuse; kernels/*.cu do)."""
    return y if leaky_alpha is None else leaky_relu_forward(y, leaky_alpha)


def dense_forward(x, w, b, leaky_alpha=None):
    """``y = x @ w + b``.  x (N, in), w (in, out), b (out,) or None -> y (N, out).

    One tiled GEMM, the bias added as it stores. ``leaky_alpha``: LeakyReLU(y) instead.
    """
    x, w = _dev(x), _dev(w)
    check_dense(x, w, b, "dense_forward")
    _same_dtype("dense_forward", x, w, b)
    return _then_leaky(_gemm(load_plain, x, load_plain, w, x.shape[0], w.shape[1], x.shape[1],
                             bias=None if b is None else _dev(b)), leaky_alpha)


def dense_backward(dy, x, w, need_dx: bool = True, need_dw: bool = True,
                   need_db: bool = True):
    """Gradients of ``y = x @ w + b``.  dy (N, out) -> dx (N, in), dw (in, out), db (out,).

    dL/dx = dy @ w^T (B read transposed);   dL/dw = x^T @ dy (A read transposed; the inner
    dimension is the batch, split-K when long);   dL/db = sum_n dy[n] (reduction kernel).
    ``dx`` None when not ``need_dx``; ``dw``, ``db`` None when not ``need_dw``.
    """
    dy, x, w = _dev(dy), _dev(x), _dev(w)
    check_dense(x, w, None, "dense_backward")
    check_grad(dy, (x.shape[0], w.shape[1]), "dense_backward")
    _same_dtype("dense_backward", dy, x, w)
    n, k_in = x.shape
    k_out = w.shape[1]
    dx = _gemm(load_plain, dy, load_transposed, w, n, k_in, k_out) if need_dx else None
    if not need_dw:
        return dx, None, None
    dw = _gemm(load_transposed, x, load_plain, dy, k_in, k_out, n)
    return dx, dw, _reduce(term_sum, dy) if need_db else None


# --------------------------------------------------------------------------------------
# conv2d and its adjoint, the transposed conv2d
# --------------------------------------------------------------------------------------

def _geo(x_shape, y_hw, kernel_hw, stride, pads) -> tuple[int, ...]:
    """The ``geo`` tuple of the conv (N, H, W, C) -> (N, Ho, Wo, .)."""
    return (x_shape[1], x_shape[2], x_shape[3], y_hw[0], y_hw[1], kernel_hw[0], kernel_hw[1],
            stride[0], stride[1], pads[0][0], pads[1][0])


def _conv(x, w, geo, bias=None):
    """Implicit-GEMM conv: y (N, Ho, Wo, O) = X (N*Ho*Wo, kh*kw*C) @ w (kh*kw*C, O) + bias."""
    kh, kw, c, o = w.shape
    n = x.shape[0]
    ho, wo = geo[3], geo[4]
    y = _gemm(load_im2col, x, load_plain, w.reshape(kh * kw * c, o), n * ho * wo, o,
              kh * kw * c, geo, bias)
    return y.reshape(n, ho, wo, o)


def _conv_weight_grad(x, dy, w_shape, geo):
    """dw[a,b,c,o] = sum_{n,i,j} X[(n,i,j), (a,b,c)] dy[n,i,j,o]: GEMM of the transposed
    implicit im2col (rows: taps, inner dimension: the N*Ho*Wo output pixels) with dy."""
    kh, kw, c, o = w_shape
    pixels = dy.shape[0] * dy.shape[1] * dy.shape[2]
    dw = _gemm(load_im2col_t, x, load_plain, dy.reshape(pixels, o), kh * kw * c, o, pixels,
               geo)
    return dw.reshape(w_shape)


def conv2d_forward(x, w, b, stride=1, padding: Padding = "valid", leaky_alpha=None):
    """2-D convolution (cross-correlation), NHWC.

    x (N, H, W, c_in), w (kh, kw, c_in, c_out), b (c_out,) or None -> y (N, Ho, Wo, c_out):
    ``y[n,i,j,o] = b[o] + sum_{a,b,c} x[n, i*sh - pt + a, j*sw - pl + b, c] * w[a,b,c,o]``
    as an implicit GEMM (the im2col matrix is read on the fly, never stored).
    ``leaky_alpha``: LeakyReLU(y) instead.
    """
    x, w = _dev(x), _dev(w)
    check_conv(x, w, 2, "conv2d_forward")
    check_bias(b, w.shape[3], "conv2d_forward")
    _same_dtype("conv2d_forward", x, w, b)
    stride = pair(stride, "strides")
    ho, wo, pads = conv_geometry(x.shape[1], x.shape[2], w.shape[0], w.shape[1], stride, padding)
    return _then_leaky(_conv(x, w, _geo(x.shape, (ho, wo), w.shape, stride, pads),
                             None if b is None else _dev(b)), leaky_alpha)


def conv2d_backward(dy, x, w, stride=1, padding: Padding = "valid", need_dx: bool = True,
                    need_dw: bool = True, need_db: bool = True):
    """Gradients of :func:`conv2d_forward`.  dy (N, Ho, Wo, c_out) -> dx, dw, db.

    dL/dx: the gather kernel (each input pixel sums dy @ w^T over the taps that read it);
    dL/dw = X^T @ dY (tiled GEMM on the transposed implicit im2col);
    dL/db = sum over N, Ho, Wo of dy.  ``need_dx`` / ``need_dw`` False return None.
    """
    dy, x, w = _dev(dy), _dev(x), _dev(w)
    check_conv(x, w, 2, "conv2d_backward")
    stride = pair(stride, "strides")
    kh, kw, ci, co = w.shape
    ho, wo, pads = conv_geometry(x.shape[1], x.shape[2], kh, kw, stride, padding)
    check_grad(dy, (x.shape[0], ho, wo, co), "conv2d_backward")
    _same_dtype("conv2d_backward", dy, x, w)
    geo = _geo(x.shape, (ho, wo), w.shape, stride, pads)
    dw = db = None
    if need_dw:
        dw = _conv_weight_grad(x, dy, w.shape, geo)
        db = _reduce(term_sum, dy.reshape(-1, co)) if need_db else None
    dx = _conv_backward_data(dy, w, x.shape, geo) if need_dx else None
    return dx, dw, db


def conv2d_transpose_forward(x, w, b, stride=1, padding: Padding = "valid",
                             output_padding=None, leaky_alpha=None):
    """Transposed 2-D convolution: the backward-data of :func:`conv2d_forward`.

    x (N, H, W, c_in), w (kh, kw, c_out, c_in) [Keras], b (c_out,) or None
    -> y (N, Ho, Wo, c_out), sizes from :func:`conv_transpose_geometry`.
    ``y = conv2d_backward_data(dy=x)`` of the conv (Ho, Wo, c_out) -> (H, W, c_in) with
    kernel w: the same gather kernel, bias added as it stores. ``leaky_alpha``: LeakyReLU(y).
    """
    x, w = _dev(x), _dev(w)
    check_conv(x, w, 3, "conv2d_transpose_forward")
    check_bias(b, w.shape[2], "conv2d_transpose_forward")
    _same_dtype("conv2d_transpose_forward", x, w, b)
    stride = pair(stride, "strides")
    kh, kw, co, ci = w.shape
    n, h, wd, _ = x.shape
    ho, wo, pads = conv_transpose_geometry(h, wd, kh, kw, stride, padding, output_padding)
    geo = _geo((n, ho, wo, co), (h, wd), (kh, kw), stride, pads)
    return _then_leaky(_conv_backward_data(x, w, (n, ho, wo, co), geo,
                                           None if b is None else _dev(b)), leaky_alpha)


def conv2d_transpose_backward(dy, x, w, stride=1, padding: Padding = "valid",
                              output_padding=None, need_dx: bool = True, need_dw: bool = True,
                              need_db: bool = True):
    """Gradients of :func:`conv2d_transpose_forward`.  dy (N, Ho, Wo, c_out) -> dx, dw, db.

    The forward is ``y = A^T x`` with ``A`` the conv; so dL/dx = A dy: the conv FORWARD of
    dy with the same kernel (implicit GEMM); dL/dw is the conv's weight gradient with input
    ``dy`` and output gradient ``x``; dL/db = sum over N, Ho, Wo of dy.
    """
    dy, x, w = _dev(dy), _dev(x), _dev(w)
    check_conv(x, w, 3, "conv2d_transpose_backward")
    stride = pair(stride, "strides")
    kh, kw, co, ci = w.shape
    n, h, wd, _ = x.shape
    ho, wo, pads = conv_transpose_geometry(h, wd, kh, kw, stride, padding, output_padding)
    check_grad(dy, (n, ho, wo, co), "conv2d_transpose_backward")
    _same_dtype("conv2d_transpose_backward", dy, x, w)
    geo = _geo(dy.shape, (h, wd), (kh, kw), stride, pads)
    dx = _conv(dy, w, geo) if need_dx else None
    if not need_dw:
        return dx, None, None
    dw = _conv_weight_grad(dy, x, w.shape, geo)
    return dx, dw, _reduce(term_sum, dy.reshape(-1, co)) if need_db else None


# --------------------------------------------------------------------------------------
# bias
# --------------------------------------------------------------------------------------

def bias_add_forward(x, b):
    """``y = x + b`` broadcast over the last (channel) axis.  x (..., C), b (C,)."""
    check_bias(b, x.shape[-1] if x.ndim else 0, "bias_add_forward")
    return _elementwise("bias_add", x, _dev(b).reshape(-1), shape=x.shape)


def bias_add_backward(dy):
    """dL/db = sum of dy over every axis but the last.  dy (..., C) -> (C,)."""
    dy = _dev(dy)
    return _reduce(term_sum, dy.reshape(-1, dy.shape[-1]))


# --------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------

def leaky_relu_forward(x, alpha: float = 0.3):
    """``y = x if x > 0 else alpha * x`` (any shape)."""
    return _elementwise("leaky_relu_fwd", x, args=(_scalar(x.dtype)(alpha),))


def leaky_relu_backward(dy, x, alpha: float = 0.3):
    """dL/dx = dy * slope, slope = 1 if x > 0 else alpha (alpha at 0, as the reference)."""
    check_same_shape("leaky_relu_backward", dy, x)
    return _elementwise("leaky_relu_bwd", dy, x, args=(_scalar(dy.dtype)(alpha),))


def relu_forward(x):
    """``y = max(x, 0)``."""
    return _elementwise("relu_fwd", x)


def relu_backward(dy, x):
    """dL/dx = dy where x > 0, else 0."""
    check_same_shape("relu_backward", dy, x)
    return _elementwise("relu_bwd", dy, x)


def tanh_forward(x):
    """``y = tanh(x)``."""
    return _elementwise("tanh_fwd", x)


def tanh_backward(dy, y):
    """dL/dx = dy * (1 - y^2), written in terms of the OUTPUT y = tanh(x)."""
    check_same_shape("tanh_backward", dy, y)
    return _elementwise("tanh_bwd", dy, y)


def sigmoid_forward(x):
    """``y = 1 / (1 + exp(-x))``, computed without overflow for large |x|."""
    return _elementwise("sigmoid_fwd", x)


def sigmoid_backward(dy, y):
    """dL/dx = dy * y * (1 - y), written in terms of the OUTPUT y = sigmoid(x)."""
    check_same_shape("sigmoid_backward", dy, y)
    return _elementwise("sigmoid_bwd", dy, y)


# --------------------------------------------------------------------------------------
# batch normalization
# --------------------------------------------------------------------------------------

def batchnorm_forward(x, gamma, beta, moving_mean, moving_variance, momentum: float = 0.99,
                      epsilon: float = 1e-3, training: bool = True, leaky_alpha=None):
    """Batch normalization over every axis but the last (N, or N, H, W).

    x (..., C), gamma/beta/moving_* (C,) -> (y, mean, inv_std), mean/inv_std (C,).
    Training: ``mean = sum x / m``, ``var = sum (x - mean)^2 / m`` (biased; two reduction
    launches), ``inv_std = 1 / sqrt(var + eps)``, ``y = gamma * (x - mean) * inv_std + beta``,
    and the moving statistics are updated IN PLACE (``moving_mean`` and ``moving_variance``
    must be this backend's arrays):
    ``moving = momentum * moving + (1 - momentum) * batch``.
    Inference: the moving statistics normalise and nothing is updated.
    ``leaky_alpha``: LeakyReLU(y) in place of y.
    """
    x = _dev(x)
    gamma, beta = _dev(gamma), _dev(beta)
    scalar = _scalar(x.dtype)
    c = x.shape[-1] if x.ndim else 0
    if c == 0:
        raise ValueError(f"batchnorm_forward: x of shape {tuple(x.shape)} has no channel axis "
                         "(or 0 channels)")
    check_channels("batchnorm_forward", c, gamma=gamma, beta=beta, moving_mean=moving_mean,
                   moving_variance=moving_variance)
    _same_dtype("batchnorm_forward", x, gamma, beta)
    x2 = x.reshape(-1, c)
    m = x2.shape[0]
    if training and m == 0:
        raise ValueError("batchnorm_forward: empty batch")
    inv_std = _empty((c,), x.dtype)
    kernels = _elementwise_kernels(scalar)
    if training:
        mean = _reduce(term_sum, x2, post=1.0 / m)
        var = _reduce(term_sqdev, x2, mu=mean, post=1.0 / m)
        kernels["bn_statistics"][_grid_1d(c)](var, inv_std, mean, moving_mean, moving_variance,
                                               scalar(momentum), scalar(epsilon), True)
    else:
        mean = moving_mean.astype(x.dtype, copy=True)
        var = _dev(moving_variance.astype(x.dtype, copy=False))
        kernels["bn_statistics"][_grid_1d(c)](var, inv_std, mean, mean, var,
                                               scalar(momentum), scalar(epsilon), False)
    y = _elementwise("bn_normalize", x, mean, inv_std, gamma, beta, shape=x.shape)
    return _then_leaky(y, leaky_alpha), mean, inv_std


def batchnorm_backward(dy, x, gamma, mean, inv_std, training: bool = True, leaky_alpha=None,
                       beta=None):
    """Gradients of :func:`batchnorm_forward`.  dy, x (..., C) -> dx (..., C), dgamma, dbeta (C,).

    With ``xhat = (x - mean) * inv_std`` over the m rows of a channel (reduction kernels):
    dL/dbeta = sum dy;   dL/dgamma = sum dy * xhat;
    training: dL/dx = gamma * inv_std / m * (m * dy - dL/dbeta - xhat * dL/dgamma);
    inference: dL/dx = gamma * inv_std * dy.
    ``leaky_alpha`` and ``beta``: dy is dL/dz of z = LeakyReLU(y); dL/dy = leaky_relu_backward(
    dy, y) first, y recomputed by the forward's bn_normalize kernel (numpy_ops says why).
    """
    beta = leaky_fold_beta("batchnorm_backward", leaky_alpha, beta)
    dy, x = _dev(dy), _dev(x)
    gamma, mean, inv_std = _dev(gamma), _dev(mean), _dev(inv_std)
    check_same_shape("batchnorm_backward", dy, x)
    check_channels("batchnorm_backward", x.shape[-1], gamma=gamma, mean=mean, inv_std=inv_std,
                   beta=beta)
    if beta is not None:
        y = _elementwise("bn_normalize", x, mean, inv_std, gamma, _dev(beta), shape=x.shape)
        dy = leaky_relu_backward(dy, y, leaky_alpha)
    c = x.shape[-1]
    dy2, x2 = dy.reshape(-1, c), x.reshape(-1, c)
    dbeta = _reduce(term_sum, dy2)
    dgamma = _reduce(term_dot_xhat, x2, b=dy2, mu=mean, scale=inv_std)
    m = _scalar(x.dtype)(x2.shape[0])
    dx = _elementwise("bn_backward_dx", dy, x, mean, inv_std, gamma, dgamma, dbeta,
                      args=(m, bool(training)), shape=x.shape)
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------------------
# dropout
# --------------------------------------------------------------------------------------

def dropout_forward(x, rate: float, rng: np.random.Generator, training: bool = True):
    """Inverted dropout.  x (any shape) -> (y, mask), mask of x's shape and dtype.

    Kept with probability ``1 - rate`` and scaled by ``1 / (1 - rate)``:
    ``mask = [u >= rate] / (1 - rate)``, ``y = x * mask``. The uniform numbers ``u`` are
    the ones ``rng.random(x.shape, dtype=x.dtype)`` returns (numpy_ops' call, so the masks
    are identical for the same seed): made on the device by :func:`_pcg64_dropout_kernel`
    when ``rng`` runs on PCG64 (``rng`` is then skipped past them, ending where that call
    leaves it), else drawn on the host and copied. ``(x, None)`` when not training or rate 0.
    """
    if not training or rate == 0.0:
        return x, None
    x = _dev(x)
    scalar = _scalar(x.dtype)
    rate_t, scale = scalar(rate), scalar(1.0 / (1.0 - rate))
    bg = rng.bit_generator
    if not isinstance(bg, np.random.PCG64):
        u = asarray(rng.random(x.shape, dtype=x.dtype))
        return _elementwise("dropout_fwd", x, u, args=(rate_t, scale), out_count=2)
    y, mask = _empty(x.size, x.dtype), _empty(x.size, x.dtype)
    if x.size:
        st = claim_uniforms(bg, x.size, x.dtype)  # rng moved past them first
        s, inc = st["state"]["state"], st["state"]["inc"]
        per = 2 if scalar is np.float32 else 1  # numbers per 64-bit output
        slots = -(-x.size // (per * PCG64_W * PCG64_R)) * PCG64_W
        kernel = _pcg64_dropout_kernel(scalar)
        kernel[_grid_1d(slots)](x.reshape(-1), np.uint64(s & _LOW64), np.uint64(s >> 64),
                               np.uint64(inc & _LOW64), np.uint64(inc >> 64),
                               np.int32(st["has_uint32"]), np.uint64(st["uinteger"]), rate_t,
                               scale, y, mask)
    return y.reshape(x.shape), mask.reshape(x.shape)


def dropout_backward(dy, mask):
    """dL/dx = dy * mask (the same mask, scale included, as the forward)."""
    if mask is None:
        return dy
    check_same_shape("dropout_backward", dy, mask)
    return _elementwise("multiply", dy, mask)


# --------------------------------------------------------------------------------------
# optimizers: one grid-stride kernel per tensor, updating it in place
# --------------------------------------------------------------------------------------

@functools.cache
def _optimizer_kernels(scalar):
    """Compile the update kernels for one dtype; the formulas (and their order of
    operations) are numpy_ops.adam_update / sgd_update / rmsprop_update's; ``scalar`` (the
    dtype) keys the cache, the scalars arrive already converted to it."""

    @cuda.jit(device=True)
    def clipped(v, clip, do_clip):
        # WGAN weight clipping: clip(v, -c, c)
        if do_clip:
            return min(max(v, -clip), clip)
        return v

    @cuda.jit
    def adam(p, g, m, v, alpha, c1, c2, eps, clip, do_clip):
        # m += (1 - b1)(g - m);  v += (1 - b2)(g^2 - v);  p -= alpha m / (sqrt(v) + eps)
        for e in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
            ge = g[e]
            me = m[e] + (ge - m[e]) * c1
            ve = v[e] + (ge * ge - v[e]) * c2
            m[e] = me
            v[e] = ve
            p[e] = clipped(p[e] - me * alpha / (math.sqrt(ve) + eps), clip, do_clip)

    @cuda.jit
    def sgd(p, g, vel, lr, mu, nesterov, has_vel, clip, do_clip):
        # v = mu v - lr g;  p += v  (Nesterov: p += mu v - lr g);  no velocity: p -= lr g
        for e in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
            ge = g[e]
            if has_vel:
                ve = vel[e] * mu - lr * ge
                vel[e] = ve
                step = mu * ve - lr * ge if nesterov else ve
                p[e] = clipped(p[e] + step, clip, do_clip)
            else:
                p[e] = clipped(p[e] - lr * ge, clip, do_clip)

    @cuda.jit
    def rmsprop(p, g, acc, lr, rho, one_minus_rho, eps, clip, do_clip):
        # a = rho a + (1 - rho) g^2;  p -= lr g / (sqrt(a) + eps); 1 - rho from the host in
        # float64 then rounded, as numpy_ops (1 - float32(rho) is another number)
        for e in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
            ge = g[e]
            a = acc[e] * rho + one_minus_rho * ge * ge
            acc[e] = a
            p[e] = clipped(p[e] - lr * ge / (math.sqrt(a) + eps), clip, do_clip)

    return {"adam": adam, "sgd": sgd, "rmsprop": rmsprop}


def _flat_tensors(what: str, params, *slots) -> list[list]:
    """Each tensor list as flat views (the tensors themselves, updated in place)."""
    out = []
    for lst in (params, *slots):
        if lst is None:
            out.append(None)
            continue
        if len(lst) != len(params):
            raise ValueError(f"{what}: the tensor lists differ in length")
        flat = []
        for a, p in zip(lst, params, strict=True):
            if a.shape != p.shape:
                raise ValueError(f"{what}: shapes {tuple(a.shape)} and {tuple(p.shape)} differ")
            if not a.flags.c_contiguous:
                raise ValueError(f"{what}: tensors must be C-contiguous")
            flat.append(a.reshape(-1))
        out.append(flat)
    return out


def _clip_args(scalar, clip_value):
    return scalar(0 if clip_value is None else clip_value), clip_value is not None


def adam_update(params, grads, ms, vs, alpha: float, beta_1: float, beta_2: float,
                epsilon: float, clip_value: float | None = None) -> None:
    """Adam in place on every tensor, as numpy_ops.adam_update (alpha bias-corrected by the
    caller): ``m += (1 - b1)(g - m); v += (1 - b2)(g^2 - v); p -= alpha m / (sqrt(v) + eps)``,
    then clipping when ``clip_value`` is given. One kernel launch per tensor."""
    ps, gs, mm, vv = _flat_tensors("adam_update", params, grads, ms, vs)
    for p, g, m, v in zip(ps, gs, mm, vv, strict=True):
        _same_dtype("adam_update", p, g, m, v)
        t = _scalar(p.dtype)
        _optimizer_kernels(t)["adam"][_grid_1d(p.size)](
            p, g, m, v, t(alpha), t(1.0 - beta_1), t(1.0 - beta_2), t(epsilon),
            *_clip_args(t, clip_value))


def sgd_update(params, grads, velocities, lr: float, momentum: float = 0.0,
               nesterov: bool = False, clip_value: float | None = None) -> None:
    """SGD in place, as numpy_ops.sgd_update: ``v = mu v - lr g; p += v`` (Nesterov:
    ``p += mu v - lr g``); momentum 0: ``p -= lr g`` (``velocities`` may then be None)."""
    if momentum != 0.0 and velocities is None:
        raise ValueError("sgd_update: momentum != 0 needs the velocity tensors")
    has_vel = momentum != 0.0
    ps, gs, vs = _flat_tensors("sgd_update", params, grads, velocities if has_vel else None)
    for i, (p, g) in enumerate(zip(ps, gs, strict=True)):
        t = _scalar(p.dtype)
        vel = vs[i] if has_vel else _empty((1,), p.dtype)  # (not read without momentum)
        _same_dtype("sgd_update", p, g, vel)
        _optimizer_kernels(t)["sgd"][_grid_1d(p.size)](
            p, g, vel, t(lr), t(momentum), bool(nesterov), has_vel, *_clip_args(t, clip_value))


def rmsprop_update(params, grads, accumulators, lr: float, rho: float = 0.9,
                   epsilon: float = 1e-7, clip_value: float | None = None) -> None:
    """RMSprop in place, as numpy_ops.rmsprop_update (epsilon outside the square root):
    ``a = rho a + (1 - rho) g^2; p -= lr g / (sqrt(a) + eps)``."""
    ps, gs, aa = _flat_tensors("rmsprop_update", params, grads, accumulators)
    for p, g, a in zip(ps, gs, aa, strict=True):
        _same_dtype("rmsprop_update", p, g, a)
        t = _scalar(p.dtype)
        _optimizer_kernels(t)["rmsprop"][_grid_1d(p.size)](
            p, g, a, t(lr), t(rho), t(1.0 - rho), t(epsilon), *_clip_args(t, clip_value))


def accumulate(acc, g) -> None:
    """``acc += g`` in place (a layer adding its parameter gradient into ``grads``): array
    arithmetic of the array module (CuPy on a GPU, NumPy in the simulator), no kernel."""
    if acc.shape != g.shape:
        raise ValueError(f"accumulate: shapes {tuple(acc.shape)} and {tuple(g.shape)} differ")
    acc += g


def zero_grads(arrays) -> None:
    """Set every array of ``arrays`` (a model's gradients) to 0, in place."""
    for a in arrays:
        a.fill(0)
