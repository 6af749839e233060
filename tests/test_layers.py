"""Layer behaviour beyond gradients: shapes, Keras conventions, dtypes, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from rawgan import backends, models
from rawgan.backends import numpy_ops as ops
from rawgan.nn import (
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

RNG = np.random.default_rng(0)


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


# -- Keras conventions -------------------------------------------------------------------

def test_dcgan_shapes_match_the_keras_tutorial():
    G, D = models.build("dcgan", seed=0)
    shapes = []
    shape = (None, 100)
    for layer in G:
        shape = layer.compute_output_shape(shape)
        shapes.append(shape)
    assert (None, 7, 7, 256) in shapes and (None, 7, 7, 128) in shapes
    assert (None, 14, 14, 64) in shapes and shapes[-1] == (None, 28, 28, 1)
    assert D.output_shape == (None, 1)
    # parameter counts printed by Keras' summary() for the tutorial's models
    assert G.count_params() == 2_330_944 and D.count_params() == 212_865
    assert G.layers[4].params["kernel"].shape == (5, 5, 128, 256)  # (kh, kw, out, in)
    assert D.layers[0].params["kernel"].shape == (5, 5, 1, 64)  # HWIO


@pytest.mark.parametrize("h,k,s,expected,pads", [
    (28, 5, 2, 14, (1, 2)), (14, 5, 2, 7, (1, 2)), (7, 5, 1, 7, (2, 2)),
    (8, 2, 1, 8, (0, 1)), (5, 4, 3, 2, (1, 1)), (6, 4, 3, 2, (0, 1)), (6, 1, 3, 2, (0, 0)),
])
def test_same_padding_follows_tensorflow(h, k, s, expected, pads):
    ho, _, (ph, _) = ops.conv_geometry(h, h, k, k, s, "same")
    assert ho == expected == -(-h // s)
    assert ph == pads


@pytest.mark.parametrize("h,k,s,padding,op,expected", [
    (7, 5, 2, "same", None, 14), (14, 5, 2, "same", None, 28), (7, 5, 1, "same", None, 7),
    (7, 5, 2, "valid", None, 17), (7, 2, 3, "valid", None, 21), (7, 5, 2, "same", 0, 13),
    (7, 5, 2, "same", 1, 14), (7, 4, 2, "same", 1, 13), (7, 3, 2, 1, 1, 14), (7, 3, 2, 0, None, 15),
])
def test_transposed_output_size_follows_keras(h, k, s, padding, op, expected):
    layer = Conv2DTranspose(2, k, s, padding, output_padding=op)
    assert layer.compute_output_shape((None, h, h, 3)) == (None, expected, expected, 2)


@pytest.mark.parametrize("k,s,pad,op", [
    (5, 2, "same", None), (3, 1, "valid", None), (4, 3, 1, (1, 0)), (2, 2, "same", None),
    (3, 2, "valid", (0, 1)), (5, 3, "same", (2, 1)),
])
def test_transposed_conv_is_the_adjoint_of_conv(k, s, pad, op):
    """<conv(x), y> == <x, conv_T(y)> for the same kernel: one algorithm, two directions."""
    w = rand(k, k, 3, 4, dtype=np.float64)  # conv: 3 -> 4 channels; conv_T: 4 -> 3
    size = (8, 8) if op is None and pad != "valid" else (9, 8)
    x = rand(2, *size, 3, dtype=np.float64)
    y_conv = ops.conv2d_forward(x, w, None, s, pad)
    y = rand(*y_conv.shape, dtype=np.float64)
    x_back = ops.conv2d_transpose_forward(y, w, None, s, pad, output_padding=op)
    assert x_back.shape == x.shape
    assert np.isclose(np.vdot(y_conv, y), np.vdot(x, x_back), rtol=1e-12)


def test_float32_and_float64_agree_and_dtypes_are_preserved():
    G64, _ = models.build("dcgan", seed=3, dtype=np.float64)
    G32, _ = models.build("dcgan", seed=3, dtype=np.float32)
    z = rand(3, 100, dtype=np.float64)
    y64 = G64.forward(z)
    y32 = G32.forward(z.astype(np.float32))
    assert y32.dtype == np.float32 and y64.dtype == np.float64
    assert np.abs(y64 - y32).max() < 1e-4
    dz = G32.backward(np.ones_like(y32))
    assert dz.dtype == np.float32
    assert all(g.dtype == np.float32 for _, _, g in G32.parameters())


def test_gradients_accumulate_until_zero_grad():
    layer = Dense(3)
    x, dy = rand(4, 5), rand(4, 3)
    layer.forward(x)
    layer.backward(dy)
    first = layer.grads["kernel"].copy()
    layer.backward(dy)
    np.testing.assert_allclose(layer.grads["kernel"], 2 * first, rtol=1e-6)
    layer.zero_grad()
    assert not layer.grads["kernel"].any()


def test_backward_flags_skip_work_but_not_results():
    D = models.build("dcgan", seed=1)[1]
    x = rand(2, 28, 28, 1)
    D.forward(x, training=False)
    dx_full = D.backward(np.ones((2, 1), np.float32))
    grads = {n: g.copy() for n, _, g in D.parameters()}
    D.zero_grad()
    dx_only = D.backward(np.ones((2, 1), np.float32), param_grads=False)
    np.testing.assert_allclose(dx_only, dx_full, rtol=1e-6)
    assert all(not g.any() for _, _, g in D.parameters())
    assert D.backward(np.ones((2, 1), np.float32), input_grad=False) is None
    for n, _, g in D.parameters():
        np.testing.assert_allclose(g, grads[n], rtol=1e-6)


def test_batchnorm_running_statistics_and_inference():
    bn = BatchNormalization(momentum=0.9)
    x = rand(64, 3, 3, 2) * 3 + 5
    bn.forward(x, training=True)
    mean, var = x.reshape(-1, 2).mean(0), x.reshape(-1, 2).var(0)
    np.testing.assert_allclose(bn.params["moving_mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(bn.params["moving_variance"], 0.9 + 0.1 * var, rtol=1e-5)
    y = bn.forward(x, training=False)  # uses moving statistics, updates nothing
    expect = (x - bn.params["moving_mean"]) / np.sqrt(bn.params["moving_variance"] + 1e-3)
    np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.params["moving_mean"], 0.1 * mean, rtol=1e-5)


def test_dropout_is_inverted_seeded_and_identity_at_inference():
    x = np.ones((200, 50), np.float32)
    a, b = Dropout(0.3, seed=1), Dropout(0.3, seed=1)
    ya, yb = a.forward(x), b.forward(x)
    np.testing.assert_array_equal(ya, yb)
    assert set(np.unique(ya)) == {0.0, np.float32(1 / 0.7)}
    assert abs((ya == 0).mean() - 0.3) < 0.02
    assert abs(ya.mean() - 1.0) < 0.03
    np.testing.assert_array_equal(a.forward(x, training=False), x)


def test_sequential_names_summary_and_weights_round_trip():
    m = Sequential([Dense(4), LeakyReLU(), Dense(2), Tanh()], seed=0, input_shape=(3,))
    assert [layer.name for layer in m] == ["dense", "leaky_re_lu", "dense_1", "tanh"]
    text = m.summary(print_fn=None)
    assert "dense_1 (Dense)" in text and "Total params: 26" in text
    w = m.get_weights()
    m2 = Sequential([Dense(4), LeakyReLU(), Dense(2), Tanh()], seed=9, input_shape=(3,))
    m2.set_weights(w)
    x = rand(5, 3)
    np.testing.assert_array_equal(m.forward(x), m2.forward(x))


def test_models_are_reproducible_from_the_seed():
    a, b = models.build("dcgan", seed=5)[1], models.build("dcgan", seed=5)[1]
    for (_, pa, _), (_, pb, _) in zip(a.parameters(), b.parameters(), strict=True):
        np.testing.assert_array_equal(pa, pb)
    x = rand(2, 28, 28, 1)
    np.testing.assert_array_equal(a.forward(x), b.forward(x))  # same dropout masks too


def test_glorot_uniform_limits():
    d = Dense(300)
    d.build((None, 200))
    limit = np.sqrt(6 / 500)
    k = d.params["kernel"]
    assert k.max() <= limit and k.min() >= -limit and k.std() > 0.5 * limit / np.sqrt(3)
    assert not d.params["bias"].any()


# -- bad input --------------------------------------------------------------------------------

def test_wrong_rank_names_the_layer_and_shape():
    with pytest.raises(ValueError, match=r"Conv2D.*rank 4.*\(2, 28, 28\)"):
        Conv2D(4, 3).forward(rand(2, 28, 28))
    with pytest.raises(ValueError, match=r"Dense.*rank 2"):
        Dense(4).forward(rand(2, 3, 3))


def test_wrong_channel_count():
    c = Conv2D(4, 3)
    c.forward(rand(1, 5, 5, 3))
    with pytest.raises(ValueError, match="expected 3 input channels"):
        c.forward(rand(1, 5, 5, 2))
    d = Dense(2)
    d.forward(rand(1, 3))
    with pytest.raises(ValueError, match=r"built for inputs of shape \(N, 3\)"):
        d.forward(rand(1, 4))


@pytest.mark.parametrize("dtype", [np.int32, np.float16, np.complex64, bool])
def test_wrong_dtype(dtype):
    with pytest.raises(TypeError, match="float32 or float64"):
        Dense(2).forward(np.ones((2, 3), dtype=dtype))


def test_mixed_dtypes_are_refused():
    d = Dense(2)
    d.forward(rand(2, 3))
    with pytest.raises(TypeError, match="weights are float32 but the input is float64"):
        d.forward(rand(2, 3, dtype=np.float64))


def test_backward_before_forward_and_wrong_dy_shape():
    d = Dense(2)
    d.build((None, 3))
    with pytest.raises(ValueError, match="backward\\(\\) called before forward\\(\\)"):
        d.backward(rand(2, 2))
    d.forward(rand(2, 3))
    with pytest.raises(ValueError, match=r"dy has shape \(2, 3\), expected .*\(2, 2\)"):
        d.backward(rand(2, 3))


@pytest.mark.parametrize("make,match", [
    (lambda: Conv2D(4, 3, padding="full"), "unknown padding 'full'"),
    (lambda: Conv2D(0, 3), "filters must be a positive int"),
    (lambda: Conv2D(4, 0), "kernel_size must be positive"),
    (lambda: Conv2D(4, 3, strides=-1), "strides must be positive"),
    (lambda: Conv2D(4, 3, padding=-1), "non-negative"),
    (lambda: Dense(-3), "units must be a positive int"),
    (lambda: Dropout(1.0), r"rate must be in \[0, 1\)"),
    (lambda: Conv2DTranspose(4, 3, strides=2, output_padding=2), "smaller than strides"),
    (lambda: BatchNormalization(momentum=2), "momentum"),
    (lambda: Reshape((0, 3)), "invalid target shape"),
    (lambda: Conv2DTranspose(4, 3, strides=2, output_padding=1.0), "output_padding must be"),
    (lambda: LeakyReLU("x"), "LeakyReLU: alpha must be >= 0, got 'x'"),
    (lambda: Dropout("x"), r"Dropout: rate must be in \[0, 1\), got 'x'"),
    (lambda: BatchNormalization(epsilon=float("nan")), "BatchNormalization: epsilon"),
])
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_numpy_integers_are_integers():
    """Sizes computed with NumPy (np.int64) are accepted and stored as Python ints."""
    c = Conv2DTranspose(np.int64(4), 3, strides=2, padding=np.int64(1),
                        output_padding=np.int64(1))
    assert (c.filters, c.padding, c.output_padding) == (4, 1, (1, 1))
    assert type(c.filters) is int and type(Dense(np.int32(3)).units) is int
    assert Conv2D(2, 3, padding=(np.int64(0), 1)).padding == (0, 1)


def test_optimizer_arguments_are_checked():
    from rawgan import optim

    m = Sequential([Dense(2)], seed=0, input_shape=(3,))
    for make, match in [(lambda: optim.Adam(m, lr="x"), "Adam: lr must be > 0, got 'x'"),
                        (lambda: optim.Adam(m, epsilon=0.0), "Adam: epsilon must be > 0"),
                        (lambda: optim.RMSprop(m, epsilon=-1.0), "RMSprop: epsilon"),
                        (lambda: optim.SGD(m, momentum=1.0), r"SGD: momentum must be in"),
                        (lambda: optim.Adam(m, lr=float("inf")), "Adam: lr"),
                        (lambda: optim.build(None, m), "unknown optimizer None")]:
        with pytest.raises(ValueError, match=match):
            make()


def test_inputs_that_are_not_batches():
    with pytest.raises(ValueError, match="0-d array"):
        LeakyReLU().forward(np.array(1.0, dtype=np.float32))
    d = Dense(2)
    d.forward(rand(2, 3))
    with pytest.raises(TypeError, match="dy must be an array, got list"):
        d.backward([[1.0, 2.0], [3.0, 4.0]])


def test_kernel_larger_than_valid_input():
    with pytest.raises(ValueError, match=r"kernel \(5, 5\) is larger than the padded input"):
        Conv2D(2, 5, padding="valid").forward(rand(1, 4, 4, 1))


def test_reshape_size_mismatch_and_empty_batch():
    with pytest.raises(ValueError, match="cannot reshape"):
        Reshape((5, 5)).forward(rand(2, 12))
    with pytest.raises(ValueError, match="empty batch"):
        Flatten().forward(rand(0, 3))


def test_batchnorm_needs_two_values_per_channel():
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        BatchNormalization().forward(rand(1, 4))


def test_set_weights_mismatch():
    m = Sequential([Dense(4)], seed=0, input_shape=(3,))
    with pytest.raises(ValueError, match="missing"):
        m.set_weights({})
    with pytest.raises(ValueError, match=r"dense/kernel has shape \(4, 4\)"):
        m.set_weights({"dense/kernel": np.zeros((4, 4)), "dense/bias": np.zeros(4)})


def test_backend_selection():
    assert backends.get("numpy") is ops
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        backends.get("tpu")
    with pytest.warns(UserWarning, match="NumPy"):
        assert backends.get("auto") is ops
    with pytest.raises(backends.BackendUnavailable):
        backends.get("cupy")


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vae'"):
        models.build("vae")


def test_critic_step_with_batchnorm_in_d_runs_each_batch_once():
    """A D with batch norm sees the real batch once and the fake batch once per critic step
    (two moving-statistics updates). That its gradient is the finite-difference one of the
    two-pass loss is tests/test_gan_step.py's check."""
    from rawgan import gan, optim

    G = models.build("mlp", seed=0, dtype=np.float64)[0]
    D = Sequential([Flatten(), Dense(8), BatchNormalization(momentum=0.5), LeakyReLU(),
                    Dense(1)], seed=1)
    D.build((None, 28, 28, 1), np.float64)
    real = RNG.uniform(-1, 1, (6, 28, 28, 1))
    z = RNG.standard_normal((6, 100))
    bn = D.layers[2]
    fake = G.forward(z, training=True)
    h_real = D.layers[1].forward(D.layers[0].forward(real)).mean(0)
    h_fake = D.layers[1].forward(D.layers[0].forward(fake)).mean(0)
    gan.critic_step(G, D, optim.SGD(D, lr=1e-12), "bce", real, z)
    np.testing.assert_allclose(bn.params["moving_mean"], 0.25 * h_real + 0.5 * h_fake,
                               rtol=1e-6)


