"""The ``rawgan`` command: ``rawgan train``, ``sample``, ``eval``, ``inspect``, ``gradcheck``.

``main(argv) -> int`` is the console-script entry point (``rawgan = "rawgan.cli:main"``).
Exit status: 0 success, 1 a run-time error (message on stderr, no traceback), 2 a usage
error (unknown option or value, bad config file), 130 interrupted by Ctrl-C (after the
checkpoint was saved).

``rawgan train`` options come in three layers, each overriding the one before: the
defaults of :class:`rawgan.train.TrainConfig`, then ``--config FILE.toml`` (top-level keys
named like the options, ``-`` or ``_``: ``lr_g = 2e-4``), then the flags on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from . import __version__

PROG = "rawgan"

# field -> (help, metavar); defaults are read from TrainConfig and appended.
_HELP: dict[str, tuple[str, str | None]] = {
    "model": ("architecture: the seeds' DCGAN (28x28 images) or the MLP GAN", None),
    "data": ("training data: MNIST, Fashion-MNIST, or the toy 2-D mixtures (8 Gaussians "
             "on a ring, 25 on a grid; these need --model mlp)", None),
    "data_dir": ("folder holding the IDX files (t10k-images-idx3-ubyte.gz, ...), directly "
                 "or in a mnist/ or fashion/ subfolder", "DIR"),
    "split": ("which MNIST split to train on; 'test' is the 10,000-image t10k files", None),
    "num_examples": ("train on the first N examples only (toy data: the size of the sampled "
                     "training set)", "N"),
    "download": ("download missing MNIST files (MD5-checked) into the data folder", None),
    "loss": ("GAN loss family: bce (the seeds' non-saturating BCE), minimax, wgan, hinge, "
             "lsgan", None),
    "d_steps": ("critic (discriminator) updates per generator update, each on its own real "
                "batch", "K"),
    "batch_size": ("images per batch", "N"),
    "noise_dim": ("size of the generator's input noise z ~ N(0, I)", "N"),
    "optimizer": ("optimizer of both networks", None),
    "lr_g": ("generator learning rate", "LR"),
    "lr_d": ("discriminator learning rate", "LR"),
    "beta_1": ("Adam beta_1 (Keras default, as the seeds)", "B"),
    "beta_2": ("Adam beta_2", "B"),
    "momentum": ("SGD momentum", "M"),
    "clip_value": ("clip discriminator weights to [-C, C] after each update (WGAN); 0: off",
                   "C"),
    "ema": ("keep an exponential moving average of the generator weights with this decay "
            "(e.g. 0.999); samples and the export then use it", "DECAY"),
    "epochs": ("passes over the training set", "N"),
    "max_steps": ("stop after this many generator steps (across epochs and resumes)", "N"),
    "save_every": ("save a checkpoint every N epochs (and always at the end)", "N"),
    "sample_every": ("write a sample grid every N epochs", "N"),
    "grid_size": ("images in each sample grid (fixed noise batch)", "N"),
    "eval_every": ("score the generator every N epochs (FLD, KID and classifier score on "
                   "rawgan's MNIST classifier; mode coverage for toy data) into "
                   "metrics.jsonl and summary.json; 0: off", "N"),
    "eval_samples": ("generated samples per evaluation (images: at most half of the first "
                     "10,000 training images)", "N"),
    "seed": ("seeds weights, data order, noise and dropout: same seed + config = same "
             "losses step for step on the numpy backend", "N"),
    "backend": ("compute backend; auto tries the GPU, else numpy (with a warning)", None),
    "dtype": ("floating-point type of the weights, data and noise (float64: for exact "
              "comparisons; the numpy backend runs both)", None),
    "out": ("run folder for checkpoints, samples, metrics.jsonl, losses.png", "RUN_DIR"),
    "progress": ("show a progress bar and per-epoch lines (the bar only on a terminal)", None),
    "distributed": ("data-parallel training on the ranks of an MPI job: mpiexec -n N rawgan "
                    "train --distributed ... (needs mpi4py and an MPI: pip install mpi4py "
                    "mpich; and OMP_NUM_THREADS=cores/N); each rank computes on batch-size / N "
                    "rows of every batch, gradients are averaged, rank 0 writes; NCCL for "
                    "--backend cupy", None),
    "sync_batchnorm": ("with --distributed: batch norm uses the whole global batch's "
                       "statistics (two all-reduces per layer and step); off: each rank's "
                       "own rows", None),
    "cuda_graph": ("with --backend cupy: capture the whole training step (noise, dropout, "
                   "both updates) once as a CUDA graph and replay it every step "
                   "(rawgan/graphed.py; device-side random numbers, so other draws than "
                   "without it)", None),
    "collective_timeout": ("with --distributed: seconds a rank waits in one all-reduce or "
                           "broadcast before it reports the step and ends the job (a rank "
                           "died or hangs)", "S"),
}

_DEFAULT_TEXT = {
    "data_dir": "$RAWGAN_DATA, else ~/.cache/rawgan",
    "num_examples": "all; toy data: 100000",
    "d_steps": "1; 5 for --loss wgan",
    "optimizer": "adam; rmsprop for --loss wgan",
    "lr_g": "1e-4; 5e-5 for --loss wgan",
    "lr_d": "1e-4; 5e-5 for --loss wgan",
    "clip_value": "0; 0.01 for --loss wgan",
    "ema": "off",
    "eval_samples": "2000; toy data: 2500",
    "max_steps": "no limit",
    "out": "runs/MODEL-DATA",
}


def _optional(kind):
    """argparse type: a ``kind`` value, or 'none' for unset."""

    def parse(text: str):
        if text.lower() in ("none", "off", ""):
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}"
                                             ) from None

    parse.__name__ = kind.__name__
    return parse


def _add_train_options(p: argparse.ArgumentParser, defaults: dict[str, str] | None = None
                       ) -> None:
    """Every TrainConfig field as a flag; ``defaults`` overrides the defaults shown."""
    from .train import CHOICES, TrainConfig

    types = {"int": int, "float": float, "str": str}
    shown = {**_DEFAULT_TEXT, **(defaults or {})}
    for f in dataclasses.fields(TrainConfig):
        help_text, metavar = _HELP[f.name]
        default = shown.get(f.name, f.default)
        if isinstance(default, bool):
            default = "on" if default else "off"
        help_text = f"{help_text} (default: {default})"
        flag = "--" + f.name.replace("_", "-")
        ann = str(f.type)
        base = ann.split("|")[0].strip()
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if base == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        else:
            kw["metavar"] = metavar
        kind = types[base]
        kw["type"] = _optional(kind) if "None" in ann and f.name not in CHOICES else kind
        p.add_argument(flag, **kw)
    p.add_argument("-q", "--quiet", dest="progress", action="store_false",
                   default=argparse.SUPPRESS, help="same as --no-progress")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="rawgan: GANs with hand-written forward and backward passes.")
    parser.add_argument("--version", action="version", version=f"rawgan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser(
        "train", help="train a GAN (checkpoints, sample grids, metrics, resume)",
        description="Train a GAN. Writes to the run folder: checkpoint.h5, generator.h5, "
                    "samples/epoch_NNNN.png, metrics.jsonl, losses.png, summary.json.",
        epilog="examples:\n"
               "  rawgan train --epochs 50                     # DCGAN on MNIST (downloads)\n"
               "  rawgan train --data-dir ~/mnist --split test --epochs 1 --out runs/t\n"
               "  rawgan train --model mlp --data ring --epochs 20\n"
               "  rawgan train --epochs 20 --eval-every 5      # FLD, KID, score\n"
               "  rawgan train --config run.toml --lr-g 2e-4   # flags override the file\n"
               "  rawgan train --out runs/t --epochs 100 --resume\n"
               "  mpiexec -n 2 rawgan train --distributed --epochs 5   # data-parallel",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", metavar="FILE.toml", type=Path,
                   help="TOML file with any of the options below as top-level keys "
                        "(lr_g = 2e-4); flags given here override it (default: none)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (the config must "
                        "match, except epochs, max-steps and other run-length options) "
                        "(default: off)")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config as JSON and exit (default: off)")
    _add_train_options(t)
    t.set_defaults(func=_cmd_train, sub_parser=t)

    s = sub.add_parser(
        "sample", help="sample a trained generator into a PNG grid",
        description="Write a grid of samples (a scatter plot for 2-D toy models) from a "
                    "generator export (generator.h5) or a training checkpoint.")
    s.add_argument("checkpoint", metavar="CHECKPOINT", type=Path,
                   help="generator.h5 or checkpoint.h5 of a run")
    s.add_argument("-n", "--num", type=int, default=64, metavar="N",
                   help="number of samples (default: 64)")
    s.add_argument("--out", type=Path, default=Path("grid.png"), metavar="PNG",
                   help="output image (default: grid.png)")
    s.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    s.add_argument("--nrow", type=int, default=None, metavar="N",
                   help="images per row (default: ceil(sqrt(n)))")
    s.add_argument("--scale", type=int, default=1, metavar="S",
                   help="enlarge each image S times (default: 1)")
    s.set_defaults(func=_cmd_sample, sub_parser=s)

    e = sub.add_parser("eval", add_help=False,
                       help="score a generator: FLD, KID, classifier score (MNIST) or mode "
                            "coverage (toy data), with reference rows (rawgan eval --help)")
    e.set_defaults(func=None)

    i = sub.add_parser(
        "inspect", help="train a few steps with every layer's activations and gradients "
                        "recorded; HDF5 + plots; --compare-losses minimax,bce",
        description="Train N steps (options as rawgan train, or --from a checkpoint) with\n"
                    "rawgan.inspect.Recorder on: per layer and step, statistics of the\n"
                    "activations, input gradients, parameter gradients and updates.\n"
                    "Writes to --out (default: runs/inspect-MODEL-DATA): inspect.h5 (layout\n"
                    "in docs/inspect.md), grad_norms.png, d_outputs.png and\n"
                    "activations_step_NNNN.png. With --compare-losses it runs each generator\n"
                    "loss from the same start and prints the generator's gradient norms\n"
                    "per layer, writing inspect_LOSS.h5 and compare_losses.png.",
        epilog="examples:\n"
               "  rawgan inspect --model mlp --data-dir ~/mnist --split test --steps 50\n"
               "  rawgan inspect --from runs/dcgan-mnist/checkpoint.h5 --steps 20\n"
               "  rawgan inspect --model mlp --compare-losses minimax,bce --d-warmup 100",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("--steps", type=int, default=100, metavar="N",
                   help="training steps to record (default: 100)")
    i.add_argument("--from", dest="from_checkpoint", type=Path, default=None,
                   metavar="CHECKPOINT",
                   help="continue a training checkpoint (checkpoint.h5 of a run): its "
                        "config, weights, optimizer state and random streams; flags given "
                        "here override its config (default: a fresh run)")
    i.add_argument("--hist-steps", default="0,last", metavar="LIST",
                   help="steps whose whole tensors are kept and whose activation "
                        "histograms are drawn: comma-separated, 'last' or negative counts "
                        "from the end (default: 0,last)")
    i.add_argument("--compare-losses", default=None, metavar="A,B",
                   help="run these generator losses (e.g. minimax,bce) from the same "
                        "start and print the generator's gradient norms per layer "
                        "(default: off)")
    i.add_argument("--d-warmup", type=int, default=0, metavar="K",
                   help="with --compare-losses: train the discriminator alone for K "
                        "steps first, so it rejects the fakes as early in training "
                        "(default: 0)")
    i.add_argument("--config", metavar="FILE.toml", type=Path,
                   help="TOML file with training options, as for rawgan train "
                        "(default: none)")
    _add_train_options(i, {"out": "runs/inspect-MODEL-DATA"})
    i.set_defaults(func=_cmd_inspect, sub_parser=i)

    g = sub.add_parser("gradcheck", add_help=False,
                       help="finite-difference gradient checks (rawgan gradcheck --help)")
    g.set_defaults(func=None)
    b = sub.add_parser("bench", add_help=False,
                       help="benchmark the ops and the training step against PyTorch and the "
                            "measured ceilings (rawgan bench --help)")
    b.set_defaults(func=None)
    return parser


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


def _err(command: str, message: str) -> None:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)


def _train_config(args: argparse.Namespace, parser: argparse.ArgumentParser,
                  base: dict[str, Any] | None = None, skip: frozenset[str] = frozenset()):
    """TrainConfig from ``base`` (a checkpoint's config), then --config, then the flags."""
    from .train import TrainConfig

    values: dict[str, Any] = dict(base or {})
    if args.config is not None:
        try:
            with open(args.config, "rb") as fh:
                values = tomllib.load(fh)
        except OSError as exc:
            parser.error(f"--config: cannot read {args.config}: {exc.strerror or exc}")
        except tomllib.TOMLDecodeError as exc:
            parser.error(f"--config: {args.config} is not valid TOML: {exc}")
        spelled: dict[str, list[str]] = {}
        for k in values:
            spelled.setdefault(k.replace("-", "_"), []).append(k)
        twice = [" and ".join(map(repr, ks)) for ks in spelled.values() if len(ks) > 1]
        if twice:
            parser.error(f"--config: {args.config} sets the same option twice: "
                         f"{'; '.join(twice)}")
        values = {**dict(base or {}), **{k.replace("-", "_"): v for k, v in values.items()}}
        nested = [k for k, v in values.items() if isinstance(v, dict)]
        if nested:
            parser.error(f"--config: {args.config}: tables are not supported ([{nested[0]}]); "
                         "put the options at the top level")
    skip = {"config", "resume", "print_config", "func", "command", "sub_parser", *skip}
    values.update({k: v for k, v in vars(args).items() if k not in skip})
    try:
        return TrainConfig.from_dict(values, source=f"--config {args.config}"
                                     if args.config else f"{PROG} {args.command}")
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))


