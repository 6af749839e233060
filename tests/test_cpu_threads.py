"""The CPU backend's threads and chunks (rawgan.backends.cpu_threads, numpy_ops' chunked
convolutions): the parallel paths give the serial results, pass the float64
finite-difference checks, and behave (errors, nesting, thread counts).

The test shapes are small, so by default every op would run serially in one chunk. The
``forced`` fixture makes every op take its parallel path (MIN_PARALLEL = 1), with three
workers on uneven row ranges, and cuts every convolution group into spans of one image.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from rawgan import optim
from rawgan.backends import cpu_threads, streams
from rawgan.backends import numpy_ops as ops
from rawgan.gradcheck import TOLERANCE, check_layer, random_cases
from rawgan.nn import Dense, Sequential


@pytest.fixture
def forced(monkeypatch):
    """Every op parallel (3 workers), every conv group in spans of one image; restored
    afterwards."""
    before = cpu_threads.num_threads()
    monkeypatch.setattr(cpu_threads, "MIN_PARALLEL", 1)
    monkeypatch.setattr(ops, "CHUNK_BYTES", 1)  # one image per span
    monkeypatch.setattr(ops, "MIN_ROWS", 1)
    cpu_threads.set_num_threads(3)
    yield
    cpu_threads.set_num_threads(before)


def serial(fn, *args, **kw):
    """``fn`` run with one thread and whole-batch chunks (the plain NumPy path)."""
    before, chunk = cpu_threads.num_threads(), ops.CHUNK_BYTES
    cpu_threads.set_num_threads(1)
    ops.CHUNK_BYTES = 1 << 40
    try:
        return fn(*args, **kw)
    finally:
        cpu_threads.set_num_threads(before)
        ops.CHUNK_BYTES = chunk


def naive_conv(x, w, stride, pads):
    """Direct definition: y[n,i,j,o] = sum_{a,b,c} xpad[n, i*sh+a, j*sw+b, c] w[a,b,c,o]."""
    (pt, pb), (pl, pr) = pads
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw = w.shape[:2]
    sh, sw = stride
    ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    y = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for a in range(kh):
        for b in range(kw):
            win = xp[:, a:a + sh * (ho - 1) + 1:sh, b:b + sw * (wo - 1) + 1:sw, :]
            y += np.einsum("nijc,co->nijo", win, w[a, b])
    return y


CONV_CASES = [  # (N, H, W, C, O, k, s, padding)
    (5, 7, 7, 3, 4, 5, 1, "same"),   # several tap groups (border runs)
    (4, 14, 14, 2, 3, 5, 2, "same"),  # thin K: padded first, one group
    (3, 9, 8, 4, 2, 3, 3, "valid"),
    (6, 6, 5, 16, 3, 4, 2, 1),        # K = 256: groups
    (2, 5, 5, 1, 2, 1, 1, "same"),
]


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_chunked_parallel_conv_equals_serial_and_definition(forced, case):
    n, h, w_, c, o, k, s, padding = case
    rng = np.random.default_rng(sum(case[:7]))
    x = rng.standard_normal((n, h, w_, c))
    w = rng.standard_normal((k, k, c, o))
    b = rng.standard_normal(o)
    y = ops.conv2d_forward(x, w, b, s, padding)
    ho, wo, pads = ops.conv_geometry(h, w_, k, k, (s, s), padding)
    close(y, naive_conv(x, w, (s, s), pads) + b)
    close(y, serial(ops.conv2d_forward, x, w, b, s, padding))
    dy = rng.standard_normal(y.shape)
    for got, want in zip(ops.conv2d_backward(dy, x, w, s, padding),
                         serial(ops.conv2d_backward, dy, x, w, s, padding), strict=True):
        close(got, want)
    # the transposed conv with the same kernel (HWIO read as (kh, kw, c_out, c_in)) is the
    # adjoint: <conv(x), dy> = <x, conv_transpose(dy)> where the sizes agree
    xt = ops.conv2d_transpose_forward(dy, w, b[:c] if c <= o else None, s, padding)
    close(xt, serial(ops.conv2d_transpose_forward, dy, w, b[:c] if c <= o else None, s,
                     padding))
    xt0 = ops.conv2d_transpose_forward(dy, w, None, s, padding)
    if xt0.shape == x.shape:
        assert np.isclose(np.vdot(y - b, dy), np.vdot(x, xt0))
    dxt = rng.standard_normal(xt.shape)
    for got, want in zip(ops.conv2d_transpose_backward(dxt, dy, w, s, padding),
                         serial(ops.conv2d_transpose_backward, dxt, dy, w, s, padding),
                         strict=True):
        close(got, want)


def test_parallel_elementwise_and_batchnorm_equal_serial(forced):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 3, 2, 5))
    dy = rng.standard_normal(x.shape)
    gamma, beta = rng.standard_normal(5), rng.standard_normal(5)
    for fn, args in [(ops.leaky_relu_forward, (x, 0.2)), (ops.leaky_relu_backward, (dy, x, 0.2)),
                     (ops.leaky_relu_forward, (x, 1.5)), (ops.tanh_forward, (x,)),
                     (ops.tanh_backward, (dy, np.tanh(x))), (ops.bias_add_forward, (x, beta)),
                     (ops.bias_add_backward, (dy,)), (ops.dropout_backward, (dy, x)),
                     (ops.dense_forward, (x[:, 0, 0], dy[:, 0, 0].T, x[:, 0, 1, 0]))]:
        close(fn(*args), serial(fn, *args))
    for training in (True, False):
        mm, mv = rng.standard_normal(5), rng.uniform(0.5, 2, 5)
        got = ops.batchnorm_forward(x, gamma, beta, mm.copy(), mv.copy(), training=training)
        want = serial(ops.batchnorm_forward, x, gamma, beta, mm.copy(), mv.copy(),
                      training=training)
        for g, w in zip(got, want, strict=True):
            close(g, w)
        for g, w in zip(ops.batchnorm_backward(dy, x, gamma, got[1], got[2], training),
                        serial(ops.batchnorm_backward, dy, x, gamma, got[1], got[2], training),
                        strict=True):
            close(g, w)
    y, mask = ops.dropout_forward(x, 0.3, np.random.default_rng(5))
    y_ref, mask_ref = serial(ops.dropout_forward, x, 0.3, np.random.default_rng(5))
    close(y, y_ref)
    close(mask, mask_ref)


def test_parallel_elementwise_ops_take_one_dimensional_inputs(forced):
    """A 1-D x is one row whose only axis is the channel axis: the parallel path must not
    split it as rows (bias_add_forward did, against a whole-length b: a broadcast error)."""
    rng = np.random.default_rng(4)
    x, dy, b = (rng.standard_normal(11) for _ in range(3))
    for fn, args in [(ops.leaky_relu_forward, (x, 0.2)), (ops.leaky_relu_backward, (dy, x, 0.2)),
                     (ops.tanh_forward, (x,)), (ops.tanh_backward, (dy, np.tanh(x))),
                     (ops.bias_add_forward, (x, b)), (ops.bias_add_backward, (dy,)),
                     (ops.dropout_backward, (dy, x)), (ops.relu_forward, (x,)),
                     (ops.sigmoid_forward, (x,))]:
        close(fn(*args), serial(fn, *args))
    close(ops.bias_add_forward(x, b), x + b)
    close(ops.bias_add_backward(dy), dy)
    y, mask = ops.dropout_forward(x, 0.3, np.random.default_rng(5))
    close(y, serial(ops.dropout_forward, x, 0.3, np.random.default_rng(5))[0])


def test_edge_shapes_on_the_parallel_path_equal_the_serial_path(forced):
    """Empty batches, 1-D inputs, zero-width layers (tests/edge_cases.py) through the parallel
    path give what one thread gives (or the same error)."""
    from edge_cases import cases

    for name, op, args, kw in cases(np.random.default_rng(1)):
        fn = getattr(ops, op)
        outs = []
        for run in (fn, lambda *a, fn=fn, **k: serial(fn, *a, **k)):
            try:
                outs.append(run(*[a.copy() if isinstance(a, np.ndarray) else a for a in args],
                                **kw))
            except ValueError as exc:
                outs.append(type(exc))
        if outs[0] is ValueError or outs[1] is ValueError:
            assert outs[0] is outs[1], name
            continue
        got, want = (o if isinstance(o, tuple) else (o,) for o in outs)
        for g, w in zip(got, want, strict=True):
            if w is not None:
                close(g, w)


def test_reference_refuses_every_bad_edge_case():
    """The reference raises a ValueError for each "bad: " case of tests/edge_cases.py (so
    check_backend's "same exception on every backend" means a refusal everywhere)."""
    from edge_cases import cases

    bad = [c for c in cases(np.random.default_rng(2)) if c[0].startswith("bad: ")]
    assert len(bad) >= 15
    for name, op, args, kw in bad:
        with pytest.raises(ValueError):
            getattr(ops, op)(*args, **kw)
            pytest.fail(f"{name}: accepted")


def test_reference_rules_for_empty_inputs():
    """A sum over no rows is 0; batch norm refuses an empty training batch (its statistics
    and the moving ones it updates would be NaN) and a missing channel axis."""
    np.testing.assert_array_equal(ops.bias_add_backward(np.ones((0, 3))), np.zeros(3))
    _, dw, db = ops.dense_backward(np.ones((0, 4)), np.ones((0, 3)), np.ones((3, 4)))
    np.testing.assert_array_equal(dw, np.zeros((3, 4)))
    np.testing.assert_array_equal(db, np.zeros(4))
    mm, mv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="empty batch"):
        ops.batchnorm_forward(np.ones((0, 3)), np.ones(3), np.zeros(3), mm, mv)
    np.testing.assert_array_equal(mm, np.zeros(3))  # nothing was updated
    y, _, _ = ops.batchnorm_forward(np.ones((0, 3)), np.ones(3), np.zeros(3), mm, mv,
                                    training=False)
    assert y.shape == (0, 3)
    with pytest.raises(ValueError, match="channel"):
        ops.batchnorm_forward(np.ones((4, 0)), np.ones(0), np.zeros(0), np.zeros(0), np.ones(0))
    x = np.ones((1, 5, 5, 3))
    with pytest.raises(ValueError, match=r"input has 3 channels, kernel \(3, 3, 4, 2\)"):
        ops.conv2d_forward(x, np.ones((3, 3, 4, 2)), None)
    with pytest.raises(ValueError, match="conv2d_transpose_backward: input has 3 channels"):
        ops.conv2d_transpose_backward(np.ones((1, 9, 9, 2)), x, np.ones((3, 3, 2, 4)), 2)


