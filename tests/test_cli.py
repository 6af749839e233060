"""Tests for the ``rawgan`` command line: help with defaults, TOML configs, usage errors
(exit 2), run-time errors (exit 1), ``rawgan sample`` and the gradcheck hand-off."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

import rawgan
from rawgan import checkpoint, models
from rawgan.cli import main
from rawgan.train import TrainConfig

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def small_args(mnist_dir, out) -> list[str]:
    return ["train", "--model", "mlp", "--data-dir", str(mnist_dir), "--split", "test",
            "--no-download", "--num-examples", "256", "--batch-size", "64", "--epochs", "1",
            "--quiet", "--out", str(out)]


# --------------------------------------------------------------------------------------
# Help and parsing
# --------------------------------------------------------------------------------------


def test_train_help_lists_every_option_with_its_default(capsys):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0
    flat = " ".join(out.split())  # undo argparse's line wrapping
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in flat, flag
    for flag in ("--config", "--resume", "--epochs", "--max-steps", "--backend", "--out"):
        assert flag in flat
    assert flat.count("(default:") >= len(dataclasses.fields(TrainConfig)) + 2
    for text in ("(default: dcgan)", "(default: mnist)", "(default: bce)", "(default: 256)",
                 "(default: 100)", "(default: 1e-4; 5e-5 for --loss wgan)", "(default: 10)",
                 "(default: 0.9)", "(default: numpy)", "(default: 1; 5 for --loss wgan)"):
        assert text in flat, text


def test_top_level_help_and_version(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("train", "sample", "eval", "inspect", "gradcheck"):
        assert f"    {command}" in out, command
    code, out, _ = run(capsys, "--version")
    assert code == 0 and rawgan.__version__ in out


@pytest.mark.parametrize("argv, message", [
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--loss", "gan"], "invalid choice: 'gan'"),
    (["train", "--batch-size", "many"], "invalid int value"),
    (["train", "--lr-g", "-1"], "lr_g must be a positive number"),
    (["train", "--model", "dcgan", "--data", "ring"], "use model 'mlp'"),
    (["frobnicate"], "invalid choice"),
    (["sample"], "required"),
    ([], "required"),
])
def test_usage_errors_exit_2(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err


def test_config_file_and_flag_override(capsys, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "mlp"\nlr_g = 2e-4\nbatch-size = 32\nema = 0.999\nloss = "wgan"\n')
    code, out, _ = run(capsys, "train", "--config", str(cfg), "--batch-size", "16",
                       "--print-config")
    assert code == 0
    resolved = json.loads(out)
    assert resolved["model"] == "mlp" and resolved["lr_g"] == 2e-4 and resolved["ema"] == 0.999
    assert resolved["batch_size"] == 16  # the flag beats the file
    assert resolved["optimizer"] == "rmsprop" and resolved["lr_d"] == 5e-5  # wgan defaults
    code, out, _ = run(capsys, "train", "--print-config", "--max-steps", "none")
    assert code == 0 and json.loads(out)["max_steps"] is None
    code, out, _ = run(capsys, "train", "--print-config", "--eval-every", "2",
                       "--eval-samples", "500")
    resolved = json.loads(out)
    assert code == 0 and resolved["eval_every"] == 2 and resolved["eval_samples"] == 500


@pytest.mark.parametrize("text, message", [
    ('lr = 1e-3\n', "unknown key 'lr'"),
    ('batchsize = 3\n', "did you mean 'batch_size'"),
    ('epochs = "ten"\n', "epochs: expected int"),
    ('loss = "gan"\n', "loss: 'gan' is not one of"),
    ('[train]\nepochs = 3\n', "tables are not supported"),
    ('epochs = \n', "not valid TOML"),
    ('batch-size = 2\nbatch_size = 4\n', "sets the same option twice: 'batch-size' and "
                                          "'batch_size'"),
    ('lr_g = ' + '1' * 400 + '\n', "lr_g: an integer of 400 digits is too large"),
    ('loss = "wgan"\nbeta_1 = 0.5\n', "beta_1 0.5 (Adam's): no effect with optimizer "
                                      "'rmsprop'"),
])
def test_bad_config_file_exits_2(capsys, tmp_path, text, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    code, _, err = run(capsys, "train", "--config", str(cfg))
    assert code == 2
    assert message in err


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--config", str(tmp_path / "none.toml"))
    assert code == 2 and "cannot read" in err


# --------------------------------------------------------------------------------------
# train and sample end to end
# --------------------------------------------------------------------------------------


def test_train_then_sample(capsys, mnist_dir, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, *small_args(mnist_dir, out))
    assert code == 0, err
    assert "completed: 4 steps, 1 epochs" in stdout
    assert (out / "generator.h5").is_file() and (out / "samples" / "epoch_0001.png").is_file()

    png = tmp_path / "grid.png"
    code, stdout, err = run(capsys, "sample", str(out / "generator.h5"), "-n", "16",
                            "--out", str(png), "--seed", "3", "--scale", "2")
    assert code == 0, err
    img = PIL.open(png)
    assert img.size == (4 * 56 + 5 * 2, 4 * 56 + 5 * 2)
    first = np.asarray(img).copy()
    # the same seed gives the same picture; a training checkpoint works as well
    code, _, _ = run(capsys, "sample", str(out / "checkpoint.h5"), "-n", "16", "--out",
                     str(png), "--seed", "3", "--scale", "2")
    assert code == 0 and np.array_equal(np.asarray(PIL.open(png)), first)

    # a second `train` into the same folder is refused (exit 1), nothing is changed
    before = (out / "checkpoint.h5").read_bytes()
    code, _, err = run(capsys, *small_args(mnist_dir, out), "--lr-d", "3e-4")
    assert code == 1 and "different run" in err and "lr_d" in err
    assert (out / "checkpoint.h5").read_bytes() == before
    # --resume with more epochs continues it
    code, stdout, err = run(capsys, *small_args(mnist_dir, out), "--epochs", "2", "--resume")
    assert code == 0, err
    assert "completed: 8 steps, 2 epochs" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 4  # continued, not started again
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"d_loss"' in line]
    assert steps == list(range(1, 9))


def test_sample_toy_generator_writes_scatter(capsys, tmp_path):
    G, _ = models.build("mlp", seed=0, image_shape=(2,))
    path = checkpoint.export_generator(tmp_path / "g.h5", G, model="mlp", noise_dim=100,
                                       image_shape=(2,), output_scale=4.0,
                                       config={"data": "ring"})
    code, _, err = run(capsys, "sample", str(path), "-n", "200", "--out",
                       str(tmp_path / "s.png"))
    assert code == 0, err
    assert PIL.open(tmp_path / "s.png").size == (500, 500)
    code, _, err = run(capsys, "sample", str(path), "-n", "200", "--nrow", "5", "--out",
                       str(tmp_path / "t.png"))
    assert code == 2 and "--nrow/--scale lay out image grids" in err
    assert not (tmp_path / "t.png").exists()


def test_sample_errors_exit_1(capsys, tmp_path):
    code, _, err = run(capsys, "sample", str(tmp_path / "missing.h5"))
    assert code == 1 and "does not exist" in err
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n" + b"\0" * 50)
    code, _, err = run(capsys, "sample", str(bad))
    assert code == 1 and "bad.h5" in err
    code, _, err = run(capsys, "sample", str(bad), "-n", "0")
    assert code == 2


def test_train_runtime_error_exit_1(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--model", "mlp", "--data-dir", str(tmp_path),
                       "--no-download", "--quiet", "--out", str(tmp_path / "r"))
    assert code == 1
    assert "rawgan train: error:" in err and "not found" in err


# --------------------------------------------------------------------------------------
# gradcheck hand-off and the console script
# --------------------------------------------------------------------------------------


def test_eval_end_to_end(capsys, mnist_dir, tmp_path):
    """`rawgan eval` hands its arguments to rawgan.metrics.main; on a tiny run trained with
    --eval-every it prints the generator row (and the reference rows)."""
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # SampleSizeWarning: tiny sample counts
        code, stdout, err = run(capsys, *small_args(mnist_dir, out), "--eval-every", "1",
                                "--eval-samples", "64")
        assert code == 0, err
        assert "last eval: FLD" in stdout and "(64 samples)" in stdout
        rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["eval"]["n"] for r in rec if "eval" in r] == [64]
        code, stdout, err = run(capsys, "eval", str(out / "generator.h5"), "--n", "200",
                                "--data-dir", str(mnist_dir), "--kid-subsets", "3",
                                "--kid-subset-size", "100", "--splits", "2", "--json",
                                str(tmp_path / "eval.json"))
    assert code == 0, err
    for row in ("generator", "real_vs_real", "real_vs_noise", "FLD"):
        assert row in stdout
    assert json.loads((tmp_path / "eval.json").read_text())["generator"]["n"] == 200
    code, stdout, _ = run(capsys, "eval", "--help")
    assert code == 0 and "rawgan eval" in stdout and "--kid-subsets" in stdout
    code, _, err = run(capsys, "eval", str(out / "generator.h5"), "--n", "1")
    assert code == 2 and "--n must be >= 2" in err
    code, _, err = run(capsys, "eval", str(tmp_path / "missing.h5"))
    assert code == 1 and "rawgan eval: error" in err


def test_eval_forwards_argv(monkeypatch):
    from rawgan import metrics

    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 4

    monkeypatch.setattr(metrics, "main", fake_main)
    assert main(["eval", "run/generator.h5", "--n", "10"]) == 4
    assert seen["argv"] == ["run/generator.h5", "--n", "10"]


def test_gradcheck_forwards_argv(monkeypatch):
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 3

    monkeypatch.setitem(sys.modules, "rawgan.gradcheck",
                        types.SimpleNamespace(main=fake_main))
    monkeypatch.setattr(rawgan, "gradcheck", sys.modules["rawgan.gradcheck"], raising=False)
    assert main(["gradcheck", "--layer", "conv2d", "--help"]) == 3
    assert seen["argv"] == ["--layer", "conv2d", "--help"]


def test_console_script_entry_point():
    res = subprocess.run([sys.executable, "-m", "rawgan.cli", "train", "--help"],
                         capture_output=True, text=True, timeout=120,
                         cwd=Path(rawgan.__file__).parents[1])
    assert res.returncode == 0 and "--d-steps" in res.stdout


def test_a_misspelled_option_is_named_by_its_subcommand(capsys):
    code, _, err = run(capsys, "train", "--stpes", "5")
    assert code == 2 and "rawgan train: error: unrecognized arguments: --stpes 5" in err


def test_inspect_refuses_the_training_options_it_would_ignore(capsys):
    code, _, err = run(capsys, "inspect", "--max-steps", "1", "--ema", "0.9")
    assert code == 2 and "--max-steps, --ema: rawgan inspect records --steps steps" in err


@pytest.mark.parametrize("argv, message", [
    (["--splits", "0"], "--splits must be >= 1, got 0"),
    (["--kid-subsets", "0"], "--kid-subsets must be >= 1, got 0"),
])
def test_eval_checks_its_counts_before_working(capsys, argv, message):
    code, _, err = run(capsys, "eval", *argv)
    assert code == 2 and message in err
