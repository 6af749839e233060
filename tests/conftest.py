"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest


# --- mnist_dir: the real MNIST test split (10,000 images) for data tests --------------
@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Folder holding the real t10k-*-ubyte.gz files, or skip.

    Found via ``$RAWGAN_TEST_DATA``, else ``<repo>/../shared/data/mnist``. Never copy
    these files into the repository; tests may copy them to ``tmp_path``.
    """
    env = os.environ.get("RAWGAN_TEST_DATA", "")
    folder = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    needed = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    if not all((folder / name).is_file() for name in needed):
        pytest.skip(f"real MNIST test files not found in {folder} (set RAWGAN_TEST_DATA)")
    return folder
