"""Training data: MNIST / Fashion-MNIST from the original IDX files, and toy 2-D mixtures.

MNIST
-----
:func:`load_mnist` returns images as NHWC ``(N, 28, 28, 1)`` floats scaled to ``[-1, 1]``
(``x / 127.5 - 1``, the range of a ``tanh`` generator) and integer labels ``(N,)``.

Files are the four published ones per dataset (``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``),
either gzip-compressed (checked against the published MD5) or decompressed (checked only
for a well-formed IDX structure). Where they are looked for, in order:

1. ``data_dir`` if given, else the environment variable ``RAWGAN_DATA``: first its
   ``<dataset>/`` subfolder (``mnist/`` or ``fashion/``), then that folder itself;
2. otherwise the user cache, ``$XDG_CACHE_HOME/rawgan/<dataset>/`` (``~/.cache/rawgan/...``).

Missing files are downloaded (``download=True``) into ``<root>/<dataset>/``, where root is
the folder of step 1 or the cache root. MNIST and Fashion-MNIST use the same file names,
which is why downloads always go to a per-dataset subfolder.

A download streams to ``<name>.part``, resumes a partial ``.part`` with an HTTP ``Range``
request when the server supports it, checks the MD5 and only then renames the file into
place (:func:`os.replace`, atomic), so a file under its final name is always complete.

Toy data
--------
The 2-D Gaussian mixtures of VEEGAN / PacGAN used to measure mode collapse: 8 modes on a
ring of radius 2 (std 0.02) and 25 modes on the grid ``{-4, -2, 0, 2, 4}^2`` (std 0.05).
Samplers draw from a ``numpy.random.Generator`` passed in; there is no global RNG.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

__all__ = [
    "CHECKSUMS",
    "DATASETS",
    "MIRRORS",
    "SPLIT_FILES",
    "ChecksumError",
    "DownloadError",
    "default_cache_dir",
    "download",
    "fetch_file",
    "file_md5",
    "grid_modes",
    "iterate_minibatches",
    "load_mnist",
    "read_idx",
    "ring_modes",
    "sample_grid",
    "sample_mixture",
    "sample_ring",
    "sample_toy",
    "toy_modes",
]

# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------

DATASETS: tuple[str, ...] = ("mnist", "fashion")

#: (images file, labels file) per split, as published (the ``.gz`` names).
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: Published MD5 of every ``.gz`` file, per dataset. Tests may patch entries.
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

#: Base URLs tried in order; the file name is appended. Tests may replace the lists.
MIRRORS: dict[str, list[str]] = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
    "fashion": [
        # Plain http: integrity rests on the MD5 check, which every download passes.
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ],
}

_DATASET_TITLES = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}
_ENV_DATA = "RAWGAN_DATA"
_CHUNK = 1 << 16

# IDX type codes (third magic byte) -> big-endian NumPy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class ChecksumError(ValueError):
    """A file's MD5 differs from the published one."""


class DownloadError(OSError):
    """No mirror delivered a file; ``failures`` lists ``(url, exception)`` per mirror."""

    def __init__(self, message: str, failures: Sequence[tuple[str, BaseException]] = ()):
        super().__init__(message)
        self.failures = list(failures)


# --------------------------------------------------------------------------------------
# IDX parsing
# --------------------------------------------------------------------------------------


def _decompress(raw: bytes, name: str) -> bytes:
    """Return ``raw`` gunzipped if it starts with the gzip magic, else unchanged."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:  # truncated / corrupt gzip stream
        raise ValueError(f"{name}: cannot decompress gzip data ({exc}); the file is "
                         "truncated or corrupt") from exc


def _parse_idx(data: bytes, name: str) -> np.ndarray:
    """Parse the bytes of an (uncompressed) IDX file into an array in native byte order."""
    if len(data) < 4:
        raise ValueError(f"{name}: not an IDX file: only {len(data)} bytes, no 4-byte header")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES:
        raise ValueError(
            f"{name}: not an IDX file: bad magic number 0x{data[:4].hex()} (expected "
            "0x0000 then a type code in {08,09,0B,0C,0D,0E} then the number of dimensions)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: truncated IDX header: {ndim} dimensions need {header} "
                         f"bytes, the file has {len(data)}")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise ValueError(
            f"{name}: IDX file {what}: dimensions {dims} of {dtype.itemsize}-byte items need "
            f"{expected} payload bytes, found {actual}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    # Copy into native byte order: writable, and independent of the byte string.
    return arr.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzip-compressed or plain) into a NumPy array.

    Parameters
    ----------
    path : str or path-like
        The file. Gzip compression is detected from the content, not the name.

    Returns
    -------
    numpy.ndarray
        Array of the shape stored in the header, in native byte order (``uint8`` for
        MNIST files).

    Raises
    ------
    ValueError
        If the file is not IDX (bad magic), its gzip stream is corrupt, or its payload
        size differs from the product of its dimensions (truncated file). The message
        names the file and the expected and actual byte counts.
    """
    path = Path(path)
    return _parse_idx(_decompress(path.read_bytes(), str(path)), str(path))


