"""LeakyReLU fusion: a layer computes the LeakyReLU that follows it in its own kernels.

``Sequential`` hands ``leaky_alpha`` to a Dense / Conv2D / Conv2DTranspose /
BatchNormalization followed by a LeakyReLU (``fuses_leaky_relu``), and BatchNormalization
also folds that LeakyReLU's backward into its own (``folds_leaky_relu_backward``). The claims
tested here: a fused model is BITWISE the unfused one (NumPy, and the CUDA kernels on the CPU
emulator of test_kernels_compile.py), the fused batch-norm backward matches finite
differences in float64, and the fused kernels match the NumPy reference within the usual
tolerance. The GPU run of the same kernels is in test_cupy_ops.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_kernels_compile import close, emu, emu_cache, needs_gxx, rand  # noqa: F401

from rawgan import models
from rawgan.backends import cupy_ops, winograd
from rawgan.backends import numpy_ops as ref
from rawgan.gradcheck import numerical_gradient
from rawgan.nn import BatchNormalization, Dense, Dropout, LeakyReLU, Sequential, Tanh

ALPHA = 0.3


def _fwd_bwd(G, D, ops, z, fuse: bool, training: bool = True):
    """G and D forward on z, backward from a fixed dL/dlogit; every output and gradient."""
    G.fuse = D.fuse = fuse
    G.zero_grad()
    D.zero_grad()
    img = G.forward(z, training=training)
    logit = D.forward(img, training=training)
    dlogit = ops.asarray(np.linspace(-1, 1, logit.size).reshape(logit.shape).astype(logit.dtype))
    dimg = D.backward(dlogit)
    G.backward(dimg, input_grad=False)
    out = {"img": img, "logit": logit, "dimg": dimg}
    for tag, m in (("G", G), ("D", D)):
        out.update({f"{tag}/{k}": v for k, v in m.weights().items()})
        out.update({f"{tag}/d{k}": g for k, _, g in m.parameters()})
    return {k: np.array(ops.to_numpy(v), copy=True) for k, v in out.items()}


def _run(name, ops, dtype, fuse, training=True, batch=3):
    G, D = models.build(name, seed=7, backend=ops, dtype=dtype)
    z = ops.asarray(np.random.default_rng(8).standard_normal((batch, 100)).astype(dtype))
    return _fwd_bwd(G, D, ops, z, fuse, training)


def _assert_bitwise(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    differ = [k for k in want if got[k].tobytes() != want[k].tobytes()]
    assert not differ, f"fused != unfused: {differ}"


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["dcgan", "mlp"])
def test_fused_models_are_bitwise_the_unfused_ones(name, dtype, training):
    """Outputs, input gradient, every parameter gradient and the moving statistics."""
    _assert_bitwise(_run(name, ref, dtype, True, training), _run(name, ref, dtype, False,
                                                                  training))


def test_sequential_fuses_every_leaky_relu_after_a_fusable_layer(monkeypatch):
    """The DCGAN's five LeakyReLUs (three after a batch norm, two after a Conv2D) and the MLP
    GAN's two (after a Dense) never launch their own forward; nothing else is fused."""
    calls = []
    orig = LeakyReLU._forward
    monkeypatch.setattr(LeakyReLU, "_forward",
                        lambda self, x, training: calls.append(self.name) or orig(self, x,
                                                                                  training))
    for name, count in (("dcgan", 5), ("mlp", 2)):
        G, D = models.build(name, seed=0)
        z = np.random.default_rng(0).standard_normal((2, 100)).astype(np.float32)
        D.forward(G.forward(z))
        assert calls == []
        G.fuse = D.fuse = False
        D.forward(G.forward(z))
        assert len(calls) == count
        calls.clear()
    # a LeakyReLU after a layer that cannot fuse it (here Dropout) runs on its own
    m = Sequential([Dense(4), Dropout(0.5), LeakyReLU(), Tanh(), LeakyReLU()], seed=0)
    m.forward(np.ones((2, 3), np.float32))
    assert len(calls) == 2


