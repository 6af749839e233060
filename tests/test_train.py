"""Tests for rawgan.train: learning on real MNIST, exact reproducibility and resume, outputs,
and every fault (NaN, Ctrl-C, another run in the folder, bad checkpoint) a clear error with
nothing already saved lost."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from rawgan import checkpoint, gan, metrics
from rawgan import train as train_module
from rawgan.checkpoint import CheckpointError
from rawgan.train import (
    RunDirError,
    TrainConfig,
    TrainingDiverged,
    read_metrics,
    train,
)

# tiny evaluations (a few hundred samples) warn that their estimates are noisy, as they are
pytestmark = pytest.mark.filterwarnings("ignore::rawgan.metrics.SampleSizeWarning")

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")


def mnist_cfg(mnist_dir, out, **kw) -> TrainConfig:
    """A small, fast run on the real MNIST test split."""
    base = {"model": "mlp", "data": "mnist", "data_dir": str(mnist_dir), "split": "test",
            "download": False, "num_examples": 512, "batch_size": 64, "epochs": 2,
            "progress": False, "out": str(out)}
    return TrainConfig(**{**base, **kw})


def toy_cfg(out, **kw) -> TrainConfig:
    """A run of a few steps on the ring toy data (no data files needed)."""
    base = {"model": "mlp", "data": "ring", "num_examples": 256, "batch_size": 64,
            "epochs": 1, "progress": False, "out": str(out)}
    return TrainConfig(**{**base, **kw})


def losses_of(out) -> list[tuple[float, float, float, float]]:
    return [(r["d_loss"], r["g_loss"], r["d_real"], r["d_fake"])
            for r in read_metrics(Path(out) / "metrics.jsonl") if "d_loss" in r]


def evals_of(out) -> list[dict]:
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if "eval" in r]


def digest(folder) -> dict[str, str]:
    """sha256 of every file under ``folder`` (to show nothing on disk changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def final_weights(out) -> dict[str, dict[str, np.ndarray]]:
    return checkpoint.load_checkpoint(Path(out) / "checkpoint.h5").weights


def assert_same_weights(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert a[name][k].tobytes() == b[name][k].tobytes(), (name, k)


# --------------------------------------------------------------------------------------
# Learning on real MNIST
# --------------------------------------------------------------------------------------


def test_dcgan_learns_on_mnist(mnist_dir, tmp_path):
    """24 DCGAN steps (batch 16, seeded): D's loss falls from ~1.4 (chance) to ~0.95 as it
    learns to tell digits from the generator's noise; every output file appears."""
    out = tmp_path / "dcgan"
    s = train(mnist_cfg(mnist_dir, out, model="dcgan", num_examples=256, batch_size=16,
                        max_steps=24))
    assert s["steps"] == 24 and s["stopped"] == "max_steps" and s["epochs_completed"] == 1
    d = np.array([r[0] for r in losses_of(out)])
    assert len(d) == 24 and np.isfinite(d).all()
    assert d[:6].mean() > d[-6:].mean() + 0.1, d
    # outputs: epoch grid, final grid, metrics, curve, checkpoint, export, summary
    grid = PIL.open(out / "samples" / "epoch_0001.png")
    assert grid.size == (8 * 28 + 9 * 2, 8 * 28 + 9 * 2) and grid.mode == "L"
    assert (out / "samples" / "step_00000024.png").is_file()
    assert (out / "losses.png").stat().st_size > 1000
    rec = read_metrics(out / "metrics.jsonl")[0]
    assert set(rec) == {"step", "epoch", "d_loss", "g_loss", "d_real", "d_fake",
                        "images_per_s"}
    assert json.loads((out / "summary.json").read_text())["steps"] == 24
    ck = checkpoint.load_checkpoint(out / "checkpoint.h5")
    assert ck.meta["step"] == 24 and ck.config["model"] == "dcgan"
    gen = checkpoint.load_generator(out / "generator.h5")
    assert gen.sample(2, seed=0).shape == (2, 28, 28, 1)


def test_mlp_learns_on_mnist(mnist_dir, tmp_path):
    """16 MLP GAN steps: D's loss falls from ~1.7 to ~1.1-1.2 (it later rises again as the
    generator catches up, so only the early steps are compared)."""
    out = tmp_path / "mlp"
    s = train(mnist_cfg(mnist_dir, out, epochs=2))
    assert s["steps"] == 16 and s["stopped"] == "completed"
    d = np.array([r[0] for r in losses_of(out)])
    assert d[:4].mean() > d[-8:].mean() + 0.1, d
    assert len(list((out / "samples").glob("epoch_*.png"))) == 2


def test_same_seed_same_losses(mnist_dir, tmp_path):
    train(mnist_cfg(mnist_dir, tmp_path / "a", epochs=1))
    train(mnist_cfg(mnist_dir, tmp_path / "b", epochs=1))
    train(mnist_cfg(mnist_dir, tmp_path / "c", epochs=1, seed=1))
    assert losses_of(tmp_path / "a") == losses_of(tmp_path / "b")
    assert losses_of(tmp_path / "a") != losses_of(tmp_path / "c")


# --------------------------------------------------------------------------------------
# Resume == uninterrupted, exactly
# --------------------------------------------------------------------------------------


def test_resume_at_epoch_boundary_is_exact(mnist_dir, tmp_path):
    """Also with evaluation on: it changes no training number (the run without it takes the
    same steps), and the resumed run logs the same scores as the uninterrupted one."""
    full, split, full_eval = tmp_path / "full", tmp_path / "split", tmp_path / "full_eval"
    ev = {"eval_every": 1, "eval_samples": 100}
    train(mnist_cfg(mnist_dir, full, epochs=2))
    first = train(mnist_cfg(mnist_dir, split, epochs=1, **ev))
    assert first["steps"] == 8
    second = train(mnist_cfg(mnist_dir, split, epochs=2, **ev), resume=True)
    assert second["resumed_from_step"] == 8 and second["steps"] == 16
    assert losses_of(split) == losses_of(full)
    assert [r["step"] for r in read_metrics(split / "metrics.jsonl")] == (
        list(range(1, 9)) + [8] + list(range(9, 17)) + [16])
    assert_same_weights(final_weights(split), final_weights(full))
    train(mnist_cfg(mnist_dir, full_eval, epochs=2, **ev))
    assert losses_of(full_eval) == losses_of(full)
    assert evals_of(split) == [{**r, "eval_seconds": evals_of(split)[i]["eval_seconds"]}
                               for i, r in enumerate(evals_of(full_eval))]
    assert [r["epoch"] for r in evals_of(split)] == [1, 2]


def test_resume_mid_epoch_dcgan_with_ema_is_exact(mnist_dir, tmp_path):
    """DCGAN (BatchNorm moving statistics, Dropout masks from each layer's RNG) with a
    generator EMA, stopped mid-epoch by max_steps, then resumed; evaluation on in the first
    part only (it is a run-length option, so the resume accepts the change)."""
    kw = {"model": "dcgan", "num_examples": 64, "batch_size": 16, "ema": 0.9}
    full, split = tmp_path / "full", tmp_path / "split"
    train(mnist_cfg(mnist_dir, full, **kw))
    train(mnist_cfg(mnist_dir, split, max_steps=6, eval_every=1, eval_samples=16, **kw))
    assert checkpoint.load_checkpoint(split / "checkpoint.h5").meta["batch_in_epoch"] == 2
    assert [r["step"] for r in evals_of(split)] == [4]  # the EMA generator, after epoch 1
    train(mnist_cfg(mnist_dir, split, **kw), resume=True)
    assert losses_of(split) == losses_of(full) and len(losses_of(full)) == 8
    a, b = final_weights(split), final_weights(full)
    assert_same_weights(a, b)
    assert set(a) == {"generator", "discriminator", "ema_generator"}
    # the export and the samples come from the EMA generator, which differs from G
    ema = checkpoint.load_generator(full / "generator.h5")
    assert not np.array_equal(a["ema_generator"]["dense/kernel"], a["generator"]["dense/kernel"])
    assert np.array_equal(ema.G.get_weights()["dense/kernel"], a["ema_generator"]["dense/kernel"])


def test_ctrl_c_saves_then_resume_is_exact(mnist_dir, tmp_path, monkeypatch):
    full, split = tmp_path / "full", tmp_path / "split"
    train(mnist_cfg(mnist_dir, full))
    real_step = gan.train_step
    calls = {"n": 0}

    def step_then_ctrl_c(*args, **kw):
        calls["n"] += 1
        stats = real_step(*args, **kw)
        if calls["n"] == 5:  # Ctrl-C arrives in the middle of step 5
            os.kill(os.getpid(), signal.SIGINT)
        return stats

    monkeypatch.setattr(gan, "train_step", step_then_ctrl_c)
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(mnist_cfg(mnist_dir, split))
    assert signal.getsignal(signal.SIGINT) is previous  # handler put back
    ck = checkpoint.load_checkpoint(split / "checkpoint.h5")
    assert ck.meta["step"] == 5  # step 5 was finished, then saved
    monkeypatch.setattr(gan, "train_step", real_step)
    train(mnist_cfg(mnist_dir, split), resume=True)
    assert losses_of(split) == losses_of(full)
    assert_same_weights(final_weights(split), final_weights(full))


def test_ctrl_c_during_the_last_step_completes_the_run(tmp_path, monkeypatch):
    """The step finishes, and it was the last: a completed run (summary, final grid), not
    an interruption the user must --resume to finish."""
    real_step = gan.train_step
    calls = {"n": 0}

    def last_step_then_ctrl_c(*args, **kw):
        calls["n"] += 1
        stats = real_step(*args, **kw)
        if calls["n"] == 4:  # 256 / 64 = 4 steps in all
            os.kill(os.getpid(), signal.SIGINT)
        return stats

    monkeypatch.setattr(gan, "train_step", last_step_then_ctrl_c)
    out = tmp_path / "run"
    summary = train(toy_cfg(out, epochs=1))
    assert calls["n"] == 4 and summary["stopped"] == "completed" and summary["steps"] == 4
    assert (out / "summary.json").is_file()


def test_abort_inside_a_step_keeps_last_checkpoint(mnist_dir, tmp_path, monkeypatch):
    """A KeyboardInterrupt raised INSIDE a step (a second Ctrl-C) cannot save a consistent
    state: the last checkpoint is left exactly as it was."""
    out = tmp_path / "run"
    train(mnist_cfg(mnist_dir, out, epochs=1))
    before = digest(out)["checkpoint.h5"]

    def abort(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(gan, "train_step", abort)
    with pytest.raises(KeyboardInterrupt):
        train(mnist_cfg(mnist_dir, out, epochs=2), resume=True)
    assert digest(out)["checkpoint.h5"] == before


# --------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(mnist_dir, tmp_path,
                                                                 monkeypatch):
    out = tmp_path / "run"
    real_step = gan.train_step
    seen = {"n": 0, "ck": None}

    def nan_at_12(*args, **kw):
        seen["n"] += 1
        stats = real_step(*args, **kw)
        if seen["n"] == 12:
            seen["ck"] = digest(out)["checkpoint.h5"]  # saved after epoch 1 (step 8)
            stats.d_loss = float("nan")
        return stats

    monkeypatch.setattr(gan, "train_step", nan_at_12)
    with pytest.raises(TrainingDiverged, match=r"step 12 \(epoch 2\).*step 8\), is kept") as e:
        train(mnist_cfg(mnist_dir, out, epochs=3, save_every=1))
    assert e.value.step == 12
    assert digest(out)["checkpoint.h5"] == seen["ck"]
    assert checkpoint.load_checkpoint(out / "checkpoint.h5").meta["step"] == 8
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 12))
    # the run can be resumed from the last good checkpoint (here the NaN was fake)
    monkeypatch.setattr(gan, "train_step", real_step)
    s = train(mnist_cfg(mnist_dir, out, epochs=3, save_every=1), resume=True)
    assert s["resumed_from_step"] == 8 and s["steps"] == 24