# --------------------------------------------------------------------------------------
# Checksums, folders
# --------------------------------------------------------------------------------------


def _md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def file_md5(path: str | os.PathLike[str]) -> str:
    """Return the hex MD5 digest of a file, read in chunks.

    Parameters
    ----------
    path : str or path-like
        The file.

    Returns
    -------
    str
        32 lowercase hex digits.
    """
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _other_dataset(name: str, dataset: str, actual: str) -> str | None:
    """The other dataset whose published file ``name`` has MD5 ``actual``, if any (MNIST and
    Fashion-MNIST share file names)."""
    return next((other for other, table in CHECKSUMS.items()
                 if other != dataset and table.get(name) == actual), None)


def _checksum_error(path: Path | str, dataset: str, expected: str, actual: str) -> ChecksumError:
    msg = f"{path}: MD5 mismatch: expected {expected} ({_DATASET_TITLES[dataset]}), got {actual}"
    other = _other_dataset(Path(path).name, dataset, actual)
    if other is not None:
        msg += (f"; this is the published {_DATASET_TITLES[other]} file, not "
                f"{_DATASET_TITLES[dataset]} (the two datasets share file names)")
    return ChecksumError(msg)


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def default_cache_dir() -> Path:
    """Return the user cache root of rawgan: ``$XDG_CACHE_HOME/rawgan`` or ``~/.cache/rawgan``.

    Returns
    -------
    pathlib.Path
        The folder (not created). Datasets live in per-dataset subfolders of it.
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "rawgan"


def _data_root(data_dir: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """Return (root folder, whether it was chosen by the user)."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), True
    env = os.environ.get(_ENV_DATA, "")
    if env:
        return Path(env).expanduser(), True
    return default_cache_dir(), False


def _search_dirs(dataset: str, data_dir: str | os.PathLike[str] | None) -> tuple[list[Path], Path]:
    """Return (folders to search in order, folder downloads go to). The dataset's own
    subfolder comes first: MNIST and Fashion-MNIST share file names, so with MNIST files
    directly in ``data_dir`` and Fashion's in ``data_dir/fashion`` each finds its own."""
    root, explicit = _data_root(data_dir)
    target = root / dataset
    return ([target, root] if explicit else [target]), target


def _find(name: str, dirs: Sequence[Path]) -> Path | None:
    """First existing ``name`` (the ``.gz``) or its decompressed twin in ``dirs``."""
    plain = name.removesuffix(".gz")
    for d in dirs:
        for candidate in (d / name, d / plain):
            if candidate.is_file():
                return candidate
    return None


# --------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------


class _NoBar:
    """Stand-in for a disabled (or unavailable) tqdm bar."""

    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress_bar(name: str, total: int | None, initial: int, enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    try:
        from tqdm.auto import tqdm  # lazy: keeps `import rawgan.data` cheap
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=name, unit="B", unit_scale=True,
                unit_divisor=1024, leave=False)


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _stream(url: str, part: Path, *, timeout: float, progress: bool) -> None:
    """Download ``url`` into ``part``, resuming from its current size when possible.

    Keeps the partial file on network errors (the next attempt resumes it). Raises
    ``OSError`` if the connection ended before the announced length.
    """
    import urllib.error  # lazy, with urllib.request: keeps `import rawgan.data` cheap
    import urllib.request

    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "rawgan"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # range not satisfiable: the .part is stale
            exc.close()
            part.unlink()
            return _stream(url, part, timeout=timeout, progress=progress)
        raise
    with response:
        mode = "wb"
        if offset and response.status == 206:
            m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == offset:
                mode = "ab"
        if mode == "wb":
            offset = 0  # server ignored the range (200) or answered a different one
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None and length.isdigit() else None
        total = None if remaining is None else offset + remaining
        received = 0
        with open(part, mode) as f, _progress_bar(part.name.removesuffix(".part"), total,
                                                  offset, progress) as bar:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if remaining is not None and received != remaining:
        # http.client does not raise on a short body; do it here, keeping the .part.
        raise OSError(f"connection ended after {received} of {remaining} bytes "
                      f"(partial file kept for resuming: {part})")
    return None