def test_get_and_set_weights_copy_never_alias():
    m = Sequential([Dense(2)], seed=0, input_shape=(3,))
    w = m.get_weights()
    w["dense/kernel"][...] = 7.0  # editing the returned dict leaves the model alone
    assert not (m.layers[0].params["kernel"] == 7.0).any()
    src = {k: v.copy() for k, v in m.get_weights().items()}
    m.set_weights(src)
    src["dense/kernel"][...] = 9.0  # and the model does not hold the caller's arrays
    assert not (m.layers[0].params["kernel"] == 9.0).any()


def test_optimizer_state_of_a_converted_model_is_refused():
    """model.astype after the optimizer's first step: its float32 slots would silently round
    the float64 updates; a clear error instead."""
    from rawgan import optim

    m = Sequential([Dense(2)], seed=0, input_shape=(3,))
    opt = optim.Adam(m, lr=1e-3)
    m.zero_grad()
    m.forward(rand(4, 3))
    m.backward(rand(4, 2))
    opt.step()
    m.astype(np.float64)
    m.forward(rand(4, 3, dtype=np.float64))
    m.backward(rand(4, 2, dtype=np.float64))
    with pytest.raises(ValueError, match="now float64 .* state is float32"):
        opt.step()


def test_deepcopy_of_a_model_copies_arrays_and_shares_the_backend():
    import copy

    m = models.build("mlp", seed=0, dtype=np.float64)[0]
    twin = copy.deepcopy(m)
    assert twin.ops is m.ops and twin.layers[0].ops is m.ops
    z = RNG.standard_normal((3, 100))
    np.testing.assert_array_equal(twin.forward(z, training=False), m.forward(z, training=False))
    twin.layers[0].params["kernel"][...] = 0.0  # the copy owns its arrays
    assert (m.layers[0].params["kernel"] != 0).any()


