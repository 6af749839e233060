"""Layers with hand-written forward and backward passes, and the Sequential container."""

from .activations import LeakyReLU, ReLU, Sigmoid, Tanh
from .conv import Conv2D, Conv2DTranspose
from .dense import Dense
from .dropout import Dropout
from .layer import Layer, glorot_uniform
from .normalization import BatchNormalization
from .reshape import Flatten, Reshape
from .sequential import Sequential

__all__ = [
    "BatchNormalization", "Conv2D", "Conv2DTranspose", "Dense", "Dropout", "Flatten", "Layer",
    "LeakyReLU", "ReLU", "Reshape", "Sequential", "Sigmoid", "Tanh", "glorot_uniform",
]
