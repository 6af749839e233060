"""Winograd's minimal filtering: the stride-1 convolutions with fewer multiplies.

A stride-1 correlation of a tile of ``n = m + r - 1`` inputs with an ``r``-tap kernel gives
``m`` outputs; done directly that is ``m * r`` multiplies, Winograd's algorithm F(m, r) does
it in ``n`` (Winograd 1980; Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016)::

    y = A^T [ (G g) * (B^T d) ]          d (n,) input tile, g (r,) kernel, y (m,)
    Y = A^T [ (G g G^T) * (B^T d B) ] A   the same in 2-D, tile (n, n), kernel (r, r)

``*`` is elementwise. In a convolution layer the elementwise product over the tile becomes,
at each of the ``n * n`` tile positions, a sum over input channels: one GEMM per position,
``M[p] = V[p] @ U[p]`` with ``V[p]`` (tiles, C) the transformed inputs and ``U[p]`` (C, O)
the transformed kernel. For the DCGAN generator's 5x5 stride-1 layer on 7x7 maps, F(4x4, 5x5)
covers a map with 2x2 tiles of 8x8: 256 products per (input, output channel) pair and image
instead of the 841 the direct sum takes over the taps that hit the map (3.3x fewer; the
transforms give back part of it, see :func:`winograd_macs`).

This is the SAME math as ``numpy_ops._conv_gather`` (a stride-1 correlation), not a new
layer algorithm: numpy_ops uses it where it is cheaper, for the conv forward and (with the
flipped kernel) for the conv's backward-data, so for both directions of the transposed conv
too. Exact in exact arithmetic; in floating point the transforms cost accuracy: float64 agrees
with the direct sum to ~1e-14 of the output's scale, float32 to ~1.5e-5 (the direct float32
sum: ~5e-7). ``RAWGAN_WINOGRAD=0`` (or :data:`ENABLED` False) turns it off.

The interpolation points are ``0, 1, -1, 2, -2, 1/2, -1/2`` (as many as F(m, r) needs) and
infinity; A, G and B are derived from them below, exactly, in rationals.
"""

from __future__ import annotations

import functools
import os
from fractions import Fraction

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import cpu_threads

#: Use Winograd where :func:`worth_it` says it pays (``RAWGAN_WINOGRAD=0`` turns it off).
ENABLED = os.environ.get("RAWGAN_WINOGRAD", "1").strip().lower() not in ("0", "false", "no")
#: Outputs per tile and axis (F(4, r)); kernel sizes from 2 to 5 (tiles up to 8).
M_OUT = 4
MAX_R = 5
#: Winograd is used when its modelled cost times this margin is below the direct cost (its
#: GEMMs are smaller and it copies more; see :func:`worth_it`).
MARGIN = 1.3
#: Target size (bytes) of one span's transformed tiles (a span stays in cache).
SPAN_BYTES = 1 << 23

_POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2),
           Fraction(1, 2), Fraction(-1, 2))

Pads = tuple[tuple[int, int], tuple[int, int]]