def test_automatic_names_skip_names_already_taken():
    m = Sequential([Dense(4, name="dense_1"), Dense(4), Dense(4)], seed=0, input_shape=(4,))
    assert [layer.name for layer in m.layers] == ["dense_1", "dense", "dense_2"]
    assert len(m.weights()) == 6 and sum(v.size for v in m.weights().values()) == m.count_params()
    with pytest.raises(ValueError, match="two layers are named 'a'"):
        Sequential([Dense(4, name="a"), Dense(4, name="a")])


def test_nesting_and_repeating_a_layer_are_refused():
    with pytest.raises(TypeError, match="nesting is not supported, list its layers"):
        Sequential([Sequential([Dense(3)]), Dense(1)])
    d = Dense(3)
    with pytest.raises(ValueError, match="already in the list"):
        Sequential([d, LeakyReLU(), d])


def test_a_prebuilt_layer_of_another_dtype_or_shape_is_refused():
    d = Dense(3)
    d.build((None, 2), np.float64)
    with pytest.raises(ValueError, match=r"'dense' was built for float64 inputs of shape "
                                         r"\(2,\), the model gives it float32 inputs"):
        Sequential([d, Dense(1)], input_shape=(2,))
    with pytest.raises(ValueError, match=r"shape \(2,\), the model gives it float64 inputs "
                                         r"of shape \(5,\)"):
        Sequential([d, Dense(1)])._built((None, 5), np.float64)