CASES = [c for c in random_cases(np.random.default_rng(99), trials=6)
         if c.layer in ("Dense", "Conv2D", "Conv2DTranspose", "BatchNormalization", "Dropout",
                        "LeakyReLU", "Tanh")]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.layer}-{c.config}" for c in CASES])
def test_finite_differences_on_the_parallel_path(forced, case):
    errors = check_layer(case.make(), case.input_shape, np.random.default_rng(8), case.training)
    assert max(errors.values()) < TOLERANCE, errors


def test_same_thread_count_gives_bitwise_identical_results(forced):
    """Three threads each time (the fixture), so the chunked reductions are exercised."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 14, 14, 8)).astype(np.float32)
    w = rng.standard_normal((5, 5, 8, 16)).astype(np.float32)
    dy = rng.standard_normal((64, 7, 7, 16)).astype(np.float32)
    first = ops.conv2d_backward(dy, x, w, 2, "same")
    again = ops.conv2d_backward(dy, x, w, 2, "same")
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_parallel_rows_covers_every_row_once_in_order(monkeypatch):
    monkeypatch.setattr(cpu_threads, "MIN_PARALLEL", 1)
    before = cpu_threads.num_threads()
    cpu_threads.set_num_threads(3)
    try:
        ranges = cpu_threads.parallel_rows(lambda k, lo, hi: (k, lo, hi), 10)
        assert [r[0] for r in ranges] == [0, 1, 2]
        assert ranges[0][1] == 0 and ranges[-1][2] == 10
        assert all(a[2] == b[1] for a, b in zip(ranges, ranges[1:], strict=False))
        assert cpu_threads.parallel_rows(lambda k, lo, hi: (lo, hi), 1) == [(0, 1)]
        # a body that calls parallel_rows again runs that inner call on its own thread
        inner = cpu_threads.parallel_rows(
            lambda k, lo, hi: cpu_threads.parallel_rows(lambda k2, a, b: threading.get_ident(),
                                                        8), 6)
        assert all(len(r) == 1 for r in inner)
    finally:
        cpu_threads.set_num_threads(before)


def test_parallel_rows_reraises_after_every_body_finished(monkeypatch):
    monkeypatch.setattr(cpu_threads, "MIN_PARALLEL", 1)
    before = cpu_threads.num_threads()
    cpu_threads.set_num_threads(2)
    done = []

    def body(k, lo, hi):
        if k == 0:
            raise RuntimeError("worker 0 failed")
        done.append(k)

    try:
        with pytest.raises(RuntimeError, match="worker 0 failed"):
            cpu_threads.parallel_rows(body, 4)
        assert done == [1]
    finally:
        cpu_threads.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_num_threads_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="positive int"):
        cpu_threads.set_num_threads(bad)


def test_thread_count_follows_the_environment(monkeypatch):
    monkeypatch.setenv("RAWGAN_NUM_THREADS", "1")
    assert cpu_threads._default_threads() == 1
    monkeypatch.delenv("RAWGAN_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads._default_threads() == 3


@pytest.mark.parametrize("make", [
    lambda m: optim.Adam(m, lr=1e-2),
    lambda m: optim.Adam(m, lr=1e-2, clip_value=0.05),
    lambda m: optim.SGD(m, lr=1e-2),
    lambda m: optim.SGD(m, lr=1e-2, momentum=0.9, nesterov=True),
    lambda m: optim.RMSprop(m, lr=1e-2, clip_value=0.1),
], ids=["adam", "adam-clip", "sgd", "sgd-nesterov", "rmsprop-clip"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_optimizer_updates_equal_the_per_tensor_rule(forced, make, dtype):
    """numpy_ops' multi-tensor updates (ranges crossing tensor ends, 3 workers) give
    bit for bit what rawgan.optim's per-tensor rule gives."""
    def model():
        m = Sequential([Dense(7), Dense(3)], seed=4)
        m.build((5, 4), dtype=dtype)
        return m

    a, b = model(), model()
    opt_a, opt_b = make(a), make(b)
    opt_b.FUSED = ""  # the per-tensor path
    rng = np.random.default_rng(1)
    for _ in range(3):
        for m in (a, b):
            m.zero_grad()
        for (_, _, ga), (_, _, gb) in zip(a.parameters(), b.parameters(), strict=True):
            g = rng.standard_normal(ga.shape).astype(dtype)
            ga += g
            gb += g
        opt_a.step()
        opt_b.step()
    for (_, pa, _), (_, pb, _) in zip(a.parameters(), b.parameters(), strict=True):
        np.testing.assert_array_equal(pa, pb)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("flags", [(True, False), (False, True)], ids=["dx-only", "dw-only"])
