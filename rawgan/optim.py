"""Optimizers: SGD (momentum, Nesterov), RMSprop and Adam, each an in-place update.

Usage::

    opt = rawgan.optim.Adam(model, lr=1e-4)
    model.zero_grad(); model.forward(x); model.backward(dy); opt.step()

The update rules follow Keras 3 (the seeds are Keras models), except RMSprop's, which is
PyTorch's (the original WGAN code's), written per parameter ``p`` with gradient ``g``;
``t`` counts steps from 1.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .checks import number


class Optimizer:
    """Base: holds ``(name, param, grad)`` triples and per-parameter state arrays."""

    #: the per-parameter state arrays a subclass keeps (load_state_dict refuses others)
    SLOTS: tuple[str, ...] | None = None

    def __init__(self, model, lr: float, clip_value: float | None = None) -> None:
        where = type(self).__name__
        self.model = model
        self.lr = number(lr, f"{where}: lr", low=0.0, low_open=True)
        self.clip_value = None if clip_value is None else number(
            clip_value, f"{where}: clip_value", low=0.0, low_open=True)
        self.iterations = 0
        self.state: dict[str, dict[str, object]] = {}

    def _params(self) -> Iterable[tuple[str, object, object]]:
        return self.model.parameters()

    def _slot(self, name: str, slot: str, like):
        per = self.state.setdefault(name, {})
        if slot not in per:  # zeros on the parameter's backend and dtype
            per[slot] = self.model.ops.xp.zeros(like.shape, dtype=like.dtype)
        elif per[slot].dtype != like.dtype or type(per[slot]) is not type(like):
            raise ValueError(
                f"{type(self).__name__}: parameter {name!r} is now {like.dtype} "
                f"({type(like).__module__}) but its {slot!r} state is {per[slot].dtype} "
                f"({type(per[slot]).__module__}): the model was converted (astype / to) after "
                "this optimizer's first step; build a new optimizer (or load its state)")
        return per[slot]

    #: The backend op that applies this rule to every tensor in one call (numpy_ops and
    #: cupy_ops have them); a backend without it gets the per-tensor ``_update`` below.
    FUSED: str = ""

    def step(self) -> None:
        """Apply one update to every trainable parameter, in place."""
        self.iterations += 1
        triples = list(self._params())
        fused = getattr(self.model.ops, self.FUSED, None) if self.FUSED else None
        if fused is not None and triples:
            self._fused_step(fused, [n for n, _, _ in triples], [p for _, p, _ in triples],
                             [g for _, _, g in triples])
            return
        for name, p, g in triples:
            self._update(name, p, g)
            if self.clip_value is not None:
                # WGAN weight clipping (Arjovsky et al. 2017): p <- clip(p, -c, c)
                np.clip(p, -self.clip_value, self.clip_value, out=p)

    def _update(self, name: str, p, g) -> None:
        raise NotImplementedError

    def _fused_step(self, fused, names: list[str], params: list, grads: list) -> None:
        raise NotImplementedError

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"iterations": int, "slots": {"param/slot": ndarray}}`` (NumPy arrays)."""
        slots = {}
        for name, per in self.state.items():
            for slot, arr in per.items():
                slots[f"{name}/{slot}"] = np.array(self.model.ops.to_numpy(arr), copy=True)
        return {"iterations": self.iterations, "slots": slots}

    def load_state_dict(self, state: dict) -> None:
        names = {n: p for n, p, _ in self._params()}
        restored: dict[str, dict[str, object]] = {}
        for key, arr in state["slots"].items():
            name, slot = key.rsplit("/", 1)
            if name not in names:
                raise ValueError(f"{type(self).__name__}: state for unknown parameter {name!r}")
            if self.SLOTS is not None and slot not in self.SLOTS:
                raise ValueError(f"{type(self).__name__}: state {key!r} is not one of its "
                                 f"slots ({', '.join(self.SLOTS)}): another optimizer's state?")
            if tuple(arr.shape) != tuple(names[name].shape):
                raise ValueError(f"{type(self).__name__}: state {key!r} has shape "
                                 f"{tuple(arr.shape)}, parameter has {tuple(names[name].shape)}")
            restored.setdefault(name, {})[slot] = self.model.ops.asarray(
                np.array(arr, dtype=names[name].dtype, copy=True))
        self.state = restored
        self.iterations = int(state["iterations"])


