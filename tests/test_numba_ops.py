"""The Numba CUDA backend against the NumPy reference, forward and backward, every op.

Without a GPU the kernels run in Numba's CUDA simulator: this module sets
``NUMBA_ENABLE_CUDASIM=1`` (unless already set) BEFORE numba is first imported. Importing
rawgan never imports numba, so other test modules are unaffected; the module restores the
environment variable after numba has read it. On a machine with a CUDA GPU, run the same
tests on the device (plus the ``gpu``-marked ones) with::

    NUMBA_ENABLE_CUDASIM=0 python -m pytest tests/test_numba_ops.py

Shapes are tiny: every simulated CUDA thread is a Python thread (~0.3 ms to launch).
Tolerances: ||out - ref|| / ||ref|| < 1e-5 in float32, < 1e-12 in float64. Every fresh
output buffer of the backend is NaN-poisoned before its kernel runs (``poison_outputs``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

_ENV_WAS = os.environ.get("NUMBA_ENABLE_CUDASIM")
if _ENV_WAS is None:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
try:
    pytest.importorskip("numba", reason="numba is not installed (pip install numba-cuda)")
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install numba-cuda)")
finally:
    if _ENV_WAS is None:  # numba has read it; do not leak it into other tests' subprocesses
        del os.environ["NUMBA_ENABLE_CUDASIM"]

from rawgan import backends, gan, optim  # noqa: E402
from rawgan.backends import numpy_ops as ref  # noqa: E402
from rawgan.backends import winograd  # noqa: E402
from rawgan.nn import (  # noqa: E402
    BatchNormalization,
    Conv2D,
    Conv2DTranspose,
    Dense,
    Dropout,
    Flatten,
    LeakyReLU,
    Reshape,
    Sequential,
    Tanh,
)

try:
    nb = backends.get("numba")
except backends.BackendUnavailable as exc:  # e.g. numba was imported earlier without the
    pytest.skip(f"numba backend unavailable: {exc}", allow_module_level=True)  # simulator

ON_GPU = not nb.SIMULATOR
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a real CUDA GPU (run with "
                                  "NUMBA_ENABLE_CUDASIM=0 on a machine that has one)")

DTYPES = [np.float32, np.float64]
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def _locked_shared_array():
    """The simulator's ``cuda.shared.array`` with its check-then-create made atomic.

    numba-cuda's simulator (0.30.4, ``FakeCUDAShared.array``) hands every thread of a block
    the same array by looking the call site up in a dict and creating the array when it is
    missing: two threads that both miss create TWO arrays, and the block's threads then
    stage their tiles in different "shared" memories. That race made this module fail now
    and then, a different test each time (more often on a busy machine, and with the 0.1 ms
    switch interval below). This is the same lookup under a lock; a real GPU is unaffected.
    """
    import threading

    from numba.core import types
    from numba.cuda.simulator.kernelapi import FakeCUDAShared
    from numba.np import numpy_support

    lock = threading.Lock()
    original = FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:  # dynamic shared memory: no lookup race
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        frame = sys._getframe(1)  # the kernel line that asked, as the simulator keys it
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    return FakeCUDAShared, original, array


@pytest.fixture(autouse=True, scope="module")
def _simulator_settings():
    """Poison every output; switch Python threads often (the simulator's block manager
    busy-waits on its threads at each syncthreads: 5 ms switches make that crawl); make the
    simulator's shared-array lookup thread-safe (see :func:`_locked_shared_array`)."""
    old_interval = sys.getswitchinterval()
    old_poison = nb.poison_outputs
    patched = None
    if nb.SIMULATOR:
        cls, original, array = _locked_shared_array()
        cls.array, patched = array, (cls, original)
    sys.setswitchinterval(1e-4)
    nb.poison_outputs = True
    yield
    nb.poison_outputs = old_poison
    sys.setswitchinterval(old_interval)
    if patched:
        patched[0].array = patched[1]


@pytest.fixture(autouse=True)
def _direct_reference(monkeypatch):
    """The float32 reference here is numpy_ops' direct sum: its Winograd path (chosen for
    the DCGAN-sized layers) is ~1e-5 off in float32, the tolerance of these comparisons;
    Winograd has its own tests (test_winograd.py)."""
    monkeypatch.setattr(winograd, "ENABLED", False)