def test_conv_backward_flags_give_the_same_gradients(forced, case, flags):
    """need_dx / need_dw False skip work, never change what is returned otherwise."""
    n, h, w_, c, o, k, s, padding = case
    rng = np.random.default_rng(sum(case[:7]) + 1)
    x, w = rng.standard_normal((n, h, w_, c)), rng.standard_normal((k, k, c, o))
    need_dx, need_dw = flags
    xt = rng.standard_normal((n, h, w_, o))  # the transposed conv reads w as (k, k, c, o)
    for fwd, bwd, inp in ((ops.conv2d_forward, ops.conv2d_backward, x),
                          (ops.conv2d_transpose_forward, ops.conv2d_transpose_backward, xt)):
        dy = rng.standard_normal(fwd(inp, w, None, s, padding).shape)
        full = bwd(dy, inp, w, s, padding)
        part = bwd(dy, inp, w, s, padding, need_dx=need_dx, need_dw=need_dw)
        for got, want, wanted in zip(part, full, (need_dx, need_dw, need_dw), strict=True):
            if wanted:
                close(got, want)
            else:
                assert got is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7, 3), (6, 5, 1), (2, 1), (9,)], ids=str)
@pytest.mark.parametrize("buffered", [False, True], ids=["fresh", "half-buffered"])
def test_parallel_uniforms_are_the_one_call_draw(forced, dtype, shape, buffered):
    """Worker k skips to its rows with PCG64.advance: same numbers, same final state, also
    when the generator holds a buffered 32-bit half (an odd number of float32s drawn)."""
    a, b = np.random.default_rng(21), np.random.default_rng(21)
    if buffered:
        a.random(3, dtype=np.float32)
        b.random(3, dtype=np.float32)
    np.testing.assert_array_equal(ops._uniforms(a, shape, dtype), b.random(shape, dtype=dtype))
    assert a.bit_generator.state == b.bit_generator.state
    np.testing.assert_array_equal(a.random(5, dtype=np.float32), b.random(5, dtype=np.float32))


