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
layer algorithm: numpy_ops uses it where it is cheaper, for the stride-1 conv forward, for
the conv's backward-data at any stride (with the flipped kernel; at stride s as one
correlation whose outputs are the s*s output phases, ``numpy_ops._phase_kernel``), so for
the transposed conv's forward too, and for the stride-1 weight gradient (:func:`weight_grad`:
the forward's transforms run backwards, sharing the input transform when a transposed conv's
backward needs both gradients). Exact in exact arithmetic; in floating point
the transforms cost accuracy: float64 agrees with the direct sum to ~1e-14 of the output's
scale, float32 to ~1.5e-5 (the direct float32 sum: ~5e-7). ``RAWGAN_WINOGRAD=0`` (or
:data:`ENABLED` False) turns it off.

Not used for the stride-2 conv FORWARD: as a stride-1 3x3 correlation of the space-to-depth
input (4C channels, the 5x5 kernel zero-padded to 6x6) it models 1.3x fewer multiply-adds
than the direct sum for the discriminator's 14x14 64 -> 128 layer, but ran slower (batch 256,
2 threads, 2026-12-04: 26.4 vs 20.4 ms with OpenBLAS's Haswell kernels, 26.9 vs 14.3 ms with
its SkylakeX ones; the 4x larger K and the zero taps eat the saving;
``python benchmarks/bench_winograd_stride2.py``).

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
#: Target size (bytes) of one span's transformed tiles (a span stays in cache; in a
#: whole DCGAN step at batch 256, 4 MB beat 8 MB by 1-4% and 3 MB by 0-3%).
SPAN_BYTES = 1 << 22

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
    Measured (``benchmarks/bench_winograd.py``, batch 256, 2 threads): the DCGAN's 7x7
    256 -> 128 5x5 layer, modelled at 2.1x fewer, ran 1.7x faster; the 1.4x ones 1.2x."""
    kh, kw = k_hw
    if not ENABLED or not (2 <= kh <= MAX_R and 2 <= kw <= MAX_R):
        return False
    return winograd_macs(k_hw, out_hw, c_in, c_out) * MARGIN < direct_macs


@functools.cache
def _matrices(kh: int, kw: int, dtype):
    """kron(A_h^T, A_w^T), kron(B_h^T, B_w^T), kron(G_h, G_w) of F(4, kh) x F(4, kw) in
    ``dtype``: the 2-D transforms on row-major flattened tiles
    (``(B^T d B)_{ij} = sum_{ab} B^T_{ia} d_{ab} B^T_{jb}``)."""
    (ah, gh, bh), (aw, gw, bw) = transforms(M_OUT, kh), transforms(M_OUT, kw)
    out = tuple(np.kron(p, q).astype(dtype) for p, q in ((ah, aw), (bh, bw), (gh, gw)))
    for a in out:  # cached and shared: never written
        a.flags.writeable = False
    return out


class _Tiling:
    """The tiles of a stride-1 correlation x (N, H, W, C) * (kh, kw) -> (Ho, Wo) with padding
    (pt, pl) on top and left: tile (t, u) covers outputs [m t, m t + m) x [m u, m u + m) and
    reads the (n_h, n_w) padded-input window at (m t, m u)."""

    def __init__(self, x_shape, k_hw, pads: Pads, out_hw) -> None:
        _, self.h, self.w, self.c = x_shape
        (self.kh, self.kw), (self.ho, self.wo) = k_hw, out_hw
        (self.pt, _), (self.pl, _) = pads
        self.m = m = M_OUT
        self.nh, self.nw = m + self.kh - 1, m + self.kw - 1
        self.th, self.tw = _tiles(self.ho), _tiles(self.wo)
        self.hp, self.wp = self.th * m + self.kh - 1, self.tw * m + self.kw - 1
        self.per_image = self.th * self.tw  # tiles

    def input_transform(self, x: np.ndarray, bb: np.ndarray, ws, out: np.ndarray) -> None:
        """``out[p, (s, t, u), c] = (B^T d B)[p]`` of every tile d of the images of x:
        zero-pad them into a workspace buffer, gather the overlapping windows (stride m) in
        one copy, transform with one GEMM. x (s, H, W, C), out (n_h n_w, s th tw C)."""
        s, (pt, pl), m = x.shape[0], (self.pt, self.pl), self.m
        rows, cols = min(self.h, self.hp - pt), min(self.w, self.wp - pl)
        xp = ws.get("wino_pad", (s, self.hp, self.wp, self.c), x.dtype)
        xp.fill(0)
        xp[:, pt:pt + rows, pl:pl + cols] = x[:, :rows, :cols]
        st = xp.strides
        view = as_strided(xp, (self.nh, self.nw, s, self.th, self.tw, self.c),
                          (st[1], st[2], st[0], st[1] * m, st[2] * m, st[3]), writeable=False)
        d = ws.get("wino_d", view.shape, x.dtype)
        np.copyto(d, view)                                   # d[a, b, (s, t, u), c]
        np.matmul(bb, d.reshape(self.nh * self.nw, -1), out=out)


def _kernel_transform(gg: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """``out[p] = (G w G^T)[p]``: (n_h n_w, kh kw) @ w as (kh kw, C O). The rows are shared out
    (a multi-threaded BLAS call here would leave BLAS's threads spinning on the cores the
    workers need next; see cpu_threads)."""
    wm = np.ascontiguousarray(w).reshape(gg.shape[1], -1)
    flat = out.reshape(gg.shape[0], -1)
    cpu_threads.parallel_rows(lambda _k, lo, hi: np.matmul(gg[lo:hi], wm, out=flat[lo:hi]),
                              gg.shape[0], size=out.size, blas_single=True)


def correlate(x: np.ndarray, w: np.ndarray, pads: Pads, out_hw,
              b: np.ndarray | None = None, phases=None, dy: np.ndarray | None = None):
    """Stride-1 correlation by F(4x4, kh x kw):
    ``y[n,i,j,o] = b[o] + sum_{a,b,c} x[n, i - pt + a, j - pl + b, c] w[a,b,c,o]``.

    x (N, H, W, C), w (kh, kw, C, O), pads ((pt, pb), (pl, pr)) >= 0, b (O,) or None
    -> y (N, Ho, Wo, O) with ``Ho = H + pt + pb - kh + 1``.

    ``phases = (sh, sw, (H', W'))``: the O channels are sh * sw phases of O / (sh sw) channels
    each, written out depth to space, ``y'[n, sh i + f, sw j + g, c] = y[n, i, j, (f, g, c)]``,
    cropped to (H', W') (see ``numpy_ops._phase_kernel``).
    ``dy`` (N, Ho, Wo, D): also return ``weight_grad(x, dy, (kh, kw), pads)`` from the same
    input transform, ``(y, dw)`` (a transposed conv's backward needs both).

    ``U = G w G^T`` once; then per span of images: ``V = B^T d B`` for every input tile d
    (:meth:`_Tiling.input_transform`); ``M[p] = V[p] @ U[p]`` at each tile position p;
    ``Y = A^T M A`` (one GEMM); write the tiles' m x m outputs.
    """
    kh, kw, c, o = w.shape
    nn = (kh + M_OUT - 1) * (kw + M_OUT - 1)
    u = cpu_threads.workspace().get("wino_u", (nn, c, o), x.dtype)
    _kernel_transform(_matrices(kh, kw, np.dtype(x.dtype))[2], w, u)
    return _run(x, (kh, kw), pads, out_hw, u=u, b=b, phases=phases, dy=dy)


def weight_grad(x: np.ndarray, dy: np.ndarray, k_hw, pads: Pads) -> np.ndarray:
    """The weight gradient of :func:`correlate`:
    ``dw[a,b,c,o] = sum_{n,i,j} x[n, i - pt + a, j - pl + b, c] dy[n,i,j,o]``.

    x (N, H, W, C), dy (N, Ho, Wo, O) -> dw (kh, kw, C, O).

    The forward of one tile is linear in the kernel g: ``Y = A^T [(G g G^T) * V] A`` with
    ``V = B^T d B``; its adjoint gives the gradient for an output-gradient tile e (m x m,
    the same tiles as the forward, zeros past the map):
    ``<e, Y> = <A e A^T, (G g G^T) * V> = <G^T [(A e A^T) * V] G, g>``, so
    ``dw = G^T [ sum over tiles (A e A^T) * V ] G``: the forward's transforms, run backwards.
    With channels, at each tile position p ``S[p] = V[p]^T @ E[p]``, (C, tiles) @ (tiles, O):
    GEMMs over the tiles. Each worker sums its images' tiles, the partial sums are added in
    worker order, then ``dw = G^T S G`` (one GEMM).
    """
    return _run(x, tuple(k_hw), pads, dy.shape[1:3], dy=dy)


def _run(x: np.ndarray, k_hw, pads: Pads, out_hw, u=None, b=None, phases=None, dy=None):
    """:func:`correlate` (``u`` = the transformed kernel given) and/or :func:`weight_grad`
    (``dy`` given), sharing each span's input transform."""
    (kh, kw), n, c = k_hw, x.shape[0], x.shape[-1]
    tl = _Tiling(x.shape, k_hw, pads, out_hw)
    nn, m, (ho, wo) = tl.nh * tl.nw, tl.m, out_hw
    aa, bb, gg = _matrices(kh, kw, np.dtype(x.dtype))
    o = 0 if u is None else u.shape[-1]
    d = 0 if dy is None else dy.shape[-1]
    y = None
    if u is not None:
        sh, sw, (hf, wf) = phases if phases is not None else (1, 1, (ho, wo))
        y = np.empty((n, hf, wf, o // (sh * sw)), dtype=x.dtype)
    step = max(1, SPAN_BYTES // (nn * tl.per_image * max(c, o, d) * x.itemsize))

    size = n * tl.per_image * nn * max(c, o, d)
    accs = None
    if dy is not None:
        # The per-worker partial sums outlive their bodies (the caller adds them), so they
        # come from the CALLING thread's workspace, one buffer per worker: a pool thread's
        # own buffers may be reused by another worker of this call, or by a concurrent call
        # from another thread, before the sum (not np.zeros: fresh pages fault).
        nw = cpu_threads.workers_for(n, size=size, blas_single=True)
        mine = cpu_threads.workspace()
        accs = [mine.get(f"wino_acc{k}", (nn, c, d), x.dtype) for k in range(nw)]

    def body(k: int, lo: int, hi: int):
        ws = cpu_threads.workspace()
        acc = None
        if accs is not None:
            acc = accs[k if len(accs) > 1 else 0]  # (a nested call: one body, worker k)
            acc.fill(0)
        for s0 in range(lo, hi, step):
            s1 = min(hi, s0 + step)
            s, t = s1 - s0, (s1 - s0) * tl.per_image
            v = ws.get("wino_v", (nn, t * c), x.dtype)
            tl.input_transform(x[s0:s1], bb, ws, v)            # V = B^T d B
            v3 = v.reshape(nn, t, c)
            if u is not None:
                mm = ws.get("wino_m", (nn, t, o), x.dtype)
                np.matmul(v3, u, out=mm)                       # M[p] = V[p] @ U[p]
                yt = ws.get("wino_y", (m * m, t * o), x.dtype)
                np.matmul(aa, mm.reshape(nn, -1), out=yt)      # Y = A^T M A
                tiles = yt.reshape(m, m, s, tl.th, tl.tw, o).transpose(2, 3, 0, 4, 1, 5)
                out = tiles.reshape(s, tl.th * m, tl.tw * m, o)[:, :ho, :wo]
                if phases is not None:  # depth to space
                    out = out.reshape(s, ho, wo, sh, sw, -1).transpose(0, 1, 3, 2, 4, 5)
                    out = out.reshape(s, ho * sh, wo * sw, -1)[:, :hf, :wf]
                if b is None:
                    y[s0:s1] = out
                else:
                    np.add(out, b, out=y[s0:s1])
            if dy is not None:
                ep = ws.get("wino_ep", (s, tl.th * m, tl.tw * m, d), x.dtype)
                ep[:, ho:] = 0
                ep[:, :ho, wo:] = 0
                ep[:, :ho, :wo] = dy[s0:s1]
                e = ws.get("wino_e", (m, m, s, tl.th, tl.tw, d), x.dtype)
                np.copyto(e, ep.reshape(s, tl.th, m, tl.tw, m, d).transpose(2, 4, 0, 1, 3, 5))
                et = ws.get("wino_et", (nn, t, d), x.dtype)
                np.matmul(aa.T, e.reshape(m * m, -1), out=et.reshape(nn, -1))  # A e A^T
                part = ws.get("wino_s", (nn, c, d), x.dtype)
                np.matmul(v3.transpose(0, 2, 1), et, out=part)  # S[p] += V[p]^T E[p]
                acc += part
        return acc

    parts = cpu_threads.parallel_rows(body, n, size=size, blas_single=True)
    if dy is None:
        return y
    total = parts[0]
    for p in parts[1:]:
        total += p
    dw = np.empty((kh * kw, c * d), dtype=x.dtype)
    gt = np.ascontiguousarray(gg.T)
    cpu_threads.parallel_rows(
        lambda _k, lo, hi: np.matmul(gt[lo:hi], total.reshape(nn, -1), out=dw[lo:hi]),
        kh * kw, size=dw.size, blas_single=True)                # dw = G^T S G
    dw = dw.reshape(kh, kw, c, d)
    return dw if y is None else (y, dw)