def test_fused_leaky_after_dense_backward_uses_its_output(monkeypatch):
    """The pre-activation is not kept: the LeakyReLU's backward tests the fused output
    (z > 0 exactly when the pre-activation is > 0, for alpha >= 0), and a batch norm's
    LeakyReLU passes the gradient through for the batch norm to apply the slope."""
    m = Sequential([Dense(5), LeakyReLU(0.0), BatchNormalization(), LeakyReLU(0.2)], seed=1)
    x = np.random.default_rng(2).standard_normal((6, 3))
    y = m.forward(x)
    assert m[1]._cache["x"] is not None and not m[1]._cache["folded"]
    assert m[3]._cache["x"] is None and m[3]._cache["folded"]
    dy = np.random.default_rng(3).standard_normal(y.shape)
    assert m[3].backward(dy) is dy
    dx = m.backward(dy)
    m.fuse = False
    for layer in m:
        layer.zero_grad()
    np.testing.assert_array_equal(m.forward(x), y)
    np.testing.assert_array_equal(m.backward(dy), dx)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_fused_batchnorm_backward_matches_finite_differences(seed, training):
    """L = sum(r * leaky(bn(x))): dL/dx, dL/dgamma, dL/dbeta from batchnorm_backward with the
    LeakyReLU folded in against central differences in float64, over random shapes."""
    rng = np.random.default_rng(seed)
    shape = [(int(rng.integers(3, 7)), int(rng.integers(1, 5))),
             (2, int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 4)))][
        seed % 2]
    c = shape[-1]
    x = rng.standard_normal(shape)
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c) * 0.3
    mm, mv = rng.standard_normal(c), rng.random(c) + 0.5
    r = rng.standard_normal(shape)
    alpha = float(rng.uniform(0.05, 0.5))

    def loss() -> float:
        z, _, _ = ref.batchnorm_forward(x, gamma, beta, mm.copy(), mv.copy(), 0.9, 1e-3,
                                        training, leaky_alpha=alpha)
        return float(np.sum(r * z))

    _, mean, inv_std = ref.batchnorm_forward(x, gamma, beta, mm.copy(), mv.copy(), 0.9, 1e-3,
                                             training)
    dx, dgamma, dbeta = ref.batchnorm_backward(r, x, gamma, mean, inv_std, training,
                                               leaky_alpha=alpha, beta=beta)
    for got, arr, what in ((dx, x, "dx"), (dgamma, gamma, "dgamma"), (dbeta, beta, "dbeta")):
        want = numerical_gradient(loss, arr)
        err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12)
        assert err < 1e-6, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_fused_forwards_are_the_two_ops_in_a_row(dtype):
    rng = np.random.default_rng(4)
    x, w, b = rand(rng, (5, 7), dtype), rand(rng, (7, 6), dtype), rand(rng, (6,), dtype)
    np.testing.assert_array_equal(ref.dense_forward(x, w, b, leaky_alpha=0.2),
                                  ref.leaky_relu_forward(ref.dense_forward(x, w, b), 0.2))
    x, w = rand(rng, (2, 6, 5, 3), dtype), rand(rng, (3, 3, 3, 4), dtype)
    np.testing.assert_array_equal(
        ref.conv2d_forward(x, w, None, 2, "same", leaky_alpha=0.1),
        ref.leaky_relu_forward(ref.conv2d_forward(x, w, None, 2, "same"), 0.1))
    wt = rand(rng, (5, 5, 2, 3), dtype)
    np.testing.assert_array_equal(
        ref.conv2d_transpose_forward(x, wt, None, 2, "same", leaky_alpha=0.3),
        ref.leaky_relu_forward(ref.conv2d_transpose_forward(x, wt, None, 2, "same"), 0.3))


def test_fusion_rejects_bad_requests():
    x = np.ones((4, 3))
    g, mean, inv_std = np.ones(3), np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="without beta"):
        ref.batchnorm_backward(x, x, g, mean, inv_std, True, leaky_alpha=0.3)
    with pytest.raises(ValueError, match="leaky_alpha must be >= 0"):
        ref.batchnorm_backward(x, x, g, mean, inv_std, True, leaky_alpha=-1.0, beta=g)
    with pytest.raises(TypeError, match="cannot fuse a LeakyReLU"):
        Tanh().forward(x, leaky_alpha=0.3)


def test_recorder_sees_every_layer_of_a_fused_model():
    """rawgan.inspect records each layer's own activation: fusion is off while it records
    and back on afterwards."""
    from rawgan.inspect import Recorder

    G, _ = models.build("dcgan", seed=0)
    z = np.random.default_rng(0).standard_normal((2, 100)).astype(np.float32)
    with Recorder({"G": G}) as rec:
        assert G.fuse is False
        G.forward(z)
    assert G.fuse is True
    recorded = {path[1] for path in rec.tables if path[-1] == "activation"}
    assert {layer.name for layer in G.layers} <= recorded


# -- the CUDA kernels on the CPU emulator --------------------------------------------------

