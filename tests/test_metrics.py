"""Metrics: Frechet distance, KID, classifier score, toy-mode coverage, evaluation rows."""

import json
import math
import warnings

import numpy as np
import pytest

from rawgan import metrics as M
from rawgan.data import grid_modes, ring_modes, sample_mixture, toy_modes

# --------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------


def _random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d) + (0 if rank else 0.1 * np.eye(d))


@pytest.mark.parametrize("seed", range(4))
def test_frechet_distance_diagonal_closed_form(seed):
    rng = np.random.default_rng(seed)
    d = int(rng.integers(1, 20))
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.01, 5, d), rng.uniform(0.01, 5, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_frechet_distance_rotated_diagonal_closed_form():
    # C1 = Q diag(a) Q^T, C2 = Q diag(b) Q^T commute: the closed form still holds
    rng = np.random.default_rng(7)
    d = 12
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    got = M.frechet_distance(np.zeros(d), q @ np.diag(a) @ q.T, np.ones(d), q @ np.diag(b) @ q.T)
    assert got == pytest.approx(d + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-9)


def test_frechet_distance_one_dimensional():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    assert M.frechet_distance(1.0, 4.0, -2.0, 9.0) == pytest.approx(9.0 + 1.0)


def test_frechet_distance_identical_and_symmetric():
    rng = np.random.default_rng(0)
    d = 30
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    c1, c2 = _random_cov(rng, d), _random_cov(rng, d)
    assert M.frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9)
    f12, f21 = M.frechet_distance(mu1, c1, mu2, c2), M.frechet_distance(mu2, c2, mu1, c1)
    assert f12 > 0 and f12 == pytest.approx(f21, rel=1e-10)
    # rank-deficient covariances (fewer samples than dimensions) stay finite and >= 0
    s1, s2 = _random_cov(rng, d, rank=5), _random_cov(rng, d, rank=3)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    f = M.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(f) and f == pytest.approx(M.frechet_distance(mu2, s2, mu1, s1), rel=1e-8)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    c1, c2 = _random_cov(rng, d), _random_cov(rng, d)
    covmean = linalg.sqrtm(c1 @ c2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)
    assert M.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError):
        M.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_fld_from_features_recovers_gaussian_distance_and_warns_when_small():
    rng = np.random.default_rng(0)
    d = 4
    x = rng.standard_normal((20000, d))
    y = 2.0 * rng.standard_normal((20000, d)) + 1.0
    # N(0, I) vs N(1, 4I): d * 1 + d * (2 - 1)^2 = 2d
    assert M.fld_from_features(x, y) == pytest.approx(2 * d, rel=0.03)
    with pytest.warns(M.SampleSizeWarning, match="FLD from 50"):
        M.fld_from_features(x[:50], y[:50])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        M.fld_from_features(x[:3], y[:3])
    messages = [str(w.message) for w in caught if w.category is M.SampleSizeWarning]
    assert len(messages) == 2 and "singular" in messages[1]


# --------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------


def _mmd2_loops(x, y):
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd2_matches_the_double_sum():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((7, 3)) + 0.5
    assert M._mmd2_unbiased(x, y) == pytest.approx(_mmd2_loops(x, y), rel=1e-12)
    # one subset holding every row is exactly that estimate
    with pytest.warns(M.SampleSizeWarning, match="subsets of 7"):
        mean, std = M.kid(x, y, n_subsets=1, subset_size=7)
    assert mean == pytest.approx(_mmd2_loops(x, y), rel=1e-12) and std == 0.0


def test_kid_is_unbiased_on_identical_distributions():
    """Averaged over many independent sample pairs from ONE distribution, the estimate is 0
    within its standard error; the biased (V-statistic) estimate is clearly positive."""
    rng = np.random.default_rng(0)
    d, m, reps = 8, 40, 400
    est, biased = [], []
    for _ in range(reps):
        x = rng.standard_normal((m, d)) + 0.3
        y = rng.standard_normal((m, d)) + 0.3
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", M.SampleSizeWarning)
            est.append(M.kid(x, y, n_subsets=1, subset_size=m, rng=rng)[0])
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    est, biased = np.array(est), np.array(biased)
    se = est.std(ddof=1) / math.sqrt(reps)
    assert abs(est.mean()) < 3 * se
    assert biased.mean() > 10 * se


