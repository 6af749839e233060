"""Dropout with an explicit random generator and inverted scaling."""

from __future__ import annotations

import numpy as np

from ..checks import number
from .layer import Layer


class Dropout(Layer):
    """Inverted dropout: in training each unit is zeroed with probability ``rate`` and the
    survivors scaled by ``1 / (1 - rate)``; at inference the identity.

    dL/dx = dy * mask, the same mask as the forward. Randomness comes from ``self.rng``
    (a ``numpy.random.Generator`` set by the model from its seed, or ``seed=``).
    """

    expected_rank = None

    def __init__(self, rate: float, seed: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.rate = number(rate, "Dropout: rate", low=0.0, high=1.0, high_open=True)
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def _describe(self) -> str:
        return f", rate={self.rate}"

    def _forward(self, x, training):
        y, mask = self.ops.dropout_forward(x, self.rate, self.rng, training)
        return y, {"mask": mask, "y_shape": tuple(y.shape)}

    def _backward(self, dy, cache, input_grad, param_grads):
        return self.ops.dropout_backward(dy, cache["mask"]) if input_grad else None
