"""A pytest plugin: ``cupy`` is the CPU emulator's fake module (tests/test_kernels_compile.py).

``python -m pytest -p emulated_cupy tests/test_cupy_ops.py`` (with tests/ on PYTHONPATH and
RAWGAN_EMU_CACHE naming the emulator's build folder) runs the GPU tests' own code on a
machine without a GPU: the kernels run in the emulator, so a slip in a GPU test (or in the
NumPy reference it calls) shows before a GPU session is spent on it. tests/
test_gpu_tests_on_emulator.py drives it; on a GPU machine, never load this plugin.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def pytest_configure(config) -> None:
    import test_kernels_compile as emu

    from rawgan.backends import cupy_ops

    cache = Path(os.environ["RAWGAN_EMU_CACHE"])
    cache.mkdir(parents=True, exist_ok=True)
    fake = emu.FakeCupy(cache)
    sys.modules["cupy"] = fake
    cupy_ops._cp = fake
    cupy_ops._reset_caches()