def fetch_file(
    name: str,
    folder: str | os.PathLike[str],
    md5: str,
    mirrors: Sequence[str],
    *,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download ``name`` from the first mirror that delivers it with the right MD5.

    The file streams to ``folder/<name>.part`` (resumed with an HTTP ``Range`` request if a
    partial one exists and the server answers 206, restarted otherwise), is checked
    against ``md5`` and then atomically renamed to ``folder/<name>``. A file that fails
    the check is deleted, never left under its final name.

    Parameters
    ----------
    name : str
        File name, appended to each mirror's base URL.
    folder : str or path-like
        Destination folder, created if needed.
    md5 : str
        Expected hex MD5 of the complete file.
    mirrors : sequence of str
        Base URLs, tried in order.
    progress : bool, optional
        Show a tqdm progress bar (only when stderr is a terminal).
    timeout : float, optional
        Socket timeout in seconds per request.

    Returns
    -------
    pathlib.Path
        The verified file.

    Raises
    ------
    ChecksumError
        If every mirror delivered data but none matched ``md5`` (message lists each).
    DownloadError
        If every mirror failed, for any mix of reasons (message lists each).
    """
    import http.client

    folder = Path(folder)
    final = folder / name
    part = folder / (name + ".part")
    if final.is_file() and file_md5(final) == md5:
        return final
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the download folder {folder} ({exc}); pass a "
                            f"writable data_dir= or set ${_ENV_DATA}") from exc
    failures: list[tuple[str, BaseException]] = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + name
        try:
            if not (part.is_file() and file_md5(part) == md5):  # else: finished earlier
                _stream(url, part, timeout=timeout, progress=progress)
            actual = file_md5(part)
            if actual != md5:
                part.unlink()  # never resume from, or keep, bad bytes
                raise ChecksumError(f"MD5 mismatch: expected {md5}, got {actual}")
            os.replace(part, final)
            return final
        except (OSError, http.client.HTTPException, ValueError) as exc:
            failures.append((url, exc))
    lines = "\n".join(f"  {url}: {type(exc).__name__}: {exc}" for url, exc in failures)
    if not failures:
        lines = "  (no mirrors configured)"
    msg = (f"could not download {name} into {folder}:\n{lines}\n"
           f"Download it by hand into that folder, or point --data-dir (data_dir=) or "
           f"${_ENV_DATA} at a folder that has it.")
    if failures and all(isinstance(exc, ChecksumError) for _, exc in failures):
        raise ChecksumError(msg) from failures[-1][1]
    raise DownloadError(msg, failures) from (failures[-1][1] if failures else None)


def download(
    dataset: str = "mnist",
    splits: Sequence[str] = ("train", "test"),
    *,
    data_dir: str | os.PathLike[str] | None = None,
    mirrors: Sequence[str] | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download the ``.gz`` files of ``splits`` of ``dataset`` into ``<root>/<dataset>/``.

    Files already present there with the right MD5 are not fetched again.

    Parameters
    ----------
    dataset : {"mnist", "fashion"}
        Which dataset.
    splits : sequence of {"train", "test"}
        Which splits.
    data_dir : str or path-like, optional
        Root folder; default ``$RAWGAN_DATA``, else the user cache (see module docs).
    mirrors : sequence of str, optional
        Base URLs; default ``MIRRORS[dataset]``.
    progress : bool, optional
        Show progress bars (only on a terminal).
    timeout : float, optional
        Socket timeout in seconds.

    Returns
    -------
    pathlib.Path
        The folder the files are in.
    """
    _check_dataset(dataset)
    _, target = _search_dirs(dataset, data_dir)
    urls = list(MIRRORS[dataset] if mirrors is None else mirrors)
    for split in splits:
        for name in _split_files(split):
            fetch_file(name, target, CHECKSUMS[dataset][name], urls, progress=progress,
                       timeout=timeout)
    return target


# --------------------------------------------------------------------------------------
# MNIST loading
# --------------------------------------------------------------------------------------


def _split_files(split: str) -> tuple[str, str]:
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_FILES)}")
    return SPLIT_FILES[split]


