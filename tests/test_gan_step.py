"""gan.train_step as a whole, in float64: every gradient it hands an optimizer is the
finite-difference gradient of the loss that step is meant to minimise.

The layer and loss tests check each piece; this checks the wiring between them (which
logits go to which loss term, the concatenated vs separate D passes, that the generator
step goes through the UPDATED critic and reuses G's forward pass):

- critic step i: the gradient D's optimizer receives is ``dL_D/dtheta_D`` at the D
  parameters before that step, with ``L_D = discriminator_loss(D(x_i), D(G(z_i)))``;
- generator step: the gradient G's optimizer receives is ``dL_G/dtheta_G`` with
  ``L_G = generator_loss(D'(G(z_k)))``, D' the critic after all k updates and z_k the
  last critic step's noise.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from rawgan import gan, losses, optim
from rawgan.gradcheck import numerical_gradient, relative_error
from rawgan.nn import BatchNormalization, Dense, LeakyReLU, Sequential, Tanh

N, NOISE, IMAGE = 5, 3, 12


class RecordingSGD(optim.SGD):
    """SGD that keeps a copy of the parameters and gradients it sees at every step."""

    def __init__(self, model, lr: float) -> None:
        super().__init__(model, lr=lr)
        self.seen: list[tuple[dict, dict]] = []

    def step(self) -> None:
        params = {name: p.copy() for name, p, _ in self.model.parameters()}
        grads = {name: g.copy() for name, _, g in self.model.parameters()}
        self.seen.append((params, grads))
        super().step()


def _models(d_batchnorm: bool, seed: int) -> tuple[Sequential, Sequential]:
    G = Sequential([Dense(8), BatchNormalization(momentum=0.8), LeakyReLU(0.2), Dense(IMAGE),
                    Tanh()], seed=seed)
    d_layers = [Dense(6)] + ([BatchNormalization(momentum=0.8)] if d_batchnorm else [])
    D = Sequential(d_layers + [LeakyReLU(0.2), Dense(1)], seed=seed + 1)
    G.build((None, NOISE), np.float64)
    D.build((None, IMAGE), np.float64)
    return G, D


def _load(model: Sequential, params: dict) -> Sequential:
    """A copy of ``model`` holding ``params`` (the trainable ones; the rest as they are)."""
    twin = copy.deepcopy(model)
    for layer in twin.layers:
        for key in layer.trainable:
            name = f"{layer.name}/{key}"
            if name in params:
                layer.params[key] = params[name].copy()
    return twin


def _d_loss(kind: str, D: Sequential, real, fake) -> float:
    # real and fake as separate passes: what critic_step computes when D has batch norm,
    # and the same numbers as one concatenated pass when it has none (no cross-batch term)
    return losses.discriminator_loss(kind, D.forward(real, training=True),
                                     D.forward(fake, training=True))[0]


def _check(f, params: dict, grads: dict, what: str) -> None:
    for name, p in params.items():
        num, num2 = numerical_gradient(f, p, h=1e-6, kinks=True)
        smooth = np.abs(num - num2) <= 1e-6 * (1 + np.abs(num))  # no kink within 2h
        assert smooth.mean() > 0.9, f"{what} {name}: too many kinks to check"
        # atol: a bias ahead of batch norm has gradient exactly 0 (the mean removes it),
        # which the difference quotient gives as ~1e-10 of rounding
        np.testing.assert_allclose(grads[name][smooth], num[smooth], rtol=1e-5, atol=1e-8,
                                   err_msg=f"{what} {name}")


@pytest.mark.parametrize("d_batchnorm", [False, True], ids=["D-plain", "D-batchnorm"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("kind", losses.KINDS)
def test_every_gradient_of_a_train_step_is_the_finite_difference_one(kind, k, d_batchnorm):
    seed = 10 * losses.KINDS.index(kind) + k
    rng = np.random.default_rng(seed)
    G, D = _models(d_batchnorm, seed)
    G0 = copy.deepcopy(G)  # G before the step: its forward passes are what the losses saw
    opt_g, opt_d = RecordingSGD(G, lr=0.05), RecordingSGD(D, lr=0.05)
    reals = [rng.uniform(-1, 1, (N, IMAGE)) for _ in range(k)]
    zs: list[np.ndarray] = []

    def noise(n: int) -> np.ndarray:
        zs.append(rng.standard_normal((n, NOISE)))
        return zs[-1]

    stats = gan.train_step(G, D, opt_g, opt_d, kind, reals, noise)
    assert len(opt_d.seen) == k and len(opt_g.seen) == 1 and len(zs) == k

    # the critic steps: G does not change during them, so G0 makes every fake batch
    for i, ((d_params, d_grads), real, z) in enumerate(zip(opt_d.seen, reals, zs, strict=True)):
        Di = _load(D, d_params)
        fake = copy.deepcopy(G0).forward(z, training=True)
        _check(lambda Di=Di, real=real, fake=fake: _d_loss(kind, Di, real, fake),
               {n: p for n, p, _ in Di.parameters()}, d_grads, f"{kind} critic step {i}")
        if i == k - 1:
            assert stats.d_loss == pytest.approx(_d_loss(kind, _load(D, d_params), real, fake),
                                                 rel=1e-12)

    # the generator step, through the critic as it is after the k updates
    g_params, g_grads = opt_g.seen[0]
    Gk, Dk = _load(G0, g_params), copy.deepcopy(D)
    for (name, p, _), (_, p0, _) in zip(Gk.parameters(), G0.parameters(), strict=True):
        np.testing.assert_array_equal(p, p0, err_msg=f"G changed before its own step: {name}")

    def g_loss() -> float:
        return losses.generator_loss(kind, Dk.forward(Gk.forward(zs[-1], training=True),
                                                      training=True))[0]

    assert stats.g_loss == pytest.approx(g_loss(), rel=1e-12)
    _check(g_loss, {n: p for n, p, _ in Gk.parameters()}, g_grads, f"{kind} generator step")


def test_the_generator_step_uses_the_updated_critic():
    """The recorded G gradient differs from the one through the critic before its update
    (the test above would pass vacuously if D barely moved)."""
    rng = np.random.default_rng(0)
    G, D = _models(False, 0)
    D_before = copy.deepcopy(D)
    opt_g, opt_d = RecordingSGD(G, lr=0.05), RecordingSGD(D, lr=0.5)
    z = rng.standard_normal((N, NOISE))
    gan.train_step(G, D, opt_g, opt_d, "bce", [rng.uniform(-1, 1, (N, IMAGE))], lambda n: z)
    G0 = _load(G, opt_g.seen[0][0])
    G0.zero_grad()
    f = D_before.forward(G0.forward(z, training=True), training=True)
    G0.backward(D_before.backward(losses.generator_loss("bce", f)[1], param_grads=False))
    stale = {n: g for n, _, g in G0.parameters()}
    assert relative_error(stale["dense_1/kernel"], opt_g.seen[0][1]["dense_1/kernel"]) > 1e-3


def test_bad_loss_kind_is_refused_before_any_work():
    G, D = _models(False, 0)
    calls = []
    G.forward = lambda *a, **kw: calls.append(a)  # type: ignore[method-assign]
    opt_g, opt_d = optim.SGD(G, lr=0.1), optim.SGD(D, lr=0.1)
    real = np.zeros((N, IMAGE))
    with pytest.raises(ValueError, match="unknown loss kind 'wgan-gp'"):
        gan.train_step(G, D, opt_g, opt_d, "wgan-gp", [real], lambda n: np.zeros((n, NOISE)))
    with pytest.raises(ValueError, match="unknown loss kind 'BCE'"):
        gan.critic_step(G, D, opt_d, "BCE", real, np.zeros((N, NOISE)))
    with pytest.raises(ValueError, match="unknown loss kind 'bce '"):
        gan.generator_step(G, D, opt_g, "bce ", real)
    assert calls == []


@pytest.mark.parametrize("d_batchnorm", [False, True], ids=["D-plain", "D-batchnorm"])
def test_real_images_of_the_wrong_shape_are_named(d_batchnorm):
    G, D = _models(d_batchnorm, 0)
    opt_g, opt_d = optim.SGD(G, lr=0.1), optim.SGD(D, lr=0.1)
    with pytest.raises(ValueError, match=r"real images of shape \(10,\) but the generator "
                                         r"makes \(12,\)"):
        gan.train_step(G, D, opt_g, opt_d, "bce", [np.zeros((N, 10))],
                       lambda n: np.zeros((n, NOISE)))


@pytest.mark.parametrize("kind", losses.KINDS)
def test_step_stats_are_the_mean_outputs_on_the_last_critic_batches(kind):
    """d_real / d_fake: mean sigmoid(D) (bce, minimax) or mean raw critic value (others),
    on the last critic step's real and fake batches, with D as it was for that step."""
    rng = np.random.default_rng(3)
    G, D = _models(False, 3)
    G0 = copy.deepcopy(G)
    opt_g, opt_d = RecordingSGD(G, lr=0.05), RecordingSGD(D, lr=0.05)
    reals = [rng.uniform(-1, 1, (N, IMAGE)) for _ in range(2)]
    zs = [rng.standard_normal((N, NOISE)) for _ in range(2)]
    it = iter(zs)
    stats = gan.train_step(G, D, opt_g, opt_d, kind, reals, lambda n: next(it))
    D1 = _load(D, opt_d.seen[-1][0])
    r = D1.forward(reals[-1], training=True)
    f = D1.forward(copy.deepcopy(G0).forward(zs[-1], training=True), training=True)

    def mean_out(logits):
        return float((1 / (1 + np.exp(-logits))).mean()) if kind in ("bce", "minimax") \
            else float(logits.mean())

    assert stats.d_real == pytest.approx(mean_out(r), rel=1e-12)
    assert stats.d_fake == pytest.approx(mean_out(f), rel=1e-12)