def test_kid_over_subsets_small_for_same_positive_for_different():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 16))
    y = rng.standard_normal((2000, 16))
    z = 1.3 * rng.standard_normal((2000, 16)) + 0.2
    same_mean, same_std = M.kid(x, y, n_subsets=30, subset_size=300, rng=0)
    diff_mean, diff_std = M.kid(x, z, n_subsets=30, subset_size=300, rng=0)
    assert same_std > 0 and abs(same_mean) < same_std
    assert diff_mean > 10 * diff_std / math.sqrt(30) and diff_mean > 20 * abs(same_mean)
    # reproducible from its seed
    assert M.kid(x, z, n_subsets=5, subset_size=100, rng=3) == M.kid(
        x, z, n_subsets=5, subset_size=100, rng=3)


def test_kid_warnings_and_errors():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((30, 4)), rng.standard_normal((40, 4))
    with pytest.warns(M.SampleSizeWarning, match="exceeds"), \
            pytest.warns(M.SampleSizeWarning, match="subsets of 30"):
        M.kid(x, y, n_subsets=2, subset_size=1000)
    with pytest.warns(M.SampleSizeWarning, match="subsets of 20"):
        M.kid(x, y, n_subsets=2, subset_size=20)
    with pytest.raises(ValueError):
        M.kid(x, rng.standard_normal((40, 5)))
    with pytest.raises(ValueError):
        M.kid(x, y, n_subsets=0)
    with pytest.raises(ValueError, match="NaN"):
        M.kid(np.full((5, 4), np.nan), y)


# --------------------------------------------------------------------------------------
# classifier score
# --------------------------------------------------------------------------------------


def test_classifier_score_balanced_confident_is_number_of_classes():
    labels = np.arange(2000) % 10
    probs = np.eye(10)[labels]
    mean, std = M.classifier_score_from_probs(probs, splits=10)
    assert mean == pytest.approx(10.0) and std == pytest.approx(0.0, abs=1e-12)
    # almost confident: slightly under 10
    soft = 0.99 * probs + 0.01 / 10
    assert 9.0 < M.classifier_score_from_probs(soft, splits=10)[0] < 10.0


def test_classifier_score_constant_or_uncertain_is_one():
    const = np.tile(np.eye(10)[3], (1000, 1))
    assert M.classifier_score_from_probs(const, splits=10) == pytest.approx((1.0, 0.0))
    uniform = np.full((1000, 10), 0.1)
    assert M.classifier_score_from_probs(uniform, splits=10)[0] == pytest.approx(1.0)
    # confident but only two classes, balanced: 2
    two = np.eye(10)[np.arange(1000) % 2]
    assert M.classifier_score_from_probs(two, splits=10)[0] == pytest.approx(2.0)


def test_classifier_score_std_is_over_the_splits():
    """Two splits of different scores: chunk 1 balanced over 10 classes (10), chunk 2 over
    2 classes (2); the mean and the population std of [10, 2]."""
    ten = np.eye(10)[np.arange(1000) % 10]
    two = np.eye(10)[np.arange(1000) % 2]
    mean, std = M.classifier_score_from_probs(np.concatenate([ten, two]), splits=2)
    assert mean == pytest.approx(6.0) and std == pytest.approx(np.std([10.0, 2.0]))
    assert std == pytest.approx(4.0)


def test_classifier_score_warnings_and_errors():
    probs = np.eye(10)[np.arange(50) % 10]
    with pytest.warns(M.SampleSizeWarning, match="per split"):
        M.classifier_score_from_probs(probs, splits=10)
    with pytest.raises(ValueError):
        M.classifier_score_from_probs(probs * 2, splits=1)
    with pytest.raises(ValueError):
        M.classifier_score_from_probs(probs, splits=100)


# --------------------------------------------------------------------------------------
# toy mode metrics
# --------------------------------------------------------------------------------------


def test_mode_metrics_all_modes_hit_evenly():
    centers, std = toy_modes("grid")
    samples = np.repeat(centers, 100, axis=0) + 0.5 * std  # 2,500 points, 100 per mode
    r = M.mode_metrics(samples, centers, std)
    assert r["modes_covered"] == 25 and r["n_modes"] == 25
    assert r["high_quality"] == 1.0 and r["reverse_kl"] == pytest.approx(0.0, abs=1e-15)
    assert r["per_mode"] == [100] * 25 and r["n_samples"] == 2500


def test_mode_metrics_one_mode_only():
    centers, std = toy_modes("ring")
    samples = np.tile(centers[5], (800, 1))
    r = M.mode_metrics(samples, centers, std)
    assert r["modes_covered"] == 1 and r["high_quality"] == 1.0
    assert r["reverse_kl"] == pytest.approx(math.log(8))
    assert r["per_mode"] == [0] * 5 + [800] + [0] * 2


