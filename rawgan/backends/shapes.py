"""Shape rules every backend's ops enforce, one definition for all three (numpy_ops,
cupy_ops, numba_ops): an input that does not fit is a ValueError naming it, never a GEMM's
shape error, a silent NumPy broadcast, or a GPU kernel reading or writing past an array.
"""

from __future__ import annotations


def check_bias(b, c: int, what: str) -> None:
    """``b`` None or of shape (c,): one value per output channel."""
    if b is not None and tuple(b.shape) != (c,):
        raise ValueError(f"{what}: bias has shape {tuple(b.shape)}, expected ({c},)")


def check_grad(dy, shape, what: str) -> None:
    """``dy`` of the forward output's shape."""
    if tuple(dy.shape) != tuple(shape):
        raise ValueError(f"{what}: dy has shape {tuple(dy.shape)}, expected {tuple(shape)} "
                         "(the forward output's)")


def check_same_shape(what: str, *arrays) -> None:
    """Arrays an elementwise op pairs up element by element: one shape (no broadcasting)."""
    shapes = {tuple(a.shape) for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{what}: shapes {', '.join(str(tuple(a.shape)) for a in arrays)} "
                         "differ (elementwise: they must match)")


def check_channels(what: str, c: int, **vectors) -> None:
    """Per-channel vectors (gamma, beta, statistics): each None or of shape (c,)."""
    for name, v in vectors.items():
        if v is not None and tuple(v.shape) != (c,):
            raise ValueError(f"{what}: {name} has shape {tuple(v.shape)}, expected ({c},) "
                             "(one value per channel)")


def check_dense(x, w, b, what: str) -> None:
    """x (N, in) and w (in, out) multiply; b None or (out,)."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"{what}: x {tuple(x.shape)} and w {tuple(w.shape)} do not multiply "
                         "(expected x (N, in), w (in, out))")
    check_bias(b, w.shape[1], what)


def check_conv(x, w, c_axis_of_w: int, what: str) -> None:
    """x must be NHWC and w a 4-D kernel whose axis ``c_axis_of_w`` (2: conv HWIO, 3: the
    transposed conv's (kh, kw, c_out, c_in)) matches x's channels: a clear ValueError
    instead of a GEMM's shape error. Every backend's conv ops call it."""
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"{what}: expected a 4-D NHWC input and a 4-D kernel, got shapes "
                         f"{tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[3] != w.shape[c_axis_of_w]:
        raise ValueError(f"{what}: input has {x.shape[3]} channels, kernel {tuple(w.shape)} "
                         f"expects {w.shape[c_axis_of_w]}")
