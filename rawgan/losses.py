"""GAN losses: the value AND its gradient with respect to the logits, derived by hand.

Every function here takes raw discriminator outputs ("logits", before any sigmoid)
and returns the scalar loss together with ``dL/dlogits``, the array that starts the
backward pass through the discriminator (or, through D, into the generator). There
is no autograd anywhere in rawgan, so each gradient below is derived on paper first
and the derivation is written next to the line that implements it.

Conventions
-----------
- ``l`` is one logit, ``N`` the number of logits in the batch, ``s(l)`` the logistic
  sigmoid ``1 / (1 + exp(-l))`` and ``softplus(l) = log(1 + exp(l))``.
- Every loss is a batch MEAN, so every gradient carries a factor ``1/N``.
  A discriminator loss is the SUM of the real-batch mean and the fake-batch mean
  (``real_loss + fake_loss``, as in the TensorFlow DCGAN tutorial); the two batches
  may have different sizes ``N_r`` and ``N_f``.
- Logits have shape ``(N,)`` or ``(N, 1)`` and dtype float32 or float64. Gradients
  come back with the same shape and dtype; losses come back as Python floats.
- The code uses array methods and NumPy ufuncs only (``np.exp``, ``np.log1p``,
  ``np.maximum`` dispatch to CuPy through ``__array_ufunc__``) plus an array module
  ``xp`` for the few non-ufunc calls, so the same code runs on CuPy arrays without
  copying them to the host.

Two identities carry all of the numerics
----------------------------------------
With ``e = exp(-|l|)``, which lies in ``(0, 1]`` and therefore never overflows::

    softplus(l) = log(1 + exp(l)) = max(l, 0) + log1p(e)
    s(l)        = 1 / (1 + e)  if l >= 0   else   e / (1 + e)

(for ``l < 0`` multiply numerator and denominator of ``1/(1+exp(-l))`` by ``exp(l)``).
Neither ever evaluates ``exp`` of a positive number, so logits of +-1e4 give finite
values and no overflow warnings in float32 and in float64. ``exp(-1e4)`` underflows
to 0, which is harmless (and silent under NumPy's default error state).

Their derivatives are the other two facts every gradient below uses::

    d softplus(l) / dl = s(l)          s(-l) = 1 - s(l)
    log s(l)     = -softplus(-l)       log(1 - s(l)) = -softplus(l)
"""

from __future__ import annotations

import contextlib
import threading
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["KINDS", "NonFiniteLogits", "bce_with_logits", "discriminator_loss", "generator_loss"]

#: The loss families understood by :func:`discriminator_loss` and :func:`generator_loss`.
KINDS: tuple[str, ...] = ("bce", "minimax", "wgan", "hinge", "lsgan")

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

Array = Any  # numpy.ndarray or cupy.ndarray; kept loose so CuPy needs no import here.

_cupy: ModuleType | None = None
_cupy_checked = False


# --------------------------------------------------------------------------- helpers


def _array_module(x: Array) -> ModuleType:
    """Return ``cupy`` for a CuPy array and ``numpy`` otherwise (CuPy is optional)."""
    global _cupy, _cupy_checked
    if not _cupy_checked:
        try:
            import cupy  # optional dependency, imported lazily
        except ImportError:
            cupy = None
        _cupy, _cupy_checked = cupy, True
    if _cupy is None:
        return np
    return _cupy.get_array_module(x)


def _softplus(x: Array) -> Array:
    """Stable ``log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|))``; same shape and dtype."""
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _sigmoid(x: Array, xp: ModuleType) -> Array:
    """Stable logistic sigmoid; same shape and dtype as ``x``.

    With ``e = exp(-|x|)`` in (0, 1]: ``s(x) = 1/(1+e)`` for ``x >= 0`` and ``e/(1+e)``
    for ``x < 0``, i.e. ``s(x) = where(x >= 0, 1, e) / (1 + e)``.
    """
    e = np.exp(-np.abs(x))
    return xp.where(x >= 0, xp.ones_like(e), e) / (1 + e)


