"""pytest-benchmark: the full DCGAN training step (rawgan vs bench_step.py's PyTorch twin) and
the ceilings every other figure is read against (float32 matmul, copy bandwidth).

    pytest benchmarks/test_step_bench.py --benchmark-only

* ``test_train_step``: one k = 1 step, ``rawgan.gan.train_step`` with the seed DCGAN, BCE,
  Adam(1e-4) (bench_step.rawgan_setup on NumPy), vs the same algorithm in PyTorch
  (bench_step.torch_setup). extra_info: flop = bench_step.step_flops (2 * MACs of every GEMM
  pass of the step, padding taps included), images/s and GFLOP/s from the median.
* ``test_matmul_ceiling``: ``xp.matmul`` of square float32 matrices, flop = 2 n^3.
* ``test_copy_bandwidth``: one ``xp.copyto`` of 128 MiB (one thread on NumPy),
  bytes = 2 x 128 MiB (read + write).
"""

from __future__ import annotations

import numpy as np
import pytest

from rawgan import backends, bench

bs = bench.load_script("bench_step")


def _rate(benchmark, amount: float, key: str) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info[key] = amount / stats.stats.median


def test_train_step(benchmark, step_impl, batch):
    if bs is None:
        pytest.skip("benchmarks/bench_step.py not found")
    if step_impl.startswith("torch-"):
        _, dev, layout = step_impl.split("-", 2)
        if dev != "cpu":
            pytest.skip("the GPU step against PyTorch is benchmarks/bench_gpu.py's job")
        fn = bs.torch_setup(batch, 0, layout == "channels_last")[0]
        G, D = bs.rawgan_setup(batch, 0)[:2]  # for the FLOP count only
    else:
        G, D, fn = bench.rawgan_step_fn(backends.get(step_impl), batch, 0, bs)
    flop = sum(bs.step_flops(G, D, batch).values())
    for _ in range(2):
        fn()
    benchmark.group = f"train step b{batch}"
    benchmark.extra_info.update({"impl": step_impl, "batch": batch, "flop": flop,
                                 "formula": "bench_step.step_flops (padding taps included)"})
    benchmark(fn)
    _rate(benchmark, batch, "images_per_s")
    _rate(benchmark, flop / 1e9, "gflops")


@pytest.mark.parametrize("size", [1024, 2048])
def test_matmul_ceiling(benchmark, backend, size):
    ops = backends.get(backend)
    rng = np.random.default_rng(0)
    a = ops.asarray(rng.standard_normal((size, size), dtype=np.float32))
    b = ops.asarray(rng.standard_normal((size, size), dtype=np.float32))

    def fn():
        ops.xp.matmul(a, b)
        ops.synchronize()

    fn()
    flop = 2 * size ** 3
    benchmark.group = "ceiling: float32 matmul"
    benchmark.extra_info.update({"backend": backend, "flop": flop, "formula": "2 n^3"})
    benchmark(fn)
    _rate(benchmark, flop / 1e9, "gflops")


def test_copy_bandwidth(benchmark, backend):
    ops = backends.get(backend)
    src = ops.asarray(np.ones((256, 1 << 17), dtype=np.float32))  # 128 MiB
    dst = ops.xp.empty_like(src)

    def fn():
        ops.xp.copyto(dst, src)
        ops.synchronize()

    fn()
    moved = 2 * src.nbytes
    benchmark.group = "ceiling: copy bandwidth"
    benchmark.extra_info.update({"backend": backend, "bytes": moved,
                                 "formula": "2 x array bytes (read + write)"})
    benchmark(fn)
    _rate(benchmark, moved / 1e9, "gbps")
