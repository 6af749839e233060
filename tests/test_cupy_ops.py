"""The CuPy backend on a real GPU, against the NumPy reference.

Every op, forward and backward, on random geometries (strides 1-3, kernels 1-5, same / valid /
int paddings, output paddings, batch sizes) and on the DCGAN's layer shapes at batch 64 and
256; every tile configuration and the split-K path. Every output buffer an op allocates is
NaN-poisoned first (``cupy_ops._empty`` is replaced), so an element a kernel forgets to write
fails the test. Inputs are random, never zeros.

Reference: ``numpy_ops`` run in FLOAT64 on the same values, so the figure measures the GPU
kernels alone. Tolerance: ‖gpu - ref‖ / ‖ref‖ < 1e-5 for float32 (no TF32 anywhere: the
kernels are FP32 FMA), < 1e-12 for float64. Dropout from NumPy's PCG64 numbers (made on the
GPU) must match NumPy bit for bit; the Philox path must match a Python Philox.

The whole module is skipped without CuPy or without a GPU; the tests are marked ``gpu``.
Run on a GPU machine with::

    python -m pytest tests/test_cupy_ops.py -m gpu -v
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

cp = pytest.importorskip("cupy")


def _device_count() -> int:
    try:
        return int(cp.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_device_count() == 0, reason="CuPy finds no CUDA GPU")]

from rawgan import backends, gan, losses, models, optim  # noqa: E402
from rawgan.backends import cupy_ops, numpy_ops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DTYPES = (np.float32, np.float64)
TOL = {np.float32: 1e-5, np.float64: 1e-12}


@pytest.fixture
def ops(monkeypatch):
    """The CuPy backend with NaN-poisoned allocations and the default tile heuristics."""
    mod = backends.get("cupy")
    assert mod is cupy_ops

    def poisoned(shape, dtype):
        return cp.full(shape, cp.nan, dtype=dtype)

    monkeypatch.setattr(cupy_ops, "_empty", poisoned)
    monkeypatch.setattr(cupy_ops, "FORCE_TILE", None)
    monkeypatch.setattr(cupy_ops, "TF32", False)  # whatever RAWGAN_TF32 says: FP32 tolerances
    monkeypatch.setattr(cupy_ops, "DROPOUT_RNG", "numpy")
    yield mod
    cupy_ops._device_info.clear()


def close(got, want, what: str = "") -> None:
    """Relative error of a GPU result against a (float64) reference."""
    got = cp.asnumpy(got) if isinstance(got, cp.ndarray) else np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values (an unwritten output?)"
    tol = TOL[got.dtype.type]
    scale = float(np.linalg.norm(want.astype(np.float64)))
    err = float(np.linalg.norm(got.astype(np.float64) - want.astype(np.float64)))
    assert err <= tol * max(scale, 1e-30), f"{what}: relative error {err / scale:.3g} > {tol}"


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def f64(*arrays):
    return [None if a is None else a.astype(np.float64) for a in arrays]


def test_backend_selection_and_array_module():
    mod = backends.get("cupy")
    assert mod.xp is cp and mod.name == "cupy"
    a = mod.asarray(np.arange(3.0))
    assert isinstance(a, cp.ndarray)
    np.testing.assert_array_equal(mod.to_numpy(a), np.arange(3.0))
    mod.synchronize()
    assert backends.get("auto") is mod


def test_every_kernel_module_compiles_with_nvrtc():
    for filename in cupy_ops.KERNEL_FILES:
        cupy_ops._module(filename, cupy_ops._device()).get_function(
            {"gemm.cu": "gemm_nn_f32_L", "conv.cu": "conv_dgrad_f64_T",
             "elementwise.cu": "dropout_philox_f64", "batchnorm.cu": "bn_bwd_dx_f32",
             "losses.cu": "gan_loss_f64", "optim.cu": "adam_mt_f32"}[filename])


# -- dense -------------------------------------------------------------------------------

@pytest.mark.parametrize("tile", [None, "L", "M", "S", "T"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_matches_numpy(ops, tile, dtype):
    cupy_ops.FORCE_TILE = tile
    rng = np.random.default_rng(1)
    shapes = [(3, 5, 7), (70, 36, 130), (16, 64, 8), (5, 33, 1), (1, 300, 20),
              (int(rng.integers(1, 300)), int(rng.integers(1, 300)), int(rng.integers(1, 300))),
              # the DCGAN's dense layers at batch 64 and 256
              (64, 100, 12544), (256, 100, 12544), (128, 6272, 1), (512, 6272, 1)]
    for n, k, m in shapes:
        x, w, b, dy = (rand(rng, s, dtype) for s in ((n, k), (k, m), (m,), (n, m)))
        X, W, B, DY = (ops.asarray(a) for a in (x, w, b, dy))
        close(ops.dense_forward(X, W, B), numpy_ops.dense_forward(*f64(x, w, b)), "y")
        got = ops.dense_backward(DY, X, W)
        want = numpy_ops.dense_backward(*f64(dy, x, w))
        for g, r, what in zip(got, want, ("dx", "dw", "db"), strict=True):
            close(g, r, f"{what} {(n, k, m)}")


def test_sgemm_4096_matches_numpy(ops):
    rng = np.random.default_rng(2)
    a, b = rand(rng, (4096, 4096), np.float32), rand(rng, (4096, 4096), np.float32)
    y = ops.dense_forward(ops.asarray(a), ops.asarray(b), None)
    close(y, a.astype(np.float64) @ b.astype(np.float64), "4096^3")


# -- convolutions ----------------------------------------------------------------------

DCGAN_CONVS = [
    # (N, H, W, Cin, Cout, k, s, padding, output_padding): D's convs, G's transposed convs
    (64, 28, 28, 1, 64, 5, 2, "same", None),
    (64, 14, 14, 64, 128, 5, 2, "same", None),
    (64, 7, 7, 256, 128, 5, 1, "same", None),
    (64, 7, 7, 128, 64, 5, 2, "same", None),
    (64, 14, 14, 64, 1, 5, 2, "same", None),
    (256, 14, 14, 64, 128, 5, 2, "same", None),
    (256, 7, 7, 128, 64, 5, 2, "same", None),
]


def random_conv_cases(seed: int, count: int):
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        k = int(rng.integers(1, 6))
        s = int(rng.integers(1, 4))
        padding = [str(rng.choice(["same", "valid"])), int(rng.integers(0, k))][
            int(rng.integers(0, 2))]
        h, w = int(rng.integers(max(k, 2), 20)), int(rng.integers(max(k, 2), 20))
        op = None if rng.random() < 0.5 or s == 1 else int(rng.integers(0, s))
        cases.append((int(rng.integers(1, 9)), h, w, int(rng.choice([1, 3, 4, 8, 12, 64])),
                      int(rng.choice([1, 2, 4, 8, 16, 20, 64, 128])), k, s, padding, op))
    return cases


def random_rectangular_conv_cases(seed: int, count: int):
    """As random_conv_cases with kh != kw and sh != sw drawn independently (a swap of the
    two axes anywhere in the kernels' geometry fails these, not the square ones)."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        kh, kw = (int(v) for v in rng.integers(1, 6, size=2))
        sh, sw = (int(v) for v in rng.integers(1, 4, size=2))
        if kh == kw and sh == sw:
            continue
        padding = [str(rng.choice(["same", "valid"])), int(rng.integers(0, min(kh, kw)))][
            int(rng.integers(0, 2))]
        h, w = int(rng.integers(max(kh, 2), 16)), int(rng.integers(max(kw, 2), 16))
        op = None if rng.random() < 0.5 else (int(rng.integers(0, sh)),
                                              int(rng.integers(0, sw)))
        cases.append((int(rng.integers(1, 6)), h, w, int(rng.choice([1, 3, 4, 12])),
                      int(rng.choice([1, 4, 16, 20])), (kh, kw), (sh, sw), padding, op))
    return cases


def check_conv_case(ops, case, dtype, rng) -> None:
    n, h, w, ci, co, k, s, padding, op = case
    kh, kw = k if isinstance(k, tuple) else (k, k)
    sh, sw = s if isinstance(s, tuple) else (s, s)
    x, wt, b = rand(rng, (n, h, w, ci), dtype), rand(rng, (kh, kw, ci, co), dtype), \
        rand(rng, (co,), dtype)
    y = numpy_ops.conv2d_forward(*f64(x, wt, b), s, padding)
    dy = rand(rng, y.shape, dtype)
    X, WT, B, DY = (ops.asarray(a) for a in (x, wt, b, dy))
    close(ops.conv2d_forward(X, WT, B, s, padding), y, f"conv fwd {case}")
    got = ops.conv2d_backward(DY, X, WT, s, padding)
    want = numpy_ops.conv2d_backward(*f64(dy, x, wt), s, padding)
    for g, r, what in zip(got, want, ("dx", "dw", "db"), strict=True):
        close(g, r, f"conv {what} {case}")
    try:
        numpy_ops.conv_transpose_geometry(h, w, kh, kw, (sh, sw), padding, op)
    except ValueError:
        return
    wt_t = rand(rng, (kh, kw, co, ci), dtype)
    yt = numpy_ops.conv2d_transpose_forward(*f64(x, wt_t, b), s, padding, op)
    dyt = rand(rng, yt.shape, dtype)
    WTT, DYT = ops.asarray(wt_t), ops.asarray(dyt)
    close(ops.conv2d_transpose_forward(X, WTT, B, s, padding, op), yt, f"convT fwd {case}")
    got = ops.conv2d_transpose_backward(DYT, X, WTT, s, padding, op)
    want = numpy_ops.conv2d_transpose_backward(*f64(dyt, x, wt_t), s, padding, op)
    for g, r, what in zip(got, want, ("dx", "dw", "db"), strict=True):
        close(g, r, f"convT {what} {case}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_random_geometries_match_numpy(ops, dtype):
    rng = np.random.default_rng(3)
    for case in random_conv_cases(seed=4, count=40):
        check_conv_case(ops, case, dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_need_db_false_skips_only_the_bias_gradient(ops, dtype):
    rng = np.random.default_rng(15)
    x, w, dy = rand(rng, (3, 9, 9, 4), dtype), rand(rng, (3, 3, 4, 8), dtype), \
        rand(rng, (3, 5, 5, 8), dtype)
    X, W, DY = ops.asarray(x), ops.asarray(w), ops.asarray(dy)
    for f, args in ((ops.conv2d_backward, (DY, X, W, 2, "same")),
                    (ops.dense_backward, (ops.asarray(dy[:, 0, 0]), ops.asarray(x[:, 0, 0, :4]),
                                          ops.asarray(rand(rng, (4, 8), dtype))))):
        full, part = f(*args), f(*args, need_db=False)
        assert part[2] is None and full[2] is not None
        for a, b in zip(full[:2], part[:2], strict=True):
            assert _bits(a) == _bits(b)
    WT, DYT = ops.asarray(rand(rng, (3, 3, 8, 4), dtype)), ops.asarray(
        rand(rng, (3, 18, 18, 8), dtype))
    full = ops.conv2d_transpose_backward(DYT, X, WT, 2, "same")
    part = ops.conv2d_transpose_backward(DYT, X, WT, 2, "same", need_db=False)
    assert part[2] is None and all(_bits(a) == _bits(b) for a, b in zip(full[:2], part[:2],
                                                                        strict=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_rectangular_kernels_and_strides_match_numpy(ops, dtype):
    rng = np.random.default_rng(13)
    for case in random_rectangular_conv_cases(seed=14, count=24):
        check_conv_case(ops, case, dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DCGAN_CONVS, ids=str)
def test_conv_dcgan_shapes_match_numpy(ops, case, dtype):
    check_conv_case(ops, case, dtype, np.random.default_rng(5))


def _rel(got, want) -> float:
    got = cp.asnumpy(got).astype(np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.mark.parametrize("tile", [None, "L", "M", "S"])
def test_tf32_path_within_its_tolerance(ops, monkeypatch, tile):
    """cupy_ops.TF32 on the real tensor cores: dense and DCGAN-sized conv passes within 3e-3
    (norm-relative) of float64, the tolerance the module docstring states."""
    monkeypatch.setattr(cupy_ops, "TF32", True)
    cupy_ops.FORCE_TILE = tile
    rng = np.random.default_rng(21)
    for n, k, m in ((70, 36, 130), (256, 100, 12544), (4096, 512, 256)):
        x, w, dy = (rand(rng, s, np.float32) for s in ((n, k), (k, m), (n, m)))
        X, W, DY = (ops.asarray(a) for a in (x, w, dy))
        assert _rel(ops.dense_forward(X, W, None), x.astype(np.float64) @ w) < 3e-3
        dx, dw, _ = ops.dense_backward(DY, X, W)
        assert _rel(dx, dy.astype(np.float64) @ w.T) < 3e-3
        assert _rel(dw, x.astype(np.float64).T @ dy) < 3e-3
    for n, h, w_, ci, co, k, s, padding, _ in DCGAN_CONVS[:4]:
        x, wt = rand(rng, (n, h, w_, ci), np.float32), rand(rng, (k, k, ci, co), np.float32)
        y = numpy_ops.conv2d_forward(*f64(x, wt), None, s, padding)
        dy = rand(rng, y.shape, np.float32)
        X, WT, DY = (ops.asarray(a) for a in (x, wt, dy))
        assert _rel(ops.conv2d_forward(X, WT, None, s, padding), y) < 3e-3
        got = ops.conv2d_backward(DY, X, WT, s, padding)
        want = numpy_ops.conv2d_backward(*f64(dy, x, wt), s, padding)
        for g, r in zip(got, want, strict=True):
            assert _rel(g, r) < 3e-3


def launches(monkeypatch) -> list[tuple[str, tuple]]:
    """Record every (kernel name, args) cupy_ops launches from now on."""
    seen: list[tuple[str, tuple]] = []
    real = cupy_ops._launch

    def recording(filename, kernel, grid, block, args):
        seen.append((kernel, tuple(args)))
        return real(filename, kernel, grid, block, args)

    monkeypatch.setattr(cupy_ops, "_launch", recording)
    return seen


@pytest.mark.parametrize("tile", ["L", "M", "S", "T"])
@pytest.mark.parametrize("sms", [1, 1000])
def test_conv_every_tile_with_and_without_split_k(ops, monkeypatch, tile, sms):
    cupy_ops.FORCE_TILE = tile
    # 1: at most 2 splits (2 blocks/SM); 1000: many
    cupy_ops._device_info[cupy_ops._device(), "sms"] = sms
    monkeypatch.setattr(cupy_ops, "MAX_K_CHUNK", 1 << 30)  # the SM count alone decides
    seen = launches(monkeypatch)
    rng = np.random.default_rng(6)
    for case in ((2, 9, 11, 4, 8, 3, 2, "same", 1), (3, 10, 10, 3, 5, 4, 3, 1, None),
                 (8, 14, 14, 64, 128, 5, 2, "same", None)):
        for dtype in DTYPES:
            check_conv_case(ops, case, dtype, rng)
    splits = [int(args[1]) for name, args in seen if name.startswith("splitk_reduce_")]
    if sms == 1:
        assert max(splits, default=1) <= 2, splits
    else:
        assert max(splits, default=1) >= 8, splits


def test_weight_gradient_sums_at_most_max_k_chunk_pixels_per_split(ops, monkeypatch):
    """A weight gradient over N*Ho*Wo = 4,608 pixels with the cap lowered to 256: at least
    18 splits even on a 1-SM device, each chunk <= 256 pixels, and the result unchanged."""
    monkeypatch.setattr(cupy_ops, "MAX_K_CHUNK", 256)
    cupy_ops._device_info[cupy_ops._device(), "sms"] = 1
    seen = launches(monkeypatch)
    check_conv_case(ops, (8, 24, 24, 3, 4, 3, 1, "same", None), np.float32,
                    np.random.default_rng(12))
    wgrad = [args for name, args in seen if name.startswith("conv_wgrad_")]
    assert wgrad, "no weight-gradient launch"
    chunks = [int(args[-3]) for args in wgrad]  # (x, dy, out, *geometry, chunk, vec, vec)
    splits = [int(args[1]) for name, args in seen if name.startswith("splitk_reduce_")]
    assert max(chunks) <= 256 and len(splits) == len(wgrad) and min(splits) >= 18, (
        chunks, splits)


def test_non_contiguous_inputs(ops):
    rng = np.random.default_rng(7)
    x = rand(rng, (4, 9, 9, 6), np.float32)
    w = rand(rng, (3, 3, 3, 5), np.float32)
    X = ops.asarray(x)[:, :, :, ::2]  # a strided view
    close(ops.conv2d_forward(X, ops.asarray(w), None, 2, "same"),
          numpy_ops.conv2d_forward(*f64(x[:, :, :, ::2], w), None, 2, "same"), "strided x")


# -- elementwise, batch norm, dropout -----------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_matches_numpy(ops, dtype):
    rng = np.random.default_rng(8)
    for shape in ((3, 5), (64, 7, 7, 128), (100003,), (256, 14, 14, 64)):
        x, dy = rand(rng, shape, dtype) * 3, rand(rng, shape, dtype)
        X, DY = ops.asarray(x), ops.asarray(dy)
        x64, dy64 = f64(x, dy)
        for alpha in (0.3, 0.0, 1.5):
            close(ops.leaky_relu_forward(X, alpha), numpy_ops.leaky_relu_forward(x64, alpha))
            close(ops.leaky_relu_backward(DY, X, alpha),
                  numpy_ops.leaky_relu_backward(dy64, x64, alpha))
        close(ops.relu_forward(X), numpy_ops.relu_forward(x64))
        close(ops.relu_backward(DY, X), numpy_ops.relu_backward(dy64, x64))
        for fwd, bwd in (("tanh_forward", "tanh_backward"),
                         ("sigmoid_forward", "sigmoid_backward")):
            y = getattr(numpy_ops, fwd)(x)
            close(getattr(ops, fwd)(X), getattr(numpy_ops, fwd)(x64), fwd)
            close(getattr(ops, bwd)(DY, ops.asarray(y)),
                  getattr(numpy_ops, bwd)(dy64, y.astype(np.float64)), bwd)
        b = rand(rng, shape[-1:], dtype)
        close(ops.bias_add_forward(X, ops.asarray(b)), numpy_ops.bias_add_forward(x64, *f64(b)))
        close(ops.bias_add_backward(DY), numpy_ops.bias_add_backward(dy64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 5), (64, 12544), (64, 7, 7, 128), (256, 14, 14, 64)])
def test_batchnorm_matches_numpy(ops, dtype, shape):
    rng = np.random.default_rng(9)
    x = rand(rng, shape, dtype) * 2 + 1
    c = shape[-1]
    gamma, beta = rand(rng, (c,), dtype), rand(rng, (c,), dtype)
    mm, mv = rand(rng, (c,), dtype), np.abs(rand(rng, (c,), dtype)) + 0.5
    dy = rand(rng, shape, dtype)
    for training in (True, False):
        mm_ref, mv_ref = f64(mm, mv)
        MM, MV = ops.asarray(mm), ops.asarray(mv)
        got = ops.batchnorm_forward(ops.asarray(x), ops.asarray(gamma), ops.asarray(beta), MM,
                                    MV, 0.99, 1e-3, training)
        want = numpy_ops.batchnorm_forward(*f64(x, gamma, beta), mm_ref, mv_ref, 0.99, 1e-3,
                                           training)
        for g, r, what in zip(got, want, ("y", "mean", "inv_std"), strict=True):
            close(g, r, f"bn {what} training={training}")
        close(MM, mm_ref, "moving_mean")
        close(MV, mv_ref, "moving_variance")
        gb = ops.batchnorm_backward(ops.asarray(dy), ops.asarray(x), ops.asarray(gamma), got[1],
                                    got[2], training)
        wb = numpy_ops.batchnorm_backward(*f64(dy, x, gamma), want[1], want[2], training)
        for g, r, what in zip(gb, wb, ("dx", "dgamma", "dbeta"), strict=True):
            close(g, r, f"bn {what} training={training}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("buffered", [False, True])
def test_dropout_is_numpy_exact(ops, dtype, buffered, monkeypatch):
    """NumPy's PCG64 numbers made on the GPU: the same masks, the generator left where
    NumPy's draw leaves it (``buffered``: it holds a spare 32-bit half first)."""
    x = rand(np.random.default_rng(10), (64, 14, 14, 64), dtype)
    gen, ref = np.random.default_rng(11), np.random.default_rng(11)
    if buffered:
        gen.random(1, dtype=np.float32), ref.random(1, dtype=np.float32)
    seen = launches(monkeypatch)
    y, mask = ops.dropout_forward(ops.asarray(x), 0.3, gen)
    y_ref, mask_ref = numpy_ops.dropout_forward(x, 0.3, ref)
    suffix = cupy_ops._suffix(np.dtype(dtype))
    assert [k for k, _ in seen] == [f"dropout_pcg64_{suffix}"]  # made on the GPU, not uploaded
    np.testing.assert_array_equal(cp.asnumpy(mask), mask_ref)
    np.testing.assert_array_equal(cp.asnumpy(y), y_ref)
    assert gen.bit_generator.state == ref.bit_generator.state
    other = np.random.Generator(np.random.SFC64(3))  # not PCG64: drawn on the host, uploaded
    _, mask = ops.dropout_forward(ops.asarray(x), 0.3, other)
    _, mask_ref = numpy_ops.dropout_forward(x, 0.3, np.random.Generator(np.random.SFC64(3)))
    assert seen[-1][0] == f"dropout_host_{suffix}"
    np.testing.assert_array_equal(cp.asnumpy(mask), mask_ref)
    dy = rand(np.random.default_rng(12), x.shape, dtype)
    np.testing.assert_array_equal(cp.asnumpy(ops.dropout_backward(ops.asarray(dy), mask)),
                                  dy * mask_ref)


def _philox(ctr, key):
    mask = 0xFFFFFFFF
    c, (k0, k1) = list(ctr), key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & mask, p1 & mask, ((p0 >> 32) ^ c[3] ^ k1) & mask,
             p0 & mask]
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return c


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_device_path_is_philox(ops, dtype):
    cupy_ops.DROPOUT_RNG = "philox"
    x = rand(np.random.default_rng(13), (5, 101), dtype)
    y, mask = ops.dropout_forward(ops.asarray(x), 0.3, np.random.default_rng(14))
    seed = int(np.random.default_rng(14).integers(0, 2**63 - 1, dtype=np.int64))
    e = 4 if dtype == np.float32 else 2
    u = []
    for g in range(-(-x.size // e)):
        c = _philox([g & 0xFFFFFFFF, g >> 32, 0, 0], [seed & 0xFFFFFFFF, seed >> 32])
        if dtype == np.float32:
            u += [np.float32(v >> 8) * np.float32(2.0**-24) for v in c]
        else:
            u += [((c[2 * q] >> 5) * 67108864.0 + (c[2 * q + 1] >> 6)) * 2.0**-53
                  for q in range(2)]
    u = np.array(u[:x.size], dtype=dtype).reshape(x.shape)
    want = np.where(u >= dtype(0.3), dtype(1 / 0.7), dtype(0))
    np.testing.assert_array_equal(cp.asnumpy(mask), want)
    np.testing.assert_array_equal(cp.asnumpy(y), x * want)
    big = ops.asarray(np.ones((1 << 20,), dtype))
    keep = float(cp.count_nonzero(ops.dropout_forward(big, 0.3, np.random.default_rng(1))[1]))
    assert abs(keep / big.size - 0.7) < 0.005


# -- losses and optimizers ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", losses.KINDS)
def test_gan_losses_match_rawgan_losses(ops, kind, dtype):
    rng = np.random.default_rng(15)
    r, f = rand(rng, (300, 1), dtype) * 3, rand(rng, (2049, 1), dtype) * 3
    r[0, 0], f[0, 0] = 40.0, -40.0
    loss, dr, df = ops.gan_discriminator_loss(kind, ops.asarray(r), ops.asarray(f))
    ref, ref_dr, ref_df = losses.discriminator_loss(kind, *f64(r, f))
    tol = TOL[dtype]
    assert abs(float(loss) - ref) <= tol * max(1.0, abs(ref))
    close(dr, ref_dr, "d_real")
    close(df, ref_df, "d_fake")
    loss, df = ops.gan_generator_loss(kind, ops.asarray(f))
    ref, ref_df = losses.generator_loss(kind, *f64(f))
    assert abs(float(loss) - ref) <= tol * max(1.0, abs(ref))
    close(df, ref_df, "g d_fake")


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_update_matches_rawgan_optim(ops, dtype):
    """Multi-tensor Adam on a DCGAN generator's parameters vs rawgan.optim.Adam (NumPy)."""
    G = models.dcgan_generator(seed=0, dtype=dtype)
    rng = np.random.default_rng(16)
    for layer in G.layers:
        for k in layer.grads:
            layer.grads[k][...] = rand(rng, layer.grads[k].shape, dtype)
    opt = optim.Adam(G, lr=1e-3)
    names, ps, gs = zip(*((n, p.copy(), g.copy()) for n, p, g in G.parameters()), strict=True)
    opt.step()
    opt.step()
    P, Gr = [ops.asarray(p) for p in ps], [ops.asarray(g) for g in gs]
    M, V = [cp.zeros_like(p) for p in P], [cp.zeros_like(p) for p in P]
    for t in (1, 2):
        alpha = 1e-3 * (1 - 0.999**t) ** 0.5 / (1 - 0.9**t)
        ops.adam_update(P, Gr, M, V, alpha, 0.9, 0.999, 1e-7)
    slots = opt.state_dict()["slots"]
    for (name, p, _), p0, Pd, Md, Vd in zip(G.parameters(), ps, P, M, V, strict=True):
        close(Pd, p, name)
        # the update itself (p - p0 is ~1e-3 of p: comparing p alone would hide its error)
        close(Pd - ops.asarray(p0), p - p0, f"{name} update")
        close(Md, slots[f"{name}/m"], f"{name} m")
        close(Vd, slots[f"{name}/v"], f"{name} v")


SHAPES = ((3, 5), (7,), (4, 4, 2, 3), (4099,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_rmsprop_and_the_graph_helpers_match_numpy(ops, dtype):
    """The multi-tensor SGD (plain, momentum, Nesterov, clipped) and RMSprop kernels, and
    clip_update / accumulate / zero_grads / copy_into, on tensors of several sizes."""
    rng = np.random.default_rng(18)

    def tensors():
        return [rand(rng, s, dtype) for s in SHAPES]

    p, g, slot = tensors(), tensors(), [np.abs(a) for a in tensors()]
    for kw in ({"momentum": 0.0}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True},
               {"momentum": 0.5, "clip_value": 0.3}):
        P, G, S = ([ops.asarray(a) for a in arrs] for arrs in (p, g, slot))
        pn, sn = [a.copy() for a in p], [a.copy() for a in slot]
        ops.sgd_update(P, G, S, 0.05, **kw)
        numpy_ops.sgd_update(pn, g, sn, 0.05, **kw)
        for a, b, c, d in zip(P, pn, S, sn, strict=True):
            close(a, b, f"sgd p {kw}")
            close(c, d, f"sgd v {kw}")
    P, G, S = ([ops.asarray(a) for a in arrs] for arrs in (p, g, slot))
    pn, sn = [a.copy() for a in p], [a.copy() for a in slot]
    ops.rmsprop_update(P, G, S, 1e-2, 0.9, 1e-7, clip_value=0.7)
    numpy_ops.rmsprop_update(pn, g, sn, 1e-2, 0.9, 1e-7, clip_value=0.7)
    for a, b, c, d in zip(P, pn, S, sn, strict=True):
        close(a, b, "rmsprop p")
        close(c, d, "rmsprop a")
    P = [ops.asarray(a) for a in p]
    ops.clip_update(P, 0.25)
    for a, b in zip(P, p, strict=True):
        close(a, np.clip(b, -0.25, 0.25), "clip_update")
    A, B = ops.asarray(p[3]), ops.asarray(g[3])
    ops.accumulate(A, B)
    close(A, p[3] + g[3], "accumulate")
    Z = [ops.asarray(a) for a in g]
    ops.zero_grads(Z)
    assert all(not bool(cp.any(z)) for z in Z)
    D = ops.asarray(np.zeros_like(p[2]))
    ops.copy_into(D, ops.asarray(p[2]))
    assert _bits(D) == p[2].tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_scalar_hyper_parameters_are_numbers(ops, dtype):
    """np.float32 / np.float64 hyper-parameters (they have a .shape) are converted to the
    kernel's type, never passed as a pointer or at their own size: the same bits as the
    same values given as Python floats."""
    rng = np.random.default_rng(19)
    p, g = [rand(rng, s, dtype) for s in SHAPES], [rand(rng, s, dtype) for s in SHAPES]

    def run(h):
        P, G = [ops.asarray(a) for a in p], [ops.asarray(a) for a in g]
        M, V = [cp.zeros_like(a) for a in P], [cp.zeros_like(a) for a in P]
        ops.adam_update(P, G, M, V, h[0], h[1], h[2], h[3])
        ops.sgd_update(P, G, None, h[4])
        ops.rmsprop_update(P, G, V, h[5], h[1], h[3], clip_value=h[6])
        return [cp.asnumpy(a).tobytes() for a in P]

    for num in (np.float32, np.float64):
        h = [num(v) for v in (1e-3, 0.9, 0.999, 1e-7, 0.05, 0.01, 0.9)]
        assert run(h) == run([float(v) for v in h]), num.__name__


# -- whole training steps ---------------------------------------------------------------

def _train(ops, dtype, steps, batch, model="dcgan"):
    G, D = models.build(model, seed=3, backend=ops, dtype=dtype)
    opt_g, opt_d = optim.Adam(G, lr=2e-4), optim.Adam(D, lr=2e-4)
    data = np.random.default_rng(4)
    noise = gan.gaussian_noise(np.random.default_rng(5), 100, ops=ops, dtype=dtype)
    out = []
    for _ in range(steps):
        real = ops.asarray(data.uniform(-1, 1, (batch, 28, 28, 1)).astype(dtype))
        s = gan.train_step(G, D, opt_g, opt_d, "bce", [real], noise)
        out.append((s.d_loss, s.g_loss, s.d_real, s.d_fake))
    return np.array(out), {k: ops.to_numpy(v) for k, v in G.get_weights().items()}


@pytest.mark.parametrize("dtype, steps, rtol", [(np.float64, 5, 1e-9), (np.float32, 3, 1e-4)])
def test_dcgan_training_tracks_numpy(ops, dtype, steps, rtol):
    """Same seeds, NumPy's dropout masks: the GPU run's losses and weights track
    NumPy's in the same dtype. float32: on the CPU emulator (same kernels, host FP) the
    losses of 3 steps differ from NumPy float32 by <= 1.3e-5 relative (Adam's first steps,
    ~lr * sign(g), amplify rounding); 1e-4 leaves room for the GPU's FMA contraction.
    The float32 weights are not compared: where a gradient is rounding noise, Adam's step
    m / sqrt(v) is +-1 whatever its size, so those elements differ by up to 2 lr per step
    (emulator: 4.6e-4 after 3 steps) while the losses, which they barely move, agree."""
    got, w_got = _train(ops, dtype, steps, 64)
    want, w_want = _train(numpy_ops, dtype, steps, 64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6)
    if dtype == np.float64:
        for k in w_want:
            close(w_got[k], w_want[k], k)


def _bits(a) -> bytes:
    return cp.asnumpy(a).tobytes()


@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("batch", [2, 64], ids=["batch2", "batch64"])
def test_fused_leaky_relu_is_bitwise_the_separate_kernels(ops, monkeypatch, batch, tf32):
    """The DCGAN's layer shapes with the LeakyReLU fused (GEMM epilogues, the batch norm's
    apply and folded backward) give the bits of the separate kernels, and (FP32) match the
    float64 NumPy reference; tests/test_fusion.py runs the same on the CPU emulator."""
    monkeypatch.setattr(cupy_ops, "TF32", tf32)
    rng = np.random.default_rng(17)
    A, a = ops.asarray, 0.3
    lk = ops.leaky_relu_forward
    x, w = rand(rng, (batch, 100), np.float32), rand(rng, (100, 12544), np.float32) * 0.1
    fused = ops.dense_forward(A(x), A(w), None, leaky_alpha=a)
    assert _bits(fused) == _bits(lk(ops.dense_forward(A(x), A(w), None), a))
    if not tf32:
        close(fused, numpy_ops.dense_forward(*f64(x, w), None, leaky_alpha=a), "dense")
    for hw, ci, co, stride in ((28, 1, 64, 2), (14, 64, 128, 2)):  # the critic's convs
        x, w = rand(rng, (batch, hw, hw, ci), np.float32), rand(rng, (5, 5, ci, co), np.float32)
        b = rand(rng, (co,), np.float32)
        fused = ops.conv2d_forward(A(x), A(w), A(b), stride, "same", leaky_alpha=a)
        assert _bits(fused) == _bits(lk(ops.conv2d_forward(A(x), A(w), A(b), stride, "same"),
                                        a)), ("conv", hw)
        if not tf32:
            close(fused, numpy_ops.conv2d_forward(*f64(x, w, b), stride, "same",
                                                  leaky_alpha=a), f"conv {hw}")
    for hw, ci, co, stride in ((7, 256, 128, 1), (7, 128, 64, 2)):  # the generator's convTs
        x, w = rand(rng, (batch, hw, hw, ci), np.float32), rand(rng, (5, 5, co, ci), np.float32)
        fused = ops.conv2d_transpose_forward(A(x), A(w), None, stride, "same", leaky_alpha=a)
        assert _bits(fused) == _bits(lk(ops.conv2d_transpose_forward(A(x), A(w), None, stride,
                                                                     "same"), a)), ("convT", hw)
        if not tf32:
            close(fused, numpy_ops.conv2d_transpose_forward(*f64(x, w), None, stride, "same",
                                                            leaky_alpha=a), f"convT {hw}")
    for shape in ((batch, 12544), (batch, 7, 7, 128), (batch, 14, 14, 64)):
        c = shape[-1]
        x, dz = rand(rng, shape, np.float32) * 2 + 0.5, rand(rng, shape, np.float32)
        gamma, beta = rand(rng, (c,), np.float32), rand(rng, (c,), np.float32) * 0.3
        for training in (True, False):
            stats = [A(np.zeros(c, np.float32)), A(np.ones(c, np.float32))]
            z, mean, inv_std = ops.batchnorm_forward(A(x), A(gamma), A(beta), *stats, 0.99,
                                                     1e-3, training, leaky_alpha=a)
            stats = [A(np.zeros(c, np.float32)), A(np.ones(c, np.float32))]
            y, _, _ = ops.batchnorm_forward(A(x), A(gamma), A(beta), *stats, 0.99, 1e-3,
                                            training)
            assert _bits(z) == _bits(lk(y, a)), ("bn", shape, training)
            got = ops.batchnorm_backward(A(dz), A(x), A(gamma), mean, inv_std, training,
                                         leaky_alpha=a, beta=A(beta))
            want = ops.batchnorm_backward(ops.leaky_relu_backward(A(dz), y, a), A(x), A(gamma),
                                          mean, inv_std, training)
            for g, wnt, what in zip(got, want, ("dx", "dgamma", "dbeta"), strict=True):
                assert _bits(g) == _bits(wnt), ("bn backward", what, shape, training)
            ref_stats = [np.zeros(c), np.ones(c)]
            _, mr, ir = numpy_ops.batchnorm_forward(*f64(x, gamma, beta), *ref_stats, 0.99,
                                                    1e-3, training)
            wb = numpy_ops.batchnorm_backward(*f64(dz, x, gamma), mr, ir, training,
                                              leaky_alpha=a, beta=beta.astype(np.float64))
            for g, r, what in zip(got, wb, ("dx", "dgamma", "dbeta"), strict=True):
                close(g, r, f"bn {what} {shape} training={training}")


@pytest.mark.parametrize("tf32", [False, True])
def test_fused_dcgan_training_step_is_bitwise_unfused(ops, monkeypatch, tf32):
    """The DCGAN at batch 64, forward and backward, fused (the default) and not."""
    monkeypatch.setattr(cupy_ops, "TF32", tf32)

    def run(fuse):
        G, D = models.build("dcgan", seed=5, backend=ops)
        G.fuse = D.fuse = fuse
        z = ops.asarray(np.random.default_rng(6).standard_normal((64, 100)).astype(np.float32))
        logit = D.forward(G.forward(z))
        G.backward(D.backward(cp.ones_like(logit)), input_grad=False)
        grads = [g for m in (G, D) for _, _, g in m.parameters()]
        return [_bits(a) for a in (logit, *grads, *G.weights().values())]

    assert run(True) == run(False)


def test_mlp_training_tracks_numpy(ops):
    got, _ = _train(ops, np.float64, 5, 32, model="mlp")
    want, _ = _train(numpy_ops, np.float64, 5, 32, model="mlp")
    np.testing.assert_allclose(got, want, rtol=1e-9)


# -- compute-sanitizer, once --------------------------------------------------------------

SANITIZER_SCRIPT = r"""
import numpy as np
from rawgan.backends import cupy_ops as ops
from rawgan import backends
backends.get("cupy")
# no memory pool: every array is its own allocation, so memcheck sees any overrun (a pool
# rounds blocks up to 512 bytes and an overrun would land in valid memory)
ops._cupy().cuda.set_allocator(None)
rng = np.random.default_rng(0)
def r(*s, dt=np.float32):
    return ops.asarray(rng.standard_normal(s).astype(dt))
def shifted(*s, dt=np.float32):  # contiguous but one element past an aligned start
    return r(1 + int(np.prod(s)), dt=dt)[1:].reshape(s)
for dt in (np.float32, np.float64):
    for tile in (None, "L", "M", "S", "T"):
        ops.FORCE_TILE = tile
        # odd sizes (the scalar paths) and multiples of 4 (the 128-bit loads), aligned and
        # shifted by one element
        for c, o, make in ((4, 6, r), (8, 8, r), (8, 8, shifted)):
            x, w, b = make(5, 9, 10, c, dt=dt), make(3, 3, c, o, dt=dt), make(o, dt=dt)
            y = ops.conv2d_forward(x, w, b, 2, "same", leaky_alpha=0.3)
            ops.conv2d_backward(y, x, w, 2, "same")
            wt = make(5, 5, o, c, dt=dt)
            yt = ops.conv2d_transpose_forward(x, wt, b, 2, "same", 1, leaky_alpha=0.3)
            ops.conv2d_transpose_backward(yt, x, wt, 2, "same", 1)
        for k, n, make in ((13, 5, r), (16, 8, r), (16, 8, shifted)):
            a, m = make(7, k, dt=dt), make(k, n, dt=dt)
            ops.dense_backward(ops.dense_forward(a, m, make(n, dt=dt), leaky_alpha=0.3), a, m)
    ops.FORCE_TILE = None
    z = r(4, 6, 6, 3, dt=dt)
    for f in ("relu", "tanh", "sigmoid"):
        getattr(ops, f + "_backward")(z, getattr(ops, f + "_forward")(z))
    ops.leaky_relu_backward(z, ops.leaky_relu_forward(z))
    g, be = r(3, dt=dt), r(3, dt=dt)
    mm, mv = r(3, dt=dt), ops.asarray(np.ones(3, dt))
    yb, mean, inv = ops.batchnorm_forward(z, g, be, mm, mv)
    ops.batchnorm_backward(yb, z, g, mean, inv)
    yb, mean, inv = ops.batchnorm_forward(z, g, be, mm, mv, leaky_alpha=0.3)
    ops.batchnorm_backward(yb, z, g, mean, inv, leaky_alpha=0.3, beta=be)
    ops.bias_add_backward(ops.bias_add_forward(z, g))
    for mode in ops.DROPOUT_MODES:
        ops.set_dropout_rng(mode)
        yd, mask = ops.dropout_forward(z, 0.3, rng)
        ops.dropout_backward(yd, mask)
    for kind in ("bce", "minimax", "wgan", "hinge", "lsgan"):
        ops.gan_discriminator_loss(kind, r(9, 1, dt=dt), r(11, 1, dt=dt))
        ops.gan_generator_loss(kind, r(11, 1, dt=dt))
    ps = [r(3, 4, dt=dt), r(5000, dt=dt)]
    gs, ms, vs = ([r(*p.shape, dt=dt) for p in ps] for _ in range(3))
    ops.adam_update(ps, gs, ms, [v * v for v in vs], 1e-3, 0.9, 0.999, 1e-7, 0.1)
    ops.sgd_update(ps, gs, ms, 1e-2, 0.9, True)
    ops.rmsprop_update(ps, gs, [v * v for v in vs], 1e-3)
    ops.clip_update(ps, 0.01)
    base = ops.asarray(np.array([3 << 16], dtype=np.uint64))
    srng = ops.StepRng(5, base)
    with ops.step_rng(srng):
        ops.standard_normal(ops.xp.empty((7, 9), dtype=dt), srng)
        ops.dropout_forward(z, 0.3, None)
    acc = r(4, 6, 6, 3, dt=dt)
    ops.copy_into(acc, z)
    ops.accumulate(acc, z)
    ops.zero_grads([acc, z])
    ops.adam_update(ps, gs, ms, vs, ops.asarray(np.array([1e-3], dt)), 0.9, 0.999, 1e-7)
ops.synchronize()
print("SANITIZER SCRIPT DONE")
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None,
                    reason="compute-sanitizer not on PATH")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_finds_no_errors(tool):
    """Every kernel, every tile configuration, once under compute-sanitizer: out-of-bounds
    and misaligned accesses (memcheck), shared-memory races (racecheck), barrier misuse
    (synccheck)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run(["compute-sanitizer", f"--tool={tool}", "--error-exitcode=99",
                          sys.executable, "-c", SANITIZER_SCRIPT], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=1800)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "SANITIZER SCRIPT DONE" in out, out[-6000:]
    assert "ERROR SUMMARY: 0 errors" in out or "RACECHECK SUMMARY: 0 hazards" in out, \
        out[-6000:]


@pytest.mark.parametrize("tf32", [False, True])
def test_graphed_step_replays_match_eager_steps(ops, monkeypatch, tf32):
    """rawgan.graphed on the real GPU: 2 eager warm-up steps, 1 captured, 2 replays of a real
    CUDA graph give bit-identical weights, Adam slots and losses to 5 eager steps (every
    kernel is deterministic: no atomics), and the graph's steps differ from each other; on
    the FMA tiles and on the TF32 tiles."""
    from rawgan.graphed import GraphedStep

    monkeypatch.setattr(cupy_ops, "TF32", tf32)
    runs = []
    for capture in (False, True):
        G, D = models.build("dcgan", seed=3, backend=ops)
        opt_g, opt_d = optim.Adam(G, lr=1e-3), optim.Adam(D, lr=1e-3)
        step = GraphedStep(G, D, opt_g, opt_d, "bce", batch_size=16, d_steps=1, noise_dim=100,
                           seed=7, capture=capture)
        data = np.random.default_rng(4)
        z_eager = ops.asarray(np.random.default_rng(8).standard_normal((9, 100), np.float32))
        stats, samples = [], []
        for _ in range(5):
            stats.append(step([data.uniform(-1, 1, (16, 28, 28, 1)).astype(np.float32)]))
            # what rawgan train does between steps: an eager inference pass (replacing the
            # layers' caches, freeing what the graph was recorded with) and fresh arrays
            samples.append(cp.asnumpy(G(z_eager)))
            cp.get_default_memory_pool().free_all_blocks()
            _ = [cp.full((4096,), 7.0, np.float32) for _ in range(8)]
        weights = {**{f"G/{k}": v for k, v in G.get_weights().items()},
                   **{f"D/{k}": v for k, v in D.get_weights().items()},
                   **{f"optD/{k}": v for k, v in opt_d.state_dict()["slots"].items()}}
        runs.append((stats, weights, step, samples))
    (eager, w_eager, s_eager, x_eager), (graph, w_graph, s_graph, x_graph) = runs
    assert s_eager.graph is None and s_graph.graph is not None and s_graph.launches == 3
    assert graph == eager
    for a, b in zip(x_graph, x_eager, strict=True):
        assert a.tobytes() == b.tobytes()
    for key, w in w_eager.items():
        np.testing.assert_array_equal(w_graph[key], w, err_msg=key)
    assert len({s.d_loss for s in graph}) == 5
    assert all(np.isfinite([s.d_loss, s.g_loss, s.d_real, s.d_fake]).all() for s in graph)


def test_step_rng_noise_is_box_muller_on_philox(ops):
    """cupy_ops.standard_normal on the device vs the same Box-Muller in Python."""
    import test_graphed

    for dtype in DTYPES:
        base = ops.asarray(np.array([9 << 16], dtype=np.uint64))
        rng = cupy_ops.StepRng(0xDEAD_BEEF_1234, base)
        rng.offset = 2
        z = cp.empty((1001,), dtype)
        cupy_ops.standard_normal(z, rng)
        want = test_graphed.normal_reference(z.size, 0xDEAD_BEEF_1234, (9 << 16) + 2, dtype)
        tol = 1e-6 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(cp.asnumpy(z).astype(np.float64), want, rtol=tol, atol=tol)
