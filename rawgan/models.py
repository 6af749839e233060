"""The seeds' architectures: the Keras-tutorial DCGAN for 28x28x1 and the MLP GAN.

``G, D = rawgan.models.build("dcgan" | "mlp", seed=0)`` returns built ``Sequential`` models.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from .nn import (
    BatchNormalization,
    Conv2D,
    Conv2DTranspose,
    Dense,
    Dropout,
    Flatten,
    LeakyReLU,
    Reshape,
    Sequential,
    Tanh,
)

NOISE_DIM = 100
IMAGE_SHAPE = (28, 28, 1)
MODELS = ("dcgan", "mlp")


def dcgan_generator(noise_dim: int = NOISE_DIM, seed: int | None = None,
                    backend: str | ModuleType = "numpy", dtype=np.float32) -> Sequential:
    """TF DCGAN tutorial generator: z (N, 100) -> image (N, 28, 28, 1) in [-1, 1].

    Dense(7*7*256, no bias) -> BN -> LeakyReLU -> Reshape(7, 7, 256)
    -> Conv2DTranspose(128, 5, s1, same) -> BN -> LeakyReLU       (7, 7, 128)
    -> Conv2DTranspose(64, 5, s2, same) -> BN -> LeakyReLU        (14, 14, 64)
    -> Conv2DTranspose(1, 5, s2, same) -> tanh                    (28, 28, 1)
    """
    return Sequential([
        Dense(7 * 7 * 256, use_bias=False), BatchNormalization(), LeakyReLU(),
        Reshape((7, 7, 256)),
        Conv2DTranspose(128, 5, strides=1, padding="same", use_bias=False),
        BatchNormalization(), LeakyReLU(),
        Conv2DTranspose(64, 5, strides=2, padding="same", use_bias=False),
        BatchNormalization(), LeakyReLU(),
        Conv2DTranspose(1, 5, strides=2, padding="same", use_bias=False), Tanh(),
    ], name="generator", seed=seed, backend=backend)._built(
        (None, noise_dim), dtype)


def dcgan_discriminator(seed: int | None = None, backend: str | ModuleType = "numpy",
                        dtype=np.float32, image_shape=IMAGE_SHAPE) -> Sequential:
    """TF DCGAN tutorial discriminator: image (N, 28, 28, 1) -> logit (N, 1).

    Conv2D(64, 5, s2, same) -> LeakyReLU -> Dropout(0.3)        (14, 14, 64)
    -> Conv2D(128, 5, s2, same) -> LeakyReLU -> Dropout(0.3)    (7, 7, 128)
    -> Flatten -> Dense(1)                                      logit, no sigmoid
    """
    return Sequential([
        Conv2D(64, 5, strides=2, padding="same"), LeakyReLU(), Dropout(0.3),
        Conv2D(128, 5, strides=2, padding="same"), LeakyReLU(), Dropout(0.3),
        Flatten(), Dense(1),
    ], name="discriminator", seed=seed, backend=backend)._built((None, *image_shape), dtype)


def mlp_generator(noise_dim: int = NOISE_DIM, hidden: int = 128, seed: int | None = None,
                  backend: str | ModuleType = "numpy", dtype=np.float32,
                  image_shape=IMAGE_SHAPE) -> Sequential:
    """MLP GAN generator: z (N, 100) -> Dense(128) -> LeakyReLU -> Dense(784) -> tanh -> image."""
    return Sequential([
        Dense(hidden), LeakyReLU(), Dense(int(np.prod(image_shape))), Tanh(),
        Reshape(image_shape),
    ], name="generator", seed=seed, backend=backend)._built((None, noise_dim), dtype)


def mlp_discriminator(hidden: int = 128, seed: int | None = None,
                      backend: str | ModuleType = "numpy", dtype=np.float32,
                      image_shape=IMAGE_SHAPE) -> Sequential:
    """MLP GAN discriminator: image -> Flatten (784) -> Dense(128) -> LeakyReLU -> Dense(1)."""
    return Sequential([
        Flatten(), Dense(hidden), LeakyReLU(), Dense(1),
    ], name="discriminator", seed=seed, backend=backend)._built((None, *image_shape), dtype)


def build(name: str, seed: int | None = None, backend: str | ModuleType = "numpy",
          dtype=np.float32, noise_dim: int = NOISE_DIM, image_shape=IMAGE_SHAPE,
          ) -> tuple[Sequential, Sequential]:
    """``G, D = build("dcgan" | "mlp", seed=0)``: the generator and the discriminator.

    ``seed`` seeds G with ``seed`` and D with ``seed + 1`` (None: fresh entropy).
    ``image_shape`` other than 28x28x1 is available for the MLP GAN only (e.g. (2,) for toy
    2-D data).
    """
    key = name.lower() if isinstance(name, str) else name
    d_seed = None if seed is None else seed + 1
    if key == "dcgan":
        if tuple(image_shape) != IMAGE_SHAPE:
            raise ValueError(f"dcgan is built for images {IMAGE_SHAPE}, got {tuple(image_shape)}")
        return (dcgan_generator(noise_dim, seed, backend, dtype),
                dcgan_discriminator(d_seed, backend, dtype))
    if key == "mlp":
        return (mlp_generator(noise_dim, seed=seed, backend=backend, dtype=dtype,
                              image_shape=tuple(image_shape)),
                mlp_discriminator(seed=d_seed, backend=backend, dtype=dtype,
                                  image_shape=tuple(image_shape)))
    raise ValueError(f"unknown model {name!r}: expected one of {MODELS}")
