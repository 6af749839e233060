"""Gradient inspection for learners: record, save and plot what every layer computes.

With no autograd, every activation and every gradient in rawgan is a named array. A
:class:`Recorder` turns them into numbers per layer and per training step::

    from rawgan.inspect import Recorder
    with Recorder({"generator": G, "discriminator": D}, [opt_g, opt_d],
                  tensors_at={0, 99}) as rec:
        for step in range(100):
            rec.begin_step(step)
            stats = gan.train_step(G, D, opt_g, opt_d, "bce", reals, noise)
            rec.log(d_loss=stats.d_loss, d_real=stats.d_real, d_fake=stats.d_fake)
    rec.save("inspect.h5")
    rec.grad_norms("generator")          # {layer: (x, |dL/dW|)} over the steps

``rawgan inspect`` (:func:`inspect_run`, :func:`compare_run`) trains a model N steps with a
recorder on, writes the file below and draws the plots; ``--compare-losses minimax,bce``
shows why the non-saturating generator loss exists. User guide: docs/inspect.md; the
derivations behind every recorded gradient: docs/derivations.md.

What is recorded
----------------
Per layer of each model, every time the layer runs, as one row of a table:

``activation``   the layer's output ``y`` in forward: mean, std, min, max, l2 (``sqrt(sum
                 y^2)``), frac_zero (fraction of exact zeros); plus ``frac_negative_input``
                 (fraction of inputs ``x < 0``: the pre-activations a ReLU zeroes and a
                 LeakyReLU scales by alpha) for ReLU and LeakyReLU, and ``frac_saturated``
                 for Tanh (``|y| > 0.99``) and Sigmoid (``y < 0.01`` or ``y > 0.99``), where
                 the derivative ``1 - y^2`` / ``y (1 - y)`` is nearly 0.
``grad_input``   ``dL/dx``, what backward returns (not recorded where it is not computed:
                 the first layer of a model, the critic's backward in the D update).
``params/<key>/grad``    ``dL/dW`` of each trainable parameter, read when its optimizer
                 steps (the gradient the update uses): the same six statistics.
``params/<key>/update``  ``dW = W_after - W_before`` of that optimizer step: the six
                 statistics, ``weight_l2`` (``|W_before|``) and ``ratio`` = ``|dW| / |W|``
                 (the update-to-weight ratio; about 1e-3 is the usual healthy order).

Each row carries ``step`` (set by :meth:`Recorder.begin_step`) and ``call``: the count of that
event within the step, from 0. In one :func:`rawgan.gan.train_step` with k = ``d_steps``
the discriminator runs forward and backward once per critic pass, then once in the
generator step: calls 0..k-1 on ``[real; fake]``, call k on ``fake`` (with BatchNorm real
and fake run separately: 0..2k-1, then 2k); its first layer records ``grad_input`` only at
that last call (the ``dL/dx`` carried into the generator; the critic's own backward passes
compute none there, but are counted); its optimizer steps k times (calls 0..k-1). The
generator runs forward k times (calls 0..k-1), backward and its optimizer once (call 0).

Statistics are computed in float64 on host copies (``ops.to_numpy``), so the recorder works
with every backend. Whole tensors (the activation, ``grad_input``, parameter gradients and
updates) are kept, as host copies, at the steps listed in ``tensors_at``.

Off costs nothing: a recorder wraps the layers' ``forward`` / ``backward`` and the
optimizers' ``step`` (instance attributes shadowing the class methods) only while its
``with`` block runs, and deletes the wrappers on exit; outside it no code of this module is
on any path and no flag is tested.

HDF5 layout (:meth:`Recorder.save`, read back with :meth:`Recorder.load`)
------------------------------------------------------------------------
::

    /                                  attrs: format = "rawgan-inspect", format_version = 1,
                                              rawgan_version, models (JSON list),
                                              tensors_at (JSON list), steps (JSON list of the
                                              steps begun), plus the caller's attrs (rawgan
                                              inspect: config (JSON), loss, checkpoint)
    /scalars/<name>/step               int64 (S,)    what log() got, e.g. d_loss, g_loss,
    /scalars/<name>/value              float64 (S,)  d_real (D(x)), d_fake (D(G(z)))
    /models/<model>                    attrs: layers (JSON list, forward order),
                                              kinds (JSON list: Dense, LeakyReLU, ...)
    /models/<model>/<layer>            attrs: kind, index
    /models/<model>/<layer>/activation/{step, call}          int64 (R,)
    /models/<model>/<layer>/activation/{mean, std, min, max, l2, frac_zero}   float64 (R,)
                                        [+ frac_negative_input | frac_saturated]
    /models/<model>/<layer>/grad_input/{step, call, mean, std, min, max, l2, frac_zero}
    /models/<model>/<layer>/params/<key>/grad/{step, call, mean, ..., frac_zero}
    /models/<model>/<layer>/params/<key>/update/{step, call, mean, ..., frac_zero,
                                                 weight_l2, ratio}
    /tensors/<step>/<model>/<layer>/activation/<call>        the whole arrays (the
    /tensors/<step>/<model>/<layer>/grad_input/<call>        model's dtype, gzip), at the
    /tensors/<step>/<model>/<layer>/params/<key>/grad/<call>     steps in tensors_at
    /tensors/<step>/<model>/<layer>/params/<key>/update/<call>

Every table's columns have one length R (one row per event); ``step`` and ``call`` say which
event. A group exists only for what happened (no ``grad_input`` for a layer whose input
gradient was never computed, no ``params`` for a layer without trainable weights).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .nn import LeakyReLU, ReLU, Sequential, Sigmoid, Tanh

__all__ = [
    "FORMAT",
    "Recorder",
    "STATS",
    "Session",
    "compare_losses",
    "compare_run",
    "format_comparison",
    "inspect_run",
    "record_session",
    "save_activation_histograms",
    "save_comparison_plot",
    "save_d_outputs",
    "save_grad_norms",
    "session_from_config",
    "tensor_stats",
]

FORMAT = "rawgan-inspect"
FORMAT_VERSION = 1
#: The statistics of every recorded array, in this order.
STATS = ("mean", "std", "min", "max", "l2", "frac_zero")
TANH_SATURATION = 0.99
SIGMOID_SATURATION = 0.01  # y < 0.01 or y > 0.99


# --------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------


def tensor_stats(a) -> dict[str, float]:
    """``{mean, std, min, max, l2, frac_zero}`` of a NumPy array, in float64.

    ``std`` is the population standard deviation (``ddof=0``), ``l2 = sqrt(sum a^2)``,
    ``frac_zero`` the fraction of entries exactly 0. An empty array gives NaNs (and 0 norm).
    """
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    if x.size == 0:
        nan = float("nan")
        return {"mean": nan, "std": nan, "min": nan, "max": nan, "l2": 0.0, "frac_zero": nan}
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "max": float(x.max()), "l2": math.sqrt(float(np.dot(x, x))),
            "frac_zero": float(np.count_nonzero(x == 0.0)) / x.size}


def _activation_extras(layer, x, y) -> dict[str, float]:
    """The layer-specific activation statistics (see the module docstring)."""
    if isinstance(layer, ReLU | LeakyReLU):
        xh = np.asarray(layer.ops.to_numpy(x))
        return {"frac_negative_input": float(np.count_nonzero(xh < 0)) / max(xh.size, 1)}
    if isinstance(layer, Tanh):
        return {"frac_saturated": float(np.count_nonzero(np.abs(y) > TANH_SATURATION))
                / max(y.size, 1)}
    if isinstance(layer, Sigmoid):
        sat = np.count_nonzero((y < SIGMOID_SATURATION) | (y > 1.0 - SIGMOID_SATURATION))
        return {"frac_saturated": float(sat) / max(y.size, 1)}
    return {}


class _Table:
    """Rows of one recorded quantity: ``step``, ``call`` and named float columns."""

    def __init__(self) -> None:
        self.step: list[int] = []
        self.call: list[int] = []
        self.cols: dict[str, list[float]] = {}

    def append(self, step: int, call: int, values: Mapping[str, float]) -> None:
        n = len(self.step)
        for k in values:
            if k not in self.cols:  # a column that appears late is NaN-filled before it
                self.cols[k] = [float("nan")] * n
        for k, col in self.cols.items():
            col.append(float(values.get(k, float("nan"))))
        self.step.append(int(step))
        self.call.append(int(call))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"step": np.asarray(self.step, dtype=np.int64),
               "call": np.asarray(self.call, dtype=np.int64)}
        out.update({k: np.asarray(v, dtype=np.float64) for k, v in self.cols.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> _Table:
        t = cls()
        t.step = [int(v) for v in arrays["step"]]
        t.call = [int(v) for v in arrays["call"]]
        t.cols = {k: [float(v) for v in a] for k, a in arrays.items()
                  if k not in ("step", "call")}
        return t


# --------------------------------------------------------------------------------------
# the recorder
# --------------------------------------------------------------------------------------


def _named_models(models) -> dict[str, Sequential]:
    if isinstance(models, Sequential):
        models = [models]
    if isinstance(models, Mapping):
        named = dict(models)
    else:
        named = {}
        for i, m in enumerate(models):
            name = m.name or f"model_{i}"
            if name in named:
                raise ValueError(f"Recorder: two models are named {name!r}; pass a dict "
                                 f"{{name: model}}")
            named[name] = m
    for name, m in named.items():
        if not isinstance(m, Sequential):
            raise TypeError(f"Recorder: model {name!r} is a {type(m).__name__}, not a "
                            f"Sequential")
        if "/" in name:
            raise ValueError(f"Recorder: model name {name!r} may not contain '/'")
    return named


class Recorder:
    """Record per-layer statistics of activations, input gradients, parameter gradients and
    parameter updates, per step (see the module docstring for what and how).

    Parameters
    ----------
    models : a Sequential, a list of them (named by their ``name``) or a dict
        ``{name: Sequential}``.
    optimizers : optimizers whose ``step()`` is watched for parameter gradients and
        updates; each must belong to (``opt.model is``) one of ``models``. Without one, a
        model's parameters are not recorded.
    tensors_at : steps at which whole tensors are kept as well.
    activations, grad_inputs, params : switch those groups off (all on by default).

    Use it as a context manager; records survive the ``with`` block. :meth:`begin_step`
    sets the step number of what follows; :meth:`log` adds scalars (losses, D outputs).
    """

    def __init__(self, models, optimizers: Iterable = (), *, tensors_at: Iterable[int] = (),
                 activations: bool = True, grad_inputs: bool = True,
                 params: bool = True) -> None:
        self.models = _named_models(models)
        self.optimizers: dict[str, Any] = {}
        for opt in (optimizers.values() if isinstance(optimizers, Mapping) else optimizers):
            owner = [n for n, m in self.models.items() if getattr(opt, "model", None) is m]
            if not owner:
                raise ValueError(f"Recorder: optimizer {type(opt).__name__} belongs to none of "
                                 f"the models {sorted(self.models)}")
            if owner[0] in self.optimizers:
                raise ValueError(f"Recorder: two optimizers for model {owner[0]!r}")
            self.optimizers[owner[0]] = opt
        self.tensors_at = frozenset(int(s) for s in tensors_at)
        self.record_activations = activations
        self.record_grad_inputs = grad_inputs
        self.record_params = params
        self.layers: dict[str, list[tuple[str, str]]] = {
            n: [(layer.name, layer.kind) for layer in m.layers] for n, m in self.models.items()}
        self.tables: dict[tuple[str, ...], _Table] = {}
        self.scalars: dict[str, tuple[list[int], list[float]]] = {}
        self.tensors: dict[tuple, np.ndarray] = {}  # (step, *path, call) -> array
        self.steps: list[int] = []
        self.step = 0
        self._calls: dict[tuple[str, ...], int] = {}
        self._patches: list[tuple[object, str, bool, object]] = []
        self.active = False
        self.attrs: dict[str, Any] = {}  # root attributes of a loaded file

    # -- steps and scalars -----------------------------------------------------------------
    def begin_step(self, step: int | None = None) -> int:
        """Start step ``step`` (default: the previous one + 1, or 0); returns it."""
        self.step = int(step) if step is not None else (self.steps[-1] + 1 if self.steps
                                                         else 0)
        self.steps.append(self.step)
        self._calls.clear()
        return self.step

    def log(self, step: int | None = None, **scalars: float) -> None:
        """Record named scalars (``d_loss=..., d_fake=...``) at ``step`` (default: the
        current step)."""
        s = self.step if step is None else int(step)
        for name, value in scalars.items():
            steps, values = self.scalars.setdefault(name, ([], []))
            steps.append(s)
            values.append(float(value))

    # -- switching on and off --------------------------------------------------------------
    def __enter__(self) -> Recorder:
        if self.active:
            raise RuntimeError("Recorder: already active (a recorder is not re-entrant)")
        try:
            for mname, model in self.models.items():
                if hasattr(model, "fuse"):  # each layer's own output is recorded: no fusion
                    self._patch(model, "fuse", lambda fuse: False)
                for layer in model.layers:
                    if self.record_activations:
                        self._patch(layer, "forward", self._wrap_forward(mname, layer))
                    if self.record_grad_inputs:
                        self._patch(layer, "backward", self._wrap_backward(mname, layer))
            if self.record_params:
                for mname, opt in self.optimizers.items():
                    self._patch(opt, "step", self._wrap_step(mname, opt))
        except BaseException:
            self._unpatch()
            raise
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self._unpatch()
        self.active = False

    def _patch(self, obj, attr: str, make: Callable[[Callable], Callable]) -> None:
        had = attr in vars(obj)
        old = vars(obj).get(attr)
        setattr(obj, attr, make(getattr(obj, attr)))
        self._patches.append((obj, attr, had, old))

    def _unpatch(self) -> None:
        while self._patches:
            obj, attr, had, old = self._patches.pop()
            if had:
                setattr(obj, attr, old)
            else:
                vars(obj).pop(attr, None)

    # -- the wrappers ----------------------------------------------------------------------
    def _next_call(self, path: tuple[str, ...]) -> int:
        c = self._calls.get(path, 0)
        self._calls[path] = c + 1
        return c

    def _add(self, path: tuple[str, ...], call: int, values: Mapping[str, float],
             tensor=None) -> None:
        self.tables.setdefault(path, _Table()).append(self.step, call, values)
        if tensor is not None and self.step in self.tensors_at:
            self.tensors[(self.step, *path, call)] = np.array(tensor, copy=True)

    def _wrap_forward(self, mname: str, layer):
        def make(orig):
            def forward(x, *args, **kwargs):
                y = orig(x, *args, **kwargs)
                path = (mname, layer.name, "activation")
                yh = np.asarray(layer.ops.to_numpy(y))
                values = tensor_stats(yh)
                values.update(_activation_extras(layer, x, yh))
                self._add(path, self._next_call(path), values, yh)
                return y
            return forward
        return make

    def _wrap_backward(self, mname: str, layer):
        def make(orig):
            def backward(dy, *args, **kwargs):
                dx = orig(dy, *args, **kwargs)
                path = (mname, layer.name, "grad_input")
                call = self._next_call(path)  # numbered per backward call, dx or not
                if dx is not None:
                    dxh = np.asarray(layer.ops.to_numpy(dx))
                    self._add(path, call, tensor_stats(dxh), dxh)
                return dx
            return backward
        return make

    def _wrap_step(self, mname: str, opt):
        model = self.models[mname]
        ops = model.ops

        def make(orig):
            def step(*args, **kwargs):
                before = {}
                for name, p, g in model.parameters():
                    lname, key = name.rsplit("/", 1)
                    path = (mname, lname, "params", key, "grad")
                    gh = np.asarray(ops.to_numpy(g))
                    self._add(path, self._next_call(path), tensor_stats(gh), gh)
                    before[name] = np.array(ops.to_numpy(p), dtype=np.float64, copy=True)
                out = orig(*args, **kwargs)
                for name, p, _ in model.parameters():
                    lname, key = name.rsplit("/", 1)
                    path = (mname, lname, "params", key, "update")
                    w0 = before[name]
                    upd = np.asarray(ops.to_numpy(p), dtype=np.float64) - w0
                    values = tensor_stats(upd)
                    w_l2 = math.sqrt(float(np.dot(w0.reshape(-1), w0.reshape(-1))))
                    values["weight_l2"] = w_l2
                    values["ratio"] = values["l2"] / w_l2 if w_l2 > 0 else float("inf")
                    self._add(path, self._next_call(path), values,
                              upd.astype(np.asarray(ops.to_numpy(p)).dtype))
                return out
            return step
        return make

    # -- reading ---------------------------------------------------------------------------
    def paths(self) -> list[tuple[str, ...]]:
        """Every recorded table, e.g. ``("generator", "dense", "params", "kernel", "grad")``."""
        return list(self.tables)

    def table(self, *path: str) -> dict[str, np.ndarray]:
        """The columns of one table as arrays: ``step``, ``call`` and the statistics."""
        if tuple(path) not in self.tables:
            raise KeyError(f"nothing recorded for {'/'.join(path)}; recorded: "
                           f"{sorted('/'.join(p) for p in self.tables)[:8]} ...")
        return self.tables[tuple(path)].arrays()

    def scalar(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of a logged scalar."""
        steps, values = self.scalars[name]
        return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)

    def tensor(self, step: int, *path: str, call: int = 0) -> np.ndarray:
        """A whole tensor kept at ``step`` (one of ``tensors_at``)."""
        return self.tensors[(int(step), *path, int(call))]

    def param_layers(self, model: str) -> list[str]:
        """The layers of ``model`` with recorded parameter tables, in forward order."""
        have = {p[1] for p in self.tables if p[0] == model and p[2] == "params"}
        return [name for name, _ in self.layers[model] if name in have]

    def _layer_param_keys(self, model: str, layer: str) -> list[str]:
        return sorted({p[3] for p in self.tables if p[:3] == (model, layer, "params")})

    def layer_norms(self, model: str, layer: str, what: str = "grad"
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(step, call, norm)`` of the layer's whole parameter gradient (``what="grad"``)
        or update (``"update"``): ``sqrt(sum over its parameters of l2^2)``, one entry per
        optimizer step."""
        keys = self._layer_param_keys(model, layer)
        if not keys:
            raise KeyError(f"no parameters recorded for {model}/{layer}")
        tabs = [self.table(model, layer, "params", k, what) for k in keys]
        step, call = tabs[0]["step"], tabs[0]["call"]
        for t in tabs[1:]:
            if not (np.array_equal(t["step"], step) and np.array_equal(t["call"], call)):
                raise ValueError(f"{model}/{layer}: parameter tables of different lengths")
        return step, call, np.sqrt(sum(t["l2"] ** 2 for t in tabs))

    def grad_norms(self, model: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{layer: (x, |dL/dW_layer|)}`` for every layer with parameters; ``x`` is
        ``step + call / calls_per_step`` (the step itself when there is one call)."""
        out = {}
        for layer in self.param_layers(model):
            step, call, norm = self.layer_norms(model, layer, "grad")
            out[layer] = (step + call / max(int(call.max()) + 1, 1) if call.size else
                          step.astype(np.float64), norm)
        return out

    def total_grad_norm(self, model: str, call: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, |dL/dW|)`` over all of ``model``'s parameters, per optimizer step
        (``call``: keep only that call of each step; default all)."""
        layers = self.param_layers(model)
        if not layers:
            raise KeyError(f"no parameters recorded for {model!r}")
        parts = [self.layer_norms(model, layer, "grad") for layer in layers]
        step, c = parts[0][0], parts[0][1]
        total = np.sqrt(sum(p[2] ** 2 for p in parts))
        keep = np.ones(len(step), dtype=bool) if call is None else c == call
        return step[keep], total[keep]

    # -- files -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], attrs: Mapping[str, Any] | None = None
             ) -> Path:
        """Write everything to one HDF5 file (layout: the module docstring), atomically.

        ``attrs``: extra root attributes (str / int / float as they are, anything else as
        JSON).
        """
        import h5py

        from . import __version__
        from .checkpoint import atomic_write

        path = Path(path)
        with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["rawgan_version"] = __version__
            f.attrs["models"] = json.dumps(list(self.models or self.layers))
            f.attrs["tensors_at"] = json.dumps(sorted(self.tensors_at))
            f.attrs["steps"] = json.dumps(self.steps)
            for k, v in (attrs or {}).items():
                f.attrs[k] = v if isinstance(v, str | int | float) and not isinstance(
                    v, bool) else json.dumps(v)
            sc = f.create_group("scalars")
            for name, (steps, values) in self.scalars.items():
                g = sc.create_group(name)
                g.create_dataset("step", data=np.asarray(steps, dtype=np.int64))
                g.create_dataset("value", data=np.asarray(values, dtype=np.float64))
            mg = f.create_group("models")
            for mname, layers in self.layers.items():
                g = mg.create_group(mname)
                g.attrs["layers"] = json.dumps([n for n, _ in layers])
                g.attrs["kinds"] = json.dumps([k for _, k in layers])
                for i, (lname, kind) in enumerate(layers):
                    lg = g.create_group(lname)
                    lg.attrs["kind"] = kind
                    lg.attrs["index"] = i
            for tpath, table in self.tables.items():
                g = f.require_group("models/" + "/".join(tpath))
                for col, arr in table.arrays().items():
                    g.create_dataset(col, data=arr)
            for key, arr in self.tensors.items():
                step, *tpath, call = key
                name = "/".join(["tensors", str(step), *tpath, str(call)])
                f.create_dataset(name, data=arr, compression="gzip", compression_opts=4)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recorder:
        """A detached recorder (no models attached) holding what :meth:`save` wrote; the
        root attributes are in ``.attrs``."""
        import h5py

        rec = cls.__new__(cls)
        rec.models, rec.optimizers, rec.tables, rec.scalars, rec.tensors = {}, {}, {}, {}, {}
        rec._calls, rec._patches, rec.active = {}, [], False
        rec.record_activations = rec.record_grad_inputs = rec.record_params = True
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise ValueError(f"{path}: not a rawgan inspect file")
            rec.attrs = {k: (v.decode() if isinstance(v, bytes) else v)
                         for k, v in f.attrs.items()}
            rec.tensors_at = frozenset(json.loads(rec.attrs["tensors_at"]))
            rec.steps = list(json.loads(rec.attrs["steps"]))
            rec.step = rec.steps[-1] if rec.steps else 0
            for name, g in f["scalars"].items():
                rec.scalars[name] = ([int(v) for v in g["step"][()]],
                                     [float(v) for v in g["value"][()]])
            rec.layers = {}
            for mname, g in f["models"].items():
                rec.layers[mname] = list(zip(json.loads(g.attrs["layers"]),
                                             json.loads(g.attrs["kinds"]), strict=True))

                def visit(name, obj, mname=mname):
                    if isinstance(obj, h5py.Group) and "step" in obj and "call" in obj:
                        rec.tables[(mname, *name.split("/"))] = _Table.from_arrays(
                            {k: obj[k][()] for k in obj})

                g.visititems(visit)
            if "tensors" in f:
                def visit_t(name, obj):
                    if isinstance(obj, h5py.Dataset):
                        step, *tpath, call = name.split("/")
                        rec.tensors[(int(step), *tpath, int(call))] = obj[()]

                f["tensors"].visititems(visit_t)
        return rec


# --------------------------------------------------------------------------------------
# recording training steps, and the minimax / bce comparison
# --------------------------------------------------------------------------------------


@dataclass
class Session:
    """What one GAN training step needs: models, optimizers, the loss, a source of real
    batches (``next_reals() -> [batch] * d_steps``) and of noise (``noise(n)``)."""

    G: Sequential
    D: Sequential
    opt_g: Any
    opt_d: Any
    kind: str
    next_reals: Callable[[], list]
    noise: Callable[[int], Any]

    def step(self):
        """One :func:`rawgan.gan.train_step`; returns its StepStats."""
        from . import gan

        return gan.train_step(self.G, self.D, self.opt_g, self.opt_d, self.kind,
                              self.next_reals(), self.noise)

    def warm_up_critic(self, steps: int) -> None:
        """Train D alone for ``steps`` critic steps (G unchanged), so that it rejects the
        generator's samples before the recorded steps start."""
        from . import gan

        for _ in range(int(steps)):
            real = self.next_reals()[0]
            gan.critic_step(self.G, self.D, self.opt_d, self.kind, real,
                            self.noise(real.shape[0]))


def record_session(session: Session, steps: int, *, tensors_at: Iterable[int] = (),
                   start: int = 0, on_step: Callable[[int, Any], None] | None = None
                   ) -> Recorder:
    """Train ``steps`` steps of ``session`` with a :class:`Recorder` on both models and both
    optimizers; steps are numbered from ``start``. Logs ``d_loss``, ``g_loss``, ``d_real``
    (mean D(x)) and ``d_fake`` (mean D(G(z))) per step. Stops early (keeping what was
    recorded) if a loss becomes NaN or infinite."""
    rec = Recorder({"generator": session.G, "discriminator": session.D},
                   [session.opt_g, session.opt_d], tensors_at=tensors_at)
    with rec:
        for i in range(start, start + int(steps)):
            rec.begin_step(i)
            st = session.step()
            rec.log(d_loss=st.d_loss, g_loss=st.g_loss, d_real=st.d_real, d_fake=st.d_fake)
            if on_step is not None:
                on_step(i, st)
            if not (math.isfinite(st.d_loss) and math.isfinite(st.g_loss)):
                break
    return rec


def compare_losses(make_session: Callable[[str], Session],
                   kinds: Iterable[str] = ("minimax", "bce"), steps: int = 10, *,
                   d_warmup: int = 0) -> dict[str, Recorder]:
    """Run each generator loss in ``kinds`` for ``steps`` recorded steps from the same
    start: ``make_session(kind)`` must build identical models, optimizers and random
    streams for every kind (same seeds), differing only in the loss.

    ``d_warmup`` critic-only steps run first in every session (identical for minimax and
    bce, whose discriminator losses are the same), so the comparison can start from a
    discriminator that already rejects the generator's samples, as early in training.
    Returns ``{kind: Recorder}``; :func:`format_comparison` prints the lesson.
    """
    out = {}
    for kind in kinds:
        s = make_session(kind)
        if s.kind != kind:
            raise ValueError(f"compare_losses: make_session({kind!r}) built a {s.kind!r} "
                             f"session")
        s.warm_up_critic(d_warmup)
        out[kind] = record_session(s, steps)
    return out


def format_comparison(results: Mapping[str, Recorder], model: str = "generator",
                      first: int = 10) -> str:
    """The per-layer gradient norms of ``model`` at step 0 for each loss (with the ratio of
    the first loss to the second), then the total norm and D(G(z)) over the first steps."""
    kinds = list(results)
    recs = [results[k] for k in kinds]
    layers = recs[0].param_layers(model)
    w = max([len(x) for x in layers] + [10]) + 2
    lines = [f"{model} gradient L2 norm |dL/dW| per layer at step 0 "
             f"(D(G(z)) = {recs[0].scalar('d_fake')[1][0]:.4g} before the step):",
             f"{'layer':<{w}}" + "".join(f"{k:>13}" for k in kinds)
             + (f"{kinds[0] + ' / ' + kinds[1]:>20}" if len(kinds) > 1 else "")]

    def at0(rec, layer):
        step, call, norm = rec.layer_norms(model, layer, "grad")
        return float(norm[(step == step.min()) & (call == 0)][0])

    rows = [(layer, [at0(r, layer) for r in recs]) for layer in layers]
    totals = [float(r.total_grad_norm(model, call=0)[1][0]) for r in recs]
    for layer, vals in rows + [("(all)", totals)]:
        ratio = (f"{vals[0] / vals[1]:20.3g}" if len(vals) > 1 and vals[1] > 0 else "")
        lines.append(f"{layer:<{w}}" + "".join(f"{v:13.4g}" for v in vals) + ratio)
    series = [(r.total_grad_norm(model, call=0), r.scalar("d_fake")) for r in recs]
    n = min(first, *(len(g[0]) for g, _ in series))
    lines.append("")
    lines.append(f"first {n} steps: total {model} gradient norm, and D(G(z)) (mean "
                 f"output on fakes, before the step's D update):")
    lines.append(f"{'step':>5}" + "".join(f"{'|g| ' + k:>16}{'D(G(z)) ' + k:>20}"
                                          for k in kinds))
    for i in range(n):
        lines.append(f"{int(series[0][0][0][i]):>5}" + "".join(
            f"{g[1][i]:16.4g}{d[1][i]:20.4g}" for g, d in series))
    if "minimax" in kinds and len(kinds) > 1:
        lines.append("")
        lines.append("minimax minimises log(1 - D(G(z))): dL/dlogit = -D(G(z)) / N, which "
                     "vanishes when D rejects the fakes (D(G(z)) -> 0); the non-saturating "
                     "bce loss, -log D(G(z)), has dL/dlogit = -(1 - D(G(z))) / N -> -1/N "
                     "there (Goodfellow et al. 2014, section 3).")
        d0 = float(recs[0].scalar("d_fake")[1][0])
        if d0 > 0.3:
            lines.append(f"Here D does not reject the fakes yet (D(G(z)) = {d0:.2f} at step "
                         f"0), so both losses give gradients of a similar size; train D "
                         f"alone first (rawgan inspect --d-warmup 100) to see minimax "
                         f"saturate.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------


def _figure(figsize):
    from .sampling import _mpl

    Figure, FigureCanvasAgg = _mpl()
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _write_fig(fig, path) -> Path:
    from .checkpoint import atomic_write

    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def save_grad_norms(path, rec: Recorder, models: Iterable[str] | None = None,
                    title: str = "") -> Path:
    """Per model a row: the gradient norm ``|dL/dW|`` of each layer over the steps (left)
    and its update-to-weight ratio ``|dW| / |W|`` (right), log scale."""
    names = [m for m in (models or rec.layers) if rec.param_layers(m)]
    if not names:
        raise ValueError("save_grad_norms: no parameter gradients were recorded")
    fig = _figure((11, 3.6 * len(names)))
    for r, m in enumerate(names):
        ax1 = fig.add_subplot(len(names), 2, 2 * r + 1)
        ax2 = fig.add_subplot(len(names), 2, 2 * r + 2)
        for layer in rec.param_layers(m):
            step, call, g = rec.layer_norms(m, layer, "grad")
            x = step + call / (int(call.max()) + 1)
            ax1.plot(x, np.where(g > 0, g, np.nan), label=layer, linewidth=1)
            keys = rec._layer_param_keys(m, layer)
            ratios = [rec.table(m, layer, "params", k, "update") for k in keys]
            upd = np.sqrt(sum(t["l2"] ** 2 for t in ratios))
            wl2 = np.sqrt(sum(t["weight_l2"] ** 2 for t in ratios))
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(wl2 > 0, upd / wl2, np.nan)
            ax2.plot(x, np.where(ratio > 0, ratio, np.nan), label=layer, linewidth=1)
        ax1.set_yscale("log")
        ax2.set_yscale("log")
        ax1.set_title(f"{m}: gradient norm |dL/dW| per layer", fontsize="medium")
        ax2.set_title(f"{m}: update / weight norm |dW| / |W|", fontsize="medium")
        for ax in (ax1, ax2):
            ax.set_xlabel("step")
            ax.legend(fontsize="x-small", loc="best")
    if title:
        fig.suptitle(title, fontsize="medium")
    return _write_fig(fig, path)


def save_d_outputs(path, rec: Recorder, title: str = "") -> Path:
    """D(x) and D(G(z)) over the steps (top) and the two losses (bottom)."""
    if "d_real" not in rec.scalars:
        raise ValueError("save_d_outputs: no d_real / d_fake were logged")
    fig = _figure((8, 6))
    ax1, ax2 = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    for key, color, label in (("d_real", "tab:green", "D(x)"),
                              ("d_fake", "tab:red", "D(G(z))")):
        s, v = rec.scalar(key)
        ax1.plot(s, v, color=color, label=label)
    ax1.set_ylabel("mean D output")
    ax1.legend(loc="best")
    for key, color in (("d_loss", "tab:blue"), ("g_loss", "tab:orange")):
        if key in rec.scalars:
            s, v = rec.scalar(key)
            ax2.plot(s, v, color=color, label=key)
    ax2.set_xlabel("step")
    ax2.set_ylabel("loss")
    ax2.legend(loc="best")
    if title:
        ax1.set_title(title, fontsize="medium")
    return _write_fig(fig, path)


_NO_HIST = ("Reshape", "Flatten")  # their output is the previous layer's, reshaped


def save_activation_histograms(path, rec: Recorder, step: int, call: int = 0,
                               bins: int = 50) -> Path:
    """Histograms of every layer's activation at ``step`` (kept in ``tensors_at``), one
    panel per layer (Reshape / Flatten left out), models one after the other."""
    panels = []
    for m, layers in rec.layers.items():
        for lname, kind in layers:
            key = (int(step), m, lname, "activation", int(call))
            if kind not in _NO_HIST and key in rec.tensors:
                panels.append((m, lname, kind, rec.tensors[key]))
    if not panels:
        raise ValueError(f"save_activation_histograms: no activations kept at step {step} "
                         f"(tensors_at = {sorted(rec.tensors_at)})")
    ncol = 4
    nrow = math.ceil(len(panels) / ncol)
    fig = _figure((3.2 * ncol, 2.4 * nrow))
    for i, (m, lname, kind, arr) in enumerate(panels):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        a = np.asarray(arr, dtype=np.float64).reshape(-1)
        ax.hist(a[np.isfinite(a)], bins=bins, color="tab:blue", log=True)
        ax.set_title(f"{m}/{lname} ({kind})", fontsize="small")
        ax.tick_params(labelsize="x-small")
    fig.suptitle(f"activations at step {step} (call {call}); log counts", fontsize="medium")
    return _write_fig(fig, path)


def save_comparison_plot(path, results: Mapping[str, Recorder], model: str = "generator"
                         ) -> Path:
    """Total gradient norm of ``model`` (top) and D(G(z)) (bottom) per step, one line per
    generator loss."""
    fig = _figure((8, 6))
    ax1, ax2 = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    for kind, rec in results.items():
        s, g = rec.total_grad_norm(model, call=0)
        ax1.plot(s, g, label=kind)
        s, d = rec.scalar("d_fake")
        ax2.plot(s, d, label=kind)
    ax1.set_yscale("log")
    ax1.set_ylabel(f"|dL/dW| of the {model}")
    ax1.legend(loc="best")
    ax2.set_xlabel("step")
    ax2.set_ylabel("D(G(z))")
    ax2.legend(loc="best")
    ax1.set_title("generator losses from the same start", fontsize="medium")
    return _write_fig(fig, path)


# --------------------------------------------------------------------------------------
# rawgan inspect: sessions from a training config (or checkpoint), files and plots
# --------------------------------------------------------------------------------------


def session_from_config(cfg, ck=None) -> Session:
    """A :class:`Session` started as ``rawgan train`` starts the run ``cfg`` (same data,
    models, optimizers and random streams, from ``cfg.seed``), or continuing the training
    checkpoint ``ck`` (:class:`rawgan.checkpoint.Checkpoint`): its weights, optimizer state
    and random streams. Minibatches are drawn epoch after epoch from the data-order stream.
    """
    from . import checkpoint, data, gan
    from .train import setup_run

    run = setup_run(cfg)
    if ck is not None:
        checkpoint.restore(ck, models={"generator": run.G, "discriminator": run.D},
                           optimizers=run.opts, rngs=run.rngs)
    ops = run.ops

    def batches():
        while True:
            for b in data.iterate_minibatches(run.x, cfg.batch_size, run.data_rng):
                yield ops.asarray(b)

    it = batches()
    return Session(run.G, run.D, run.opt_g, run.opt_d, cfg.loss,
                   lambda: [next(it) for _ in range(cfg.d_steps)],
                   gan.gaussian_noise(run.noise_rng, cfg.noise_dim, ops=ops))


def _progress(cfg, total: int, desc: str):
    if not cfg.progress:
        return None, None
    import sys

    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="step", dynamic_ncols=True, disable=None, desc=desc,
               file=sys.stderr)

    def on_step(i, st):
        bar.set_postfix(d_loss=f"{st.d_loss:.4f}", g_loss=f"{st.g_loss:.4f}", refresh=False)
        bar.update(1)

    return bar, on_step


def inspect_run(cfg, steps: int, out, *, ck=None, hist_steps: Iterable[int] = (0, -1)
                ) -> dict[str, Any]:
    """``rawgan inspect``: train ``steps`` steps of ``cfg`` (or from checkpoint ``ck``) with
    a recorder on; write ``out/inspect.h5``, ``out/grad_norms.png``, ``out/d_outputs.png``
    and ``out/activations_step_NNNN.png`` for each of ``hist_steps`` (negative: from the
    end, -1 the last step). Steps are numbered from 0. Returns a summary dict."""
    from .sampling import require_extras

    require_extras("matplotlib", *(("tqdm",) if cfg.progress else ()))
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    hist = sorted({h if h >= 0 else steps + h for h in hist_steps} & set(range(steps)))
    session = session_from_config(cfg, ck)
    bar, on_step = _progress(cfg, steps, f"inspect {cfg.model}/{cfg.data}/{cfg.loss}")
    try:
        rec = record_session(session, steps, tensors_at=hist, on_step=on_step)
    finally:
        if bar is not None:
            bar.close()
    out = Path(out)
    attrs = {"config": cfg.to_dict(), "loss": cfg.loss,
             "checkpoint": str(ck.path) if ck is not None else "",
             "checkpoint_step": int(ck.meta.get("step", 0)) if ck is not None else 0}
    files = {"hdf5": str(rec.save(out / "inspect.h5", attrs))}
    title = f"{cfg.model} / {cfg.data} / {cfg.loss}"
    files["grad_norms"] = str(save_grad_norms(out / "grad_norms.png", rec, title=title))
    files["d_outputs"] = str(save_d_outputs(out / "d_outputs.png", rec, title=title))
    files["histograms"] = [str(save_activation_histograms(
        out / f"activations_step_{s:04d}.png", rec, s)) for s in hist if s in rec.steps]
    summary = {"steps": len(rec.steps), "files": files,
               "d_real": rec.scalar("d_real")[1][-1], "d_fake": rec.scalar("d_fake")[1][-1]}
    for m in ("generator", "discriminator"):
        summary[f"{m}_grad_norms"] = {layer: float(norm[-1]) for layer, (_, norm) in
                                      rec.grad_norms(m).items()}
    return summary


def compare_run(cfg, kinds: Iterable[str], steps: int, out, *, ck=None,
                d_warmup: int = 0) -> tuple[dict[str, Recorder], dict[str, str]]:
    """``rawgan inspect --compare-losses``: :func:`compare_losses` on sessions of ``cfg``
    (each with its ``loss`` replaced by :meth:`TrainConfig.replace`), writing
    ``out/inspect_<loss>.h5`` and ``out/compare_losses.png``. Returns the recorders and the
    files written."""
    from .sampling import require_extras

    require_extras("matplotlib")
    kinds = list(kinds)
    results = compare_losses(lambda k: session_from_config(cfg.replace(loss=k), ck),
                             kinds, steps, d_warmup=d_warmup)
    out = Path(out)
    files = {}
    for k, rec in results.items():
        attrs = {"config": {**cfg.to_dict(), "loss": k}, "loss": k, "d_warmup": int(d_warmup),
                 "checkpoint": str(ck.path) if ck is not None else ""}
        files[k] = str(rec.save(out / f"inspect_{k}.h5", attrs))
    files["plot"] = str(save_comparison_plot(out / "compare_losses.png", results))
    return results, files