def host(a):
    return None if a is None else nb.to_numpy(a)


def assert_close(out, expected, dtype, what=""):
    out = host(out)
    expected = np.asarray(expected)
    assert out.shape == expected.shape, f"{what}: shape {out.shape} != {expected.shape}"
    assert out.dtype == expected.dtype, f"{what}: dtype {out.dtype} != {expected.dtype}"
    assert np.all(np.isfinite(out)), f"{what}: non-finite values (an unwritten output?)"
    err = np.linalg.norm(out - expected) / max(np.linalg.norm(expected), 1e-30)
    assert err < TOL[np.dtype(dtype)], f"{what}: relative error {err:.3g}"


def randn(rng, shape, dtype):
    """Random, never-zero inputs."""
    a = rng.standard_normal(shape)
    a[np.abs(a) < 1e-3] = 0.5
    return a.astype(dtype)


# --------------------------------------------------------------------------------------
# selection and packaging
# --------------------------------------------------------------------------------------

def _run_python(code: str, env_drop=("NUMBA_ENABLE_CUDASIM",), extra_env=None):
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_backend_module_attributes():
    assert nb.name == "numba"
    assert nb.xp is (np if nb.SIMULATOR else pytest.importorskip("cupy"))
    x = nb.asarray(np.arange(6.0).reshape(2, 3))
    assert isinstance(nb.to_numpy(x), np.ndarray)
    nb.synchronize()


def test_get_numba_without_simulator_or_gpu_is_a_clear_error():
    proc = _run_python("""
        from numba import cuda
        if cuda.is_available():
            print("HAS-GPU")
            raise SystemExit(0)
        from rawgan import backends
        try:
            backends.get("numba")
        except backends.BackendUnavailable as exc:
            print("ERROR:", exc)
        """)
    assert proc.returncode == 0, proc.stderr
    if "HAS-GPU" in proc.stdout:
        pytest.skip("a CUDA GPU is present: the numba backend loads without the simulator")
    assert "ERROR: numba backend: no CUDA GPU found" in proc.stdout
    assert "NUMBA_ENABLE_CUDASIM=1" in proc.stdout


def test_get_numba_without_numba_names_the_package():
    proc = _run_python("""
        import sys
        sys.modules["numba"] = None  # as if numba were not installed
        from rawgan import backends
        try:
            backends.get("numba")
        except backends.BackendUnavailable as exc:
            print("ERROR:", exc)
        """)
    assert proc.returncode == 0, proc.stderr
    assert "ERROR: numba backend" in proc.stdout
    assert "pip install numba-cuda" in proc.stdout


def test_importing_rawgan_does_not_import_numba():
    proc = _run_python("""
        import sys
        import rawgan, rawgan.nn, rawgan.models, rawgan.gan, rawgan.backends
        rawgan.backends.get("numpy")
        print("numba" in sys.modules)
        """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# --------------------------------------------------------------------------------------
# elementwise ops
# --------------------------------------------------------------------------------------

def test_edge_shapes_as_numpy():
    """Empty batches, 1-D inputs, zero-width layers (tests/edge_cases.py): the same values
    as numpy_ops, or the same error."""
    from edge_cases import check_backend

    assert not check_backend(nb, nb.asarray, nb.to_numpy)


def test_mixed_dtypes_are_refused():
    """float32 with float64 in one op: a TypeError, as cupy_ops (a kernel is compiled for one
    dtype; the float64 operand would be staged in float32)."""
    rng = np.random.default_rng(2)
    x32, w64 = randn(rng, (2, 3), np.float32), randn(rng, (3, 4), np.float64)
    with pytest.raises(TypeError, match="mixed dtypes"):
        nb.dense_forward(x32, w64, None)
    with pytest.raises(TypeError, match="mixed dtypes"):
        nb.bias_add_forward(x32, randn(rng, (3,), np.float64))
    with pytest.raises(TypeError, match="mixed dtypes"):
        nb.leaky_relu_backward(x32, randn(rng, (2, 3), np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations(dtype):
    rng = np.random.default_rng(1)
    x = randn(rng, (2, 3, 5), dtype) * 3
    dy = randn(rng, x.shape, dtype)
    for alpha in (0.3, 0.0, 1.7):
        assert_close(nb.leaky_relu_forward(x, alpha), ref.leaky_relu_forward(x, alpha), dtype,
                     f"leaky_relu_forward alpha={alpha}")
        assert_close(nb.leaky_relu_backward(dy, x, alpha), ref.leaky_relu_backward(dy, x, alpha),
                     dtype, f"leaky_relu_backward alpha={alpha}")
    assert_close(nb.relu_forward(x), ref.relu_forward(x), dtype, "relu_forward")
    assert_close(nb.relu_backward(dy, x), ref.relu_backward(dy, x), dtype, "relu_backward")
    for fwd, bwd in (("tanh_forward", "tanh_backward"), ("sigmoid_forward", "sigmoid_backward")):
        y = getattr(ref, fwd)(x)
        assert_close(getattr(nb, fwd)(x), y, dtype, fwd)
        assert_close(getattr(nb, bwd)(dy, y), getattr(ref, bwd)(dy, y), dtype, bwd)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_extreme_logits(dtype):
    x = np.array([-1e4, -50.0, -1.0, 0.0, 1.0, 50.0, 1e4], dtype=dtype)
    assert_close(nb.sigmoid_forward(x), ref.sigmoid_forward(x), dtype, "sigmoid_forward")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2, 3)])