def test_mode_metrics_off_mode_junk_and_uneven_split():
    centers, std = ring_modes(), 0.02
    good = np.concatenate([np.tile(centers[0], (300, 1)), np.tile(centers[1], (100, 1))])
    junk = np.zeros((400, 2))  # the ring's centre: 2 away from every mode
    r = M.mode_metrics(np.concatenate([good, junk]), centers, std)
    assert r["modes_covered"] == 2 and r["high_quality"] == 0.5
    # q = (3/4, 1/4): KL(q || 1/8) = 3/4 log 6 + 1/4 log 2
    assert r["reverse_kl"] == pytest.approx(0.75 * math.log(6) + 0.25 * math.log(2))
    # min_count: mode 1 has 100 high-quality samples
    assert M.mode_metrics(good, centers, std, min_count=101)["modes_covered"] == 1


def test_mode_metrics_three_sigma_boundary():
    centers = grid_modes()
    std = 0.05
    r = M.mode_metrics(np.array([[0.0, 0.1499], [0.0, 0.1501]] * 200), centers, std)
    assert r["high_quality"] == 0.5 and r["per_mode"][12] == 200


def test_mode_metrics_warnings_and_errors():
    centers, std = toy_modes("grid")
    with pytest.warns(M.SampleSizeWarning, match="25 modes"):
        M.mode_metrics(centers[:10], centers, std)
    with pytest.warns(M.SampleSizeWarning, match="no high-quality"):
        r = M.mode_metrics(np.full((300, 2), 100.0), centers, std)
    assert r["modes_covered"] == 0 and r["high_quality"] == 0.0 and math.isnan(r["reverse_kl"])
    with pytest.raises(ValueError):
        M.mode_metrics(np.zeros((300, 3)), centers, std)
    with pytest.raises(ValueError, match="NaN"):
        M.mode_metrics(np.full((300, 2), np.nan), centers, std)


def test_sampling_mode_coverage_is_mode_metrics():
    """One rule for the training logs (sampling.mode_coverage) and `rawgan eval`
    (metrics.mode_metrics): the same numbers for the same points."""
    from rawgan.sampling import mode_coverage

    rng = np.random.default_rng(0)
    for name in ("ring", "grid"):
        centers, std = toy_modes(name)
        pts = np.concatenate([sample_mixture(2000, rng, centers[:5], std),
                              rng.uniform(-5, 5, (500, 2))])
        a, b = mode_coverage(pts, centers, std), M.mode_metrics(pts, centers, std)
        assert json.dumps(a) == json.dumps(b)  # every key, every value
        assert mode_coverage(pts[:, None, :], centers, std)["per_mode"] == b["per_mode"]
    # the default rule: one high-quality sample covers a mode (VEEGAN / PacGAN code), so 5
    # of 2,500 count; a stricter min_count is an argument of both
    centers, std = toy_modes("ring")
    pts = np.concatenate([np.tile(centers[0], (2495, 1)), np.tile(centers[1], (5, 1))])
    assert mode_coverage(pts, centers, std)["modes_covered"] == 2
    assert mode_coverage(pts, centers, std, min_count=20)["modes_covered"] == 1
    assert M.mode_metrics(pts, centers, std, min_count=20)["modes_covered"] == 1


def test_evaluate_toy_on_the_true_mixture():
    centers, std = toy_modes("ring")

    def sample(n, seed):
        return sample_mixture(n, np.random.default_rng(seed + 100), centers, std)

    out = M.evaluate_toy(sample, "ring", n=2500, seed=0)
    assert out["generator"]["modes_covered"] == 8 and out["real"]["modes_covered"] == 8
    assert out["generator"]["high_quality"] > 0.98 and out["generator"]["reverse_kl"] < 0.01
    assert "8 / 8" in M.format_results(out)


# --------------------------------------------------------------------------------------
# image evaluation on the shipped classifier
# --------------------------------------------------------------------------------------


def test_noise_images():
    x = M.noise_images(5, 0)
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(x, M.noise_images(5, 0))


def test_features_warn_on_wrong_range():
    x = np.random.default_rng(0).uniform(0, 1, (4, 28, 28, 1)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"\[0, 1\]"):
        M.features(x)
    with pytest.warns(UserWarning, match="expects images in"):
        M.features(255 * x)


