"""The MNIST scoring classifier: softmax cross-entropy, the network, the shipped weights."""

import warnings

import h5py
import numpy as np
import pytest

from rawgan import classifier as C
from rawgan.gradcheck import check_layer, numerical_gradient, relative_error

# --------------------------------------------------------------------------------------
# softmax cross-entropy
# --------------------------------------------------------------------------------------


def _reference_ce(z, t):
    """Direct (unstable, fine for small logits) -ln softmax, mean over rows."""
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return float(-(t * np.log(p)).sum() / len(z))


@pytest.mark.parametrize("seed", range(6))
def test_softmax_cross_entropy_finite_differences(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 9)), int(rng.integers(2, 12))
    z = 3.0 * rng.standard_normal((n, k))
    if seed % 2:
        labels = rng.integers(0, k, size=n)
        t = np.eye(k)[labels]
    else:
        labels = rng.dirichlet(np.ones(k), size=n)  # soft targets
        t = labels
    loss, dz = C.softmax_cross_entropy(z, labels)
    assert dz.shape == z.shape and dz.dtype == np.float64
    assert loss == pytest.approx(_reference_ce(z, t), rel=1e-12)
    num = numerical_gradient(lambda: C.softmax_cross_entropy(z, labels)[0], z)
    assert relative_error(dz, num) < 1e-6


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    z = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, dz = C.softmax_cross_entropy(z, np.array([0, 2]))
    # row 0: correct and certain -> 0; row 1: three equal logits -> log 3
    assert loss == pytest.approx(np.log(3) / 2, rel=1e-6)
    assert dz.dtype == np.float32 and np.all(np.isfinite(dz))
    np.testing.assert_allclose(dz[1], np.array([1, 1, -2]) / 3 / 2, rtol=1e-6)
    # wrong and certain: loss 2e4 / 2, not inf
    loss, _ = C.softmax_cross_entropy(z[:1], np.array([1]))
    assert loss == pytest.approx(2e4)


def test_softmax_cross_entropy_gradient_rows_sum_to_zero():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((5, 10)).astype(np.float32)
    _, dz = C.softmax_cross_entropy(z, rng.integers(0, 10, 5))
    np.testing.assert_allclose(dz.sum(axis=1), 0.0, atol=1e-7)


@pytest.mark.parametrize("bad, labels, err", [
    (np.zeros(3), np.zeros(3, int), ValueError),                   # 1-D logits
    (np.zeros((2, 3), np.int64), np.zeros(2, int), TypeError),      # integer logits
    (np.full((2, 3), np.nan), np.zeros(2, int), ValueError),        # NaN
    (np.zeros((2, 3)), np.array([0, 3]), ValueError),               # label out of range
    (np.zeros((2, 3)), np.array([0, 1, 2]), ValueError),            # count mismatch
    (np.zeros((2, 3)), np.array([0.0, 1.0]), TypeError),            # float labels
    (np.zeros((2, 3)), np.zeros((2, 4)), ValueError),               # target shape
    (np.zeros((2, 3)), np.full((2, 3), 0.5), ValueError),           # rows sum to 1.5
    (np.zeros((2, 3)), np.array([[1.5, -0.5, 0], [1, 0, 0]]), ValueError),  # negative
    (np.zeros((2, 3)), np.array([[1, 0, 0], [0, 0, 0]]).astype(complex), TypeError),
])
def test_softmax_cross_entropy_rejects_bad_input(bad, labels, err):
    with pytest.raises(err):
        C.softmax_cross_entropy(bad, labels)


def test_soft_targets_that_are_not_distributions_are_named():
    with pytest.raises(ValueError, match=r"row 1 sums to 0\.9"):
        C.softmax_cross_entropy(np.zeros((2, 3)), np.array([[1, 0, 0], [0.5, 0.4, 0]]))
    with pytest.raises(ValueError, match=r"must be >= 0, got -0\.5"):
        C.softmax_cross_entropy(np.zeros((2, 3)), np.array([[1.5, -0.5, 0], [1, 0, 0]]))
    # float32 rounding of a Dirichlet row is inside the tolerance
    t = np.random.default_rng(0).dirichlet(np.ones(10), size=50).astype(np.float32)
    C.softmax_cross_entropy(np.zeros((50, 10), np.float32), t)


def test_softmax_cross_entropy_torch_twin():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    for soft in (False, True):
        z = 4.0 * rng.standard_normal((7, 10))
        labels = rng.dirichlet(np.ones(10), size=7) if soft else rng.integers(0, 10, 7)
        loss, dz = C.softmax_cross_entropy(z, labels)
        zt = torch.tensor(z, requires_grad=True)
        target = torch.tensor(labels)
        lt = torch.nn.functional.cross_entropy(zt, target)  # mean over the batch
        lt.backward()
        assert loss == pytest.approx(lt.item(), rel=1e-12)
        np.testing.assert_allclose(dz, zt.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_softmax_and_log_softmax():
    z = np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]])
    np.testing.assert_allclose(C.softmax(z), [[0.5, 0.5], [0.25, 0.75]])
    np.testing.assert_allclose(C.log_softmax(z), np.log([[0.5, 0.5], [0.25, 0.75]]))