def test_bias_add(dtype, shape):
    rng = np.random.default_rng(2)
    x = randn(rng, shape, dtype)
    b = randn(rng, shape[-1:], dtype)
    assert_close(nb.bias_add_forward(x, b), ref.bias_add_forward(x, b), dtype, "bias_add_forward")
    assert_close(nb.bias_add_backward(x), ref.bias_add_backward(x), dtype, "bias_add_backward")


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no uint64 overflow in the kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 4), (1,), (), (5, 7, 7, 5)])
@pytest.mark.parametrize("buffered", [False, True])
def test_dropout_matches_numpy_exactly(dtype, shape, buffered, monkeypatch):
    """NumPy's PCG64 numbers made by the kernel: the same masks, the generator left where
    NumPy's draw leaves it; ``buffered``: it holds a spare 32-bit half first (float32 takes
    it, float64 keeps it). (5, 7, 7, 5): more runs than the simulator's 16 threads; ():
    a 0-d input stays 0-d."""
    made = []  # the PCG64 kernel ran (the host draw would give the same bits)
    real = nb._pcg64_dropout_kernel
    monkeypatch.setattr(nb, "_pcg64_dropout_kernel", lambda sc: made.append(sc) or real(sc))
    x = randn(np.random.default_rng(3), shape, dtype)
    gen, want = np.random.default_rng(7), np.random.default_rng(7)
    if buffered:
        gen.random(1, dtype=np.float32), want.random(1, dtype=np.float32)
    y, mask = nb.dropout_forward(x, 0.3, gen)
    y_ref, mask_ref = ref.dropout_forward(x, 0.3, want)
    assert made == [np.dtype(dtype).type]
    assert host(y).shape == host(mask).shape == np.shape(x)
    np.testing.assert_array_equal(host(mask), mask_ref)
    np.testing.assert_array_equal(host(y), y_ref)
    assert gen.bit_generator.state == want.bit_generator.state
    # another bit generator: numpy's draw on the host, copied over
    _, mask = nb.dropout_forward(x, 0.3, np.random.Generator(np.random.SFC64(2)))
    _, mask_ref = ref.dropout_forward(x, 0.3, np.random.Generator(np.random.SFC64(2)))
    np.testing.assert_array_equal(host(mask), mask_ref)
    dy = randn(np.random.default_rng(4), x.shape, dtype)
    np.testing.assert_array_equal(host(nb.dropout_backward(dy, mask)),
                                  ref.dropout_backward(dy, mask_ref))
    for kwargs in ({"rate": 0.0}, {"rate": 0.5, "training": False}):
        same, none = nb.dropout_forward(x, rng=np.random.default_rng(0), **kwargs)
        assert none is None and same is x
    assert nb.dropout_backward(dy, None) is dy


