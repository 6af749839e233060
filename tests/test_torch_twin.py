"""PyTorch twins: every layer, loss, seed model and optimizer of rawgan, rebuilt in PyTorch
from rawgan's own parameters and compared in float64.

Each twin is written independently of rawgan's geometry code: TensorFlow "same" padding,
Keras' transposed-conv output size and the crop of the "full" transposed convolution are
re-derived here. For each case the forward output, the input gradient and every parameter
gradient are compared: rawgan's hand-written backward against torch autograd, driven by the
same random upstream gradient ``dy``, on random non-zero inputs. Skipped without PyTorch.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

from rawgan import losses, models, optim  # noqa: E402
from rawgan.backends.numpy_ops import conv_transpose_geometry  # noqa: E402
from rawgan.nn import (  # noqa: E402
    BatchNormalization,
    Conv2D,
    Conv2DTranspose,
    Dense,
    Dropout,
    Flatten,
    LeakyReLU,
    ReLU,
    Reshape,
    Sequential,
    Sigmoid,
    Tanh,
)

TOL = 1e-10
DT = np.float64


# --------------------------------------------------------------------------- helpers


def rel(a, b) -> float:
    """max|a - b| / max|b| (b the torch reference), guarded against 0/0."""
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0),
                                                          1e-300))


def close(a, b, tol: float = TOL, what: str = "") -> None:
    err = rel(a, b)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e}"


def leaf(a: np.ndarray):
    """A float64 torch leaf holding a copy of ``a`` (rawgan's layout), with grad."""
    return torch.tensor(np.array(a, dtype=DT), dtype=torch.float64, requires_grad=True)


def normal(rng, shape, scale=1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(DT)


def nhwc_to_nchw(x):
    return x.permute(0, 3, 1, 2)


def nchw_to_nhwc(x):
    return x.permute(0, 2, 3, 1)


def tf_same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow "same": total = max((ceil(n/s) - 1) * s + k - n, 0), odd pixel after."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def axis_pads(n: int, k: int, s: int, padding, axis: int) -> tuple[int, int]:
    if padding == "same":
        return tf_same_pads(n, k, s)
    if padding == "valid":
        return 0, 0
    p = padding[axis] if isinstance(padding, tuple) else padding
    return p, p


def keras_deconv_length(n: int, k: int, s: int, padding, op, axis: int) -> int:
    """Keras ``deconv_output_length`` (PyTorch's formula for integer paddings)."""
    if op is None and padding == "same":
        return n * s
    if op is None and padding == "valid":
        return n * s + max(k - s, 0)
    o = 0 if op is None else op[axis]
    if padding == "same":
        pad = k // 2
    elif padding == "valid":
        pad = 0
    else:
        pad = padding[axis] if isinstance(padding, tuple) else padding
    return (n - 1) * s + k - 2 * pad + o


def build_layer(layer, input_shape, seed: int):
    layer.rng = np.random.default_rng(seed)
    layer.build((None, *input_shape), DT)
    return layer


def torch_grads(out, dy: np.ndarray, *leaves):
    """Backpropagate ``dy`` from ``out`` and return each leaf's gradient."""
    return torch.autograd.grad(out, leaves, grad_outputs=torch.tensor(dy))


# --------------------------------------------------------------------------- dense


@pytest.mark.parametrize("n,d_in,d_out,use_bias", [(1, 3, 2, True), (5, 7, 4, True),
                                                   (3, 10, 1, False), (4, 1, 6, True)])
def test_dense(n, d_in, d_out, use_bias):
    rng = np.random.default_rng(n * 100 + d_in * 10 + d_out)
    layer = build_layer(Dense(d_out, use_bias=use_bias), (d_in,), 1)
    if use_bias:
        layer.params["bias"][...] = normal(rng, d_out)
    x, dy = normal(rng, (n, d_in)), normal(rng, (n, d_out))
    y = layer.forward(x)
    dx = layer.backward(dy)

    xt, wt = leaf(x), leaf(layer.params["kernel"])
    bt = leaf(layer.params["bias"]) if use_bias else None
    yt = F.linear(xt, wt.T, bt)
    grads = torch_grads(yt, dy, xt, wt, *([bt] if use_bias else []))
    close(y, yt, what="y")
    close(dx, grads[0], what="dx")
    close(layer.grads["kernel"], grads[1], what="dkernel")
    if use_bias:
        close(layer.grads["bias"], grads[2], what="dbias")
    # gradients ACCUMULATE until zero_grad
    layer.forward(x)
    layer.backward(dy)
    close(layer.grads["kernel"], 2 * grads[1], what="accumulated dkernel")
    layer.zero_grad()
    assert not layer.grads["kernel"].any()


# --------------------------------------------------------------------------- conv2d


def _padding_choice(rng):
    r = int(rng.integers(0, 4))
    if r == 0:
        return "valid"
    if r == 1:
        return "same"
    if r == 2:
        return int(rng.integers(0, 3))
    return (int(rng.integers(0, 3)), int(rng.integers(0, 3)))


def _conv_configs(count: int, seed: int, channels: tuple[int, int] = (1, 5),
                  kernels: tuple[int, int] = (1, 6)):
    """Random conv geometries. The default channels keep kh*kw*c_in under numpy_ops'
    SMALL_K (the padded-map GEMM); ``channels=(16, 40), kernels=(3, 6)`` reach the
    tap-group im2col, the Winograd and the strided phase paths (kh*kw*c_in >= 256)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        n = int(rng.integers(1, 4))
        h, w = (int(v) for v in rng.integers(1, 10, size=2))
        ci, co = (int(v) for v in rng.integers(*channels, size=2))
        kh, kw = (int(v) for v in rng.integers(*kernels, size=2))
        if rng.random() < 0.5:
            kw = kh
        sh, sw = (int(v) for v in rng.integers(1, 4, size=2))
        padding = _padding_choice(rng)
        ph = axis_pads(h, kh, sh, padding, 0)
        pw = axis_pads(w, kw, sw, padding, 1)
        if h + sum(ph) < kh or w + sum(pw) < kw:
            continue  # the kernel does not fit: rawgan must refuse (tested below)
        cfg = dict(n=n, h=h, w=w, ci=ci, co=co, k=(kh, kw), s=(sh, sw), padding=padding)
        out.append(pytest.param(cfg, id=f"n{n}-{h}x{w}-c{ci}>{co}-k{kh}x{kw}-s{sh}x{sw}"
                                         f"-{padding}".replace(" ", "")))
    return out


@pytest.mark.parametrize("cfg", _conv_configs(48, 2024)
                         + _conv_configs(16, 99, channels=(16, 40), kernels=(3, 6)))
def test_conv2d(cfg):
    rng = np.random.default_rng(zlib.crc32(str(cfg).encode()))
    (kh, kw), (sh, sw), padding = cfg["k"], cfg["s"], cfg["padding"]
    layer = build_layer(Conv2D(cfg["co"], (kh, kw), strides=(sh, sw), padding=padding),
                        (cfg["h"], cfg["w"], cfg["ci"]), 3)
    layer.params["bias"][...] = normal(rng, cfg["co"])
    x = normal(rng, (cfg["n"], cfg["h"], cfg["w"], cfg["ci"]))
    y = layer.forward(x)

    (pt, pb), (pl, pr) = (axis_pads(cfg["h"], kh, sh, padding, 0),
                          axis_pads(cfg["w"], kw, sw, padding, 1))
    ho = (cfg["h"] + pt + pb - kh) // sh + 1
    wo = (cfg["w"] + pl + pr - kw) // sw + 1
    assert y.shape == (cfg["n"], ho, wo, cfg["co"])
    if padding == "same":
        assert (ho, wo) == (math.ceil(cfg["h"] / sh), math.ceil(cfg["w"] / sw))
    dy = normal(rng, y.shape)
    dx = layer.backward(dy)

    xt, wt, bt = leaf(x), leaf(layer.params["kernel"]), leaf(layer.params["bias"])
    w_oihw = wt.permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
    if isinstance(padding, str):  # TF padding: explicit (possibly asymmetric) F.pad
        xin = F.pad(nhwc_to_nchw(xt), (pl, pr, pt, pb))
        yt = F.conv2d(xin, w_oihw, bt, stride=(sh, sw))
    else:  # integer padding: torch's own symmetric padding argument
        pads = padding if isinstance(padding, tuple) else (padding, padding)
        yt = F.conv2d(nhwc_to_nchw(xt).contiguous(), w_oihw, bt, stride=(sh, sw),
                      padding=pads)
    yt = nchw_to_nhwc(yt)
    gx, gw, gb = torch_grads(yt, dy, xt, wt, bt)
    close(y, yt, what="y")
    close(dx, gx, what="dx")
    close(layer.grads["kernel"], gw, what="dkernel")
    close(layer.grads["bias"], gb, what="dbias")


def test_conv2d_kernel_larger_than_valid_input_is_refused():
    with pytest.raises(ValueError):
        build_layer(Conv2D(2, 5, padding="valid"), (4, 6, 1), 0)


# --------------------------------------------------------------------------- conv2d transpose


def _tconv_param(n, h, w, ci, co, k, s, padding, op):
    """A pytest.param for one transposed-conv config, or None where it is not valid."""
    (kh, kw), (sh, sw) = k, s
    ho = keras_deconv_length(h, kh, sh, padding, op, 0)
    wo = keras_deconv_length(w, kw, sw, padding, op, 1)
    if ho < 1 or wo < 1:
        return None
    # the adjoint conv (same padding mode) must map (ho, wo) back to (h, w)
    ph, pw = axis_pads(ho, kh, sh, padding, 0), axis_pads(wo, kw, sw, padding, 1)
    if ho + sum(ph) < kh or wo + sum(pw) < kw:
        return None
    if ((ho + sum(ph) - kh) // sh + 1, (wo + sum(pw) - kw) // sw + 1) != (h, w):
        return None
    cfg = dict(n=n, h=h, w=w, ci=ci, co=co, k=k, s=s, padding=padding, op=op, ho=ho, wo=wo,
               pt=ph[0], pl=pw[0])
    name = f"n{n}-{h}x{w}-c{ci}>{co}-k{kh}x{kw}-s{sh}x{sw}-{padding}-op{op}"
    return pytest.param(cfg, id=name.replace(" ", ""))


def _tconv_configs(count: int, seed: int, channels: tuple[int, int] = (1, 5),
                   kernels: tuple[int, int] = (1, 6), picked: bool = True):
    out = [  # hand-picked: the seeds' layers, and output_padding past the "full" output
        _tconv_param(2, 7, 7, 3, 2, (5, 5), (1, 1), "same", None),
        _tconv_param(2, 7, 7, 3, 2, (5, 5), (2, 2), "same", None),
        _tconv_param(2, 7, 6, 2, 3, (5, 5), (2, 2), "same", (1, 1)),
        _tconv_param(1, 4, 5, 2, 2, (3, 3), (2, 2), 0, (1, 1)),
        _tconv_param(2, 3, 4, 2, 1, (2, 2), (3, 3), 0, (2, 2)),
        _tconv_param(2, 5, 4, 1, 2, (4, 3), (3, 2), "valid", (2, 1)),
        _tconv_param(1, 4, 4, 2, 2, (4, 4), (2, 2), 1, (1, 1)),
        _tconv_param(1, 3, 5, 2, 3, (4, 2), (2, 2), "same", None),
        _tconv_param(2, 4, 3, 2, 2, (3, 3), (2, 2), "valid", (1, 0)),  # a 0 in the pair
    ]
    assert all(p is not None for p in out)
    out = out if picked else []
    rng = np.random.default_rng(seed)
    while len(out) < count:
        n = int(rng.integers(1, 4))
        h, w = (int(v) for v in rng.integers(1, 8, size=2))
        ci, co = (int(v) for v in rng.integers(*channels, size=2))
        kh, kw = (int(v) for v in rng.integers(*kernels, size=2))
        if rng.random() < 0.5:
            kw = kh
        sh, sw = (int(v) for v in rng.integers(1, 4, size=2))
        padding = _padding_choice(rng)
        op = None
        if rng.random() < 0.4:
            op = (int(rng.integers(0, sh)), int(rng.integers(0, sw)))
        param = _tconv_param(n, h, w, ci, co, (kh, kw), (sh, sw), padding, op)
        if param is not None:
            out.append(param)
    return out


@pytest.mark.parametrize("cfg", _tconv_configs(48, 7)
                         + _tconv_configs(16, 98, channels=(16, 40), kernels=(3, 6),
                                          picked=False))
def test_conv2d_transpose(cfg):
    rng = np.random.default_rng(zlib.crc32(str(cfg).encode()))
    (kh, kw), (sh, sw), padding, op = cfg["k"], cfg["s"], cfg["padding"], cfg["op"]
    layer = build_layer(Conv2DTranspose(cfg["co"], (kh, kw), strides=(sh, sw), padding=padding,
                                        output_padding=op),
                        (cfg["h"], cfg["w"], cfg["ci"]), 4)
    layer.params["bias"][...] = normal(rng, cfg["co"])
    ho, wo, pt, pl = cfg["ho"], cfg["wo"], cfg["pt"], cfg["pl"]
    ho_r, wo_r, ((pt_r, _), (pl_r, _)) = conv_transpose_geometry(
        cfg["h"], cfg["w"], kh, kw, (sh, sw), padding, op)
    assert (ho_r, wo_r, pt_r, pl_r) == (ho, wo, pt, pl)

    x = normal(rng, (cfg["n"], cfg["h"], cfg["w"], cfg["ci"]))
    y = layer.forward(x)
    assert y.shape == (cfg["n"], ho, wo, cfg["co"])
    dy = normal(rng, y.shape)
    dx = layer.backward(dy)

    # torch: the "full" transposed conv ((H - 1) * s + k rows), zero-extended where the
    # output runs past it (output_padding), cropped to rows [pt, pt + Ho), cols [pl, pl + Wo)
    xt, wt, bt = leaf(x), leaf(layer.params["kernel"]), leaf(layer.params["bias"])
    w_iohw = wt.permute(3, 2, 0, 1).contiguous()  # (kh, kw, c_out, c_in) -> (c_in, c_out, kh, kw)
    full = F.conv_transpose2d(nhwc_to_nchw(xt), w_iohw, None, stride=(sh, sw))
    hf, wf = full.shape[2], full.shape[3]
    assert (hf, wf) == ((cfg["h"] - 1) * sh + kh, (cfg["w"] - 1) * sw + kw)
    full = F.pad(full, (0, max(pl + wo - wf, 0), 0, max(pt + ho - hf, 0)))
    yt = nchw_to_nhwc(full[:, :, pt:pt + ho, pl:pl + wo]) + bt
    gx, gw, gb = torch_grads(yt, dy, xt, wt, bt)
    close(y, yt, what="y")
    close(dx, gx, what="dx")
    close(layer.grads["kernel"], gw, what="dkernel")
    close(layer.grads["bias"], gb, what="dbias")

    # integer paddings are PyTorch's own convention: its padding/output_padding agree too
    if not isinstance(padding, str):
        pads = padding if isinstance(padding, tuple) else (padding, padding)
        yt2 = F.conv_transpose2d(nhwc_to_nchw(xt), w_iohw, bt, stride=(sh, sw),
                                 padding=pads, output_padding=op or 0)
        close(y, nchw_to_nhwc(yt2), what="y vs torch padding/output_padding")


# --------------------------------------------------------------------------- activations


ACTIVATIONS = [
    ("leaky0.3", lambda: LeakyReLU(), lambda t: F.leaky_relu(t, 0.3)),
    ("leaky0.2", lambda: LeakyReLU(alpha=0.2), lambda t: F.leaky_relu(t, 0.2)),
    ("relu", ReLU, F.relu),
    ("tanh", Tanh, torch.tanh),
    ("sigmoid", Sigmoid, torch.sigmoid),
]


@pytest.mark.parametrize("shape", [(4, 7), (2, 5, 3, 4)], ids=["2d", "4d"])
@pytest.mark.parametrize("make,fn", [a[1:] for a in ACTIVATIONS], ids=[a[0] for a in ACTIVATIONS])
def test_activation(make, fn, shape):
    rng = np.random.default_rng(len(shape))
    layer = build_layer(make(), shape[1:], 0)
    x = normal(rng, shape, 3.0)
    x[np.abs(x) < 1e-6] = 0.5  # no input at a kink
    y = layer.forward(x)
    dy = normal(rng, shape)
    dx = layer.backward(dy)
    xt = leaf(x)
    yt = fn(xt)
    (gx,) = torch_grads(yt, dy, xt)
    close(y, yt, what="y")
    close(dx, gx, what="dx")


# --------------------------------------------------------------------------- batch norm


@pytest.mark.parametrize("momentum", [0.99, 0.8])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5, 3), (2, 1, 1, 4)], ids=["2d", "4d", "4d1x1"])
def test_batchnorm_training(shape, momentum):
    rng = np.random.default_rng(11)
    eps = 1e-3
    layer = build_layer(BatchNormalization(momentum=momentum, epsilon=eps), shape[1:], 0)
    c = shape[-1]
    p = layer.params
    p["gamma"][...] = 1 + 0.5 * normal(rng, c)
    p["beta"][...] = normal(rng, c)
    p["moving_mean"][...] = normal(rng, c)
    p["moving_variance"][...] = 0.5 + rng.random(c)
    mm0, mv0 = p["moving_mean"].copy(), p["moving_variance"].copy()
    x = normal(rng, shape, 2.0) + 1.5
    y = layer.forward(x, training=True)
    dy = normal(rng, shape)
    dx = layer.backward(dy)

    xt, gt, bt = leaf(x), leaf(p["gamma"]), leaf(p["beta"])
    rm, rv = torch.tensor(mm0), torch.tensor(mv0)
    xin = xt if len(shape) == 2 else nhwc_to_nchw(xt)
    yt = F.batch_norm(xin, rm, rv, gt, bt, training=True, momentum=1 - momentum, eps=eps)
    yt = yt if len(shape) == 2 else nchw_to_nhwc(yt)
    gx, gg, gb = torch_grads(yt, dy, xt, gt, bt)
    close(y, yt, what="y")
    close(dx, gx, what="dx")
    close(layer.grads["gamma"], gg, what="dgamma")
    close(layer.grads["beta"], gb, what="dbeta")
    close(p["moving_mean"], rm, what="moving_mean")
    # torch's running variance uses the UNBIASED batch variance, Keras 3 the biased one
    m = x.size // c
    var_unbiased = (rv.numpy() - momentum * mv0) / (1 - momentum)
    expected = momentum * mv0 + (1 - momentum) * var_unbiased * (m - 1) / m
    close(p["moving_variance"], expected, 1e-9, what="moving_variance")


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5, 3)], ids=["2d", "4d"])
def test_batchnorm_inference(shape):
    rng = np.random.default_rng(12)
    eps = 1e-3
    layer = build_layer(BatchNormalization(epsilon=eps), shape[1:], 0)
    c = shape[-1]
    p = layer.params
    p["gamma"][...] = 1 + 0.5 * normal(rng, c)
    p["beta"][...] = normal(rng, c)
    p["moving_mean"][...] = normal(rng, c)
    p["moving_variance"][...] = 0.5 + rng.random(c)
    mm0, mv0 = p["moving_mean"].copy(), p["moving_variance"].copy()
    x = normal(rng, shape, 2.0)
    y = layer.forward(x, training=False)
    dy = normal(rng, shape)
    dx = layer.backward(dy)
    np.testing.assert_array_equal(p["moving_mean"], mm0)
    np.testing.assert_array_equal(p["moving_variance"], mv0)

    xt, gt, bt = leaf(x), leaf(p["gamma"]), leaf(p["beta"])
    xin = xt if len(shape) == 2 else nhwc_to_nchw(xt)
    yt = F.batch_norm(xin, torch.tensor(mm0), torch.tensor(mv0), gt, bt, training=False,
                      eps=eps)
    yt = yt if len(shape) == 2 else nchw_to_nhwc(yt)
    gx, gg, gb = torch_grads(yt, dy, xt, gt, bt)
    close(y, yt, what="y")
    close(dx, gx, what="dx")
    close(layer.grads["gamma"], gg, what="dgamma")
    close(layer.grads["beta"], gb, what="dbeta")


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("rate", [0.3, 0.5])
def test_dropout(rate):
    rng = np.random.default_rng(13)
    shape = (64, 6, 5, 4)
    layer = build_layer(Dropout(rate, seed=5), shape[1:], 0)
    x = normal(rng, shape)
    y = layer.forward(x, training=True)
    mask = layer._cache["mask"]
    scale = 1 / (1 - rate)
    assert set(np.unique(mask)) <= {0.0, scale}  # inverted scaling, as torch's dropout
    # the mask's specification: keep where one rng.random draw of x's shape is >= rate
    keep = np.random.default_rng(0).random(shape, dtype=x.dtype) >= rate  # build_layer: seed 0
    np.testing.assert_array_equal(mask != 0, keep)
    assert abs((mask == 0).mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / mask.size)
    dy = normal(rng, shape)
    dx = layer.backward(dy)
    xt = leaf(x)
    yt = xt * torch.tensor(mask)
    (gx,) = torch_grads(yt, dy, xt)
    close(y, yt, what="y")
    close(dx, gx, what="dx")
    # inference: the identity, and its gradient too
    y = layer.forward(x, training=False)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(layer.backward(dy), dy)


# --------------------------------------------------------------------------- losses


def _torch_d_loss(kind, r, f):
    if kind in ("bce", "minimax"):
        return (F.binary_cross_entropy_with_logits(r, torch.ones_like(r))
                + F.binary_cross_entropy_with_logits(f, torch.zeros_like(f)))
    if kind == "wgan":
        return f.mean() - r.mean()
    if kind == "hinge":
        return F.relu(1 - r).mean() + F.relu(1 + f).mean()
    return 0.5 * ((r - 1) ** 2).mean() + 0.5 * (f ** 2).mean()


def _torch_g_loss(kind, f):
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(f, torch.ones_like(f))
    if kind == "minimax":
        return torch.log(1 - torch.sigmoid(f)).mean()
    if kind in ("wgan", "hinge"):
        return -f.mean()
    return 0.5 * ((f - 1) ** 2).mean()


@pytest.mark.parametrize("kind", losses.KINDS)
def test_losses(kind):
    rng = np.random.default_rng(14)
    r, f = normal(rng, (9, 1), 2.0), normal(rng, (7, 1), 2.0)
    loss, d_r, d_f = losses.discriminator_loss(kind, r, f)
    rt, ft = leaf(r), leaf(f)
    lt = _torch_d_loss(kind, rt, ft)
    gr, gf = torch.autograd.grad(lt, (rt, ft))
    assert abs(loss - lt.item()) <= TOL * max(abs(lt.item()), 1.0)
    close(d_r, gr, what="d_real")
    close(d_f, gf, what="d_fake")

    g_loss, g_f = losses.generator_loss(kind, f)
    ft = leaf(f)
    lt = _torch_g_loss(kind, ft)
    (gf,) = torch.autograd.grad(lt, (ft,))
    assert abs(g_loss - lt.item()) <= TOL * max(abs(lt.item()), 1.0)
    close(g_f, gf, what="g d_fake")


# --------------------------------------------------------------------------- seed models


class _Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class _Crop(nn.Module):
    """Crop the "full" transposed-conv output to rows [t, t + h), cols [l, l + w)."""

    def __init__(self, t, l, h, w):
        super().__init__()
        self.t, self.l, self.h, self.w = t, l, h, w

    def forward(self, x):
        hf, wf = x.shape[2], x.shape[3]
        x = F.pad(x, (0, max(self.l + self.w - wf, 0), 0, max(self.t + self.h - hf, 0)))
        return x[:, :, self.t:self.t + self.h, self.l:self.l + self.w]


class _Mask(nn.Module):
    """Dropout with a fixed mask (rawgan's), NCHW or (N, C)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def _as_param(a, perm=None):
    t = torch.tensor(np.array(a, dtype=DT))
    return nn.Parameter(t.permute(*perm).contiguous() if perm else t)


def torch_twin(model: Sequential, masks: dict | None = None):
    """An ``nn.Sequential`` twin of a rawgan ``Sequential`` (NCHW inside, NHWC at the ends).

    Returns ``(module, grads)``, ``grads(name) -> {key: ndarray in rawgan's layout}``.
    ``masks[layer.name]`` holds the dropout mask (rawgan layout) of each Dropout layer.
    """
    mods, getters = [], {}
    shape = (None, *model.input_shape)
    nchw = False  # is the torch activation currently NCHW?

    def to_nchw():
        nonlocal nchw
        if not nchw:
            mods.append(_Permute(0, 3, 1, 2))
            nchw = True

    def to_nhwc():
        nonlocal nchw
        if nchw:
            mods.append(_Permute(0, 2, 3, 1))
            nchw = False

    for layer in model.layers:
        p = layer.params
        out_shape = layer.compute_output_shape(shape)
        if isinstance(layer, Dense):
            m = nn.Linear(shape[1], layer.units, bias=layer.use_bias, dtype=torch.float64)
            m.weight = _as_param(p["kernel"], (1, 0))
            if layer.use_bias:
                m.bias = _as_param(p["bias"])
            mods.append(m)
            getters[layer.name] = (lambda m=m, b=layer.use_bias: {
                "kernel": m.weight.grad.numpy().T,
                **({"bias": m.bias.grad.numpy()} if b else {})})
        elif isinstance(layer, (Conv2D, Conv2DTranspose)):
            to_nchw()
            (kh, kw), (sh, sw) = layer.kernel_size, layer.strides
            if isinstance(layer, Conv2D):
                ph = axis_pads(shape[1], kh, sh, layer.padding, 0)
                pw = axis_pads(shape[2], kw, sw, layer.padding, 1)
                mods.append(nn.ZeroPad2d((pw[0], pw[1], ph[0], ph[1])))
                m = nn.Conv2d(shape[3], layer.filters, (kh, kw), (sh, sw), bias=layer.use_bias,
                              dtype=torch.float64)
                m.weight = _as_param(p["kernel"], (3, 2, 0, 1))
                mods.append(m)
            else:
                m = nn.ConvTranspose2d(shape[3], layer.filters, (kh, kw), (sh, sw),
                                       bias=False, dtype=torch.float64)
                m.weight = _as_param(p["kernel"], (3, 2, 0, 1))
                mods.append(m)
                ho, wo = out_shape[1], out_shape[2]
                pt = axis_pads(ho, kh, sh, layer.padding, 0)[0]
                pl = axis_pads(wo, kw, sw, layer.padding, 1)[0]
                mods.append(_Crop(pt, pl, ho, wo))
                if layer.use_bias:
                    raise NotImplementedError("bias on a twin transposed conv")
            if isinstance(layer, Conv2D) and layer.use_bias:
                m.bias = _as_param(p["bias"])
            getters[layer.name] = (lambda m=m, b=layer.use_bias: {
                "kernel": m.weight.grad.permute(2, 3, 1, 0).numpy(),
                **({"bias": m.bias.grad.numpy()} if b else {})})
        elif isinstance(layer, BatchNormalization):
            if len(shape) == 4:
                to_nchw()
                m = nn.BatchNorm2d(shape[3], eps=layer.epsilon, momentum=1 - layer.momentum,
                                   dtype=torch.float64)
            else:
                m = nn.BatchNorm1d(shape[1], eps=layer.epsilon, momentum=1 - layer.momentum,
                                   dtype=torch.float64)
            m.weight, m.bias = _as_param(p["gamma"]), _as_param(p["beta"])
            m.running_mean.copy_(torch.tensor(p["moving_mean"]))
            m.running_var.copy_(torch.tensor(p["moving_variance"]))
            mods.append(m)
            getters[layer.name] = (lambda m=m: {"gamma": m.weight.grad.numpy(),
                                                "beta": m.bias.grad.numpy()})
        elif isinstance(layer, LeakyReLU):
            mods.append(nn.LeakyReLU(layer.alpha))
        elif isinstance(layer, Tanh):
            mods.append(nn.Tanh())
        elif isinstance(layer, Dropout):
            mask = torch.tensor(masks[layer.name])
            mods.append(_Mask(mask.permute(0, 3, 1, 2) if nchw else mask))
        elif isinstance(layer, Reshape):  # Flatten too: rawgan reshapes NHWC, C-order
            to_nhwc()
            mods.append(nn.Unflatten(1, out_shape[1:]) if len(out_shape) > 2
                        else nn.Flatten())
        else:
            raise NotImplementedError(layer.kind)
        shape = out_shape
    if len(shape) == 4:
        to_nhwc()
    return nn.Sequential(*mods), getters


@pytest.mark.parametrize("name", ["dcgan", "mlp"])
def test_seed_models(name):
    rng = np.random.default_rng(15)
    G, D = models.build(name, seed=3, dtype=DT)
    assert G.dtype == DT and D.dtype == DT
    n = 4
    z = normal(rng, (n, 100))
    gw0 = {k: v.copy() for k, v in G.get_weights().items()}

    fake = G.forward(z, training=True)
    logits = D.forward(fake, training=True)
    masks = {lay.name: lay._cache["mask"] for lay in D.layers if isinstance(lay, Dropout)}
    dy = normal(rng, logits.shape)
    dfake = D.backward(dy)
    dz = G.backward(dfake)

    # twins from the weights BEFORE the forward pass (BN moving stats are updated in place)
    G0, _ = models.build(name, seed=3, dtype=DT)
    G0.set_weights(gw0)
    tG, g_getters = torch_twin(G0)
    tD, d_getters = torch_twin(D, masks)
    tG.train()
    tD.train()
    zt = leaf(z)
    fake_t = tG(zt)
    logits_t = tD(fake_t)
    logits_t.backward(torch.tensor(dy))
    close(fake, fake_t, what="G(z)")
    close(logits, logits_t, what="D(G(z))")
    close(dz, zt.grad, what="dL/dz")
    for model, getters in ((G, g_getters), (D, d_getters)):
        for layer in model.layers:
            if layer.name in getters:
                for key, g in getters[layer.name]().items():
                    close(layer.grads[key], g, 1e-9, what=f"{model.name}/{layer.name}/{key}")
    # batch-norm moving statistics after one training forward
    for layer, m in zip((lay for lay in G.layers if isinstance(lay, BatchNormalization)),
                        (m for m in tG if isinstance(m, nn.modules.batchnorm._BatchNorm)),
                        strict=True):
        close(layer.params["moving_mean"], m.running_mean, what=f"{layer.name} moving_mean")
        count = n * math.prod(_bn_spatial(G, layer))  # values per channel
        mom, mv0 = layer.momentum, gw0[f"{layer.name}/moving_variance"]
        var_unbiased = (m.running_var.numpy() - mom * mv0) / (1 - mom)
        close(layer.params["moving_variance"],
              mom * mv0 + (1 - mom) * var_unbiased * (count - 1) / count, 1e-8,
              what=f"{layer.name} moving_variance")


def _bn_spatial(model, bn_layer):
    """The (H, W) a 4-D batch norm layer normalises over (1 for a 2-D one)."""
    shape = (None, *model.input_shape)
    for layer in model.layers:
        if layer is bn_layer:
            return shape[1:3] if len(shape) == 4 else (1,)
        shape = layer.compute_output_shape(shape)
    raise LookupError(bn_layer.name)


# --------------------------------------------------------------------------- optimizers


def _opt_setup(seed):
    """A small float64 model, its torch parameter twins, and a gradient generator."""
    model = Sequential([Dense(6), LeakyReLU(), Dense(3), Flatten()], seed=seed)
    model.build((None, 5), DT)
    tparams = [leaf(p) for _, p, _ in model.parameters()]
    return model, tparams, np.random.default_rng(seed + 100)


def _set_grads(model, tparams, rng):
    for (_, p, g), tp in zip(model.parameters(), tparams, strict=True):
        g[...] = normal(rng, p.shape) * rng.choice([1e-3, 1.0, 30.0])
        tp.grad = torch.tensor(g.copy())


def _compare_params(model, tparams, what):
    for (name, p, _), tp in zip(model.parameters(), tparams, strict=True):
        close(p, tp, what=f"{what} {name}")


def test_adam_vs_torch_adam():
    model, tparams, rng = _opt_setup(16)
    lr, b1, b2 = 1e-2, 0.8, 0.95
    # torch adds eps to sqrt(v_hat), Keras to sqrt(v): a tiny eps makes both negligible
    opt = optim.Adam(model, lr=lr, beta_1=b1, beta_2=b2, epsilon=1e-14)
    topt = torch.optim.Adam(tparams, lr=lr, betas=(b1, b2), eps=1e-14)
    for t in range(7):
        _set_grads(model, tparams, rng)
        opt.step()
        topt.step()
        _compare_params(model, tparams, f"step {t + 1}")


def test_adam_keras_form_by_hand():
    """Keras' epsilon placement, with the default epsilon 1e-7, against torch ops."""
    model, tparams, rng = _opt_setup(17)
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-7
    opt = optim.Adam(model, lr=lr)
    ms = [torch.zeros_like(p) for p in tparams]
    vs = [torch.zeros_like(p) for p in tparams]
    for t in range(1, 8):
        _set_grads(model, tparams, rng)
        opt.step()
        with torch.no_grad():
            for p, m, v in zip(tparams, ms, vs, strict=True):
                m.mul_(b1).add_((1 - b1) * p.grad)
                v.mul_(b2).add_((1 - b2) * p.grad ** 2)
                p -= lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (v.sqrt() + eps)
        _compare_params(model, tparams, f"step {t}")
    assert opt.iterations == 7


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.7, True)])
def test_sgd_vs_torch_sgd(momentum, nesterov):
    model, tparams, rng = _opt_setup(18)
    opt = optim.SGD(model, lr=0.05, momentum=momentum, nesterov=nesterov)
    topt = torch.optim.SGD(tparams, lr=0.05, momentum=momentum, nesterov=nesterov)
    for t in range(6):
        _set_grads(model, tparams, rng)
        opt.step()
        topt.step()
        _compare_params(model, tparams, f"step {t + 1}")


