"""Tests for rawgan.inspect: recorded statistics equal direct computations, the HDF5 layout,
the recorder leaves nothing behind when off, the minimax-vs-bce lesson on a constructed
discriminator, and ``rawgan inspect`` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rawgan import gan, models, optim
from rawgan.inspect import (
    STATS,
    Recorder,
    Session,
    compare_losses,
    format_comparison,
    record_session,
)
from rawgan.nn import Dense, LeakyReLU, ReLU, Sequential, Sigmoid, Tanh

h5py = pytest.importorskip("h5py")


def direct_stats(a) -> dict[str, float]:
    """The six statistics, written out independently of rawgan.inspect.tensor_stats."""
    a = np.asarray(a, dtype=np.float64)
    return {"mean": np.mean(a), "std": np.std(a), "min": np.min(a), "max": np.max(a),
            "l2": np.linalg.norm(a.ravel()), "frac_zero": np.mean(a == 0)}


def assert_row(table: dict, row: int, expected: dict, rel: float = 1e-12) -> None:
    for k, v in expected.items():
        assert table[k][row] == pytest.approx(float(v), rel=rel, abs=1e-15), k


# --------------------------------------------------------------------------------------
# statistics == values computed directly from the arrays
# --------------------------------------------------------------------------------------


def small_mlp() -> Sequential:
    """Dense -> LeakyReLU -> Dense -> ReLU -> Dense -> Tanh -> Dense -> Sigmoid, float64,
    with weights scaled so that some tanh and sigmoid outputs saturate."""
    m = Sequential([Dense(6), LeakyReLU(0.2), Dense(5), ReLU(), Dense(4), Tanh(), Dense(3),
                    Sigmoid()], seed=3)._built((None, 4), np.float64)
    rng = np.random.default_rng(1)
    for layer in m.layers:
        for k in layer.trainable:
            layer.params[k][...] = 2.5 * rng.standard_normal(layer.params[k].shape)
    return m


def test_recorded_statistics_equal_direct_computation():
    m = small_mlp()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 4))
    dy = rng.standard_normal((7, 3))
    lr = 0.05
    opt = optim.SGD(m, lr=lr)
    W = [m.layers[i].params["kernel"].copy() for i in (0, 2, 4, 6)]
    b = [m.layers[i].params["bias"].copy() for i in (0, 2, 4, 6)]

    # forward and backward by hand
    h1 = x @ W[0] + b[0]
    a1 = np.where(h1 > 0, h1, 0.2 * h1)
    h2 = a1 @ W[1] + b[1]
    a2 = np.maximum(h2, 0)
    h3 = a2 @ W[2] + b[2]
    a3 = np.tanh(h3)
    h4 = a3 @ W[3] + b[3]
    y = 1 / (1 + np.exp(-h4))
    dh4 = dy * y * (1 - y)
    da3 = dh4 @ W[3].T
    dh3 = da3 * (1 - a3**2)
    da2 = dh3 @ W[2].T
    dh2 = da2 * (h2 > 0)
    da1 = dh2 @ W[1].T
    dh1 = da1 * np.where(h1 > 0, 1.0, 0.2)
    dx = dh1 @ W[0].T
    grads = {"dense": (x.T @ dh1, dh1.sum(0)), "dense_1": (a1.T @ dh2, dh2.sum(0)),
             "dense_2": (a2.T @ dh3, dh3.sum(0)), "dense_3": (a3.T @ dh4, dh4.sum(0))}

    with Recorder(m, [opt], tensors_at={0}) as rec:
        rec.begin_step()
        m.zero_grad()
        out = m.forward(x)
        m.backward(dy)
        opt.step()
    np.testing.assert_allclose(out, y, rtol=1e-12)
    assert 0 < np.mean(np.abs(a3) > 0.99) < 1 and 0 < np.mean((y < 0.01) | (y > 0.99)) < 1

    acts = {"dense": h1, "leaky_re_lu": a1, "dense_1": h2, "re_lu": a2, "dense_2": h3,
            "tanh": a3, "dense_3": h4, "sigmoid": y}
    # grad_input: dL/d(the layer's input)
    dxs = {"dense": dx, "leaky_re_lu": dh1, "dense_1": da1, "re_lu": dh2, "dense_2": da2,
           "tanh": dh3, "dense_3": da3, "sigmoid": dh4}
    for name, a in acts.items():
        t = rec.table(m.name or "model_0", name, "activation")
        assert list(t["step"]) == [0] and list(t["call"]) == [0]
        assert_row(t, 0, direct_stats(a))
        np.testing.assert_allclose(rec.tensor(0, "model_0", name, "activation"), a, rtol=1e-12)
        assert_row(rec.table("model_0", name, "grad_input"), 0, direct_stats(dxs[name]))
    extras = {"leaky_re_lu": ("frac_negative_input", np.mean(h1 < 0)),
              "re_lu": ("frac_negative_input", np.mean(h2 < 0)),
              "tanh": ("frac_saturated", np.mean(np.abs(a3) > 0.99)),
              "sigmoid": ("frac_saturated", np.mean((y < 0.01) | (y > 0.99)))}
    for name, (col, value) in extras.items():
        t = rec.table("model_0", name, "activation")
        assert t[col][0] == pytest.approx(value, abs=0)
        assert set(t) == {"step", "call", *STATS, col}
    assert set(rec.table("model_0", "dense", "activation")) == {"step", "call", *STATS}

    for (name, (dw, db)), w0, b0 in zip(grads.items(), W, b, strict=True):
        for key, g, p0 in (("kernel", dw, w0), ("bias", db, b0)):
            assert_row(rec.table("model_0", name, "params", key, "grad"), 0, direct_stats(g))
            upd = rec.table("model_0", name, "params", key, "update")
            # SGD without momentum: the update is -lr * g (up to the rounding of w - lr g)
            assert_row(upd, 0, {k: v for k, v in direct_stats(-lr * g).items()
                                if k != "frac_zero"}, rel=1e-9)
            assert upd["weight_l2"][0] == pytest.approx(np.linalg.norm(p0), rel=1e-12)
            assert upd["ratio"][0] == pytest.approx(
                lr * np.linalg.norm(g) / np.linalg.norm(p0), rel=1e-9)
        _, _, norm = rec.layer_norms("model_0", name)
        assert norm[0] == pytest.approx(np.sqrt(np.sum(dw**2) + np.sum(db**2)), rel=1e-12)


def tiny_gan(seed: int = 0, kind: str = "bce", lr: float = 1e-3, batch: int = 8):
    """An MLP GAN on 4x4 'images' with fixed real batches and seeded noise."""
    G, D = models.build("mlp", seed=seed, noise_dim=8, image_shape=(4, 4, 1))
    opt_g, opt_d = optim.Adam(G, lr=lr), optim.Adam(D, lr=lr)
    rng = np.random.default_rng(seed + 10)
    reals = rng.uniform(-1, 1, (batch, 4, 4, 1)).astype(np.float32)
    noise = gan.gaussian_noise(np.random.default_rng(seed + 20), 8)
    return Session(G, D, opt_g, opt_d, kind, lambda: [reals], noise)


def test_call_numbering_in_a_training_step():
    """Who runs how often in one gan.train_step (the module docstring's account)."""
    rec = record_session(tiny_gan(), 2)
    assert rec.steps == [0, 1]
    d_act = rec.table("discriminator", "dense", "activation")
    assert list(d_act["step"]) == [0, 0, 1, 1] and list(d_act["call"]) == [0, 1, 0, 1]
    # D's first layer computes dL/dx only in the generator step: its call 1, as for the
    # other layers (the critic's backward is call 0 everywhere)
    assert list(rec.table("discriminator", "flatten", "grad_input")["call"]) == [1, 1]
    assert len(rec.table("discriminator", "dense", "grad_input")["step"]) == 4
    # G's first layer never computes dL/dz
    assert ("generator", "dense", "grad_input") not in rec.tables
    for m in ("generator", "discriminator"):
        t = rec.table(m, "dense", "params", "kernel", "update")
        assert list(t["step"]) == [0, 1] and list(t["call"]) == [0, 0]
    s, v = rec.scalar("d_fake")
    assert list(s) == [0, 1] and np.all((v > 0) & (v < 1))


# --------------------------------------------------------------------------------------
# the HDF5 file
# --------------------------------------------------------------------------------------


def test_hdf5_layout_and_roundtrip(tmp_path):
    rec = record_session(tiny_gan(), 3, tensors_at={1})
    path = rec.save(tmp_path / "inspect.h5", attrs={"config": {"loss": "bce"}, "loss": "bce"})
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "rawgan-inspect" and f.attrs["format_version"] == 1
        assert json.loads(f.attrs["models"]) == ["generator", "discriminator"]
        assert json.loads(f.attrs["tensors_at"]) == [1]
        assert json.loads(f.attrs["steps"]) == [0, 1, 2]
        assert json.loads(f.attrs["config"]) == {"loss": "bce"} and f.attrs["loss"] == "bce"
        assert set(f["scalars"]) == {"d_loss", "g_loss", "d_real", "d_fake"}
        for g in f["scalars"].values():
            assert list(g["step"][()]) == [0, 1, 2] and g["value"].dtype == np.float64
        for mname, model in (("generator", 0), ("discriminator", 1)):
            mg = f["models"][mname]
            names = json.loads(mg.attrs["layers"])
            built = models.build("mlp", seed=0, noise_dim=8, image_shape=(4, 4, 1))[model]
            assert names == [layer.name for layer in built.layers]
            assert json.loads(mg.attrs["kinds"]) == [layer.kind for layer in built.layers]
            for i, (name, layer) in enumerate(zip(names, built.layers, strict=True)):
                lg = mg[name]
                assert lg.attrs["kind"] == layer.kind and lg.attrs["index"] == i
                act = lg["activation"]
                extra = ({"frac_negative_input"} if layer.kind == "LeakyReLU" else
                         {"frac_saturated"} if layer.kind == "Tanh" else set())
                assert set(act) == {"step", "call", *STATS, *extra}
                assert act["step"].dtype == np.int64 and act["mean"].dtype == np.float64
                assert len({act[c].shape for c in act}) == 1
                if layer.trainable:
                    assert set(lg["params"]) == set(layer.trainable)
                    for key in layer.trainable:
                        assert set(lg["params"][key]["grad"]) == {"step", "call", *STATS}
                        assert set(lg["params"][key]["update"]) == {
                            "step", "call", *STATS, "weight_l2", "ratio"}
                        assert lg["params"][key]["grad"]["l2"].shape == (3,)
                else:
                    assert "params" not in lg
        t = f["tensors"]["1"]
        assert t["generator"]["dense"]["activation"]["0"].shape == (8, 128)
        assert t["discriminator"]["dense"]["activation"]["1"].shape == (8, 128)
        assert t["generator"]["dense"]["params"]["kernel"]["grad"]["0"].shape == (8, 128)
        assert t["generator"]["dense"]["params"]["kernel"]["update"]["0"].shape == (8, 128)
        assert t["discriminator"]["flatten"]["grad_input"]["1"].shape == (8, 4, 4, 1)
        assert set(f["tensors"]) == {"1"}

    back = Recorder.load(path)
    assert back.steps == rec.steps and back.layers == rec.layers
    assert set(back.tables) == set(rec.tables) and set(back.tensors) == set(rec.tensors)
    for p in rec.tables:
        a, c = rec.table(*p), back.table(*p)
        assert a.keys() == c.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], c[k])
    for k in rec.tensors:
        np.testing.assert_array_equal(rec.tensors[k], back.tensors[k])
    assert back.attrs["loss"] == "bce"


