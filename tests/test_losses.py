"""Tests for rawgan.losses: finite differences, stability, a PyTorch twin, known values,
bad input, dtype preservation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from rawgan import losses
from rawgan.losses import KINDS, bce_with_logits, discriminator_loss, generator_loss

SEEDS = [0, 1, 2, 3]
SHAPES = ["flat", "column"]  # (N,) and (N, 1)


# --------------------------------------------------------------------------- helpers


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max(|a| + |b|), guarded against 0/0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a) + np.abs(b))), 1e-300))


def random_logits(
    rng: np.random.Generator, n: int, shape: str, kind: str, dtype=np.float64
) -> np.ndarray:
    """Random logits of spread ~3 (so sigmoids are not all ~0.5), away from hinge kinks."""
    x = rng.normal(0.0, 3.0, size=n)
    if kind == "hinge":
        # relu(1 - r) and relu(1 + f) have kinks at +-1; finite differences straddling
        # a kink measure neither one-sided derivative, so keep logits away from them.
        bad = (np.abs(1 - x) < 1e-3) | (np.abs(1 + x) < 1e-3)
        while bad.any():
            x[bad] = rng.normal(0.0, 3.0, size=int(bad.sum()))
            bad = (np.abs(1 - x) < 1e-3) | (np.abs(1 + x) < 1e-3)
    x = x.astype(dtype)
    return x.reshape(n, 1) if shape == "column" else x


def numerical_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences (f(x + h e_i) - f(x - h e_i)) / 2h of a scalar function."""
    g = np.zeros_like(x)
    flat_x, flat_g = x.reshape(-1), g.reshape(-1)
    for i in range(flat_x.size):
        old = flat_x[i]
        flat_x[i] = old + h
        up = f(x)
        flat_x[i] = old - h
        down = f(x)
        flat_x[i] = old
        flat_g[i] = (up - down) / (2 * h)
    return g


# ------------------------------------------------------------------ finite differences


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_discriminator_grad_matches_finite_differences(kind: str, shape: str, seed: int):
    rng = np.random.default_rng(1000 + seed)
    n_real, n_fake = (int(v) for v in rng.integers(1, 18, size=2))
    real = random_logits(rng, n_real, shape, kind)
    fake = random_logits(rng, n_fake, shape, kind)

    loss, d_real, d_fake = discriminator_loss(kind, real, fake)

    num_real = numerical_grad(lambda r: discriminator_loss(kind, r, fake)[0], real.copy())
    num_fake = numerical_grad(lambda f: discriminator_loss(kind, real, f)[0], fake.copy())
    assert d_real.shape == real.shape and d_fake.shape == fake.shape
    assert rel_err(d_real, num_real) < 1e-6
    assert rel_err(d_fake, num_fake) < 1e-6
    assert isinstance(loss, float)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_generator_grad_matches_finite_differences(kind: str, shape: str, seed: int):
    rng = np.random.default_rng(2000 + seed)
    n = int(rng.integers(1, 18))
    fake = random_logits(rng, n, shape, kind)

    loss, d_fake = generator_loss(kind, fake)

    num = numerical_grad(lambda f: generator_loss(kind, f)[0], fake.copy())
    assert d_fake.shape == fake.shape
    assert rel_err(d_fake, num) < 1e-6
    assert isinstance(loss, float)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bce_with_logits_grad_matches_finite_differences(shape: str, seed: int):
    rng = np.random.default_rng(3000 + seed)
    n = int(rng.integers(1, 18))
    logits = random_logits(rng, n, shape, "bce")
    targets = rng.uniform(0.0, 1.0, size=logits.shape)  # soft labels exercise general y

    loss, dlogits = bce_with_logits(logits, targets)

    num = numerical_grad(lambda lg: bce_with_logits(lg, targets)[0], logits.copy())
    assert rel_err(dlogits, num) < 1e-6
    # against the textbook (unstable, but fine for moderate logits) formula
    p = 1 / (1 + np.exp(-logits))
    naive = -np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    assert loss == pytest.approx(naive, rel=1e-9)


# --------------------------------------------------------------------------- stability