def test_evaluate_generator_rows(mnist_dir):
    from rawgan.data import load_mnist

    images, _ = load_mnist("test", data_dir=mnist_dir, download=False)
    # t10k's first 5,000 images (NIST SD-3 writers) differ from its last 5,000 (SD-1): draw
    # the "real" set and the perfect generator's images from the same range, interleaved
    real, held_back = images[:3000:2], images[1:3000:2]
    kw = {"kid_subsets": 10, "kid_subset_size": 300, "splits": 5}

    class Perfect:  # returns real images it is not compared with
        def sample(self, n, seed=None):
            return held_back[:n]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.SampleSizeWarning)
        out = M.evaluate_generator(Perfect(), real, seed=0, **kw)
    rr, rn, g = out["real_vs_real"], out["real_vs_noise"], out["generator"]
    assert out["n"] == 750 and out["n_reference"] == 750 and rr["n"] == 750
    assert rn["fld"] > 50 * rr["fld"] and rn["kid"] > 50 * abs(rr["kid"])
    assert rr["score"] > 8.5 and rn["score"] < 3
    assert g["fld"] < 3 * rr["fld"] and g["score"] > 8.5
    text = M.format_results(out)
    for row in ("generator", "real_vs_real", "real_vs_noise"):
        assert row in text

    # a callable f(n) and the reference rows alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.SampleSizeWarning)
        only = M.evaluate_generator(None, real, n=500, seed=0, **kw)
        fn = M.evaluate_generator(lambda n: M.noise_images(n, 5), real, n=500,
                                  references=False, **kw)
    assert "generator" not in only and only["real_vs_real"]["n"] == 500
    assert set(fn) >= {"generator"} and "real_vs_real" not in fn
    assert fn["generator"]["fld"] > 20 * only["real_vs_real"]["fld"]
    with pytest.raises(ValueError, match="n must be"):
        M.evaluate_generator(None, real, n=751)


# --------------------------------------------------------------------------------------
# from a checkpoint, and the command line
# --------------------------------------------------------------------------------------


def _export(tmp_path, name, image_shape, data):
    from rawgan import models
    from rawgan.checkpoint import export_generator

    G = models.mlp_generator(16, seed=0, image_shape=image_shape)
    return export_generator(tmp_path / name, G, model="mlp", noise_dim=16,
                            image_shape=image_shape, output_scale=4.0 if data == "ring" else 1.0,
                            config={"data": data})


def test_evaluate_checkpoint_toy_and_main(tmp_path, capsys):
    path = _export(tmp_path, "ring.h5", (2,), "ring")
    out = M.evaluate_checkpoint(path, n=800, seed=1)
    assert out["data"] == "ring" and out["n"] == 800
    assert out["real"]["modes_covered"] == 8
    from rawgan.checkpoint import load_generator
    from rawgan.data import toy_modes

    centers, std = toy_modes("ring")
    fake = load_generator(path).sample(800, seed=1).reshape(800, -1)
    assert out["generator"] == M.mode_metrics(fake, centers, std)
    assert M.main([str(path), "--n", "800", "--seed", "1", "--json",
                   str(tmp_path / "r.json")]) == 0
    assert "modes" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(
        M._jsonable(out)))
    assert M.main([str(tmp_path / "missing.h5")]) == 1
    assert "error" in capsys.readouterr().err


def test_evaluate_checkpoint_images(tmp_path, mnist_dir):
    from rawgan.data import load_mnist

    real = load_mnist("test", data_dir=mnist_dir, download=False)[0][:1000]
    path = _export(tmp_path, "mlp.h5", (28, 28, 1), "mnist")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.SampleSizeWarning)
        out = M.evaluate_checkpoint(path, n=300, real_images=real, kid_subsets=5,
                                    kid_subset_size=200, splits=3)
    g, rr = out["generator"], out["real_vs_real"]
    assert g["n"] == 300 and g["fld"] > 10 * rr["fld"]  # an untrained generator


def test_evaluate_checkpoint_refuses_a_fashion_generator(tmp_path):
    """The digit classifier's scores mean nothing for Fashion-MNIST (as train --eval-every)."""
    path = _export(tmp_path, "fashion.h5", (28, 28, 1), "fashion")
    with pytest.raises(ValueError, match="Fashion-MNIST generator"):
        M.evaluate_checkpoint(path, n=10)


# --------------------------------------------------------------------------------------
# pinned values: the classifier, the reference rows, the formulas' details
# --------------------------------------------------------------------------------------