class NonFiniteLogits(ValueError):
    """The logits handed to a loss hold NaN or inf: the network's weights or activations
    overflowed (training diverged), or its input was not finite."""


def _check_logits(x: Array, name: str) -> None:
    """Raise a clear error unless ``x`` is a finite, non-empty float (N,) or (N, 1) array."""
    if not (hasattr(x, "dtype") and hasattr(x, "shape")):
        raise TypeError(f"{name} must be a NumPy or CuPy float array, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got dtype {x.dtype}")
    if x.ndim not in (1, 2) or (x.ndim == 2 and x.shape[1] != 1):
        raise ValueError(f"{name} must have shape (N,) or (N, 1), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); need N >= 1")
    xp = _array_module(x)
    if not bool(xp.isfinite(x).all()):
        if getattr(_nonfinite, "allowed", False):
            _nonfinite.seen = True  # computed on; the caller reads nonfinite_seen()
            return
        raise NonFiniteLogits(f"{name} contains NaN or inf values; logits must be finite")


_nonfinite = threading.local()


@contextlib.contextmanager
def nonfinite_allowed():
    """In this thread, losses of NaN / inf logits are computed (NaN or inf) instead of
    raising :class:`NonFiniteLogits`. Data-parallel training uses it: one rank raising alone
    would leave the others waiting in the gradient all-reduce; computed, the NaN reaches
    every rank through the all-reduced statistics (with :func:`nonfinite_seen`'s flag),
    which stop them all at the same step."""
    before = getattr(_nonfinite, "allowed", False)
    _nonfinite.allowed = True
    try:
        yield
    finally:
        _nonfinite.allowed = before


def nonfinite_seen() -> bool:
    """Whether a loss in this thread met NaN / inf logits under :func:`nonfinite_allowed`
    since the last call (which resets it). Some losses stay finite on inf logits (minimax:
    softplus of -inf is 0), so the caller must ask, not only look at the loss values."""
    seen = getattr(_nonfinite, "seen", False)
    _nonfinite.seen = False
    return seen


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; valid kinds are {', '.join(KINDS)}")


# ------------------------------------------------------------------ binary cross-entropy


def bce_with_logits(logits: Array, targets: Array | float) -> tuple[float, Array]:
    """Mean binary cross-entropy on logits, and its gradient with respect to the logits.

    Parameters
    ----------
    logits : array, shape (N,) or (N, 1), float32 or float64
        Raw scores ``l_i``; the predicted probability is ``s(l_i)``.
    targets : array of the same shape as ``logits``, or a real number
        Target probabilities ``y_i`` in ``[0, 1]`` (0/1 labels, or smoothed labels
        such as 0.9). A number (Python, NumPy scalar or 0-d array) is used for every
        element. Arrays are cast to the logits' dtype.

    Returns
    -------
    loss : float
        ``L = (1/N) sum_i [ -y_i log s(l_i) - (1 - y_i) log(1 - s(l_i)) ]``.
    dlogits : array, same shape and dtype as ``logits``
        ``dL/dl_i = (s(l_i) - y_i) / N``.

    Notes
    -----
    Loss. Using ``log s(l) = -softplus(-l)``, ``log(1 - s(l)) = -softplus(l)`` and
    ``softplus(-l) = softplus(l) - l``, each term is::

        y softplus(-l) + (1 - y) softplus(l) = softplus(l) - l y
                                             = max(l, 0) - l y + log1p(exp(-|l|))

    which is the stable form computed here (no ``exp`` of a positive number, no
    ``log`` of something that can round to 0).

    Gradient. ``d softplus(l)/dl = s(l)``, so ``d/dl_i [softplus(l_i) - l_i y_i] =
    s(l_i) - y_i``, and the mean contributes ``1/N``: ``dL/dl_i = (s(l_i) - y_i)/N``.
    """
    _check_logits(logits, "logits")
    xp = _array_module(logits)
    if hasattr(targets, "shape") and len(targets.shape) > 0:
        if tuple(targets.shape) != tuple(logits.shape):
            raise ValueError(
                f"targets shape {tuple(targets.shape)} must equal logits shape "
                f"{tuple(logits.shape)}"
            )
        if targets.dtype.kind not in "fiub":
            raise TypeError(f"targets must be a real-valued array, got dtype {targets.dtype}")
        y = targets.astype(logits.dtype, copy=False)
        in_range = bool(((y >= 0) & (y <= 1)).all())  # False for NaN too
    else:
        try:
            y = float(targets)
        except (TypeError, ValueError):
            raise TypeError(
                f"targets must be an array or a real number, got {type(targets).__name__}"
            ) from None
        in_range = 0.0 <= y <= 1.0
    if not in_range:
        raise ValueError("targets must be probabilities in [0, 1] (no NaN or inf)")

    n = logits.size
    loss = float((_softplus(logits) - logits * y).mean())
    dlogits = (_sigmoid(logits, xp) - y) / n  # dL/dl_i = (s(l_i) - y_i) / N
    return loss, dlogits