EXTREME = [1e4, -1e4, 0.0, 88.0, -88.0, 104.0, -104.0, 710.0, -745.0, 3.0, -3.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_logits_are_finite_and_silent(kind: str, dtype):
    x = np.array(EXTREME, dtype=dtype)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")  # any RuntimeWarning becomes a test failure
        loss_d, d_real, d_fake = discriminator_loss(kind, x, x[::-1].copy())
        loss_g, d_g = generator_loss(kind, x)
        loss_b, d_b = bce_with_logits(x, 1.0)
    for loss in (loss_d, loss_g, loss_b):
        assert math.isfinite(loss)
    for g in (d_real, d_fake, d_g, d_b):
        assert np.isfinite(g).all() and g.dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits_give_the_right_values(dtype):
    big = np.array([1e4], dtype=dtype)
    # D rejects a real sample with logit -1e4: BCE = softplus(1e4) = 1e4; gradient -1/N.
    loss, d_real, d_fake = discriminator_loss("bce", -big, -big)
    assert loss == pytest.approx(1e4, rel=1e-6)
    np.testing.assert_allclose(d_real, [-1.0])
    np.testing.assert_allclose(d_fake, [0.0], atol=1e-30)
    # non-saturating G still gets the full -1/N gradient when D rejects fakes ...
    loss, d = generator_loss("bce", -big)
    assert loss == pytest.approx(1e4, rel=1e-6)
    np.testing.assert_allclose(d, [-1.0])
    # ... while the saturating (minimax) G gets ~nothing: that is the point of the trick.
    loss, d = generator_loss("minimax", -big)
    assert loss == pytest.approx(0.0, abs=1e-30)
    np.testing.assert_allclose(d, [0.0], atol=1e-30)
    loss, d = generator_loss("minimax", big)
    assert loss == pytest.approx(-1e4, rel=1e-6)
    np.testing.assert_allclose(d, [-1.0])


def test_bce_real_term_gradient_has_no_cancellation():
    # For r = 40, 1 - s(r) = s(-40) ~ 4.25e-18 is below float64 epsilon relative to 1;
    # s(r) - 1 would round to 0, -s(-r) keeps it.
    _, d_real, _ = discriminator_loss("bce", np.array([40.0]), np.array([0.0]))
    assert d_real[0] == pytest.approx(-1 / (1 + math.exp(40.0)), rel=1e-12, abs=0)


# -------------------------------------------------------------------------- PyTorch twin


def torch_d_loss(torch, kind, r, f):
    F = torch.nn.functional
    if kind in ("bce", "minimax"):
        return F.binary_cross_entropy_with_logits(
            r, torch.ones_like(r)
        ) + F.binary_cross_entropy_with_logits(f, torch.zeros_like(f))
    if kind == "wgan":
        return f.mean() - r.mean()
    if kind == "hinge":
        return F.relu(1 - r).mean() + F.relu(1 + f).mean()
    if kind == "lsgan":
        return 0.5 * ((r - 1) ** 2).mean() + 0.5 * (f**2).mean()
    raise AssertionError(kind)


def torch_g_loss(torch, kind, f):
    F = torch.nn.functional
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(f, torch.ones_like(f))
    if kind == "minimax":
        return -F.softplus(f).mean()  # = mean(log(1 - sigmoid(f)))
    if kind in ("wgan", "hinge"):
        return -f.mean()
    if kind == "lsgan":
        return 0.5 * ((f - 1) ** 2).mean()
    raise AssertionError(kind)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_pytorch_autograd(kind: str, shape: str):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4000 + KINDS.index(kind))
    real = random_logits(rng, 13, shape, kind) * 2  # spread ~6: includes |l| > 15
    fake = random_logits(rng, 7, shape, kind) * 2
    tol = {"rtol": 1e-10, "atol": 1e-14}

    tr = torch.tensor(real, requires_grad=True)
    tf = torch.tensor(fake, requires_grad=True)
    t_loss = torch_d_loss(torch, kind, tr, tf)
    t_loss.backward()
    loss, d_real, d_fake = discriminator_loss(kind, real, fake)
    np.testing.assert_allclose(loss, t_loss.item(), **tol)
    np.testing.assert_allclose(d_real, tr.grad.numpy(), **tol)
    np.testing.assert_allclose(d_fake, tf.grad.numpy(), **tol)

    tf = torch.tensor(fake, requires_grad=True)
    t_loss = torch_g_loss(torch, kind, tf)
    t_loss.backward()
    loss, d_fake = generator_loss(kind, fake)
    np.testing.assert_allclose(loss, t_loss.item(), **tol)
    np.testing.assert_allclose(d_fake, tf.grad.numpy(), **tol)


