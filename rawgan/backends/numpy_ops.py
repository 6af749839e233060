"""NumPy reference backend: every op of rawgan, forward and backward, on the CPU.

This module is the reference every other backend is tested against, so it is
written to be read. It is also the CPU fallback, so it is written to be fast:
convolutions are im2col through stride tricks plus BLAS GEMMs (one per group of output
pixels that reach the same kernel taps, so padding is never multiplied) or, where it
multiplies less, Winograd's F(4x4, kxk) (:mod:`rawgan.backends.winograd`), the temporaries
(padded inputs, column matrices) live in reused per-thread buffers, and every op shares
its batch rows out to the cores (:mod:`rawgan.backends.cpu_threads`; each op below is
plain NumPy on a range of rows, ``body(rows)`` / ``body(ws, c0, c1, acc)``).

Conventions (see DESIGN.md): activations NHWC; conv kernels HWIO
``(kh, kw, c_in, c_out)``; transposed-conv kernels ``(kh, kw, c_out, c_in)``;
dense kernels ``(in, out)``. Every op is dtype-preserving (float32 or float64).

Notation in the docstrings: ``N`` batch, ``H, W`` spatial size, ``C`` channels,
``M = N * Ho * Wo`` rows of the im2col matrix, ``K = kh * kw * c_in`` its columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import cpu_threads, winograd
from .cpu_threads import Workspace, num_threads, set_num_threads  # noqa: F401  (re-exported)
from .shapes import (
    check_bias,
    check_channels,
    check_conv,
    check_dense,
    check_grad,
    check_same_shape,
)
from .streams import claim_uniforms, skip_uniforms

name = "numpy"
xp = np

Padding = str | int | tuple[int, int]
Pads = tuple[tuple[int, int], tuple[int, int]]


# --------------------------------------------------------------------------------------
# array plumbing
# --------------------------------------------------------------------------------------

def asarray(a, dtype=None) -> np.ndarray:
    """Move ``a`` onto this backend (host memory)."""
    if hasattr(a, "get") and not isinstance(a, np.ndarray):  # a CuPy array
        a = a.get()
    return np.asarray(a, dtype=dtype)


def to_numpy(a) -> np.ndarray:
    """Return ``a`` as a NumPy array (identity for this backend)."""
    return asarray(a)


def synchronize() -> None:
    """Wait for queued work (nothing to wait for on the CPU)."""


# --------------------------------------------------------------------------------------
# geometry: sizes and paddings (shared by every backend)
# --------------------------------------------------------------------------------------

def pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(2, 3) -> (2, 3)``; validates positive integers."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        t = (int(v), int(v))
    elif isinstance(v, (tuple, list)) and len(v) == 2 and all(
        isinstance(u, (int, np.integer)) and not isinstance(u, bool) for u in v
    ):
        t = (int(v[0]), int(v[1]))
    else:
        raise ValueError(f"{what} must be an int or a pair of ints, got {v!r}")
    if min(t) < 1:
        raise ValueError(f"{what} must be positive, got {v!r}")
    return t


def conv_pads(in_size: int, k: int, s: int, padding: Padding, axis: int = 0) -> tuple[int, int]:
    """Padding ``(before, after)`` of one spatial axis of a convolution.

    ``"same"`` follows TensorFlow/Keras: ``out = ceil(in / s)``, total padding
    ``max((out - 1) * s + k - in, 0)``, the odd pixel going AFTER (bottom/right).
    ``"valid"`` pads nothing; an int ``p`` (or a pair, one per axis) pads ``p`` on
    both sides, as PyTorch does.
    """
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return 0, 0
        if mode == "same":
            out = -(-in_size // s)
            total = max((out - 1) * s + k - in_size, 0)
            return total // 2, total - total // 2
        raise ValueError(f"unknown padding {padding!r}: expected 'same', 'valid' or an int")
    if isinstance(padding, (tuple, list)):
        if len(padding) != 2:
            raise ValueError(f"padding pair must have 2 entries, got {padding!r}")
        padding = padding[axis]
    if not isinstance(padding, (int, np.integer)) or isinstance(padding, bool) or padding < 0:
        raise ValueError(f"padding must be 'same', 'valid' or a non-negative int, got {padding!r}")
    return int(padding), int(padding)


def conv_geometry(
    h: int, w: int, kh: int, kw: int, stride, padding: Padding
) -> tuple[int, int, Pads]:
    """Output size and paddings of a convolution: ``(Ho, Wo, ((pt, pb), (pl, pr)))``.

    ``Ho = (H + pt + pb - kh) // sh + 1``. Raises ValueError when the kernel does not
    fit in the padded input.
    """
    sh, sw = pair(stride, "strides")
    ph = conv_pads(h, kh, sh, padding, 0)
    pw = conv_pads(w, kw, sw, padding, 1)
    hp, wp = h + sum(ph), w + sum(pw)
    if hp < kh or wp < kw:
        raise ValueError(
            f"kernel {(kh, kw)} is larger than the padded input {(hp, wp)} "
            f"(input {(h, w)}, padding {padding!r})"
        )
    return (hp - kh) // sh + 1, (wp - kw) // sw + 1, (ph, pw)


def conv_transpose_geometry(
    h: int, w: int, kh: int, kw: int, stride, padding: Padding, output_padding=None
) -> tuple[int, int, Pads]:
    """Output size of a transposed convolution and the paddings of its adjoint conv.

    Keras rule (``deconv_output_length``): with ``output_padding=None`` the output is
    ``in * s`` for "same" and ``in * s + max(k - s, 0)`` for "valid"; otherwise
    ``(in - 1) * s + k - 2 * pad + output_padding`` with ``pad = k // 2`` for "same",
    0 for "valid", ``p`` for an int (PyTorch's formula). The transposed conv is then
    the exact adjoint of the conv that maps the OUTPUT size back to the input size
    with the same padding mode (TensorFlow's ``conv2d_transpose`` semantics).
    """
    sh, sw = pair(stride, "strides")
    if output_padding is not None:
        oph, opw = (output_padding, output_padding) if isinstance(output_padding, int) else (
            tuple(output_padding)
        )
        if not (0 <= oph < sh and 0 <= opw < sw):
            raise ValueError(
                f"output_padding {output_padding!r} must be non-negative and smaller than "
                f"the strides {(sh, sw)}"
            )
    sizes = []
    for axis, (n, k, s) in enumerate(((h, kh, sh), (w, kw, sw))):
        if isinstance(padding, str) and padding.lower() not in ("same", "valid"):
            raise ValueError(f"unknown padding {padding!r}: expected 'same', 'valid' or an int")
        mode = padding.lower() if isinstance(padding, str) else None
        if output_padding is None and mode == "same":
            out = n * s
        elif output_padding is None and mode == "valid":
            out = n * s + max(k - s, 0)
        else:
            op = 0 if output_padding is None else (oph, opw)[axis]
            if mode == "same":
                pad = k // 2
            elif mode == "valid":
                pad = 0
            else:
                pad = conv_pads(n, k, s, padding, axis)[0]
            out = (n - 1) * s + k - 2 * pad + op
        if out < 1:
            raise ValueError(f"transposed conv output size {out} < 1 on axis {axis}")
        sizes.append(out)
    ho, wo = sizes
    back_h, back_w, pads = conv_geometry(ho, wo, kh, kw, (sh, sw), padding)
    if (back_h, back_w) != (h, w):
        raise ValueError(
            f"transposed conv: output {(ho, wo)} does not map back to input {(h, w)} "
            f"with kernel {(kh, kw)}, strides {(sh, sw)}, padding {padding!r}"
        )
    return ho, wo, pads


# --------------------------------------------------------------------------------------
# im2col without the padding: output pixels grouped by the kernel taps they can use
# --------------------------------------------------------------------------------------
#
# Output pixel i of a conv (one axis) reads input rows ``i*s - pad + a``, a = 0..k-1. A
# plain im2col pads the input with zeros and multiplies them: for the DCGAN's 5x5 kernels
# on 7x7 and 14x14 maps that is ~30% of all multiply-adds. Instead the output positions
# are split into RUNS that share the same range of valid taps [a0, a1) (the border rows,
# then one big interior run), and each (row run, column run) GROUP gets its own im2col of
# the UNPADDED input and its own GEMM with the matching slice w[a0:a1, b0:b1] of the
# kernel. Every multiply-add is then a real one; the interior group carries most of them.
#
# The batch is shared out to the cores by ``cpu_threads.parallel_rows``: contiguous ranges
# of images, one range a worker, BLAS single-threaded inside, so the im2col copies and
# scatter-adds run on every core, not only the GEMMs. Within its range a worker takes each
# group in SPANS of a few images, sized so that the span's column matrix (about CHUNK_BYTES)
# stays in the core's cache from the copy that writes it to the GEMM that reads it: a
# whole-batch im2col is tens of MB that go out to memory and back, a span's few MB do not
# (measured here on D's 64 -> 128 conv, 512 images, one thread, as one padded GEMM: 99 ms
# whole-batch, 76 ms in chunks of 16 images). See :class:`_Plan`.

#: Target size of one span's column matrix (bytes), and the fewest GEMM rows a span may
#: have; see above and :class:`_Plan`.
CHUNK_BYTES = 1 << 22
MIN_ROWS = 256


def _tap_runs(out_size: int, in_size: int, k: int, s: int, pad: int) -> list[tuple[int, ...]]:
    """Runs ``(i0, i1, a0, a1)`` of output positions i in [i0, i1) whose valid taps are
    a in [a0, a1): ``0 <= i*s - pad + a < in_size``. A run with a0 >= a1 reads only padding."""
    runs: list[tuple[int, ...]] = []
    for i in range(out_size):
        a0, a1 = max(0, pad - i * s), min(k, in_size + pad - i * s)
        if runs and runs[-1][1] == i and runs[-1][2:] == (a0, a1):
            runs[-1] = (runs[-1][0], i + 1, a0, a1)
        else:
            runs.append((i, i + 1, a0, a1))
    return runs


def _groups(out_hw, in_hw, kernel, stride, pads: Pads):
    """Every (row run) x (column run) group: ``(i0, i1, a0, a1, j0, j1, b0, b1)``."""
    rows = _tap_runs(out_hw[0], in_hw[0], kernel[0], stride[0], pads[0][0])
    cols = _tap_runs(out_hw[1], in_hw[1], kernel[1], stride[1], pads[1][0])
    return [r + c for r in rows for c in cols]


def _group_cols(x: np.ndarray, g, stride, pads: Pads, ws: Workspace) -> np.ndarray:
    """im2col of one group: ``(N * ni * nj, ka * kb * C)``, no padding involved.

    ``cols[(n, i, j), (a, b, c)] = x[n, (i0 + i)*sh - pt + a0 + a, (j0 + j)*sw - pl + b0 + b, c]``
    (a strided view of x copied into the reused buffer ``ws["cols"]``).
    """
    i0, i1, a0, a1, j0, j1, b0, b1 = g
    (sh, sw), (pt, pl) = stride, (pads[0][0], pads[1][0])
    n, _, _, c = x.shape
    base = x[:, i0 * sh - pt + a0:, j0 * sw - pl + b0:, :]
    s0, s1, s2, s3 = x.strides
    shape = (n, i1 - i0, j1 - j0, a1 - a0, b1 - b0, c)
    view = as_strided(base, shape=shape, strides=(s0, s1 * sh, s2 * sw, s1, s2, s3),
                      writeable=False)
    cols = ws.get("cols", shape, x.dtype)
    np.copyto(cols, view)
    return cols.reshape(n * shape[1] * shape[2], -1)


def _block(a: np.ndarray, g, ws: Workspace) -> np.ndarray:
    """The pixels of group g of ``a`` (N, H, W, C) as an (N * ni * nj, C) matrix (a view
    when the group is the whole map, else a copy in ``ws["block"]``)."""
    i0, i1, _, _, j0, j1, _, _ = g
    if (i0, j0) == (0, 0) and a.shape[1:3] == (i1, j1) and a.flags.c_contiguous:
        return a.reshape(-1, a.shape[-1])
    blk = ws.get("block", (a.shape[0], i1 - i0, j1 - j0, a.shape[-1]), a.dtype)
    np.copyto(blk, a[:, i0:i1, j0:j1, :])
    return blk.reshape(-1, a.shape[-1])


# Below this many columns (kh * kw * C) a GEMM is too thin to pay for several groups: the
# input is then zero-padded (chunk by chunk) and the whole conv is one group, classic im2col.
SMALL_K = 256

NO_PADS: Pads = ((0, 0), (0, 0))


def _padded_size(in_hw, pads: Pads, out_hw, kernel, stride) -> tuple[int, int]:
    """Rows and columns of the zero-padded input that the windows reach."""
    return (max(in_hw[0] + pads[0][0], (out_hw[0] - 1) * stride[0] + kernel[0]),
            max(in_hw[1] + pads[1][0], (out_hw[1] - 1) * stride[1] + kernel[1]))


def _padded(x: np.ndarray, pads: Pads, hw_p, ws: Workspace) -> np.ndarray:
    """x zero-padded by ``pads`` into ``ws["pad"]``, cropped to ``hw_p`` = (rows, columns)."""
    (pt, _), (pl, _) = pads
    n, h, w, c = x.shape
    hp, wp = hw_p
    buf = ws.get("pad", (n, hp, wp, c), x.dtype)
    buf.fill(0)
    buf[:, pt:pt + h, pl:pl + w, :] = x[:, :hp - pt, :wp - pl, :]
    return buf


class _Plan:
    """How one conv geometry runs, decided once per op call.

    ``groups``: the tap groups; ``wmat``: the kernel slice (K_g, O) each group multiplies
    (``.T`` for the scatter); ``pad_first``: the input is zero-padded to ``hw_p`` and the conv
    is one group over the padded map (thin GEMM: K < SMALL_K).

    The batch is shared out to the workers (BLAS single-threaded in each), one range of
    images a worker. Within its range a worker takes each group in SPANS of images whose
    column matrix is about CHUNK_BYTES (it stays in cache from the copy to the GEMM), but
    never fewer than MIN_ROWS GEMM rows (a border group of one pixel per image would
    otherwise make GEMMs of a few rows).
    """

    def __init__(self, w_shape, in_hw, out_hw, stride, pads: Pads, w: np.ndarray | None = None,
                 transpose_w: bool = False) -> None:
        kh, kw, ci, co = w_shape
        self.ci = ci
        self.hw_p = _padded_size(in_hw, pads, out_hw, (kh, kw), stride)
        self.pad_first = pads != NO_PADS and kh * kw * ci < SMALL_K
        self.eff_pads = NO_PADS if self.pad_first else pads
        self.groups = _groups(out_hw, self.hw_p if self.pad_first else in_hw, (kh, kw),
                              stride, self.eff_pads)
        self.per_image = out_hw[0] * out_hw[1] * kh * kw * ci  # columns of one image
        self.wmat: dict[tuple[int, int, int, int], np.ndarray] = {}
        for _, _, a0, a1, _, _, b0, b1 in self.groups if w is not None else ():
            if a0 < a1 and b0 < b1 and (a0, a1, b0, b1) not in self.wmat:
                m = np.ascontiguousarray(w[a0:a1, b0:b1]).reshape(-1, co)
                self.wmat[(a0, a1, b0, b1)] = m.T if transpose_w else m

    def live(self):
        """The groups that read at least one input pixel, with their kernel-slice key."""
        for g in self.groups:
            _, _, a0, a1, _, _, b0, b1 = g
            if a0 < a1 and b0 < b1:
                yield g, (a0, a1, b0, b1)

    def spans(self, g, n: int, itemsize: int):
        """Image ranges [s0, s1) covering [0, n) for group g (see the class docstring)."""
        i0, i1, a0, a1, j0, j1, b0, b1 = g
        rows = (i1 - i0) * (j1 - j0)
        cols_bytes = rows * (a1 - a0) * (b1 - b0) * self.ci * itemsize
        step = max(1, CHUNK_BYTES // max(1, cols_bytes), -(-MIN_ROWS // rows))
        return [(s, min(n, s + step)) for s in range(0, n, step)]

    def run(self, n: int, body, make_acc=lambda: None) -> list:
        """``body(ws, c0, c1, acc)`` on each worker's range of images [c0, c1); ``acc`` is one
        ``make_acc()`` per worker; returns the workers' ``acc`` in order."""

        def work(k: int, lo: int, hi: int):
            ws, acc = cpu_threads.workspace(), make_acc()
            body(ws, lo, hi, acc)
            return acc

        return cpu_threads.parallel_rows(work, n, size=n * self.per_image, blas_single=True)


def _direct_macs(w_shape, in_hw, out_hw, stride, pads: Pads) -> int:
    """Multiply-adds per image of the direct path: the taps that land on the input."""
    kh, kw, ci, co = w_shape
    taps = [sum((i1 - i0) * (a1 - a0) for i0, i1, a0, a1 in _tap_runs(o, i, k, s, p[0]))
            for o, i, k, s, p in zip(out_hw, in_hw, (kh, kw), stride, pads, strict=True)]
    return taps[0] * taps[1] * ci * co


def _winograd_ok(w_shape, in_hw, out_hw, stride, pads: Pads) -> bool:
    """Run this correlation (x (.., in_hw, C) * w (kh, kw, C, O) -> out_hw) by Winograd?
    Stride 1, padding >= 0, and :func:`winograd.worth_it` against the direct path's count."""
    if stride != (1, 1) or min(min(pads[0]), min(pads[1])) < 0:
        return False
    return winograd.worth_it(w_shape[:2], out_hw, w_shape[2], w_shape[3],
                             _direct_macs(w_shape, in_hw, out_hw, stride, pads))


def _phase_taps(k: int, s: int, pt: int) -> tuple[int, list[list[tuple[int, int]]]]:
    """The backward-data of a stride-s conv along one axis as ONE stride-1 correlation.

    ``dx[P] = sum_{i, a: i s - pt + a = P} dy[i] w[a]``. Output phase f = P mod s (P = s u + f)
    gets the taps ``a = a0 + s t`` with ``a0 = (f + pt) mod s``, from ``dy[u + d - t]``,
    ``d = (f + pt) // s``. With a common top padding R0 = max over phases of (T - 1 - d)
    (T: the phase's tap count) that is ``sum_r dypad[u + r] w'[r, f]`` where kernel row
    ``r = R0 + d - t`` holds tap a of phase f (zero where a phase has no tap). Returns R0 and,
    per phase f, the pairs (r, a).
    """
    phases = []
    for f in range(s):
        a0, d = (f + pt) % s, (f + pt) // s
        phases.append((d, list(range(a0, k, s))))
    live = [(d, taps) for d, taps in phases if taps]
    r0 = max(len(taps) - 1 - d for d, taps in live)
    return r0, [[(r0 + d - t, a) for t, a in enumerate(taps)] for d, taps in phases]


def _phase_kernel(w: np.ndarray, stride, pads: Pads, x_hw, dy_hw, build: bool = True):
    """Conv backward-data (the transposed conv's forward) as a stride-1 correlation of dy
    whose outputs are the s_h * s_w output phases side by side (see :func:`_phase_taps`):
    ``dx[n, s_h u + f, s_w v + g, c] = out[n, u, v, (f, g, c)]``, ``out = dy (*) w'``,
    ``w'[r, q, o, (f, g, c)] = w[a, b, c, o]`` for the taps (r, a) of phase f and (q, b) of
    phase g. For stride 1 this is dy correlated with the flipped kernel.

    w (kh, kw, C, O) -> (w' (R_h, R_w, O, s_h s_w C), pads of the correlation, its output
    size (ceil(H / s_h), ceil(W / s_w))), or None if the correlation would need a negative
    padding (dy rows that no dx pixel reads). ``build=False``: the shape of w' in place of
    w' (all the cost model needs; building w' copies the kernel).
    """
    kh, kw, ci, co = w.shape
    (r0h, ph), (r0w, pw) = (_phase_taps(k, s, p[0])
                            for k, s, p in zip((kh, kw), stride, pads, strict=True))
    rh = 1 + max(r for taps in ph for r, _ in taps)
    rw = 1 + max(r for taps in pw for r, _ in taps)
    (sh, sw), out_hw = stride, (-(-x_hw[0] // stride[0]), -(-x_hw[1] // stride[1]))
    cpads = ((r0h, out_hw[0] + rh - 1 - dy_hw[0] - r0h),
             (r0w, out_hw[1] + rw - 1 - dy_hw[1] - r0w))
    if min(cpads[0][0], cpads[0][1], cpads[1][0], cpads[1][1]) < 0:  # top (large integer
        return None                     # padding, stride >= 2) or bottom (padding > k - 1)
    if not build:
        return (rh, rw, co, sh * sw * ci), cpads, out_hw
    if stride == (1, 1):  # one phase: w flipped, channels swapped (a view, no copy)
        return w[::-1, ::-1].transpose(0, 1, 3, 2), cpads, out_hw
    wp = np.zeros((rh, rw, co, sh, sw, ci), dtype=w.dtype)
    for f, taps_h in enumerate(ph):
        for g, taps_w in enumerate(pw):
            for r, a in taps_h:
                for q, b in taps_w:
                    wp[r, q, :, f, g, :] = w[a, b].T
    return wp.reshape(rh, rw, co, sh * sw * ci), cpads, out_hw


def _conv_gather(x: np.ndarray, w: np.ndarray, stride, pads: Pads, out_hw,
                 b: np.ndarray | None = None, dy: np.ndarray | None = None):
    """Convolution over the valid taps only, plus an optional bias:
    ``y[n,i,j,o] = b[o] + sum_{a,b,c} x[n, i*sh-pt+a, j*sw-pl+b, c] w[a,b,c,o]``.
    x (N, H, W, C), w (kh, kw, C, O), b (O,) or None -> y (N, Ho, Wo, O).

    With ``dy`` (N, Ho, Wo, D) it also returns ``dw = sum cols^T dy`` of shape (kh, kw, C, D)
    from the same im2col (the transposed conv's backward needs both).
    """
    kh, kw, ci, co = w.shape
    n = x.shape[0]
    if _winograd_ok(w.shape, x.shape[1:3], out_hw, stride, pads):
        if dy is None:
            return winograd.correlate(x, w, pads, out_hw, b)
        dw_shape = (kh, kw, ci, dy.shape[-1])
        if _winograd_ok(dw_shape, x.shape[1:3], out_hw, stride, pads):  # one input transform
            return winograd.correlate(x, w, pads, out_hw, b, dy=dy)
        return winograd.correlate(x, w, pads, out_hw, b), \
            _conv_weight_grad(x, dy, dw_shape, stride, pads)
    plan = _Plan(w.shape, x.shape[1:3], out_hw, stride, pads, w)
    y = np.empty((n, *out_hw, co), dtype=x.dtype)

    def body(ws: Workspace, c0: int, c1: int, dw) -> None:
        xc = _padded(x[c0:c1], pads, plan.hw_p, ws) if plan.pad_first else x[c0:c1]
        yc = y[c0:c1]
        for g in plan.groups:
            i0, i1, a0, a1, j0, j1, b0, b1 = g
            if a0 >= a1 or b0 >= b1:
                yc[:, i0:i1, j0:j1, :] = 0 if b is None else b  # reads nothing but padding
        for g, key in plan.live():
            i0, i1, a0, a1, j0, j1, b0, b1 = g
            whole = (i1 - i0, j1 - j0) == tuple(out_hw)
            for s0, s1 in plan.spans(g, c1 - c0, x.itemsize):
                cols = _group_cols(xc[s0:s1], g, stride, plan.eff_pads, ws)
                yg = yc[s0:s1].reshape(-1, co) if whole else \
                    ws.get("gemm", (cols.shape[0], co), x.dtype)
                np.matmul(cols, plan.wmat[key], out=yg)
                if b is not None:
                    yg += b  # while it is in cache
                if not whole:
                    yc[s0:s1, i0:i1, j0:j1, :] = yg.reshape(s1 - s0, i1 - i0, j1 - j0, co)
                if dw is not None:
                    dwg = ws.get("dw", (cols.shape[1], dy.shape[-1]), x.dtype)
                    np.matmul(cols.T, _block(dy[c0 + s0:c0 + s1], g, ws), out=dwg)
                    dw[a0:a1, b0:b1] += dwg.reshape(a1 - a0, b1 - b0, ci, -1)

    def new_dw():
        return None if dy is None else np.zeros((kh, kw, ci, dy.shape[-1]), dtype=x.dtype)

    dws = plan.run(n, body, new_dw)
    return y if dy is None else (y, _sum_partials(dws))


def _conv_scatter(dy: np.ndarray, w: np.ndarray, x_shape, stride, pads: Pads,
                  b: np.ndarray | None = None) -> np.ndarray:
    """Adjoint of :func:`_conv_gather` (conv backward-data): each output pixel sends
    ``dy[n,i,j,:] @ w[a,b]^T`` back to input pixel ``(i*sh - pt + a, j*sw - pl + b)``;
    then ``+ b`` if a bias is given (the transposed conv's forward).

    Per group: one GEMM ``dcols = dy_g @ w_g^T`` (N*ni*nj, ka*kb*C), then one strided add per
    tap into dx. dy (N, Ho, Wo, O), w (kh, kw, C, O) -> dx (N, H, W, C).
    """
    kh, kw, ci, co = w.shape
    n, ho, wo, _ = dy.shape
    sh, sw = stride
    if winograd.ENABLED:  # as one stride-1 correlation of dy, Winograd may pay
        geo = _phase_kernel(w, stride, pads, x_shape[1:3], (ho, wo), build=False)
        if geo is not None and winograd.worth_it(
                geo[0][:2], geo[2], co, geo[0][3],
                _direct_macs(w.shape, x_shape[1:3], (ho, wo), stride, pads)):
            wp, cpads, uv = _phase_kernel(w, stride, pads, x_shape[1:3], (ho, wo))
            # depth to space: dx[n, sh u + f, sw v + g, c] = out[n, u, v, (f, g, c)]
            return winograd.correlate(dy, wp, cpads, uv, b,
                                      phases=None if stride == (1, 1) else
                                      (sh, sw, tuple(x_shape[1:3])))
    plan = _Plan(w.shape, x_shape[1:3], (ho, wo), stride, pads, w, transpose_w=True)
    dx = np.empty(x_shape, dtype=dy.dtype)
    (pt, _), (pl, _) = plan.eff_pads

    def body(ws: Workspace, c0: int, c1: int, _acc) -> None:
        dyc = dy[c0:c1]
        dxc = ws.get("dxpad", (c1 - c0, *plan.hw_p, ci), dy.dtype) if plan.pad_first \
            else dx[c0:c1]
        dxc.fill(0)
        for g, key in plan.live():
            i0, i1, a0, a1, j0, j1, b0, b1 = g
            ni, nj = i1 - i0, j1 - j0
            for s0, s1 in plan.spans(g, c1 - c0, dy.itemsize):
                dcols = ws.get("dcols", ((s1 - s0) * ni * nj, (a1 - a0) * (b1 - b0) * ci),
                               dy.dtype)
                np.matmul(_block(dyc[s0:s1], g, ws), plan.wmat[key], out=dcols)
                d6 = dcols.reshape(s1 - s0, ni, nj, a1 - a0, b1 - b0, ci)
                out = dxc[s0:s1]
                for a in range(a0, a1):
                    r = i0 * sh - pt + a
                    for bb in range(b0, b1):
                        c = j0 * sw - pl + bb
                        out[:, r:r + sh * (ni - 1) + 1:sh, c:c + sw * (nj - 1) + 1:sw, :] += \
                            d6[:, :, :, a - a0, bb - b0, :]
        if plan.pad_first:  # scattered into a padded buffer: crop
            (qt, _), (ql, _) = pads
            dx[c0:c1] = dxc[:, qt:qt + x_shape[1], ql:ql + x_shape[2], :]
        if b is not None:
            dx[c0:c1] += b

    plan.run(n, body)
    return dx


def _conv_weight_grad(x: np.ndarray, dy: np.ndarray, w_shape, stride, pads: Pads,
                      need_db: bool = False):
    """``dw[a,b,c,o] = sum_{n,i,j} x[n, i*sh-pt+a, j*sw-pl+b, c] dy[n,i,j,o]``: per group
    ``dw[a0:a1, b0:b1] += cols_g^T @ dy_g``. x (N, H, W, C), dy (N, Ho, Wo, O) -> w_shape;
    with ``need_db`` also ``db[o] = sum_{n,i,j} dy[n,i,j,o]`` (returns ``(dw, db)``)."""
    kh, kw, ci, co = w_shape
    if _winograd_ok(w_shape, x.shape[1:3], dy.shape[1:3], stride, pads):
        dw = winograd.weight_grad(x, dy, (kh, kw), pads)
        return (dw, bias_add_backward(dy)) if need_db else dw
    plan = _Plan(w_shape, x.shape[1:3], dy.shape[1:3], stride, pads)

    def body(ws: Workspace, c0: int, c1: int, acc) -> None:
        dw, db = acc
        xc = _padded(x[c0:c1], pads, plan.hw_p, ws) if plan.pad_first else x[c0:c1]
        dyc = dy[c0:c1]
        for g, _ in plan.live():
            i0, i1, a0, a1, j0, j1, b0, b1 = g
            for s0, s1 in plan.spans(g, c1 - c0, x.itemsize):
                cols = _group_cols(xc[s0:s1], g, stride, plan.eff_pads, ws)
                dwg = ws.get("dw", (cols.shape[1], co), dy.dtype)
                np.matmul(cols.T, _block(dyc[s0:s1], g, ws), out=dwg)
                dw[a0:a1, b0:b1] += dwg.reshape(a1 - a0, b1 - b0, ci, co)
        if db is not None:
            db += dyc.reshape(-1, co).sum(axis=0)

    def new_acc():
        return (np.zeros(w_shape, dtype=dy.dtype),
                np.zeros(co, dtype=dy.dtype) if need_db else None)

    parts = plan.run(x.shape[0], body, new_acc)
    dw = _sum_partials([p[0] for p in parts])
    return (dw, _sum_partials([p[1] for p in parts])) if need_db else dw


def _sum_partials(parts: list):
    """Add the workers' partial results in worker order (deterministic for a thread count)."""
    total = parts[0]
    for p in parts[1:]:
        total += p
    return total


# --------------------------------------------------------------------------------------
# dense
# --------------------------------------------------------------------------------------

def dense_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None,
                  leaky_alpha: float | None = None) -> np.ndarray:
    """``y = x @ w + b``.  x (N, in), w (in, out), b (out,) or None -> y (N, out).

    The rows of x are shared out to the workers (one GEMM each, BLAS single-threaded).
    ``leaky_alpha``: return ``leaky_relu_forward(y, leaky_alpha)`` instead (the fusion the GPU
    backends do in the GEMM epilogue; see :func:`_then_leaky`)."""
    check_dense(x, w, b, "dense_forward")
    y = np.empty((x.shape[0], w.shape[1]), dtype=np.result_type(x, w))

    def body(k: int, lo: int, hi: int) -> None:
        np.matmul(x[lo:hi], w, out=y[lo:hi])
        if b is not None:
            y[lo:hi] += b

    cpu_threads.parallel_rows(body, x.shape[0], size=x.size + y.size, blas_single=True)
    return _then_leaky(y, leaky_alpha)


def dense_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray, need_dx: bool = True,
                   need_dw: bool = True, need_db: bool = True):
    """Gradients of ``y = x @ w + b``.  dy (N, out) -> dx (N, in), dw (in, out), db (out,).

    dL/dx = dy @ w^T;   dL/dw = x^T @ dy;   dL/db = sum_n dy[n].
    ``dx`` is None when ``need_dx`` is False (first layer: saves a GEMM); ``dw`` and
    ``db`` are None when ``need_dw`` is False (only the input gradient is wanted), ``db``
    also when ``need_db`` is False (a layer without bias: no column sum of dy).
    Each worker takes a range of rows n: its rows of dx, and its partial sums of dw and db.
    """
    check_dense(x, w, None, "dense_backward")
    check_grad(dy, (x.shape[0], w.shape[1]), "dense_backward")
    dx = np.empty(x.shape, dtype=dy.dtype) if need_dx else None

    def body(k: int, lo: int, hi: int):
        if need_dx:
            np.matmul(dy[lo:hi], w.T, out=dx[lo:hi])
        if need_dw:
            return x[lo:hi].T @ dy[lo:hi], dy[lo:hi].sum(axis=0) if need_db else None
        return None

    parts = cpu_threads.parallel_rows(body, dy.shape[0], size=x.size + dy.size,
                                      blas_single=True)
    if not need_dw:
        return dx, None, None
    return dx, _sum_partials([p[0] for p in parts]), (
        _sum_partials([p[1] for p in parts]) if need_db else None)


# --------------------------------------------------------------------------------------
# conv2d and its adjoint, the transposed conv2d
# --------------------------------------------------------------------------------------

def conv2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride=1,
                   padding: Padding = "valid", leaky_alpha: float | None = None) -> np.ndarray:
    """2-D convolution (cross-correlation, as Keras/PyTorch).

    x (N, H, W, c_in), w (kh, kw, c_in, c_out), b (c_out,) or None -> y (N, Ho, Wo, c_out):
    ``y[n,i,j,o] = b[o] + sum_{a,b,c} xpad[n, i*sh + a, j*sw + b, c] * w[a,b,c,o]``
    (xpad: x with zero padding; the zeros are skipped, see :func:`_conv_gather`).
    ``leaky_alpha``: LeakyReLU(y) instead, as :func:`_then_leaky`.
    """
    check_conv(x, w, 2, "conv2d_forward")
    check_bias(b, w.shape[3], "conv2d_forward")
    stride = pair(stride, "strides")
    ho, wo, pads = conv_geometry(x.shape[1], x.shape[2], w.shape[0], w.shape[1], stride, padding)
    return _then_leaky(_conv_gather(x, w, stride, pads, (ho, wo), b=b), leaky_alpha)


def conv2d_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray, stride=1,
                    padding: Padding = "valid", need_dx: bool = True, need_dw: bool = True,
                    need_db: bool = True):
    """Gradients of :func:`conv2d_forward`.  dy (N, Ho, Wo, c_out) -> dx, dw, db.

    With ``X = im2col(x)`` (M, K) and ``Y = X @ Wm`` (Wm = w as (K, c_out)):
    dL/dWm = X^T @ dY;   dL/dX = dY @ Wm^T, scattered back to the pixels each window read
    (a pixel's gradient is the sum over every window that read it);
    dL/db = sum over N, Ho, Wo of dy.  ``need_dx`` / ``need_dw`` / ``need_db`` False skip
    (return None for) the input / parameter / bias gradients.
    """
    check_conv(x, w, 2, "conv2d_backward")
    stride = pair(stride, "strides")
    kh, kw, ci, co = w.shape
    ho, wo, pads = conv_geometry(x.shape[1], x.shape[2], kh, kw, stride, padding)
    check_grad(dy, (x.shape[0], ho, wo, co), "conv2d_backward")
    dw = db = None
    if need_dw and need_db:
        dw, db = _conv_weight_grad(x, dy, w.shape, stride, pads, need_db=True)
    elif need_dw:
        dw = _conv_weight_grad(x, dy, w.shape, stride, pads)
    dx = _conv_scatter(dy, w, x.shape, stride, pads) if need_dx else None
    return dx, dw, db


