"""Train the MNIST scoring classifier (rawgan-lenet-v1) with rawgan's own backward passes.

Data: the 10,000-image MNIST test split (``t10k-*``), the only MNIST files this project
keeps. Images 0..7999 train the classifier; images 8000..9999 are held out and give the
recorded accuracy. ``--val N`` additionally holds out the last N TRAINING images as a
validation set (for choosing a recipe without looking at the held-out 2,000); the shipped
weights are trained with ``--val 0`` on all 8,000.

Recipe: Adam (lr 1e-3, cosine decay to 2% of it), batch 32, 10 epochs, random translations
of up to 2 pixels (background-padded), dropout 0.3 before the last layer, softmax
cross-entropy (:func:`rawgan.classifier.softmax_cross_entropy`), float32, NumPy backend.
The recipe was chosen on a validation run (``--val 1000``: train [0:7000], validate on
[7000:8000]) before the held-out images were scored.

    python scripts/train_classifier.py --data-dir ../shared/data/mnist
    python scripts/train_classifier.py --data-dir ../shared/data/mnist --val 1000 --epochs 8 \
        --out /tmp/clf.h5 --no-readme
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from rawgan import data, optim
from rawgan.classifier import (
    ARCHITECTURE,
    DEFAULT_WEIGHTS,
    Classifier,
    lenet,
    save_classifier,
    softmax_cross_entropy,
    weights_sha256,
)

N_TRAIN = 8000  # images t10k[0:8000] train, t10k[8000:10000] are held out
SPLIT = "MNIST t10k (10,000 images): train on [0:8000], accuracy on held-out [8000:10000]"


def shift_batch(x: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Translate each image by up to ``max_shift`` pixels in x and y (background -1 enters)."""
    if max_shift == 0:
        return x
    n, h, w, c = x.shape
    s = max_shift
    padded = np.full((n, h + 2 * s, w + 2 * s, c), -1.0, dtype=x.dtype)
    padded[:, s:s + h, s:s + w] = x
    dy, dx = rng.integers(0, 2 * s + 1, size=(2, n))
    out = np.empty_like(x)
    for i in range(n):
        out[i] = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