def test_bce_with_logits_matches_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    logits = rng.normal(0.0, 6.0, size=(11, 1))
    targets = rng.uniform(0.0, 1.0, size=(11, 1))
    tl = torch.tensor(logits, requires_grad=True)
    t_loss = torch.nn.functional.binary_cross_entropy_with_logits(tl, torch.tensor(targets))
    t_loss.backward()
    loss, dlogits = bce_with_logits(logits, targets)
    np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-10)
    np.testing.assert_allclose(dlogits, tl.grad.numpy(), rtol=1e-10, atol=1e-14)


# -------------------------------------------------------------------------- known values

LOG2 = math.log(2.0)


@pytest.mark.parametrize("n", [1, 4])
def test_bce_at_zero_logits(n: int):
    z = np.zeros(n)
    loss, d_real, d_fake = discriminator_loss("bce", z, z)
    assert loss == pytest.approx(2 * LOG2, rel=1e-15)
    np.testing.assert_allclose(d_real, -0.5 / n)
    np.testing.assert_allclose(d_fake, 0.5 / n)
    loss, d = generator_loss("bce", z)
    assert loss == pytest.approx(LOG2, rel=1e-15)
    np.testing.assert_allclose(d, -0.5 / n)
    loss, d = generator_loss("minimax", z)
    assert loss == pytest.approx(-LOG2, rel=1e-15)
    np.testing.assert_allclose(d, -0.5 / n)
    loss, d = bce_with_logits(z, 0.0)
    assert loss == pytest.approx(LOG2, rel=1e-15)
    assert discriminator_loss("minimax", z, z)[0] == pytest.approx(2 * LOG2, rel=1e-15)


def test_known_values_wgan_hinge_lsgan():
    real, fake = np.array([1.0, 2.0]), np.array([3.0])
    loss, d_real, d_fake = discriminator_loss("wgan", real, fake)
    assert loss == pytest.approx(3.0 - 1.5)
    np.testing.assert_allclose(d_real, [-0.5, -0.5])
    np.testing.assert_allclose(d_fake, [1.0])
    assert generator_loss("wgan", fake)[0] == pytest.approx(-3.0)

    # relu(1 - [2, 0]) = [0, 1] -> 0.5 ; relu(1 + [-2, 0.5]) = [0, 1.5] -> 0.75
    loss, d_real, d_fake = discriminator_loss("hinge", np.array([2.0, 0.0]), np.array([-2.0, 0.5]))
    assert loss == pytest.approx(1.25)
    np.testing.assert_allclose(d_real, [0.0, -0.5])
    np.testing.assert_allclose(d_fake, [0.0, 0.5])
    loss, d = generator_loss("hinge", np.array([-2.0, 0.5]))
    assert loss == pytest.approx(0.75)
    np.testing.assert_allclose(d, [-0.5, -0.5])

    # 0.5 * mean([0, 4]) + 0.5 * mean([4]) = 1 + 2
    loss, d_real, d_fake = discriminator_loss("lsgan", np.array([1.0, 3.0]), np.array([2.0]))
    assert loss == pytest.approx(3.0)
    np.testing.assert_allclose(d_real, [0.0, 1.0])
    np.testing.assert_allclose(d_fake, [2.0])
    loss, d = generator_loss("lsgan", np.array([1.0, 3.0]))
    assert loss == pytest.approx(1.0)
    np.testing.assert_allclose(d, [0.0, 1.0])


def test_hinge_subgradient_is_zero_at_the_kinks():
    _, d_real, d_fake = discriminator_loss("hinge", np.array([1.0]), np.array([-1.0]))
    assert d_real[0] == 0.0 and d_fake[0] == 0.0