# --------------------------------------------------------------------------------------
# off means off
# --------------------------------------------------------------------------------------


def _untouched(s: Session) -> None:
    for model in (s.G, s.D):
        for layer in model.layers:
            assert "forward" not in vars(layer) and "backward" not in vars(layer)
            assert layer.forward.__func__ is type(layer).forward
            assert layer.backward.__func__ is type(layer).backward
    for opt in (s.opt_g, s.opt_d):
        assert "step" not in vars(opt) and opt.step.__func__ is type(opt).step


def test_recorder_off_leaves_methods_untouched():
    s = tiny_gan()
    _untouched(s)
    rec = Recorder({"generator": s.G, "discriminator": s.D}, [s.opt_g, s.opt_d])
    with rec:
        assert all("forward" in vars(layer) and "backward" in vars(layer)
                   for layer in s.G.layers + s.D.layers)
        assert "step" in vars(s.opt_g)
        with pytest.raises(RuntimeError, match="already active"):
            rec.__enter__()
        with Recorder(s.D) as inner:  # nested: each restores what it found
            s.step()
        assert "forward" in vars(s.D.layers[0])
    _untouched(s)
    assert inner.table("discriminator", "dense", "activation")["l2"].size == 2
    with pytest.raises(KeyError, match="boom"), Recorder(s.G):
        raise KeyError("boom")
    _untouched(s)


