"""Backend selection: one namespace of ops per device.

``rawgan.backends.get("numpy" | "cupy" | "numba" | "auto")`` returns a module exposing
the same op functions with the same signatures (see ``numpy_ops``, the reference).
A backend that cannot load raises one clear :class:`BackendUnavailable` naming what is
missing; ``"auto"`` tries CuPy, then falls back to NumPy and says so (a warning).
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

from . import numpy_ops

NAMES = ("numpy", "cupy", "numba")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (package or GPU missing)."""


_MODULES = {"numpy": "rawgan.backends.numpy_ops", "cupy": "rawgan.backends.cupy_ops",
            "numba": "rawgan.backends.numba_ops"}


def get(name: str | ModuleType = "numpy") -> ModuleType:
    """Return the ops namespace of backend ``name``.

    Parameters
    ----------
    name : {"numpy", "cupy", "numba", "auto"} or an already-loaded backend module.
    """
    if isinstance(name, ModuleType):
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name or a backend module, got {type(name).__name__}")
    key = name.lower()
    if key == "auto":
        for candidate in ("cupy",):
            try:
                return get(candidate)
            except BackendUnavailable as exc:
                reason = str(exc)
        warnings.warn(f"backend='auto': using NumPy on the CPU ({reason})", stacklevel=2)
        return numpy_ops
    if key == "numpy":
        return numpy_ops
    if key not in _MODULES:
        raise ValueError(f"unknown backend {name!r}: expected one of {NAMES + ('auto',)}")
    try:
        module = importlib.import_module(_MODULES[key])
    except ModuleNotFoundError as exc:
        if exc.name == _MODULES[key]:
            raise BackendUnavailable(
                f"backend {key!r} is not implemented in this version of rawgan"
            ) from None
        raise BackendUnavailable(
            f"backend {key!r} needs the package {exc.name!r}: pip install 'rawgan[cuda]' "
            "(CUDA 12) or 'rawgan[cuda13]' (CUDA 13)"
        ) from exc
    check = getattr(module, "check_available", None)
    if check is not None:
        check()  # raises BackendUnavailable with the reason (e.g. no GPU)
    return module
