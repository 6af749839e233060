"""HDF5 checkpoints: models, optimizer state, RNG state, progress and the run's config.

Two kinds of file share one layout, told apart by the ``kind`` attribute:

* a **training checkpoint** (``kind = "training"``) holds everything ``rawgan train
  --resume`` needs to continue a run bit for bit: the generator and discriminator weights
  (and the EMA generator's), both optimizers' state, every random generator's state (the
  data-order and noise generators and each layer's own generator, which Dropout draws its
  masks from), the step / epoch counters and the full config;
* a **generator export** (``kind = "generator"``) holds one generator and what is needed to
  rebuild it (model name, noise size, output shape). An application loads it with numpy +
  h5py only: ``rawgan.load_generator(path).sample(64, seed=0)``.

Layout (HDF5 groups are the ``"layer/key"`` names of :meth:`Sequential.get_weights`)::

    /                      attrs: magic = "rawgan-checkpoint", format_version = 1, kind,
                                  rawgan_version, config (JSON), meta (JSON), arch (JSON)
    /models/<model>/<layer>/<key>          weights, e.g. /models/generator/dense/kernel
    /models/<model>                        attrs: layer_rngs (JSON: layer -> RNG state)
    /optimizers/<opt>/slots/<layer>/<key>/<slot>    attrs: iterations, class
    /rngs                                  attrs: <name> (JSON of bit_generator.state)
    /                      attrs: sha256 (format 2): SHA-256 of everything above, every
                                  attribute and every array, in name order (:func:`_digest`)

Every file is written to a temporary file in the destination folder, flushed, fsync'ed and
renamed over the destination (:func:`os.replace`, atomic on POSIX and Windows), so a crash
or Ctrl-C during a save leaves the previous checkpoint intact and never a half-written one.

Anything that does not look like one of these files (truncated, not HDF5, another
program's HDF5, a newer format, another model's weights, content that does not match its
SHA-256: flipped bits, a hand edit) raises :class:`CheckpointError`, a ``ValueError`` whose
message names the file and the problem. Format 1 files (no digest) still load, unchecked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checks import integer, is_int

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "Checkpoint",
    "CheckpointError",
    "GeneratorSampler",
    "atomic_write",
    "export_generator",
    "load_checkpoint",
    "load_generator",
    "restore",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

MAGIC = "rawgan-checkpoint"
FORMAT_VERSION = 2          # 2: the root attribute DIGEST_ATTR holds the content's SHA-256
DIGEST_ATTR = "sha256"
KINDS = ("training", "generator")


class CheckpointError(ValueError):
    """A file is not a usable rawgan checkpoint (or not one for this model)."""


def _h5py():
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is a core dependency
        raise ImportError("rawgan checkpoints need h5py: pip install h5py") from exc
    return h5py


# --------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------


def rng_state(rng: np.random.Generator) -> dict:
    """The ``bit_generator.state`` dict of ``rng`` (JSON-serialisable: ints and strings)."""
    return _plain(rng.bit_generator.state)


def set_rng_state(rng: np.random.Generator, state: Mapping) -> None:
    """Put ``rng`` back in ``state`` (a :func:`rng_state` dict of the same bit generator)."""
    want = type(rng.bit_generator).__name__
    if state.get("bit_generator") != want:
        raise CheckpointError(f"RNG state is for {state.get('bit_generator')!r}, the generator "
                              f"uses {want!r}")
    rng.bit_generator.state = dict(state)


def _plain(obj):
    """NumPy scalars / arrays inside RNG states -> Python ints / lists (for JSON)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _unplain(obj):
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: _unplain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unplain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------
# Atomic write
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]):
    """Yield a temporary path next to ``path``; on success fsync it and rename it to ``path``.

    On an exception (or KeyboardInterrupt) the temporary file is removed and ``path`` is left
    as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # like mkstemp, but mode 0o666 & ~umask as a plain open() would give
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (POSIX only)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def arrays_sha256(named: Iterable[tuple[str, np.ndarray]]) -> str:
    """SHA-256 (hex) of named arrays, in the order given: for each, its name, dtype, shape and
    bytes (a model's weights, a training set), whatever file or layout holds them."""
    h = hashlib.sha256()
    for name, arr in named:
        a = np.ascontiguousarray(arr)
        h.update(f"{name} {a.dtype.str} {a.shape}\n".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def remove_stale_temporaries(folder: str | os.PathLike[str], min_age_s: float = 600.0
                             ) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` when its process
    was killed mid-write (SIGKILL, power loss): names ``.<file>.<pid>.<8 hex>.tmp`` whose
    process no longer runs on this machine and that are older than ``min_age_s``. Returns
    what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMPORARY.match(p.name)
        if m is None or not p.is_file():
            continue
        try:
            os.kill(int(m["pid"]), 0)
            continue  # its writer still runs
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, OSError):
            continue
        with contextlib.suppress(OSError):
            if time.time() - p.stat().st_mtime >= min_age_s:
                p.unlink()
                removed.append(p)
    return removed


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def _write_arrays(group, arrays: Mapping[str, np.ndarray]) -> None:
    for key, arr in arrays.items():
        group.create_dataset(key, data=np.asarray(arr))


def _digest(f) -> str:
    """SHA-256 (hex) of an open file's whole content except the digest itself: for every
    object in name order, its path, each attribute (name, type, value) and, for a dataset,
    its dtype, shape and bytes. The same function runs on save (over what was just
    written) and on load, so any flipped bit or edit in an array or attribute shows."""
    h5py = _h5py()
    h = hashlib.sha256()

    def feed(*parts) -> None:
        for p in parts:
            b = p if isinstance(p, bytes) else str(p).encode()
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)

    def attrs(name: str, obj) -> None:
        for key in sorted(obj.attrs):
            if name == "/" and key == DIGEST_ATTR:
                continue
            v = obj.attrs[key]
            if isinstance(v, str | bytes):
                feed("attr", key, "text", v.encode() if isinstance(v, str) else v)
            else:
                v = np.ascontiguousarray(v)
                feed("attr", key, v.dtype.str, v.shape, v.tobytes())

    names: list[str] = []
    f.visit(names.append)
    attrs("/", f)
    for name in sorted(names):
        obj = f[name]
        if isinstance(obj, h5py.Dataset):
            a = np.ascontiguousarray(obj[()])
            feed("dataset", name, a.dtype.str, a.shape, a.tobytes())
        else:
            feed("group", name)
        attrs(name, obj)
    return h.hexdigest()


def _read_arrays(group) -> dict[str, np.ndarray]:
    h5py = _h5py()
    out: dict[str, np.ndarray] = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            out[name] = obj[()]

    group.visititems(visit)
    return out


def save_checkpoint(path: str | os.PathLike[str], *, models: Mapping[str, Any],
                    optimizers: Mapping[str, Any] | None = None,
                    rngs: Mapping[str, np.random.Generator] | None = None,
                    config: Mapping | None = None, meta: Mapping | None = None,
                    arch: Mapping | None = None, kind: str = "training") -> Path:
    """Write a checkpoint atomically and return its path.

    Parameters
    ----------
    models : {"generator": Sequential, "discriminator": Sequential, ...}
        Each model's weights (``get_weights()``) and each of its layers' RNG state.
    optimizers : {"generator": Optimizer, ...}
        ``state_dict()`` of each (iterations and slot arrays).
    rngs : {"data": Generator, "noise": Generator, ...}
        Further random generators, stored as their ``bit_generator.state``.
    config, meta, arch : JSON-serialisable dicts
        The run's config, its progress (step, epoch, ...) and the architecture description
        that :func:`load_generator` rebuilds a generator from.
    kind : {"training", "generator"}
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    h5py = _h5py()
    from . import __version__

    with atomic_write(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["magic"] = MAGIC
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["kind"] = kind
            f.attrs["rawgan_version"] = __version__
            f.attrs["config"] = json.dumps(dict(config or {}), sort_keys=True)
            f.attrs["meta"] = json.dumps(_plain(dict(meta or {})), sort_keys=True)
            f.attrs["arch"] = json.dumps(dict(arch or {}), sort_keys=True)
            gm = f.create_group("models")
            for name, model in models.items():
                g = gm.create_group(name)
                _write_arrays(g, model.get_weights())
                g.attrs["layer_rngs"] = json.dumps(
                    {layer.name: rng_state(layer.rng) for layer in model.layers
                     if layer.rng is not None})
            go = f.create_group("optimizers")
            for name, opt in (optimizers or {}).items():
                g = go.create_group(name)
                state = opt.state_dict()
                g.attrs["iterations"] = int(state["iterations"])
                g.attrs["class"] = type(opt).__name__
                _write_arrays(g.create_group("slots"), state["slots"])
            gr = f.create_group("rngs")
            for name, rng in (rngs or {}).items():
                gr.attrs[name] = json.dumps(rng_state(rng))
            f.attrs[DIGEST_ATTR] = _digest(f)
            f.flush()
    return Path(path)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint read into memory (NumPy arrays and plain dicts)."""

    path: Path
    kind: str
    format_version: int
    rawgan_version: str
    config: dict
    meta: dict
    arch: dict
    weights: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    layer_rngs: dict[str, dict[str, dict]] = field(default_factory=dict)
    optimizers: dict[str, dict] = field(default_factory=dict)
    optimizer_classes: dict[str, str] = field(default_factory=dict)
    rngs: dict[str, dict] = field(default_factory=dict)


def _attr_str(f, key: str, path: Path) -> str:
    if key not in f.attrs:
        raise CheckpointError(f"{path}: not a rawgan checkpoint (attribute {key!r} missing)")
    value = f.attrs[key]
    return value.decode() if isinstance(value, bytes) else str(value)


def _json_attr(f, key: str, path: Path) -> Any:
    try:
        return json.loads(_attr_str(f, key, path))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: attribute {key!r} is not valid JSON ({exc})") from None


def load_checkpoint(path: str | os.PathLike[str], *, kind: str | None = None) -> Checkpoint:
    """Read and validate a checkpoint. ``kind`` ("training" / "generator") if given must match.

    Raises FileNotFoundError if ``path`` does not exist and :class:`CheckpointError` if it is
    not a complete rawgan checkpoint of a format this version reads.
    """
    h5py = _h5py()
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is a folder; give a file in it (a run "
                                "folder holds checkpoint.h5 and generator.h5)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(f"{path}: not a readable HDF5 file (truncated, corrupt, or not a "
                              f"checkpoint): {exc}") from None
    try:
        with f:
            magic = f.attrs.get("magic")
            magic = magic.decode() if isinstance(magic, bytes) else magic
            if magic != MAGIC:
                raise CheckpointError(f"{path}: an HDF5 file but not a rawgan checkpoint "
                                      f"(no {MAGIC!r} marker)")
            version = int(f.attrs.get("format_version", -1))
            if version > FORMAT_VERSION:
                raise CheckpointError(
                    f"{path}: checkpoint format {version} is newer than this rawgan reads "
                    f"(format {FORMAT_VERSION}); upgrade rawgan to load it")
            if version < 1:
                raise CheckpointError(f"{path}: invalid checkpoint format version {version}")
            ck = Checkpoint(
                path=path, kind=_attr_str(f, "kind", path), format_version=version,
                rawgan_version=_attr_str(f, "rawgan_version", path),
                config=_json_attr(f, "config", path), meta=_unplain(_json_attr(f, "meta", path)),
                arch=_json_attr(f, "arch", path))
            if ck.kind not in KINDS:
                raise CheckpointError(f"{path}: unknown checkpoint kind {ck.kind!r}")
            for key in ("config", "meta", "arch"):
                if not isinstance(getattr(ck, key), dict):
                    raise CheckpointError(f"{path}: attribute {key!r} is not a JSON object")
            if kind is not None and ck.kind != kind:
                raise CheckpointError(f"{path}: a {ck.kind} checkpoint, expected a {kind} one")
            for group in ("models", "optimizers", "rngs"):
                if group not in f:
                    raise CheckpointError(f"{path}: incomplete checkpoint (group /{group} "
                                          "missing)")
            for group in ("models", "optimizers"):
                for name, g in f[group].items():
                    if not isinstance(g, h5py.Group):
                        raise CheckpointError(f"{path}: /{group}/{name} is not a group")
            for name, g in f["models"].items():
                ck.weights[name] = _read_arrays(g)
                ck.layer_rngs[name] = _unplain(_json_attr(g, "layer_rngs", path))
            for name, g in f["optimizers"].items():
                slots = _read_arrays(g["slots"]) if "slots" in g else {}
                ck.optimizers[name] = {"iterations": int(g.attrs["iterations"]),
                                       "slots": slots}
                ck.optimizer_classes[name] = _attr_str(g, "class", path)
            for name in f["rngs"].attrs:
                ck.rngs[name] = _unplain(_json_attr(f["rngs"], name, path))
            # a digest present is checked whatever the version says: a hand edit that also
            # sets format_version = 1 must not turn the check off
            if (version >= 2 or DIGEST_ATTR in f.attrs) and _digest(f) != _attr_str(
                    f, DIGEST_ATTR, path):
                raise CheckpointError(
                    f"{path}: checksum mismatch: the content does not match the SHA-256 it "
                    f"was saved with (a corrupt copy, a disk error, or a file edited by "
                    f"hand); use another copy of the checkpoint")
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint ({type(exc).__name__}: {exc})"
                              ) from None
    return ck


def restore(ck: Checkpoint, *, models: Mapping[str, Any] | None = None,
            optimizers: Mapping[str, Any] | None = None,
            rngs: Mapping[str, np.random.Generator] | None = None) -> None:
    """Load a checkpoint's state into live objects, by name; any mismatch is a
    :class:`CheckpointError` naming what differs (missing model, layer, shape, ...)."""
    for name, model in (models or {}).items():
        if name not in ck.weights:
            raise CheckpointError(f"{ck.path}: no model {name!r} in the checkpoint (it holds "
                                  f"{sorted(ck.weights)})")
        try:
            model.set_weights(ck.weights[name])
        except ValueError as exc:
            raise CheckpointError(f"{ck.path}: the checkpoint's {name} does not fit this model "
                                  f"(another architecture?): {exc}") from None
        states = ck.layer_rngs.get(name, {})
        for layer in model.layers:
            if layer.name in states:
                if layer.rng is None:
                    layer.rng = np.random.default_rng()
                set_rng_state(layer.rng, states[layer.name])
    for name, opt in (optimizers or {}).items():
        if name not in ck.optimizers:
            raise CheckpointError(f"{ck.path}: no optimizer state {name!r} in the checkpoint")
        if ck.optimizer_classes.get(name) != type(opt).__name__:
            raise CheckpointError(f"{ck.path}: optimizer {name!r} was "
                                  f"{ck.optimizer_classes.get(name)}, not {type(opt).__name__}")
        try:
            opt.load_state_dict(ck.optimizers[name])
        except ValueError as exc:
            raise CheckpointError(f"{ck.path}: optimizer state {name!r} does not fit: {exc}"
                                  ) from None
    for name, rng in (rngs or {}).items():
        if name not in ck.rngs:
            raise CheckpointError(f"{ck.path}: no RNG state {name!r} in the checkpoint")
        set_rng_state(rng, ck.rngs[name])


# --------------------------------------------------------------------------------------
# Generator export
# --------------------------------------------------------------------------------------


def export_generator(path: str | os.PathLike[str], G, *, model: str, noise_dim: int,
                     image_shape: tuple[int, ...], output_scale: float = 1.0,
                     config: Mapping | None = None, meta: Mapping | None = None) -> Path:
    """Save generator ``G`` alone, with the description :func:`load_generator` rebuilds it
    from: ``model`` (a :mod:`rawgan.models` name), ``noise_dim``, ``image_shape`` and
    ``output_scale`` (samples are multiplied by it, e.g. to undo toy-data scaling)."""
    arch = {"model": model, "noise_dim": int(noise_dim),
            "image_shape": [int(d) for d in image_shape], "output_scale": float(output_scale),
            "dtype": str(np.dtype(G.dtype or np.float32))}
    return save_checkpoint(path, models={"generator": G}, config=config, meta=meta, arch=arch,
                           kind="generator")


def build_generator(arch: Mapping, backend="numpy"):
    """Rebuild an (untrained) generator from an ``arch`` description."""
    from . import models

    name = arch.get("model")
    noise_dim = int(arch.get("noise_dim", models.NOISE_DIM))
    shape = tuple(arch.get("image_shape", models.IMAGE_SHAPE))
    dtype = np.dtype(arch.get("dtype", "float32"))
    if name == "dcgan":
        if shape != models.IMAGE_SHAPE:
            raise CheckpointError(f"dcgan generator with image shape {shape}: unsupported")
        return models.dcgan_generator(noise_dim, seed=0, backend=backend, dtype=dtype)
    if name == "mlp":
        return models.mlp_generator(noise_dim, seed=0, backend=backend, dtype=dtype,
                                    image_shape=shape)
    raise CheckpointError(f"unknown generator architecture {name!r} (this rawgan builds "
                          f"{models.MODELS})")


class GeneratorSampler:
    """A trained generator, ready to sample: ``sample(n, seed=0) -> (n, *image_shape)``."""

    def __init__(self, G, *, noise_dim: int, image_shape: tuple[int, ...],
                 output_scale: float = 1.0, model: str = "", meta: Mapping | None = None,
                 config: Mapping | None = None) -> None:
        self.G = G
        self.noise_dim = int(noise_dim)
        self.image_shape = tuple(image_shape)
        self.output_scale = float(output_scale)
        self.model = model
        self.meta = dict(meta or {})
        self.config = dict(config or {})

    def __repr__(self) -> str:
        return (f"GeneratorSampler(model={self.model!r}, noise_dim={self.noise_dim}, "
                f"image_shape={self.image_shape})")

    def noise(self, n: int, seed: int | None = None) -> np.ndarray:
        """The noise batch ``sample(n, seed)`` uses: N(0, I) of shape (n, noise_dim)."""
        integer(n, "n", 0)
        if seed is not None and (not is_int(seed) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
        rng = np.random.default_rng(seed)
        return rng.standard_normal((int(n), self.noise_dim), dtype=np.float32)

    def generate(self, z: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """``G(z)`` in inference mode (BatchNorm uses its moving statistics)."""
        integer(batch_size, "batch_size", 1)
        z = np.asarray(z, dtype=self.G.dtype)
        if z.ndim != 2 or z.shape[1] != self.noise_dim:
            raise ValueError(f"z must have shape (n, {self.noise_dim}), got {z.shape}")
        ops = self.G.ops
        outs = [ops.to_numpy(self.G.forward(ops.asarray(z[i:i + batch_size]), training=False))
                for i in range(0, z.shape[0], batch_size)]
        out = np.concatenate(outs) if outs else np.zeros((0, *self.image_shape), self.G.dtype)
        if self.output_scale != 1.0:
            out = out * out.dtype.type(self.output_scale)
        return out

    def sample(self, n: int, seed: int | None = None, batch_size: int = 256) -> np.ndarray:
        """``n`` samples, ``(n, *image_shape)`` in the generator's dtype (float32 unless it
        was trained in float64; images in [-1, 1]); the same ``seed`` gives the same
        samples."""
        return self.generate(self.noise(n, seed), batch_size=batch_size)


def load_generator(path: str | os.PathLike[str], backend="numpy") -> GeneratorSampler:
    """Load a generator from a generator export OR a training checkpoint (whose EMA generator
    is used if the run kept one). Needs only numpy and h5py.

    >>> gen = rawgan.load_generator("runs/dcgan-mnist/generator.h5")   # doctest: +SKIP
    >>> images = gen.sample(64, seed=0)        # (64, 28, 28, 1) float32 in [-1, 1]
    """
    ck = load_checkpoint(path)
    arch = dict(ck.arch)
    if ck.kind == "training":
        cfg = ck.config
        arch.setdefault("model", cfg.get("model"))
        arch.setdefault("noise_dim", cfg.get("noise_dim"))
    if not arch.get("model"):
        raise CheckpointError(f"{ck.path}: no generator architecture recorded")
    name = "ema_generator" if "ema_generator" in ck.weights else "generator"
    if name not in ck.weights:
        raise CheckpointError(f"{ck.path}: holds no generator")
    G = build_generator(arch, backend=backend)
    _restore_as(ck, name, G)
    return GeneratorSampler(G, noise_dim=arch["noise_dim"],
                            image_shape=tuple(G.output_shape[1:]),
                            output_scale=arch.get("output_scale", 1.0), model=arch["model"],
                            meta=ck.meta, config=ck.config)


def _restore_as(ck: Checkpoint, name: str, G) -> None:
    try:
        G.set_weights(ck.weights[name])
    except ValueError as exc:
        raise CheckpointError(f"{ck.path}: the checkpoint's {name} does not fit: {exc}"
                              ) from None