def test_rmsprop_vs_torch_rmsprop():
    """With rawgan's DEFAULT rho and epsilon (train builds RMSprop with lr alone): Keras'
    0.9 and 1e-7, PyTorch's alpha and eps set to them."""
    model, tparams, rng = _opt_setup(19)
    opt = optim.RMSprop(model, lr=1e-2)
    topt = torch.optim.RMSprop(tparams, lr=1e-2, alpha=0.9, eps=1e-7)
    for t in range(6):
        _set_grads(model, tparams, rng)
        opt.step()
        topt.step()
        _compare_params(model, tparams, f"step {t + 1}")


def test_conv_outputs_that_see_only_padding_keep_the_bias():
    """padding >= kernel with kh*kw*c_in >= 256 (the tap-group path): the border outputs'
    windows read only zeros, and are the bias alone."""
    rng = np.random.default_rng(31)
    layer = build_layer(Conv2D(4, 2, padding=3), (3, 3, 64), 5)
    layer.params["bias"][...] = normal(rng, 4)
    x = normal(rng, (1, 3, 3, 64))
    y = layer.forward(x)
    tl = torch.nn.Conv2d(64, 4, 2, padding=3).double()
    with torch.no_grad():
        tl.weight.copy_(torch.from_numpy(np.transpose(layer.params["kernel"], (3, 2, 0, 1))))
        tl.bias.copy_(torch.from_numpy(layer.params["bias"]))
        want = nchw_to_nhwc(tl(nhwc_to_nchw(torch.from_numpy(x)))).numpy()
    assert y.shape == want.shape
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y[0, 0, 0], layer.params["bias"], rtol=1e-12)
