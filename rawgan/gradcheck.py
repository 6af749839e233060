"""Finite-difference gradient checks for layers, losses and whole models.

With no autograd, every backward pass is a claim; this module tests the claim. For a layer
``y = f(x; params)`` it draws a fixed random ``R`` of y's shape and checks the hand-written
gradients of the scalar ``L = sum(y * R)`` (so ``dL/dy = R``) against central differences

    dL/dθ_i  ≈  (L(θ + h e_i) - L(θ - h e_i)) / (2h)        (error O(h^2), h = 1e-6)

in float64, for the input and for every trainable parameter. Random layers (dropout) have
their generator state restored before every forward so each evaluation draws the same mask.

Use it on a layer of your own::

    from rawgan.gradcheck import check_layer
    errors = check_layer(MyLayer(...), (2, 5, 5, 3))     # {"input": 3e-10, "kernel": ...}

or from the shell: ``rawgan gradcheck`` (every layer and loss over random configurations).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from . import losses
from .nn import (
    BatchNormalization,
    Conv2D,
    Conv2DTranspose,
    Dense,
    Dropout,
    Flatten,
    Layer,
    LeakyReLU,
    ReLU,
    Reshape,
    Sigmoid,
    Tanh,
)
from .nn.sequential import Sequential

TOLERANCE = 1e-6


def relative_error(a: np.ndarray, b: np.ndarray, floor: float = 0.0) -> float:
    """``max|a - b| / max(max|a|, max|b|, floor)``: scale-free, 0 for two zero arrays, inf
    when either holds a NaN or inf (a NaN would otherwise compare as "not larger" than any
    tolerance, and ``max`` over errors would pass it by). ``floor``: the scale below which
    a difference is rounding, not an error (a gradient that is exactly 0, e.g. a bias
    ahead of batch norm, against its ~1e-10 difference quotient)."""
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.inf
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)),
                float(floor))
    if scale == 0.0:
        return 0.0
    return float(np.max(np.abs(a - b))) / scale


def numerical_gradient(f: Callable[[], float], x: np.ndarray, h: float = 1e-6,
                       coords: np.ndarray | None = None, kinks: bool = False):
    """Central differences of the scalar ``f()`` w.r.t. ``x``, perturbed IN PLACE.

    ``coords``: flat indices to check (all when None); other entries of the result are NaN.
    ``kinks=True`` also evaluates with step ``2h`` and returns both estimates: where they
    disagree, a kink of a piecewise-linear function ((Leaky)ReLU at 0, hinge) lies within
    ``2h`` of the point and the difference quotient means nothing there.
    """
    grad = np.full(x.shape, np.nan)
    double = np.full(x.shape, np.nan)
    flat = x.reshape(-1)  # a view: x must be contiguous
    if not np.shares_memory(flat, x):
        raise ValueError("numerical_gradient needs a contiguous array")
    gflat, qflat = grad.reshape(-1), double.reshape(-1)

    def quotient(i: int, step: float) -> float:
        old = flat[i]
        flat[i] = old + step
        fp = f()
        flat[i] = old - step
        fm = f()
        flat[i] = old
        return (fp - fm) / (2 * step)

    for i in (range(flat.size) if coords is None else coords):
        gflat[i] = quotient(i, h)
        if kinks:
            qflat[i] = quotient(i, 2 * h)
    return (grad, double) if kinks else grad


def _rng_states(model: Layer) -> list:
    layers = model.layers if isinstance(model, Sequential) else [model]
    return [(layer, copy.deepcopy(layer.rng.bit_generator.state)) for layer in layers
            if layer.rng is not None]


def _restore(states: list) -> None:
    for layer, state in states:
        layer.rng.bit_generator.state = copy.deepcopy(state)


def _moving_stats(model: Layer) -> list:
    layers = model.layers if isinstance(model, Sequential) else [model]
    return [(layer, {k: v.copy() for k, v in layer.params.items() if k.startswith("moving_")})
            for layer in layers if isinstance(layer, BatchNormalization) and layer.built]


def _restore_stats(stats: list) -> None:
    for layer, saved in stats:
        for k, v in saved.items():
            layer.params[k][...] = v


def check_layer(layer: Layer, input_shape: tuple[int, ...], rng: np.random.Generator | None = None,
                training: bool = True, max_coords: int | None = None, h: float = 1e-6,
                kinks: bool = False) -> dict[str, float]:
    """Check ``layer``'s backward against central differences, in float64.

    Parameters
    ----------
    layer : an unbuilt or built layer (or Sequential); a float64 copy of it is checked
        (random weights, filled gradients), the caller's layer is left as it was.
    input_shape : (N, ...) shape of the random input.
    max_coords : check at most this many random entries per tensor (None: all).
    kinks : skip entries whose difference quotient crosses a kink (see
        :func:`numerical_gradient`); at most a tenth of the entries may be skipped. Needed
        for deep models with (Leaky)ReLU, where some unit lies within h of 0.

    Returns
    -------
    ``{"input": err, "<param>": err, ...}``: relative errors (see :func:`relative_error`).
    """
    rng = rng or np.random.default_rng(0)
    x = rng.standard_normal(input_shape)
    layer = copy.deepcopy(layer)
    if not layer.built:
        if layer.rng is None:
            layer.rng = np.random.default_rng(rng.integers(2**63))
        layer.build(x.shape, np.float64)
    layer.astype(np.float64)
    # parameters random too (zero biases / unit gammas would hide mistakes); a whole model
    # keeps its initialisation plus small noise, so deep tanh outputs do not saturate
    layers = layer.layers if isinstance(layer, Sequential) else [layer]
    for sub in layers:
        for k in sub.trainable:
            noise = rng.standard_normal(sub.params[k].shape)
            if isinstance(layer, Sequential):
                sub.params[k] += 0.1 * noise
            else:
                sub.params[k][...] = 0.5 * noise + (1.0 if k == "gamma" else 0.0)
    states, stats = _rng_states(layer), _moving_stats(layer)

    _restore(states)
    y = layer.forward(x, training)
    r = rng.standard_normal(y.shape)

    def loss() -> float:
        _restore(states)
        _restore_stats(stats)
        return float(np.sum(layer.forward(x, training) * r))

    layer.zero_grad()
    _restore(states)
    _restore_stats(stats)
    layer.forward(x, training)
    dx = layer.backward(r)
    analytic = {"input": (x, dx)}
    for sub in layers:
        for k in sub.trainable:
            name = k if not isinstance(layer, Sequential) else f"{sub.name}/{k}"
            analytic[name] = (sub.params[k], sub.grads[k].copy())

    # every tensor's error is scaled by at least 1e-3 of the layer's largest gradient: a
    # tensor whose true gradient is 0 (a bias ahead of batch norm) is compared absolutely
    floor = 1e-3 * max((float(np.max(np.abs(g), initial=0.0)) for _, g in analytic.values()
                        if np.all(np.isfinite(g))), default=0.0)
    errors = {}
    for name, (arr, grad) in analytic.items():
        coords = None
        if max_coords is not None and arr.size > max_coords:
            coords = rng.choice(arr.size, size=max_coords, replace=False)
        if kinks:
            num, double = numerical_gradient(loss, arr, h, coords, kinks=True)
            mask = ~np.isnan(num)
            scale = max(np.abs(num[mask]).max(), np.abs(grad[mask]).max(), floor, 1e-300)
            smooth = np.abs(num - double) <= 0.5 * TOLERANCE * scale
            if (mask & ~smooth).sum() > 0.1 * mask.sum():
                raise ValueError(f"gradcheck: {name}: {(mask & ~smooth).sum()} of {mask.sum()} "
                                 f"entries sit on kinks (a (Leaky)ReLU input within 2h of "
                                 f"0); use another input (rawgan gradcheck: another --seed)")
            mask &= smooth
        else:
            num = numerical_gradient(loss, arr, h, coords)
            mask = ~np.isnan(num)
        errors[name] = relative_error(grad[mask], num[mask], floor)
    _restore_stats(stats)
    return errors


def check_loss(kind: str, n_real: int, n_fake: int, rng: np.random.Generator | None = None,
               h: float = 1e-6) -> dict[str, float]:
    """Check ``losses.discriminator_loss`` and ``generator_loss`` of ``kind`` in float64."""
    rng = rng or np.random.default_rng(0)
    real, fake = rng.standard_normal((n_real, 1)), rng.standard_normal((n_fake, 1))
    if kind == "hinge":  # keep away from the kinks at +-1, where the loss is not differentiable
        real[np.abs(np.abs(real) - 1) < 1e-3] += 0.01
        fake[np.abs(np.abs(fake) - 1) < 1e-3] += 0.01
    _, d_r, d_f = losses.discriminator_loss(kind, real, fake)
    _, g_f = losses.generator_loss(kind, fake)
    return {
        "d/real": relative_error(d_r, numerical_gradient(
            lambda: losses.discriminator_loss(kind, real, fake)[0], real, h)),
        "d/fake": relative_error(d_f, numerical_gradient(
            lambda: losses.discriminator_loss(kind, real, fake)[0], fake, h)),
        "g/fake": relative_error(g_f, numerical_gradient(
            lambda: losses.generator_loss(kind, fake)[0], fake, h)),
    }


# --------------------------------------------------------------------------------------
# random configurations, used by the CLI and the tests
# --------------------------------------------------------------------------------------

@dataclass
class Case:
    """One gradient-check case: a layer factory, an input shape, a description."""

    layer: str
    config: str
    make: Callable[[], Layer]
    input_shape: tuple[int, ...]
    training: bool = True
    kinks: bool = False  # skip entries next to a (Leaky)ReLU kink (deep models)


def _padding(rng: np.random.Generator, k: int):
    choice = rng.integers(3)
    return ["same", "valid", int(rng.integers(0, k))][choice]


def random_cases(rng: np.random.Generator, trials: int = 3) -> Iterator[Case]:
    """``trials`` random configurations of every layer (strides 1-3, kernels 1-5, every
    padding mode, odd and even sizes, output_padding, batch 1-3)."""
    def ri(lo, hi):
        return int(rng.integers(lo, hi + 1))

    for _ in range(trials):
        n = ri(1, 3)
        fi, fo = ri(1, 5), ri(1, 5)
        yield Case("Dense", f"{fi}->{fo}, N={n}", lambda fo=fo: Dense(fo), (n, fi))
        for cls in (Conv2D, Conv2DTranspose):
            k, s = ri(1, 5), ri(1, 3)
            pad = _padding(rng, k)
            h, w = ri(max(k, 1), 8), ri(max(k, 1), 8)
            ci, co = ri(1, 3), ri(1, 3)
            kw: dict = {}
            if cls is Conv2DTranspose and s > 1 and rng.random() < 0.5:
                kw["output_padding"] = ri(0, s - 1)
            cfg = f"k={k} s={s} pad={pad!r} in=({n},{h},{w},{ci}) out_c={co}" + (
                f" output_padding={kw['output_padding']}" if kw else "")
            yield Case(cls.__name__, cfg,
                       lambda cls=cls, co=co, k=k, s=s, pad=pad, kw=kw: cls(co, k, s, pad, **kw),
                       (n, h, w, ci))
        shape4 = (ri(1, 3), ri(1, 4), ri(1, 4), ri(1, 3))
        alpha = float(rng.choice([0.3, 0.2, 0.01]))
        yield Case("LeakyReLU", f"alpha={alpha} in={shape4}",
                   lambda a=alpha: LeakyReLU(a), shape4)
        yield Case("ReLU", f"in={shape4}", ReLU, shape4)
        yield Case("Tanh", f"in={shape4}", Tanh, shape4)
        yield Case("Sigmoid", f"in={shape4}", Sigmoid, shape4)
        bn4 = (ri(2, 4), ri(1, 3), ri(1, 3), ri(1, 3))
        bn2 = (ri(2, 6), ri(1, 4))
        for shape in (bn4, bn2):
            yield Case("BatchNormalization", f"train in={shape}", BatchNormalization, shape)
        yield Case("BatchNormalization", f"inference in={bn4}", BatchNormalization, bn4,
                   training=False)
        rate = float(rng.choice([0.3, 0.5]))
        yield Case("Dropout", f"rate={rate} in={shape4}", lambda r=rate: Dropout(r), shape4)
        yield Case("Reshape", f"in={shape4}", lambda s=shape4: Reshape((-1, s[-1])), shape4)
        yield Case("Flatten", f"in={shape4}", Flatten, shape4)


def model_cases() -> Iterator[Case]:
    """The seeds' two models (30 random entries of each tensor are checked)."""
    from . import models

    for name in models.MODELS:
        yield Case(f"{name} generator", "batch 4, training",
                   lambda name=name: models.build(name, seed=0, dtype=np.float64)[0], (4, 100),
                   kinks=True)
        yield Case(f"{name} discriminator", "batch 2, dropout on",
                   lambda name=name: models.build(name, seed=0, dtype=np.float64)[1],
                   (2, 28, 28, 1), kinks=True)


