"""Float64 finite-difference checks of every layer, loss and seed model (random configs)."""

from __future__ import annotations

import numpy as np
import pytest

from rawgan import gradcheck, losses
from rawgan.gradcheck import TOLERANCE, check_layer, random_cases

CASES = list(random_cases(np.random.default_rng(1234), trials=12))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.layer}-{c.config}" for c in CASES])
def test_layer_gradients(case):
    layer = case.make()
    errors = check_layer(layer, case.input_shape, np.random.default_rng(7), case.training)
    # every trainable parameter was checked, not only the input
    assert set(errors) == {"input", *layer.trainable}, errors
    assert max(errors.values()) < TOLERANCE, errors


def test_random_cases_cover_every_layer_and_mode():
    layers = {c.layer for c in CASES}
    assert layers == {"Dense", "Conv2D", "Conv2DTranspose", "LeakyReLU", "ReLU", "Tanh",
                      "Sigmoid", "BatchNormalization", "Dropout", "Reshape", "Flatten"}
    configs = " ".join(c.config for c in CASES if c.layer.startswith("Conv"))
    for needle in ("pad='same'", "pad='valid'", "pad=0", "s=1", "s=2", "s=3", "k=1", "k=5",
                   "output_padding", "in=(1,"):
        assert needle in configs, needle


@pytest.mark.parametrize("kind", losses.KINDS)
@pytest.mark.parametrize("sizes", [(1, 1), (3, 5), (8, 2)])
def test_loss_gradients(kind, sizes):
    errors = gradcheck.check_loss(kind, *sizes, rng=np.random.default_rng(sum(sizes)))
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.slow
@pytest.mark.parametrize("case", list(gradcheck.model_cases()),
                         ids=lambda c: c.layer.replace(" ", "-"))
def test_seed_model_gradients(case):
    errors = check_layer(case.make(), case.input_shape, np.random.default_rng(3), case.training,
                         max_coords=8, kinks=True)
    assert len(errors) > 3  # input and several parameter tensors were checked
    assert max(errors.values()) < TOLERANCE, errors


def test_checker_catches_a_wrong_backward():
    """The checker must fail a layer whose backward is wrong (here: LeakyReLU slope off)."""
    from rawgan.nn import LeakyReLU

    class Broken(LeakyReLU):
        def _backward(self, dy, cache, input_grad, param_grads):
            return super()._backward(dy, cache, input_grad, param_grads) * 1.001

    errors = check_layer(Broken(0.2), (2, 3, 3, 2), np.random.default_rng(0))
    assert errors["input"] > 1e-4


def test_a_nan_gradient_fails():
    """NaN compares as not-larger than the tolerance: relative_error makes it inf."""
    from rawgan.nn import Dense

    class NanBias(Dense):
        def _backward(self, dy, cache, input_grad, param_grads):
            dx = super()._backward(dy, cache, input_grad, param_grads)
            if param_grads:
                self.grads["bias"][...] = np.nan
            return dx

    errors = check_layer(NanBias(3), (4, 5), np.random.default_rng(0))
    assert errors["bias"] == np.inf and errors["input"] < TOLERANCE
    case = gradcheck.Case("Dense", "nan bias", lambda: NanBias(3), (4, 5))
    assert gradcheck.run([case], np.random.default_rng(0), print_fn=lambda *a: None) is False


def test_check_layer_leaves_the_callers_layer_alone():
    from rawgan import models

    D = models.build("mlp", seed=0)[1]
    before = D.get_weights()
    check_layer(D, (2, 28, 28, 1), np.random.default_rng(0), max_coords=2)
    assert D.dtype == np.float32
    after = D.get_weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_gradcheck_cli_passes(capsys):
    assert gradcheck.main(["--trials", "1", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "Conv2DTranspose" in out and "pass" in out and "FAIL" not in out


def test_gradcheck_cli_rejects_unknown_layer():
    with pytest.raises(SystemExit):
        gradcheck.main(["--layer", "NoSuchLayer"])
