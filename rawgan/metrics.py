"""What a GAN learned, in numbers: scores on a pinned MNIST classifier, and mode coverage.

Image metrics (MNIST-like ``(N, 28, 28, 1)`` images in ``[-1, 1]``) are computed in the
feature space of rawgan's own classifier (:mod:`rawgan.classifier`, weights shipped in
the package), as TF-GAN's MNIST example and the "Frechet LeNet Distance" do; Inception
features are neither available here nor meaningful for 28x28 digits.

* **FLD**, the Frechet distance between Gaussians fitted to the classifier's penultimate
  features of real and generated images (FID's formula, LeNet's features):
  ``|mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2)``. Lower is better.
* **KID**, the kernel distance: an unbiased estimate of the squared MMD with the cubic
  polynomial kernel ``k(x, y) = (x.y / d + 1)^3`` (Binkowski et al. 2018), averaged over
  random subsets, with its standard deviation. Unbiased: about 0 (it can be negative) for
  two samples of the same distribution, whatever the sample size.
* **Classifier score**, the Inception Score with the MNIST classifier:
  ``exp(E_x KL(p(y|x) || p(y)))``, mean and std over splits. Between 1 (every image gets
  the same prediction) and 10 (confident predictions, all digits equally often).

Every estimate depends on the sample size (FLD is biased upward at small n), so numbers
are comparable only at equal n. :func:`evaluate_generator` therefore scores every row
against the same real reference half with equal-sized sets, and prints two reference rows:
**real vs real** (two disjoint halves of the real images: the floor a perfect generator
reaches) and **real vs noise** (uniform noise images: a generator that learned nothing).

Toy data (the 2-D ring of 8 and grid of 25 Gaussians): :func:`mode_metrics`, the
VEEGAN / PacGAN protocol. A sample is **high quality** when it lies within 3 standard
deviations of its nearest mode centre (Euclidean distance ``< 3 * std``; the modes are
isotropic, so this is the published code's standardised distance); a mode is **covered**
when at least ``min_count`` high-quality samples fall on it (default 1, the rule of the
VEEGAN and PacGAN evaluation code, with 2,500 samples); the **reverse KL** is
``KL(q || uniform) = sum_k q_k log(K q_k)`` where ``q`` is the histogram of high-quality
samples over the K modes: 0 when they are spread evenly, ``log K`` when they all sit on one
mode.

Estimates from too few samples raise a :class:`SampleSizeWarning` (a ``UserWarning``).
Core code needs numpy (and h5py for the classifier weights) only.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_KID_SUBSET_SIZE",
    "DEFAULT_KID_SUBSETS",
    "DEFAULT_SPLITS",
    "MIN_FLD_SAMPLES",
    "MIN_MODE_SAMPLES_PER_MODE",
    "MIN_SCORE_SAMPLES_PER_SPLIT",
    "SampleSizeWarning",
    "classifier_score",
    "classifier_score_from_probs",
    "default_classifier",
    "evaluate_checkpoint",
    "evaluate_generator",
    "evaluate_toy",
    "features",
    "feature_statistics",
    "fld",
    "fld_from_features",
    "format_results",
    "frechet_distance",
    "kid",
    "main",
    "mode_metrics",
    "noise_images",
]

#: Below this many samples per set, FLD (and the covariance behind it) warns.
MIN_FLD_SAMPLES = 1000
#: KID's default: 100 subsets of 1,000 samples per set (Binkowski et al.'s reference code).
DEFAULT_KID_SUBSETS = 100
DEFAULT_KID_SUBSET_SIZE = 1000
#: Below this subset size, KID warns (its spread grows as 1 / subset size).
MIN_KID_SUBSET_SIZE = 100
#: Classifier score: 10 splits (as the Inception Score); warn below 100 samples per split.
DEFAULT_SPLITS = 10
MIN_SCORE_SAMPLES_PER_SPLIT = 100
#: Mode metrics warn below 10 samples per mode (a covered mode could then read as missed).
MIN_MODE_SAMPLES_PER_MODE = 10


class SampleSizeWarning(UserWarning):
    """Too few samples for a stable estimate; the number is noisy or biased."""


def _warn(message: str) -> None:
    warnings.warn(message, SampleSizeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix, ``V diag(sqrt(max(w, 0))) V^T``."""
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _cov_tol(*arrays) -> float:
    """Rounding allowed, relative to the largest entry (per dimension for eigenvalues), for
    covariances given in the dtype of ``arrays``: float32 ones (n <= d) have eigenvalues
    ~1e-6 below 0 from rounding alone."""
    eps = max((np.finfo(a.dtype).eps for a in map(np.asarray, arrays)
               if np.issubdtype(a.dtype, np.floating)), default=np.finfo(np.float64).eps)
    return max(1e-9, 100.0 * float(eps))


