"""The Layer base class: parameters, gradients, a cache, and the checks every layer shares.

A layer owns three dicts keyed by Keras names:

* ``params``: every weight (``kernel``, ``bias``, ``gamma``, ``beta``, ``moving_mean``,
  ``moving_variance``), trainable or not;
* ``grads``: one entry per TRAINABLE weight, the same shape; backward ADDS into it
  (``+=``, as llm.c and PyTorch do) until :meth:`zero_grad`, so a critic can take a
  real batch and a fake batch in turn;
* a private cache, filled by ``forward(x, training)`` with what ``backward(dy)`` needs.
"""

from __future__ import annotations

import copy
import math
import re
from types import ModuleType

import numpy as np

from .. import backends

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def glorot_uniform(shape: tuple[int, ...], rng: np.random.Generator, dtype) -> np.ndarray:
    """Keras' default kernel initialiser: U(-l, l), ``l = sqrt(6 / (fan_in + fan_out))``.

    For a kernel of rank > 2 the receptive field ``prod(shape[:-2])`` multiplies both fans
    (``fan_in = rf * shape[-2]``, ``fan_out = rf * shape[-1]``), as Keras computes them.
    """
    rf = math.prod(shape[:-2]) if len(shape) > 2 else 1
    fan_in, fan_out = rf * shape[-2], rf * shape[-1]
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