def test_bce_discriminator_equals_bce_with_logits():
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=5), rng.normal(size=9)
    loss, d_real, d_fake = discriminator_loss("bce", real, fake)
    loss_r, g_r = bce_with_logits(real, np.ones_like(real))
    loss_f, g_f = bce_with_logits(fake, 0.0)
    assert loss == pytest.approx(loss_r + loss_f, rel=1e-14)
    np.testing.assert_allclose(d_real, g_r, rtol=1e-13)
    np.testing.assert_allclose(d_fake, g_f, rtol=1e-13)
    loss_g, d_g = generator_loss("bce", fake)
    loss_gb, d_gb = bce_with_logits(fake, 1.0)
    assert loss_g == pytest.approx(loss_gb, rel=1e-14)
    np.testing.assert_allclose(d_g, d_gb, rtol=1e-13)


# ---------------------------------------------------------------------------- bad input

GOOD = np.zeros(4)


@pytest.mark.parametrize("kind", ["BCE", "wasserstein", "", None])
def test_unknown_kind(kind):
    with pytest.raises(ValueError, match=r"unknown loss kind.*bce, minimax, wgan, hinge, lsgan"):
        discriminator_loss(kind, GOOD, GOOD)
    with pytest.raises(ValueError, match=r"valid kinds are"):
        generator_loss(kind, GOOD)


@pytest.mark.parametrize(
    ("bad", "dtype_name"),
    [
        (np.arange(4), "int64"),
        (np.zeros(4, dtype=np.float16), "float16"),
        (np.zeros(4, dtype=np.complex128), "complex128"),
        (np.zeros(4, dtype=bool), "bool"),
    ],
)
def test_non_float_dtype(bad, dtype_name):
    with pytest.raises(TypeError, match=rf"real_logits.*dtype {dtype_name}"):
        discriminator_loss("bce", bad, GOOD)
    with pytest.raises(TypeError, match=rf"fake_logits.*dtype {dtype_name}"):
        discriminator_loss("bce", GOOD, bad)
    with pytest.raises(TypeError, match=rf"dtype {dtype_name}"):
        generator_loss("wgan", bad)
    with pytest.raises(TypeError, match=rf"dtype {dtype_name}"):
        bce_with_logits(bad, 1.0)


def test_not_an_array():
    with pytest.raises(TypeError, match=r"fake_logits must be a NumPy or CuPy float array.*list"):
        generator_loss("bce", [0.0, 1.0])


@pytest.mark.parametrize("empty", [np.zeros(0), np.zeros((0, 1))])
def test_empty_batch(empty):
    with pytest.raises(ValueError, match=r"real_logits is an empty batch"):
        discriminator_loss("lsgan", empty, GOOD)
    with pytest.raises(ValueError, match=r"fake_logits is an empty batch"):
        generator_loss("hinge", empty)
    with pytest.raises(ValueError, match=r"empty batch"):
        bce_with_logits(empty, 0.0)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_logits(value, dtype):
    bad = np.array([0.0, value, 1.0], dtype=dtype)
    good = np.zeros(3, dtype=dtype)
    with pytest.raises(ValueError, match=r"fake_logits contains NaN or inf"):
        discriminator_loss("bce", good, bad)
    with pytest.raises(ValueError, match=r"real_logits contains NaN or inf"):
        discriminator_loss("wgan", bad, good)
    with pytest.raises(ValueError, match=r"NaN or inf"):
        generator_loss("minimax", bad)
    with pytest.raises(ValueError, match=r"NaN or inf"):
        bce_with_logits(bad, 1.0)


def test_mismatched_trailing_shapes():
    with pytest.raises(
        ValueError, match=r"real_logits shape \(4,\) and fake_logits shape \(3, 1\)"
    ):
        discriminator_loss("bce", np.zeros(4), np.zeros((3, 1)))


@pytest.mark.parametrize("shape", [(4, 1, 1), (2, 3), (4, 2), ()])
def test_bad_logit_shapes(shape):
    bad = np.zeros(shape)
    shape_txt = str(shape).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(
        ValueError, match=rf"real_logits must have shape \(N,\) or \(N, 1\), got shape {shape_txt}"
    ):
        discriminator_loss("hinge", bad, GOOD)
    with pytest.raises(ValueError, match=rf"got shape {shape_txt}"):
        generator_loss("lsgan", bad)


