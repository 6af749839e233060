"""rawgan: GANs with no autograd; every forward and backward pass written by hand."""

from . import backends, nn

__version__ = "0.1.0"
__all__ = ["backends", "nn", "__version__"]