def run(cases: list[Case], rng: np.random.Generator, max_coords: int | None = None,
        print_fn=print, kinks: bool = False) -> bool:
    """Check every case, print a table; True when all pass."""
    ok = True
    print_fn(f"{'layer':<24} {'config':<58} {'max rel err':>11}  worst  result")
    for case in cases:
        try:
            errors = check_layer(case.make(), case.input_shape, rng, case.training, max_coords,
                                 kinks=kinks or case.kinks)
        except ValueError as exc:  # too many entries on kinks: not checkable at this input
            ok = False
            print_fn(f"{case.layer:<24} {case.config:<58} {'-':>11}  {'-':<6} FAIL ({exc})")
            continue
        worst = max(errors, key=errors.get)
        good = errors[worst] < TOLERANCE
        ok &= good
        print_fn(f"{case.layer:<24} {case.config:<58} {errors[worst]:11.2e}  {worst:<6} "
                 f"{'pass' if good else 'FAIL'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    """``rawgan gradcheck``: finite-difference checks of every layer, loss and seed model."""
    p = argparse.ArgumentParser(prog="rawgan gradcheck", description=main.__doc__)
    p.add_argument("--layer", action="append", help="only this layer type (repeatable), "
                   "e.g. Conv2DTranspose; 'losses' or 'models' for those")
    p.add_argument("--trials", type=int, default=3, help="random configurations per layer "
                   "(default: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the configurations (default: 0)")
    p.add_argument("--models", action="store_true", help="also check the full seed models "
                   "(sampled entries; slower)")
    args = p.parse_args(argv)
    if args.trials < 1:
        p.error("--trials must be >= 1")
    rng = np.random.default_rng(args.seed)
    wanted = {w.lower() for w in args.layer} if args.layer else None
    all_cases = list(random_cases(rng, args.trials))
    if wanted is not None:
        known = sorted({c.layer for c in all_cases}) + ["losses", "models"]
        unknown = sorted(wanted - {k.lower() for k in known})
        if unknown:
            p.error(f"--layer {', '.join(unknown)}: no such layer; choose from "
                    f"{', '.join(known)}")
    cases = [c for c in all_cases if wanted is None or c.layer.lower() in wanted]
    if args.models or (wanted and "models" in wanted):
        cases += list(model_cases())
    ok = run(cases, rng, max_coords=30) if cases else True
    if wanted is None or "losses" in wanted:
        print(f"\n{'loss':<10} {'gradient':<8} {'rel err':>9}  result")
        for kind in losses.KINDS:
            for name, err in check_loss(kind, int(rng.integers(1, 9)), int(rng.integers(1, 9)),
                                        rng).items():
                good = err < TOLERANCE
                ok &= good
                print(f"{kind:<10} {name:<8} {err:9.2e}  {'pass' if good else 'FAIL'}")
    if wanted is None or "losses" in wanted:
        from .classifier import softmax_cross_entropy

        logits = rng.standard_normal((int(rng.integers(1, 9)), 10))
        labels = rng.integers(0, 10, size=logits.shape[0])
        _, grad = softmax_cross_entropy(logits, labels)
        err = relative_error(grad, numerical_gradient(
            lambda: softmax_cross_entropy(logits, labels)[0], logits))
        good = err < TOLERANCE
        ok &= good
        print(f"{'softmax_ce':<10} {'logits':<8} {err:9.2e}  {'pass' if good else 'FAIL'}")
    print("\nall gradients agree" if ok else "\nSOME GRADIENTS DISAGREE", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