def test_uniforms_with_another_bit_generator_draw_in_one_call(forced):
    a, b = (np.random.Generator(np.random.MT19937(3)) for _ in range(2))
    np.testing.assert_array_equal(ops._uniforms(a, (8, 4), np.float32),
                                  b.random((8, 4), dtype=np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_claim_raced_by_another_draw_takes_the_numbers_after_it(monkeypatch, dtype):
    """claim_uniforms computes the end state on a copy, outside the generator's lock: a draw
    by another thread in that window (simulated: made from inside the copy's skip) moves the
    generator, the claim sees it and starts again from there."""
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    real, raced = streams.skip_uniforms, []

    def racing(bg, m, dt):
        if not raced:
            raced.append(True)
            rng.random(3, dtype=np.float32)  # "another thread" (leaves a buffered half)
        real(bg, m, dt)

    monkeypatch.setattr(streams, "skip_uniforms", racing)
    start = streams.claim_uniforms(rng.bit_generator, 10, dtype)
    ref.random(3, dtype=np.float32)
    assert raced and start == ref.bit_generator.state
    ref.random(10, dtype=dtype)
    assert rng.bit_generator.state == ref.bit_generator.state


def test_threads_sharing_a_generator_get_different_masks(forced):
    """Four threads drawing dropout uniforms from ONE generator (each draw split over the
    workers) get between them exactly the numbers of 4 x 30 one-call draws, none twice, and
    the generator ends where those draws leave it: each draw claims its numbers atomically."""
    shared, ref = np.random.default_rng(8), np.random.default_rng(8)
    got: list[np.ndarray] = []
    start = threading.Barrier(4)

    def user() -> None:
        start.wait()
        for _ in range(30):
            u = ops._uniforms(shared, (16, 257), np.float32)
            got.append(u)  # (list.append is atomic)

    threads = [threading.Thread(target=user) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = [ref.random((16, 257), dtype=np.float32) for _ in range(120)]
    key = lambda a: a.tobytes()  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, want))
    assert shared.bit_generator.state == ref.bit_generator.state


def test_blas_threads_are_restored_after_concurrent_callers(monkeypatch):
    """Two user threads running GEMM ops at once: BLAS is held at one thread while any of
    them runs and is back at its own count when both are done."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
    if not blas.lib_controllers:
        pytest.skip("no BLAS that threadpoolctl can control")
    before = [lib.get_num_threads() for lib in blas.lib_controllers]
    monkeypatch.setattr(cpu_threads, "MIN_PARALLEL", 1)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((8, 9, 9, 3)), rng.standard_normal((3, 3, 3, 4))
    want = serial(ops.conv2d_forward, x, w, None, 1, "same")
    errors = []

    def caller():
        try:
            for _ in range(20):
                close(ops.conv2d_forward(x, w, None, 1, "same"), want)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [lib.get_num_threads() for lib in blas.lib_controllers] == before


def _child_conv(queue):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 9, 9, 3))
    queue.put(float(ops.leaky_relu_forward(x, 0.2).sum()))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_gets_fresh_workers(monkeypatch):
    """After the parent used the pool, a fork()ed child (multiprocessing's default on Linux)
    still runs parallel ops instead of waiting forever on threads it does not have."""
    import multiprocessing

    monkeypatch.setattr(cpu_threads, "MIN_PARALLEL", 1)
    before = cpu_threads.num_threads()
    cpu_threads.set_num_threads(2)
    try:
        ops.leaky_relu_forward(np.ones((8, 3)), 0.2)  # the parent's pool now has its thread
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_child_conv, args=(queue,))
        child.start()
        child.join(60)
        alive = child.is_alive()
        if alive:
            child.kill()
        assert not alive, "the forked child hung in a parallel op"
        assert child.exitcode == 0 and np.isfinite(queue.get(timeout=5))
    finally:
        cpu_threads.set_num_threads(before)


def test_concurrent_calls_from_two_threads_equal_the_serial_results(forced, monkeypatch):
    """Two user threads training at once (the pool is shared): every result is the one a
    lone call from such a thread gives (GEMM work off the main thread runs as one range:
    see test_calls_from_other_threads_leave_the_blas_thread_count_alone). Winograd's
    weight-gradient partials once lived in the POOL thread's workspace, where the other
    thread's call overwrote them before they were summed."""
    import threading

    from rawgan.backends import winograd

    monkeypatch.setattr(winograd, "ENABLED", True)
    monkeypatch.setattr(winograd, "MARGIN", 0.0)  # Winograd for every stride-1 conv here
    rng = np.random.default_rng(21)
    cases = []
    for _ in range(2):
        x = rng.standard_normal((6, 7, 7, 8))
        w = rng.standard_normal((5, 5, 8, 4))
        dy = rng.standard_normal((6, 7, 7, 4))
        lone: list = []
        t = threading.Thread(target=lambda a=(dy, x, w), out=lone: out.append(
            ops.conv2d_backward(*a, 1, "same")))
        t.start()
        t.join()
        cases.append((x, w, dy, lone[0]))
    wrong = [0, 0]

    def run(i: int) -> None:
        x, w, dy, want = cases[i]
        for _ in range(40):
            got = ops.conv2d_backward(dy, x, w, 1, "same")
            wrong[i] += not all(np.array_equal(g, e) for g, e in zip(got, want, strict=True))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [0, 0]


def _naive_conv(x, w, stride, pads):
    """y = sum over taps of xpad[:, a + s*i, b + s*j, :] @ w[a, b]: the definition, written
    with an explicitly padded input and one GEMM per tap (no grouping, no skipped zeros)."""
    (pt, pb), (pl, pr) = pads
    kh, kw, _, co = w.shape
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    y = np.zeros((x.shape[0], ho, wo, co))
    for a in range(kh):
        for b in range(kw):
            y += xp[:, a:a + stride * ho:stride, b:b + stride * wo:stride, :] @ w[a, b]
    return y, xp


@pytest.mark.parametrize("winograd_on", [False, True])
@pytest.mark.parametrize("stride,padding", [(1, "same"), (2, "same"), (2, "valid"), (3, 2)])
def test_grouped_im2col_path_is_the_definition(monkeypatch, winograd_on, stride, padding):
    """K = kh*kw*c_in >= SMALL_K: the conv runs as groups of output pixels by the kernel taps
    they reach (the padding never multiplied). Forward, dx and dw in float64 against the
    definition (the gradient check's shapes are all below SMALL_K)."""
    from rawgan.backends import winograd

    monkeypatch.setattr(winograd, "ENABLED", winograd_on)
    rng = np.random.default_rng(stride)
    x, w = rng.standard_normal((3, 9, 8, 16)), rng.standard_normal((5, 5, 16, 6))
    assert 5 * 5 * 16 >= ops.SMALL_K
    ho, wo, pads = ops.conv_geometry(9, 8, 5, 5, (stride, stride), padding)
    want, xp = _naive_conv(x, w, stride, pads)
    np.testing.assert_allclose(ops.conv2d_forward(x, w, None, stride, padding), want,
                               rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(want.shape)
    dx, dw, _ = ops.conv2d_backward(dy, x, w, stride, padding)
    dxp, dw_want = np.zeros_like(xp), np.zeros_like(w)
    for a in range(5):  # the adjoint of each tap's GEMM
        for b in range(5):
            win = (slice(None), slice(a, a + stride * ho, stride),
                   slice(b, b + stride * wo, stride))
            dxp[win] += dy @ w[a, b].T
            dw_want[a, b] = np.einsum("nijc,nijo->co", xp[win], dy)
    (pt, _), (pl, _) = pads
    np.testing.assert_allclose(dx, dxp[:, pt:pt + 9, pl:pl + 8], rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(dw, dw_want, rtol=1e-11, atol=1e-11)


def test_calls_from_other_threads_leave_the_blas_thread_count_alone():
    """An app calling rawgan from its own threads (sample() in a web server, say): OpenBLAS
    ignores a raise of its thread count from such a thread once it ran at one thread, so
    rawgan never lowers it there; the count the process had is the count it keeps."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not cpu_threads._blas_controller():
        pytest.skip("no BLAS that threadpoolctl controls")

    def blas():
        return [i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"]

    before = blas()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 14, 14, 8)).astype(np.float32)
    w = rng.standard_normal((5, 5, 8, 16)).astype(np.float32)
    want = ops.conv2d_forward(x, w, None, 2, "same")
    got = []

    def work():
        for _ in range(3):
            got.append(ops.conv2d_forward(x, w, None, 2, "same"))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert blas() == before
    # Off the main thread the GEMM runs as one range with BLAS's own threads, on the main
    # thread as rawgan's row ranges: OpenBLAS may block (and round) them differently (on an
    # AMD EPYC, 29% of the outputs differ, by at most 6e-7 of the largest).
    assert len(got) == 12
    for g in got:
        np.testing.assert_allclose(g, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
