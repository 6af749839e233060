"""The graph-captured training step (rawgan/graphed.py) and the kernels it needs, in the CPU
emulator of tests/test_kernels_compile.py.

The emulator's stream capture behaves as CUDA's: launches during a capture are RECORDED,
not run, and a replay runs the recorded launches with the same pointers and the same scalar
arguments; a host upload or read during the capture raises. So "replayed steps equal eager
steps bit for bit" proves the step is capture-safe: every value that changes per step comes
from device memory, and nothing in the step is done by the host or by a non-rawgan kernel
(which the emulator would run at capture time and never again). On a GPU the same class is
checked by tests/test_cupy_ops.py::test_graphed_step_replays_match_eager_steps.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_kernels_compile import (  # noqa: F401 (emu, emu_cache: fixtures)
    DTYPES,
    MASK32,
    close,
    emu,
    emu_cache,
    needs_gxx,
    philox4x32_10,
    rand,
)

from rawgan import gan, models, optim
from rawgan.backends import cupy_ops, numpy_ops, winograd
from rawgan.graphed import GraphedStep

pytestmark = needs_gxx


@pytest.fixture
def fake(emu):  # noqa: F811 (the emulator fixture of test_kernels_compile)
    """cupy_ops on the CPU emulator; the fake cupy module."""
    return emu


def _u24(v: int) -> float:
    return (v >> 8) * 2.0**-24


def _u53(a: int, b: int) -> float:
    return ((a >> 5) * 67108864.0 + (b >> 6)) * 2.0**-53


def normal_reference(n: int, seed: int, offset: int, dtype) -> np.ndarray:
    """Box-Muller on Philox as kernels/elementwise.cu normal_philox: the same uniforms and the
    same angle rounded to ``dtype``, the rest in float64 (so only libm's ulps differ)."""
    key = [seed & MASK32, seed >> 32]
    e = 4 if dtype == np.float32 else 2
    out = []
    for g in range(-(-n // e)):
        c = philox4x32_10([g & MASK32, g >> 32, offset & MASK32, offset >> 32], key)
        if dtype == np.float32:
            pairs = [(_u24(c[0]) + 2.0**-24, _u24(c[1])), (_u24(c[2]) + 2.0**-24, _u24(c[3]))]
        else:
            pairs = [(_u53(c[0], c[1]) + 2.0**-53, _u53(c[2], c[3]))]
        for u1, u2 in pairs:
            r = np.sqrt(-2.0 * np.log(u1))
            t = dtype(6.283185307179586) * dtype(u2)  # the kernel's angle, rounded to dtype
            out += [r * np.cos(np.float64(t)), r * np.sin(np.float64(t))]
    return np.array(out[:n])


@pytest.mark.parametrize("dtype", DTYPES)
def test_standard_normal_is_box_muller_on_philox_with_a_device_base(fake, dtype):
    base = fake.asarray(np.array([5 << 16], dtype=np.uint64))
    rng = cupy_ops.StepRng(0x1234_5678_9ABC, base)
    rng.offset = 3
    z = fake.empty((7, 9), dtype)   # 63: not a multiple of 4
    cupy_ops.standard_normal(z, rng)
    want = normal_reference(z.size, 0x1234_5678_9ABC, (5 << 16) + 3, dtype).reshape(z.shape)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(np.asarray(z, dtype=np.float64), want, rtol=tol, atol=tol)
    assert rng.offset == 4
    big = fake.empty((20000,), dtype)
    cupy_ops.standard_normal(big, rng)
    assert abs(float(big.mean())) < 0.03 and abs(float(big.std()) - 1) < 0.03


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_in_a_step_rng_draws_from_its_counters(fake, dtype):
    """Under step_rng, dropout ignores the layer's Generator; offset = draw + *base."""
    x = rand(np.random.default_rng(1), (3, 37), dtype)
    base = fake.asarray(np.array([7 << 16], dtype=np.uint64))
    rng = cupy_ops.StepRng(99, base)
    with cupy_ops.step_rng(rng):
        cupy_ops.dropout_forward(fake.asarray(x), 0.3, None)    # draw 0
        _, mask = cupy_ops.dropout_forward(fake.asarray(x), 0.3, None)  # draw 1
    assert cupy_ops._STEP_RNG is None
    e = 4 if dtype == np.float32 else 2
    u = []
    for g in range(-(-x.size // e)):
        c = philox4x32_10([g, 0, (7 << 16) + 1, 0], [99, 0])
        u += ([np.float32(v >> 8) * np.float32(2.0**-24) for v in c] if dtype == np.float32
              else [_u53(c[0], c[1]), _u53(c[2], c[3])])
    u = np.array(u[:x.size], dtype=dtype).reshape(x.shape)
    want = np.where(u >= dtype(0.3), dtype(1 / 0.7), dtype(0))
    np.testing.assert_array_equal(np.asarray(mask), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_accumulate_zero_and_device_alpha(fake, dtype):
    rng = np.random.default_rng(2)
    a, b = rand(rng, (5, 13), dtype), rand(rng, (5, 13), dtype)
    dst = fake.empty(a.shape, dtype)
    cupy_ops.copy_into(dst, fake.asarray(a))
    np.testing.assert_array_equal(dst, a)
    cupy_ops.accumulate(dst, fake.asarray(b))
    np.testing.assert_array_equal(dst, a + b)
    arrays = [fake.asarray(rand(rng, s, dtype)) for s in ((3, 5), (7000,), (1,))]
    cupy_ops.zero_grads(arrays)
    assert all(not np.any(x) for x in arrays)
    with pytest.raises(ValueError, match="shapes"):
        cupy_ops.copy_into(dst, fake.asarray(a[:2]))
    # Adam: alpha read from device memory == alpha passed by value
    ps = [rand(rng, (4, 6), dtype), rand(rng, (9,), dtype)]
    gs = [rand(rng, p.shape, dtype) for p in ps]
    runs = []
    for alpha in (1e-3, fake.asarray(np.array([1e-3], dtype=dtype))):
        p, m, v = ([fake.asarray(x) for x in ps], [fake.zeros(x.shape, dtype) for x in ps],
                   [fake.zeros(x.shape, dtype) for x in ps])
        cupy_ops.adam_update(p, [fake.asarray(g) for g in gs], m, v, alpha, 0.9, 0.999, 1e-7)
        runs.append([np.array(x) for x in p])
    for x, y in zip(*runs, strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="device alpha"):
        cupy_ops.adam_update(p, p, m, v, fake.asarray(np.zeros(2, dtype)), 0.9, 0.999, 1e-7)


# -- the whole step ---------------------------------------------------------------------

def _models(ops, dtype, name="dcgan", lr=1e-3):
    G, D = models.build(name, seed=3, backend=ops, dtype=dtype)
    return G, D, optim.Adam(G, lr=lr), optim.Adam(D, lr=lr)


def _reals(steps: int, k: int, shape, dtype):
    data = np.random.default_rng(4)
    return [[data.uniform(-1, 1, (2, *shape)).astype(dtype) for _ in range(k)]
            for _ in range(steps)]


def _state(G, D, opt_g, opt_d) -> dict:
    out = {f"G/{k}": np.array(v) for k, v in G.get_weights().items()}
    out.update({f"D/{k}": np.array(v) for k, v in D.get_weights().items()})
    for tag, opt in (("optG", opt_g), ("optD", opt_d)):
        for k, v in opt.state_dict()["slots"].items():
            out[f"{tag}/{k}"] = v
        out[f"{tag}/iterations"] = np.array(opt.iterations)
    return out


@pytest.mark.parametrize("name,k,loss", [("dcgan", 1, "bce"), ("mlp", 2, "bce"),
                                         ("mlp", 5, "wgan")])
def test_replayed_graph_steps_equal_eager_steps_bit_for_bit(fake, name, k, loss):
    """Step 1 eager (warm-up), step 2 captured then launched, steps 3-4 replays: every
    weight, optimizer slot, BN moving statistic and reported number equals the all-eager
    run's. (WGAN: the original's RMSprop with weight clipping and 5 critic steps.)"""
    dtype = np.float32
    results = []
    for capture in (False, True):
        G, D, opt_g, opt_d = _models(cupy_ops, dtype, name)
        if loss == "wgan":
            opt_g = optim.RMSprop(G, lr=5e-5, clip_value=None)
            opt_d = optim.RMSprop(D, lr=5e-5, clip_value=0.01)
        step = GraphedStep(G, D, opt_g, opt_d, loss, batch_size=2, d_steps=k,
                           noise_dim=G.input_shape[0], seed=7, capture=capture, warmup=1)
        stats = [step(reals) for reals in _reals(4, k, D.input_shape, dtype)]
        results.append((stats, _state(G, D, opt_g, opt_d), step))
    (eager, w_eager, s_eager), (graph, w_graph, s_graph) = results
    assert s_graph.launches == 3 and s_graph.graph is not None and s_eager.graph is None
    assert len(fake.graphs) == 1 and len(fake.graphs[0].nodes) > 20
    assert eager == graph
    assert w_eager.keys() == w_graph.keys()
    for key in w_eager:
        np.testing.assert_array_equal(w_graph[key], w_eager[key], err_msg=key)
    # the steps differ from each other (new noise, masks and alphas every replay)
    assert len({s.d_loss for s in graph}) == 4


def test_what_outlives_the_step_is_not_in_its_private_pool(fake):
    """CuPy frees a memory pool's blocks when the pool dies, arrays still using them or not.
    So what outlives a GraphedStep (the optimizers' slots, cupy_ops' cached multi-tensor
    pointer tables) must come from the default pool: the first eager step allocates them
    there; the later steps' buffers (the graph's) come from the step's private pool."""
    G, D, opt_g, opt_d = _models(cupy_ops, np.float32, "mlp")
    step = GraphedStep(G, D, opt_g, opt_d, "bce", batch_size=2, d_steps=1,
                       noise_dim=G.input_shape[0], seed=7, warmup=2)
    for reals in _reals(4, 1, D.input_shape, np.float32):
        step(reals)
    assert step.graph is not None
    slots = [a for opt in (opt_g, opt_d) for per in opt.state.values() for a in per.values()]
    tables = [a for t in cupy_ops._mt_tables.values() for a in t if hasattr(a, "shape")]
    assert slots and tables
    for a in slots + tables:
        assert fake.pool_of(a) is None
    assert all(fake.pool_of(a) is None for t in step._tables for a in t if hasattr(a, "shape"))
    cached = [a for layer in G.layers[1:] for a in (layer._cache or {}).values()
              if isinstance(a, np.ndarray)]  # the captured step's: the private pool's
    assert cached and all(fake.pool_of(a) is step._pool for a in cached)


@pytest.mark.parametrize("dtype", DTYPES)
def test_graphed_body_is_gan_train_step(fake, dtype, monkeypatch):
    """One GraphedStep (eager) vs gan.train_step on the NumPy backend, fed the same noise and
    the same dropout masks: the same losses and the same updated weights."""
    monkeypatch.setattr(winograd, "ENABLED", False)
    # lr 1e-4 (the tutorial's): Adam's first update is ~ alpha * sign(g), so float32's
    # rounding differences in tiny gradients move a weight by up to alpha
    G, D, opt_g, opt_d = _models(cupy_ops, dtype, lr=1e-4)
    step = GraphedStep(G, D, opt_g, opt_d, "bce", batch_size=2, d_steps=1, noise_dim=100,
                       seed=11, capture=False)
    reals = _reals(1, 1, D.input_shape, dtype)[0]
    masks = []
    real_dropout = cupy_ops.dropout_forward

    def keep(x, rate, rng, training=True):
        y, mask = real_dropout(x, rate, rng, training)
        masks.append(np.array(mask))
        return y, mask

    monkeypatch.setattr(cupy_ops, "dropout_forward", keep)
    got = step(reals)
    z = np.array(step.z[0])
    # D's two dropout layers, in the critic pass on [real; fake] and the generator pass
    assert len(masks) == 4

    Gn, Dn, opt_gn, opt_dn = _models(numpy_ops, dtype, lr=1e-4)
    feed = iter(masks)

    def replay(x, rate, rng, training=True):
        mask = next(feed)
        return x * mask, mask

    monkeypatch.setattr(numpy_ops, "dropout_forward", replay)
    want = gan.train_step(Gn, Dn, opt_gn, opt_dn, "bce", reals, lambda n: z)
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose([got.d_loss, got.g_loss, got.d_real, got.d_fake],
                               [want.d_loss, want.g_loss, want.d_real, want.d_fake], rtol=rtol)
    for key, w in Gn.get_weights().items():
        close(G.get_weights()[key], w, dtype, key)
    for key, w in Dn.get_weights().items():
        close(D.get_weights()[key], w, dtype, key)


def test_graphed_step_rejects_what_it_cannot_capture(fake):
    G, D, opt_g, opt_d = _models(numpy_ops, np.float32)
    with pytest.raises(ValueError, match="'cupy' backend"):
        GraphedStep(G, D, opt_g, opt_d, "bce", 2, 1, 100, seed=0)
    G, D, opt_g, opt_d = _models(cupy_ops, np.float32)
    with pytest.raises(ValueError, match="unknown loss kind"):
        GraphedStep(G, D, opt_g, opt_d, "nope", 2, 1, 100, seed=0)
    # warmup=0: the kernels would compile and the optimizers' pointer tables upload inside
    # the capture
    with pytest.raises(ValueError, match="capture needs warmup >= 1"):
        GraphedStep(G, D, opt_g, opt_d, "bce", 2, 1, 100, seed=0, warmup=0)
    step = GraphedStep(G, D, opt_g, opt_d, "bce", 2, 1, 100, seed=0, warmup=0, capture=False)
    with pytest.raises(ValueError, match="fixed shapes"):
        step([np.zeros((3, 28, 28, 1), np.float32)])
    with pytest.raises(ValueError, match="expected 1 real batches"):
        step([])
    # the guard behind it: a pointer table uploaded while capturing is refused
    step = GraphedStep(G, D, opt_g, opt_d, "bce", 2, 1, 100, seed=0)
    step._eager_left = 0
    with pytest.raises(RuntimeError, match="while a CUDA graph is captured"):
        step(_reals(1, 1, D.input_shape, np.float32)[0])
    assert cupy_ops._CAPTURING is False and fake.recording is None


def test_a_failed_capture_leaves_nothing_behind(fake, monkeypatch):
    """The body raises while it is being recorded and the invalidated capture's end_capture
    raises too: the body's error is the one seen, the upload guard is off, garbage collection
    is back on, the optimizers' step counts are put back (nothing recorded ran), and the next
    call captures and replays the step from that state."""
    import gc

    G, D, opt_g, opt_d = _models(cupy_ops, np.float32, name="mlp")
    reals = _reals(3, 1, D.input_shape, np.float32)
    step = GraphedStep(G, D, opt_g, opt_d, "bce", 2, 1, G.input_shape[0], seed=0, warmup=1)
    step(reals[0])                                   # eager warm-up
    real_loss, real_end = cupy_ops.gan_generator_loss, type(fake.cuda.Stream()).end_capture

    def boom(*args):
        raise ArithmeticError("the body failed")

    def invalidated(self):
        real_end(self)
        raise RuntimeError("cudaErrorStreamCaptureInvalidated")

    monkeypatch.setattr(cupy_ops, "gan_generator_loss", boom)
    monkeypatch.setattr(type(fake.cuda.Stream()), "end_capture", invalidated)
    with pytest.raises(ArithmeticError, match="the body failed"):
        step(reals[1])
    assert cupy_ops._CAPTURING is False and fake.recording is None and gc.isenabled()
    assert (opt_d.iterations, opt_g.iterations) == (1, 1) and step.graph is None
    monkeypatch.setattr(cupy_ops, "gan_generator_loss", real_loss)
    monkeypatch.setattr(type(fake.cuda.Stream()), "end_capture", real_end)
    step(reals[1])                                   # captured now, and replayed
    step(reals[2])
    assert step.launches == 2 and (opt_d.iterations, opt_g.iterations) == (3, 3)


def test_rawgan_train_with_cuda_graph_runs_and_resumes(fake, monkeypatch, tmp_path):
    """`rawgan train --backend cupy --cuda-graph` (toy data, MLP) end to end in the emulator:
    the step is captured once and replayed; a run stopped at step 3 and resumed to step 6
    ends with the same weights as one run of 6 steps (the Philox counters follow the step)."""
    import json

    from rawgan.checkpoint import load_checkpoint
    from rawgan.train import TrainConfig, train

    monkeypatch.setattr(cupy_ops, "check_available", lambda: None)
    common = dict(model="mlp", data="ring", noise_dim=2, lr_g=1e-3, lr_d=1e-3, batch_size=16,
                  num_examples=160, epochs=1, seed=5, progress=False, backend="cupy",
                  cuda_graph=True, sample_every=100, save_every=100)
    whole = tmp_path / "whole"
    s = train(TrainConfig(**common, max_steps=6, out=str(whole)))
    assert s["steps"] == 6 and len(fake.graphs) == 1
    log = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    losses = [r["d_loss"] for r in log if "d_loss" in r]
    assert len(losses) == 6 and len(set(losses)) == 6 and np.isfinite(losses).all()

    part = tmp_path / "part"
    train(TrainConfig(**common, max_steps=3, out=str(part)))
    train(TrainConfig(**common, max_steps=6, out=str(part)), resume=True)
    a, b = load_checkpoint(whole / "checkpoint.h5"), load_checkpoint(part / "checkpoint.h5")
    assert a.weights.keys() == b.weights.keys()
    for model, ws in a.weights.items():
        for key, w in ws.items():
            np.testing.assert_array_equal(b.weights[model][key], w, err_msg=f"{model} {key}")
    with pytest.raises(ValueError, match="cuda_graph"):
        TrainConfig(**{**common, "backend": "numpy"})


# -- the step profiler (benchmarks/profile_step.py) ----------------------------------------

def _profiler(fake, monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    sys.modules.pop("profile_step", None)
    import profile_step

    return profile_step


def test_step_profiler_times_every_launch_of_the_step(fake, monkeypatch):
    """Every rawgan launch of one eager step is recorded once, queued behind ONE spin kernel
    (compiled and run by the emulator), and grouped by family; the shares add up; the graph
    of the same step replays. (The times are the emulator's, so only the bookkeeping is
    checked here, not the numbers.)"""
    prof = _profiler(fake, monkeypatch)
    fake.launches.clear()
    seen = []
    real_hook = prof.LaunchTimer._hook

    def spy(self, kernel, grid, launch):
        seen.append(kernel)
        real_hook(self, kernel, grid, launch)

    monkeypatch.setattr(prof.LaunchTimer, "_hook", spy)
    p = prof.profile_step(cupy_ops, 2, model="mlp", replays=2)
    assert cupy_ops.LAUNCH_HOOK is None
    assert p["launches"] == len(seen) > 20
    # the spin, then exactly the launches of the third eager step (as the first two)
    assert fake.launches.count("spin") == 1
    at = fake.launches.index("spin")
    assert fake.launches[at + 1:at + 1 + len(seen)] == seen == fake.launches[:len(seen)]
    fams = {r["family"]: r for r in p["families"]}
    assert {"gemm_nn", "gemm_tn", "adam_mt", "zero_mt", "normal_philox", "gan_loss"} <= set(fams)
    assert sum(r["launches"] for r in fams.values()) == p["launches"]
    assert abs(sum(r["share"] for r in fams.values()) - 1.0) < 1e-9
    assert p["sum_ms"] > 0 and p["graph_replay_ms"] > 0 and len(p["slowest"]) == 15
    assert prof.family("gemm_nn_tf32_M") == "gemm_nn"
    assert prof.family("conv_wgrad_f64_S") == "conv_wgrad"
    assert prof.family("splitk_reduce_f32") == "splitk_reduce"
    assert "launches" in prof.report(p)


def test_step_profiler_refuses_a_drained_queue_and_a_second_hook(fake, monkeypatch):
    from test_kernels_compile import _FakeEvent

    prof = _profiler(fake, monkeypatch)
    monkeypatch.setattr(_FakeEvent, "done", True)   # as if the spin ended too early
    with pytest.raises(RuntimeError, match="larger hold_ms"):
        prof.profile_step(cupy_ops, 2, model="mlp", replays=1, spin=lambda: None)
    assert cupy_ops.LAUNCH_HOOK is None
    with prof.LaunchTimer(fake, lambda: None), pytest.raises(RuntimeError, match="hook"):
        with prof.LaunchTimer(fake, lambda: None):
            pass
