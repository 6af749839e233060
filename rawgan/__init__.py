"""rawgan: GANs with no autograd; every forward and backward pass written by hand."""

from . import backends, nn
from .checkpoint import load_generator

__version__ = "0.1.0"
__all__ = ["backends", "load_generator", "nn", "__version__"]