def _load_checked(path: Path, dataset: str, verify: bool) -> np.ndarray:
    """Read one IDX file, checking a ``.gz`` against its published MD5 first."""
    raw = path.read_bytes()
    if verify and path.suffix == ".gz":
        expected = CHECKSUMS[dataset].get(path.name)
        actual = _md5_bytes(raw)
        if expected is not None and actual != expected:
            err = _checksum_error(path, dataset, expected, actual)
            other = _other_dataset(path.name, dataset, actual)
            if other is not None and path.parent.name != dataset:
                # the other dataset's intact file in a shared folder: look elsewhere
                raise ChecksumError(
                    f"{err}. This folder holds the other dataset: point --data-dir "
                    f"(data_dir=) at a {_DATASET_TITLES[dataset]} folder, or put its files "
                    f"in a {dataset}/ subfolder, which is searched first; keep this file.")
            if other is not None:  # in <dataset>/ itself: it is misplaced
                raise ChecksumError(
                    f"{err}. It sits in the {dataset}/ folder, where {_DATASET_TITLES[dataset]} "
                    "belongs: move it to the other dataset's folder, or delete it (a "
                    "download then fetches the right file).")
            raise ChecksumError(f"{err}. Delete the file to download it again (or, from "
                                "Python, pass verify=False if you trust it).")
    return _parse_idx(_decompress(raw, str(path)), str(path))