def conv2d_transpose_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride=1,
                             padding: Padding = "valid", output_padding=None,
                             leaky_alpha: float | None = None) -> np.ndarray:
    """Transposed 2-D convolution: the adjoint (backward-data) of :func:`conv2d_forward`.

    x (N, H, W, c_in), w (kh, kw, c_out, c_in) [Keras layout], b (c_out,) or None
    -> y (N, Ho, Wo, c_out), sizes from :func:`conv_transpose_geometry`.
    ``y = conv2d_backward_data(dy=x)`` for the conv with kernel ``w`` that maps
    (Ho, Wo, c_out) to (H, W, c_in): every input pixel scatters ``x[n,i,j,:] @ w[a,b]^T``
    to output pixel ``(i*sh + a - pt, j*sw + b - pl)``. No zeros are inserted or multiplied.
    ``leaky_alpha``: LeakyReLU(y) instead, as :func:`_then_leaky`.
    """
    check_conv(x, w, 3, "conv2d_transpose_forward")
    check_bias(b, w.shape[2], "conv2d_transpose_forward")
    stride = pair(stride, "strides")
    kh, kw, co, ci = w.shape
    n, h, wd, _ = x.shape
    ho, wo, pads = conv_transpose_geometry(h, wd, kh, kw, stride, padding, output_padding)
    return _then_leaky(_conv_scatter(x, w, (n, ho, wo, co), stride, pads, b=b), leaky_alpha)


