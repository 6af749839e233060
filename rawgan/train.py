"""The GAN training loop behind ``rawgan train``: epochs of shuffled minibatches, k critic
steps per generator step (:func:`rawgan.gan.train_step`), an optional generator EMA,
checkpoints, sample grids, a metrics log, a progress bar, and exact resume.

``summary = rawgan.train.train(TrainConfig(model="dcgan", data="mnist", epochs=50))``

The loop, per epoch::

    draw a permutation of the training set from the data RNG
    for each group of k = d_steps minibatches (batch_size each, the last partial one dropped):
        stats = gan.train_step(G, D, opt_G, opt_D, loss, reals=[x_1..x_k], noise)
        stop with TrainingDiverged if a loss is NaN / inf (the last checkpoint is kept)
        G_ema <- G_ema + (1 - ema) * (G - G_ema)        (if ema is set)
        append {step, epoch, d_loss, g_loss, d_real, d_fake, images_per_s} to metrics.jsonl
    write samples/epoch_NNNN.png from a fixed noise batch (every sample_every epochs)
    append {step, epoch, eval: scores} to metrics.jsonl (every eval_every epochs, if set)
    save checkpoint.h5 (every save_every epochs)
    at the end: checkpoint.h5, generator.h5 (export), losses.png, summary.json

Randomness. ``seed`` seeds everything: G's weights (``seed``), D's (``seed + 1``, which also
seeds D's dropout masks through each layer's own generator), and four independent streams
spawned from ``numpy.random.SeedSequence(seed)``: data order, training noise, the fixed
noise of the sample grids, and the toy data set. The checkpoint stores the data-order
stream as it was at the start of the current epoch plus the number of steps taken in it,
the noise stream, every layer's generator, both optimizers and the weights, so a run
resumed from any checkpoint (end of epoch, ``max_steps``, Ctrl-C) takes exactly the steps
an uninterrupted run takes: the same losses, bit for bit, on the NumPy backend.

Evaluation (``eval_every = N``, off by default) scores the generator every N epochs with
:func:`evaluate_run`: FLD, KID and the classifier score of :mod:`rawgan.metrics` for images,
mode coverage (:func:`rawgan.metrics.mode_metrics`) for the toy mixtures. It samples in
inference mode from its own noise (``seed``), so it touches no training stream and a run
with evaluation takes the same steps as one without; the scores go to metrics.jsonl as
``{"step", "epoch", "eval": {...}, "eval_seconds"}`` records and the last one, with the
history, to summary.json (``eval``, ``eval_history``).

Data parallelism (``distributed``, ``rawgan train --distributed`` under ``mpiexec -n S``;
:mod:`rawgan.distributed`). Every rank draws the same global batches and noise from the
same streams and computes on its B/S rows; one all-reduce per model and step averages the
gradients, so every rank applies the same update and the weights stay identical (checked
at every checkpoint). The losses logged are the global batch's. Only rank 0 writes files
and reports. The checkpoint holds global state only, so a run resumes on any number of
ranks that divides the batch size; it continues exactly when the model has no batch norm
or ``sync_batchnorm`` is on (per-rank batch statistics depend on the number of ranks).

Faults. A NaN / inf loss stops the run with :class:`TrainingDiverged` naming the step; the
state is not saved, the last good checkpoint is left as it was. The first Ctrl-C finishes the
current step, saves a checkpoint, and raises KeyboardInterrupt; a second one aborts at once
(the last checkpoint stays). An output folder that holds another run is refused
(:class:`RunDirError`) before anything is written, as is ``resume`` with a different config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from . import backends, checkpoint, data, distributed, gan, losses, models, optim
from .metrics import SampleSizeWarning
from .sampling import (
    mode_coverage,
    require_extras,
    save_image_grid,
    save_loss_curve,
    save_scatter,
)

__all__ = [
    "CHOICES",
    "Run",
    "RunDirError",
    "TrainConfig",
    "TrainingDiverged",
    "evaluate_run",
    "generator_sampler",
    "read_metrics",
    "setup_run",
    "train",
]

CHOICES: dict[str, tuple[str, ...]] = {
    "model": models.MODELS,
    "data": ("mnist", "fashion", "ring", "grid"),
    "split": ("train", "test"),
    "loss": losses.KINDS,
    "optimizer": ("adam", "rmsprop", "sgd"),
    "backend": ("numpy", "cupy", "numba", "auto"),
    "dtype": ("float32", "float64"),
}
TOY_DATA = ("ring", "grid")
#: Toy points are divided by this for training (the seed MLP generator ends in tanh, whose
#: range [-1, 1] must contain the data) and multiplied back for plots and mode counts.
TOY_SCALE = {"ring": 4.0, "grid": 8.0}
TOY_EXAMPLES = 100_000  # default size of a toy training set
TOY_EVAL_POINTS = 2500  # generated points for the toy scatter plot and mode coverage

#: Config keys that may change between a run and its resumption: they set how long it runs,
#: where and how it reports, not what it computes.
RUN_KEYS = frozenset({"epochs", "max_steps", "save_every", "sample_every", "grid_size",
                      "eval_every", "eval_samples", "out", "progress", "backend", "data_dir",
                      "download", "distributed", "collective_timeout"})
# (not cuda_graph: the graphed step draws its noise and dropout masks on the device, other
# random numbers than the eager step's, so switching it would not continue the same run)
#: Fields added after runs were first saved: a saved config without them had these values.
_ADDED_KEYS = {"dtype": "float32", "distributed": False, "sync_batchnorm": False,
               "collective_timeout": distributed.DEFAULT_TIMEOUT, "cuda_graph": False}
_COLLECTIVE_TIMEOUT = distributed.DEFAULT_TIMEOUT  # (the field `distributed` hides the module)

CHECKPOINT = "checkpoint.h5"
GENERATOR = "generator.h5"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOSS_CURVE = "losses.png"
SAMPLES = "samples"
_RUN_MARKERS = (CONFIG, CHECKPOINT, METRICS, GENERATOR)


class TrainingDiverged(FloatingPointError):
    """A loss became NaN or infinite; ``step`` is the step that produced it."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class RunDirError(ValueError):
    """The output folder holds a different run (or a run that would be overwritten)."""


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------

_WGAN_DEFAULTS = {"optimizer": "rmsprop", "lr_g": 5e-5, "lr_d": 5e-5, "d_steps": 5,
                  "clip_value": 0.01}
_DEFAULTS = {"optimizer": "adam", "lr_g": 1e-4, "lr_d": 1e-4, "d_steps": 1, "clip_value": 0.0}