def test_the_scoring_classifier_is_the_shipped_one():
    """Every FLD/KID/score is computed in this classifier's feature space: its weights are
    pinned by hash (replacing them must be deliberate), and results record the hash."""
    from rawgan import classifier as C

    clf = M.default_classifier()
    assert clf.weights_sha256 == C.SHIPPED_SHA256


def test_reference_rows_are_the_readme_ones(mnist_dir):
    """README.md's reference rows (seed 0, the 10,000 t10k images, the defaults): a change
    of the features layer, the covariance or the KID estimator moves them."""
    from rawgan.data import load_mnist

    real, _ = load_mnist("test", data_dir=mnist_dir, download=False)
    res = M.evaluate_generator(None, real, seed=0)
    rr, rn = res["real_vs_real"], res["real_vs_noise"]
    got = [rr["fld"], rr["kid"], rr["score"], rn["fld"], rn["kid"], rn["score"]]
    np.testing.assert_allclose(got, [1.146, 0.0152, 9.507, 324.075, 12.161, 1.160],
                               rtol=2e-3, atol=1e-4)
    from rawgan import classifier as C

    assert res["classifier"]["weights_sha256"] == C.SHIPPED_SHA256


def test_format_results_puts_each_number_in_its_column():
    row = {"fld": 1.5, "kid": 0.25, "kid_std": 0.125, "score": 7.75, "score_std": 0.5, "n": 9}
    res = {"generator": row, "n": 9, "n_reference": 10, "seed": 0,
           "classifier": {"architecture": "x", "accuracy": 0.9}}
    header, line = M.format_results(res).splitlines()[:2]
    assert header.split() == ["FLD", "KID", "±", "std", "score", "±", "std"]
    assert line.split() == ["generator", "1.500", "0.25000", "0.12500", "7.750", "0.500"]


def test_feature_statistics_is_the_unbiased_covariance():
    f = np.random.default_rng(0).standard_normal((7, 3))
    mu, cov = M.feature_statistics(f)
    np.testing.assert_allclose(mu, f.mean(0))
    d = f - f.mean(0)
    np.testing.assert_allclose(cov, d.T @ d / 6)  # n - 1


@pytest.mark.filterwarnings("ignore::rawgan.metrics.SampleSizeWarning")
def test_kid_subsets_follow_the_rng():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((60, 4)), rng.standard_normal((60, 4)) + 0.3
    a = M.kid(x, y, n_subsets=5, subset_size=20, rng=1)
    assert M.kid(x, y, n_subsets=5, subset_size=20, rng=1) == a
    assert M.kid(x, y, n_subsets=5, subset_size=20, rng=2) != a


def test_frechet_distance_of_rank_deficient_covariances_has_its_closed_form():
    """Commuting (here diagonal, singular) covariances: d^2 = |dmu|^2 + sum (sqrt a -
    sqrt b)^2."""
    a, b = np.diag([1.0, 0.0, 4.0]), np.diag([4.0, 0.0, 0.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, 0.0])
    assert M.frechet_distance(mu1, a, mu2, b) == pytest.approx(1 + (1 - 2) ** 2 + 2 ** 2,
                                                               abs=1e-12)


@pytest.mark.parametrize("cov, message", [
    ([[1.0, 5.0], [0.0, 1.0]], "cov1 is not symmetric"),
    (np.diag([-4.0, 1.0]), "cov1 is not positive semi-definite"),
])
def test_frechet_distance_refuses_what_is_not_a_covariance(cov, message):
    with pytest.raises(ValueError, match=message):
        M.frechet_distance(np.zeros(2), cov, np.zeros(2), np.eye(2))


def test_evaluate_generator_takes_the_layouts_the_classifier_takes():
    rng = np.random.default_rng(0)
    real = rng.uniform(-1, 1, (40, 28, 28))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.SampleSizeWarning)
        a = M.evaluate_generator(None, real, kid_subsets=2, kid_subset_size=10, splits=2)
        b = M.evaluate_generator(None, real.reshape(40, 784), kid_subsets=2,
                                 kid_subset_size=10, splits=2)
    assert a == b


def test_float32_covariances_with_fewer_samples_than_dimensions_are_accepted():
    """n <= d in float32: eigenvalues ~1e-6 below 0 from rounding alone are not refused."""
    f = np.random.default_rng(0).standard_normal((50, 64)).astype(np.float32)
    f -= f.mean(0)
    c = f.T @ f / 49
    assert np.linalg.eigvalsh(c.astype(np.float64))[0] < -1e-9  # the case this is about
    assert M.frechet_distance(np.zeros(64), c, np.zeros(64), c) == pytest.approx(0, abs=1e-6)