class SGD(Optimizer):
    """SGD with momentum ``mu`` (Keras form)::

        v <- mu * v - lr * g
        p <- p + v                      (plain momentum)
        p <- p + mu * v - lr * g        (nesterov=True)
    """

    def __init__(self, model, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 clip_value: float | None = None) -> None:
        super().__init__(model, lr, clip_value)
        self.momentum = number(momentum, "SGD: momentum", low=0.0, high=1.0, high_open=True)
        self.nesterov = bool(nesterov)

    FUSED = "sgd_update"
    SLOTS = ("momentum",)

    def _fused_step(self, fused, names, params, grads):
        vel = None if self.momentum == 0.0 else [
            self._slot(n, "momentum", p) for n, p in zip(names, params, strict=True)]
        fused(params, grads, vel, self.lr, self.momentum, self.nesterov, self.clip_value)

    def _update(self, name, p, g):
        if self.momentum == 0.0:
            p -= self.lr * g
            return
        v = self._slot(name, "momentum", p)
        v *= self.momentum
        v -= self.lr * g
        if self.nesterov:
            p += self.momentum * v - self.lr * g
        else:
            p += v


class RMSprop(Optimizer):
    """RMSprop (rho 0.9, epsilon 1e-7), as the original WGAN uses::

        a <- rho * a + (1 - rho) * g^2
        p <- p - lr * g / (sqrt(a) + eps)

    epsilon OUTSIDE the square root, as torch.optim.RMSprop (and Keras 2) have it; Keras 3
    divides by ``sqrt(a + eps)`` instead, which takes steps up to 10x smaller when
    ``g^2`` is near ``eps`` (gradients ~1e-4: the WGAN critic's regime).
    """

    def __init__(self, model, lr: float = 1e-3, rho: float = 0.9, epsilon: float = 1e-7,
                 clip_value: float | None = None) -> None:
        super().__init__(model, lr, clip_value)
        self.rho = number(rho, "RMSprop: rho", low=0.0, high=1.0, high_open=True)
        self.epsilon = number(epsilon, "RMSprop: epsilon", low=0.0, low_open=True)

    FUSED = "rmsprop_update"
    SLOTS = ("velocity",)

    def _fused_step(self, fused, names, params, grads):
        acc = [self._slot(n, "velocity", p) for n, p in zip(names, params, strict=True)]
        fused(params, grads, acc, self.lr, self.rho, self.epsilon, self.clip_value)

    def _update(self, name, p, g):
        a = self._slot(name, "velocity", p)
        a *= self.rho
        a += (1.0 - self.rho) * g * g
        p -= self.lr * g / (np.sqrt(a) + self.epsilon)


class Adam(Optimizer):
    """Adam with bias correction (Keras defaults beta_1 0.9, beta_2 0.999, epsilon 1e-7)::

        m <- m + (1 - b1) * (g - m)
        v <- v + (1 - b2) * (g^2 - v)
        p <- p - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

    The bias correction is folded into the step size, so epsilon is added to the
    uncorrected sqrt(v), exactly as Keras (and the paper's "epsilon hat" form) do.
    """

    def __init__(self, model, lr: float = 1e-3, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7, clip_value: float | None = None) -> None:
        super().__init__(model, lr, clip_value)
        self.beta_1 = number(beta_1, "Adam: beta_1", low=0.0, high=1.0, high_open=True)
        self.beta_2 = number(beta_2, "Adam: beta_2", low=0.0, high=1.0, high_open=True)
        self.epsilon = number(epsilon, "Adam: epsilon", low=0.0, low_open=True)  # 0: 0/0
        #: A one-element device array the fused kernel reads alpha from instead of the host
        #: value (set by rawgan.graphed.GraphedStep so that a replayed graph gets each step's
        #: bias correction); None: the host value.
        self.alpha_ref = None

    def alpha_at(self, t: int) -> float:
        """The step size of update ``t`` (1-based): ``lr sqrt(1 - b2^t) / (1 - b1^t)``."""
        return self.lr * (1.0 - self.beta_2 ** t) ** 0.5 / (1.0 - self.beta_1 ** t)

    def step(self) -> None:
        self._alpha = self.alpha_at(self.iterations + 1)
        super().step()

    FUSED = "adam_update"
    SLOTS = ("m", "v")

    def _fused_step(self, fused, names, params, grads):
        ms = [self._slot(n, "m", p) for n, p in zip(names, params, strict=True)]
        vs = [self._slot(n, "v", p) for n, p in zip(names, params, strict=True)]
        alpha = self._alpha if self.alpha_ref is None else self.alpha_ref
        fused(params, grads, ms, vs, alpha, self.beta_1, self.beta_2, self.epsilon,
              self.clip_value)

    def _update(self, name, p, g):
        m = self._slot(name, "m", p)
        v = self._slot(name, "v", p)
        m += (1.0 - self.beta_1) * (g - m)
        v += (1.0 - self.beta_2) * (g * g - v)
        p -= self._alpha * m / (np.sqrt(v) + self.epsilon)


def build(name: str, model, **kwargs) -> Optimizer:
    """``build("adam", model, lr=1e-4)``; names: sgd, rmsprop, adam."""
    table = {"sgd": SGD, "rmsprop": RMSprop, "adam": Adam}
    if not isinstance(name, str) or name.lower() not in table:
        raise ValueError(f"unknown optimizer {name!r}: expected one of {sorted(table)}")
    return table[name.lower()](model, **kwargs)