# --------------------------------------------------------------------------------------
# GEMM and reductions (split-K / split-rows paths forced)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 2, 3])
def test_gemm_split_k(dtype, splits):
    rng = np.random.default_rng(10 + splits)
    a = randn(rng, (5, 27), dtype)
    b = randn(rng, (27, 6), dtype)
    bias = randn(rng, (6,), dtype)
    out = nb._gemm(nb.load_plain, nb.asarray(a), nb.load_plain, nb.asarray(b), 5, 6, 27,
                   bias=nb.asarray(bias), splits=splits)
    assert_close(out, a @ b + bias, dtype, f"gemm splits={splits}")
    out = nb._gemm(nb.load_transposed, nb.asarray(a.T.copy()), nb.load_transposed,
                   nb.asarray(b.T.copy()), 5, 6, 27, splits=splits)
    assert_close(out, a @ b, dtype, f"gemm transposed loaders, splits={splits}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 2, 5])
def test_channel_reductions(dtype, splits):
    rng = np.random.default_rng(20 + splits)
    a = randn(rng, (23, 3), dtype)
    b = randn(rng, (23, 3), dtype)
    mu = randn(rng, (3,), dtype)
    scale = randn(rng, (3,), dtype)
    d = nb.asarray
    assert_close(nb._reduce(nb.term_sum, d(a), post=0.5, splits=splits), a.sum(0) * 0.5, dtype,
                 "sum")
    assert_close(nb._reduce(nb.term_sqdev, d(a), mu=d(mu), splits=splits),
                 ((a - mu) ** 2).sum(0), dtype, "sqdev")
    assert_close(nb._reduce(nb.term_dot_xhat, d(a), b=d(b), mu=d(mu), scale=d(scale),
                            splits=splits), (b * (a - mu) * scale).sum(0), dtype, "dot_xhat")


# --------------------------------------------------------------------------------------
# dense
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(3))
def test_dense(dtype, case):
    rng = np.random.default_rng(30 + case)
    n, k, m = rng.integers(1, 4), rng.integers(1, 12), rng.integers(1, 7)
    x, w, b = randn(rng, (n, k), dtype), randn(rng, (k, m), dtype), randn(rng, (m,), dtype)
    bias = None if case == 1 else b
    assert_close(nb.dense_forward(x, w, bias), ref.dense_forward(x, w, bias), dtype,
                 "dense_forward")
    dy = randn(rng, (n, m), dtype)
    need_dx, need_dw, need_db = [(True, True, True), (False, True, False),
                                 (True, False, True)][case]
    got = nb.dense_backward(dy, x, w, need_dx=need_dx, need_dw=need_dw, need_db=need_db)
    want = ref.dense_backward(dy, x, w, need_dx=need_dx, need_dw=need_dw, need_db=need_db)
    for g, r, nm in zip(got, want, ("dx", "dw", "db"), strict=True):
        if r is None:
            assert g is None, nm
        else:
            assert_close(g, r, dtype, f"dense_backward {nm}")


# --------------------------------------------------------------------------------------
# conv2d and transposed conv2d on random geometries
# --------------------------------------------------------------------------------------

def _padding(rng):
    return [lambda: "same", lambda: "valid", lambda: int(rng.integers(0, 3))][rng.integers(3)]()


def _conv_case(seed: int):
    """Random conv geometry with a small implicit-GEMM size (simulator time)."""
    rng = np.random.default_rng(seed)
    while True:
        n = int(rng.integers(1, 3))
        h, w = (int(v) for v in rng.integers(1, 7, size=2))
        kh, kw = (int(v) for v in rng.integers(1, 6, size=2))
        stride = tuple(int(v) for v in rng.integers(1, 4, size=2))
        padding = _padding(rng)
        ci, co = (int(v) for v in rng.integers(1, 5, size=2))
        try:
            ho, wo, _ = ref.conv_geometry(h, w, kh, kw, stride, padding)
        except ValueError:
            continue
        if n * ho * wo * kh * kw * ci <= 600 and n * h * w <= 48:
            return rng, (n, h, w, ci), (kh, kw, ci, co), stride, padding


def _transpose_case(seed: int):
    rng = np.random.default_rng(seed)
    while True:
        n = int(rng.integers(1, 3))
        h, w = (int(v) for v in rng.integers(1, 5, size=2))
        kh, kw = (int(v) for v in rng.integers(1, 6, size=2))
        stride = tuple(int(v) for v in rng.integers(1, 4, size=2))
        padding = _padding(rng)
        output_padding = None
        if rng.random() < 0.5:
            output_padding = tuple(int(rng.integers(0, s)) for s in stride)
        ci, co = (int(v) for v in rng.integers(1, 5, size=2))
        try:
            ho, wo, _ = ref.conv_transpose_geometry(h, w, kh, kw, stride, padding, output_padding)
        except ValueError:
            continue
        if n * h * w * kh * kw * co <= 600 and n * ho * wo <= 72:
            return (rng, (n, h, w, ci), (kh, kw, co, ci), stride, padding, output_padding)