def test_bad_targets():
    logits = np.zeros(3)
    with pytest.raises(ValueError, match=r"targets shape \(3, 1\) must equal logits shape \(3,\)"):
        bce_with_logits(logits, np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bce_with_logits(logits, np.array([0.0, 1.5, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bce_with_logits(logits, np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bce_with_logits(logits, -0.1)
    with pytest.raises(TypeError, match=r"targets must be an array or a real number"):
        bce_with_logits(logits, "ones")


@pytest.mark.parametrize("target", [0.9, np.float64(0.9), np.float32(0.9), np.array(0.9)])
def test_scalar_targets_of_every_kind_match_a_full_array(target):
    """A NumPy scalar or 0-d array is a number, not an array of the wrong shape."""
    logits = np.random.default_rng(0).normal(size=5)
    loss, grad = bce_with_logits(logits, target)
    ref_loss, ref_grad = bce_with_logits(logits, np.full(5, float(target)))
    assert loss == ref_loss
    np.testing.assert_array_equal(grad, ref_grad)


# ------------------------------------------------------------------- dtype and shape


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_dtype_and_shape_preserved(kind: str, dtype, shape: str):
    rng = np.random.default_rng(7)
    real = random_logits(rng, 6, shape, kind, dtype=dtype)
    fake = random_logits(rng, 5, shape, kind, dtype=dtype)
    real_before, fake_before = real.copy(), fake.copy()

    loss, d_real, d_fake = discriminator_loss(kind, real, fake)
    assert type(loss) is float
    assert d_real.dtype == dtype and d_real.shape == real.shape
    assert d_fake.dtype == dtype and d_fake.shape == fake.shape

    loss, d_g = generator_loss(kind, fake)
    assert type(loss) is float
    assert d_g.dtype == dtype and d_g.shape == fake.shape

    loss, d_b = bce_with_logits(fake, np.ones(fake.shape))  # float64 targets
    assert type(loss) is float and d_b.dtype == dtype and d_b.shape == fake.shape

    np.testing.assert_array_equal(real, real_before)  # inputs are not modified
    np.testing.assert_array_equal(fake, fake_before)

    if dtype == np.float32:  # float32 agrees with float64 to float32 precision
        _, d64, _ = discriminator_loss(kind, real.astype(np.float64), fake.astype(np.float64))
        np.testing.assert_allclose(d_real, d64, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------- CuPy


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cupy_matches_numpy(kind: str):
    cp = pytest.importorskip("cupy")
    try:
        cp.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - any CUDA failure means "no usable GPU"
        pytest.skip("no usable CUDA device")
    rng = np.random.default_rng(8)
    real = random_logits(rng, 9, "column", kind, dtype=np.float32)
    fake = random_logits(rng, 6, "column", kind, dtype=np.float32)
    loss, d_real, d_fake = discriminator_loss(kind, cp.asarray(real), cp.asarray(fake))
    ref_loss, ref_real, ref_fake = discriminator_loss(kind, real, fake)
    assert isinstance(d_real, cp.ndarray) and isinstance(d_fake, cp.ndarray)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(cp.asnumpy(d_real), ref_real, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(cp.asnumpy(d_fake), ref_fake, rtol=1e-5, atol=1e-7)
    loss, d_g = generator_loss(kind, cp.asarray(fake))
    ref_loss, ref_g = generator_loss(kind, fake)
    assert isinstance(d_g, cp.ndarray)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(cp.asnumpy(d_g), ref_g, rtol=1e-5, atol=1e-7)


def test_nonfinite_allowed_computes_on_and_records_it():
    """Data-parallel steps compute on NaN/inf logits (every rank must finish the step) and
    report them through nonfinite_seen(): minimax's D loss stays finite on inf logits."""
    r, f = np.array([np.inf, 1.0]), np.array([-np.inf, 0.5])
    with pytest.raises(losses.NonFiniteLogits):
        discriminator_loss("minimax", r, f)
    with losses.nonfinite_allowed():
        loss, _, _ = discriminator_loss("minimax", r, f)
    assert np.isfinite(loss)
    assert losses.nonfinite_seen() is True and losses.nonfinite_seen() is False
    with losses.nonfinite_allowed():
        discriminator_loss("minimax", np.zeros(2), np.zeros(2))
    assert losses.nonfinite_seen() is False