def load_mnist(
    split: str = "train",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    dataset: str = "mnist",
    download: bool = True,
    dtype: DTypeLike = np.float32,
    verify: bool = True,
    mirrors: Sequence[str] | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Load a split of MNIST or Fashion-MNIST as NHWC images in ``[-1, 1]`` and labels.

    Parameters
    ----------
    split : {"train", "test"}
        60,000 training or 10,000 test images.
    data_dir : str or path-like, optional
        Folder holding the files (directly or in a ``<dataset>/`` subfolder). Default:
        ``$RAWGAN_DATA``, else ``$XDG_CACHE_HOME/rawgan/<dataset>`` (``~/.cache/...``).
    dataset : {"mnist", "fashion"}
        MNIST digits or Fashion-MNIST (Zalando) articles.
    download : bool, optional
        Fetch missing files into ``<root>/<dataset>/``; if False, a missing file raises.
    dtype : float dtype, optional
        Image dtype, ``float32`` by default (``float64`` for gradient checks).
    verify : bool, optional
        Check ``.gz`` files against the published MD5 (decompressed files are only checked
        for a well-formed IDX structure).
    mirrors : sequence of str, optional
        Base URLs to download from; default ``MIRRORS[dataset]``.
    progress : bool, optional
        Show download progress bars (only on a terminal).

    Returns
    -------
    images : numpy.ndarray
        ``(N, 28, 28, 1)`` array of ``dtype``, values ``pixel / 127.5 - 1`` in ``[-1, 1]``.
    labels : numpy.ndarray
        ``(N,)`` ``int64`` class indices in ``0..9``.

    Raises
    ------
    FileNotFoundError
        If a file is missing and ``download`` is False.
    ChecksumError
        (a ``ValueError``) if a ``.gz`` file's MD5 differs from the published one.
    ValueError
        If a file is not a well-formed MNIST IDX file, or images and labels disagree.
    DownloadError
        If a download failed on every mirror.
    """
    _check_dataset(dataset)
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype must be a floating-point type, got {dtype}")
    names = _split_files(split)
    dirs, target = _search_dirs(dataset, data_dir)
    paths: list[Path] = []
    for name in names:
        path = _find(name, dirs)
        if path is None:
            if not download:
                where = ", ".join(str(d) for d in dirs)
                others = [s for s, files in SPLIT_FILES.items() if s != split
                          and all(_find(f, dirs) is not None for f in files)]
                hint = (f" The {others[0]!r} split's files are there: --split {others[0]} "
                        f"(split={others[0]!r}) uses them." if others else "")
                raise FileNotFoundError(
                    f"{_DATASET_TITLES[dataset]} file {name} (or {name.removesuffix('.gz')}) "
                    f"not found in: {where}.{hint} Point --data-dir (data_dir=) or "
                    f"${_ENV_DATA} at a folder holding the published IDX files, or allow the "
                    "download (--download, download=True)."
                )
            urls = list(MIRRORS[dataset] if mirrors is None else mirrors)
            path = fetch_file(name, target, CHECKSUMS[dataset][name], urls, progress=progress)
        paths.append(path)

    images = _load_checked(paths[0], dataset, verify)
    labels = _load_checked(paths[1], dataset, verify)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{paths[0]}: expected uint8 images of shape (N, 28, 28), got "
                         f"{images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{paths[1]}: expected uint8 labels of shape (N,), got "
                         f"{labels.dtype} {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"image and label counts differ: {images.shape[0]} images in "
                         f"{paths[0]}, {labels.shape[0]} labels in {paths[1]}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{paths[1]}: labels must be in 0..9, found {int(labels.max())}")

    x = images.astype(dtype)[..., None]  # NHWC, one channel
    x /= dtype.type(127.5)
    x -= dtype.type(1.0)
    return x, labels.astype(np.int64)


# --------------------------------------------------------------------------------------
# Toy 2-D mixtures (VEEGAN / PacGAN)
# --------------------------------------------------------------------------------------

_TOY_STD = {"ring": 0.02, "grid": 0.05}


def ring_modes(n_modes: int = 8, radius: float = 2.0) -> np.ndarray:
    """Centers of ``n_modes`` Gaussians evenly spaced on a circle.

    Parameters
    ----------
    n_modes : int, optional
        Number of modes (8 in VEEGAN / PacGAN).
    radius : float, optional
        Circle radius (2.0).

    Returns
    -------
    numpy.ndarray
        ``(n_modes, 2)`` float64 centers ``radius * (cos(2 pi k / n), sin(2 pi k / n))``.
    """
    if int(n_modes) != n_modes or n_modes < 1:
        raise ValueError(f"n_modes must be a positive integer, got {n_modes!r}")
    angles = 2.0 * np.pi * np.arange(int(n_modes)) / int(n_modes)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def grid_modes() -> np.ndarray:
    """Centers of the 25 Gaussians on the grid ``{-4, -2, 0, 2, 4}^2``.

    Returns
    -------
    numpy.ndarray
        ``(25, 2)`` float64 centers, row-major (x outer, y inner).
    """
    ticks = np.arange(-4.0, 5.0, 2.0)
    xx, yy = np.meshgrid(ticks, ticks, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def toy_modes(name: str) -> tuple[np.ndarray, float]:
    """Return ``(centers, std)`` of a named toy mixture.

    Parameters
    ----------
    name : {"ring", "grid"}
        ``"ring"``: 8 modes on a circle of radius 2, std 0.02. ``"grid"``: 25 modes on
        ``{-4, -2, 0, 2, 4}^2``, std 0.05.

    Returns
    -------
    centers : numpy.ndarray
        ``(n_modes, 2)`` float64.
    std : float
        Per-coordinate standard deviation of every mode.
    """
    if name == "ring":
        return ring_modes(), _TOY_STD["ring"]
    if name == "grid":
        return grid_modes(), _TOY_STD["grid"]
    raise ValueError(f"unknown toy dataset {name!r}; expected 'ring' or 'grid'")


def sample_mixture(n: int, rng: np.random.Generator, centers: np.ndarray,
                   std: float) -> np.ndarray:
    """Draw from an equal-weight mixture of isotropic Gaussians.

    Parameters
    ----------
    n : int
        Number of samples.
    rng : numpy.random.Generator
        Source of randomness (the only one used).
    centers : array_like
        ``(n_modes, d)`` mode centers.
    std : float
        Per-coordinate standard deviation.

    Returns
    -------
    numpy.ndarray
        ``(n, d)`` float32 samples: ``centers[k] + std * z``, ``k`` uniform, ``z ~ N(0, I)``.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not np.isfinite(std) or std < 0:
        raise ValueError(f"std must be finite and >= 0, got {std!r}")
    centers = np.asarray(centers, dtype=np.float64)
    if centers.ndim != 2 or centers.shape[0] == 0:
        raise ValueError(f"centers must have shape (n_modes, d), got {centers.shape}")
    modes = rng.integers(centers.shape[0], size=int(n))
    noise = rng.standard_normal((int(n), centers.shape[1]))
    return (centers[modes] + std * noise).astype(np.float32)


def sample_ring(n: int, rng: np.random.Generator, n_modes: int = 8, radius: float = 2.0,
                std: float = 0.02) -> np.ndarray:
    """Sample the ring mixture: ``n_modes`` Gaussians on a circle (VEEGAN / PacGAN).

    Parameters
    ----------
    n : int
        Number of samples.
    rng : numpy.random.Generator
        Source of randomness.
    n_modes, radius, std : optional
        Mixture settings; defaults 8, 2.0, 0.02.

    Returns
    -------
    numpy.ndarray
        ``(n, 2)`` float32.
    """
    return sample_mixture(n, rng, ring_modes(n_modes, radius), std)


def sample_grid(n: int, rng: np.random.Generator, std: float = 0.05) -> np.ndarray:
    """Sample the 5x5 grid mixture on ``{-4, -2, 0, 2, 4}^2`` (VEEGAN / PacGAN).

    Parameters
    ----------
    n : int
        Number of samples.
    rng : numpy.random.Generator
        Source of randomness.
    std : float, optional
        Per-coordinate standard deviation (0.05).

    Returns
    -------
    numpy.ndarray
        ``(n, 2)`` float32.
    """
    return sample_mixture(n, rng, grid_modes(), std)


def sample_toy(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sample ``n`` points of the toy mixture ``name`` (``"ring"`` or ``"grid"``).

    Parameters
    ----------
    name : {"ring", "grid"}
        Which mixture, with its standard settings (see :func:`toy_modes`).
    n : int
        Number of samples.
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    numpy.ndarray
        ``(n, 2)`` float32.
    """
    centers, std = toy_modes(name)
    return sample_mixture(n, rng, centers, std)


# --------------------------------------------------------------------------------------
# Minibatches
# --------------------------------------------------------------------------------------


def iterate_minibatches(
    x: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    *,
    drop_last: bool = True,
    labels: np.ndarray | None = None,
) -> Iterator[Any]:
    """Iterate over one epoch of ``x`` in shuffled minibatches.

    One permutation is drawn from ``rng`` per call (per epoch). The arguments are checked
    when the function is called, not at the first ``next()``.

    Parameters
    ----------
    x : numpy.ndarray
        Floating-point data, samples along axis 0; must be finite.
    batch_size : int
        Samples per batch, ``1 <= batch_size`` (and ``<= len(x)`` when ``drop_last``).
    rng : numpy.random.Generator
        Source of the permutation.
    drop_last : bool, optional
        Drop the final short batch (so every batch has ``batch_size`` rows). If False,
        every sample appears exactly once per epoch.
    labels : numpy.ndarray, optional
        Per-sample labels, shuffled alongside ``x``.

    Yields
    ------
    numpy.ndarray or tuple of numpy.ndarray
        A batch ``x[idx]`` (a copy), or ``(x[idx], labels[idx])`` when ``labels`` is given.

    Raises
    ------
    ValueError
        On non-float or non-finite data, a bad ``batch_size``, or mismatched ``labels``.
    TypeError
        If ``rng`` is not a ``numpy.random.Generator``.
    """
    if not isinstance(x, np.ndarray) or x.ndim == 0:
        raise ValueError("x must be a NumPy array with samples along axis 0")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x must hold floating-point data, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"x contains {int(np.size(x) - np.isfinite(x).sum())} non-finite "
                         "values (NaN or inf)")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise ValueError(f"batch_size must be an integer, got {batch_size!r}")
    n = x.shape[0]
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if drop_last and batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} samples; with "
                         "drop_last=True no batch would be produced")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 0 or labels.shape[0] != n:
            raise ValueError(f"labels must have {n} entries along axis 0, got shape "
                             f"{labels.shape}")
    batch_size = int(batch_size)
    order = rng.permutation(n)
    stop = n - n % batch_size if drop_last else n

    def batches() -> Iterator[Any]:
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield x[idx] if labels is None else (x[idx], labels[idx])

    return batches()
