"""Sequential: a stack of layers, run forward in order and backward in reverse."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import numpy as np

from .. import backends
from .activations import LeakyReLU
from .layer import Layer, snake_case


class Sequential(Layer):
    """``Sequential([Dense(...), LeakyReLU(), ...], seed=0)``.

    The model owns a ``numpy.random.Generator`` seeded by ``seed``; each layer gets its own
    child generator (weight initialisation, dropout masks), so a model is reproducible from
    its seed. Layer names follow Keras (``dense``, ``dense_1``, ...), unique in the model.

    ``forward(x, training)`` runs the layers; ``backward(dy)`` runs them in reverse and
    accumulates every parameter gradient; ``parameters()`` yields ``(name, param, grad)``
    for optimizers; ``summary()`` prints Keras' table.

    Fusion (``fuse=True``, the default): a LeakyReLU right after a layer that can fuse it
    (Dense, Conv2D, Conv2DTranspose, BatchNormalization: ``fuses_leaky_relu``) is computed by
    that layer's own kernels, so the GPU backends skip a launch and a round trip of the
    activation through memory; BatchNormalization also folds the LeakyReLU's backward into its
    own. The layers, names, weights and gradients are unchanged and the results are bitwise
    those of ``fuse=False``, which runs every layer on its own (rawgan.inspect's Recorder
    switches fusion off while it records each layer's activations).
    """

    def __init__(self, layers: list[Layer], name: str | None = None,
                 backend: str | ModuleType = "numpy", seed: int | None = None,
                 input_shape: tuple[int, ...] | None = None) -> None:
        super().__init__(name=name, backend=backend)
        layers = list(layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {i} is a {type(layer).__name__}, not a Layer")
            if isinstance(layer, Sequential):  # its parameters would be invisible here
                raise TypeError(f"Sequential: item {i} is a Sequential; nesting is not "
                                "supported, list its layers instead (Sequential([*inner, "
                                "...]))")
            if any(layer is other for other in layers[:i]):
                raise ValueError(f"Sequential: item {i} ({layer.name or layer.kind}) is "
                                 "already in the list (one layer object, one place)")
        self.layers = layers
        self.seed = seed
        self.fuse = True
        self.rng = np.random.default_rng(seed)
        # names as Keras gives them: explicit ones kept (and unique), the others
        # <kind>, <kind>_1, ... in order, skipping any name already taken
        taken: set[str] = set()
        for layer in layers:
            if layer.name is not None:
                if layer.name in taken:
                    raise ValueError(f"Sequential: two layers are named {layer.name!r}")
                taken.add(layer.name)
        seen: dict[str, int] = {}
        for layer, child in zip(layers, self.rng.spawn(len(layers)), strict=True):
            if layer.rng is None:
                layer.rng = child
            layer.to(self.ops)
            if layer.name is None:
                base = snake_case(layer.kind)
                count = seen.get(base, 0)
                name = base if count == 0 else f"{base}_{count}"
                while name in taken:
                    count += 1
                    name = f"{base}_{count}"
                seen[base] = count + 1
                layer.name = name
                taken.add(name)
        if input_shape is not None:
            self.build((None, *input_shape))

    # -- container ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    @property
    def output_shape(self) -> tuple:
        return self.compute_output_shape((None, *self.input_shape))

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.layers:
            shape = layer.compute_output_shape(shape)
        return shape

    def build(self, input_shape: tuple, dtype=np.float32) -> None:
        """Build every layer for inputs of ``input_shape`` (batch first, may be None)."""
        shape = tuple(input_shape)
        for layer in self.layers:
            if not layer.built:
                layer.build(shape, dtype)
            elif layer.dtype != np.dtype(dtype) or tuple(layer.input_shape) != tuple(
                    int(d) for d in shape[1:]):
                raise ValueError(
                    f"{self._where()}: layer {layer.name!r} was built for {layer.dtype} "
                    f"inputs of shape {tuple(layer.input_shape)}, the model gives it "
                    f"{np.dtype(dtype)} inputs of shape {tuple(shape[1:])}")
            shape = layer.compute_output_shape(shape)
        self.input_shape = tuple(int(d) for d in input_shape[1:])
        self.dtype = np.dtype(dtype)
        self.built = True

    def _built(self, input_shape: tuple, dtype=np.float32) -> Sequential:
        """Build and return self (for one-expression model definitions)."""
        self.build(input_shape, dtype)
        return self

    # -- passes ---------------------------------------------------------------------------
    def forward(self, x, training: bool = True):
        """Run every layer in order. x (N, *input_shape) -> (N, *output_shape).

        ``training=True`` (the default of this training-engine call, paired with
        :meth:`backward`): batch statistics, dropout on, moving statistics updated.
        """
        if not self.built:
            self._check_input(x)
            self.build(x.shape, x.dtype)
        layers, i = self.layers, 0
        while i < len(layers):
            layer = layers[i]
            act = layers[i + 1] if i + 1 < len(layers) else None
            if self.fuse and layer.fuses_leaky_relu and type(act) is LeakyReLU:
                x = layer.forward(x, training, leaky_alpha=act.alpha)
                act.fused_after(layer, x)
                i += 2
            else:
                x = layer.forward(x, training)
                i += 1
        return x

    def __call__(self, x, training: bool = False):
        """``model(x)``: as Keras, INFERENCE unless ``training=True`` (moving statistics,
        no dropout, nothing updated); :meth:`forward` is the training pass."""
        return self.forward(x, training)

    def backward(self, dy, *, input_grad: bool = True, param_grads: bool = True):
        """Backpropagate ``dy = dL/d(output)`` through every layer in reverse.

        Parameter gradients are ADDED to each layer's ``grads``. The chain rule is the
        loop itself: each layer turns dL/d(its output) into dL/d(its input).
        """
        last = len(self.layers) - 1
        for i in range(last, -1, -1):
            dy = self.layers[i].backward(dy, input_grad=input_grad or i > 0,
                                         param_grads=param_grads)
        return dy

    # -- parameters -----------------------------------------------------------------------
    def parameters(self) -> Iterator[tuple[str, object, object]]:
        """Yield ``("layer/key", param, grad)`` for every trainable parameter."""
        for layer in self.layers:
            for key in layer.trainable:
                if key in layer.grads:
                    yield f"{layer.name}/{key}", layer.params[key], layer.grads[key]

    def weights(self) -> dict[str, object]:
        """Every parameter, trainable or not, as ``{"layer/key": array}`` (backend arrays)."""
        return {f"{layer.name}/{k}": v for layer in self.layers for k, v in layer.params.items()}

    def get_weights(self) -> dict[str, np.ndarray]:
        """Every parameter as NumPy arrays (copies, never the live arrays), for checkpoints."""
        return {k: np.array(self.ops.to_numpy(v), copy=True) for k, v in self.weights().items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Load ``{"layer/key": array}``; names, shapes must match exactly (clear error)."""
        ours = self.weights()
        missing = sorted(set(ours) - set(weights))
        extra = sorted(set(weights) - set(ours))
        if missing or extra:
            raise ValueError(f"{self._where()}: weights do not match the model: missing "
                             f"{missing}, unexpected {extra}")
        for layer in self.layers:
            for k, cur in layer.params.items():
                new = weights[f"{layer.name}/{k}"]
                if tuple(new.shape) != tuple(cur.shape):
                    raise ValueError(f"{self._where()}: weight {layer.name}/{k} has shape "
                                     f"{tuple(new.shape)}, the model expects {tuple(cur.shape)}")
                layer.params[k] = self.ops.asarray(np.array(new, dtype=cur.dtype, copy=True))

    def count_params(self) -> int:
        return sum(layer.count_params() for layer in self.layers)

    def zero_grad(self) -> None:
        # every gradient of the model in one call (one kernel launch on the CuPy backend)
        self.ops.zero_grads([g for layer in self.layers for g in layer.grads.values()])

    def to(self, backend: str | ModuleType) -> Sequential:
        self.ops = backends.get(backend)
        for layer in self.layers:
            layer.to(self.ops)
        return self

    def astype(self, dtype) -> Sequential:
        for layer in self.layers:
            layer.astype(dtype)
        if self.built:
            self.dtype = np.dtype(dtype)
        return self

    # -- display --------------------------------------------------------------------------
    def summary(self, print_fn=print) -> str | None:
        """Keras-style table: layer (type), output shape, parameter count. Printed with
        ``print_fn`` and, as Keras, nothing returned (a REPL would show it twice); with
        ``print_fn=None`` the table is returned instead."""
        if not self.built:
            raise ValueError(f"{self._where()}: build the model (or run forward) before summary()")
        rows = [("Layer (type)", "Output Shape", "Param #")]
        shape: tuple = (None, *self.input_shape)
        for layer in self.layers:
            shape = layer.compute_output_shape(shape)
            rows.append((f"{layer.name} ({layer.kind})", str(shape), f"{layer.count_params():,}"))
        widths = [max(len(r[i]) for r in rows) + 2 for i in range(3)]
        line = "-" * sum(widths)
        out = [f'Model: "{self.name or "sequential"}"', line]
        for j, r in enumerate(rows):
            out.append("".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
            out.append("=" * sum(widths) if j == 0 else line)
        trainable = sum(int(np.prod(p.shape)) for _, p, _ in self.parameters())
        total = self.count_params()
        out += [f"Total params: {total:,}", f"Trainable params: {trainable:,}",
                f"Non-trainable params: {total - trainable:,}"]
        text = "\n".join(out)
        if print_fn is None:
            return text
        print_fn(text)
        return None
