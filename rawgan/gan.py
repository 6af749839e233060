"""One GAN training step, written out: k critic updates, then one generator update.

Both the training loop (``rawgan.train``) and the benchmarks call :func:`train_step`, so a
benchmark times exactly what ``rawgan train`` runs.

The algorithm (Goodfellow et al. 2014, Alg. 1; the TF DCGAN tutorial's losses)::

    for each of k critic steps:
        x ~ data, z ~ N(0, I);  xf = G(z)
        real, fake = D(x), D(xf)                       (one pass over [x; xf])
        L_D, dL/dreal, dL/dfake = discriminator_loss(real, fake)
        D.backward([dL/dreal; dL/dfake]);  opt_D.step()
    generator step (G is unchanged since the last critic step, so its forward pass
    xf = G(z) and its cache are REUSED, as the tutorial's one-forward step does):
        fake = D(xf)   (the UPDATED critic)
        L_G, dL/dfake = generator_loss(fake)
        dL/dxf = D.backward(dL/dfake, param_grads=False)   (D's input gradient only)
        G.backward(dL/dxf);  opt_G.step()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import losses
from .nn import BatchNormalization, Sequential


@dataclass
class StepStats:
    """What one training step reports. ``d_real``/``d_fake``: mean D output on real / fake
    images (sigmoid of the logits for bce/minimax, raw critic values otherwise)."""

    d_loss: float
    g_loss: float
    d_real: float
    d_fake: float


def _mean_output(kind: str, logits, ops) -> float:
    if kind in ("bce", "minimax"):
        return float(ops.sigmoid_forward(logits).mean())  # D(x) as a probability
    return float(logits.mean())


def _has_batchnorm(model: Sequential) -> bool:
    return any(isinstance(layer, BatchNormalization) for layer in model.layers)


def critic_step(G: Sequential, D: Sequential, opt_d, kind: str, real, z) -> tuple[float, object,
                                                                                  object, object]:
    """One discriminator update on a real batch and a fake batch ``G(z)``.

    real (N, *image), z (N, noise_dim) -> (d_loss, real_logits, fake_logits, fake_images).
    D sees ``[real; fake]`` as one batch of 2N (one GEMM per layer instead of two) unless it
    contains batch normalization, whose statistics would then mix the two batches.
    """
    losses._check_kind(kind)  # before any forward pass: a typo costs nothing
    fake = G.forward(z, training=True)
    if tuple(real.shape[1:]) != tuple(fake.shape[1:]):
        raise ValueError(f"critic_step: real images of shape {tuple(real.shape[1:])} but the "
                         f"generator makes {tuple(fake.shape[1:])} (batch shapes "
                         f"{tuple(real.shape)} and {tuple(fake.shape)})")
    n = real.shape[0]
    D.zero_grad()
    if _has_batchnorm(D):
        # two separate passes, each backward right after its own forward (the layer caches
        # hold one batch); the loss is a sum of a real-only and a fake-only term, so the
        # gradient w.r.t. the real logits does not depend on the fake ones and vice versa
        real_logits = D.forward(real, training=True)
        d_r = losses.discriminator_loss(kind, real_logits, real_logits[:1])[1]
        D.backward(d_r, input_grad=False)
        fake_logits = D.forward(fake, training=True)
        d_loss, _, d_f = losses.discriminator_loss(kind, real_logits, fake_logits)
        D.backward(d_f, input_grad=False)
    else:
        xp = D.ops.xp
        logits = D.forward(xp.concatenate([real, fake]), training=True)
        real_logits, fake_logits = logits[:n], logits[n:]
        d_loss, d_r, d_f = losses.discriminator_loss(kind, real_logits, fake_logits)
        D.backward(xp.concatenate([d_r, d_f]), input_grad=False)
    opt_d.step()
    return d_loss, real_logits, fake_logits, fake


def generator_step(G: Sequential, D: Sequential, opt_g, kind: str, fake) -> tuple[float, object]:
    """One generator update through the (updated) critic.

    ``fake`` must be ``G.forward(z)`` with G's cache still in place (the last critic step's).
    Returns (g_loss, fake_logits).
    """
    losses._check_kind(kind)
    fake_logits = D.forward(fake, training=True)
    g_loss, d_f = losses.generator_loss(kind, fake_logits)
    dx = D.backward(d_f, param_grads=False)  # only dL/d(fake image) is needed from D
    G.zero_grad()
    G.backward(dx, input_grad=False)
    opt_g.step()
    return g_loss, fake_logits


def train_step(G: Sequential, D: Sequential, opt_g, opt_d, kind: str, reals: Sequence,
               noise: Callable[[int], object]) -> StepStats:
    """``len(reals)`` critic steps (one real batch each), then one generator step.

    ``noise(n)`` returns a noise batch (n, noise_dim) on G's backend.
    """
    losses._check_kind(kind)
    if len(reals) < 1:
        raise ValueError("train_step: need at least one real batch (k >= 1 critic steps)")
    for real in reals:
        d_loss, real_logits, fake_logits, fake = critic_step(
            G, D, opt_d, kind, real, noise(real.shape[0]))
    g_loss, _ = generator_step(G, D, opt_g, kind, fake)
    return StepStats(d_loss=d_loss, g_loss=g_loss, d_real=_mean_output(kind, real_logits, D.ops),
                     d_fake=_mean_output(kind, fake_logits, D.ops))


def gaussian_noise(rng: np.random.Generator, noise_dim: int, ops=None, dtype=np.float32
                   ) -> Callable[[int], object]:
    """``noise(n)``: standard normal (n, noise_dim) batches from ``rng`` on backend ``ops``."""

    def noise(n: int):
        z = rng.standard_normal((n, noise_dim), dtype=dtype)
        return z if ops is None else ops.asarray(z)

    return noise
