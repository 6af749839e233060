"""pytest-benchmark suites of rawgan's ops, one test function per op family, on the seed
DCGAN's layer shapes (``rawgan.bench.dcgan_cases``), against PyTorch on the same device.

    pytest benchmarks/test_ops_bench.py --benchmark-only
    pytest benchmarks/test_ops_bench.py --benchmark-only -k conv2d_transpose
    RAWGAN_BENCH_BATCHES=1024 pytest benchmarks/ --benchmark-only --benchmark-json OUT.json

Parametrized (see conftest.py) over the backends that load here x the batches in
``RAWGAN_BENCH_BATCHES`` (default 64, 256) x every DCGAN layer and pass of the family, plus
PyTorch. Each benchmark's ``extra_info`` holds the FLOP count and the bytes moved, their
formula, and the achieved rate from the median:

* dense: flop = 2 * N * in * out per pass (fwd x @ w, dgrad dy @ w^T, wgrad x^T @ dy);
* conv2d: flop = 2 * N * Ho * Wo * kh * kw * c_in * c_out (an im2col GEMM's MACs, padding
  taps included: the rate uses this count); flop_useful excludes the padding taps, which
  numpy_ops skips where kh * kw * c_in >= 256;
* conv2d_transpose: flop = 2 * N * H * W * kh * kw * c_in * c_out, (H, W) its input (the
  adjoint conv's im2col); flop_useful likewise without padding taps;
* leaky_relu, dropout, batchnorm: the rate is GB/s from the minimum bytes moved (fwd: read x,
  write y (+ the mask for dropout); bwd: read dy and x (or the mask), write dx).

Inputs rotate over several copies when one set is smaller than twice the last-level cache.
"""

from __future__ import annotations

import pytest


@pytest.mark.bench_ops("dense")
def test_dense(run_case, case, impl):
    run_case(case, impl)


@pytest.mark.bench_ops("conv2d")
def test_conv2d(run_case, case, impl):
    run_case(case, impl)


@pytest.mark.bench_ops("conv2d_transpose")
def test_conv2d_transpose(run_case, case, impl):
    run_case(case, impl)


@pytest.mark.bench_ops("leaky_relu", "dropout")
def test_elementwise(run_case, case, impl):
    run_case(case, impl)


@pytest.mark.bench_ops("batchnorm")
def test_batchnorm(run_case, case, impl):
    run_case(case, impl)