def _check_covariance(c: np.ndarray, name: str, tol: float = 1e-9) -> np.ndarray:
    """``c`` symmetrised, after checking it is a covariance up to rounding: symmetric and
    positive semi-definite (a sample covariance's smallest eigenvalues are ~1e-16 below 0
    when n <= d; a matrix that is not a covariance would give a meaningless distance)."""
    scale = max(float(np.abs(c).max()), 1e-300)
    asym = float(np.abs(c - c.T).max())
    if asym > tol * scale:
        raise ValueError(f"frechet_distance: {name} is not symmetric (max |C - C^T| = "
                         f"{asym:.3g}); expected a covariance matrix")
    c = 0.5 * (c + c.T)
    low = float(np.linalg.eigvalsh(c)[0])
    if low < -tol * scale * c.shape[0]:
        raise ValueError(f"frechet_distance: {name} is not positive semi-definite (smallest "
                         f"eigenvalue {low:.3g}); expected a covariance matrix")
    return c


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2), squared.

    ``d^2 = |mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2)``, in float64.

    FID's usual code computes ``sqrtm(C1 @ C2)``, a square root of a NON-symmetric matrix
    that comes back with spurious imaginary parts and needs scipy. Here: ``C1 C2`` and the
    symmetric PSD matrix ``M = C1^1/2 C2 C1^1/2`` have the same eigenvalues (``AB`` and
    ``BA`` share them, with ``A = C1^1/2``, ``B = C1^1/2 C2``), so
    ``tr sqrt(C1 C2) = sum_i sqrt(lambda_i(M))``; ``C1^1/2`` and ``lambda(M)`` come from
    symmetric eigendecompositions (``eigh``), real by construction, and the eigenvalues that
    rounding pushes below zero are clipped to 0. The result is clipped at 0 as well (it can
    only be negative by rounding, for identical statistics).
    """
    tol = _cov_tol(cov1, cov2)
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    cov1 = np.atleast_2d(np.asarray(cov1, dtype=np.float64))
    cov2 = np.atleast_2d(np.asarray(cov2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.ndim != 1 or mu2.shape != mu1.shape:
        raise ValueError(f"frechet_distance: means of shapes {mu1.shape} and {mu2.shape}; "
                         f"expected two vectors of one length")
    if cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"frechet_distance: covariances of shapes {cov1.shape} and "
                         f"{cov2.shape}; expected ({d}, {d})")
    for name, arr in (("mu1", mu1), ("cov1", cov1), ("mu2", mu2), ("cov2", cov2)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"frechet_distance: {name} contains NaN or inf")
    cov1 = _check_covariance(cov1, "cov1", tol)
    cov2 = _check_covariance(cov2, "cov2", tol)
    s1 = _psd_sqrt(cov1)
    m = s1 @ cov2 @ s1
    lam = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sqrt(np.clip(lam, 0.0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff) + float(np.trace(cov1)) + float(np.trace(cov2)) - 2.0 * tr_covmean
    return max(fd, 0.0)


def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d) of (n, d) features, in float64."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics: need (n >= 2, d) features, got shape {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError("feature_statistics: features contain NaN or inf")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def fld_from_features(real_feats: np.ndarray, fake_feats: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (n, d) feature sets."""
    n = min(len(real_feats), len(fake_feats))
    d = np.shape(real_feats)[1] if np.ndim(real_feats) == 2 else 0
    if n < MIN_FLD_SAMPLES:
        _warn(f"FLD from {n} samples per set: below {MIN_FLD_SAMPLES} the estimate is "
              f"biased upward and noisy; compare FLDs only at equal sample sizes")
    if n <= d:
        _warn(f"FLD from {n} samples of {d}-dimensional features: the covariance is singular")
    return frechet_distance(*feature_statistics(real_feats), *feature_statistics(fake_feats))