@needs_gxx
@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_emulated_fused_epilogues_are_bitwise_the_separate_kernels(emu, monkeypatch, dtype,  # noqa: F811
                                                                   tf32):
    """gemm_nn / conv_fwd / conv_dgrad with the LeakyReLU in the epilogue (every tile), and
    the batch norm's fused apply and folded backward (training and inference), give the
    bits of the separate kernels; and they match the NumPy reference."""
    if tf32 and dtype == np.float64:
        pytest.skip("TF32 is a float32 path")
    monkeypatch.setattr(cupy_ops, "TF32", tf32)
    monkeypatch.setattr(winograd, "ENABLED", False)
    rng = np.random.default_rng(11)
    E, lk = emu.asarray, cupy_ops.leaky_relu_forward
    tiles = ("L", "M", "S", "T") if not tf32 else ("L", "M", "S")
    for tile in tiles:
        monkeypatch.setattr(cupy_ops, "FORCE_TILE", tile)
        x, w, b = (rand(rng, s, dtype) for s in ((19, 23), (23, 21), (21,)))
        fused = cupy_ops.dense_forward(E(x), E(w), E(b), leaky_alpha=ALPHA)
        assert np.asarray(fused).tobytes() == np.asarray(
            lk(cupy_ops.dense_forward(E(x), E(w), E(b)), ALPHA)).tobytes(), f"dense {tile}"
        if not tf32:
            close(fused, ref.dense_forward(x, w, b, leaky_alpha=ALPHA), dtype, "dense")
        x, w = rand(rng, (2, 7, 6, 3), dtype), rand(rng, (3, 3, 3, 5), dtype)
        fused = cupy_ops.conv2d_forward(E(x), E(w), E(b[:5]), 2, "same", leaky_alpha=ALPHA)
        assert np.asarray(fused).tobytes() == np.asarray(
            lk(cupy_ops.conv2d_forward(E(x), E(w), E(b[:5]), 2, "same"), ALPHA)).tobytes()
        wt = rand(rng, (5, 5, 4, 3), dtype)
        fused_t = cupy_ops.conv2d_transpose_forward(E(x), E(wt), E(b[:4]), 2, "same",
                                                    leaky_alpha=ALPHA)
        assert np.asarray(fused_t).tobytes() == np.asarray(
            lk(cupy_ops.conv2d_transpose_forward(E(x), E(wt), E(b[:4]), 2, "same"),
               ALPHA)).tobytes(), f"convT {tile}"
        if not tf32:
            close(fused, ref.conv2d_forward(x, w, b[:5], 2, "same", leaky_alpha=ALPHA), dtype,
                  "conv")
            close(fused_t, ref.conv2d_transpose_forward(x, wt, b[:4], 2, "same",
                                                        leaky_alpha=ALPHA), dtype, "convT")
    for training in (True, False):
        x, dz = rand(rng, (3, 4, 5, 6), dtype), rand(rng, (3, 4, 5, 6), dtype)
        gamma, beta = rand(rng, (6,), dtype), rand(rng, (6,), dtype) * 0.3
        stats = (rand(rng, (6,), dtype), (rng.random(6) + 0.5).astype(dtype))

        def bn(fuse, args=(x, gamma, beta), stats=stats, training=training):
            mm, mv = (E(s.copy()) for s in stats)
            return cupy_ops.batchnorm_forward(*map(E, args), mm, mv, 0.9, 1e-3, training,
                                              leaky_alpha=ALPHA if fuse else None)

        z, mean, inv_std = bn(True)
        y, mean0, inv_std0 = bn(False)
        assert np.asarray(z).tobytes() == np.asarray(lk(y, ALPHA)).tobytes()
        got = cupy_ops.batchnorm_backward(E(dz), E(x), E(gamma), mean, inv_std, training,
                                          leaky_alpha=ALPHA, beta=E(beta))
        dy = cupy_ops.leaky_relu_backward(E(dz), y, ALPHA)
        want = cupy_ops.batchnorm_backward(dy, E(x), E(gamma), mean0, inv_std0, training)
        for g, wnt, what in zip(got, want, ("dx", "dgamma", "dbeta"), strict=True):
            assert np.asarray(g).tobytes() == np.asarray(wnt).tobytes(), (what, training)
        mm, mv = (s.copy() for s in stats)
        _, mean_r, inv_r = ref.batchnorm_forward(x, gamma, beta, mm, mv, 0.9, 1e-3, training)
        want_r = ref.batchnorm_backward(dz, x, gamma, mean_r, inv_r, training,
                                        leaky_alpha=ALPHA, beta=beta)
        for g, wnt, what in zip(got, want_r, ("dx", "dgamma", "dbeta"), strict=True):
            close(g, wnt, dtype, f"bn {what} training={training}")


@needs_gxx
def test_emulated_fused_dcgan_is_bitwise_the_unfused_one(emu, monkeypatch):  # noqa: F811
    """The whole DCGAN forward and backward on the emulated kernels, fused and not."""
    monkeypatch.setattr(cupy_ops, "TF32", False)
    _assert_bitwise(_run("dcgan", cupy_ops, np.float32, True, batch=2),
                    _run("dcgan", cupy_ops, np.float32, False, batch=2))