# ---------------------------------------------------------------- per-kind implementations
#
# Each _d_<kind>(r, f, xp) returns (loss, dL/dr, dL/df) for real logits r (N_r of them)
# and fake logits f (N_f of them); each _g_<kind>(f, xp) returns (loss, dL/df).


def _d_bce(r: Array, f: Array, xp: ModuleType) -> tuple[float, Array, Array]:
    # L_D = BCE(r, 1) + BCE(f, 0)
    #     = (1/N_r) sum softplus(-r_i) + (1/N_f) sum softplus(f_j)
    #       (y = 1: softplus(l) - l = softplus(-l);  y = 0: softplus(l))
    # dL_D/dr_i = (s(r_i) - 1)/N_r = -s(-r_i)/N_r
    # dL_D/df_j = (s(f_j) - 0)/N_f =  s(f_j)/N_f
    # -s(-r) equals s(r) - 1 exactly in real arithmetic but avoids the cancellation
    # 1 - s(r) suffers for large r (s(30) = 1 - 9e-14 keeps only ~3 correct digits).
    loss = float(_softplus(-r).mean()) + float(_softplus(f).mean())
    d_real = -_sigmoid(-r, xp) / r.size
    d_fake = _sigmoid(f, xp) / f.size
    return loss, d_real, d_fake


def _g_bce(f: Array, xp: ModuleType) -> tuple[float, Array]:
    # Non-saturating generator loss: L_G = BCE(f, 1) = -(1/N) sum log s(f_j)
    #                                     = (1/N) sum softplus(-f_j)
    # dL_G/df_j = (s(f_j) - 1)/N = -s(-f_j)/N
    # Its gradient is large (-> -1/N) exactly when D confidently rejects the fakes
    # (f -> -inf), which is why Goodfellow et al. recommend it over the minimax form.
    loss = float(_softplus(-f).mean())
    return loss, -_sigmoid(-f, xp) / f.size


def _g_minimax(f: Array, xp: ModuleType) -> tuple[float, Array]:
    # Saturating generator loss of the original paper: minimise log(1 - D(G(z))).
    # L_G = (1/N) sum log(1 - s(f_j)) = -(1/N) sum softplus(f_j)
    # dL_G/df_j = -s(f_j)/N
    # The gradient -> 0 as f -> -inf: when D confidently rejects the fakes, G gets
    # almost no signal (the "saturation" the non-saturating loss fixes).
    loss = -float(_softplus(f).mean())
    return loss, -_sigmoid(f, xp) / f.size