@functools.cache
def transforms(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A^T (m, n), G (n, r), B^T (n, n))`` of F(m, r), float64, n = m + r - 1.

    Points ``p_0 .. p_{n-2}`` and infinity. The kernel's polynomial is sampled at each point,
    ``(G g)_i = g(p_i) / f_i`` with ``g(x) = sum_j g_j x^j`` and ``f_i = prod_{k != i}
    (p_i - p_k)``; at infinity the leading coefficient, ``g_{r-1}``. The outputs interpolate
    the products back: ``A^T[k, i] = p_i^k`` (and 1 at infinity for k = m - 1). B^T is what
    makes the bilinear form the correlation, ``sum_i A^T[k,i] G[i,j] B^T[i,l] = [l == k + j]``
    for all k, j, l: a linear system for each column of B^T, solved here and checked exactly.
    """
    n = m + r - 1
    if not 1 <= n - 1 <= len(_POINTS):
        raise ValueError(f"winograd: F({m}, {r}) needs {n - 1} points, have {len(_POINTS)}")
    p = _POINTS[:n - 1]
    at = [[Fraction(0)] * n for _ in range(m)]
    g = [[Fraction(0)] * r for _ in range(n)]
    for i, pi in enumerate(p):
        f = Fraction(1)
        for k, pk in enumerate(p):
            if k != i:
                f *= pi - pk
        for k in range(m):
            at[k][i] = pi ** k
        for j in range(r):
            g[i][j] = pi ** j / f
    at[m - 1][n - 1] = g[n - 1][r - 1] = Fraction(1)
    # B^T column by column: solve in floating point, snap to small rationals, verify exactly.
    e = np.array([[float(at[k][i] * g[i][j]) for i in range(n)]
                  for k in range(m) for j in range(r)])
    bt = [[Fraction(0)] * n for _ in range(n)]
    for col in range(n):
        t = np.array([1.0 if col == k + j else 0.0 for k in range(m) for j in range(r)])
        sol = np.linalg.lstsq(e, t, rcond=None)[0]
        for i in range(n):
            bt[i][col] = Fraction(float(sol[i])).limit_denominator(1 << 12)
    for k in range(m):
        for j in range(r):
            for col in range(n):
                s = sum(at[k][i] * g[i][j] * bt[i][col] for i in range(n))
                if s != (1 if col == k + j else 0):
                    raise AssertionError(f"winograd: F({m}, {r}) transform is not exact")
    return tuple(np.array([[float(v) for v in row] for row in mat]) for mat in (at, g, bt))


def _tiles(out_size: int) -> int:
    return -(-out_size // M_OUT)


def winograd_macs(k_hw, out_hw, c_in: int, c_out: int) -> int:
    """Multiply-adds per image of :func:`correlate`: per tile ``n_h n_w C O`` in the GEMMs,
    ``(n_h n_w)^2 C`` in the input transform (one (n_h n_w)^2 matrix per tile and channel)
    and ``m^2 n_h n_w O`` in the output transform."""
    (kh, kw), (ho, wo) = k_hw, out_hw
    nh, nw = M_OUT + kh - 1, M_OUT + kw - 1
    per_tile = nh * nw * c_in * c_out + (nh * nw) ** 2 * c_in + M_OUT * M_OUT * nh * nw * c_out
    return _tiles(ho) * _tiles(wo) * per_tile


def worth_it(k_hw, out_hw, c_in: int, c_out: int, direct_macs: int) -> bool:
    """Use :func:`correlate` for this stride-1 correlation? ``direct_macs``: the multiply-adds
    per image of the direct sum (numpy_ops counts only the taps that land on the input).
    Measured (one core, 128 images): the DCGAN's 7x7 256 -> 128 5x5 layer, modelled at 2.1x
    fewer, ran 1.9x faster (42 vs 79 ms)."""
    kh, kw = k_hw
    if not ENABLED or not (2 <= kh <= MAX_R and 2 <= kw <= MAX_R):
        return False
    return winograd_macs(k_hw, out_hw, c_in, c_out) * MARGIN < direct_macs


def _matrices(kh: int, kw: int, dtype):
    """kron(A_h^T, A_w^T), kron(B_h^T, B_w^T), kron(G_h, G_w) in ``dtype``: the 2-D transforms
    on row-major flattened tiles (``(B^T d B)_{ij} = sum_{ab} B^T_{ia} d_{ab} B^T_{jb}``)."""
    (ah, gh, bh), (aw, gw, bw) = transforms(M_OUT, kh), transforms(M_OUT, kw)
    return (np.kron(ah, aw).astype(dtype), np.kron(bh, bw).astype(dtype),
            np.kron(gh, gw).astype(dtype))


def correlate(x: np.ndarray, w: np.ndarray, pads: Pads, out_hw,
              b: np.ndarray | None = None) -> np.ndarray:
    """Stride-1 correlation by F(4x4, kh x kw):
    ``y[n,i,j,o] = b[o] + sum_{a,b,c} x[n, i - pt + a, j - pl + b, c] w[a,b,c,o]``.

    x (N, H, W, C), w (kh, kw, C, O), pads ((pt, pb), (pl, pr)) >= 0, b (O,) or None
    -> y (N, Ho, Wo, O) with ``Ho = H + pt + pb - kh + 1``.

    Per span of images: zero-pad to whole tiles; gather the (n_h, n_w) input tiles at stride
    m; ``V = B^T d B`` (one GEMM); ``M[p] = V[p] @ U[p]`` at each tile position p, with
    ``U = G w G^T`` computed once; ``Y = A^T M A`` (one GEMM); write the tiles' m x m outputs.
    """
    kh, kw, c, o = w.shape
    n, h, wd, _ = x.shape
    ho, wo = out_hw
    (pt, _), (pl, _) = pads
    nh, nw, m = M_OUT + kh - 1, M_OUT + kw - 1, M_OUT
    th, tw = _tiles(ho), _tiles(wo)
    hp, wp = th * m + kh - 1, tw * m + kw - 1  # padded input that whole tiles read
    rows_h, rows_w = min(h, hp - pt), min(wd, wp - pl)  # input pixels any tile reads
    aa, bb, gg = _matrices(kh, kw, x.dtype)
    # U = G w G^T, the rows shared out too (a multi-threaded BLAS call here would leave
    # BLAS's threads spinning on the cores the workers below need; see cpu_threads)
    u = cpu_threads.workspace().get("wino_u", (nh * nw, c, o), x.dtype)
    wm = np.ascontiguousarray(w).reshape(kh * kw, c * o)
    cpu_threads.parallel_rows(
        lambda _k, lo, hi: np.matmul(gg[lo:hi], wm, out=u[lo:hi].reshape(hi - lo, -1)),
        nh * nw, size=u.size, blas_single=True)
    y = np.empty((n, ho, wo, o), dtype=x.dtype)
    per_image = nh * nw * th * tw * max(c, o) * x.itemsize
    step = max(1, SPAN_BYTES // per_image)

    def body(_k: int, lo: int, hi: int) -> None:
        ws = cpu_threads.workspace()
        for s0 in range(lo, hi, step):
            s1 = min(hi, s0 + step)
            s, t = s1 - s0, (s1 - s0) * th * tw
            xp = ws.get("wino_pad", (s, hp, wp, c), x.dtype)
            xp.fill(0)
            xp[:, pt:pt + rows_h, pl:pl + rows_w] = x[s0:s1, :rows_h, :rows_w]
            st = xp.strides
            view = as_strided(xp, (nh, nw, s, th, tw, c),
                              (st[1], st[2], st[0], st[1] * m, st[2] * m, st[3]),
                              writeable=False)
            d = ws.get("wino_d", (nh, nw, s, th, tw, c), x.dtype)
            np.copyto(d, view)                                  # d[a, b, tile, c]
            v = ws.get("wino_v", (nh * nw, t * c), x.dtype)
            np.matmul(bb, d.reshape(nh * nw, -1), out=v)        # V = B^T d B
            mm = ws.get("wino_m", (nh * nw, t, o), x.dtype)
            np.matmul(v.reshape(nh * nw, t, c), u, out=mm)      # M[p] = V[p] @ U[p]
            yt = ws.get("wino_y", (m * m, t * o), x.dtype)
            np.matmul(aa, mm.reshape(nh * nw, -1), out=yt)      # Y = A^T M A
            tiles = yt.reshape(m, m, s, th, tw, o).transpose(2, 3, 0, 4, 1, 5)
            out = tiles.reshape(s, th * m, tw * m, o)[:, :ho, :wo]
            if b is None:
                y[s0:s1] = out
            else:
                np.add(out, b, out=y[s0:s1])

    cpu_threads.parallel_rows(body, n, size=n * th * tw * nh * nw * max(c, o),
                              blas_single=True)
    return y
