"""Tests for rawgan.checkpoint: bit-for-bit round trip, atomic writes, every bad file a clear
CheckpointError, and the numpy + h5py generator export."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import rawgan
from rawgan import checkpoint, gan, models, optim
from rawgan.checkpoint import CheckpointError


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _trained(name: str, seed: int, steps: int = 2, image_shape=(28, 28, 1), batch: int = 8):
    """G, D, opt_g, opt_d, data rng, noise rng after a few real train steps (so optimizer
    slots, BN moving statistics, dropout RNGs and the noise RNG all have moved)."""
    G, D = models.build(name, seed=seed, image_shape=image_shape)
    opt_g, opt_d = optim.Adam(G, lr=1e-3), optim.Adam(D, lr=1e-3)
    data_rng, noise_rng = np.random.default_rng(seed), np.random.default_rng(seed + 10)
    noise = gan.gaussian_noise(noise_rng, models.NOISE_DIM)
    for _ in range(steps):
        real = data_rng.uniform(-1, 1, (batch, *image_shape)).astype(np.float32)
        gan.train_step(G, D, opt_g, opt_d, "bce", [real], noise)
    return G, D, opt_g, opt_d, data_rng, noise_rng


def _save(path, G, D, opt_g, opt_d, data_rng, noise_rng, **kw):
    return checkpoint.save_checkpoint(
        path, models={"generator": G, "discriminator": D},
        optimizers={"generator": opt_g, "discriminator": opt_d},
        rngs={"data": data_rng, "noise": noise_rng},
        config=kw.pop("config", {"model": "dcgan", "lr": 1e-3}),
        meta=kw.pop("meta", {"step": 2, "epoch": 0}), **kw)


@pytest.fixture
def saved(tmp_path):
    parts = _trained("dcgan", seed=0)
    path = _save(tmp_path / "ck.h5", *parts)
    return path, parts


# --------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------


def test_round_trip_is_bit_for_bit(saved, tmp_path):
    path, (G, D, opt_g, opt_d, data_rng, noise_rng) = saved
    # fresh objects from ANOTHER seed, so nothing matches before the restore
    G2, D2, og2, od2, dr2, nr2 = _trained("dcgan", seed=5, steps=1)
    ck = checkpoint.load_checkpoint(path, kind="training")
    assert ck.format_version == checkpoint.FORMAT_VERSION
    assert ck.config == {"model": "dcgan", "lr": 1e-3} and ck.meta == {"step": 2, "epoch": 0}
    checkpoint.restore(ck, models={"generator": G2, "discriminator": D2},
                       optimizers={"generator": og2, "discriminator": od2},
                       rngs={"data": dr2, "noise": nr2})
    for a, b in ((G, G2), (D, D2)):
        wa, wb = a.get_weights(), b.get_weights()
        assert wa.keys() == wb.keys()
        for k in wa:
            assert wa[k].dtype == wb[k].dtype and wa[k].tobytes() == wb[k].tobytes(), k
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert la.rng.bit_generator.state == lb.rng.bit_generator.state, la.name
    for a, b in ((opt_g, og2), (opt_d, od2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa["iterations"] == sb["iterations"] == 2
        assert sa["slots"].keys() == sb["slots"].keys() and sa["slots"]
        for k in sa["slots"]:
            assert sa["slots"][k].tobytes() == sb["slots"][k].tobytes(), k
    assert data_rng.bit_generator.state == dr2.bit_generator.state
    assert noise_rng.bit_generator.state == nr2.bit_generator.state

    # the restored copy continues exactly as the original (dropout masks, Adam, noise)
    real = np.random.default_rng(3).uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32)
    s1 = gan.train_step(G, D, opt_g, opt_d, "bce", [real],
                        gan.gaussian_noise(noise_rng, models.NOISE_DIM))
    s2 = gan.train_step(G2, D2, og2, od2, "bce", [real],
                        gan.gaussian_noise(nr2, models.NOISE_DIM))
    assert s1 == s2

    # and saving the restored state again gives the same arrays
    path2 = _save(tmp_path / "ck2.h5", *_trained("dcgan", seed=0))
    a, b = checkpoint.load_checkpoint(path), checkpoint.load_checkpoint(path2)
    for name in a.weights:
        for k in a.weights[name]:
            assert a.weights[name][k].tobytes() == b.weights[name][k].tobytes()


def test_float64_model_round_trip(tmp_path):
    G, D = models.build("mlp", seed=1, dtype=np.float64)
    checkpoint.save_checkpoint(tmp_path / "m.h5", models={"generator": G, "discriminator": D})
    G2, D2 = models.build("mlp", seed=2, dtype=np.float64)
    checkpoint.restore(checkpoint.load_checkpoint(tmp_path / "m.h5"),
                       models={"generator": G2, "discriminator": D2})
    for k, v in G.get_weights().items():
        assert G2.get_weights()[k].dtype == np.float64
        assert np.array_equal(G2.get_weights()[k], v)


def test_file_is_tagged(saved):
    path, _ = saved
    with h5py.File(path, "r") as f:
        assert f.attrs["magic"] == checkpoint.MAGIC
        assert int(f.attrs["format_version"]) == checkpoint.FORMAT_VERSION
        assert "models/generator/dense/kernel" in f
        assert "optimizers/discriminator/slots/conv2d/kernel/m" in f


# --------------------------------------------------------------------------------------
# Bad files: each a clear CheckpointError
# --------------------------------------------------------------------------------------


def test_truncated_checkpoint(saved, tmp_path):
    path, _ = saved
    raw = path.read_bytes()
    for cut in (len(raw) // 2, 100):
        bad = tmp_path / f"cut{cut}.h5"
        bad.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match=r"cut\d+\.h5"):
            checkpoint.load_checkpoint(bad)


def test_not_hdf5(tmp_path):
    bad = tmp_path / "notes.h5"
    bad.write_text("this is not a checkpoint\n" * 20)
    with pytest.raises(CheckpointError, match="not a readable HDF5 file"):
        checkpoint.load_checkpoint(bad)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError):
        checkpoint.load_checkpoint(empty)


def test_foreign_hdf5(tmp_path):
    other = tmp_path / "keras.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("model_weights/dense/kernel", data=np.ones((3, 3)))
    with pytest.raises(CheckpointError, match="not a rawgan checkpoint"):
        checkpoint.load_checkpoint(other)


def test_newer_format_version(saved):
    path, _ = saved
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = checkpoint.FORMAT_VERSION + 1
    with pytest.raises(CheckpointError, match="newer than this rawgan reads"):
        checkpoint.load_checkpoint(path)


def test_flipped_bits_in_an_array_fail_the_checksum(saved, tmp_path):
    path, _ = saved
    with h5py.File(path, "r") as f:  # where one weight array's bytes lie in the file
        offset = f["models/generator/dense/kernel"].id.get_offset()
    assert offset is not None
    raw = bytearray(path.read_bytes())
    raw[offset + 1000] ^= 0x01  # one bit of one float: h5py itself reads it without a murmur
    bad = tmp_path / "flipped.h5"
    bad.write_bytes(bytes(raw))
    with h5py.File(bad, "r") as f:
        assert f["models/generator/dense/kernel"][()].shape  # readable as HDF5
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load_checkpoint(bad)


def test_corruption_anywhere_is_an_error_never_silent(saved, tmp_path):
    """64 bytes garbled at points through the file: the load fails with a CheckpointError,
    or (bytes HDF5 never reads) gives exactly the saved content."""
    path, _ = saved
    good = checkpoint.load_checkpoint(path)
    raw = path.read_bytes()
    rng = np.random.default_rng(0)
    for frac in (0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        at = int(frac * (len(raw) - 64))
        bad = tmp_path / f"garbled{frac}.h5"
        bad.write_bytes(raw[:at] + rng.bytes(64) + raw[at + 64:])
        try:
            ck = checkpoint.load_checkpoint(bad)
        except CheckpointError:
            continue
        for name, arrays in good.weights.items():
            for key, a in arrays.items():
                assert np.array_equal(ck.weights[name][key], a), (frac, name, key)
        assert ck.meta == good.meta and ck.optimizers.keys() == good.optimizers.keys()


def test_hand_edits_fail_the_checksum(saved):
    path, _ = saved
    with h5py.File(path, "r+") as f:
        f.attrs["meta"] = '{"epoch": 0, "step": 9}'
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load_checkpoint(path)
    with h5py.File(path, "r+") as f:  # put the attribute back: the file is whole again
        f.attrs["meta"] = '{"epoch": 0, "step": 2}'
    checkpoint.load_checkpoint(path)
    with h5py.File(path, "r+") as f:
        del f["optimizers/generator/slots/dense/kernel/m"]  # Adam state silently zero?
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load_checkpoint(path)


def test_format_1_files_without_a_checksum_still_load(saved):
    path, _ = saved
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1
        del f.attrs[checkpoint.DIGEST_ATTR]
    ck = checkpoint.load_checkpoint(path)
    assert ck.format_version == 1 and ck.meta["step"] == 2
    with h5py.File(path, "r+") as f:  # format 2 without its digest: incomplete
        f.attrs["format_version"] = 2
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.load_checkpoint(path)


def test_downgrading_the_version_does_not_skip_the_checksum(saved):
    """An edit that also sets format_version = 1 (format 1 had no digest) is still caught."""
    path, _ = saved
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1
        f["models/generator/dense/kernel"][0, 0] = 1e6
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load_checkpoint(path)


def test_missing_group_and_missing_file(saved, tmp_path):
    path, _ = saved
    with h5py.File(path, "r+") as f:
        del f["optimizers"]
    with pytest.raises(CheckpointError, match="incomplete"):
        checkpoint.load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        checkpoint.load_checkpoint(tmp_path / "nope.h5")
    with pytest.raises(FileNotFoundError, match="is a folder; give a file in it"):
        checkpoint.load_checkpoint(tmp_path)  # `rawgan sample runs/x` for runs/x/generator.h5


def test_wrong_kind(saved, tmp_path):
    path, (G, *_rest) = saved
    with pytest.raises(CheckpointError, match="expected a generator"):
        checkpoint.load_checkpoint(path, kind="generator")


def test_checkpoint_of_another_model(saved):
    path, _ = saved  # a DCGAN checkpoint
    G, D = models.build("mlp", seed=0)
    before = {k: v.copy() for k, v in G.get_weights().items()}
    with pytest.raises(CheckpointError, match="does not fit this model"):
        checkpoint.restore(checkpoint.load_checkpoint(path),
                           models={"generator": G, "discriminator": D})
    # a mismatch never half-loads: set_weights checks every name before assigning
    for k, v in G.get_weights().items():
        assert np.array_equal(v, before[k])
    # a same-named model with different shapes (noise_dim 64 instead of 100)
    G64, _ = models.build("dcgan", seed=0, noise_dim=64)
    with pytest.raises(CheckpointError, match="shape"):
        checkpoint.restore(checkpoint.load_checkpoint(path), models={"generator": G64})


def test_optimizer_of_another_kind(saved):
    path, (G, D, *_r) = saved
    with pytest.raises(CheckpointError, match="was Adam, not RMSprop"):
        checkpoint.restore(checkpoint.load_checkpoint(path),
                           optimizers={"generator": optim.RMSprop(G)})


# --------------------------------------------------------------------------------------
# Atomic write
# --------------------------------------------------------------------------------------


def test_failed_save_keeps_the_old_file(saved, monkeypatch):
    path, (G, D, opt_g, opt_d, data_rng, noise_rng) = saved
    before = _digest(path)

    def boom():
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(D, "get_weights", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _save(path, G, D, opt_g, opt_d, data_rng, noise_rng)
    assert _digest(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files


def test_interrupted_save_keeps_the_old_file(saved, monkeypatch):
    path, (G, D, opt_g, opt_d, data_rng, noise_rng) = saved
    before = _digest(path)

    def ctrl_c():
        raise KeyboardInterrupt

    monkeypatch.setattr(opt_d, "state_dict", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _save(path, G, D, opt_g, opt_d, data_rng, noise_rng)
    assert _digest(path) == before
    assert len(list(path.parent.iterdir())) == 1


# --------------------------------------------------------------------------------------
# Generator export
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dcgan", "mlp"])
def test_load_generator_samples(tmp_path, name):
    G, *_ = _trained(name, seed=1, steps=1)
    path = checkpoint.export_generator(tmp_path / "g.h5", G, model=name, noise_dim=100,
                                       image_shape=(28, 28, 1))
    gen = rawgan.load_generator(path)
    a, b = gen.sample(5, seed=3), gen.sample(5, seed=3)
    assert a.shape == (5, 28, 28, 1) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.array_equal(a, gen.sample(5, seed=4))
    assert np.abs(a).max() <= 1.0
    # the same as the original generator in inference mode on the same noise
    z = np.random.default_rng(3).standard_normal((5, 100), dtype=np.float32)
    assert np.array_equal(a, G.forward(z, training=False))
    # batching does not change the result
    np.testing.assert_allclose(gen.sample(7, seed=9, batch_size=3), gen.sample(7, seed=9),
                               atol=1e-5)  # BLAS sums may round differently per batch size
    assert gen.sample(0).shape == (0, 28, 28, 1)


def test_load_generator_from_training_checkpoint_and_scale(tmp_path):
    G, D = models.build("mlp", seed=0, image_shape=(2,))
    arch = {"model": "mlp", "noise_dim": 100, "image_shape": [2], "output_scale": 4.0}
    checkpoint.save_checkpoint(tmp_path / "t.h5", models={"generator": G, "discriminator": D},
                               arch=arch)
    gen = rawgan.load_generator(tmp_path / "t.h5")
    x = gen.sample(10, seed=0)
    z = np.random.default_rng(0).standard_normal((10, 100), dtype=np.float32)
    assert x.shape == (10, 2)
    np.testing.assert_array_equal(x, G.forward(z, training=False) * np.float32(4.0))


def test_load_generator_rejects_unknown_architecture(tmp_path):
    G, _ = models.build("mlp", seed=0)
    path = checkpoint.export_generator(tmp_path / "g.h5", G, model="stylegan9", noise_dim=100,
                                       image_shape=(28, 28, 1))
    with pytest.raises(CheckpointError, match="unknown generator architecture"):
        rawgan.load_generator(path)


def test_load_generator_needs_only_numpy_and_h5py(tmp_path):
    G, _ = models.build("dcgan", seed=0)
    path = checkpoint.export_generator(tmp_path / "g.h5", G, model="dcgan", noise_dim=100,
                                       image_shape=(28, 28, 1))
    code = (
        "import sys\n"
        "for m in ('PIL', 'matplotlib', 'tqdm', 'torch'):\n"
        "    sys.modules[m] = None  # importing any of them now fails\n"
        "import rawgan\n"
        f"x = rawgan.load_generator({str(path)!r}).sample(3, seed=1)\n"
        "assert x.shape == (3, 28, 28, 1), x.shape\n"
        "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": str(Path(rawgan.__file__).parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


@pytest.mark.parametrize("kw, message", [
    ({"n": 3, "batch_size": -5}, r"batch_size must be an integer >= 1, got -5"),
    ({"n": 3, "batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
    ({"n": 3, "seed": -1}, r"seed must be a non-negative integer or None, got -1"),
    ({"n": 3, "seed": 1.5}, r"seed must be a non-negative integer or None, got 1\.5"),
    ({"n": 2.0}, r"n must be an integer >= 0, got 2\.0"),
    ({"n": -1}, r"n must be an integer >= 0, got -1"),
])
def test_sample_arguments_are_checked(tmp_path, kw, message):
    from rawgan import models

    G, _ = models.build("mlp", seed=0, image_shape=(2,))
    path = checkpoint.export_generator(tmp_path / "g.h5", G, model="mlp", noise_dim=100,
                                       image_shape=(2,))
    gen = checkpoint.load_generator(path)
    with pytest.raises(ValueError, match=message):
        gen.sample(**kw)
    assert gen.sample(np.int64(2), seed=np.int64(4)).shape == (2, 2)