def test_calling_a_model_is_inference_as_in_keras():
    G = models.build("dcgan", seed=0)[0]
    z = RNG.standard_normal((4, 100)).astype(np.float32)
    moving = G.layers[1].params["moving_mean"].copy()
    np.testing.assert_array_equal(G(z), G.forward(z, training=False))
    np.testing.assert_array_equal(G.layers[1].params["moving_mean"], moving)  # not updated
    G(z, training=True)
    assert not np.array_equal(G.layers[1].params["moving_mean"], moving)


def test_optimizer_state_of_another_optimizer_is_refused():
    from rawgan import optim

    m = Sequential([Dense(2)], seed=0, input_shape=(3,))
    m.layers[0].grads["kernel"][...] = 1.0
    sgd = optim.SGD(m, lr=0.1, momentum=0.9)
    sgd.step()
    with pytest.raises(ValueError, match=r"'dense/kernel/momentum' is not one of its slots "
                                         r"\(m, v\)"):
        optim.Adam(m).load_state_dict(sgd.state_dict())


@pytest.mark.parametrize("shape", [(2.7, 3), 6, "ab", (2, None)])
def test_reshape_refuses_a_target_that_is_not_integers(shape):
    with pytest.raises(ValueError, match="target shape must be a tuple of integers"):
        Reshape(shape)


