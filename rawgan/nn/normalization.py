"""BatchNormalization over N (2-D inputs) or N, H, W (4-D NHWC inputs)."""

from __future__ import annotations

from ..checks import number
from .layer import Layer


class BatchNormalization(Layer):
    """Batch normalization with Keras' defaults (momentum 0.99, epsilon 1e-3).

    Input (N, C) or (N, H, W, C) -> same shape. Params ``gamma``, ``beta`` (trainable),
    ``moving_mean``, ``moving_variance`` (updated in training: ``m = momentum * m + (1 -
    momentum) * batch_stat``, biased batch variance as Keras 3). ``training=False`` uses the
    moving statistics. Backward: see ``ops.batchnorm_backward``. Fused with a following
    LeakyReLU (``forward(x, leaky_alpha=a)``), forward returns z = LeakyReLU(y) and backward
    takes dL/dz, the slope recomputed from x (no copy of y is kept).
    """

    expected_rank = (2, 4)
    fuses_leaky_relu = True           # bn_apply writes LeakyReLU(y)
    folds_leaky_relu_backward = True  # its backward applies the LeakyReLU's slope as it reads

    def __init__(self, momentum: float = 0.99, epsilon: float = 1e-3, **kw) -> None:
        super().__init__(**kw)
        self.momentum = number(momentum, "BatchNormalization: momentum", low=0.0, high=1.0)
        self.epsilon = number(epsilon, "BatchNormalization: epsilon", low=0.0, low_open=True)

    def _describe(self) -> str:
        return f", momentum={self.momentum}, epsilon={self.epsilon}"

    @property
    def trainable(self):
        return ("gamma", "beta")

    def _build(self, input_shape, dtype):
        c = input_shape[-1]
        xp = self.ops.xp
        return {"gamma": xp.ones(c, dtype=dtype), "beta": xp.zeros(c, dtype=dtype),
                "moving_mean": xp.zeros(c, dtype=dtype),
                "moving_variance": xp.ones(c, dtype=dtype)}

    def _forward(self, x, training, leaky_alpha=None):
        if training and x.shape[0] * (x.size // x.shape[0] // x.shape[-1]) < 2:
            raise ValueError(f"{self._where()}: training needs at least 2 values per channel "
                             f"to estimate a variance, got input of shape {tuple(x.shape)}")
        p = self.params
        y, mean, inv_std = self.ops.batchnorm_forward(
            x, p["gamma"], p["beta"], p["moving_mean"], p["moving_variance"],
            self.momentum, self.epsilon, training, leaky_alpha=leaky_alpha)
        return y, {"x": x, "mean": mean, "inv_std": inv_std, "training": training,
                   "leaky_alpha": leaky_alpha, "y_shape": tuple(y.shape)}

    def _backward(self, dy, cache, input_grad, param_grads):
        alpha = cache["leaky_alpha"]
        dx, dgamma, dbeta = self.ops.batchnorm_backward(
            dy, cache["x"], self.params["gamma"], cache["mean"], cache["inv_std"],
            cache["training"], leaky_alpha=alpha,
            beta=None if alpha is None else self.params["beta"])
        if param_grads:
            self._accumulate("gamma", dgamma)
            self._accumulate("beta", dbeta)
        return dx if input_grad else None