def snake_case(name: str) -> str:
    """Keras' naming rule: ``Conv2DTranspose -> conv2d_transpose``, ``LeakyReLU -> leaky_re_lu``."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


class Layer:
    """Base class. Subclasses implement ``_build``, ``_forward``, ``_backward``,
    ``compute_output_shape`` and list their ``expected_rank``.
    """

    expected_rank: tuple[int, ...] | None = None  # ranks (batch included) accepted
    #: ``forward(x, leaky_alpha=a)`` returns LeakyReLU(layer(x)) computed in the layer's own
    #: kernels (the epilogue fusion; Sequential uses it for a layer followed by LeakyReLU)
    fuses_leaky_relu: bool = False
    #: ... and ``backward`` then takes dL/d(that LeakyReLU's output) and applies its slope
    #: itself (the LeakyReLU layer passes the gradient through untouched)
    folds_leaky_relu_backward: bool = False

    def __init__(self, name: str | None = None, backend: str | ModuleType = "numpy") -> None:
        self.name = name
        self.ops = backends.get(backend)
        self.params: dict = {}
        self.grads: dict = {}
        self.built = False
        self.input_shape: tuple[int, ...] | None = None  # per sample, batch excluded
        self.dtype: np.dtype | None = None
        self.rng: np.random.Generator | None = None  # set by Sequential, or drawn at build
        self._cache: dict | None = None

    def __deepcopy__(self, memo: dict) -> Layer:
        """``copy.deepcopy(model)``: every array copied (an EMA generator, a frozen critic);
        the backend module is shared, not copied (a module cannot be)."""
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        for key, value in self.__dict__.items():
            twin.__dict__[key] = value if isinstance(value, ModuleType) else copy.deepcopy(
                value, memo)
        return twin

    # -- identity ---------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.kind}(name={self.name!r}{self._describe()})"

    def _describe(self) -> str:
        return ""

    def _ranks(self) -> str:
        return " or ".join(map(str, self.expected_rank or ()))

    def _where(self) -> str:
        return f"{self.kind} {self.name!r}" if self.name else self.kind

    # -- building ---------------------------------------------------------------------------
    def build(self, input_shape: tuple, dtype=np.float32) -> None:
        """Create the weights for inputs of ``input_shape`` (batch first; it may be None)."""
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{self._where()}: dtype must be float32 or float64, got {dtype}")
        shape = tuple(input_shape)
        if self.expected_rank is not None and len(shape) not in self.expected_rank:
            raise ValueError(f"{self._where()}: expected input of rank {self._ranks()} "
                             f"(batch first), got shape {shape}")
        per_sample = tuple(int(d) for d in shape[1:])
        if any(d < 1 for d in per_sample):
            raise ValueError(f"{self._where()}: input sizes must be positive, got {shape}")
        if self.rng is None:
            self.rng = np.random.default_rng()
        self.compute_output_shape((None, *per_sample))  # validates geometry
        host = self._build(per_sample, dtype) or {}
        self.params = {k: self.ops.asarray(v) for k, v in host.items()}
        self.grads = {k: self.ops.xp.zeros_like(self.params[k]) for k in self.trainable}
        self.input_shape = per_sample
        self.dtype = dtype
        self.built = True

    def _build(self, input_shape: tuple[int, ...], dtype) -> dict | None:
        return None

    @property
    def trainable(self) -> tuple[str, ...]:
        """Keys of ``params`` that receive gradients."""
        return ()

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        """Output shape for ``input_shape`` (batch first)."""
        return tuple(input_shape)

    def count_params(self) -> int:
        return sum(int(math.prod(p.shape)) for p in self.params.values())

    # -- the two passes ---------------------------------------------------------------------
    def forward(self, x, training: bool = True, *, leaky_alpha: float | None = None):
        """``y = layer(x)``; caches what :meth:`backward` needs.

        ``leaky_alpha`` (layers with ``fuses_leaky_relu`` only): return
        ``LeakyReLU(alpha)(layer(x))``, the activation fused into this layer's kernels.
        """
        if leaky_alpha is not None and not self.fuses_leaky_relu:
            raise TypeError(f"{self._where()}: cannot fuse a LeakyReLU (leaky_alpha given)")
        self._check_input(x)
        if not self.built:
            self.build(x.shape, x.dtype)
        elif x.shape[1:] != self.input_shape:
            raise ValueError(
                f"{self._where()}: built for inputs of shape (N, "
                f"{', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}"
            )
        if self.dtype != x.dtype:
            raise TypeError(
                f"{self._where()}: weights are {self.dtype} but the input is {x.dtype}; "
                f"convert one with model.astype(...) or x.astype(...)"
            )
        if leaky_alpha is None:
            y, cache = self._forward(x, training)
        else:
            y, cache = self._forward(x, training, leaky_alpha=float(leaky_alpha))
        self._cache = cache
        return y

    def backward(self, dy, *, input_grad: bool = True, param_grads: bool = True):
        """``dx = dL/dx`` from ``dy = dL/dy``; ADDS dL/dparam into ``grads``.

        ``input_grad=False`` skips dL/dx (returns None) where nobody needs it (the first
        layer on data); ``param_grads=False`` skips the parameter gradients (a generator
        update needs only the discriminator's input gradient).
        """
        if self._cache is None:
            raise ValueError(f"{self._where()}: backward() called before forward()")
        if not hasattr(dy, "shape") or not hasattr(dy, "dtype"):
            raise TypeError(f"{self._where()}: dy must be an array, got {type(dy).__name__}")
        expected = self._cache["y_shape"]
        if tuple(dy.shape) != expected:
            raise ValueError(
                f"{self._where()}: dy has shape {tuple(dy.shape)}, expected the output shape "
                f"{expected}"
            )
        if dy.dtype != self.dtype:
            raise TypeError(f"{self._where()}: dy is {dy.dtype}, expected {self.dtype}")
        return self._backward(dy, self._cache, input_grad, param_grads)

    def _forward(self, x, training: bool):
        raise NotImplementedError

    def _backward(self, dy, cache: dict, input_grad: bool, param_grads: bool):
        raise NotImplementedError

    def _accumulate(self, key: str, g) -> None:
        self.ops.accumulate(self.grads[key], g)

    def _check_input(self, x) -> None:
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{self._where()}: expected an array, got {type(x).__name__}")
        if np.dtype(x.dtype) not in FLOAT_DTYPES:
            raise TypeError(f"{self._where()}: input dtype must be float32 or float64, "
                            f"got {x.dtype}")
        if self.expected_rank is not None and x.ndim not in self.expected_rank:
            raise ValueError(f"{self._where()}: expected input of rank {self._ranks()} "
                             f"(batch first), got shape {tuple(x.shape)}")
        if x.ndim < 1:
            raise ValueError(f"{self._where()}: expected a batch (rank >= 1, batch first), got "
                             f"a 0-d array")
        if x.shape[0] < 1:
            raise ValueError(f"{self._where()}: empty batch, got shape {tuple(x.shape)}")

    # -- bookkeeping ------------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.ops.zero_grads(list(self.grads.values()))

    def to(self, backend: str | ModuleType) -> Layer:
        """Move parameters and gradients to ``backend`` (arrays in and out follow)."""
        self.ops = backends.get(backend)
        self.params = {k: self.ops.asarray(v) for k, v in self.params.items()}
        self.grads = {k: self.ops.asarray(v) for k, v in self.grads.items()}
        self._cache = None
        return self

    def astype(self, dtype) -> Layer:
        """Convert parameters and gradients to ``dtype`` (float32 or float64)."""
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{self._where()}: dtype must be float32 or float64, got {dtype}")
        self.params = {k: v.astype(dtype) for k, v in self.params.items()}
        self.grads = {k: v.astype(dtype) for k, v in self.grads.items()}
        if self.built:
            self.dtype = dtype
        self._cache = None
        return self
