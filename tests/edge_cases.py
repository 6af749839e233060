"""Edge shapes every backend must treat as the NumPy reference does: empty batches, 1-D
inputs, zero-width layers, single elements. Shared by tests/test_cpu_threads.py (numpy_ops),
tests/test_kernels_compile.py (cupy_ops on the CPU emulator) and tests/test_numba_ops.py
(numba_ops in the CUDA simulator).

The rules (numpy_ops is the reference): a sum over no rows is 0 (bias gradient, weight
gradients of an empty batch, a product with inner size 0); batch normalization refuses an
empty training batch and a missing channel axis with a ValueError (its statistics, and the
moving ones it updates, would be NaN); a convolution whose input and kernel disagree on the
channels, and every other shape that does not fit (a bias, dy, gamma of the wrong length, the
operands of an elementwise op), is a ValueError naming them (not a GEMM's shape error, not a
silent broadcast, not a GPU kernel reading past an array).
"""

from __future__ import annotations

import numpy as np

from rawgan.backends.numpy_ops import conv_geometry


def cases(rng: np.random.Generator):
    """(name, op name, args, kwargs); args are NumPy arrays or plain values. Names starting
    with "bad: " are inputs every backend must refuse with a ValueError."""

    def r(*s):
        return rng.standard_normal(s)

    out = []
    for s in ((0, 3), (1, 3), (5,), (1,), (2, 1, 1, 1), (0, 4, 4, 2)):
        x, dy, b = r(*s), r(*s), r(s[-1])
        for op in ("leaky_relu", "relu", "tanh", "sigmoid"):
            out.append((f"{op} {s}", f"{op}_forward", (x,), {}))
        out.append((f"leaky_relu_backward {s}", "leaky_relu_backward", (dy, x), {}))
        out.append((f"bias_add_forward {s}", "bias_add_forward", (x, b), {}))
        out.append((f"bias_add_backward {s}", "bias_add_backward", (dy,), {}))
        out.append((f"dropout_backward {s}", "dropout_backward", (dy, x), {}))
        c = s[-1]
        for training in (True, False):
            out.append((f"batchnorm_forward {s} training={training}", "batchnorm_forward",
                        (x, r(c), r(c), np.zeros(c), np.ones(c)), {"training": training}))
    for n, k, m in ((0, 3, 4), (2, 0, 4), (2, 3, 0), (1, 1, 1)):
        x, w, b, dy = r(n, k), r(k, m), r(m), r(n, m)
        out.append((f"dense_forward {(n, k, m)}", "dense_forward", (x, w, b), {}))
        out.append((f"dense_backward {(n, k, m)}", "dense_backward", (dy, x, w), {}))
    for xs, ws, st, pad in (((0, 5, 5, 2), (3, 3, 2, 4), 1, "same"),
                            ((1, 1, 1, 1), (1, 1, 1, 1), 1, "valid"),
                            ((1, 2, 2, 1), (3, 3, 1, 2), 2, "same")):
        x, w, wt = r(*xs), r(*ws), r(ws[0], ws[1], ws[3], ws[2])
        ho, wo, _ = conv_geometry(xs[1], xs[2], ws[0], ws[1], st, pad)
        out.append((f"conv2d_forward {xs}", "conv2d_forward", (x, w, r(ws[3]), st, pad), {}))
        out.append((f"conv2d_backward {xs}", "conv2d_backward",
                    (r(xs[0], ho, wo, ws[3]), x, w, st, pad), {}))
        out.append((f"conv2d_transpose_forward {xs}", "conv2d_transpose_forward",
                    (x, wt, None, st, pad), {}))
    for op, ws in (("conv2d_forward", (3, 3, 4, 2)), ("conv2d_transpose_forward", (3, 3, 2, 4))):
        out.append((f"bad: {op} channel mismatch", op,
                    (r(1, 5, 5, 3), r(*ws), None, 2, "same"), {}))
    # shapes that do not fit: a ValueError naming them on every backend (the GPU kernels
    # would read or write past an array instead)
    x23, c3 = r(2, 3), r(3)
    out += [
        ("bad: dense_forward inner mismatch", "dense_forward", (x23, r(4, 5), None), {}),
        ("bad: dense_forward bias length", "dense_forward", (x23, r(3, 4), r(5)), {}),
        ("bad: dense_backward dy shape", "dense_backward", (r(2, 5), x23, r(3, 4)), {}),
        ("bad: bias_add_forward bias length", "bias_add_forward", (x23, r(4)), {}),
        ("bad: leaky_relu_backward shapes", "leaky_relu_backward", (x23, r(4, 3)), {}),
        ("bad: tanh_backward shapes", "tanh_backward", (x23, c3), {}),
        ("bad: sigmoid_backward shapes", "sigmoid_backward", (x23, r(2, 4)), {}),
        ("bad: dropout_backward shapes", "dropout_backward", (x23, r(2, 4)), {}),
        ("bad: conv2d_forward bias length", "conv2d_forward",
         (r(1, 5, 5, 2), r(3, 3, 2, 4), r(3), 1, "same"), {}),
        ("bad: conv2d_backward dy batch", "conv2d_backward",
         (r(2, 5, 5, 4), r(1, 5, 5, 2), r(3, 3, 2, 4), 1, "same"), {}),
        ("bad: conv2d_transpose_backward dy shape", "conv2d_transpose_backward",
         (r(1, 9, 9, 2), r(1, 5, 5, 4), r(3, 3, 2, 4), 2, "same"), {}),
        ("bad: batchnorm_forward gamma length", "batchnorm_forward",
         (x23, r(4), c3, np.zeros(3), np.ones(3)), {}),
        ("bad: batchnorm_backward dy shape", "batchnorm_backward",
         (r(4, 3), x23, c3, c3, np.abs(c3)), {}),
    ]
    out.append(("batchnorm_forward 0 channels", "batchnorm_forward",
                (np.zeros((3, 0)), np.zeros(0), np.zeros(0), np.zeros(0), np.ones(0)), {}))
    return out


def check_backend(ops, to_device, to_host, tol: float = 1e-9) -> list[str]:
    """Run every case on ``ops`` and on numpy_ops; the list of disagreements (empty: none).
    Both must raise the same exception type, or both return the same shapes and values."""
    from rawgan.backends import numpy_ops

    problems = []
    for name, op, args, kw in cases(np.random.default_rng(0)):
        try:
            want = getattr(numpy_ops, op)(*[a.copy() if isinstance(a, np.ndarray) else a
                                            for a in args], **kw)
        except Exception as exc:  # noqa: BLE001 (the reference's error is the expectation)
            want = exc
        try:
            got = getattr(ops, op)(*[to_device(a) if isinstance(a, np.ndarray) else a
                                     for a in args], **kw)
        except Exception as exc:  # noqa: BLE001
            got = exc
        if isinstance(want, Exception) or isinstance(got, Exception):
            if type(want) is not type(got):
                problems.append(f"{name}: reference {want!r:.100}, backend {got!r:.100}")
            continue
        ws = want if isinstance(want, tuple) else (want,)
        gs = got if isinstance(got, tuple) else (got,)
        for i, (w, g) in enumerate(zip(ws, gs, strict=True)):
            if w is None and g is None:
                continue
            w, g = np.asarray(w), to_host(g)
            if w.shape != g.shape or not np.allclose(g, w, rtol=tol, atol=tol):
                problems.append(f"{name} output {i}: {g.shape} vs {w.shape}")
    return problems