def _d_wgan(r: Array, f: Array, xp: ModuleType) -> tuple[float, Array, Array]:
    # Wasserstein critic: L_D = mean(f) - mean(r)  (the critic maximises
    # mean(r) - mean(f), an estimate of the Wasserstein-1 distance under a
    # 1-Lipschitz constraint enforced elsewhere: weight clipping or a penalty).
    # dL_D/dr_i = -1/N_r,  dL_D/df_j = +1/N_f  (constant: the loss is linear).
    loss = float(f.mean()) - float(r.mean())
    return loss, xp.full_like(r, -1.0 / r.size), xp.full_like(f, 1.0 / f.size)


def _g_linear(f: Array, xp: ModuleType) -> tuple[float, Array]:
    # WGAN and hinge generator loss: L_G = -mean(f);  dL_G/df_j = -1/N.
    loss = -float(f.mean())
    return loss, xp.full_like(f, -1.0 / f.size)


def _d_hinge(r: Array, f: Array, xp: ModuleType) -> tuple[float, Array, Array]:
    # L_D = (1/N_r) sum relu(1 - r_i) + (1/N_f) sum relu(1 + f_j)
    # relu'(u) = 1 if u > 0 else 0, so
    # dL_D/dr_i = -[1 - r_i > 0]/N_r = -[r_i < 1]/N_r
    # dL_D/df_j = +[1 + f_j > 0]/N_f = +[f_j > -1]/N_f
    # At the kinks (r_i = 1, f_j = -1) relu is not differentiable; we return the
    # subgradient 0 (strict inequalities), the same choice as PyTorch's relu.
    loss = float(np.maximum(1 - r, 0).mean()) + float(np.maximum(1 + f, 0).mean())
    d_real = -(r < 1).astype(r.dtype) / r.size
    d_fake = (f > -1).astype(f.dtype) / f.size
    return loss, d_real, d_fake


def _d_lsgan(r: Array, f: Array, xp: ModuleType) -> tuple[float, Array, Array]:
    # Least-squares GAN (Mao et al., a-b-c = 0-1-1 coding):
    # L_D = (1/2)(1/N_r) sum (r_i - 1)^2 + (1/2)(1/N_f) sum f_j^2
    # dL_D/dr_i = (r_i - 1)/N_r,  dL_D/df_j = f_j/N_f  (the 1/2 cancels the 2).
    loss = 0.5 * float(((r - 1) ** 2).mean()) + 0.5 * float((f**2).mean())
    return loss, (r - 1) / r.size, f / f.size


def _g_lsgan(f: Array, xp: ModuleType) -> tuple[float, Array]:
    # L_G = (1/2)(1/N) sum (f_j - 1)^2;  dL_G/df_j = (f_j - 1)/N.
    loss = 0.5 * float(((f - 1) ** 2).mean())
    return loss, (f - 1) / f.size


_D_LOSSES = {
    "bce": _d_bce,
    "minimax": _d_bce,  # the original paper's D objective is the same cross-entropy
    "wgan": _d_wgan,
    "hinge": _d_hinge,
    "lsgan": _d_lsgan,
}

_G_LOSSES = {
    "bce": _g_bce,
    "minimax": _g_minimax,
    "wgan": _g_linear,
    "hinge": _g_linear,
    "lsgan": _g_lsgan,
}


# ------------------------------------------------------------------------- public API