def conv2d_transpose_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray, stride=1,
                              padding: Padding = "valid", output_padding=None,
                              need_dx: bool = True, need_dw: bool = True,
                              need_db: bool = True):
    """Gradients of :func:`conv2d_transpose_forward`.  dy (N, Ho, Wo, c_out) -> dx, dw, db.

    The forward is ``y = A^T x`` with ``A`` the conv; so dL/dx = A dy: the conv2d
    FORWARD of ``dy`` with the same kernel; and dL/dw is the conv's weight gradient with
    the roles read off the adjoint: input ``dy``, output gradient ``x``
    (``dw[a,b,o,c] = sum dy[n, i*sh-pt+a, j*sw-pl+b, o] x[n,i,j,c]``);
    dL/db = sum over N, Ho, Wo of dy.
    """
    check_conv(x, w, 3, "conv2d_transpose_backward")
    stride = pair(stride, "strides")
    kh, kw, co, ci = w.shape
    n, h, wd, _ = x.shape
    ho, wo, pads = conv_transpose_geometry(h, wd, kh, kw, stride, padding, output_padding)
    check_grad(dy, (n, ho, wo, co), "conv2d_transpose_backward")
    if not need_dw:
        return (_conv_gather(dy, w, stride, pads, (h, wd)) if need_dx else None), None, None
    if need_dx:  # one im2col of dy serves both GEMMs
        dx, dw = _conv_gather(dy, w, stride, pads, (h, wd), dy=x)
    else:
        dx, dw = None, _conv_weight_grad(dy, x, w.shape, stride, pads)
    return dx, dw, bias_add_backward(dy) if need_db else None