# --------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------


def test_lenet_shapes_and_size():
    model = C.lenet(seed=0)
    assert model.output_shape == (None, 10)
    assert model.count_params() == 90_506
    clf = C.Classifier(model)
    assert clf.feature_dim == 128
    x = np.random.default_rng(0).uniform(-1, 1, (3, 28, 28, 1)).astype(np.float32)
    assert clf.features(x).shape == (3, 128)
    assert clf.logits(x).shape == (3, 10)
    np.testing.assert_allclose(clf.probabilities(x).sum(axis=1), 1.0)
    # (N, 784) and (N, 28, 28) inputs are reshaped
    np.testing.assert_array_equal(clf.logits(x.reshape(3, 784)), clf.logits(x))
    np.testing.assert_array_equal(clf.logits(x[..., 0]), clf.logits(x))
    f, p = clf.features_and_probabilities(x)
    np.testing.assert_array_equal(f, clf.features(x))
    np.testing.assert_allclose(p, clf.probabilities(x), rtol=1e-6)
    # batching does not change the result
    np.testing.assert_allclose(clf.features(x, batch_size=1), clf.features(x), rtol=1e-4,
                               atol=1e-6)


def test_lenet_gradients_match_finite_differences():
    model = C.lenet(seed=1, dtype=np.float64, dropout=0.3)
    errors = check_layer(model, (2, 28, 28, 1), np.random.default_rng(0), max_coords=6,
                         kinks=True)
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("images, err", [
    (np.zeros((2, 28, 28, 3), np.float32), ValueError),
    (np.zeros((2, 32, 32, 1), np.float32), ValueError),
    (np.zeros((2, 28, 28, 1), np.uint8), TypeError),
    (np.full((2, 28, 28, 1), np.nan, np.float32), ValueError),
])
def test_classifier_rejects_bad_images(images, err):
    clf = C.Classifier(C.lenet(seed=0))
    with pytest.raises(err):
        clf.predict(images)


def test_save_load_roundtrip(tmp_path):
    model = C.lenet(seed=5)
    path = C.save_classifier(tmp_path / "c.h5", model, seed=5, accuracy=0.5, split="x",
                             train_range=[0, 10])
    clf = C.load_classifier(path)
    assert clf.meta["seed"] == 5 and clf.meta["accuracy"] == 0.5
    assert clf.meta["train_range"] == [0, 10] and clf.meta["architecture"] == C.ARCHITECTURE
    x = np.random.default_rng(0).uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)
    np.testing.assert_array_equal(clf.logits(x), C.Classifier(model).logits(x))
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        C.load_classifier(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        C.load_classifier(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["magic"] = "something-else"
    with pytest.raises(ValueError, match="not a rawgan classifier"):
        C.load_classifier(other)
    good = C.save_classifier(tmp_path / "good.h5", C.lenet(seed=0))
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ValueError):
        C.load_classifier(truncated)
    with h5py.File(good, "a") as f:
        del f["weights/logits/bias"]
    with pytest.raises(ValueError, match="do not fit"):
        C.load_classifier(good)


# --------------------------------------------------------------------------------------
# the shipped weights
# --------------------------------------------------------------------------------------


def test_shipped_weights_are_small_float32_and_documented():
    path = C.DEFAULT_WEIGHTS
    assert path.is_file()
    assert path.stat().st_size < 512 * 1024
    with h5py.File(path, "r") as f:
        for key in ("split", "seed", "epochs", "accuracy", "architecture"):
            assert key in f.attrs, key
        dtypes = set()
        f["weights"].visititems(lambda name, obj: dtypes.add(obj.dtype)
                                if isinstance(obj, h5py.Dataset) else None)
    assert dtypes == {np.dtype(np.float32)}
    clf = C.load_classifier()
    assert clf.meta["architecture"] == C.ARCHITECTURE
    assert clf.meta["train_range"] == [0, 8000] and clf.meta["test_range"] == [8000, 10000]
    readme = (path.parent / "README.md").read_text()
    assert f"| accuracy | {clf.meta['accuracy']} |" in readme
    assert f"| seed | {clf.meta['seed']} |" in readme


def test_shipped_weights_reproduce_recorded_accuracy(mnist_dir):
    from rawgan.data import load_mnist

    x, y = load_mnist("test", data_dir=mnist_dir, download=False)
    clf = C.load_classifier()
    acc = clf.accuracy(x[8000:], y[8000:])
    assert round(acc, 4) == pytest.approx(clf.meta["accuracy"], abs=1e-9)
    assert acc >= 0.98