def evaluate(model, x: np.ndarray, y: np.ndarray) -> float:
    return Classifier(model).accuracy(x, y) if len(x) else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with t10k-*-ubyte.gz "
                   "(default: rawgan.data's search: $RAWGAN_DATA, then the cache)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.02)
    p.add_argument("--shift", type=int, default=2, help="max random translation in pixels")
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val", type=int, default=0, help="hold out the last N of the 8,000 "
                   "training images as a validation set (recipe selection)")
    p.add_argument("--out", type=Path, default=Path("runs/mnist_classifier.h5"),
                   help="where to write the weights (default: runs/mnist_classifier.h5; "
                        f"pass --out {DEFAULT_WEIGHTS.relative_to(DEFAULT_WEIGHTS.parents[2])} "
                        "to replace the shipped ones, then update "
                        "rawgan.classifier.SHIPPED_SHA256)")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite "
                   "assets/README.md next to --out")
    args = p.parse_args(argv)

    x, y = data.load_mnist("test", data_dir=args.data_dir, download=False)
    if len(x) != 10_000:
        raise SystemExit(f"expected the 10,000-image MNIST test split, got {len(x)} images")
    x_train, y_train = x[:N_TRAIN - args.val], y[:N_TRAIN - args.val]
    x_val, y_val = x[N_TRAIN - args.val:N_TRAIN], y[N_TRAIN - args.val:N_TRAIN]
    x_test, y_test = x[N_TRAIN:], y[N_TRAIN:]

    rng = np.random.default_rng(args.seed)
    model = lenet(seed=args.seed, dropout=args.dropout)
    opt = optim.Adam(model, lr=args.lr)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    print(f"{ARCHITECTURE}: {model.count_params():,} parameters; train {len(x_train)}, "
          f"val {len(x_val)}, held-out {len(x_test)}; {args.epochs} epochs x "
          f"{steps_per_epoch} steps", flush=True)
    t0 = time.perf_counter()
    step = 0
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_train))
        loss_sum, correct = 0.0, 0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            xb = shift_batch(x_train[idx], rng, args.shift)
            # cosine decay from lr to min_lr_ratio * lr over the whole run
            frac = step / max(total - 1, 1)
            opt.lr = args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5
                                * (1 + math.cos(math.pi * frac)))
            model.zero_grad()
            logits = model.forward(xb, training=True)
            loss, dlogits = softmax_cross_entropy(logits, y_train[idx])
            model.backward(dlogits, input_grad=False)
            opt.step()
            step += 1
            loss_sum += loss * len(idx)
            correct += int((logits.argmax(1) == y_train[idx]).sum())
        msg = (f"epoch {epoch:2d}  loss {loss_sum / len(x_train):.4f}  "
               f"train acc {correct / len(x_train):.4f}  {time.perf_counter() - t0:6.1f}s")
        if len(x_val):
            msg += f"  val acc {evaluate(model, x_val, y_val):.4f}"
        print(msg, flush=True)
    seconds = time.perf_counter() - t0
    acc = evaluate(model, x_test, y_test)
    print(f"held-out accuracy (t10k[8000:10000]): {acc:.4f}; training took {seconds:.0f} s",
          flush=True)

    meta = {
        "split": SPLIT if not args.val else
        f"{SPLIT}; this run trained on [0:{N_TRAIN - args.val}] only",
        "train_range": [0, N_TRAIN - args.val], "test_range": [N_TRAIN, 10_000],
        "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "schedule": f"cosine to {args.min_lr_ratio} x lr",
        "augmentation": f"random translation up to {args.shift} px",
        "dropout": args.dropout, "optimizer": "Adam (Keras defaults)",
        "accuracy": round(acc, 4), "n_test": len(x_test),
        "train_seconds": round(seconds, 1), "n_params": model.count_params(),
        "trained_with": "scripts/train_classifier.py",
    }
    out = save_classifier(args.out, model, **meta)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB); weights_sha256 "
          f"{weights_sha256(model)}")
    if not args.no_readme:
        write_readme(out.parent / "README.md", out.name, meta, model)
    return 0


def write_readme(path: Path, weights_name: str, meta: dict, model) -> None:
    lines = [
        "# rawgan/assets",
        "",
        f"`{weights_name}`: the MNIST classifier that rawgan's image metrics (FLD, KID, "
        "classifier score) use as their feature extractor. Architecture "
        f"`{ARCHITECTURE}` (`rawgan.classifier.lenet`), trained with rawgan's own "
        "hand-written backward passes by `scripts/train_classifier.py`; load it with "
        "`rawgan.classifier.load_classifier()` (numpy + h5py only).",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for key in ("split", "seed", "epochs", "batch_size", "lr", "schedule", "augmentation",
                "dropout", "optimizer", "accuracy", "n_test", "train_seconds", "n_params"):
        lines.append(f"| {key} | {meta[key]} |")
    lines += [
        "",
        "The same fields are stored as HDF5 attributes of the file (`architecture` too). "
        "Weights are float32, gzip-compressed, under `/weights/<layer>/<key>`.",
        "`train_seconds` was measured on a shared 2-core CPU (NumPy backend).",
        "",
        "Reproduce: `python scripts/train_classifier.py --data-dir ../shared/data/mnist "
        f"--out rawgan/assets/mnist_classifier.h5` (seed {meta['seed']}; without `--out` it "
        "writes runs/mnist_classifier.h5 and leaves the shipped file alone). The test "
        "`tests/test_classifier.py` checks that the shipped weights reproduce the recorded "
        "accuracy on the held-out images and that their SHA-256 is "
        "`rawgan.classifier.SHIPPED_SHA256` (update it when replacing them).",
        "",
    ]
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