# --------------------------------------------------------------------------------------
# bias
# --------------------------------------------------------------------------------------

def _by_rows(body, x: np.ndarray) -> list:
    """``body(rows)`` on slices of x's first axis, shared out to the workers (one slice each;
    ``Ellipsis`` for a 0-d x); returns the bodies' results in row order. The elementwise ops
    below write into disjoint row slices of a preallocated output."""
    if x.ndim == 0:
        return [body(Ellipsis)]
    return cpu_threads.parallel_rows(lambda k, lo, hi: body(slice(lo, hi)), x.shape[0],
                                     size=x.size)


def bias_add_forward(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``y = x + b`` broadcast over the last (channel) axis.  x (..., C), b (C,)."""
    check_bias(b, x.shape[-1] if x.ndim else 0, "bias_add_forward")
    y = np.empty(np.broadcast_shapes(x.shape, b.shape), dtype=np.result_type(x, b))
    if y.ndim < 2:  # one row: its only axis is the channel axis, not rows to share out
        np.add(x, b, out=y)
    else:
        _by_rows(lambda r: np.add(x[r], b, out=y[r]), y)
    return y


def bias_add_backward(dy: np.ndarray) -> np.ndarray:
    """dL/db = sum of dy over every axis but the last.  dy (..., C) -> (C,)."""
    d2 = dy.reshape(-1, dy.shape[-1])
    return _sum_partials(_by_rows(lambda r: d2[r].sum(axis=0), d2))


# --------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------

def leaky_relu_forward(x: np.ndarray, alpha: float = 0.3) -> np.ndarray:
    """``y = x if x > 0 else alpha * x`` (any shape)."""
    alpha = float(alpha)
    y = np.empty_like(x)

    def body(r) -> None:
        if 0.0 <= alpha <= 1.0:
            np.multiply(x[r], alpha, out=y[r])
            np.maximum(x[r], y[r], out=y[r])  # max(x, alpha x): no mask
        else:
            y[r] = np.where(x[r] > 0, x[r], alpha * x[r])

    _by_rows(body, x)
    return y


def leaky_relu_backward(dy: np.ndarray, x: np.ndarray, alpha: float = 0.3) -> np.ndarray:
    """dL/dx = dy * slope, slope = 1 if x > 0 else alpha (the derivative at 0 is taken as alpha).

    Written as ``slope = alpha + (1 - alpha) * [x > 0]`` in place: three cheap passes, about
    4x faster than ``np.where(x > 0, dy, alpha * dy)``.
    """
    check_same_shape("leaky_relu_backward", dy, x)
    alpha = float(alpha)
    slope = np.empty_like(dy)

    def body(r) -> None:
        s = slope[r]
        np.greater(x[r], 0, out=s, casting="unsafe")  # 1.0 / 0.0
        s *= 1.0 - alpha
        s += alpha
        s *= dy[r]

    _by_rows(body, dy)
    return slope


def _then_leaky(y: np.ndarray, leaky_alpha: float | None) -> np.ndarray:
    """``y`` unchanged (``leaky_alpha`` None) or ``leaky_relu_forward(y, leaky_alpha)``.

    The reference of the forward FUSION: ``dense_forward``, ``conv2d_forward``,
    ``conv2d_transpose_forward`` and ``batchnorm_forward`` take ``leaky_alpha`` and return the
    LeakyReLU of their output, which the GPU backends compute in the same kernel (in the
    GEMM epilogue, in the batch norm's apply pass) without writing the pre-activation to
    memory and reading it back. Here it is the same two ops in a row, so a fused model is
    bitwise the unfused one. The LeakyReLU's backward needs no pre-activation: for alpha >= 0,
    ``z = leaky(y) > 0`` exactly when ``y > 0``, so ``leaky_relu_backward(dz, z, alpha)`` is
    exact (``rawgan.nn.Sequential`` relies on it).
    """
    return y if leaky_alpha is None else leaky_relu_forward(y, leaky_alpha)


def leaky_fold_beta(what: str, leaky_alpha: float | None, beta):
    """``beta`` checked for a backward that folds in a LeakyReLU (None when nothing is folded)."""
    if leaky_alpha is None:
        return None
    if beta is None:
        raise ValueError(f"{what}: leaky_alpha given without beta (the batch norm's output, "
                         f"whose sign picks the LeakyReLU slope, is recomputed from x and beta)")
    if not float(leaky_alpha) >= 0.0:
        raise ValueError(f"{what}: leaky_alpha must be >= 0, got {leaky_alpha!r}")
    return beta


def relu_forward(x: np.ndarray) -> np.ndarray:
    """``y = max(x, 0)``."""
    return np.maximum(x, 0)


def relu_backward(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """dL/dx = dy where x > 0, else 0."""
    check_same_shape("relu_backward", dy, x)
    return np.where(x > 0, dy, 0).astype(dy.dtype, copy=False)


def tanh_forward(x: np.ndarray) -> np.ndarray:
    """``y = tanh(x)``."""
    y = np.empty_like(x)
    _by_rows(lambda r: np.tanh(x[r], out=y[r]), x)
    return y


def tanh_backward(dy: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dL/dx = dy * (1 - y^2), written in terms of the OUTPUT y = tanh(x)."""
    check_same_shape("tanh_backward", dy, y)
    dx = np.empty_like(dy)

    def body(r) -> None:
        d = dx[r]
        np.multiply(y[r], y[r], out=d)
        np.subtract(1, d, out=d)
        d *= dy[r]

    _by_rows(body, dy)
    return dx


def sigmoid_forward(x: np.ndarray) -> np.ndarray:
    """``y = 1 / (1 + exp(-x))``, computed without overflow for large |x|."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def sigmoid_backward(dy: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dL/dx = dy * y * (1 - y), written in terms of the OUTPUT y = sigmoid(x)."""
    check_same_shape("sigmoid_backward", dy, y)
    return dy * y * (1 - y)


# --------------------------------------------------------------------------------------
# batch normalization
# --------------------------------------------------------------------------------------

def _bn_affine(x2: np.ndarray, mean, scale, beta, training: bool, out: np.ndarray,
               centered: bool = False) -> np.ndarray:
    """The batch norm's output into ``out``, row-parallel: ``(x - mean) * scale + beta``
    (``centered``: ``out`` already holds ``x - mean``), in training and inference alike.
    (TF folds inference into ``x * scale + (beta - mean * scale)``, one pass fewer, but that
    cancels when |mean| >> std: 2.3e-5 relative error in float32 at mean 100, std 0.1,
    against 2.6e-8 centred; the GPU kernels centre too.) Written once: the backward that
    folds in a LeakyReLU recomputes y with it, bitwise the forward's. ``training`` is kept
    for the callers."""
    def rows(r) -> None:
        if not centered:
            np.subtract(x2[r], mean, out=out[r])
        out[r] *= scale
        out[r] += beta

    _by_rows(rows, x2)
    return out


def batchnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                      moving_mean: np.ndarray, moving_variance: np.ndarray,
                      momentum: float = 0.99, epsilon: float = 1e-3, training: bool = True,
                      leaky_alpha: float | None = None):
    """Batch normalization over every axis but the last (N for 2-D, N,H,W for 4-D input).

    x (..., C), gamma/beta/moving_* (C,) -> (y, mean, inv_std), mean/inv_std (C,).
    Training: ``mean, var`` are the batch statistics (biased variance, as Keras 3, in two
    passes: ``var = mean((x - mean)^2)``), ``y = gamma * (x - mean) * inv_std + beta`` with
    ``inv_std = 1 / sqrt(var + eps)``, and the moving statistics are updated IN PLACE:
    ``moving = momentum * moving + (1 - momentum) * batch``.
    Inference: the moving statistics normalise (``(x - mean) * gamma * inv_std + beta``,
    centred as in training: TF's folded ``x * scale + (beta - mean * scale)`` cancels when
    |mean| >> std) and nothing is updated.
    ``leaky_alpha``: return LeakyReLU(y) in place of y (:func:`_then_leaky`).
    """
    c = x.shape[-1] if x.ndim else 0
    if c == 0:
        raise ValueError(f"batchnorm_forward: x of shape {x.shape} has no channel axis "
                         "(or 0 channels)")
    check_channels("batchnorm_forward", c, gamma=gamma, beta=beta, moving_mean=moving_mean,
                   moving_variance=moving_variance)
    x2 = x.reshape(-1, c)
    m = x2.shape[0]
    if training and m == 0:  # the batch statistics (and so the moving ones) would be NaN
        raise ValueError("batchnorm_forward: empty batch")
    xc = np.empty_like(x2)
    if training:
        mean = _sum_partials(_by_rows(lambda r: x2[r].sum(axis=0), x2)) / m

        def center(r):
            np.subtract(x2[r], mean, out=xc[r])
            return np.einsum("mc,mc->c", xc[r], xc[r])

        var = _sum_partials(_by_rows(center, x2)) / m
        mom = float(momentum)
        moving_mean *= mom
        moving_mean += (1 - mom) * mean
        moving_variance *= mom
        moving_variance += (1 - mom) * var
    else:
        mean = moving_mean.astype(x.dtype, copy=True)
        var = moving_variance.astype(x.dtype, copy=False)
    inv_std = 1 / np.sqrt(var + float(epsilon))
    _bn_affine(x2, mean, gamma * inv_std, beta, training, xc, centered=training)
    return _then_leaky(xc.reshape(x.shape), leaky_alpha), mean, inv_std


def batchnorm_backward(dy: np.ndarray, x: np.ndarray, gamma: np.ndarray, mean: np.ndarray,
                       inv_std: np.ndarray, training: bool = True,
                       leaky_alpha: float | None = None, beta: np.ndarray | None = None):
    """Gradients of :func:`batchnorm_forward`.  dy, x (..., C) -> dx (..., C), dgamma, dbeta (C,).

    With ``xhat = (x - mean) * inv_std`` over the m = N(*H*W) rows of a channel:
    dL/dbeta = sum dy;   dL/dgamma = sum dy * xhat;
    training (mean and var depend on x):
    dL/dx = gamma * inv_std / m * (m * dy - dL/dbeta - xhat * dL/dgamma);
    inference (statistics are constants): dL/dx = gamma * inv_std * dy.
    Folded LeakyReLU (``leaky_alpha`` and ``beta`` given; the forward returned z = leaky(y)):
    dy arrives as dL/dz and dL/dy = dL/dz * (1 if y > 0 else alpha), y recomputed from x by
    the forward's own formula (so no copy of y is kept; the GPU kernels do this as they read).
    """
    beta = leaky_fold_beta("batchnorm_backward", leaky_alpha, beta)
    check_same_shape("batchnorm_backward", dy, x)
    c = x.shape[-1]
    check_channels("batchnorm_backward", c, gamma=gamma, mean=mean, inv_std=inv_std, beta=beta)
    dy2, x2 = dy.reshape(-1, c), x.reshape(-1, c)
    if beta is not None:
        y2 = _bn_affine(x2, mean, gamma * inv_std, beta, training, np.empty_like(x2))
        dy2 = leaky_relu_backward(dy2, y2, leaky_alpha)
    m = dy2.shape[0]
    xhat = np.empty_like(dy2)

    def sums(r):
        np.subtract(x2[r], mean, out=xhat[r])
        xhat[r] *= inv_std
        return dy2[r].sum(axis=0), np.einsum("mc,mc->c", dy2[r], xhat[r])

    parts = _by_rows(sums, dy2)
    dbeta = _sum_partials([p[0] for p in parts])
    dgamma = _sum_partials([p[1] for p in parts])
    g = gamma * inv_std
    dgamma_m, dbeta_m = dgamma / m, dbeta / m

    def dx_rows(r) -> None:
        d = xhat[r]  # overwritten in place: dx = (dy - xhat * dgamma/m - dbeta/m) * g
        if training:
            d *= dgamma_m
            d += dbeta_m
            np.subtract(dy2[r], d, out=d)
            d *= g
        else:
            np.multiply(dy2[r], g, out=d)

    _by_rows(dx_rows, dy2)
    return xhat.reshape(x.shape), dgamma, dbeta


# --------------------------------------------------------------------------------------
# dropout
# --------------------------------------------------------------------------------------

def _uniforms(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """``rng.random(shape, dtype=dtype)``, the same numbers, drawn by the workers in row
    ranges when ``rng`` runs on PCG64 (numpy's default): worker k draws its rows from a copy
    of the generator skipped to its first number (``streams.skip_uniforms``), and ``rng`` is left
    where the one-call draw leaves it (claimed first: ``streams.claim_uniforms``, so threads
    sharing ``rng`` get different numbers). Other bit generators draw in one call."""
    dtype = np.dtype(dtype)
    u = np.empty(shape, dtype=dtype)
    bg = rng.bit_generator
    if (u.ndim == 0 or not isinstance(bg, np.random.PCG64)
            or cpu_threads.workers_for(u.shape[0], u.size) == 1):
        rng.random(shape, dtype=dtype, out=u)
        return u
    # rng moves past the numbers first, where rng.random(shape) would leave it (atomically:
    # another thread drawing from rng meanwhile gets the numbers after these)
    start, per = claim_uniforms(bg, u.size, dtype), u.size // u.shape[0]

    def body(r) -> None:
        mine = np.random.PCG64(0)
        mine.state = start
        skip_uniforms(mine, r.start * per, dtype)
        np.random.Generator(mine).random(dtype=dtype, out=u[r])

    _by_rows(body, u)
    return u


def dropout_forward(x: np.ndarray, rate: float, rng: np.random.Generator,
                    training: bool = True):
    """Inverted dropout.  x (any shape) -> (y, mask), mask of x's shape and dtype.

    Each unit is kept with probability ``1 - rate`` and scaled by ``1 / (1 - rate)``, so
    ``E[y] = x`` and inference is the identity: ``mask = keep / (1 - rate)``, ``y = x * mask``.
    ``rng`` is an explicit ``numpy.random.Generator``: a run is reproducible from its seed
    (the numbers of one ``rng.random(x.shape, dtype=x.dtype)`` draw, see :func:`_uniforms`;
    the GPU backends' host path draws the same). Returns ``(x, None)`` when not training or
    ``rate == 0``.
    """
    if not training or rate == 0.0:
        return x, None
    mask = _uniforms(rng, x.shape, x.dtype)
    y = np.empty_like(x)
    scale = 1.0 / (1.0 - rate)

    def body(r) -> None:
        k = mask[r]
        np.greater_equal(k, rate, out=k, casting="unsafe")  # u >= rate -> 1.0, else 0.0
        k *= scale
        np.multiply(x[r], k, out=y[r])

    _by_rows(body, x)
    return y, mask


def dropout_backward(dy: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """dL/dx = dy * mask (the same mask, scale included, as the forward)."""
    if mask is None:
        return dy
    check_same_shape("dropout_backward", dy, mask)
    dx = np.empty_like(dy)
    _by_rows(lambda r: np.multiply(dy[r], mask[r], out=dx[r]), dy)
    return dx


# --------------------------------------------------------------------------------------
# gradient bookkeeping (the layers' ``grads``)
# --------------------------------------------------------------------------------------

def accumulate(acc: np.ndarray, g: np.ndarray) -> None:
    """``acc += g`` in place: a layer ADDS its parameter gradient into ``grads`` (two
    backward passes before one update, as D's real and fake passes with batch norm)."""
    if acc.shape != g.shape:
        raise ValueError(f"accumulate: shapes {acc.shape} and {g.shape} differ")
    np.add(acc, g, out=acc)


def zero_grads(arrays) -> None:
    """Set every array of ``arrays`` (a model's gradients) to 0, in place."""
    for a in arrays:
        a.fill(0)


# --------------------------------------------------------------------------------------
# optimizer updates: every tensor of a model in one call (rawgan.optim's rules)
# --------------------------------------------------------------------------------------
#
# The tensors are laid end to end and the total is shared out to the workers (a range may
# cover the tail of one tensor and the head of the next), as the CUDA backends' multi-tensor
# kernels do in one launch. Every update is in place.

def _multi_tensor(body, *slots) -> None:
    """``body(i, a, b)`` on element ranges [a, b) of tensor i, covering every tensor once."""
    sizes = [p.size for p in slots[0]]
    starts = np.cumsum([0, *sizes])
    for s in slots[1:]:
        if s is not None and [a.size for a in s] != sizes:
            raise ValueError("optimizer update: the tensor lists differ in sizes")

    def work(k: int, lo: int, hi: int) -> None:
        i = int(np.searchsorted(starts, lo, side="right")) - 1
        while i < len(sizes) and starts[i] < hi:
            a, b = max(lo, starts[i]) - starts[i], min(hi, starts[i + 1]) - starts[i]
            if b > a:
                body(i, int(a), int(b))
            i += 1

    cpu_threads.parallel_rows(work, int(starts[-1]), size=int(starts[-1]))


def _flat(a: np.ndarray) -> np.ndarray:
    if not a.flags.c_contiguous:
        raise ValueError("optimizer update: tensors must be C-contiguous")
    return a.reshape(-1)


def _clip(p: np.ndarray, clip_value: float | None) -> None:
    if clip_value is not None:
        np.clip(p, -clip_value, clip_value, out=p)  # WGAN weight clipping


def adam_update(params, grads, ms, vs, alpha: float, beta_1: float, beta_2: float,
                epsilon: float, clip_value: float | None = None) -> None:
    """Adam, Keras form, in place on every tensor::

        m += (1 - b1) (g - m);  v += (1 - b2) (g^2 - v);  p -= alpha m / (sqrt(v) + eps)

    ``alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)`` (the caller folds the bias correction in);
    then ``p = clip(p, -clip_value, clip_value)`` when clip_value is given."""
    c1, c2 = 1.0 - beta_1, 1.0 - beta_2

    def body(i: int, a: int, b: int) -> None:
        p, g, m, v = (_flat(t[i])[a:b] for t in (params, grads, ms, vs))
        t = g - m
        t *= c1
        m += t
        np.multiply(g, g, out=t)
        t -= v
        t *= c2
        v += t
        np.sqrt(v, out=t)
        t += epsilon
        q = np.multiply(m, alpha)
        q /= t
        p -= q
        _clip(p, clip_value)

    _multi_tensor(body, params, grads, ms, vs)


def sgd_update(params, grads, velocities, lr: float, momentum: float = 0.0,
               nesterov: bool = False, clip_value: float | None = None) -> None:
    """SGD, Keras form, in place: ``v = mu v - lr g; p += v`` (Nesterov: ``p += mu v - lr g``);
    momentum 0: ``p -= lr g`` (``velocities`` may then be None)."""
    if momentum != 0.0 and velocities is None:
        raise ValueError("sgd_update: momentum != 0 needs the velocity tensors")

    def body(i: int, a: int, b: int) -> None:
        p, g = _flat(params[i])[a:b], _flat(grads[i])[a:b]
        if momentum == 0.0:
            p -= lr * g
        else:
            v = _flat(velocities[i])[a:b]
            v *= momentum
            v -= lr * g
            if nesterov:
                p += momentum * v - lr * g
            else:
                p += v
        _clip(p, clip_value)

    _multi_tensor(body, params, grads, velocities if momentum != 0.0 else None)


def rmsprop_update(params, grads, accumulators, lr: float, rho: float = 0.9,
                   epsilon: float = 1e-7, clip_value: float | None = None) -> None:
    """RMSprop in place, PyTorch's form (epsilon outside the square root; see optim.RMSprop):
    ``a = rho a + (1 - rho) g^2; p -= lr g / (sqrt(a) + eps)``."""

    def body(i: int, a: int, b: int) -> None:
        p, g, acc = (_flat(t[i])[a:b] for t in (params, grads, accumulators))
        acc *= rho
        acc += (1.0 - rho) * g * g
        p -= lr * g / (np.sqrt(acc) + epsilon)
        _clip(p, clip_value)

    _multi_tensor(body, params, grads, accumulators)
