"""Dense (fully connected) layer: ``y = x @ kernel + bias``."""

from __future__ import annotations

from ..checks import is_int
from .layer import Layer, glorot_uniform


class Dense(Layer):
    """Fully connected layer.

    Input (N, in) -> output (N, units). ``kernel`` (in, units), ``bias`` (units,), the Keras
    layout. Backward (see ``ops.dense_backward``): dx = dy @ kernel^T,
    dkernel = x^T @ dy, dbias = sum_n dy.
    """

    expected_rank = (2,)
    fuses_leaky_relu = True  # LeakyReLU in the GEMM epilogue

    def __init__(self, units: int, use_bias: bool = True, **kw) -> None:
        super().__init__(**kw)
        if not is_int(units) or units < 1:
            raise ValueError(f"Dense: units must be a positive int, got {units!r}")
        self.units = int(units)
        self.use_bias = use_bias

    def _describe(self) -> str:
        return f", units={self.units}, use_bias={self.use_bias}"

    @property
    def trainable(self):
        return ("kernel", "bias") if self.use_bias else ("kernel",)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.units)

    def _build(self, input_shape, dtype):
        p = {"kernel": glorot_uniform((input_shape[0], self.units), self.rng, dtype)}
        if self.use_bias:
            p["bias"] = self.ops.xp.zeros(self.units, dtype=dtype)
        return p

    def _forward(self, x, training, leaky_alpha=None):
        y = self.ops.dense_forward(x, self.params["kernel"], self.params.get("bias"),
                                   leaky_alpha=leaky_alpha)
        return y, {"x": x, "y_shape": tuple(y.shape)}

    def _backward(self, dy, cache, input_grad, param_grads):
        dx, dw, db = self.ops.dense_backward(dy, cache["x"], self.params["kernel"],
                                             need_dx=input_grad, need_dw=param_grads,
                                             need_db=self.use_bias)
        if param_grads:
            self._accumulate("kernel", dw)
            if self.use_bias:
                self._accumulate("bias", db)
        return dx
