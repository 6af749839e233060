"""rawgan.backends.blas_kernels: OpenBLAS's kernel set and the hint the benchmarks print."""

from __future__ import annotations

import pytest

from rawgan.backends import blas_kernels

AVX512_CPU = frozenset({"sse2", "avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl"})


@pytest.mark.parametrize("arch, flags, coretype, says", [
    ("Haswell", AVX512_CPU, None, "OpenBLAS runs its Haswell kernels on this AVX-512 CPU"),
    ("Haswell", AVX512_CPU, "Haswell",
     "OPENBLAS_CORETYPE=Haswell in the environment holds OpenBLAS to its Haswell kernels"),
    ("Zen", AVX512_CPU, None, "OpenBLAS runs its Zen kernels"),
    ("SkylakeX", AVX512_CPU, None, None),          # already the AVX-512 kernels
    ("Cooperlake", AVX512_CPU, "Cooperlake", None),
    ("Haswell", frozenset({"avx2", "avx512f"}), None, None),  # no AVX-512 BW/DQ/VL
    ("Haswell", frozenset(), None, None),          # no /proc/cpuinfo
    (None, AVX512_CPU, None, None),                # no OpenBLAS (or no threadpoolctl)
])
def test_hint_only_when_faster_kernels_would_run(monkeypatch, arch, flags, coretype, says):
    monkeypatch.setattr(blas_kernels, "architecture", lambda: arch)
    monkeypatch.setattr(blas_kernels, "cpu_flags", lambda: flags)
    if coretype is None:
        monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_CORETYPE", coretype)
    got = blas_kernels.hint()
    if says is None:
        assert got is None
    else:
        assert got.startswith(says) and "OPENBLAS_CORETYPE=SkylakeX" in got


def test_architecture_is_what_threadpoolctl_reports_and_flags_are_cpuinfos():
    """The kernel set is the BLAS architecture threadpoolctl sees in this process (None when
    it sees no OpenBLAS); the flags are /proc/cpuinfo's where there is one."""
    from pathlib import Path

    threadpoolctl = pytest.importorskip("threadpoolctl")
    seen = [i.get("architecture") for i in threadpoolctl.threadpool_info()
            if i.get("internal_api") == "openblas" and i.get("architecture")]
    assert blas_kernels.architecture() == (seen[0] if seen else None)
    flags = blas_kernels.cpu_flags()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "flags" in cpuinfo.read_text():
        assert {"fpu"} <= flags or {"sse2"} <= flags, sorted(flags)[:10]
    else:
        assert flags == frozenset()


def test_bench_compare_names_a_change_of_kernel_set_only_when_both_runs_know_it():
    from rawgan import bench

    def run(kernels):
        return {"machine": {"cpu": "x", "cores_available": 2, "blas_threads": 2,
                            "blas_kernels": kernels}, "rows": [], "args": {}}

    for old, new, noted in (("Haswell", "SkylakeX", True), (None, "Haswell", False),
                            ("Haswell", "Haswell", False)):
        said = []
        bench.compare(run(old), run(new), out=said.append)
        assert any("blas_kernels differs" in s for s in said) == noted, (old, new, said)
