"""rawgan: GANs with no autograd; every forward and backward pass written by hand."""

import importlib

from . import backends, nn
from .checkpoint import load_generator

__version__ = "0.1.0"
__all__ = ["backends", "load_generator", "nn", "__version__"]

#: submodules loaded on first use (``rawgan.models``, ``rawgan.metrics``, ...): importing
#: rawgan stays NumPy + h5py only, and ``import rawgan; rawgan.metrics`` still works
_LAZY = frozenset({"bench", "checkpoint", "checks", "classifier", "cli", "data", "distributed",
                   "gan", "gradcheck", "graphed", "inspect", "losses", "metrics", "models",
                   "optim", "sampling", "train"})


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'rawgan' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