def test_a_list_into_a_built_conv_is_a_type_error():
    c = Sequential([Conv2D(2, 3)], seed=0, input_shape=(5, 5, 1))
    with pytest.raises(TypeError, match="expected an array, got list"):
        c.forward([[0.0] * 5] * 5)


def test_keras_defaults():
    """The defaults the seed models and `rawgan train` rely on without passing them."""
    from rawgan import optim

    bn = BatchNormalization()
    assert (bn.momentum, bn.epsilon) == (0.99, 1e-3)
    assert LeakyReLU().alpha == 0.3
    c = Conv2D(4, 3)
    assert (c.strides, c.padding, c.use_bias) == ((1, 1), "valid", True)
    assert Dense(3).use_bias
    m = Sequential([Dense(2)], seed=0, input_shape=(3,))
    adam, rms, sgd = optim.Adam(m), optim.RMSprop(m, lr=1e-3), optim.SGD(m)
    assert (adam.lr, adam.beta_1, adam.beta_2, adam.epsilon) == (1e-3, 0.9, 0.999, 1e-7)
    assert (rms.rho, rms.epsilon) == (0.9, 1e-7)
    assert (sgd.lr, sgd.momentum, sgd.nesterov) == (0.01, 0.0, False)


def test_a_layers_own_seed_survives_sequential():
    """Dropout(rate, seed=s) keeps its generator inside a model (Sequential seeds only the
    layers that have none)."""
    x = np.ones((4, 50), np.float32)
    alone = Dropout(0.5, seed=3)
    alone.build((None, 50))
    inside = Sequential([Dropout(0.5, seed=3)], seed=0, input_shape=(50,))
    np.testing.assert_array_equal(inside.forward(x, training=True),
                                  alone.forward(x, training=True))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.5])