def test_inf_before_any_checkpoint(mnist_dir, tmp_path, monkeypatch):
    real_step = gan.train_step

    def inf_step(*args, **kw):
        stats = real_step(*args, **kw)
        stats.g_loss = float("inf")
        return stats

    monkeypatch.setattr(gan, "train_step", inf_step)
    with pytest.raises(TrainingDiverged, match="step 1 .*no checkpoint had been saved"):
        train(mnist_cfg(mnist_dir, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoint.h5").exists()


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_a_real_divergence_is_training_diverged(mnist_dir, tmp_path):
    """Weights that overflow for real (no patched losses): D's NaN logits in the next pass
    are reported as divergence at that step, not as a bare ValueError of the loss."""
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"step 1 \(epoch 1\): fake_logits contains "
                                               r"NaN.*no checkpoint had been saved") as e:
        train(mnist_cfg(mnist_dir, out, optimizer="sgd", lr_d=1e30))
    assert e.value.step == 1
    assert not (out / "checkpoint.h5").exists() and not (out / "generator.h5").exists()


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_weights_that_overflow_with_finite_losses_are_never_saved(mnist_dir, tmp_path,
                                                                   monkeypatch):
    """The last generator update of epoch 2 leaves an inf in G while its step's losses were
    finite: the epoch's end (sample grid, checkpoint; the export) stops with TrainingDiverged
    instead of writing inf weights; epoch 1's checkpoint stays."""
    out = tmp_path / "run"
    real_step = gan.train_step
    seen = {"n": 0, "files": None}

    def overflow_at_16(G, *args, **kw):
        seen["n"] += 1
        stats = real_step(G, *args, **kw)
        if seen["n"] == 16:  # the last step of epoch 2 (8 steps per epoch)
            seen["files"] = digest(out)
            G.layers[0].params["kernel"][0, 0] = np.inf
        return stats

    monkeypatch.setattr(gan, "train_step", overflow_at_16)
    with pytest.raises(TrainingDiverged, match=r"step 16 \(epoch 2\): the generator weights "
                                               r"hold NaN or inf.*step 8\), is kept") as e:
        train(mnist_cfg(mnist_dir, out, epochs=3, save_every=1))
    assert e.value.step == 16
    after = digest(out)
    assert after["checkpoint.h5"] == seen["files"]["checkpoint.h5"]  # epoch 1's
    assert "generator.h5" not in after and "samples/epoch_0002.png" not in after
    assert "samples/epoch_0001.png" in after


def test_out_dir_holding_another_run(mnist_dir, tmp_path):
    out = tmp_path / "run"
    train(mnist_cfg(mnist_dir, out, epochs=1))
    before = digest(out)
    with pytest.raises(RunDirError, match=r"different run.*lr_g: 0\.0001 -> 0\.0002"):
        train(mnist_cfg(mnist_dir, out, epochs=1, lr_g=2e-4))
    with pytest.raises(RunDirError, match="different run.*model: 'mlp' -> 'dcgan'"):
        train(mnist_cfg(mnist_dir, out, epochs=1, model="dcgan"), resume=True)
    with pytest.raises(RunDirError, match="already holds this run.*--resume"):
        train(mnist_cfg(mnist_dir, out, epochs=1))
    assert digest(out) == before


def test_resume_with_another_training_set_is_refused(tmp_path):
    """The data folder may change between a run and its resumption (another mount, say),
    its content may not: a checkpoint's steps per epoch that the data found now does not
    give is an error naming both, before anything is written."""
    def idx(arr: np.ndarray) -> bytes:
        return bytes([0, 0, 0x08, arr.ndim]) + b"".join(
            int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()

    rng = np.random.default_rng(0)
    for name, n in (("a", 640), ("b", 576)):  # 10 and 9 steps of 64
        d = tmp_path / name
        d.mkdir()
        (d / "t10k-images-idx3-ubyte").write_bytes(idx(rng.integers(0, 256, (n, 28, 28),
                                                                    dtype=np.uint8)))
        (d / "t10k-labels-idx1-ubyte").write_bytes(idx(rng.integers(0, 10, n, dtype=np.uint8)))
    out = tmp_path / "run"
    cfg = {"model": "mlp", "split": "test", "download": False, "batch_size": 64,
           "progress": False, "out": str(out)}
    train(TrainConfig(**cfg, data_dir=str(tmp_path / "a"), epochs=1))
    before = digest(out)
    with pytest.raises(RunDirError, match="10 steps per epoch, the data found now gives 9"):
        train(TrainConfig(**cfg, data_dir=str(tmp_path / "b"), epochs=2), resume=True)
    assert digest(out) == before
    s = train(TrainConfig(**cfg, data_dir=str(tmp_path / "a"), epochs=2), resume=True)
    assert s["steps"] == 20


def test_resume_on_other_data_of_the_same_size_is_refused(tmp_path):
    """Same number of examples, other content (Fashion files where MNIST was): the
    checkpoint's data SHA-256 names it, before anything is written."""
    def idx(arr: np.ndarray) -> bytes:
        return bytes([0, 0, 0x08, arr.ndim]) + b"".join(
            int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()

    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        (d / "t10k-images-idx3-ubyte").write_bytes(idx(rng.integers(0, 256, (128, 28, 28),
                                                                    dtype=np.uint8)))
        (d / "t10k-labels-idx1-ubyte").write_bytes(idx(rng.integers(0, 10, 128,
                                                                    dtype=np.uint8)))
    out = tmp_path / "run"
    cfg = {"model": "mlp", "split": "test", "download": False, "batch_size": 64,
           "progress": False, "out": str(out)}
    train(TrainConfig(**cfg, data_dir=str(tmp_path / "a"), epochs=1))
    assert len(checkpoint.load_checkpoint(out / "checkpoint.h5").meta["data_sha256"]) == 64
    before = digest(out)
    with pytest.raises(RunDirError, match="saved training on other data: the 128 examples"):
        train(TrainConfig(**cfg, data_dir=str(tmp_path / "b"), epochs=2), resume=True)
    assert digest(out) == before


def test_resume_without_the_checkpoint_of_a_finished_run_is_refused(tmp_path):
    """checkpoint.h5 deleted, generator.h5 still there: starting over would overwrite it."""
    out = tmp_path / "run"
    cfg = toy_cfg(out, epochs=1)
    train(cfg)
    (out / "checkpoint.h5").unlink()
    before = digest(out)
    with pytest.raises(RunDirError, match="got further.*no checkpoint.h5.*Put the checkpoint"):
        train(cfg, resume=True)
    assert digest(out) == before


def test_a_config_json_that_is_not_an_object(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("[1, 2]\n")
    with pytest.raises(RunDirError, match="holds a JSON list, not the object"):
        train(toy_cfg(out, epochs=1), resume=True)


def test_resume_with_nothing_left_to_do_keeps_the_summary(tmp_path):
    out = tmp_path / "run"
    cfg = toy_cfg(out, epochs=1)
    first = train(cfg)
    samples = sorted(p.name for p in (out / "samples").iterdir())
    again = train(cfg, resume=True)
    assert again == first and again["d_loss"] is not None
    assert json.loads((out / "summary.json").read_text()) == first
    assert sorted(p.name for p in (out / "samples").iterdir()) == samples


def test_switching_cuda_graph_on_resume_is_a_different_run():
    """The graphed step draws other random numbers: not a run-length option (backend is)."""
    a = toy_cfg("x").to_dict()
    assert train_module.config_differences(a, {**a, "cuda_graph": True}) == [
        "cuda_graph: False -> True"]
    assert train_module.config_differences(a, {**a, "backend": "cupy", "epochs": 9}) == []


def test_temporaries_of_a_killed_save_are_removed(tmp_path):
    out = tmp_path / "run"
    train(toy_cfg(out, epochs=1))
    dead = out / ".checkpoint.h5.999999999.0123abcd.tmp"  # no such pid
    dead.write_bytes(b"half a checkpoint")
    live = out / f".checkpoint.h5.{os.getpid()}.0123abcd.tmp"  # its writer still runs
    live.write_bytes(b"being written")
    for p in (dead, live):
        os.utime(p, (0, 0))
    train(toy_cfg(out, epochs=2), resume=True)
    assert not dead.exists() and live.exists()


def test_resume_from_a_truncated_checkpoint(mnist_dir, tmp_path):
    out = tmp_path / "run"
    train(mnist_cfg(mnist_dir, out, epochs=1))
    ck = out / "checkpoint.h5"
    ck.write_bytes(ck.read_bytes()[:5000])
    before = digest(out)
    with pytest.raises(CheckpointError, match="checkpoint.h5"):
        train(mnist_cfg(mnist_dir, out, epochs=2), resume=True)
    assert digest(out) == before


def test_resume_with_another_models_checkpoint(mnist_dir, tmp_path):
    """A checkpoint copied in from another model's run is refused before anything changes."""
    mlp, dc = tmp_path / "mlp", tmp_path / "dc"
    train(mnist_cfg(mnist_dir, mlp, epochs=1))
    train(mnist_cfg(mnist_dir, dc, model="dcgan", num_examples=32, batch_size=16, epochs=1))
    shutil.copy(mlp / "checkpoint.h5", dc / "checkpoint.h5")
    before = digest(dc)
    with pytest.raises(RunDirError, match="model: 'mlp' -> 'dcgan'"):
        train(mnist_cfg(mnist_dir, dc, model="dcgan", num_examples=32, batch_size=16),
              resume=True)
    assert digest(dc) == before


def test_resume_empty_folder_starts_a_new_run(mnist_dir, tmp_path):
    s = train(mnist_cfg(mnist_dir, tmp_path / "new", epochs=1), resume=True)
    assert s["resumed_from_step"] == 0 and s["steps"] == 8


# --------------------------------------------------------------------------------------
# Evaluation during training
# --------------------------------------------------------------------------------------


def test_eval_every_logs_image_scores(mnist_dir, tmp_path):
    out = tmp_path / "run"
    s = train(mnist_cfg(mnist_dir, out, epochs=2, eval_every=2, eval_samples=120))
    evals = evals_of(out)
    assert [(r["step"], r["epoch"]) for r in evals] == [(16, 2)]  # epoch 2, not 1
    scores = evals[0]["eval"]
    assert set(scores) == {"fld", "kid", "kid_std", "score", "score_std", "n", "n_reference"}
    assert scores["n"] == 120 and scores["n_reference"] == 256
    assert scores["fld"] > 0 and 1 <= scores["score"] <= 10
    assert s["eval"] == scores and s["eval_history"] == evals
    assert json.loads((out / "summary.json").read_text())["eval"] == scores
    assert (out / "losses.png").is_file()  # the eval records do not upset the loss plot
    # the scores are rawgan.metrics' for the final generator, with seed = the run's seed,
    # against the run's training images
    from rawgan.data import load_mnist

    real = load_mnist("test", data_dir=mnist_dir, download=False)[0][:512]
    ref = metrics.evaluate_generator(checkpoint.load_generator(out / "generator.h5"), real,
                                     n=120, seed=0, references=False)["generator"]
    assert scores == {**ref, "n_reference": 256}


def test_eval_every_toy_agrees_with_rawgan_eval(tmp_path):
    """The toy evaluation in the log is metrics.mode_metrics of the same samples that
    `rawgan eval` (evaluate_checkpoint) draws with the run's seed: one rule, one number."""
    out = tmp_path / "ring"
    cfg = TrainConfig(model="mlp", data="ring", noise_dim=2, lr_g=1e-3, lr_d=1e-3,
                      batch_size=128, num_examples=1280, epochs=2, eval_every=1,
                      eval_samples=800, seed=3, progress=False, out=str(out))
    s = train(cfg)
    last = evals_of(out)[-1]
    assert last["step"] == s["steps"] == 20 and last["eval"]["n_samples"] == 800
    assert last["eval"]["min_count"] == 1 and last["eval"]["n_modes"] == 8
    ref = metrics.evaluate_checkpoint(out / "generator.h5", n=800, seed=3)["generator"]
    for k in ("modes_covered", "per_mode", "high_quality"):
        assert last["eval"][k] == ref[k], k


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown key 'lr' .*known keys"):
        TrainConfig.from_dict({"lr": 1e-3})
    with pytest.raises(ValueError, match="did you mean 'batch_size'"):
        TrainConfig.from_dict({"batchsize": 3})
    with pytest.raises(ValueError, match="loss: 'gan' is not one of"):
        TrainConfig(loss="gan")
    with pytest.raises(ValueError, match="use model 'mlp'"):
        TrainConfig(data="ring")
    with pytest.raises(ValueError, match="batch_size: expected int"):
        TrainConfig(batch_size=32.5)
    with pytest.raises(ValueError, match="ema must be a decay"):
        TrainConfig(ema=1.5)
    with pytest.raises(ValueError, match="lr_g must be a positive"):
        TrainConfig(lr_g=0)
    with pytest.raises(ValueError, match="eval_every must be >= 0"):
        TrainConfig(eval_every=-1)
    with pytest.raises(ValueError, match="eval_samples must be >= 2"):
        TrainConfig(eval_samples=1)
    with pytest.raises(ValueError, match="MNIST classifier"):
        TrainConfig(data="fashion", eval_every=1)


@pytest.mark.parametrize("kw, message", [
    ({"loss": "wgan", "beta_1": 0.5}, r"beta_1 0\.5 \(Adam's\): no effect with optimizer "
                                      r"'rmsprop' \(loss 'wgan'\)"),
    ({"optimizer": "rmsprop", "beta_2": 0.99}, r"beta_2 0\.99 \(Adam's\)"),
    ({"momentum": 0.9}, r"momentum 0\.9 \(SGD's\): no effect with optimizer 'adam'"),
    ({"model": "mlp", "data": "ring", "grid_size": 16}, r"grid_size 16: no effect with data "
                                                        r"'ring'"),
    ({"model": "mlp", "data": "grid", "split": "test"}, r"split 'test': no effect"),
    ({"model": "mlp", "data": "ring", "data_dir": "/x"}, r"data_dir '/x': no effect"),
])
def test_options_that_would_be_ignored_are_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


def test_options_that_apply_are_accepted():
    TrainConfig(optimizer="sgd", momentum=0.9)
    TrainConfig(beta_1=0.5, beta_2=0.99)
    TrainConfig(distributed=True, sync_batchnorm=True, collective_timeout=5.0)
    TrainConfig(sync_batchnorm=True)  # a distributed run resumed on one process
    TrainConfig(loss="wgan", beta_1=0.9)  # the default value: nothing to ignore


def test_loss_family_defaults():
    w = TrainConfig(loss="wgan")
    assert (w.optimizer, w.lr_g, w.lr_d, w.d_steps, w.clip_value) == ("rmsprop", 5e-5, 5e-5,
                                                                      5, 0.01)
    b = TrainConfig()
    assert (b.optimizer, b.lr_g, b.d_steps, b.clip_value, b.batch_size, b.noise_dim) == (
        "adam", 1e-4, 1, 0.0, 256, 100)
    assert TrainConfig(loss="wgan", lr_g=1e-4, d_steps=2).lr_g == 1e-4
    assert TrainConfig.from_dict(TrainConfig(loss="wgan").to_dict()) == w
    # replacing the loss fills in the new family's defaults for the fields left unset
    assert TrainConfig().replace(loss="wgan") == w
    assert TrainConfig(loss="wgan").replace(loss="bce") == b
    mixed = TrainConfig(lr_g=3e-4).replace(loss="wgan")
    assert (mixed.lr_g, mixed.lr_d, mixed.optimizer) == (3e-4, 5e-5, "rmsprop")
    assert TrainConfig(loss="wgan").replace(epochs=3) == TrainConfig(loss="wgan", epochs=3)


def test_train_overrides_re_resolve_the_loss_defaults(mnist_dir, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(train_module, "_train", lambda cfg, resume, comm: seen.setdefault(
        "cfg", cfg))
    train(TrainConfig(), loss="wgan")
    assert seen["cfg"] == TrainConfig(loss="wgan")


def test_batch_larger_than_data(mnist_dir, tmp_path):
    with pytest.raises(ValueError, match="no full step fits"):
        train(mnist_cfg(mnist_dir, tmp_path / "r", num_examples=64, batch_size=64, d_steps=2))


def test_wgan_clips_the_critic(mnist_dir, tmp_path):
    out = tmp_path / "w"
    s = train(mnist_cfg(mnist_dir, out, loss="wgan", epochs=1))
    assert s["steps"] == 512 // (64 * 5)
    d = final_weights(out)["discriminator"]
    assert max(float(np.abs(v).max()) for v in d.values()) <= 0.01


# --------------------------------------------------------------------------------------
# Toy data: mode coverage
# --------------------------------------------------------------------------------------

# Measured (seed 0, NumPy backend; the rule of rawgan.metrics.mode_metrics: a mode counts
# when >= 1 of the 2,500 fixed samples lies within 3 std = 0.06 of its centre): the EMA
# generator covers 0/8 modes at step 100 and 4-8/8 from step 200 on, but with stray samples
# of a still diffuse generator (0.3-3% high quality until step 1,600); from step 1,800 the
# samples gather on the modes: 8/8 with 25-28% high quality at steps 2,200-2,500.
RING = {"model": "mlp", "data": "ring", "noise_dim": 2, "lr_g": 1e-3, "lr_d": 1e-3,
        "beta_1": 0.5, "batch_size": 128, "num_examples": 12800, "ema": 0.99,
        "epochs": 25, "sample_every": 5, "progress": False}


def test_ring_covers_modes(tmp_path):
    s = train(TrainConfig(**RING, out=str(tmp_path / "ring")))
    assert s["steps"] == 2500 and s["n_modes"] == 8
    assert s["modes_covered"] >= 4, s["per_mode"]
    assert s["high_quality"] > 0.1
    assert (tmp_path / "ring" / "samples" / "epoch_0025.png").is_file()
    gen = checkpoint.load_generator(tmp_path / "ring" / "generator.h5")
    pts = gen.sample(100, seed=0)
    assert pts.shape == (100, 2) and 1.0 < np.median(np.linalg.norm(pts, axis=1)) < 3.0


def test_sigterm_saves_like_ctrl_c(tmp_path, monkeypatch):
    """kill / timeout / a scheduler send SIGTERM: the step finishes, the run is saved."""
    real_step = gan.train_step
    calls = {"n": 0}

    def step_then_sigterm(*args, **kw):
        calls["n"] += 1
        stats = real_step(*args, **kw)
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return stats

    monkeypatch.setattr(gan, "train_step", step_then_sigterm)
    previous = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(toy_cfg(out, epochs=2))
    assert signal.getsignal(signal.SIGTERM) is previous
    assert checkpoint.load_checkpoint(out / "checkpoint.h5").meta["step"] == 2


# --------------------------------------------------------------------------------------
# what mutation testing found unpinned: resume with k > 1, the EMA, defaults
# --------------------------------------------------------------------------------------


def test_resume_mid_epoch_with_several_critic_steps_is_exact(tmp_path):
    """d_steps = 2: each step takes two batches, so a mid-epoch resume skips 2 x the steps
    done in the epoch (WGAN's default is 5)."""
    cfg = {"num_examples": 512, "d_steps": 2, "epochs": 2}  # 8 batches: 4 steps an epoch
    full, split = tmp_path / "full", tmp_path / "split"
    train(toy_cfg(full, **cfg))
    train(toy_cfg(split, **cfg, max_steps=2))
    train(toy_cfg(split, **cfg), resume=True)
    assert len(losses_of(full)) == 8
    assert losses_of(split) == losses_of(full)


def test_ema_update_is_the_exponential_average_of_every_weight():
    """ema <- decay * ema + (1 - decay) * p, the batch norm's moving statistics included."""
    from rawgan import models

    G = models.build("dcgan", seed=0, dtype=np.float64)[0]
    E = models.build("dcgan", seed=1, dtype=np.float64)[0]
    for layer in G.layers:  # moving statistics away from their initial 0 / 1
        for k in layer.params:
            layer.params[k] += 0.5
    e0, p = E.get_weights(), G.get_weights()
    train_module._ema_update(E, G, 0.9)
    for k, v in E.get_weights().items():
        np.testing.assert_allclose(v, 0.9 * e0[k] + 0.1 * p[k], rtol=1e-12, atol=1e-12,
                                   err_msg=k)
    assert any("moving_mean" in k for k in e0)


def test_the_ema_generator_starts_as_the_generator_for_any_seed():
    run = train_module.setup_run(toy_cfg("unused", seed=1, ema=0.9))
    g, e = run.G.get_weights(), run.ema_G.get_weights()
    assert g.keys() == e.keys() and all(np.array_equal(g[k], e[k]) for k in g)


def test_load_generator_of_a_training_checkpoint_takes_the_ema_generator(tmp_path):
    out = tmp_path / "run"
    train(toy_cfg(out, ema=0.5))
    ck = checkpoint.load_checkpoint(out / "checkpoint.h5")
    ema = ck.weights["ema_generator"]
    assert not np.array_equal(ema["dense/kernel"], ck.weights["generator"]["dense/kernel"])
    got = checkpoint.load_generator(out / "checkpoint.h5").G.get_weights()
    assert all(np.array_equal(got[k], ema[k]) for k in ema)


def test_replace_with_another_loss_resets_the_old_optimizers_options():
    """TrainConfig(beta_1=0.5).replace(loss="wgan") is RMSprop, whose config must not keep
    Adam's beta_1 (rawgan inspect --compare-losses bce,wgan --beta-1 0.5 replaces so)."""
    c = TrainConfig(beta_1=0.5).replace(loss="wgan")
    assert (c.optimizer, c.beta_1) == ("rmsprop", 0.9)
    assert TrainConfig(beta_1=0.5).replace(loss="hinge").beta_1 == 0.5  # still Adam
    assert TrainConfig(beta_1=0.5, optimizer="adam").replace(loss="wgan").beta_1 == 0.5