def test_recording_changes_no_number():
    """Training with the recorder on gives bit-identical losses and weights."""
    plain, watched = tiny_gan(), tiny_gan()
    stats = [plain.step() for _ in range(3)]
    rec = record_session(watched, 3)
    assert [st.d_loss for st in stats] == list(rec.scalar("d_loss")[1])
    assert [st.g_loss for st in stats] == list(rec.scalar("g_loss")[1])
    for a, b in ((plain.G, watched.G), (plain.D, watched.D)):
        for k, v in a.get_weights().items():
            assert np.array_equal(v, b.get_weights()[k])


def test_recorder_rejects_bad_arguments():
    s = tiny_gan()
    with pytest.raises(ValueError, match="belongs to none"):
        Recorder(s.G, [s.opt_d])
    with pytest.raises(TypeError, match="not a Sequential"):
        Recorder({"g": object()})
    with pytest.raises(ValueError, match="two models"):
        Recorder([s.G, s.G])


# --------------------------------------------------------------------------------------
# minimax vs non-saturating bce, on a discriminator that confidently rejects fakes
# --------------------------------------------------------------------------------------


def test_minimax_gradient_vanishes_when_d_rejects_fakes():
    def make(kind):
        s = tiny_gan(kind=kind)
        s.opt_g, s.opt_d = optim.SGD(s.G, lr=1e-3), optim.SGD(s.D, lr=1e-3)
        s.D.layers[-1].params["bias"][...] = -12.0  # D(anything) = sigmoid(~-12) ~ 6e-6
        return s

    res = compare_losses(make, ("minimax", "bce"), steps=2)
    assert res["minimax"].scalar("d_fake")[1][0] < 1e-4
    g_mm = res["minimax"].total_grad_norm("generator")[1][0]
    g_bce = res["bce"].total_grad_norm("generator")[1][0]
    # dL/dlogit: -s(f)/N (minimax) vs -(1 - s(f))/N (bce): ratio ~ exp(-12)
    assert g_bce > 1e-3 and g_mm < 1e-4 * g_bce
    for layer in res["bce"].param_layers("generator"):
        assert (res["minimax"].layer_norms("generator", layer)[2][0]
                < 1e-4 * res["bce"].layer_norms("generator", layer)[2][0])
    text = format_comparison(res)
    assert "minimax / bce" in text and "(all)" in text and "vanishes" in text

    # on an undecided discriminator (D(G(z)) ~ 0.5) the two losses agree at step 0
    fair = compare_losses(lambda k: tiny_gan(kind=k), ("minimax", "bce"), steps=1)
    r = (fair["minimax"].total_grad_norm("generator")[1][0]
         / fair["bce"].total_grad_norm("generator")[1][0])
    assert 0.5 < r < 2
    assert "--d-warmup" in format_comparison(fair)