def _cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import backends, checkpoint, data
    from .distributed import PeerError
    from .train import RunDirError, TrainingDiverged, train

    cfg = _train_config(args, parser)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    try:
        summary = train(cfg, resume=args.resume)
    except KeyboardInterrupt as exc:
        if getattr(exc, "rawgan_rank", 0) == 0:
            print(f"{PROG} train: interrupted", file=sys.stderr)
        return 130
    except (RunDirError, TrainingDiverged, checkpoint.CheckpointError,
            backends.BackendUnavailable, data.ChecksumError, data.DownloadError,
            FileNotFoundError, ImportError, PeerError) as exc:
        if getattr(exc, "rawgan_rank", 0) == 0:  # the other ranks raised the same error
            _err("train", str(exc))
        return 1
    except (ValueError, OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not getattr(exc, "rawgan_agreed", False):
            raise  # a bug: keep the traceback (only the ranks' consistency check is agreed)
        if getattr(exc, "rawgan_rank", 0) == 0:
            _err("train", f"{type(exc).__name__}: {exc}")
        return 1
    if summary.get("rank", 0) != 0:  # a distributed run's other ranks: rank 0 reports
        return 0
    line = (f"{summary['stopped']}: {summary['steps']} steps, {summary['epochs_completed']} "
            f"epochs in {summary['seconds']:.1f} s")
    if summary.get("images_per_s"):
        line += f" ({summary['images_per_s']:.0f} images/s)"
    if summary.get("d_loss") is not None:
        line += f"; d_loss {summary['d_loss']:.4f}, g_loss {summary['g_loss']:.4f}"
    if "modes_covered" in summary:
        line += (f"; modes covered {summary['modes_covered']}/{summary['n_modes']} "
                 f"(high quality {summary['high_quality']:.1%})")
    ev = summary.get("eval")
    if summary.get("ranks"):
        line += (f"; {summary['ranks']} ranks, {summary['allreduce_seconds']:.2f} s in "
                 f"{summary['allreduce_calls']} all-reduces")
    if ev is not None:
        line += ("; last eval: " + (f"FLD {ev['fld']:.3g}, KID {ev['kid']:.3g}, score "
                                    f"{ev['score']:.3g} ({ev['n']} samples)" if "fld" in ev
                                    else f"{ev['modes_covered']}/{ev['n_modes']} modes, "
                                         f"{ev['high_quality']:.1%} high quality"))
    print(line)
    print(f"run folder: {summary['out']} (generator: {summary['generator']})")
    return 0


def _cmd_sample(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import checkpoint, data
    from .sampling import save_image_grid, save_scatter

    if args.num < 1:
        parser.error(f"-n must be >= 1, got {args.num}")
    if args.scale < 1:
        parser.error(f"--scale must be >= 1, got {args.scale}")
    if args.nrow is not None and args.nrow < 1:
        parser.error(f"--nrow must be >= 1, got {args.nrow}")
    try:
        gen = checkpoint.load_generator(args.checkpoint)
        x = gen.sample(args.num, seed=args.seed)
        if len(gen.image_shape) == 1:
            if args.nrow is not None or args.scale != 1:
                _err("sample", f"--nrow/--scale lay out image grids; {args.checkpoint} makes "
                               "2-D points, drawn as a scatter plot")
                return 2
            name = gen.config.get("data")
            modes = data.toy_modes(name)[0] if name in ("ring", "grid") else None
            save_scatter(args.out, x, modes=modes, title=f"{args.num} samples, seed {args.seed}")
        else:
            save_image_grid(args.out, x, nrow=args.nrow, scale=args.scale)
    except (checkpoint.CheckpointError, FileNotFoundError, ImportError, OSError,
            ValueError) as exc:
        _err("sample", str(exc))
        return 1
    print(f"wrote {args.out} ({args.num} samples, seed {args.seed})")
    return 0


_INSPECT_ONLY = frozenset({"steps", "from_checkpoint", "hist_steps", "compare_losses",
                           "d_warmup"})


def _hist_steps(text: str, parser) -> list[int]:
    out = []
    for part in filter(None, (t.strip() for t in text.split(","))):
        if part == "last":
            out.append(-1)
            continue
        try:
            out.append(int(part))
        except ValueError:
            parser.error(f"--hist-steps: {part!r} is not a step number or 'last'")
    return out


#: TrainConfig fields rawgan inspect accepts (the shared option table) but never uses
_INSPECT_IGNORES = ("epochs", "max_steps", "save_every", "sample_every", "eval_every",
                    "eval_samples", "ema", "grid_size", "cuda_graph", "sync_batchnorm",
                    "collective_timeout")


def _cmd_inspect(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import backends, checkpoint, data, losses
    from .inspect import compare_run, format_comparison, inspect_run

    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.d_warmup < 0:
        parser.error(f"--d-warmup must be >= 0, got {args.d_warmup}")
    kinds = None
    if args.compare_losses is not None:
        kinds = [k.strip().lower() for k in args.compare_losses.split(",") if k.strip()]
        bad = [k for k in kinds if k not in losses.KINDS]
        if len(kinds) < 2 or bad or len(set(kinds)) != len(kinds):
            parser.error(f"--compare-losses: give two or more different losses of "
                         f"{', '.join(losses.KINDS)}, comma-separated (got "
                         f"{args.compare_losses!r})")
    if args.d_warmup and kinds is None:
        parser.error("--d-warmup trains the discriminator alone before a --compare-losses "
                     "run; give --compare-losses too")
    # the training options inspect has no use for: it records --steps steps and saves,
    # samples, evaluates and keeps an EMA of nothing
    unused = [f"--{k.replace('_', '-')}" for k in _INSPECT_IGNORES if k in vars(args)]
    if unused:
        parser.error(f"{', '.join(unused)}: rawgan inspect records --steps steps and does "
                     "not use them (they are rawgan train's)")
    hist = _hist_steps(args.hist_steps, parser)
    outside = [h for h in hist if not -args.steps <= h < args.steps]
    if outside:
        parser.error(f"--hist-steps: step(s) {', '.join(map(str, outside))} outside the "
                     f"{args.steps} recorded steps (0 .. {args.steps - 1}, or negative from "
                     "the end: -1 = 'last')")
    ck = None
    base = None
    try:
        if args.from_checkpoint is not None:
            ck = checkpoint.load_checkpoint(args.from_checkpoint, kind="training")
            base = {k: v for k, v in ck.config.items() if k != "out"}  # not the run folder
    except (checkpoint.CheckpointError, FileNotFoundError, OSError) as exc:
        _err("inspect", str(exc))
        return 1
    cfg = _train_config(args, parser, base=base, skip=_INSPECT_ONLY)
    if getattr(args, "distributed", False) or cfg.dtype != "float32":
        parser.error("rawgan inspect runs one float32 process: --distributed and --dtype "
                     "float64 are for rawgan train")
    cfg = dataclasses.replace(cfg, distributed=False)  # a distributed run's checkpoint too
    out = (Path(cfg.out).expanduser() if cfg.out
           else Path("runs") / f"inspect-{cfg.model}-{cfg.data}")
    try:
        if kinds is not None:
            results, files = compare_run(cfg, kinds, args.steps, out, ck=ck,
                                         d_warmup=args.d_warmup)
            print(format_comparison(results))
            print(f"\nwrote {', '.join(files.values())}")
            return 0
        summary = inspect_run(cfg, args.steps, out, ck=ck, hist_steps=hist)
    except KeyboardInterrupt:
        print(f"{PROG} inspect: interrupted", file=sys.stderr)
        return 130
    except (checkpoint.CheckpointError, backends.BackendUnavailable, data.ChecksumError,
            data.DownloadError, FileNotFoundError, ImportError) as exc:
        _err("inspect", str(exc))
        return 1
    except (ValueError, OSError) as exc:
        _err("inspect", f"{type(exc).__name__}: {exc}")
        return 1
    print(f"recorded {summary['steps']} steps of {cfg.model}/{cfg.data}/{cfg.loss}: "
          f"D(x) {summary['d_real']:.3f}, D(G(z)) {summary['d_fake']:.3f} at the last step")
    for m in ("generator", "discriminator"):
        norms = summary[f"{m}_grad_norms"]
        print(f"{m} |dL/dW| per layer at the last step: " + ", ".join(
            f"{k} {v:.3g}" for k, v in norms.items()))
    files = summary["files"]
    print(f"wrote {files['hdf5']}, {files['grad_norms']}, {files['d_outputs']}"
          + "".join(f", {h}" for h in files["histograms"]))
    return 0


def _cmd_eval(argv: list[str]) -> int:
    from . import metrics

    try:
        return int(metrics.main(argv) or 0)
    except SystemExit as exc:  # --help, or a usage error (exit 2)
        return int(exc.code or 0)


def _cmd_gradcheck(argv: list[str]) -> int:
    try:
        from . import gradcheck
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.gradcheck":
            raise
        _err("gradcheck", "rawgan.gradcheck is not available in this installation")
        return 1
    return int(gradcheck.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Run the ``rawgan`` command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv and argv[0] == "gradcheck":  # its own parser handles the rest, --help included
        return _cmd_gradcheck(argv[1:])
    if argv and argv[0] == "eval":  # rawgan.metrics.main parses the rest
        return _cmd_eval(argv[1:])
    if argv and argv[0] == "bench":  # rawgan.bench.main parses the rest, --help included
        from . import bench

        return int(bench.main(argv[1:]) or 0)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the subcommand's parser (its usage), not the top level's
            (getattr(args, "sub_parser", None) or parser).error(
                f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return args.func(args, args.sub_parser)
    except SystemExit as exc:  # parser.error inside a command
        return int(exc.code or 0)
    except BrokenPipeError:  # `rawgan train ... | head -1`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
