"""Pictures of a run: image grids (Pillow), 2-D scatter plots and loss curves (matplotlib),
and the mode-coverage count of the toy mixtures (:func:`rawgan.metrics.mode_metrics`).

Pillow and matplotlib are optional dependencies (``pip install 'rawgan[train]'``); they are
imported only when a picture is written, and a missing one raises an ImportError saying so.
Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch),
so writing a plot never opens a window or changes the caller's matplotlib state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write
from .checks import integer

__all__ = [
    "image_grid",
    "mode_coverage",
    "require_extras",
    "save_image_grid",
    "save_loss_curve",
    "save_scatter",
]

_EXTRA_HINT = "pip install 'rawgan[train]'"


def require_extras(*names: str) -> None:
    """Raise one ImportError naming every missing optional package among ``names``
    (``"PIL"``, ``"matplotlib"``, ``"tqdm"``) and the command that installs them."""
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        pretty = {"PIL": "pillow"}
        raise ImportError(f"rawgan train needs {', '.join(pretty.get(m, m) for m in missing)} "
                          f"to write its progress bar, pictures and plots: {_EXTRA_HINT}")


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(f"writing PNG images needs Pillow: {_EXTRA_HINT}") from exc
    return Image


def _mpl():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"writing plots needs matplotlib: {_EXTRA_HINT}") from exc
    return Figure, FigureCanvasAgg


# --------------------------------------------------------------------------------------
# Image grids
# --------------------------------------------------------------------------------------


def image_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2,
               scale: int = 1, pad_value: int = 0) -> np.ndarray:
    """Tile images into one picture.

    images (N, H, W, C) or (N, H, W) with values in [-1, 1] (a tanh generator's range), C 1
    or 3 -> uint8 (rows*H', cols*W') or (..., 3): ``nrow`` images per row (default
    ``ceil(sqrt(N))``), ``padding`` pixels between tiles, each tile enlarged ``scale`` times
    (nearest neighbour). Values are mapped by ``(x + 1) * 127.5`` and clipped.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[0] < 1:
        raise ValueError(f"image_grid: expected images (N, H, W, 1|3), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("image_grid: images contain NaN or inf")
    if nrow is not None:
        integer(nrow, "image_grid: nrow", 1)
    integer(padding, "image_grid: padding", 0)
    integer(scale, "image_grid: scale", 1)
    integer(pad_value, "image_grid: pad_value", 0, 255)
    n, h, w, c = x.shape
    ncol = math.ceil(math.sqrt(n)) if nrow is None else int(nrow)
    rows = math.ceil(n / ncol)
    u8 = np.clip(np.rint((x.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if scale > 1:
        u8 = u8.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    grid = np.full((rows * h + (rows + 1) * padding, ncol * w + (ncol + 1) * padding, c),
                   pad_value, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[top:top + h, left:left + w] = u8[i]
    return grid[..., 0] if c == 1 else grid


def save_image_grid(path: str | os.PathLike[str], images: np.ndarray, nrow: int | None = None,
                    padding: int = 2, scale: int = 1) -> Path:
    """Write :func:`image_grid` of ``images`` (atomically) and return the path: a PNG, or
    the type the suffix names where Pillow writes it (``.jpg``, ...)."""
    Image = _pil()
    grid = image_grid(images, nrow=nrow, padding=padding, scale=scale)
    path = Path(path)
    ext = path.suffix.lower()
    fmt = Image.registered_extensions().get(ext, None) if ext else "PNG"
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"save_image_grid: {path.name}: Pillow cannot write {ext!r} images "
                         "(use .png, or another type Pillow writes: .jpg, .bmp, .tif, ...)")
    with atomic_write(path) as tmp:
        Image.fromarray(grid).save(tmp, format=fmt)
    return path


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def save_scatter(path: str | os.PathLike[str], points: np.ndarray,
                 modes: np.ndarray | None = None, real: np.ndarray | None = None,
                 title: str = "", lim: float | None = None) -> Path:
    """Scatter plot of 2-D generated ``points`` over ``real`` samples, mode centres marked."""
    Figure, FigureCanvasAgg = _mpl()
    pts = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    if pts.shape[1] != 2:
        raise ValueError(f"save_scatter: expected (N, 2) points, got {np.shape(points)}")
    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if real is not None:
        r = np.asarray(real)
        ax.scatter(r[:, 0], r[:, 1], s=2, c="tab:blue", alpha=0.3, label="data")
    ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:orange", alpha=0.5, label="generated")
    if modes is not None:
        m = np.asarray(modes)
        ax.scatter(m[:, 0], m[:, 1], s=40, marker="x", c="black", label="modes")
    if lim is None and modes is not None:
        lim = float(np.abs(modes).max()) * 1.5
    if lim:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize="small", markerscale=3)
    if title:
        ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    path = Path(path)
    ext = path.suffix.lower().lstrip(".") or "png"
    if ext not in fig.canvas.get_supported_filetypes():
        raise ValueError(f"save_scatter: {path.name}: matplotlib cannot write {ext!r} files "
                         f"(it writes {', '.join(sorted(fig.canvas.get_supported_filetypes()))})")
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=ext)
    return path


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window) / window
    head = np.cumsum(y[:window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def save_loss_curve(path: str | os.PathLike[str], records: Iterable[Mapping],
                    title: str = "") -> Path:
    """Plot d_loss and g_loss against the step (raw, faint, and a moving average) and, in a
    second panel, D(x) and D(G(z)). ``records`` are metrics-log dicts."""
    Figure, FigureCanvasAgg = _mpl()
    recs = [r for r in records if "d_loss" in r and "step" in r]
    if not recs:
        raise ValueError("save_loss_curve: no loss records to plot")
    step = np.array([r["step"] for r in recs], dtype=np.float64)
    fig = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2, sharex=None)
    window = max(1, len(recs) // 50)
    for key, color in (("d_loss", "tab:blue"), ("g_loss", "tab:orange")):
        y = np.array([r[key] for r in recs], dtype=np.float64)
        ax1.plot(step, y, color=color, alpha=0.25, linewidth=0.8)
        ax1.plot(step, _smooth(y, window), color=color, label=key)
    ax1.set_ylabel("loss")
    ax1.legend(loc="upper right")
    for key, color, label in (("d_real", "tab:green", "D(x)"),
                              ("d_fake", "tab:red", "D(G(z))")):
        y = np.array([r.get(key, np.nan) for r in recs], dtype=np.float64)
        ax2.plot(step, _smooth(y, window), color=color, label=label)
    ax2.set_xlabel("step")
    ax2.set_ylabel("mean D output")
    ax2.legend(loc="upper right")
    if title:
        ax1.set_title(title, fontsize="medium")
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# --------------------------------------------------------------------------------------
# Mode coverage (toy mixtures)
# --------------------------------------------------------------------------------------


def mode_coverage(points: np.ndarray, centers: np.ndarray, std: float, *,
                  n_sigma: float = 3.0, min_count: int = 1) -> dict:
    """How many mixture modes generated ``points`` (n, D) cover: a thin wrapper over
    :func:`rawgan.metrics.mode_metrics`, so the sample plots and training logs of
    ``rawgan train`` and the numbers of ``rawgan eval`` follow ONE rule.

    The rule (VEEGAN / PacGAN): each point goes to its nearest centre and is **high
    quality** when that distance is under ``n_sigma * std`` (3 standard deviations); a mode
    is **covered** when at least ``min_count`` high-quality points fall on it. The default
    ``min_count = 1`` is the rule of the published VEEGAN and PacGAN evaluation code (with
    2,500 samples); pass a larger one for a stricter count.

    Returns :func:`rawgan.metrics.mode_metrics`' dict: ``modes_covered``, ``n_modes``,
    ``high_quality`` (fraction of all points), ``reverse_kl``, ``per_mode`` (high-quality
    count per mode), ``n_samples``, ``min_count``, ``n_sigma``.
    """
    from .metrics import mode_metrics

    pts = np.asarray(points, dtype=np.float64)
    return mode_metrics(pts.reshape(len(pts), -1), centers, std, n_sigma=n_sigma,
                        min_count=min_count)