# --------------------------------------------------------------------------------------
# rawgan inspect
# --------------------------------------------------------------------------------------


def test_inspect_cli_end_to_end(capsys, mnist_dir, tmp_path):
    pytest.importorskip("matplotlib")
    from rawgan.cli import main
    from rawgan.train import train

    common = ["--model", "mlp", "--data-dir", str(mnist_dir), "--split", "test",
              "--no-download", "--num-examples", "256", "--batch-size", "32", "-q"]
    out = tmp_path / "insp"
    code = main(["inspect", *common, "--steps", "3", "--hist-steps", "0,last",
                 "--out", str(out)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "recorded 3 steps" in cap.out and "generator |dL/dW| per layer" in cap.out
    for name in ("inspect.h5", "grad_norms.png", "d_outputs.png", "activations_step_0000.png",
                 "activations_step_0002.png"):
        assert (out / name).stat().st_size > 1000, name
    with h5py.File(out / "inspect.h5", "r") as f:
        assert json.loads(f.attrs["config"])["model"] == "mlp"
        assert json.loads(f.attrs["tensors_at"]) == [0, 2]
        assert f["models/generator/dense/params/kernel/grad/l2"].shape == (3,)

    # from a checkpoint, comparing the two generator losses
    run = tmp_path / "run"
    train(model="mlp", data_dir=str(mnist_dir), split="test", download=False,
          num_examples=128, batch_size=32, epochs=1, progress=False, out=str(run))
    code = main(["inspect", "--from", str(run / "checkpoint.h5"), "--steps", "2",
                 "--compare-losses", "minimax,bce", "--d-warmup", "2", "-q",
                 "--out", str(tmp_path / "cmp")])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "minimax / bce" in cap.out
    for name in ("inspect_minimax.h5", "inspect_bce.h5", "compare_losses.png"):
        assert (tmp_path / "cmp" / name).is_file()
    with h5py.File(tmp_path / "cmp" / "inspect_minimax.h5", "r") as f:
        assert f.attrs["loss"] == "minimax" and f.attrs["d_warmup"] == 2
        assert f.attrs["checkpoint"].endswith("checkpoint.h5")


@pytest.mark.parametrize("argv, message", [
    (["--compare-losses", "bce"], "two or more different losses"),
    (["--compare-losses", "bce,gan"], "two or more different losses"),
    (["--hist-steps", "0,x"], "not a step number"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "3", "--hist-steps", "0,7"], "step(s) 7 outside the 3 recorded steps"),
    (["--steps", "3", "--hist-steps", "-4"], "step(s) -4 outside"),
    (["--d-warmup", "5"], "give --compare-losses too"),
])
def test_inspect_usage_errors(capsys, argv, message):
    from rawgan.cli import main

    assert main(["inspect", *argv]) == 2
    assert message in capsys.readouterr().err


def test_inspect_missing_checkpoint(capsys, tmp_path):
    from rawgan.cli import main

    assert main(["inspect", "--from", str(tmp_path / "none.h5")]) == 1
    assert "rawgan inspect: error" in capsys.readouterr().err