#: the optimizer option fields and the optimizer that takes each
_OPTIMIZER_OF = {"beta_1": "adam", "beta_2": "adam", "momentum": "sgd"}
_TITLES = {"adam": "Adam", "sgd": "SGD"}


def _default(name: str):
    """TrainConfig's default of field ``name``."""
    return TrainConfig.__dataclass_fields__[name].default


@dataclass
class TrainConfig:
    """Everything that defines a training run (``rawgan train --help`` lists the same).

    Fields left at None take the loss family's default when the config is made: for
    ``loss="wgan"`` the original WGAN's RMSprop, lr 5e-5, 5 critic steps and weight clipping
    at 0.01 (Arjovsky et al. 2017, Alg. 1); for every other loss the seeds' Adam, lr 1e-4,
    one critic step and no clipping.
    """

    model: str = "dcgan"
    data: str = "mnist"
    data_dir: str | None = None
    split: str = "train"
    num_examples: int | None = None
    download: bool = True
    loss: str = "bce"
    d_steps: int | None = None
    batch_size: int = 256
    noise_dim: int = 100
    optimizer: str | None = None
    lr_g: float | None = None
    lr_d: float | None = None
    beta_1: float = 0.9
    beta_2: float = 0.999
    momentum: float = 0.0
    clip_value: float | None = None
    ema: float | None = None
    epochs: int = 50
    max_steps: int | None = None
    save_every: int = 10
    sample_every: int = 1
    grid_size: int = 64
    eval_every: int = 0
    eval_samples: int | None = None
    seed: int = 0
    backend: str = "numpy"
    dtype: str = "float32"
    out: str | None = None
    progress: bool = True
    distributed: bool = False
    sync_batchnorm: bool = False
    collective_timeout: float = _COLLECTIVE_TIMEOUT
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value is None and name == "optimizer":
                continue
            if not isinstance(value, str) or value.lower() not in choices:
                raise ValueError(f"{name}: {value!r} is not one of {', '.join(choices)}")
            setattr(self, name, value.lower())
        defaults = _WGAN_DEFAULTS if self.loss == "wgan" else _DEFAULTS
        # the fields the loss family filled in (not a dataclass field: not saved or compared)
        self._defaulted = frozenset(k for k in defaults if getattr(self, k) is None)
        for key in self._defaulted:
            setattr(self, key, defaults[key])
        self._check_types()
        if self.data in TOY_DATA and self.model != "mlp":
            raise ValueError(f"data {self.data!r} is 2-D points: use model 'mlp' "
                             f"(the DCGAN is built for 28x28 images)")
        for name in ("batch_size", "noise_dim", "d_steps", "epochs", "save_every",
                     "sample_every", "grid_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_examples", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: off), got {self.eval_every}")
        if self.eval_samples is not None and self.eval_samples < 2:
            raise ValueError(f"eval_samples must be >= 2 (or unset), got {self.eval_samples}")
        if self.eval_every and self.data == "fashion":
            raise ValueError("eval_every: the scores use rawgan's pinned MNIST classifier, "
                             "which means nothing for Fashion-MNIST; train on mnist (or the "
                             "toy data) or leave eval_every at 0")
        for name in ("lr_g", "lr_d"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        for name in ("beta_1", "beta_2", "momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not (math.isfinite(self.clip_value) and self.clip_value >= 0):
            raise ValueError(f"clip_value must be >= 0 (0: no clipping), got {self.clip_value}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema must be a decay in (0, 1) (e.g. 0.999) or unset, got "
                             f"{self.ema}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not (math.isfinite(self.collective_timeout) and self.collective_timeout > 0):
            raise ValueError(f"collective_timeout must be a positive number of seconds, got "
                             f"{self.collective_timeout}")
        self._check_applicable()
        if self.cuda_graph and (self.backend != "cupy" or self.distributed):
            raise ValueError("cuda_graph: the graph-captured step runs on backend 'cupy' "
                             f"without --distributed (got backend {self.backend!r}"
                             f"{', distributed' if self.distributed else ''})")

    def _check_applicable(self) -> None:
        """An option set away from its default where it has no effect is an error naming it
        (``--beta-1 0.5`` with WGAN's RMSprop would otherwise be silently ignored)."""
        unused = [f"{k} {getattr(self, k)} ({_TITLES[_OPTIMIZER_OF[k]]}'s)" for k in _OPTIMIZER_OF
                  if self.optimizer != _OPTIMIZER_OF[k] and getattr(self, k) != _default(k)]
        if unused:
            raise ValueError(f"{', '.join(unused)}: no effect with optimizer "
                             f"{self.optimizer!r} (loss {self.loss!r}); leave "
                             f"{'it' if len(unused) == 1 else 'them'} out, or choose the "
                             "optimizer that takes it")
        if self.data in TOY_DATA:
            toy = [f"{k} {getattr(self, k)!r}" for k in ("split", "data_dir", "grid_size")
                   if getattr(self, k) != _default(k)]
            if toy:
                raise ValueError(f"{', '.join(toy)}: no effect with data {self.data!r} (toy "
                                 f"points are generated, and plotted {TOY_EVAL_POINTS} at a "
                                 "time)")
        # (sync_batchnorm and collective_timeout stay accepted without distributed: one
        # process normalises over the whole batch anyway, and a distributed run resumes on
        # one process with its own config)

    def _check_types(self) -> None:
        kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
        for f in fields(self):
            value = getattr(self, f.name)
            ann = str(f.type)
            if value is None and "None" in ann:
                continue
            base = ann.split("|")[0].strip()
            ok = kinds[base]
            if isinstance(value, os.PathLike) and base == "str":
                value = os.fspath(value)
                setattr(self, f.name, value)
            if not isinstance(value, ok) or (base != "bool" and isinstance(value, bool)):
                raise ValueError(f"{f.name}: expected {base}"
                                 f"{' or nothing' if 'None' in ann else ''}, got {value!r}")
            if base == "float":
                try:
                    setattr(self, f.name, float(value))
                except OverflowError:
                    raise ValueError(f"{f.name}: an integer of {len(str(value))} digits is "
                                     "too large for a float") from None

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``; fields the loss family filled in (left at None when this
        config was made) are filled in again for the new ``loss``, unless ``changes`` sets
        them: ``TrainConfig().replace(loss="wgan")`` is ``TrainConfig(loss="wgan")``
        (RMSprop, 5e-5, ...), not Adam at 1e-4 with a WGAN loss."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(dict.fromkeys(self._defaulted))
        values.update(changes)
        if "optimizer" in self._defaulted and "optimizer" not in changes:
            # the loss family picks the optimizer again: the options of the old one go
            # back to their defaults (bce with beta_1 0.5 -> wgan: RMSprop has no beta_1)
            new = (_WGAN_DEFAULTS if values.get("loss") == "wgan" else _DEFAULTS)["optimizer"]
            for key, owner in _OPTIMIZER_OF.items():
                if new != owner and key not in changes:
                    values[key] = _default(key)
        return TrainConfig(**values)

    # -- conversions ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build from a dict (a TOML file's table, say); keys may use '-' or '_'. Unknown
        keys raise ValueError naming them and the closest known key."""
        known = [f.name for f in fields(cls)]
        clean: dict[str, Any] = {}
        bad = []
        for key, value in values.items():
            k = str(key).replace("-", "_")
            if k not in known:
                close = difflib.get_close_matches(k, known, n=1)
                bad.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            else:
                clean[k] = value
        if bad:
            raise ValueError(f"{source}: unknown key{'s' if len(bad) > 1 else ''} "
                             f"{', '.join(bad)}; known keys: {', '.join(known)}")
        return cls(**clean)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def out_dir(self) -> Path:
        return (Path(self.out).expanduser() if self.out
                else Path("runs") / f"{self.model}-{self.data}")

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (2,) if self.data in TOY_DATA else models.IMAGE_SHAPE


def config_differences(a: Mapping, b: Mapping, ignore=RUN_KEYS) -> list[str]:
    """``["lr_g: 0.0001 -> 0.0002", ...]`` for the keys (not in ``ignore``) that differ."""
    keys = sorted((set(a) | set(b)) - set(ignore))
    missing = object()
    return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}".replace(
        repr(missing), "(absent)") for k in keys if a.get(k, missing) != b.get(k, missing)]


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def read_metrics(path: str | os.PathLike[str]) -> list[dict]:
    """The records of a metrics log (JSON lines); a torn last line is ignored."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if line.strip():
                out.append(json.loads(line))
    return out


def _finite(obj):
    """NaN / inf floats -> None, so a record stays strict JSON (a toy run whose samples miss
    every mode has an undefined reverse KL)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_text_atomic(path: Path, text: str) -> None:
    with checkpoint.atomic_write(path) as tmp:
        tmp.write_text(text)


def _load_data(cfg: TrainConfig, toy_rng: np.random.Generator) -> np.ndarray:
    if cfg.data in TOY_DATA:
        n = cfg.num_examples or TOY_EXAMPLES
        return data.sample_toy(cfg.data, n, toy_rng) / np.float32(TOY_SCALE[cfg.data])
    x, _ = data.load_mnist(cfg.split, data_dir=cfg.data_dir, dataset=cfg.data,
                           download=cfg.download, progress=cfg.progress)
    if cfg.num_examples is not None:
        if cfg.num_examples > len(x):
            raise ValueError(f"num_examples={cfg.num_examples} but the {cfg.data} {cfg.split} "
                             f"split has {len(x)} images")
        x = x[:cfg.num_examples]
    return x


def _optimizer(cfg: TrainConfig, model, lr: float, clip: float | None):
    kw: dict[str, Any] = {"lr": lr, "clip_value": clip}
    if cfg.optimizer == "adam":
        kw.update(beta_1=cfg.beta_1, beta_2=cfg.beta_2)
    elif cfg.optimizer == "sgd":
        kw.update(momentum=cfg.momentum)
    return optim.build(cfg.optimizer, model, **kw)


def _arch(cfg: TrainConfig) -> dict:
    return {"model": cfg.model, "noise_dim": cfg.noise_dim, "image_shape": list(cfg.image_shape),
            "output_scale": TOY_SCALE.get(cfg.data, 1.0), "dtype": cfg.dtype}


def _ema_update(ema_G, G, decay: float) -> None:
    """ema <- ema + (1 - decay) * (p - ema) for every weight, moving BN statistics included."""
    for le, lg in zip(ema_G.layers, G.layers, strict=True):
        for k, p in lg.params.items():
            e = le.params[k]
            e += (1.0 - decay) * (p - e)


class _SigintGuard:
    """First Ctrl-C (SIGINT) or SIGTERM (``kill``, ``timeout``, a scheduler, ``docker stop``)
    sets ``requested``: the loop saves and stops after the current step. The previous
    handlers are put back at once, so a second signal acts as it would have (Ctrl-C raises
    KeyboardInterrupt, SIGTERM terminates)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _SigintGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                with contextlib.suppress(ValueError, OSError):
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _restore(self) -> None:
        for sig, prev in self._previous.items():
            if prev is None:
                prev = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, prev)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self._restore()

    def __exit__(self, *exc) -> None:
        self._restore()


def _progress_bar(cfg: TrainConfig, total: int, initial: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=None, desc=f"{cfg.model}/{cfg.data}", file=sys.stderr)


def _say(cfg: TrainConfig, message: str) -> None:
    if cfg.progress:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)


# --------------------------------------------------------------------------------------
# Output folder
# --------------------------------------------------------------------------------------


def _check_out_dir(out: Path, cfg: TrainConfig, resume: bool) -> checkpoint.Checkpoint | None:
    """Refuse a folder holding another run; return the checkpoint to resume from, if any.

    Reads only; nothing is written before every check has passed.
    """
    present = [m for m in _RUN_MARKERS if (out / m).exists()]
    if not present:
        if resume:
            _say(cfg, f"rawgan train: nothing to resume in {out}: starting a new run")
        return None
    ck = None
    if (out / CHECKPOINT).exists():
        ck = checkpoint.load_checkpoint(out / CHECKPOINT, kind="training")
        _check_progress(ck)
        previous = ck.config
    elif (out / CONFIG).exists():
        try:
            previous = json.loads((out / CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"{out} holds a run whose {CONFIG} cannot be read ({exc}); "
                              "choose another output folder") from None
        if not isinstance(previous, dict):
            raise RunDirError(f"{out / CONFIG} holds a JSON {type(previous).__name__}, not "
                              "the object of a run's settings; choose another output folder")
    else:
        previous = {}
    previous = {**_ADDED_KEYS, **previous}
    diffs = config_differences(previous, cfg.to_dict())
    if diffs:
        unsaved = ck is None and not (out / GENERATOR).exists()
        raise RunDirError(
            f"{out} holds a different run ({', '.join(present)}); its config differs in: "
            f"{'; '.join(diffs)}. Choose another output folder (--out), or resume it with its "
            "own config." + (f" It has no {CHECKPOINT} (a run that stopped before its first "
                             f"save?): delete {out} to reuse the folder." if unsaved else ""))
    if not resume:
        raise RunDirError(
            f"{out} already holds this run ({', '.join(present)}); pass resume=True "
            "(--resume) to continue it, or choose another output folder (--out)")
    if ck is None:
        if (out / GENERATOR).exists() or (out / SUMMARY).exists():
            # a generator or summary is written with/after a checkpoint: it was lost, and
            # starting over would overwrite what the run made
            raise RunDirError(
                f"{out} holds a run that got further ({', '.join(present)}) but no "
                f"{CHECKPOINT} (deleted or moved?): resuming would start it again and "
                f"overwrite its {GENERATOR} and {METRICS}. Put the checkpoint back, or "
                "choose another output folder (--out)")
        _say(cfg, f"rawgan train: {out} has no checkpoint yet: starting the run again")
    return ck


#: config keys that may differ between the ranks of one run (each machine's own paths)
PER_RANK_KEYS = frozenset({"data_dir", "download", "progress", "out"})


def _same_on_every_rank(comm: distributed.Communicator, what: str, mine: dict) -> None:
    """Every rank's ``mine`` equals rank 0's (but for :data:`PER_RANK_KEYS`), else an error
    on every rank: each rank that differs prints what, rank 0 names them. Without it a rank
    launched with other options or other data would train on until its steps ran out (a
    hang) or silently (the same weights, other data)."""
    if comm.size == 1:
        return
    ref = comm.bcast_object(mine, what=f"comparing the ranks' {what}")
    diffs = config_differences(ref, mine, ignore=PER_RANK_KEYS)
    flags = np.zeros(comm.size)
    flags[comm.rank] = bool(diffs)
    comm.allreduce_sum(flags, what=f"comparing the ranks' {what}")
    bad = [r for r in range(comm.size) if flags[r]]
    if bad:
        if diffs:
            print(f"rank {comm.rank} of {comm.size}: {what} differ from rank 0's: "
                  f"{'; '.join(diffs)} (rank 0's value first)", file=sys.stderr, flush=True)
        raise distributed.mark_agreed(RunDirError(
            f"rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of {comm.size} "
            f"do{'es' if len(bad) == 1 else ''} not have rank 0's {what} (each printed what "
            "differs): every rank must run the same training"))


def _rng_bytes(g: np.random.Generator) -> np.ndarray:
    """A generator's state as bytes, for :func:`distributed.check_identical`."""
    return np.frombuffer(json.dumps(checkpoint.rng_state(g), sort_keys=True).encode(),
                         dtype=np.uint8)


def _fingerprint(x: np.ndarray) -> str:
    """SHA-256 of the training set as trained on (dtype, shape, bytes): a resume on other
    data of the same size is refused by it (checkpoint meta ``data_sha256``)."""
    return checkpoint.arrays_sha256([("training set", x)])


def _check_progress(ck: checkpoint.Checkpoint) -> None:
    """The progress counters a resume reads from ``ck.meta``, checked before anything runs."""
    meta = ck.meta
    for key in ("step", "epoch", "batch_in_epoch"):
        v = meta.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise checkpoint.CheckpointError(
                f"{ck.path}: meta[{key!r}] must be a non-negative integer, got {v!r} (not a "
                "checkpoint written by rawgan train)")
    if meta["batch_in_epoch"] > 0 and not isinstance(meta.get("epoch_start_data_rng"), dict):
        raise checkpoint.CheckpointError(
            f"{ck.path}: saved mid-epoch, but meta['epoch_start_data_rng'] (the data order's "
            "state at the start of the epoch) is missing")


# --------------------------------------------------------------------------------------
# Building a run, and evaluating one
# --------------------------------------------------------------------------------------


@dataclass
class Run:
    """The live objects of a run, as :func:`setup_run` builds them from a config: the
    backend ``ops``, the training data ``x``, the networks and optimizers, the data-order
    and noise generators, the fixed noise of the sample grids, and the step geometry."""

    cfg: TrainConfig
    ops: Any
    x: np.ndarray
    G: Any
    D: Any
    ema_G: Any
    opt_g: Any
    opt_d: Any
    data_rng: np.random.Generator
    noise_rng: np.random.Generator
    fixed_noise: np.ndarray
    per_step: int
    steps_per_epoch: int

    @property
    def nets(self) -> dict[str, Any]:
        return {"generator": self.G, "discriminator": self.D,
                **({"ema_generator": self.ema_G} if self.ema_G is not None else {})}

    @property
    def opts(self) -> dict[str, Any]:
        return {"generator": self.opt_g, "discriminator": self.opt_d}

    @property
    def rngs(self) -> dict[str, np.random.Generator]:
        return {"data": self.data_rng, "noise": self.noise_rng}


def setup_run(cfg: TrainConfig) -> Run:
    """Load the data and build the models, optimizers and random streams of ``cfg``, exactly
    as :func:`train` starts a run (``rawgan inspect`` starts its runs with it too).

    Everything is seeded by ``cfg.seed`` (see the module docstring); nothing is written.
    """
    ops = backends.get(cfg.backend)
    data_ss, noise_ss, fixed_ss, toy_ss = np.random.SeedSequence(cfg.seed).spawn(4)
    data_rng, noise_rng = np.random.default_rng(data_ss), np.random.default_rng(noise_ss)
    dtype = np.dtype(cfg.dtype)
    x = _load_data(cfg, np.random.default_rng(toy_ss)).astype(dtype, copy=False)
    per_step = cfg.batch_size * cfg.d_steps
    steps_per_epoch = len(x) // per_step
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size * d_steps = {per_step} exceeds the {len(x)} training "
                         "examples: no full step fits in an epoch")
    n_fixed = TOY_EVAL_POINTS if cfg.data in TOY_DATA else cfg.grid_size
    fixed_noise = np.random.default_rng(fixed_ss).standard_normal(
        (n_fixed, cfg.noise_dim), dtype=np.float32).astype(dtype, copy=False)

    G, D = models.build(cfg.model, seed=cfg.seed, backend=ops, noise_dim=cfg.noise_dim,
                        image_shape=cfg.image_shape, dtype=dtype)
    opt_g = _optimizer(cfg, G, cfg.lr_g, None)
    opt_d = _optimizer(cfg, D, cfg.lr_d, cfg.clip_value or None)
    ema_G = None
    if cfg.ema is not None:
        ema_G = checkpoint.build_generator(_arch(cfg), backend=ops)
        ema_G.set_weights(G.get_weights())  # get_weights/set_weights copy: no aliasing
    return Run(cfg=cfg, ops=ops, x=x, G=G, D=D, ema_G=ema_G, opt_g=opt_g, opt_d=opt_d,
               data_rng=data_rng, noise_rng=noise_rng, fixed_noise=fixed_noise,
               per_step=per_step, steps_per_epoch=steps_per_epoch)


#: Periodic evaluation of image runs scores against at most this many training images (the
#: first ones), which :func:`rawgan.metrics.evaluate_generator` halves: the reference half
#: then has 5,000 images, as ``rawgan eval`` has on the 10,000 MNIST test images.
EVAL_REAL_IMAGES = 10_000
EVAL_IMAGES = 2000  # default generated images per periodic evaluation


def generator_sampler(G, ops, noise_dim: int, scale: float = 1.0, batch_size: int = 500):
    """``sample(n, seed) -> (n, *output)`` NumPy samples of ``G`` in inference mode.

    The noise comes from ``numpy.random.default_rng(seed)`` (the same noise
    :meth:`rawgan.checkpoint.GeneratorSampler.sample` draws), never from a training stream,
    and inference mode draws no dropout mask and leaves BatchNorm's statistics alone, so
    sampling during training changes nothing the next training step computes.
    """

    def sample(n: int, seed: int) -> np.ndarray:
        z = np.random.default_rng(seed).standard_normal((int(n), noise_dim), dtype=np.float32)
        z = z.astype(G.dtype or np.float32, copy=False)
        out = np.concatenate([ops.to_numpy(G.forward(ops.asarray(z[i:i + batch_size]),
                                                     training=False))
                              for i in range(0, len(z), batch_size)])
        return out * np.float32(scale) if scale != 1.0 else out

    return sample


def evaluate_run(cfg: TrainConfig, G, ops, x: np.ndarray) -> dict[str, Any]:
    """The scores ``rawgan train --eval-every`` logs, of generator ``G`` (the EMA generator
    when the run keeps one).

    Toy data: :func:`rawgan.metrics.mode_metrics` of ``cfg.eval_samples`` (default 2,500,
    the published protocol) points, in the data's own (unscaled) coordinates, with the
    default ``min_count`` (the rule ``rawgan eval`` and the sample plots use).
    Images: :func:`rawgan.metrics.evaluate_generator` of ``cfg.eval_samples`` (default
    2,000; at most half the reference images) samples against the first
    :data:`EVAL_REAL_IMAGES` training images, without the reference rows: FLD, KID (with
    its std over subsets) and the classifier score. Both draw their noise from
    ``seed = cfg.seed`` alone, so every evaluation of a run uses the same noise.
    """
    from . import metrics

    if cfg.data in TOY_DATA:
        n = cfg.eval_samples or TOY_EVAL_POINTS
        sample = generator_sampler(G, ops, cfg.noise_dim, TOY_SCALE[cfg.data])
        centers, std = data.toy_modes(cfg.data)
        return metrics.mode_metrics(sample(n, cfg.seed), centers, std)
    real = x[:EVAL_REAL_IMAGES]
    n = min(cfg.eval_samples or EVAL_IMAGES, len(real) // 2)
    if n < 2:
        raise ValueError(f"eval_every: {len(real)} training images are too few to evaluate")
    if cfg.eval_samples is not None and n < cfg.eval_samples:
        warnings.warn(f"eval_samples {cfg.eval_samples}: the {len(real)} training images give "
                      f"a reference half of {len(real) // 2}, so each evaluation scores {n} "
                      "samples", SampleSizeWarning, stacklevel=2)
    res = metrics.evaluate_generator(generator_sampler(G, ops, cfg.noise_dim), real, n=n,
                                     seed=cfg.seed, references=False)
    return {**res["generator"], "n_reference": res["n_reference"]}


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def train(config: TrainConfig | Mapping[str, Any] | None = None, *, resume: bool = False,
          comm: distributed.Communicator | None = None, **overrides: Any) -> dict[str, Any]:
    """Train a GAN as ``config`` says and return a summary dict (also in summary.json).

    ``config`` is a :class:`TrainConfig`, a dict of its fields, or None (all defaults);
    ``overrides`` replace fields. ``resume=True`` continues the run in ``config.out`` from
    its checkpoint (the config must match, except :data:`RUN_KEYS` such as ``epochs``).

    ``config.distributed`` (``rawgan train --distributed`` under ``mpiexec -n S``) trains
    data-parallel on S ranks (:mod:`rawgan.distributed`): each rank computes on B/S rows
    of every global batch, the gradients are averaged, only rank 0 writes. ``comm`` passes
    a communicator of one's own instead (default: MPI, or NCCL for a GPU backend, when
    ``distributed``; one process otherwise). On ranks other than 0 the returned summary
    holds only ``rank``, ``ranks``, ``steps``, ``stopped`` and ``out``.

    Raises :class:`RunDirError`, :class:`TrainingDiverged`, :class:`rawgan.checkpoint.
    CheckpointError`, data errors from :mod:`rawgan.data`, and KeyboardInterrupt after
    saving a checkpoint on Ctrl-C. In a job of several ranks an error that is not the same
    on every rank (an I/O error on rank 0, say) prints its rank and ends the whole job
    (``MPI_Abort``); those that are (config, output folder, divergence, Ctrl-C) end it
    cleanly, printed by rank 0 only.
    """
    if config is None:
        cfg = TrainConfig(**overrides)
    elif isinstance(config, TrainConfig):
        cfg = config.replace(**overrides) if overrides else config
    else:
        cfg = TrainConfig.from_dict({**dict(config), **overrides})
    require_extras("PIL", "matplotlib", *(("tqdm",) if cfg.progress else ()))
    if comm is None:
        try:
            comm = _communicator(cfg)
        except BaseException as exc:  # one rank's failure must not leave the others waiting
            if cfg.distributed:
                distributed.abort_job(exc)
            raise
    try:
        return _train(cfg, resume, comm)
    except BaseException as exc:
        exc.rawgan_rank = comm.rank  # type: ignore[attr-defined]
        if comm.size > 1 and not getattr(exc, "rawgan_agreed", False):
            print(f"rawgan train: rank {comm.rank} of {comm.size}: {type(exc).__name__}: "
                  f"{exc}; ending the job", file=sys.stderr, flush=True)
            comm.abort(1)
        raise


def _communicator(cfg: TrainConfig) -> distributed.Communicator:
    """One process unless ``cfg.distributed``; then MPI for host arrays, NCCL for a GPU
    backend (CuPy arrays)."""
    if not cfg.distributed:
        return distributed.SingleProcess(cfg.collective_timeout)
    if cfg.backend == "cupy":  # NCCL picks this rank's GPU before any kernel is loaded
        return distributed.get("nccl", cfg.collective_timeout)
    ops = backends.get(cfg.backend)
    kind = "mpi" if ops.xp is np else "nccl"
    return distributed.get(kind, cfg.collective_timeout)


class _NoLog:
    """What ranks other than 0 write metrics to: nothing."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _train(cfg: TrainConfig, resume: bool, comm: distributed.Communicator) -> dict[str, Any]:
    root, ranks = comm.is_root, comm.size
    if not root:
        cfg = dataclasses.replace(cfg, progress=False)  # rank 0 alone reports
    if cfg.batch_size % ranks:
        raise distributed.mark_agreed(ValueError(
            f"batch_size {cfg.batch_size} does not split over {ranks} ranks: each rank "
            f"computes on batch_size / ranks rows of every global batch, so the batch size "
            f"must be a multiple of {ranks}"))
    _same_on_every_rank(comm, "settings", cfg.to_dict())
    out = cfg.out_dir
    ck = comm.root_result(lambda: _check_out_dir(out, cfg, resume),
                          what="checking the run folder")

    run = comm.root_first(lambda: setup_run(cfg), what="loading the data")
    data_sha256 = _fingerprint(run.x)
    # each rank loads its own copy (its own cache on another machine): the same bytes, or
    # the ranks would train on different data with identical weights and no error
    _same_on_every_rank(comm, "training data", {"data_sha256": data_sha256})
    ops, x, per_step, steps_per_epoch = run.ops, run.x, run.per_step, run.steps_per_epoch
    G, D, ema_G, opt_g, opt_d = run.G, run.D, run.ema_G, run.opt_g, run.opt_d
    data_rng, noise_rng, fixed_noise = run.data_rng, run.noise_rng, run.fixed_noise
    nets, opts, rngs = run.nets, run.opts, run.rngs
    toy = cfg.data in TOY_DATA
    dtype = np.dtype(cfg.dtype)

    # data parallelism: shard the batches, average the gradients (the checkpoint keeps the
    # wrapped optimizers, whose state is global)
    step_opt_g, step_opt_d = opt_g, opt_d
    if ranks > 1:
        distributed.prepare_models([G, D], comm, cfg.batch_size // ranks, cfg.sync_batchnorm)
        step_opt_g = distributed.DistributedOptimizer(opt_g, comm, "generator")
        step_opt_d = distributed.DistributedOptimizer(opt_d, comm, "discriminator")

    step, epoch, batch_in_epoch, epoch_start_state = 0, 0, 0, None
    train_seconds = 0.0
    saved_spe = ck.meta.get("steps_per_epoch") if ck is not None else None
    if saved_spe is not None and saved_spe != steps_per_epoch:
        raise distributed.mark_agreed(RunDirError(
            f"{out / CHECKPOINT} was saved with {saved_spe} steps per epoch, the data found now "
            f"gives {steps_per_epoch} ({len(x)} examples): not the same training set (other "
            "files in the data folder?); resuming would not continue the same run"))
    saved_sha = ck.meta.get("data_sha256") if ck is not None else None
    if saved_sha is not None and saved_sha != data_sha256:
        raise distributed.mark_agreed(RunDirError(
            f"{out / CHECKPOINT} was saved training on other data: the {len(x)} examples "
            f"found now have SHA-256 {data_sha256[:16]}..., the run's had {saved_sha[:16]}... "
            "(another data set in the folder, e.g. Fashion-MNIST files where MNIST was?); "
            "resuming would not continue the same run"))
    if ck is not None:
        checkpoint.restore(ck, models=nets, optimizers=opts, rngs=rngs)
        step, epoch = int(ck.meta["step"]), int(ck.meta["epoch"])
        batch_in_epoch = int(ck.meta["batch_in_epoch"])
        epoch_start_state = ck.meta.get("epoch_start_data_rng")
        train_seconds = float(ck.meta.get("train_seconds", 0.0))
        if root:
            records = [r for r in read_metrics(out / METRICS) if r.get("step", 0) <= step]
            _write_text_atomic(out / METRICS, "".join(json.dumps(r) + "\n" for r in records))
        was = int(ck.meta.get("world_size", 1))
        _say(cfg, f"rawgan train: resuming {out} at step {step} (epoch {epoch + 1})"
                  + (f" on {ranks} ranks (saved by {was})" if ranks > 1 or was > 1 else ""))
    elif root:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS).unlink(missing_ok=True)
    if root:
        for stale in (checkpoint.remove_stale_temporaries(out)
                      + checkpoint.remove_stale_temporaries(out / SAMPLES)):
            _say(cfg, f"rawgan train: removed {stale.name}, left by a save that was killed")
        _write_text_atomic(out / CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")
    if ranks > 1:
        _say(cfg, f"rawgan train: {ranks} ranks ({comm.kind}), {cfg.batch_size // ranks} of "
                  f"every {cfg.batch_size} rows each, batch norm "
                  f"{'synchronised' if cfg.sync_batchnorm else 'per rank'}")
    resumed_from = step

    sample_G = ema_G if ema_G is not None else G
    last_saved = {"step": step if ck is not None else None}

    def consistent() -> None:
        """Average the moving statistics over the ranks (per-rank batch norm) and check that
        every rank holds the same weights, optimizer state, layer generators and data and
        noise generators."""
        if ranks == 1:
            return
        distributed.sync_buffers(list(nets.values()), comm)
        groups: dict[str, list] = {}
        for name, net in nets.items():
            groups[f"{name} weights"] = list(net.weights().values())
            groups[f"{name} dropout generators"] = [_rng_bytes(layer.rng) for layer in
                                                     net.layers if layer.rng is not None]
        for name, opt in opts.items():
            groups[f"{name} optimizer state"] = [
                np.asarray(ops.to_numpy(a)) for _, per in sorted(opt.state.items())
                for _, a in sorted(per.items())]
        # the run's own streams too (batch order and noise: every rank draws the global
        # batch and takes its rows, so these must not drift apart either)
        groups["data and noise generators"] = [_rng_bytes(g) for g in rngs.values()]
        distributed.check_identical(groups, comm)

    def diverged(at_step: int, at_epoch: int, what: str) -> TrainingDiverged:
        good = (f"the last good checkpoint, {out / CHECKPOINT} (step {last_saved['step']}), is "
                f"kept" if last_saved["step"] is not None else "no checkpoint had been saved yet")
        return TrainingDiverged(
            f"training diverged at step {at_step} (epoch {at_epoch}): {what}; stopped without "
            f"saving, {good}. Try a lower learning rate or another --loss.", at_step)

    def check_finite() -> None:
        """Before samples, scores or a save (every rank calls it): no model may hold NaN /
        inf (a diverged update with finite losses); then nothing is written over the last
        good files. One all-reduce of the flags, so every rank stops alike."""
        flags = np.array([0.0 if all(bool(np.isfinite(ops.to_numpy(a)).all())
                                     for a in net.weights().values()) else 1.0
                          for net in nets.values()])
        if ranks > 1:
            comm.allreduce_max(flags, what="weights finiteness check")
        bad = [name for name, f in zip(nets, flags, strict=True) if f > 0]
        if bad:
            raise distributed.mark_agreed(diverged(
                step, epoch + (batch_in_epoch > 0),
                f"the {' and '.join(bad)} weights hold NaN or inf after the update (the "
                f"losses were finite)"))

    def save() -> Path | None:
        check_finite()
        consistent()
        last_saved["step"] = step
        if not root:
            return None
        meta = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "epoch_start_data_rng": epoch_start_state, "train_seconds": train_seconds,
                "steps_per_epoch": steps_per_epoch, "world_size": ranks,
                "data_sha256": data_sha256}
        return checkpoint.save_checkpoint(out / CHECKPOINT, models=nets, optimizers=opts,
                                          rngs=rngs, config=cfg.to_dict(), meta=meta,
                                          arch=_arch(cfg))

    def export() -> Path:
        return checkpoint.export_generator(
            out / GENERATOR, sample_G, model=cfg.model, noise_dim=cfg.noise_dim,
            image_shape=cfg.image_shape, output_scale=TOY_SCALE.get(cfg.data, 1.0),
            config=cfg.to_dict(), meta={"step": step, "epoch": epoch})

    def generate_fixed() -> np.ndarray:
        y = ops.to_numpy(sample_G.forward(ops.asarray(fixed_noise), training=False))
        return y * y.dtype.type(TOY_SCALE[cfg.data]) if toy else y

    coverage: dict | None = None
    samples: list[str] = []
    sampled_at = {"step": None}
    mode_history: list[dict] = []

    def write_samples(name: str) -> None:
        nonlocal coverage
        path = out / SAMPLES / name
        sampled_at["step"] = step
        fake = generate_fixed()
        if toy:
            centers, std = data.toy_modes(cfg.data)
            with warnings.catch_warnings():  # 2,500 points: the only possible warning is
                warnings.simplefilter("ignore", SampleSizeWarning)  # "no sample on a mode"
                coverage = mode_coverage(fake, centers, std)
            mode_history.append({"epoch": epoch, "step": step,
                                 "modes_covered": coverage["modes_covered"],
                                 "high_quality": round(coverage["high_quality"], 4)})
            real = x[:TOY_EVAL_POINTS] * x.dtype.type(TOY_SCALE[cfg.data])
            save_scatter(path, fake, modes=centers, real=real,
                         title=f"{cfg.data}, epoch {epoch}, step {step}: "
                               f"{coverage['modes_covered']}/{coverage['n_modes']} modes")
        else:
            save_image_grid(path, fake)
        samples.append(str(path))

    def evaluate(log) -> None:
        t0 = time.perf_counter()
        scores = evaluate_run(cfg, sample_G, ops, x)
        rec = {"step": step, "epoch": epoch, "eval": scores,
               "eval_seconds": round(time.perf_counter() - t0, 3)}
        log.write(json.dumps(_finite(rec)) + "\n")
        log.flush()
        _say(cfg, f"epoch {epoch}: eval " + ", ".join(
            f"{k} {v:.4g}" for k, v in scores.items()
            if k in ("fld", "kid", "score", "modes_covered", "high_quality", "reverse_kl")))

    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    if ranks > 1:  # every rank draws the global noise batch and keeps its rows
        noise = distributed.shard_noise(noise_rng, cfg.noise_dim, comm, ops=ops, dtype=dtype)
    else:
        noise = gan.gaussian_noise(noise_rng, cfg.noise_dim, ops=ops, dtype=dtype)
    graphed = None
    if cfg.cuda_graph:  # the whole step as one CUDA graph (rawgan/graphed.py)
        from .graphed import GraphedStep

        key = int(np.random.SeedSequence([cfg.seed, 0x6772]).generate_state(1, np.uint64)[0])
        graphed = GraphedStep(G, D, step_opt_g, step_opt_d, cfg.loss, cfg.batch_size,
                              cfg.d_steps, cfg.noise_dim, seed=key, start_step=step)
    stopped = "completed"
    session_images, session_seconds = 0, 0.0
    last: gan.StepStats | None = None
    interrupt = False
    bar = _progress_bar(cfg, total_steps, min(step, total_steps))
    log = open(out / METRICS, "a") if root else _NoLog()  # closed in the finally below
    try:
        with _SigintGuard() as sigint:
            while epoch < cfg.epochs and step < total_steps:
                if batch_in_epoch == 0:
                    epoch_start_state = checkpoint.rng_state(data_rng)
                else:  # resuming mid-epoch: replay this epoch's permutation, skip what's done
                    checkpoint.set_rng_state(data_rng, epoch_start_state)
                batches = data.iterate_minibatches(x, cfg.batch_size, data_rng)
                if batch_in_epoch:
                    next(itertools.islice(batches, batch_in_epoch * cfg.d_steps - 1, None))
                while batch_in_epoch < steps_per_epoch and step < total_steps:
                    comm.step = step + 1
                    t0 = time.perf_counter()
                    if ranks > 1:  # the global batch, this rank's rows of it
                        reals = [ops.asarray(distributed.shard_rows(next(batches), comm))
                                 for _ in range(cfg.d_steps)]
                    elif graphed is not None:  # host batches: copied into the graph's buffers
                        reals = [next(batches) for _ in range(cfg.d_steps)]
                    else:
                        reals = [ops.asarray(next(batches)) for _ in range(cfg.d_steps)]
                    try:
                        # several ranks: NaN / inf logits on one rank's rows are computed
                        # on, so that rank still joins the all-reduces; the statistics
                        # all-reduce below then stops every rank at this step, agreed
                        with (losses.nonfinite_allowed() if ranks > 1
                              else contextlib.nullcontext()):
                            if graphed is not None:
                                stats = graphed(reals)
                            else:
                                stats = gan.train_step(G, D, step_opt_g, step_opt_d,
                                                       cfg.loss, reals, noise)
                    except losses.NonFiniteLogits as exc:  # D's output overflowed: the
                        # weights diverged in an earlier update (one process)
                        raise diverged(step + 1, epoch + 1, str(exc)) from None
                    interrupt = sigint.requested
                    nonfinite = False
                    if ranks > 1:  # the global batch's means, and a Ctrl-C or non-finite
                        # logits seen by any rank
                        buf = np.array([stats.d_loss, stats.g_loss, stats.d_real,
                                        stats.d_fake, float(interrupt),
                                        float(losses.nonfinite_seen())])
                        comm.allreduce_sum(buf, what="training-statistics all-reduce")
                        stats = gan.StepStats(*(float(v) / ranks for v in buf[:4]))
                        interrupt = bool(buf[4] > 0)
                        nonfinite = bool(buf[5] > 0)
                    if nonfinite:
                        raise distributed.mark_agreed(diverged(
                            step + 1, epoch + 1, "the discriminator's logits hold NaN or inf "
                            "(on some rank's rows)"))
                    dt = time.perf_counter() - t0
                    if not (math.isfinite(stats.d_loss) and math.isfinite(stats.g_loss)):
                        raise distributed.mark_agreed(diverged(
                            step + 1, epoch + 1, f"d_loss={stats.d_loss}, g_loss={stats.g_loss}"))
                    if ema_G is not None:
                        _ema_update(ema_G, G, cfg.ema)
                    step += 1
                    batch_in_epoch += 1
                    train_seconds += dt
                    session_seconds += dt
                    session_images += per_step
                    last = stats
                    rec = {"step": step, "epoch": epoch + 1, "d_loss": stats.d_loss,
                           "g_loss": stats.g_loss, "d_real": stats.d_real,
                           "d_fake": stats.d_fake, "images_per_s": round(per_step / dt, 2)}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    if bar is not None:
                        bar.set_postfix(d_loss=f"{stats.d_loss:.4f}", g_loss=f"{stats.g_loss:.4f}",
                                        img_s=f"{per_step / dt:.0f}", refresh=False)
                        bar.update(1)
                    if interrupt:
                        break
                if batch_in_epoch == steps_per_epoch:
                    epoch += 1
                    batch_in_epoch = 0
                    sample_now = epoch % cfg.sample_every == 0 or epoch == cfg.epochs
                    eval_now = bool(cfg.eval_every) and epoch % cfg.eval_every == 0
                    if sample_now or eval_now:  # per-rank moving statistics -> their mean
                        distributed.sync_buffers([G, ema_G], comm)
                        check_finite()
                    if sample_now and root:
                        write_samples(f"epoch_{epoch:04d}.png")
                    if eval_now and root:
                        evaluate(log)
                    if epoch % cfg.save_every == 0:
                        save()
                    if last is not None:
                        _say(cfg, f"epoch {epoch}: step {step}, d_loss {last.d_loss:.4f}, "
                                  f"g_loss {last.g_loss:.4f}, D(x) {last.d_real:.3f}, "
                                  f"D(G(z)) {last.d_fake:.3f}")
                if ranks == 1:  # one process: a Ctrl-C during the epoch's end counts too
                    interrupt = interrupt or sigint.requested
                if interrupt:
                    if step < total_steps:  # (a Ctrl-C during the last step: it is done)
                        stopped = "interrupted"
                    break
            comm.step = None
            if stopped != "interrupted" and step >= total_steps and epoch < cfg.epochs:
                stopped = "max_steps"
            # rank 0 decides (only it sees the folder); every rank takes part in a save
            if comm.bcast_object(last_saved["step"] != step or not (out / CHECKPOINT).exists(),
                                 what="final checkpoint decision"):
                save()
            if root:  # (the state exported is the one save() just checked, or checked
                export()  # when this step was saved)
            if stopped == "interrupted":
                _say(cfg, f"rawgan train: interrupted; saved {out / CHECKPOINT} at step "
                          f"{step}; continue with --resume")
                raise distributed.mark_agreed(KeyboardInterrupt())
    finally:
        log.close()
        if bar is not None:
            bar.close()

    if not root:
        return {"rank": comm.rank, "ranks": ranks, "steps": step, "stopped": stopped,
                "out": str(out)}
    records = read_metrics(out / METRICS)
    evals = [r for r in records if "eval" in r]
    trained = step > resumed_from or ck is None
    if sampled_at["step"] != step and trained:  # the final generator, unless just sampled
        write_samples(f"step_{step:08d}.png")
    if not trained and (out / SUMMARY).exists():
        # a resume with nothing left to do: the run's summary stays as the run wrote it
        try:
            kept = json.loads((out / SUMMARY).read_text())
        except (OSError, json.JSONDecodeError):
            kept = None
        if isinstance(kept, dict):
            return kept
    loss_curve = (str(save_loss_curve(out / LOSS_CURVE, records,
                                      title=f"{cfg.model} / {cfg.data} / {cfg.loss}"))
                  if records else None)
    summary: dict[str, Any] = {
        "out": str(out), "stopped": stopped, "steps": step, "epochs_completed": epoch,
        "steps_per_epoch": steps_per_epoch, "resumed_from_step": resumed_from,
        "d_loss": last.d_loss if last else None, "g_loss": last.g_loss if last else None,
        "d_real": last.d_real if last else None, "d_fake": last.d_fake if last else None,
        "seconds": round(session_seconds, 3),
        "images_per_s": round(session_images / session_seconds, 2) if session_seconds else None,
        "checkpoint": str(out / CHECKPOINT), "generator": str(out / GENERATOR),
        "samples": samples, "loss_curve": loss_curve, "metrics": str(out / METRICS),
    }
    if ranks > 1:
        summary.update(ranks=ranks, communicator=comm.kind, allreduce_calls=comm.calls,
                       allreduce_seconds=round(comm.seconds, 3),
                       gradient_allreduce_seconds=round(step_opt_g.seconds
                                                        + step_opt_d.seconds, 3))
    if coverage is not None:
        summary.update(modes_covered=coverage["modes_covered"], n_modes=coverage["n_modes"],
                       high_quality=coverage["high_quality"], per_mode=coverage["per_mode"],
                       mode_history=mode_history)
    if evals:
        summary.update(eval=evals[-1]["eval"], eval_history=evals)
    _write_text_atomic(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary
