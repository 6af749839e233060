"""The GPU tests' code (tests/test_cupy_ops.py) run on the CPU emulator, before a GPU does.

A subprocess runs test_cupy_ops.py with the ``emulated_cupy`` plugin: its ``cupy`` is the
emulator's fake module, so each GPU test function runs end to end -- the test's own code, the
NumPy reference it calls, cupy_ops and the real kernel sources in the emulator. Left out for
time (the emulator runs a DCGAN step at batch 64 in minutes): the 4096^3 SGEMM, the DCGAN
layer shapes, the TF32, graphed-step and training-run tests (their emulated twins are in
tests/test_kernels_compile.py and tests/test_graphed.py) and compute-sanitizer (its script
runs here, without the sanitizer); the tests parametrized over tiles run one tile. This is
not GPU verification: it finds slips in the GPU tests themselves (it found one in
numpy_ops.bias_add_forward's parallel path).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

from test_kernels_compile import emu, emu_cache, needs_gxx  # noqa: F401 (fixtures)

TESTS = Path(__file__).resolve().parent

DESELECT = ("4096", "dcgan_shapes", "sanitizer", "tf32_path", "graphed_step_replays",
            "dcgan_training", "dense_matches_numpy[float", "every_tile_with", "batch64")
ONE_EACH = ("dense_matches_numpy[float32-S]", "every_tile_with_and_without_split_k[1000-M]")


@needs_gxx
def test_gpu_tests_run_on_the_emulator(emu_cache):  # noqa: F811
    expr = " and ".join(f"not {d}" for d in DESELECT)
    expr = f"({expr}) or " + " or ".join(ONE_EACH)
    env = dict(os.environ, RAWGAN_EMU_CACHE=str(emu_cache),
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "emulated_cupy", "-q",
                          "-p", "no:cacheprovider", "-k", expr, str(TESTS / "test_cupy_ops.py")],
                         capture_output=True, text=True, env=env, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    passed = int(re.search(r"(\d+) passed", out).group(1))
    assert passed >= 25 and "skipped" not in out, out[-2000:]


@needs_gxx
def test_sanitizer_script_runs_on_the_emulator(emu):  # noqa: F811
    """test_cupy_ops.py's SANITIZER_SCRIPT (every kernel and tile once, run under
    compute-sanitizer on a GPU) runs to its end on the emulator."""
    src = (TESTS / "test_cupy_ops.py").read_text()
    script = re.search(r'^SANITIZER_SCRIPT = r"""(.*?)^"""', src, re.S | re.M).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(script, "SANITIZER_SCRIPT", "exec"), {})
    assert "SANITIZER SCRIPT DONE" in out.getvalue()
    assert len(emu.launches) > 100
