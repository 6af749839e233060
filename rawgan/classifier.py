"""A small MNIST classifier built from rawgan's own layers, and the softmax cross-entropy loss.

rawgan scores generated digits the way TF-GAN's MNIST example and the "Frechet LeNet
Distance" do: in the feature space of a small classifier trained on MNIST, not of
Inception (whose weights cannot be downloaded here, and whose ImageNet features are a poor
fit for 28x28 digits). The classifier is trained by ``scripts/train_classifier.py`` with
rawgan's hand-written backward passes and Adam; its weights ship in the package
(``rawgan/assets/mnist_classifier.h5``) with the data split, seed and accuracy recorded as
HDF5 attributes and in ``rawgan/assets/README.md``.

Loading needs numpy and h5py only::

    clf = rawgan.classifier.load_classifier()
    clf.predict(images)          # (N,) digits; images (N, 28, 28, 1) in [-1, 1]
    clf.features(images)         # (N, 128) penultimate activations, for FLD / KID

Softmax cross-entropy, derived by hand
--------------------------------------
For one row of logits ``z`` (K classes) and a target distribution ``t`` (one-hot for an
integer label, ``sum_k t_k = 1``)::

    p_k  = softmax(z)_k = exp(z_k - m) / sum_j exp(z_j - m)      (any m; m = max_j z_j)
    L    = -sum_k t_k log p_k = logsumexp(z) - sum_k t_k z_k
    logsumexp(z) = m + log sum_j exp(z_j - m)

Subtracting the row maximum ``m`` makes every exponent <= 0, so nothing overflows, and the
largest term is exp(0) = 1, so the log never sees 0. Differentiating,
``d logsumexp(z) / dz_k = exp(z_k) / sum_j exp(z_j) = p_k`` and
``d (sum_j t_j z_j) / dz_k = t_k``, hence::

    dL/dz_k = p_k - t_k

The batch loss is the MEAN over N rows, so the gradient w.r.t. the logits is
``(softmax(z) - t) / N``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .checkpoint import arrays_sha256
from .nn import Conv2D, Dense, Dropout, Flatten, ReLU, Sequential

__all__ = [
    "ARCHITECTURE",
    "DEFAULT_WEIGHTS",
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "Classifier",
    "lenet",
    "load_classifier",
    "log_softmax",
    "save_classifier",
    "softmax",
    "softmax_cross_entropy",
]

#: Name of the architecture :func:`lenet` builds, stored with the weights.
ARCHITECTURE = "rawgan-lenet-v1"
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
#: The shipped weights.
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "assets" / "mnist_classifier.h5"
#: :func:`weights_sha256` of the shipped weights: every FLD/KID/score rawgan reports is
#: computed in their feature space, so results record it and a test pins it (retraining
#: with scripts/train_classifier.py prints the new value to put here)
SHIPPED_SHA256 = "0d4d16d2bb0c262838c8198b1d0c3e3c6d8cf44e17d5f2edfd5ecb2419e76ffa"
_MAGIC = "rawgan-classifier"
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------------------
# softmax cross-entropy
# --------------------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise ``log softmax(z) = z - logsumexp(z)``, computed as
    ``(z - m) - log sum exp(z - m)`` with ``m`` the row max (no overflow). (N, K) -> (N, K)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise ``softmax(z) = exp(z - m) / sum exp(z - m)``, ``m`` the row max. (N, K)."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


_ROW_SUM_TOL = 1e-4  # |sum_k t_nk - 1| allowed: float32 rounding of K terms, with room


def _targets(labels: np.ndarray, n: int, k: int, dtype) -> np.ndarray:
    """Integer labels (N,) -> one-hot (N, K); (N, K) probability rows pass through."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        if labels.shape[0] != n:
            raise ValueError(f"softmax_cross_entropy: {labels.shape[0]} labels for {n} rows "
                             f"of logits")
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"softmax_cross_entropy: integer labels expected, got "
                            f"{labels.dtype} (pass (N, K) float targets for soft labels)")
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"softmax_cross_entropy: labels must lie in [0, {k - 1}], got "
                             f"[{labels.min()}, {labels.max()}]")
        t = np.zeros((n, k), dtype=dtype)
        t[np.arange(n), labels] = 1
        return t
    if labels.shape != (n, k):
        raise ValueError(f"softmax_cross_entropy: targets of shape {labels.shape} do not "
                         f"match logits ({n}, {k}); pass (N,) integer labels or (N, K) rows")
    if labels.dtype.kind not in "fiub":
        raise TypeError(f"softmax_cross_entropy: targets must be real numbers, got "
                        f"{labels.dtype}")
    if not np.all(np.isfinite(labels)):
        raise ValueError("softmax_cross_entropy: targets contain NaN or inf")
    if labels.min() < 0:
        raise ValueError(f"softmax_cross_entropy: target probabilities must be >= 0, got "
                         f"{labels.min()}")
    # dL/dz = p - t relies on sum_k t_k = 1 (the general form is p sum_k t_k - t).
    row_sums = labels.sum(axis=1, dtype=np.float64)
    worst = int(np.argmax(np.abs(row_sums - 1)))
    if abs(row_sums[worst] - 1) > _ROW_SUM_TOL:
        raise ValueError(f"softmax_cross_entropy: each target row must sum to 1 (a "
                         f"distribution over the {k} classes); row {worst} sums to "
                         f"{row_sums[worst]:.6g}")
    return labels.astype(dtype, copy=False)


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy of ``logits`` and its gradient w.r.t. the logits.

    Parameters
    ----------
    logits : (N, K) float32 or float64 array, raw scores (no softmax applied).
    labels : (N,) integer class indices in ``[0, K)``, or (N, K) target distributions.

    Returns
    -------
    loss : float
        ``mean_n [logsumexp(z_n) - sum_k t_nk z_nk]`` (see the module docstring).
    dlogits : ndarray, same shape and dtype as ``logits``
        ``(softmax(z) - t) / N``.
    """
    if not hasattr(logits, "ndim") or logits.ndim != 2:
        raise ValueError(f"softmax_cross_entropy: logits must have shape (N, K), got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    if np.dtype(logits.dtype) not in _FLOAT_DTYPES:
        raise TypeError(f"softmax_cross_entropy: logits must be float32 or float64, got "
                        f"{logits.dtype}")
    n, k = logits.shape
    if n < 1 or k < 1:
        raise ValueError(f"softmax_cross_entropy: empty logits of shape {logits.shape}")
    if not np.all(np.isfinite(logits)):
        raise ValueError("softmax_cross_entropy: logits contain NaN or inf")
    t = _targets(labels, n, k, logits.dtype)
    logp = log_softmax(logits)                       # log p = z - logsumexp(z)
    loss = float(-(t * logp).sum() / n)              # L = -mean_n sum_k t log p
    dlogits = (np.exp(logp) - t) / logits.dtype.type(n)  # dL/dz = (p - t) / N
    return loss, dlogits


# --------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------


def lenet(seed: int | None = 0, dtype=np.float32, backend: str | ModuleType = "numpy",
          dropout: float = 0.3) -> Sequential:
    """The scoring classifier, ``rawgan-lenet-v1``: image (N, 28, 28, 1) -> logits (N, 10).

    Conv2D(16, 5, s1, same) -> ReLU                          (28, 28, 16)
    -> Conv2D(32, 3, s2, same) -> ReLU                       (14, 14, 32)
    -> Conv2D(32, 3, s2, same) -> ReLU                       (7, 7, 32)
    -> Conv2D(32, 3, s2, same) -> ReLU                       (4, 4, 32)
    -> Flatten -> Dense(128) -> ReLU   [the features]        (128,)
    -> Dropout(0.3) -> Dense(10)                             logits

    LeNet-5's shape with strided convolutions in place of pooling (rawgan has no pooling
    layer); 90,506 parameters (354 KiB as float32). The penultimate ReLU output (128
    values) is the feature space of FLD and KID.
    """
    return Sequential([
        Conv2D(16, 5, strides=1, padding="same"), ReLU(),
        Conv2D(32, 3, strides=2, padding="same"), ReLU(),
        Conv2D(32, 3, strides=2, padding="same"), ReLU(),
        Conv2D(32, 3, strides=2, padding="same"), ReLU(),
        Flatten(), Dense(128), ReLU(name="features"),
        Dropout(dropout), Dense(NUM_CLASSES, name="logits"),
    ], name="mnist_classifier", seed=seed, backend=backend)._built((None, *IMAGE_SHAPE), dtype)


class Classifier:
    """A trained :func:`lenet` plus its metadata; every method runs in inference mode.

    Images are ``(N, 28, 28, 1)`` (``(N, 28, 28)`` and ``(N, 784)`` are reshaped) in
    ``[-1, 1]``, the range :func:`rawgan.data.load_mnist` and a tanh generator produce.
    """

    def __init__(self, model: Sequential, meta: dict | None = None) -> None:
        self.model = model
        self.meta = dict(meta or {})
        names = [layer.name for layer in model.layers]
        if "features" not in names:
            raise ValueError("Classifier: the model has no layer named 'features'")
        self._n_features = names.index("features") + 1  # layers up to and including it

    def __repr__(self) -> str:
        acc = self.meta.get("accuracy")
        return (f"Classifier({self.meta.get('architecture', ARCHITECTURE)!r}, "
                f"accuracy={acc!r}, features={self.feature_dim})")

    @property
    def weights_sha256(self) -> str:
        """:func:`weights_sha256` of this classifier (``SHIPPED_SHA256``: the shipped one)."""
        return weights_sha256(self.model)

    @property
    def feature_dim(self) -> int:
        return _output_dim(self.model, self._n_features)

    def _check(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images)
        if x.ndim == 2 and x.shape[1] == 784:
            x = x.reshape(-1, *IMAGE_SHAPE)
        elif x.ndim == 3 and x.shape[1:] == IMAGE_SHAPE[:2]:
            x = x[..., None]
        if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"classifier: images must have shape (N, 28, 28, 1), got "
                             f"{tuple(np.shape(images))}")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"classifier: images must be floats in [-1, 1], got {x.dtype} "
                            f"(scale uint8 pixels with x / 127.5 - 1)")
        if not np.all(np.isfinite(x)):
            raise ValueError("classifier: images contain NaN or inf")
        return x.astype(self.model.dtype, copy=False)

    def _run(self, images: np.ndarray, upto: int, batch_size: int, start: int = 0,
             check: bool = True) -> np.ndarray:
        """Layers ``start..upto-1`` in inference mode, ``batch_size`` rows at a time."""
        x = self._check(images) if check else images
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        layers = self.model.layers[start:upto]
        out = []
        for i in range(0, len(x), int(batch_size)):
            h = x[i:i + int(batch_size)]
            for layer in layers:
                h = layer.forward(h, training=False)
            out.append(h)
        for layer in layers:  # drop the caches: inference keeps nothing alive
            layer._cache = None
        if not out:
            return np.zeros((0, _output_dim(self.model, upto)), dtype=self.model.dtype)
        return np.concatenate(out)

    def features_and_probabilities(self, images: np.ndarray, batch_size: int = 500
                                   ) -> tuple[np.ndarray, np.ndarray]:
        """``(features(images), probabilities(images))`` in one pass through the network."""
        feats = self._run(images, self._n_features, batch_size)
        logits = self._run(feats, len(self.model), batch_size, start=self._n_features,
                           check=False)
        return feats, softmax(logits.astype(np.float64))

    def logits(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """(N, 10) raw class scores."""
        return self._run(images, len(self.model), batch_size)

    def probabilities(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """(N, 10) ``p(y | x)`` = softmax of the logits, float64."""
        return softmax(self.logits(images, batch_size).astype(np.float64))

    def predict(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """(N,) int64 predicted digits."""
        return self.logits(images, batch_size).argmax(axis=1).astype(np.int64)

    def features(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """(N, 128) penultimate activations (the ``features`` ReLU's output)."""
        return self._run(images, self._n_features, batch_size)

    def accuracy(self, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
        """Fraction of ``images`` whose predicted digit equals ``labels``."""
        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise ValueError(f"accuracy: {labels.shape} labels for {len(images)} images")
        return float((self.predict(images, batch_size) == labels).mean())


def _output_dim(model: Sequential, upto: int) -> int:
    shape: tuple = (None, *model.input_shape)
    for layer in model.layers[:upto]:
        shape = layer.compute_output_shape(shape)
    return int(np.prod(shape[1:]))


# --------------------------------------------------------------------------------------
# weights file
# --------------------------------------------------------------------------------------


def save_classifier(path: str | os.PathLike[str], model: Sequential, **meta: Any) -> Path:
    """Write ``model``'s weights (float32, gzip) and ``meta`` (as HDF5 attributes) to ``path``.

    Layout: root attrs ``magic = "rawgan-classifier"``, ``architecture`` and every ``meta``
    key (strings and numbers as themselves, anything else as JSON); datasets
    ``/weights/<layer>/<key>``. Written atomically (temporary file + rename).
    """
    import h5py

    from .checkpoint import atomic_write

    meta = {"architecture": ARCHITECTURE, **meta}
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["magic"] = _MAGIC
        for key, value in meta.items():
            if isinstance(value, (str, int, float, bool, np.integer, np.floating)):
                f.attrs[key] = value
            else:
                f.attrs[key] = json.dumps(value)
        g = f.create_group("weights")
        for name, arr in model.get_weights().items():
            g.create_dataset(name, data=np.asarray(arr, dtype=np.float32),
                             compression="gzip", compression_opts=9, shuffle=True)
    return Path(path)


def weights_sha256(model: Sequential) -> str:
    """SHA-256 (hex) of a model's weights: for each ``layer/key`` in name order, the name,
    dtype, shape and bytes. Independent of the HDF5 file's layout and compression."""
    return arrays_sha256(sorted(model.get_weights().items()))


def load_classifier(path: str | os.PathLike[str] | None = None) -> Classifier:
    """Load the classifier weights at ``path`` (default: the shipped ones).

    Needs numpy and h5py only. Raises ``FileNotFoundError`` when the file is missing and
    ``ValueError`` when it is not a rawgan classifier file or its weights do not fit
    :func:`lenet`.
    """
    import h5py

    path = Path(DEFAULT_WEIGHTS if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights {path} not found"
                                + (" (the package was installed without its assets; "
                                   "reinstall rawgan, or train them with "
                                   "scripts/train_classifier.py)" if path == DEFAULT_WEIGHTS
                                   else ""))
    try:
        with h5py.File(path, "r") as f:
            magic = f.attrs.get("magic")
            magic = magic.decode() if isinstance(magic, bytes) else magic
            if magic != _MAGIC:
                raise ValueError(f"{path}: not a rawgan classifier file (no {_MAGIC!r} marker)")
            meta = {k: _attr(v) for k, v in f.attrs.items() if k != "magic"}
            weights: dict[str, np.ndarray] = {}
            f["weights"].visititems(lambda name, obj: weights.__setitem__(name, obj[()])
                                    if isinstance(obj, h5py.Dataset) else None)
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file (truncated or corrupt): {exc}"
                         ) from None
    arch = meta.get("architecture")
    if arch != ARCHITECTURE:
        raise ValueError(f"{path}: architecture {arch!r}, this rawgan builds {ARCHITECTURE!r}")
    model = lenet(seed=0)
    try:
        model.set_weights(weights)
    except ValueError as exc:
        raise ValueError(f"{path}: weights do not fit {ARCHITECTURE}: {exc}") from None
    return Classifier(model, meta)


def _attr(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        if value[:1] in "[{":
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value