# --------------------------------------------------------------------------------------
# classifier features
# --------------------------------------------------------------------------------------

_DEFAULT_CLASSIFIER = None


def default_classifier():
    """The shipped MNIST classifier, loaded once per process."""
    global _DEFAULT_CLASSIFIER
    if _DEFAULT_CLASSIFIER is None:
        from .classifier import load_classifier

        _DEFAULT_CLASSIFIER = load_classifier()
    return _DEFAULT_CLASSIFIER


def _check_range(images: np.ndarray, what: str) -> None:
    x = np.asarray(images)
    if x.size and np.issubdtype(x.dtype, np.floating) and np.all(np.isfinite(x)):
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.01 or hi > 1.01:
            warnings.warn(f"{what}: values span [{lo:.3g}, {hi:.3g}]; the classifier expects "
                          f"images in [-1, 1] (pixel / 127.5 - 1)", UserWarning, stacklevel=3)
        elif lo >= 0.0 and x.shape[0] > 1:
            warnings.warn(f"{what}: no value is negative; images in [0, 1] must be rescaled "
                          f"to [-1, 1] (2 * x - 1) first", UserWarning, stacklevel=3)


def features(images: np.ndarray, classifier=None, batch_size: int = 500) -> np.ndarray:
    """Penultimate-layer activations ``(N, 128)`` (float32) of ``classifier`` (default:
    the shipped one) for images ``(N, 28, 28, 1)`` in ``[-1, 1]``."""
    clf = classifier or default_classifier()
    _check_range(images, "features")
    return clf.features(images, batch_size=batch_size)


def fld(real: np.ndarray, fake: np.ndarray, classifier=None, batch_size: int = 500) -> float:
    """Frechet LeNet Distance: Frechet distance between real and fake images in the
    classifier's feature space (see :func:`frechet_distance`). Lower is better."""
    return fld_from_features(features(real, classifier, batch_size),
                             features(fake, classifier, batch_size))


