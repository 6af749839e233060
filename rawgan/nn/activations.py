"""Elementwise activations: LeakyReLU, ReLU, Tanh, Sigmoid."""

from __future__ import annotations

from ..checks import number
from .layer import Layer


class _Activation(Layer):
    expected_rank = None  # any rank, batch first

    def _store(self, x, y) -> dict:
        return {"x": x, "y": y, "y_shape": tuple(y.shape)}


class LeakyReLU(_Activation):
    """``y = x if x > 0 else alpha * x``; dL/dx = dy * (1 if x > 0 else alpha).

    ``alpha=0.3`` is the Keras default (the DCGAN tutorial uses it).
    """

    def __init__(self, alpha: float = 0.3, **kw) -> None:
        super().__init__(**kw)
        self.alpha = number(alpha, "LeakyReLU: alpha", low=0.0)

    def _describe(self) -> str:
        return f", alpha={self.alpha}"

    def _forward(self, x, training):
        return self.ops.leaky_relu_forward(x, self.alpha), {"x": x, "y_shape": tuple(x.shape)}

    def fused_after(self, producer: Layer, z) -> None:
        """Record that ``producer`` computed this layer's output ``z`` itself (Sequential's
        fusion). The backward then needs no pre-activation: for alpha >= 0, z > 0 exactly
        when the pre-activation is, so dL/dx = dy * (1 if z > 0 else alpha) is exact; and a
        producer that folds the backward too gets dy untouched."""
        folded = producer.folds_leaky_relu_backward
        self._cache = {"x": None if folded else z, "folded": folded, "y_shape": tuple(z.shape)}

    def _backward(self, dy, cache, input_grad, param_grads):
        if not input_grad:
            return None
        if cache.get("folded"):
            return dy  # the producer's backward applies the slope (folds_leaky_relu_backward)
        return self.ops.leaky_relu_backward(dy, cache["x"], self.alpha)


class ReLU(_Activation):
    """``y = max(x, 0)``; dL/dx = dy * (x > 0)."""

    def _forward(self, x, training):
        return self.ops.relu_forward(x), {"x": x, "y_shape": tuple(x.shape)}

    def _backward(self, dy, cache, input_grad, param_grads):
        return self.ops.relu_backward(dy, cache["x"]) if input_grad else None


class Tanh(_Activation):
    """``y = tanh(x)``; dL/dx = dy * (1 - y^2)."""

    def _forward(self, x, training):
        y = self.ops.tanh_forward(x)
        return y, {"y": y, "y_shape": tuple(y.shape)}

    def _backward(self, dy, cache, input_grad, param_grads):
        return self.ops.tanh_backward(dy, cache["y"]) if input_grad else None


class Sigmoid(_Activation):
    """``y = 1 / (1 + exp(-x))``; dL/dx = dy * y * (1 - y)."""

    def _forward(self, x, training):
        y = self.ops.sigmoid_forward(x)
        return y, {"y": y, "y_shape": tuple(y.shape)}

    def _backward(self, dy, cache, input_grad, param_grads):
        return self.ops.sigmoid_backward(dy, cache["y"]) if input_grad else None
