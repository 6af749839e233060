"""Winograd's stride-1 convolutions (rawgan.backends.winograd) against the direct sum.

The ``forced`` fixture makes every stride-1 convolution with kernels of 2 to 5 take the
Winograd path whatever its cost (MARGIN = 0); ``direct`` turns it off. In float64 the two
paths agree to rounding (1e-12); in float32 Winograd is within its stated tolerance of the
float64 sum.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from rawgan.backends import cpu_threads, winograd
from rawgan.backends import numpy_ops as ops
from rawgan.gradcheck import TOLERANCE, check_layer
from rawgan.nn import Conv2D, Conv2DTranspose


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setattr(winograd, "ENABLED", True)
    monkeypatch.setattr(winograd, "MARGIN", 0.0)


def direct(fn, *args, **kw):
    before = winograd.ENABLED
    winograd.ENABLED = False
    try:
        return fn(*args, **kw)
    finally:
        winograd.ENABLED = before


@pytest.mark.parametrize("r", [2, 3, 4, 5])
def test_transforms_compute_the_1d_correlation(r):
    at, g, bt = winograd.transforms(winograd.M_OUT, r)
    n = winograd.M_OUT + r - 1
    assert at.shape == (winograd.M_OUT, n) and g.shape == (n, r) and bt.shape == (n, n)
    rng = np.random.default_rng(r)
    d, k = rng.standard_normal(n), rng.standard_normal(r)
    want = np.array([d[i:i + r] @ k for i in range(winograd.M_OUT)])
    np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), want, rtol=1e-13, atol=1e-13)


def test_transforms_refuse_too_many_points():
    with pytest.raises(ValueError, match="points"):
        winograd.transforms(4, 6)


CASES = [  # (N, H, W, C, O, kh, kw, padding)
    (2, 7, 7, 6, 5, 5, 5, "same"),     # the DCGAN's layer, small channels
    (3, 9, 6, 4, 7, 3, 3, "same"),     # tiles that overhang the map
    (1, 8, 8, 3, 2, 3, 3, "valid"),
    (2, 10, 7, 5, 3, 4, 4, "same"),    # even kernel: asymmetric Keras padding
    (2, 6, 11, 2, 4, 2, 5, 1),         # non-square kernel, integer padding
    (4, 5, 5, 3, 3, 5, 3, 2),          # padding = kernel - 1 on one axis: a full conv
    (1, 4, 4, 2, 2, 5, 5, "same"),     # map smaller than one tile
    (2, 5, 5, 2, 3, 3, 3, 3),          # padding > kernel - 1: its dx falls back (negative pad)
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv_ops_equal_the_direct_path_in_float64(forced, case):
    """conv2d forward/backward and the transposed conv forward/backward (stride 1) with
    Winograd equal the direct path: the forward is a correlation, the backward-data the
    correlation with the flipped kernel."""
    n, h, w_, c, o, kh, kw, padding = case
    rng = np.random.default_rng(sum(case[:7]))
    # the conv (c -> o channels) and the transposed conv with a kernel mapping o back to c
    for fwd, bwd, w_shape in ((ops.conv2d_forward, ops.conv2d_backward, (kh, kw, c, o)),
                              (ops.conv2d_transpose_forward, ops.conv2d_transpose_backward,
                               (kh, kw, o, c))):
        x = rng.standard_normal((n, h, w_, c))
        w = rng.standard_normal(w_shape)
        b = rng.standard_normal(o)
        y = fwd(x, w, b, 1, padding)
        np.testing.assert_allclose(y, direct(fwd, x, w, b, 1, padding), rtol=1e-12, atol=1e-12)
        dy = rng.standard_normal(y.shape)
        for got, want in zip(bwd(dy, x, w, 1, padding), direct(bwd, dy, x, w, 1, padding),
                             strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


STRIDED = [  # (N, H, W, C, O, k, stride, padding, output_padding) of a transposed conv
    (2, 7, 7, 5, 3, 5, 2, "same", None),  # the DCGAN's 7 -> 14 layer, small channels
    (2, 4, 5, 3, 2, 5, 2, "same", 1),
    (1, 3, 4, 2, 3, 4, 3, "valid", None),
    (2, 5, 3, 2, 2, 3, 2, 1, 0),
    (1, 4, 4, 3, 2, (2, 5), (3, 2), "same", None),
]


@pytest.mark.parametrize("case", STRIDED, ids=str)
def test_strided_backward_data_as_phases_equals_the_direct_path(forced, case):
    """conv backward-data (the transposed conv's forward) at stride s as ONE stride-1
    correlation whose outputs are the s*s phases (numpy_ops._phase_kernel), by Winograd."""
    n, h, w_, c, o, k, s, padding, op = case
    kh, kw = (k, k) if isinstance(k, int) else k
    rng = np.random.default_rng(h * w_ + c)
    x, wt, b = (rng.standard_normal((n, h, w_, c)), rng.standard_normal((kh, kw, o, c)),
                rng.standard_normal(o))
    y = ops.conv2d_transpose_forward(x, wt, b, s, padding, op)
    np.testing.assert_allclose(
        y, direct(ops.conv2d_transpose_forward, x, wt, b, s, padding, op), rtol=1e-12,
        atol=1e-12)
    # and the same scatter as a conv's input gradient
    dy = rng.standard_normal(x.shape)
    got = ops.conv2d_backward(dy, y, wt, s, padding, need_dw=False)[0]
    want = direct(ops.conv2d_backward, dy, y, wt, s, padding, need_dw=False)[0]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_correlate_is_used_where_forced(forced, monkeypatch):
    calls = []
    real = winograd.correlate
    monkeypatch.setattr(winograd, "correlate", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 7, 7, 3)), rng.standard_normal((5, 5, 3, 4))
    y = ops.conv2d_forward(x, w, None, 1, "same")
    ops.conv2d_backward(np.ones_like(y), x, w, 1, "same")          # dx: the flipped kernel
    ops.conv2d_forward(x, w, None, 2, "same")                       # stride-2 gather: no
    ops.conv2d_forward(x, rng.standard_normal((1, 1, 3, 4)), None)  # 1x1: never
    assert len(calls) == 2
    ops.conv2d_transpose_forward(x, rng.standard_normal((5, 5, 4, 3)), None, 2, "same")
    assert len(calls) == 3                                          # stride-2 scatter: phases


def test_the_dcgan_layer_takes_winograd_and_small_ones_do_not(monkeypatch):
    monkeypatch.setattr(winograd, "ENABLED", True)
    # the generator's 5x5 stride-1 layer on 7x7 maps, forward (256 -> 128) and its dx
    assert ops._winograd_ok((5, 5, 256, 128), (7, 7), (7, 7), (1, 1), ((2, 2), (2, 2)))
    assert ops._winograd_ok((5, 5, 128, 256), (7, 7), (7, 7), (1, 1), ((2, 2), (2, 2)))
    assert not ops._winograd_ok((5, 5, 3, 4), (7, 7), (7, 7), (1, 1), ((2, 2), (2, 2)))
    assert not ops._winograd_ok((5, 5, 256, 1), (7, 7), (7, 7), (1, 1), ((2, 2), (2, 2)))
    assert not ops._winograd_ok((5, 5, 256, 128), (14, 14), (7, 7), (2, 2), ((1, 2), (1, 2)))
    monkeypatch.setattr(winograd, "ENABLED", False)
    assert not ops._winograd_ok((5, 5, 256, 128), (7, 7), (7, 7), (1, 1), ((2, 2), (2, 2)))


def test_float32_is_within_the_stated_tolerance():
    """The DCGAN layer in float32 (Winograd) vs the float64 direct sum: ~1.5e-5 of the
    output's largest value (the direct float32 sum: ~5e-7). Measured here: forward 1.3e-5,
    weight gradient 7e-6, input gradient 9e-6; the bound is 2e-5."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 7, 7, 256))
    w = rng.standard_normal((5, 5, 256, 128)) * 0.02
    want = direct(ops.conv2d_forward, x, w, None, 1, "same")
    got = ops.conv2d_forward(x.astype(np.float32), w.astype(np.float32), None, 1, "same")
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < 2e-5 * np.abs(want).max()
    dy = rng.standard_normal(want.shape)
    want_dx, want_dw, _ = direct(ops.conv2d_backward, dy, x, w, 1, "same")
    got_dx, got_dw, _ = ops.conv2d_backward(*(a.astype(np.float32) for a in (dy, x, w)), 1,
                                            "same")
    assert np.abs(got_dw - want_dw).max() < 2e-5 * np.abs(want_dw).max()
    assert np.abs(got_dx - want_dx).max() < 2e-5 * np.abs(want_dx).max()


def test_weight_grad_is_the_definition():
    """dw[a,b,c,o] = sum_{n,i,j} xpad[n, i+a, j+b, c] dy[n,i,j,o], with uneven padding and a
    map that the tiles overhang."""
    rng = np.random.default_rng(4)
    x, dy = rng.standard_normal((3, 9, 6, 4)), rng.standard_normal((3, 8, 5, 2))
    pads = ((1, 2), (0, 2))
    kh, kw = 9 + 1 + 2 - 8 + 1, 6 + 0 + 2 - 5 + 1  # (5, 4): the kernel that maps 9x6 to 8x5
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    want = np.zeros((kh, kw, 4, 2))
    for a in range(kh):
        for b in range(kw):
            want[a, b] = np.einsum("nijc,nijo->co", xp[:, a:a + 8, b:b + 5], dy)
    got = winograd.weight_grad(x, dy, (kh, kw), pads)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_parallel_spans_equal_one_span(forced, monkeypatch):
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((7, 9, 9, 4)), rng.standard_normal((3, 3, 4, 5))
    b = rng.standard_normal(5)
    dy = rng.standard_normal((7, 9, 9, 5))
    pads = ((1, 1), (1, 1))
    whole = (winograd.correlate(x, w, pads, (9, 9), b), winograd.weight_grad(x, dy, (3, 3), pads))
    before = cpu_threads.num_threads()
    monkeypatch.setattr(cpu_threads, "MIN_PARALLEL", 1)
    monkeypatch.setattr(winograd, "SPAN_BYTES", 1)  # one image per span
    cpu_threads.set_num_threads(3)
    try:
        parts = (winograd.correlate(x, w, pads, (9, 9), b),
                 winograd.weight_grad(x, dy, (3, 3), pads))
    finally:
        cpu_threads.set_num_threads(before)
    for got, want in zip(parts, whole, strict=True):  # partial sums in another order
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_weight_grad_when_one_pool_thread_runs_several_workers(monkeypatch):
    """Regression: each worker's partial sum is returned to the caller, so it must not live in
    a per-THREAD buffer: a pool thread may run two workers' bodies of one call (here forced:
    3 workers, one pool thread), and the second would zero the first's partial sum."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(8)
    x, dy = rng.standard_normal((7, 9, 9, 4)), rng.standard_normal((7, 9, 9, 5))
    pads = ((1, 1), (1, 1))
    whole = winograd.weight_grad(x, dy, (3, 3), pads)
    before = cpu_threads.num_threads()
    one = ThreadPoolExecutor(max_workers=1)
    monkeypatch.setattr(cpu_threads, "MIN_PARALLEL", 1)
    monkeypatch.setattr(winograd, "SPAN_BYTES", 1)
    cpu_threads.set_num_threads(3)
    monkeypatch.setattr(cpu_threads, "_get_pool", lambda: one)
    try:
        got = winograd.weight_grad(x, dy, (3, 3), pads)
    finally:
        monkeypatch.undo()
        cpu_threads.set_num_threads(before)
        one.shutdown()
    np.testing.assert_allclose(got, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer, shape", [
    (lambda: Conv2D(3, 5, padding="same"), (2, 6, 5, 2)),
    (lambda: Conv2DTranspose(2, 3, padding="same"), (2, 5, 6, 3)),
    (lambda: Conv2D(2, (2, 4), padding="valid"), (1, 6, 7, 3)),
], ids=["conv5", "convT3", "conv2x4"])
def test_finite_differences_through_winograd(forced, layer, shape):
    errors = check_layer(layer(), shape, np.random.default_rng(3), True)
    assert max(errors.values()) < TOLERANCE, errors


def test_environment_variable_turns_it_off():
    env = dict(os.environ, RAWGAN_WINOGRAD="0")
    out = subprocess.run([sys.executable, "-c",
                          "from rawgan.backends import winograd; print(winograd.ENABLED)"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_random_transposed_geometries_equal_the_direct_path(forced):
    """Strides 1-3, kernels 1-5 (non-square), every padding mode, output_padding, odd and
    even sizes: the transposed conv forward and backward with Winograd wherever it applies
    equal the direct path."""
    rng = np.random.default_rng(11)
    checked = 0
    while checked < 80:
        s = int(rng.integers(1, 4))
        kh, kw = (int(v) for v in rng.integers(1, 6, size=2))
        h, w_ = (int(v) for v in rng.integers(1, 9, size=2))
        # integer paddings up to k + 2: past about k / 2 at stride >= 2 the phase
        # correlation would need a NEGATIVE top padding (it must fall back, not crash)
        padding = ["same", "valid", int(rng.integers(0, max(kh, kw) + 3))][
            int(rng.integers(0, 3))]
        op = int(rng.integers(0, s)) if s > 1 and rng.random() < 0.5 else None
        c, o, n = (int(v) for v in rng.integers(1, 4, size=3))
        x, wt = rng.standard_normal((n, h, w_, c)), rng.standard_normal((kh, kw, o, c))
        b = rng.standard_normal(o)
        try:
            want = direct(ops.conv2d_transpose_forward, x, wt, b, s, padding, op)
        except ValueError:  # an invalid geometry (e.g. output_padding vs padding)
            continue
        got = ops.conv2d_transpose_forward(x, wt, b, s, padding, op)
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)
        dy = rng.standard_normal(want.shape)
        for g, wnt in zip(ops.conv2d_transpose_backward(dy, x, wt, s, padding, op),
                          direct(ops.conv2d_transpose_backward, dy, x, wt, s, padding, op),
                          strict=True):
            np.testing.assert_allclose(g, wnt, rtol=1e-11, atol=1e-11)
        checked += 1


@pytest.mark.parametrize("stride", [2, 3])
def test_large_integer_paddings_fall_back_or_agree(forced, stride):
    """Integer paddings 0 .. k + 2 at stride >= 2: past about k / 2 the phase correlation of
    the backward-data would need a negative TOP padding (dy rows before the first that any
    dx pixel reads); that geometry must take the direct path, and every other one agree."""
    rng = np.random.default_rng(stride)
    checked = 0
    for k in (2, 3, 4, 5):
        for p in range(k + 3):
            for h in (5, 7):
                x, w = rng.standard_normal((2, h, h, 3)), rng.standard_normal((k, k, 4, 3))
                try:
                    want = direct(ops.conv2d_transpose_forward, x, w, None, stride, p)
                except ValueError:  # no output pixel left (padding eats the map)
                    continue
                got = ops.conv2d_transpose_forward(x, w, None, stride, p)
                np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)
                checked += 1
                xc = rng.standard_normal((2, h + 3, h + 3, 4))  # and the conv's own dx
                wc = rng.standard_normal((k, k, 4, 3))
                y = ops.conv2d_forward(xc, wc, None, stride, p)
                dy = rng.standard_normal(y.shape)
                got = ops.conv2d_backward(dy, xc, wc, stride, p)[0]
                want = direct(ops.conv2d_backward, dy, xc, wc, stride, p)[0]
                np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)
    assert checked >= 40


def test_fused_correlate_and_weight_grad_equal_the_separate_calls():
    rng = np.random.default_rng(12)
    x, w = rng.standard_normal((3, 7, 6, 4)), rng.standard_normal((5, 3, 4, 5))
    pads = ((2, 2), (1, 1))
    dy = rng.standard_normal((3, 7, 6, 2))
    y, dw = winograd.correlate(x, w, pads, (7, 6), dy=dy)
    np.testing.assert_allclose(y, winograd.correlate(x, w, pads, (7, 6)), rtol=1e-13,
                               atol=1e-13)
    np.testing.assert_allclose(dw, winograd.weight_grad(x, dy, (5, 3), pads), rtol=1e-13,
                               atol=1e-13)
    assert dw.shape == (5, 3, 4, 2)