def discriminator_loss(
    kind: str, real_logits: Array, fake_logits: Array
) -> tuple[float, Array, Array]:
    """Discriminator (critic) loss and its gradients with respect to both logit batches.

    Parameters
    ----------
    kind : {"bce", "minimax", "wgan", "hinge", "lsgan"}
        Loss family, see :data:`KINDS`. ``"minimax"`` uses the same D loss as ``"bce"``.
    real_logits : array, shape (N_r,) or (N_r, 1), float32 or float64
        D's logits ``r`` on real data.
    fake_logits : array, shape (N_f,) or (N_f, 1), float32 or float64
        D's logits ``f`` on generated data; same trailing shape as ``real_logits``
        (both 1-D or both column vectors), any batch size ``N_f``.

    Returns
    -------
    loss : float
        ``real_term + fake_term``, each a batch mean:

        ============ ================================================
        ``bce``      ``mean(softplus(-r)) + mean(softplus(f))``
                     ``= BCE(r, 1) + BCE(f, 0)``
        ``minimax``  same as ``bce``
        ``wgan``     ``mean(f) - mean(r)``
        ``hinge``    ``mean(relu(1 - r)) + mean(relu(1 + f))``
        ``lsgan``    ``0.5 mean((r - 1)^2) + 0.5 mean(f^2)``
        ============ ================================================
    d_real : array, same shape and dtype as ``real_logits``
        ``dL/dr_i``: ``-s(-r_i)/N_r`` (bce), ``-1/N_r`` (wgan),
        ``-[r_i < 1]/N_r`` (hinge), ``(r_i - 1)/N_r`` (lsgan).
    d_fake : array, same shape and dtype as ``fake_logits``
        ``dL/df_j``: ``s(f_j)/N_f`` (bce), ``1/N_f`` (wgan),
        ``[f_j > -1]/N_f`` (hinge), ``f_j/N_f`` (lsgan).

    Raises
    ------
    ValueError
        Unknown ``kind``; empty batch; NaN or inf logits; a shape other than (N,) or
        (N, 1); real and fake batches with different trailing shapes.
    TypeError
        Logits that are not float32 / float64 arrays.

    Notes
    -----
    The hinge loss is not differentiable at ``r_i = 1`` and ``f_j = -1``; the
    subgradient 0 is returned there. Derivations are in the comments of each
    ``_d_<kind>`` function.
    """
    _check_kind(kind)
    _check_logits(real_logits, "real_logits")
    _check_logits(fake_logits, "fake_logits")
    if real_logits.shape[1:] != fake_logits.shape[1:]:
        raise ValueError(
            f"real_logits shape {tuple(real_logits.shape)} and fake_logits shape "
            f"{tuple(fake_logits.shape)} differ beyond the batch dimension"
        )
    xp = _array_module(real_logits)
    return _D_LOSSES[kind](real_logits, fake_logits, xp)


def generator_loss(kind: str, fake_logits: Array) -> tuple[float, Array]:
    """Generator loss and its gradient with respect to D's logits on the fakes.

    Parameters
    ----------
    kind : {"bce", "minimax", "wgan", "hinge", "lsgan"}
        Loss family, see :data:`KINDS`.
    fake_logits : array, shape (N,) or (N, 1), float32 or float64
        D's logits ``f`` on generated data.

    Returns
    -------
    loss : float
        A batch mean:

        ============ ===================================================
        ``bce``      ``mean(softplus(-f)) = -mean(log s(f)) = BCE(f, 1)``
                     (non-saturating)
        ``minimax``  ``mean(log(1 - s(f))) = -mean(softplus(f))``
                     (saturating, the original paper's objective)
        ``wgan``     ``-mean(f)``
        ``hinge``    ``-mean(f)``
        ``lsgan``    ``0.5 mean((f - 1)^2)``
        ============ ===================================================
    d_fake : array, same shape and dtype as ``fake_logits``
        ``dL/df_j``: ``-s(-f_j)/N`` (bce), ``-s(f_j)/N`` (minimax), ``-1/N`` (wgan,
        hinge), ``(f_j - 1)/N`` (lsgan). Chain it back through D (without updating
        D) into the generator.

    Raises
    ------
    ValueError
        Unknown ``kind``; empty batch; NaN or inf logits; a shape other than (N,) or
        (N, 1).
    TypeError
        Logits that are not float32 / float64 arrays.
    """
    _check_kind(kind)
    _check_logits(fake_logits, "fake_logits")
    xp = _array_module(fake_logits)
    return _G_LOSSES[kind](fake_logits, xp)