def _need(rng):
    return [(True, True), (True, True), (False, True), (True, False)][rng.integers(4)]


def _check_grads(got, want, dtype, what):
    for g, r, nm in zip(got, want, ("dx", "dw", "db"), strict=True):
        if r is None:
            assert g is None, f"{what} {nm}"
        else:
            assert_close(g, r, dtype, f"{what} {nm}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(12))
def test_conv2d(dtype, seed):
    rng, x_shape, w_shape, stride, padding = _conv_case(100 + seed)
    x, w = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype)
    b = randn(rng, w_shape[-1:], dtype) if seed % 3 else None
    what = f"conv2d x{x_shape} w{w_shape} s{stride} p={padding!r}"
    y = ref.conv2d_forward(x, w, b, stride, padding)
    assert_close(nb.conv2d_forward(x, w, b, stride, padding), y, dtype, what)
    dy = randn(rng, y.shape, dtype)
    need_dx, need_dw = _need(rng)
    db = b is not None  # as the layer asks: no bias, no bias gradient
    _check_grads(nb.conv2d_backward(dy, x, w, stride, padding, need_dx, need_dw, need_db=db),
                 ref.conv2d_backward(dy, x, w, stride, padding, need_dx, need_dw, need_db=db),
                 dtype, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(12))
def test_conv2d_transpose(dtype, seed):
    rng, x_shape, w_shape, stride, padding, op = _transpose_case(200 + seed)
    x, w = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype)
    b = randn(rng, w_shape[2:3], dtype) if seed % 3 else None
    what = f"conv2d_transpose x{x_shape} w{w_shape} s{stride} p={padding!r} op={op}"
    y = ref.conv2d_transpose_forward(x, w, b, stride, padding, op)
    assert_close(nb.conv2d_transpose_forward(x, w, b, stride, padding, op), y, dtype, what)
    dy = randn(rng, y.shape, dtype)
    need_dx, need_dw = _need(rng)
    db = b is not None
    _check_grads(nb.conv2d_transpose_backward(dy, x, w, stride, padding, op, need_dx, need_dw,
                                              need_db=db),
                 ref.conv2d_transpose_backward(dy, x, w, stride, padding, op, need_dx, need_dw,
                                               need_db=db),
                 dtype, what)


def test_conv2d_dcgan_geometry():
    """The DCGAN's own case (5x5, stride 2, 'same', output_padding None) at a tiny size."""
    dtype = np.float32
    rng = np.random.default_rng(5)
    x, w = randn(rng, (1, 4, 4, 2), dtype), randn(rng, (5, 5, 3, 2), dtype)
    y = ref.conv2d_transpose_forward(x, w, None, 2, "same")
    assert_close(nb.conv2d_transpose_forward(x, w, None, 2, "same"), y, dtype, "convT")
    dy = randn(rng, y.shape, dtype)
    _check_grads(nb.conv2d_transpose_backward(dy, x, w, 2, "same"),
                 ref.conv2d_transpose_backward(dy, x, w, 2, "same"), dtype, "convT")