# --------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two (m, d) samples with ``k(a, b) = (a.b / d + 1)^3``::

        sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
        - 2 sum_{i, j} k(x_i, y_j) / (m n)

    (the diagonal terms k(x_i, x_i), whose expectation is not E k(x, x'), are left out).
    """
    d = x.shape[1]
    m, n = len(x), len(y)
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.sum() / (m * n))


def kid(real_feats: np.ndarray, fake_feats: np.ndarray, n_subsets: int = DEFAULT_KID_SUBSETS,
        subset_size: int = DEFAULT_KID_SUBSET_SIZE,
        rng: np.random.Generator | int | None = None) -> tuple[float, float]:
    """Kernel distance (KID) between two (n, d) feature sets: ``(mean, std)`` over subsets.

    Each of ``n_subsets`` rounds draws ``subset_size`` rows of each set without replacement
    (``rng``: a Generator or a seed; default seed 0, so the number is reproducible) and
    computes the unbiased MMD^2 with the cubic polynomial kernel (see
    :func:`_mmd2_unbiased`). ``subset_size`` is reduced to the smaller set's size, with a
    warning. The mean is the KID; the std is the spread of one subset's estimate.
    """
    x = np.asarray(real_feats, dtype=np.float64)
    y = np.asarray(fake_feats, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"kid: need two (n, d) feature sets of one width, got {x.shape} and "
                         f"{y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("kid: features contain NaN or inf")
    if int(n_subsets) < 1:
        raise ValueError(f"kid: n_subsets must be >= 1, got {n_subsets!r}")
    n_max = min(len(x), len(y))
    if n_max < 2:
        raise ValueError(f"kid: need at least 2 samples per set, got {len(x)} and {len(y)}")
    m = int(subset_size)
    if m < 2:
        raise ValueError(f"kid: subset_size must be >= 2, got {subset_size!r}")
    if m > n_max:
        _warn(f"KID: subset_size {m} exceeds the smaller set ({n_max} samples); using "
              f"{n_max}")
        m = n_max
    if m < MIN_KID_SUBSET_SIZE:
        _warn(f"KID from subsets of {m} samples: below {MIN_KID_SUBSET_SIZE} its spread is "
              f"large; prefer {DEFAULT_KID_SUBSET_SIZE}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(0 if rng is None else rng)
    est = np.empty(int(n_subsets))
    for s in range(int(n_subsets)):
        xi = x[rng.choice(len(x), m, replace=False)]
        yi = y[rng.choice(len(y), m, replace=False)]
        est[s] = _mmd2_unbiased(xi, yi)
    return float(est.mean()), float(est.std(ddof=1)) if len(est) > 1 else 0.0


# --------------------------------------------------------------------------------------
# classifier score (Inception Score analogue)
# --------------------------------------------------------------------------------------


def classifier_score_from_probs(probs: np.ndarray, splits: int = DEFAULT_SPLITS
                                ) -> tuple[float, float]:
    """``exp(E_x KL(p(y|x) || p(y)))`` from (N, K) class probabilities: ``(mean, std)``
    over ``splits`` consecutive chunks (``p(y)`` is each chunk's mean prediction).

    With ``0 log 0 = 0``: KL(p || q) = sum_{k: p_k > 0} p_k (log p_k - log q_k).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"classifier_score: need (N, K) probabilities, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or p.min() < 0 or not np.allclose(p.sum(axis=1), 1.0,
                                                                     atol=1e-6):
        raise ValueError("classifier_score: rows must be probability vectors (>= 0, sum 1)")
    splits = int(splits)
    if not 1 <= splits <= len(p):
        raise ValueError(f"classifier_score: splits must be in [1, {len(p)}], got {splits}")
    if len(p) // splits < MIN_SCORE_SAMPLES_PER_SPLIT:
        _warn(f"classifier score from {len(p) // splits} samples per split: below "
              f"{MIN_SCORE_SAMPLES_PER_SPLIT} p(y) is poorly estimated")
    scores = []
    for chunk in np.array_split(p, splits):
        py = chunk.mean(axis=0)
        logp = np.log(np.where(chunk > 0, chunk, 1.0))
        logpy = np.log(np.where(py > 0, py, 1.0))
        kl = (chunk * (logp - logpy)).sum(axis=1)
        scores.append(math.exp(float(kl.mean())))
    scores_a = np.asarray(scores)
    return float(scores_a.mean()), float(scores_a.std())


def classifier_score(fake: np.ndarray, classifier=None, splits: int = DEFAULT_SPLITS,
                     batch_size: int = 500) -> tuple[float, float]:
    """Inception Score analogue on the MNIST classifier for images ``fake``:
    ``(mean, std)`` over ``splits`` (see :func:`classifier_score_from_probs`)."""
    clf = classifier or default_classifier()
    _check_range(fake, "classifier_score")
    return classifier_score_from_probs(clf.probabilities(fake, batch_size), splits)


# --------------------------------------------------------------------------------------
# toy data: mode coverage
# --------------------------------------------------------------------------------------


def mode_metrics(samples: np.ndarray, centers: np.ndarray, std: float, *,
                 n_sigma: float = 3.0, min_count: int = 1) -> dict[str, Any]:
    """Mode coverage of 2-D (or any-D) ``samples`` on a mixture with ``centers`` (K, D).

    Each sample goes to its nearest centre; it is high quality when that Euclidean
    distance is below ``n_sigma * std``. Returns a dict:

    ``modes_covered``  modes with at least ``min_count`` high-quality samples (int)
    ``n_modes``        K
    ``high_quality``   fraction of all samples that are high quality (float in [0, 1])
    ``reverse_kl``     KL(q || uniform) = sum_k q_k log(K q_k) over the histogram q of the
                       high-quality samples (0 = spread evenly, log K = one mode); NaN
                       when no sample is high quality
    ``per_mode``       high-quality count per mode (list of K ints)
    ``n_samples``, ``min_count``, ``n_sigma``
    """
    pts = np.asarray(samples, dtype=np.float64)
    c = np.asarray(centers, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] < 1:
        raise ValueError(f"mode_metrics: centers must be (K, D), got shape {c.shape}")
    if pts.ndim != 2 or pts.shape[1] != c.shape[1]:
        raise ValueError(f"mode_metrics: samples must be (n, {c.shape[1]}), got shape "
                         f"{pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError("mode_metrics: samples contain NaN or inf (the generator diverged?)")
    if not float(std) > 0:
        raise ValueError(f"mode_metrics: std must be > 0, got {std!r}")
    if int(min_count) < 1:
        raise ValueError(f"mode_metrics: min_count must be >= 1, got {min_count!r}")
    k, n = len(c), len(pts)
    if n < MIN_MODE_SAMPLES_PER_MODE * k:
        _warn(f"mode metrics from {n} samples for {k} modes: below "
              f"{MIN_MODE_SAMPLES_PER_MODE * k} a covered mode may read as missed "
              f"(2,500 is the published protocol)")
    if n:
        d2 = ((pts[:, None, :] - c[None, :, :]) ** 2).sum(axis=-1)
        nearest = d2.argmin(axis=1)
        good = np.sqrt(d2[np.arange(n), nearest]) < float(n_sigma) * float(std)
        per_mode = np.bincount(nearest[good], minlength=k)
    else:
        good = np.zeros(0, dtype=bool)
        per_mode = np.zeros(k, dtype=np.int64)
    total = int(per_mode.sum())
    if total:
        q = per_mode / total
        nz = q > 0
        reverse_kl = float((q[nz] * np.log(k * q[nz])).sum())
    else:
        _warn("mode metrics: no high-quality sample, the reverse KL is undefined (NaN)")
        reverse_kl = float("nan")
    return {
        "modes_covered": int((per_mode >= int(min_count)).sum()),
        "n_modes": k,
        "high_quality": float(good.mean()) if n else 0.0,
        "reverse_kl": reverse_kl,
        "per_mode": [int(v) for v in per_mode],
        "n_samples": n,
        "min_count": int(min_count),
        "n_sigma": float(n_sigma),
    }


# --------------------------------------------------------------------------------------
# whole-generator evaluation
# --------------------------------------------------------------------------------------


def noise_images(n: int, rng: np.random.Generator | int | None = 0,
                 shape: tuple[int, ...] = (28, 28, 1)) -> np.ndarray:
    """``n`` images of i.i.d. uniform noise in [-1, 1], float32: the "learned nothing" row."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return rng.uniform(-1.0, 1.0, size=(int(n), *shape)).astype(np.float32)


def _sampler(G_or_sample_fn) -> Callable[[int, int], np.ndarray]:
    """Turn a generator into ``f(n, seed) -> images``: anything with ``.sample(n, seed=)``
    (:class:`rawgan.checkpoint.GeneratorSampler`), or a callable ``f(n)`` / ``f(n, seed)``."""
    if hasattr(G_or_sample_fn, "sample"):
        return lambda n, seed: G_or_sample_fn.sample(n, seed=seed)
    if not callable(G_or_sample_fn):
        raise TypeError(f"evaluate: expected a generator with .sample(n, seed=...) or a "
                        f"callable returning images, got {type(G_or_sample_fn).__name__}")
    try:
        inspect.signature(G_or_sample_fn).bind(1, 0)
        takes_seed = True
    except (TypeError, ValueError):  # f(n) only, or a signature that cannot be read
        takes_seed = False
    if takes_seed:
        return lambda n, seed: G_or_sample_fn(n, seed)
    return lambda n, seed: G_or_sample_fn(n)


def _row(ref_feats: np.ndarray, feats: np.ndarray, probs: np.ndarray, *, kid_subsets: int,
         kid_subset_size: int, splits: int, seed: int) -> dict[str, float]:
    kmean, kstd = kid(ref_feats, feats, kid_subsets, kid_subset_size,
                      rng=np.random.default_rng(seed))
    smean, sstd = classifier_score_from_probs(probs, splits)
    return {"fld": fld_from_features(ref_feats, feats), "kid": kmean, "kid_std": kstd,
            "score": smean, "score_std": sstd, "n": int(len(feats))}


def _reference_features(images: np.ndarray, clf, batch_size: int) -> np.ndarray:
    """Features of the real reference half, remembered on the classifier object (one entry,
    keyed by the images' content), so periodic evaluation during training computes them
    once."""
    key = (images.shape, str(images.dtype),
           hashlib.sha1(np.ascontiguousarray(images).view(np.uint8)).hexdigest())
    cached = getattr(clf, "_reference_cache", None)
    if cached is None or cached[0] != key:
        cached = (key, features(images, clf, batch_size))
        try:
            clf._reference_cache = cached
        except AttributeError:  # an object that takes no new attributes: no cache
            pass
    return cached[1]


def evaluate_generator(G_or_sample_fn, real_images: np.ndarray, n: int | None = None,
                       seed: int = 0, *, classifier=None, batch_size: int = 500,
                       kid_subsets: int = DEFAULT_KID_SUBSETS,
                       kid_subset_size: int = DEFAULT_KID_SUBSET_SIZE,
                       splits: int = DEFAULT_SPLITS, references: bool = True
                       ) -> dict[str, Any]:
    """Score a generator of MNIST-like images against ``real_images``, with reference rows.

    The real images are shuffled (``seed``) and cut into two disjoint halves A and B. Every
    row compares a set of ``n`` images (default ``len(B)``, at most ``len(B)``) with the
    SAME reference half A, so the rows are comparable:

    ``generator``       ``n`` samples of the generator (``seed`` picks the noise) vs A
    ``real_vs_real``    the first ``n`` images of B vs A (the floor: what a perfect
                        generator would score)
    ``real_vs_noise``   ``n`` uniform-noise images in [-1, 1] vs A (a reference point for
                        a generator that learned nothing; not an upper bound: a collapsed
                        generator can score worse)

    Each row: ``fld``, ``kid``, ``kid_std``, ``score``, ``score_std`` (the classifier score
    of the row's own images) and ``n``. ``G_or_sample_fn``: an object with
    ``.sample(n, seed=...)`` (``rawgan.load_generator(path)``), a callable ``f(n, seed)`` or
    ``f(n)`` returning ``(n, 28, 28, 1)`` images in [-1, 1], or None (reference rows only).
    ``references=False`` skips the two reference rows.

    Returns ``{"generator": row, "real_vs_real": row, "real_vs_noise": row, "n_reference":
    len(A), "n": n, "seed": seed, "classifier": {...}}``.
    """
    clf = classifier or default_classifier()
    real = np.asarray(real_images)
    if real.ndim in (2, 3) and len(real) >= 4:  # (N, 784) or (N, 28, 28), as features() takes
        real = clf._check(real)
    if real.ndim != 4 or len(real) < 4:
        raise ValueError(f"evaluate_generator: real_images must be (N >= 4, 28, 28, 1), got "
                         f"shape {real.shape}")
    order = np.random.default_rng(seed).permutation(len(real))
    half = len(real) // 2
    a, b = real[order[:half]], real[order[half:2 * half]]
    n = len(b) if n is None else int(n)
    if not 2 <= n <= len(b):
        raise ValueError(f"evaluate_generator: n must be in [2, {len(b)}] (half the real "
                         f"images), got {n}")
    kw = {"kid_subsets": kid_subsets, "kid_subset_size": min(kid_subset_size, n),
          "splits": min(splits, n), "seed": seed}
    if kid_subset_size > n:
        _warn(f"KID: subset_size {kid_subset_size} exceeds n = {n}; using {n}")
    ref_feats = _reference_features(a, clf, batch_size)
    out: dict[str, Any] = {"n_reference": int(len(a)), "n": n, "seed": int(seed),
                           "classifier": {**{k: clf.meta.get(k) for k in
                                             ("architecture", "accuracy", "split")},
                                          "weights_sha256": clf.weights_sha256}}
    sets: dict[str, np.ndarray] = {}
    if G_or_sample_fn is not None:
        fake = np.asarray(_sampler(G_or_sample_fn)(n, seed))
        if fake.shape[0] != n:
            raise ValueError(f"evaluate_generator: asked for {n} samples, got {fake.shape[0]}")
        sets["generator"] = fake
    if references:
        sets["real_vs_real"] = b[:n]
        sets["real_vs_noise"] = noise_images(n, np.random.default_rng([seed, 1]),
                                             tuple(real.shape[1:]))
    for name, imgs in sets.items():
        if name == "generator":
            _check_range(imgs, "evaluate_generator")
        out[name] = _row(ref_feats, *clf.features_and_probabilities(imgs, batch_size), **kw)
    return out


def evaluate_toy(G_or_sample_fn, name: str, n: int = 2500, seed: int = 0, *,
                 min_count: int = 1) -> dict[str, Any]:
    """Mode metrics of ``n`` samples of a toy generator on the named mixture ("ring" or
    "grid"), with the real mixture's own metrics as the reference row ``"real"``."""
    from .data import sample_mixture, toy_modes

    centers, std = toy_modes(name)
    fake = np.asarray(_sampler(G_or_sample_fn)(n, seed), dtype=np.float64).reshape(n, -1)
    real = sample_mixture(n, np.random.default_rng(seed), centers, std)
    return {"generator": mode_metrics(fake, centers, std, min_count=min_count),
            "real": mode_metrics(real, centers, std, min_count=min_count),
            "data": name, "n": int(n), "seed": int(seed)}


def _real_images(data_dir, download: bool | None) -> np.ndarray:
    """The 10,000 real MNIST test images; downloaded when missing if ``download`` (default:
    only when no ``data_dir`` was given)."""
    from .data import load_mnist

    return load_mnist("test", data_dir=data_dir,
                      download=data_dir is None if download is None else download)[0]


def evaluate_checkpoint(path, n: int | None = None, seed: int = 0, *, data_dir=None,
                        real_images: np.ndarray | None = None, toy: str | None = None,
                        min_count: int = 1, download: bool | None = None,
                        **image_kwargs) -> dict[str, Any]:
    """Load a generator checkpoint (``rawgan.load_generator``) and evaluate it.

    A generator of 2-D points is scored with :func:`evaluate_toy` on ``toy`` (default: the
    checkpoint config's ``data``) with ``n`` samples (default 2,500) and ``min_count``; an
    image generator with :func:`evaluate_generator` against ``real_images`` (default: the
    10,000 real MNIST test images, ``rawgan.data.load_mnist("test", data_dir=...)``,
    downloaded when missing if ``download``; default: only without ``data_dir``),
    ``image_kwargs`` passed on (``kid_subsets``, ``kid_subset_size``, ``splits``,
    ``classifier``, ``batch_size``, ``references``).
    """
    from .checkpoint import load_generator

    gen = load_generator(path)
    if tuple(gen.image_shape) == (2,):
        name = toy or gen.config.get("data")
        if name not in ("ring", "grid"):
            raise ValueError(f"{path}: a 2-D generator, but its toy data set is unknown "
                             f"({name!r}); pass toy='ring' or 'grid'")
        return evaluate_toy(gen, name, n=2500 if n is None else n, seed=seed,
                            min_count=min_count)
    if toy is not None:
        raise ValueError(f"{path}: toy={toy!r} (--toy) is for generators of 2-D points; this "
                         f"one makes images of shape {tuple(gen.image_shape)}")
    if real_images is None:
        if gen.config.get("data") == "fashion":
            raise ValueError(f"{path}: a Fashion-MNIST generator; the scores use rawgan's "
                             "pinned MNIST digit classifier, which means nothing for it (pass "
                             "real_images= to score against images of your own)")
        real_images = _real_images(data_dir, download)
    return evaluate_generator(gen, real_images, n=n, seed=seed, **image_kwargs)


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table of :func:`evaluate_generator` or :func:`evaluate_toy` results."""
    if "real" in results:  # toy
        lines = [f"{'':14} {'modes':>9} {'high quality':>13} {'reverse KL':>11}"]
        for row in ("generator", "real"):
            r = results[row]
            lines.append(f"{row:14} {r['modes_covered']:>4d} / {r['n_modes']:<2d} "
                         f"{100 * r['high_quality']:12.1f}% {r['reverse_kl']:11.4f}")
        lines.append(f"({results['data']}, {results['n']} samples, seed {results['seed']}; "
                     f"high quality = within 3 std of the nearest mode)")
        return "\n".join(lines)
    lines = [f"{'':15} {'FLD':>9} {'KID':>10} {'± std':>9} {'score':>7} {'± std':>6}"]
    for row in ("generator", "real_vs_real", "real_vs_noise"):
        if row in results:
            r = results[row]
            lines.append(f"{row:15} {r['fld']:9.3f} {r['kid']:10.5f} {r['kid_std']:9.5f} "
                         f"{r['score']:7.3f} {r['score_std']:6.3f}")
    lines.append(f"({results['n']} images per row vs {results['n_reference']} real reference "
                 f"images; seed {results['seed']}; classifier "
                 f"{results['classifier'].get('architecture')}, held-out accuracy "
                 f"{results['classifier'].get('accuracy')})")
    return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def main(argv: list[str] | None = None) -> int:
    """``rawgan eval [CHECKPOINT]``: score a generator (FLD, KID, classifier score on the
    pinned MNIST classifier; mode coverage for toy data) with reference rows."""
    p = argparse.ArgumentParser(prog="rawgan eval", description=main.__doc__)
    p.add_argument("checkpoint", nargs="?", help="generator export or training checkpoint; "
                   "omit it to print the reference rows only")
    p.add_argument("--n", type=int, default=None, help="samples per row (default: half the "
                   "real images, 5,000; toy data: 2,500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise, the real halves "
                   "and the KID subsets (default: 0)")
    p.add_argument("--data-dir", default=None, help="folder with the MNIST t10k files "
                   "(default: rawgan.data's search path)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                   help="download the t10k files when they are missing (default: only "
                        "without --data-dir)")
    p.add_argument("--kid-subsets", type=int, default=DEFAULT_KID_SUBSETS,
                   help=f"random subsets KID is averaged over (default: "
                        f"{DEFAULT_KID_SUBSETS})")
    p.add_argument("--kid-subset-size", type=int, default=DEFAULT_KID_SUBSET_SIZE,
                   help=f"samples per KID subset (default: {DEFAULT_KID_SUBSET_SIZE}; at most "
                        "--n)")
    p.add_argument("--splits", type=int, default=DEFAULT_SPLITS,
                   help="splits of the classifier score (default: 10)")
    p.add_argument("--toy", choices=("ring", "grid"), default=None,
                   help="toy data set of a 2-D generator (default: from its config)")
    p.add_argument("--min-count", type=int, default=1, help="high-quality samples a toy "
                   "mode needs to count as covered (default: 1)")
    p.add_argument("--json", dest="json_path", default=None,
                   help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 2:
        p.error("--n must be >= 2")
    for flag, value, low in (("--kid-subsets", args.kid_subsets, 1),
                             ("--kid-subset-size", args.kid_subset_size, 2),
                             ("--splits", args.splits, 1), ("--min-count", args.min_count, 1)):
        if value < low:  # before minutes of sampling and feature extraction
            p.error(f"{flag} must be >= {low}, got {value}")
    try:
        if args.checkpoint is None:

            real = _real_images(args.data_dir, args.download)
            results = evaluate_generator(None, real, n=args.n, seed=args.seed,
                                         kid_subsets=args.kid_subsets,
                                         kid_subset_size=args.kid_subset_size,
                                         splits=args.splits)
        else:
            results = evaluate_checkpoint(args.checkpoint, n=args.n, seed=args.seed,
                                          data_dir=args.data_dir, toy=args.toy,
                                          min_count=args.min_count, download=args.download,
                                          kid_subsets=args.kid_subsets,
                                          kid_subset_size=args.kid_subset_size,
                                          splits=args.splits)
    except (OSError, ValueError) as exc:
        print(f"rawgan eval: error: {exc}", file=sys.stderr)
        return 1
    print(format_results(results))
    if args.json_path:
        from .checkpoint import atomic_write

        with atomic_write(args.json_path) as tmp:
            tmp.write_text(json.dumps(_jsonable(results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
