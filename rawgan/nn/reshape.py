"""Reshape and Flatten: no arithmetic, the gradient is reshaped back."""

from __future__ import annotations

import math

from ..checks import is_int
from .layer import Layer


class Reshape(Layer):
    """(N, *in_shape) -> (N, *shape); one entry of ``shape`` may be -1. dL/dx = dy reshaped."""

    def __init__(self, shape: tuple[int, ...], **kw) -> None:
        super().__init__(**kw)
        if not isinstance(shape, tuple | list) or not all(is_int(s) for s in shape):
            raise ValueError(f"Reshape: the target shape must be a tuple of integers (one "
                             f"may be -1), got {shape!r}")
        shape = tuple(int(s) for s in shape)
        if sum(s == -1 for s in shape) > 1 or any(s == 0 or s < -1 for s in shape):
            raise ValueError(f"Reshape: invalid target shape {shape}")
        self.shape = shape

    def _describe(self) -> str:
        return f", shape={self.shape}"

    def compute_output_shape(self, input_shape):
        size = math.prod(input_shape[1:])
        known = math.prod(s for s in self.shape if s != -1)
        target = tuple(size // known if s == -1 else s for s in self.shape)
        if math.prod(target) != size or (-1 in self.shape and size % known):
            raise ValueError(f"{self._where()}: cannot reshape {tuple(input_shape[1:])} "
                             f"({size} values) to {self.shape}")
        return (input_shape[0], *target)

    def _forward(self, x, training):
        out = self.compute_output_shape(x.shape)
        return x.reshape(out), {"x_shape": tuple(x.shape), "y_shape": out}

    def _backward(self, dy, cache, input_grad, param_grads):
        return dy.reshape(cache["x_shape"]) if input_grad else None


class Flatten(Reshape):
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...), C-order as Keras with channels_last."""

    def __init__(self, **kw) -> None:
        super().__init__((-1,), **kw)

    def _describe(self) -> str:
        return ""
