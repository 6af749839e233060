"""pytest-benchmark plumbing shared by the suites in benchmarks/ (not part of CI: pytest's
testpaths is tests/).

    pytest benchmarks/ --benchmark-only                       # batch 64 and 256, a few minutes
    RAWGAN_BENCH_BATCHES=64,256,1024 pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only --benchmark-json benchmarks/results/pytest-cpu-DATE.json

Environment:

* ``RAWGAN_BENCH_BATCHES``: comma-separated batch sizes (default ``64,256``; 1024 is opt-in).
* ``RAWGAN_BENCH_TORCH``: PyTorch reference layouts, comma-separated from ``channels_last``
  and ``nchw`` (default ``channels_last``), or ``none`` to skip PyTorch.

Arguments ``backend`` (every loadable backend), ``batch`` (the batches above) and
``step_impl`` (the backends, then PyTorch) are parametrized by name. A test function marked
``@pytest.mark.bench_ops("dense", ...)`` with arguments ``case`` and ``impl`` is parametrized
over every case of those ops (``rawgan.bench.dcgan_cases``: the seed DCGAN's layer shapes and
passes) and every implementation: each backend that ``rawgan.backends.get`` loads here (numba
only on a real GPU, not in the simulator), then PyTorch on the same device. Rows of one case
share a benchmark group, so pytest-benchmark prints rawgan and PyTorch side by side.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from rawgan import backends, bench


def bench_batches() -> list[int]:
    raw = os.environ.get("RAWGAN_BENCH_BATCHES", "64,256")
    try:
        return [int(v) for v in raw.split(",") if v.strip()]
    except ValueError:
        raise pytest.UsageError(
            f"RAWGAN_BENCH_BATCHES={raw!r}: expected e.g. 64,256,1024") from None


def torch_layouts() -> list[str]:
    raw = os.environ.get("RAWGAN_BENCH_TORCH", "channels_last").strip().lower()
    if raw in ("", "none", "0", "off") or bench._torch() is None:
        return []
    layouts = [v.strip() for v in raw.split(",") if v.strip()]
    bad = set(layouts) - {"channels_last", "nchw"}
    if bad:
        raise pytest.UsageError(f"RAWGAN_BENCH_TORCH: unknown layout(s) {sorted(bad)}")
    return layouts


BACKENDS, SKIPPED = bench.available_backends()


def implementations() -> list[str]:
    """``numpy``, ``cupy``, ... then ``torch-<device>-<layout>`` per backend's device."""
    impls = list(BACKENDS)
    devices = dict.fromkeys(bench.device_name(backends.get(b)) for b in BACKENDS)
    for dev in devices:
        tdev = torch_device(dev)
        if tdev is not None:
            impls += [f"torch-{tdev}-{lay}" for lay in torch_layouts()]
    return impls


def torch_device(dev: str) -> str | None:
    torch = bench._torch()
    if torch is None:
        return None
    if dev == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "bench_ops(*ops): parametrize case/impl over the "
                                       "DCGAN cases of these rawgan.bench ops")


def pytest_report_header(config) -> list[str]:
    return [f"rawgan bench: backends {BACKENDS}, batches {bench_batches()}, PyTorch layouts "
            f"{torch_layouts() or 'none'}", *(f"rawgan bench: {s}" for s in SKIPPED)]


def pytest_generate_tests(metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS)
    if "step_impl" in metafunc.fixturenames:
        metafunc.parametrize("step_impl", implementations())
    if "batch" in metafunc.fixturenames:
        metafunc.parametrize("batch", bench_batches(), ids=lambda n: f"b{n}")
    marker = metafunc.definition.get_closest_marker("bench_ops")
    if marker is None:
        return
    params = []
    for case in bench.dcgan_cases(marker.args, bench_batches()):
        for impl in implementations():
            params.append(pytest.param(case, impl, id=f"{case.layer}-{case.pass_}-"
                                                      f"b{case.batch}-{impl}"))
    metafunc.parametrize(("case", "impl"), params)


def _callable(case: bench.Case, impl: str):
    """``(fn, sync, rotation sets)`` running ``case`` on ``impl``."""
    if impl.startswith("torch-"):
        _, dev, layout = impl.split("-", 2)
        torch = bench._torch()
        gpu = [b for b in BACKENDS if b != "numpy"]
        ops = backends.get("numpy" if dev == "cpu" or not gpu else gpu[0])
        sets = bench.rotation_sets(case, bench.cache_bytes(ops), 32)
        fn = bench.torch_fn(case, dev, layout == "channels_last", sets)
        if fn is None:
            pytest.skip("PyTorch has no symmetric padding giving this output size")
        # before timing it: the twin computes what rawgan computes (same inputs, same shapes)
        twin = bench.twin_agreement(case, ops, dev, layout == "channels_last")
        if twin is not None and not twin["ok"]:
            pytest.fail(f"the PyTorch twin of {case.key} disagrees with rawgan: {twin}")
        if dev != "cpu":
            bench._tf32(torch, dev, False)  # the float32 reference
        return fn, (torch.cuda.synchronize if dev != "cpu" else None), sets
    ops = backends.get(impl)
    sets = bench.rotation_sets(case, bench.cache_bytes(ops), 32)
    return bench.rawgan_fn(case, ops, sets), (None if ops.xp is np else ops.synchronize), sets


@pytest.fixture
def run_case(benchmark):
    """``run_case(case, impl)``: benchmark one case, recording its FLOP and byte counts and,
    afterwards, the achieved GFLOP/s or GB/s (from the median) in ``extra_info``."""

    def run(case: bench.Case, impl: str) -> None:
        fn, sync, sets = _callable(case, impl)
        if sync is not None:
            inner = fn

            def fn():
                inner()
                sync()

        for _ in range(2):  # warm-up: workspaces, BLAS/oneDNN kernel selection, allocator
            fn()
        benchmark.group = f"{case.op} {case.pass_} {case.layer} b{case.batch}"
        benchmark.extra_info.update({
            "op": case.op, "pass": case.pass_, "layer": case.layer, "batch": case.batch,
            "shape": case.shape, "impl": impl, "metric": case.metric, "flop": case.flop,
            "flop_useful": case.flop_useful, "bytes": case.nbytes, "formula": case.formula,
            "rotation_sets": sets,
            "rate_from": "nominal FLOP (im2col, padding taps included) / median"
                         if case.metric == "GFLOP/s" else "minimum bytes / median"})
        benchmark(fn)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and getattr(stats, "stats", None) is not None:
            med = stats.stats.median
            benchmark.extra_info["rate"] = (case.flop if case.metric == "GFLOP/s"
                                            else case.nbytes) / med / 1e9
            if case.metric == "GFLOP/s":
                benchmark.extra_info["rate_useful"] = case.flop_useful / med / 1e9

    return run