# --------------------------------------------------------------------------------------
# batch normalization
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 2, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm(dtype, shape, training):
    rng = np.random.default_rng(40)
    c = shape[-1]
    x = randn(rng, shape, dtype) * 2 + 0.5
    gamma, beta = randn(rng, (c,), dtype), randn(rng, (c,), dtype)
    mm, mv = randn(rng, (c,), dtype), (rng.random(c) + 0.5).astype(dtype)
    mm_ref, mv_ref = mm.copy(), mv.copy()
    mm_nb, mv_nb = nb.asarray(mm.copy()), nb.asarray(mv.copy())
    y, mean, inv_std = nb.batchnorm_forward(x, gamma, beta, mm_nb, mv_nb, 0.9, 1e-3, training)
    y_r, mean_r, inv_std_r = ref.batchnorm_forward(x, gamma, beta, mm_ref, mv_ref, 0.9, 1e-3,
                                                   training)
    assert_close(y, y_r, dtype, "y")
    assert_close(mean, mean_r, dtype, "mean")
    assert_close(inv_std, inv_std_r, dtype, "inv_std")
    assert_close(mm_nb, mm_ref, dtype, "moving_mean (in place)")
    assert_close(mv_nb, mv_ref, dtype, "moving_variance (in place)")
    if not training:
        np.testing.assert_array_equal(host(mm_nb), mm)
        np.testing.assert_array_equal(host(mv_nb), mv)
    dy = randn(rng, shape, dtype)
    got = nb.batchnorm_backward(dy, x, gamma, mean, inv_std, training)
    want = ref.batchnorm_backward(dy, x, gamma, mean_r, inv_std_r, training)
    for g, r, nm in zip(got, want, ("dx", "dgamma", "dbeta"), strict=True):
        assert_close(g, r, dtype, f"batchnorm_backward {nm}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_leaky_relu_ops_match_numpy(dtype):
    """``leaky_alpha=``: the forwards return LeakyReLU(op), the batch norm's backward folds
    the LeakyReLU's in (this backend composes its kernels; cupy_ops fuses them)."""
    rng = np.random.default_rng(41)
    x, w, b = randn(rng, (3, 5), dtype), randn(rng, (5, 4), dtype), randn(rng, (4,), dtype)
    assert_close(nb.dense_forward(x, w, b, leaky_alpha=0.2),
                 ref.dense_forward(x, w, b, leaky_alpha=0.2), dtype, "dense")
    x, w = randn(rng, (1, 5, 4, 2), dtype), randn(rng, (3, 3, 2, 3), dtype)
    assert_close(nb.conv2d_forward(x, w, b[:3], 2, "same", leaky_alpha=0.2),
                 ref.conv2d_forward(x, w, b[:3], 2, "same", leaky_alpha=0.2), dtype, "conv")
    wt = randn(rng, (3, 3, 3, 2), dtype)
    assert_close(nb.conv2d_transpose_forward(x, wt, None, 2, "same", leaky_alpha=0.2),
                 ref.conv2d_transpose_forward(x, wt, None, 2, "same", leaky_alpha=0.2), dtype,
                 "convT")
    x, dz = randn(rng, (4, 3), dtype), randn(rng, (4, 3), dtype)
    gamma, beta = randn(rng, (3,), dtype), randn(rng, (3,), dtype) * 0.3
    for training in (True, False):
        mm, mv = np.zeros(3, dtype), np.ones(3, dtype)
        z, mean, inv_std = nb.batchnorm_forward(x, gamma, beta, nb.asarray(mm.copy()),
                                                nb.asarray(mv.copy()), 0.9, 1e-3, training,
                                                leaky_alpha=0.2)
        z_r, mean_r, inv_r = ref.batchnorm_forward(x, gamma, beta, mm, mv, 0.9, 1e-3, training,
                                                   leaky_alpha=0.2)
        assert_close(z, z_r, dtype, "bn forward")
        got = nb.batchnorm_backward(dz, x, gamma, mean, inv_std, training, leaky_alpha=0.2,
                                    beta=beta)
        want = ref.batchnorm_backward(dz, x, gamma, mean_r, inv_r, training, leaky_alpha=0.2,
                                      beta=beta)
        for g, r, nm in zip(got, want, ("dx", "dgamma", "dbeta"), strict=True):
            assert_close(g, r, dtype, f"bn backward {nm} training={training}")


# --------------------------------------------------------------------------------------
# a DCGAN-shaped training step, tiny channel counts, against the NumPy backend
# --------------------------------------------------------------------------------------

def _tiny_dcgan(backend, noise_dim=8):
    g = Sequential([
        Dense(3 * 3 * 4, use_bias=False), BatchNormalization(), LeakyReLU(),
        Reshape((3, 3, 4)),
        Conv2DTranspose(4, 5, strides=1, padding="same", use_bias=False),
        BatchNormalization(), LeakyReLU(),
        Conv2DTranspose(2, 5, strides=2, padding="same", use_bias=False),
        BatchNormalization(), LeakyReLU(),
        Conv2DTranspose(1, 5, strides=2, padding="same", use_bias=False), Tanh(),
    ], name="generator", seed=0, backend=backend)._built((None, noise_dim), np.float32)
    d = Sequential([
        Conv2D(2, 5, strides=2, padding="same"), LeakyReLU(), Dropout(0.3),
        Conv2D(4, 5, strides=2, padding="same"), LeakyReLU(), Dropout(0.3),
        Flatten(), Dense(1),
    ], name="discriminator", seed=1, backend=backend)._built((None, 12, 12, 1), np.float32)
    return g, d


def _train(backend, steps=2, batch=2, noise_dim=8):
    ops = backends.get(backend)
    g, d = _tiny_dcgan(backend, noise_dim)
    opt_g, opt_d = optim.Adam(g, lr=1e-3), optim.Adam(d, lr=1e-3)
    data_rng = np.random.default_rng(123)
    noise = gan.gaussian_noise(np.random.default_rng(456), noise_dim, ops)
    history = []
    for _ in range(steps):
        real = ops.asarray(data_rng.uniform(-1, 1, (batch, 12, 12, 1)).astype(np.float32))
        stats = gan.train_step(g, d, opt_g, opt_d, "bce", [real], noise)
        history.append((stats.d_loss, stats.g_loss))
    sample = ops.to_numpy(g.forward(ops.asarray(np.ones((1, noise_dim), np.float32)),
                                    training=False))
    return np.array(history), sample


def test_dcgan_step_tracks_numpy():
    hist_np, sample_np = _train("numpy")
    hist_nb, sample_nb = _train("numba")
    assert np.all(np.isfinite(hist_nb))
    np.testing.assert_allclose(hist_nb, hist_np, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sample_nb, sample_np, rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------------------
# real GPU only
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.gpu
@requires_gpu
def test_gpu_dcgan_sized_layers(dtype):
    """The DCGAN's real layer sizes (batch 8): CuPy arrays in, CuPy arrays out, 16x16 tiles."""
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(50)
    x = randn(rng, (8, 14, 14, 64), dtype)
    w = randn(rng, (5, 5, 64, 128), dtype) * 0.05
    b = randn(rng, (128,), dtype)
    y = nb.conv2d_forward(cupy.asarray(x), cupy.asarray(w), cupy.asarray(b), 2, "same")
    assert isinstance(y, cupy.ndarray)
    y_ref = ref.conv2d_forward(x, w, b, 2, "same")
    assert_close(y, y_ref, dtype, "conv2d 14x14x64 -> 7x7x128")
    dy = randn(rng, y_ref.shape, dtype)
    _check_grads(nb.conv2d_backward(cupy.asarray(dy), cupy.asarray(x), cupy.asarray(w), 2,
                                    "same"),
                 ref.conv2d_backward(dy, x, w, 2, "same"), dtype, "conv2d backward")
    wt = randn(rng, (5, 5, 64, 128), dtype) * 0.05
    xt = randn(rng, (8, 7, 7, 128), dtype)
    yt = ref.conv2d_transpose_forward(xt, wt, None, 2, "same")
    assert_close(nb.conv2d_transpose_forward(cupy.asarray(xt), cupy.asarray(wt), None, 2,
                                             "same"), yt, dtype, "convT 7x7x128 -> 14x14x64")
    dyt = randn(rng, yt.shape, dtype)
    _check_grads(nb.conv2d_transpose_backward(cupy.asarray(dyt), cupy.asarray(xt),
                                              cupy.asarray(wt), 2, "same"),
                 ref.conv2d_transpose_backward(dyt, xt, wt, 2, "same"), dtype, "convT backward")
    xb = randn(rng, (8, 14, 14, 64), dtype)
    assert_close(nb.batchnorm_forward(xb, *[cupy.ones(64, dtype)] * 2,
                                      cupy.zeros(64, dtype), cupy.ones(64, dtype))[0],
                 ref.batchnorm_forward(xb, *[np.ones(64, dtype)] * 2, np.zeros(64, dtype),
                                       np.ones(64, dtype))[0], dtype, "batchnorm 8x14x14x64")


@pytest.mark.gpu
@requires_gpu
def test_gpu_accepts_numba_device_arrays():
    from numba import cuda

    rng = np.random.default_rng(60)
    x, w = randn(rng, (64, 300), np.float32), randn(rng, (300, 40), np.float32)
    y = nb.dense_forward(cuda.to_device(x), cuda.to_device(w), None)
    assert_close(y, x @ w, np.float32, "dense on numba device arrays")


def test_model_moved_to_numba_matches_numpy():
    """``model.to("numba")`` moves the parameters; the forward pass then runs the kernels."""
    rng = np.random.default_rng(70)
    model = Sequential([Conv2D(2, 3, strides=2, padding="same"), LeakyReLU(0.2), Flatten(),
                        Dense(3), Tanh()], seed=3)._built((None, 5, 5, 2), np.float32)
    x = randn(rng, (2, 5, 5, 2), np.float32)
    y_np = model.forward(x, training=False)
    model.to("numba")
    assert model.ops is nb
    assert_close(model.forward(nb.asarray(x), training=False), y_np, np.float32, "model")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [None, 0.05])
def test_optimizer_updates_match_numpy(dtype, clip):
    """adam_update, sgd_update (plain, momentum, Nesterov) and rmsprop_update: every tensor
    of the list updated in place as numpy_ops does, slots included (one launch per tensor)."""
    rng = np.random.default_rng(5)
    shapes = [(3, 4), (7,), (2, 3, 2)]

    def tensors(scale=1.0, positive=False):
        out = [randn(rng, s, dtype) * scale for s in shapes]
        return [np.abs(a) for a in out] if positive else out

    params, grads = tensors(0.1), tensors(1e-2)
    cases = [
        ("adam_update", [tensors(1e-2), tensors(1e-4, positive=True)],
         (1e-3, 0.9, 0.999, 1e-7, clip)),
        ("sgd_update", [None], (0.05, 0.0, False, clip)),
        ("sgd_update", [tensors(1e-2)], (0.05, 0.9, False, clip)),
        ("sgd_update", [tensors(1e-2)], (0.05, 0.9, True, clip)),
        ("rmsprop_update", [tensors(1e-4, positive=True)], (5e-3, 0.9, 1e-7, clip)),
    ]
    for name, slots, args in cases:
        want = [[a.copy() for a in t] if t is not None else None for t in (params, *slots)]
        getattr(ref, name)(want[0], grads, *want[1:], *args)
        got = [[nb.asarray(a.copy()) for a in t] if t is not None else None
               for t in (params, *slots)]
        getattr(nb, name)(got[0], [nb.asarray(g) for g in grads], *got[1:], *args)
        for w_list, g_list in zip(want, got, strict=True):
            for w, g in zip(w_list or [], g_list or [], strict=True):
                np.testing.assert_allclose(nb.to_numpy(g), w, rtol=TOL[np.dtype(dtype)],
                                           atol=TOL[np.dtype(dtype)] * 1e-2, err_msg=name)
            if name == "rmsprop_update":  # 1 - rho rounded as numpy_ops does: the same bits
                for w, g in zip(w_list or [], g_list or [], strict=True):
                    np.testing.assert_array_equal(nb.to_numpy(g), w, err_msg=name)
        if clip is not None:
            assert all(np.abs(nb.to_numpy(p)).max() <= clip for p in got[0])


def test_optimizers_take_the_numba_kernels():
    """optim.Adam on a numba-backend model calls numba_ops.adam_update (not the per-tensor
    array-arithmetic fallback)."""
    G = Sequential([Dense(3)], seed=0, input_shape=(2,), backend=nb)
    opt = optim.Adam(G, lr=1e-3)
    G.zero_grad()
    G.forward(nb.asarray(np.ones((4, 2), np.float32)))
    G.backward(nb.asarray(np.ones((4, 3), np.float32)))
    calls = []
    real = nb.adam_update
    try:
        nb.adam_update = lambda *a, **kw: (calls.append(1), real(*a, **kw))
        opt.step()
    finally:
        nb.adam_update = real
    assert calls == [1]


def test_numba_ops_has_every_numpy_op_with_the_same_parameters():
    """The seam (DESIGN.md): every public op of the reference, same parameters, defaults."""
    import inspect

    def public(module):
        return {n: inspect.signature(f) for n, f in inspect.getmembers(module, inspect.isfunction)
                if not n.startswith("_") and f.__module__ == module.__name__}

    for op, sig in public(ref).items():
        assert hasattr(nb, op), f"numba_ops lacks {op}"
        want = [(p.name, p.kind, p.default) for p in sig.parameters.values()]
        got = [(p.name, p.kind, p.default)
               for p in inspect.signature(getattr(nb, op)).parameters.values()]
        assert got == want, f"{op}: {got} != {want}"