def test_leaky_relu_for_every_slope(alpha):
    """y = x (x > 0), alpha x (x <= 0); dx = dy, alpha dy: also for a slope above 1."""
    x = np.array([[-2.0, -0.5, 0.0, 0.5, 2.0]])
    dy = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    np.testing.assert_array_equal(ops.leaky_relu_forward(x, alpha),
                                  np.where(x > 0, x, alpha * x))
    np.testing.assert_array_equal(ops.leaky_relu_backward(dy, x, alpha),
                                  np.where(x > 0, dy, alpha * dy))


@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adam"])
def test_weight_clipping_clips_the_updated_weights(name):
    """clip_value (WGAN): p = clip(update(p), -c, c), for every optimizer."""
    from rawgan import optim

    def model():
        m = Sequential([Dense(4)], seed=0, input_shape=(3,))
        m.layers[0].params["kernel"][...] = np.linspace(-1, 1, 12, dtype=np.float32
                                                        ).reshape(3, 4)
        m.layers[0].grads["kernel"][...] = 0.5
        return m

    free, clipped = model(), model()
    kw = {"lr": 0.1}
    getattr(optim, name)(free, **kw).step()
    getattr(optim, name)(clipped, clip_value=0.2, **kw).step()
    k = free.layers[0].params["kernel"]
    np.testing.assert_array_equal(clipped.layers[0].params["kernel"], np.clip(k, -0.2, 0.2))
    assert (np.abs(k) > 0.2).any()


def test_need_db_false_skips_only_the_bias_gradient(monkeypatch):
    """A layer without bias asks for no dy column sum; everything else is bit-identical."""
    rng = np.random.default_rng(9)
    x, w, dy = (rng.standard_normal(s) for s in ((4, 7, 7, 3), (3, 3, 3, 5), (4, 4, 4, 5)))
    full = ops.conv2d_backward(dy, x, w, 2, "same")
    part = ops.conv2d_backward(dy, x, w, 2, "same", need_db=False)
    assert part[2] is None and all(np.array_equal(a, b) for a, b in zip(full[:2], part[:2],
                                                                       strict=True))
    wt, dyt = rng.standard_normal((3, 3, 5, 3)), rng.standard_normal((4, 14, 14, 5))
    full = ops.conv2d_transpose_backward(dyt, x, wt, 2, "same")
    part = ops.conv2d_transpose_backward(dyt, x, wt, 2, "same", need_db=False)
    assert part[2] is None and all(np.array_equal(a, b) for a, b in zip(full[:2], part[:2],
                                                                       strict=True))
    xd, wd, dyd = rng.standard_normal((6, 4)), rng.standard_normal((4, 3)), \
        rng.standard_normal((6, 3))
    full = ops.dense_backward(dyd, xd, wd)
    part = ops.dense_backward(dyd, xd, wd, need_db=False)
    assert part[2] is None and all(np.array_equal(a, b) for a, b in zip(full[:2], part[:2],
                                                                       strict=True))
    calls = []
    layer = Conv2D(5, 3, padding="same", use_bias=False)
    layer.build((None, 7, 7, 3), np.float64)
    real = ops.conv2d_backward

    def spy(*a, **kw):
        calls.append(kw.get("need_db"))
        return real(*a, **kw)

    monkeypatch.setattr(ops, "conv2d_backward", spy)  # layer.ops is this module
    layer.forward(x)
    layer.backward(rng.standard_normal((4, 7, 7, 5)))
    assert calls == [False] and "bias" not in layer.grads


def test_batchnorm_inference_is_accurate_when_the_mean_dwarfs_the_spread():
    """Centred (x - mean) * scale + beta: float32 within 1e-6 of float64 at mean 100, std
    0.1 (TF's folded x * scale + (beta - mean * scale) was 2.3e-5 off)."""
    x = (100 + 0.1 * RNG.standard_normal((64, 4))).astype(np.float32)
    ys = []
    for dt in (np.float32, np.float64):
        bn = BatchNormalization()
        bn.build((None, 4), dt)
        bn.params["moving_mean"][:] = 100
        bn.params["moving_variance"][:] = 0.01
        ys.append(bn.forward(x.astype(dt), training=False))
    assert np.linalg.norm(ys[0] - ys[1]) / np.linalg.norm(ys[1]) < 1e-6
