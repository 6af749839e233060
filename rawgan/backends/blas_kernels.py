"""Which GEMM kernels OpenBLAS runs, and a hint when a faster set would run here.

OpenBLAS (NumPy's BLAS) picks its kernel set when it loads: from the CPU it detects, or from
``OPENBLAS_CORETYPE`` in the environment, which overrides the detection. This project's
2-core AMD EPYC machine of 2026-12-03 has AVX-512 and its environment sets
``OPENBLAS_CORETYPE=Haswell`` (AVX2 kernels); unset, OpenBLAS 0.3.31 picks ``SkylakeX``
there, and the float32 GEMMs of the step's shapes went from 173-208 to 301-331 GFLOP/s and
the DCGAN training step at batch 256 from 607 to 459 ms (benchmarks/results/
step-cpu-2026-12-03.json and ...-skylakex.json; README, Performance). PyTorch's CPU kernels
(MKL / oneDNN) do not read the variable, so a rawgan vs PyTorch ratio depends on it: the
benchmarks record the kernel set and print :func:`hint`.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import cpu_threads

#: what OpenBLAS's SkylakeX kernels use (AVX-512 foundation, byte/word, dword/qword, 128/256-bit)
AVX512 = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"})
#: OpenBLAS kernel sets that already use AVX-512
AVX512_SETS = frozenset({"skylakex", "cooperlake", "sapphirerapids"})


def architecture() -> str | None:
    """The kernel set OpenBLAS runs (threadpoolctl's ``architecture``: ``Haswell``,
    ``SkylakeX``, ``Zen``, ...), or None without OpenBLAS or threadpoolctl."""
    ctl = cpu_threads._blas_controller()
    for lib in ctl.lib_controllers if ctl else ():
        arch = getattr(lib, "architecture", None)
        if arch:
            return str(arch)
    return None


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def hint() -> str | None:
    """One line when OpenBLAS runs pre-AVX-512 kernels on a CPU that has AVX-512 (naming
    ``OPENBLAS_CORETYPE`` when the environment forces them); None otherwise."""
    arch = architecture()
    if arch is None or arch.lower() in AVX512_SETS or not AVX512 <= cpu_flags():
        return None
    forced = os.environ.get("OPENBLAS_CORETYPE")
    why = (f"OPENBLAS_CORETYPE={forced} in the environment holds OpenBLAS to its {arch} "
           "kernels" if forced else f"OpenBLAS runs its {arch} kernels")
    return (f"{why} on this AVX-512 CPU; with its AVX-512 ones (OPENBLAS_CORETYPE=SkylakeX, "
            "or the variable unset where OpenBLAS detects them) float32 GEMMs ran 1.6-1.7x and "
            "the DCGAN training step 1.3x faster on a 2-core AMD EPYC (README, Performance)")
