"""benchmarks/bench_gpu.py end to end on the CPU emulator of tests/test_kernels_compile.py.

bench_gpu.py runs only on a GPU, and GPU time is scarce: a Python slip in one of its sections
(a wrong key, a changed signature) would cost a device session. Here every section runs at
batch 2 with one repeat on the emulated kernels (cuBLAS rows: NumPy through the fake cupy;
the PyTorch rows need CUDA and are left out), and every row must hold a measurement, none an
error. The numbers are emulator times and mean nothing as performance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_kernels_compile import emu, emu_cache, needs_gxx  # noqa: F401 (fixtures)

from rawgan.backends import cupy_ops

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = needs_gxx


def _walk(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}/{k}")
            yield f"{path}/{k}", v
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")


@pytest.fixture
def bench(emu, monkeypatch):  # noqa: F811
    """benchmarks/ importable, with the emulator's fake module as ``cupy``."""
    monkeypatch.setitem(sys.modules, "cupy", emu)
    monkeypatch.syspath_prepend(str(BENCH))
    for mod in ("bench_gpu", "profile_step"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    return emu


def test_bench_gpu_runs_every_section_on_the_emulator(bench, tmp_path):
    import bench_gpu

    out = tmp_path / "bench.json"
    assert bench_gpu.main(["--batches", "2", "--repeats", "1", "--step-repeats", "1",
                           "--warmup", "0", "--sgemm-sizes", "40", "--no-numba",
                           "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    # the headline figures (SGEMM, the step and its profile) first: a cut run keeps them
    assert [k for k in res if k in ("sgemm", "layers", "elementwise", "step", "profile")] == [
        "sgemm", "step", "profile", "layers", "elementwise"]
    assert res["machine"]["device"] == "rawgan CPU emulator"
    errors = [p for p, v in _walk(res) if p.endswith("/error")]
    assert not errors, [(p, v) for p, v in _walk(res) if p.endswith("/error")]
    assert len(res["layers"]) == 7 * 3 and len(res["elementwise"]) == 12
    step = res["step"][0]
    for key in ("rawgan_library", "rawgan_fused", "rawgan_graphed", "rawgan_graphed_unfused",
                "rawgan_graphed_tf32"):
        assert step[key]["images_per_s"] > 0, key
    assert step["rawgan_graphed"]["replays"] >= 1
    prof = [r["rawgan"] for r in res["profile"]]
    assert [p["tf32"] for p in prof] == [False, True]
    assert all(p["launches"] > 50 and p["graph_replay_ms"] > 0 for p in prof)
    assert any(f["family"] == "conv_wgrad" for f in prof[0]["families"])
    assert cupy_ops.LAUNCH_HOOK is None and cupy_ops.TF32 is False


def test_profile_step_cli_writes_its_json_with_the_machine(bench, tmp_path):
    import profile_step

    out = tmp_path / "profile.json"
    assert profile_step.main(["--batches", "2", "--model", "mlp", "--tf32", "--json",
                              str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["machine"]["device"] == "rawgan CPU emulator" and doc["machine"]["commit"]
    assert [(p["batch"], p["tf32"]) for p in doc["profiles"]] == [(2, False), (2, True)]
    assert all(p["families"] and p["graph_replay_ms"] > 0 for p in doc["profiles"])
