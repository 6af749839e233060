"""Argument checks shared by the layers and the optimizers: every bad hyper-parameter is a
ValueError that names the class, the argument and the value (never a bare ``float()``
error), and NumPy integers count as integers."""

from __future__ import annotations

import math
import numbers

import numpy as np


def is_int(value) -> bool:
    """A Python or NumPy integer (``3``, ``np.int64(3)``), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def number(value, what: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """``float(value)`` for a finite real number within the bounds given, else a ValueError
    ``"<what> must be ..., got <value>"``. ``low_open`` / ``high_open``: the bound itself is
    excluded."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    v = float(value) if ok else math.nan
    if ok and math.isfinite(v):
        ok = ((low is None or (v > low if low_open else v >= low))
              and (high is None or (v < high if high_open else v <= high)))
    else:
        ok = False
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
        if low is not None and high is not None:
            rule = f"in {lo}, {hi}"
        elif low is not None:
            rule = f"{'>' if low_open else '>='} {low:g}"
        elif high is not None:
            rule = f"{'<' if high_open else '<='} {high:g}"
        else:
            rule = "a finite number"
        raise ValueError(f"{what} must be {rule}, got {value!r}")
    return v


def integer(value, what: str, low: int, high: int | None = None) -> int:
    """``int(value)`` for a Python or NumPy integer (not a bool, not 2.0) in ``[low,
    high]``, else a ValueError ``"<what> must be an integer >= low (or in [low, high]),
    got <value>"``."""
    if not is_int(value) or value < low or (high is not None and value > high):
        rule = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{what} must be an integer {rule}, got {value!r}")
    return int(value)
