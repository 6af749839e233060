"""Conv2D and Conv2DTranspose: one algorithm, used in both directions.

The transposed convolution's forward IS the convolution's backward-data, and its
backward-data IS the convolution's forward (``ops.conv2d_transpose_*`` say how).
"""

from __future__ import annotations

from ..backends.numpy_ops import conv_geometry, conv_transpose_geometry, pair
from ..checks import is_int
from .layer import Layer, glorot_uniform


def _check_padding(padding, where: str):
    if isinstance(padding, str):
        if padding.lower() not in ("same", "valid"):
            raise ValueError(f"{where}: unknown padding {padding!r}: expected 'same', 'valid' "
                             f"or a non-negative int")
        return padding.lower()
    if is_int(padding) and padding >= 0:
        return int(padding)
    if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(
            is_int(p) and p >= 0 for p in padding):
        return tuple(int(p) for p in padding)
    raise ValueError(f"{where}: padding must be 'same', 'valid' or a non-negative int, "
                     f"got {padding!r}")


class _ConvBase(Layer):
    expected_rank = (4,)
    fuses_leaky_relu = True  # LeakyReLU in the GEMM epilogue

    def __init__(self, filters: int, kernel_size, strides=1, padding="valid",
                 use_bias: bool = True, **kw) -> None:
        super().__init__(**kw)
        where = type(self).__name__
        if not is_int(filters) or filters < 1:
            raise ValueError(f"{where}: filters must be a positive int, got {filters!r}")
        self.filters = int(filters)
        self.kernel_size = pair(kernel_size, f"{where}: kernel_size")
        self.strides = pair(strides, f"{where}: strides")
        self.padding = _check_padding(padding, where)
        self.use_bias = use_bias

    @property
    def trainable(self):
        return ("kernel", "bias") if self.use_bias else ("kernel",)

    def _describe(self) -> str:
        return (f", filters={self.filters}, kernel_size={self.kernel_size}, "
                f"strides={self.strides}, padding={self.padding!r}")

    def _check_channels(self, x) -> None:
        if (self.built and getattr(x, "ndim", None) == 4
                and x.shape[-1] != self.input_shape[-1]):  # (not an array: the base's error)
            raise ValueError(f"{self._where()}: expected {self.input_shape[-1]} input channels, "
                             f"got input of shape {tuple(x.shape)}")


class Conv2D(_ConvBase):
    """2-D convolution, NHWC.

    Input (N, H, W, c_in) -> output (N, Ho, Wo, filters); ``kernel`` (kh, kw, c_in, filters)
    [HWIO, Keras], ``bias`` (filters,). ``padding``: "same" (TF/Keras split: the odd pixel
    goes bottom/right), "valid", or an int p on every side.
    """

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        try:
            ho, wo, _ = conv_geometry(h, w, *self.kernel_size, self.strides, self.padding)
        except ValueError as exc:
            raise ValueError(f"{self._where()}: {exc}") from None
        return (n, ho, wo, self.filters)

    def _build(self, input_shape, dtype):
        kh, kw = self.kernel_size
        p = {"kernel": glorot_uniform((kh, kw, input_shape[-1], self.filters), self.rng, dtype)}
        if self.use_bias:
            p["bias"] = self.ops.xp.zeros(self.filters, dtype=dtype)
        return p

    def forward(self, x, training: bool = True, *, leaky_alpha: float | None = None):
        self._check_channels(x)
        return super().forward(x, training, leaky_alpha=leaky_alpha)

    def _forward(self, x, training, leaky_alpha=None):
        y = self.ops.conv2d_forward(x, self.params["kernel"], self.params.get("bias"),
                                    self.strides, self.padding, leaky_alpha=leaky_alpha)
        return y, {"x": x, "y_shape": tuple(y.shape)}

    def _backward(self, dy, cache, input_grad, param_grads):
        dx, dw, db = self.ops.conv2d_backward(dy, cache["x"], self.params["kernel"],
                                              self.strides, self.padding,
                                              need_dx=input_grad, need_dw=param_grads,
                                              need_db=self.use_bias)
        if param_grads:
            self._accumulate("kernel", dw)
            if self.use_bias:
                self._accumulate("bias", db)
        return dx


class Conv2DTranspose(_ConvBase):
    """Transposed 2-D convolution ("deconvolution"), NHWC.

    Input (N, H, W, c_in) -> output (N, Ho, Wo, filters) with Keras' output size rule;
    ``kernel`` (kh, kw, filters, c_in) [Keras layout], ``bias`` (filters,).
    Forward = conv2d backward-data; backward-data = conv2d forward (same kernel).
    """

    def __init__(self, filters: int, kernel_size, strides=1, padding="valid",
                 output_padding=None, use_bias: bool = True, **kw) -> None:
        super().__init__(filters, kernel_size, strides, padding, use_bias, **kw)
        if output_padding is not None:
            op = ((output_padding, output_padding) if is_int(output_padding)
                  else tuple(output_padding) if isinstance(output_padding, (tuple, list))
                  else ())
            if len(op) != 2 or not all(is_int(p) and p >= 0 for p in op):
                raise ValueError(f"Conv2DTranspose: output_padding must be a non-negative int "
                                 f"or a pair of them, got {output_padding!r}")
            if op[0] >= self.strides[0] or op[1] >= self.strides[1]:
                raise ValueError(f"Conv2DTranspose: output_padding {output_padding!r} must be "
                                 f"smaller than strides {self.strides}")
            output_padding = (int(op[0]), int(op[1]))
        self.output_padding = output_padding

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        try:
            ho, wo, _ = conv_transpose_geometry(h, w, *self.kernel_size, self.strides,
                                                self.padding, self.output_padding)
        except ValueError as exc:
            raise ValueError(f"{self._where()}: {exc}") from None
        return (n, ho, wo, self.filters)

    def _build(self, input_shape, dtype):
        kh, kw = self.kernel_size
        p = {"kernel": glorot_uniform((kh, kw, self.filters, input_shape[-1]), self.rng, dtype)}
        if self.use_bias:
            p["bias"] = self.ops.xp.zeros(self.filters, dtype=dtype)
        return p

    def forward(self, x, training: bool = True, *, leaky_alpha: float | None = None):
        self._check_channels(x)
        return super().forward(x, training, leaky_alpha=leaky_alpha)

    def _forward(self, x, training, leaky_alpha=None):
        y = self.ops.conv2d_transpose_forward(x, self.params["kernel"], self.params.get("bias"),
                                              self.strides, self.padding, self.output_padding,
                                              leaky_alpha=leaky_alpha)
        return y, {"x": x, "y_shape": tuple(y.shape)}

    def _backward(self, dy, cache, input_grad, param_grads):
        dx, dw, db = self.ops.conv2d_transpose_backward(
            dy, cache["x"], self.params["kernel"], self.strides, self.padding,
            self.output_padding, need_dx=input_grad, need_dw=param_grads,
            need_db=self.use_bias)
        if param_grads:
            self._accumulate("kernel", dw)
            if self.use_bias:
                self._accumulate("bias", db)
        return dx
