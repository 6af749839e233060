"""Tests for rawgan.data: IDX parsing, MNIST loading, downloads, toy mixtures, minibatches.

Downloads are tested only against local HTTP servers on 127.0.0.1; the module's mirror
lists are emptied for every test, so nothing here can reach the internet.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from rawgan import data
from rawgan.data import (
    ChecksumError,
    DownloadError,
    fetch_file,
    file_md5,
    grid_modes,
    iterate_minibatches,
    load_mnist,
    read_idx,
    ring_modes,
    sample_grid,
    sample_mixture,
    sample_ring,
    sample_toy,
    toy_modes,
)

TEST_IMAGES, TEST_LABELS = data.SPLIT_FILES["test"]


# --------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user env, a private cache, and no real mirrors: tests never touch the internet."""
    monkeypatch.delenv("RAWGAN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(data, "MIRRORS", {"mnist": [], "fashion": []})


def make_idx(arr: np.ndarray) -> bytes:
    """Encode an array as an IDX file (big-endian)."""
    codes = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B,
             np.dtype("i4"): 0x0C, np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}
    code = codes[arr.dtype.newbyteorder("=")]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


@pytest.fixture
def synthetic(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A tiny fake MNIST test split as .gz bytes, with the checksum table patched to match."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = np.array([0, 1, 2, 3, 9, 5, 7], dtype=np.uint8)
    files = {TEST_IMAGES: gzip.compress(make_idx(images), mtime=0),
             TEST_LABELS: gzip.compress(make_idx(labels), mtime=0)}
    for name, blob in files.items():
        monkeypatch.setitem(data.CHECKSUMS["mnist"], name, md5(blob))
    return {"images": images, "labels": labels, "files": files}


class _Handler(BaseHTTPRequestHandler):
    """Serves files from ``root``; options set per server by :func:`serve`."""

    root: Path
    log: list[tuple[str, str | None]]
    ranges = False  # honour "Range: bytes=N-" with 206 / 416
    corrupt = False  # flip the first byte of every body
    truncate_at: int | None = None  # announce the full length, send this many bytes

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        name = self.path.lstrip("/")
        rng = self.headers.get("Range")
        self.log.append((name, rng))
        path = self.root / name
        if "/" in name or not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        if self.corrupt:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        start = 0
        if self.ranges and rng:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.truncate_at is not None:
            payload = payload[: self.truncate_at]
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


Serve = Callable[..., tuple[str, list[tuple[str, str | None]]]]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Start local HTTP servers: ``serve(files, **handler_options) -> (base_url, log)``."""
    servers: list[ThreadingHTTPServer] = []

    def start(files: dict[str, bytes], **options: object) -> tuple[str, list]:
        root = tmp_path / f"srv{len(servers)}"
        root.mkdir()
        for name, blob in files.items():
            (root / name).write_bytes(blob)
        log: list[tuple[str, str | None]] = []
        handler = type("Handler", (_Handler,), {"root": root, "log": log, **options})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/", log

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# --------------------------------------------------------------------------------------
# Real MNIST test split
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_test(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_mnist("test", data_dir=mnist_dir, download=False)


def test_real_test_split(real_test: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = real_test
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert y.shape == (10000,) and y.dtype == np.int64
    assert set(np.unique(y).tolist()) == set(range(10))
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the published first labels
    # values are exactly pixel / 127.5 - 1
    pixels = (x[:500].astype(np.float64) + 1) * 127.5
    assert np.abs(pixels - np.round(pixels)).max() < 1e-4


def test_real_files_have_published_md5(mnist_dir: Path) -> None:
    for name in (TEST_IMAGES, TEST_LABELS):
        assert file_md5(mnist_dir / name) == data.CHECKSUMS["mnist"][name]


def test_real_via_env_var(monkeypatch: pytest.MonkeyPatch, mnist_dir: Path,
                          real_test: tuple[np.ndarray, np.ndarray]) -> None:
    monkeypatch.setenv("RAWGAN_DATA", str(mnist_dir))
    x, y = load_mnist("test", download=False)
    np.testing.assert_array_equal(x, real_test[0])
    np.testing.assert_array_equal(y, real_test[1])


def test_env_var_dataset_subfolder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                   mnist_dir: Path) -> None:
    shutil.copytree(mnist_dir, tmp_path / "root" / "mnist")
    monkeypatch.setenv("RAWGAN_DATA", str(tmp_path / "root"))
    x, y = load_mnist("test", download=False)
    assert x.shape == (10000, 28, 28, 1) and y.shape == (10000,)


def test_data_dir_beats_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                mnist_dir: Path) -> None:
    monkeypatch.setenv("RAWGAN_DATA", str(tmp_path / "nowhere"))
    x, _ = load_mnist("test", data_dir=mnist_dir, download=False)
    assert x.shape[0] == 10000


def test_cache_dir_honours_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                               mnist_dir: Path) -> None:
    assert data.default_cache_dir() == tmp_path / "xdg-cache" / "rawgan"
    shutil.copytree(mnist_dir, tmp_path / "xdg-cache" / "rawgan" / "mnist")
    x, _ = load_mnist("test", download=False)
    assert x.shape[0] == 10000
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.default_cache_dir() == Path.home() / ".cache" / "rawgan"


def test_real_float64_and_plain_files(tmp_path: Path, mnist_dir: Path,
                                      real_test: tuple[np.ndarray, np.ndarray]) -> None:
    for name in (TEST_IMAGES, TEST_LABELS):  # decompressed copies, as some users keep them
        with gzip.open(mnist_dir / name) as src:
            (tmp_path / name.removesuffix(".gz")).write_bytes(src.read())
    x, y = load_mnist("test", data_dir=tmp_path, download=False, dtype=np.float64)
    assert x.dtype == np.float64
    np.testing.assert_allclose(x, real_test[0], atol=1e-6)
    np.testing.assert_array_equal(y, real_test[1])


def test_real_corrupted_file_fails_checksum(tmp_path: Path, mnist_dir: Path) -> None:
    shutil.copy(mnist_dir / TEST_IMAGES, tmp_path)
    shutil.copy(mnist_dir / TEST_LABELS, tmp_path)
    blob = bytearray((tmp_path / TEST_LABELS).read_bytes())
    blob[100] ^= 0x01
    (tmp_path / TEST_LABELS).write_bytes(bytes(blob))
    with pytest.raises(ChecksumError) as info:
        load_mnist("test", data_dir=tmp_path, download=False)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert TEST_LABELS in msg and data.CHECKSUMS["mnist"][TEST_LABELS] in msg
    assert md5(bytes(blob)) in msg
    assert (tmp_path / TEST_LABELS).read_bytes() == bytes(blob)  # the user's file is kept


def test_real_files_under_wrong_dataset_name(tmp_path: Path, mnist_dir: Path) -> None:
    shutil.copy(mnist_dir / TEST_IMAGES, tmp_path)
    shutil.copy(mnist_dir / TEST_LABELS, tmp_path)
    with pytest.raises(ChecksumError, match="published MNIST file, not Fashion-MNIST") as e:
        load_mnist("test", data_dir=tmp_path, dataset="fashion", download=False)
    assert "point --data-dir" in str(e.value) and "keep this file" in str(e.value)
    # in fashion/ itself the MNIST file is misplaced: move or delete it, not "keep"
    sub = tmp_path / "fashion"
    sub.mkdir()
    shutil.copy(mnist_dir / TEST_IMAGES, sub)
    shutil.copy(mnist_dir / TEST_LABELS, sub)
    with pytest.raises(ChecksumError, match="sits in the fashion/ folder") as e:
        load_mnist("test", data_dir=tmp_path, dataset="fashion", download=False)
    assert "keep this file" not in str(e.value)


def test_each_dataset_prefers_its_own_subfolder(tmp_path: Path, mnist_dir: Path) -> None:
    """MNIST files directly in data_dir, other files of the same names in data_dir/mnist:
    the subfolder named for the dataset is searched first (MNIST and Fashion-MNIST share
    file names, so the top-level files must not shadow a fashion/ subfolder)."""
    shutil.copy(mnist_dir / TEST_IMAGES, tmp_path)
    shutil.copy(mnist_dir / TEST_LABELS, tmp_path)
    sub = tmp_path / "mnist"
    sub.mkdir()
    (sub / TEST_IMAGES).write_bytes(b"not the real file")
    (sub / TEST_LABELS).write_bytes(b"not the real file")
    with pytest.raises(ChecksumError, match=str(sub)):  # the subfolder's copy was read
        load_mnist("test", data_dir=tmp_path, download=False)


def test_real_train_split_missing(mnist_dir: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_mnist("train", data_dir=mnist_dir, download=False)
    msg = str(info.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(mnist_dir) in msg
    assert "RAWGAN_DATA" in msg and "data_dir" in msg


# --------------------------------------------------------------------------------------
# read_idx and file validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
@pytest.mark.parametrize("compressed", [False, True])
def test_read_idx_roundtrip(tmp_path: Path, dtype: str, compressed: bool) -> None:
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    blob = make_idx(arr)
    path = tmp_path / "x.idx"
    path.write_bytes(gzip.compress(blob) if compressed else blob)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative and out.flags.writeable
    np.testing.assert_array_equal(out, arr)


def test_read_idx_truncated(tmp_path: Path) -> None:
    blob = make_idx(np.zeros((10, 28, 28), np.uint8))
    path = tmp_path / "cut-idx3-ubyte"
    path.write_bytes(blob[:-100])
    with pytest.raises(ValueError, match=r"cut-idx3-ubyte.*truncated.*7840.*7740"):
        read_idx(path)
    path.write_bytes(blob + b"\0")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx(path)
    path.write_bytes(blob[:9])  # inside the dimension list
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(path)


def test_read_idx_truncated_gzip(tmp_path: Path) -> None:
    blob = gzip.compress(make_idx(np.arange(1000, dtype=np.uint8).reshape(10, 100)))
    path = tmp_path / "cut.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"cut\.gz.*truncated or corrupt"):
        read_idx(path)


@pytest.mark.parametrize("content", [b"", b"hello world, not idx", b"\x00\x00\x07\x01abcd",
                                     b"\x01\x00\x08\x01\x00\x00\x00\x00"])
def test_read_idx_bad_magic(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad\.idx: not an IDX file"):
        read_idx(path)


def _write_plain_split(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    (folder / TEST_IMAGES.removesuffix(".gz")).write_bytes(make_idx(images))
    (folder / TEST_LABELS.removesuffix(".gz")).write_bytes(make_idx(labels))


def test_count_mismatch(tmp_path: Path) -> None:
    _write_plain_split(tmp_path, np.zeros((5, 28, 28), np.uint8), np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="counts differ: 5 images.*4 labels"):
        load_mnist("test", data_dir=tmp_path, download=False)


@pytest.mark.parametrize(("images", "labels", "match"), [
    (np.zeros((2, 27, 28), np.uint8), np.zeros(2, np.uint8), "shape"),
    (np.zeros((2, 28, 28), np.float32), np.zeros(2, np.uint8), "uint8 images"),
    (np.zeros((2, 28, 28), np.uint8), np.zeros((2, 1), np.uint8), "labels"),
    (np.zeros((2, 28, 28), np.uint8), np.array([3, 10], np.uint8), "0..9"),
])
def test_not_mnist_content(tmp_path: Path, images: np.ndarray, labels: np.ndarray,
                           match: str) -> None:
    _write_plain_split(tmp_path, images, labels)
    with pytest.raises(ValueError, match=match):
        load_mnist("test", data_dir=tmp_path, download=False)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        load_mnist("valid", data_dir=tmp_path, download=False)
    with pytest.raises(ValueError, match="dataset"):
        load_mnist("test", data_dir=tmp_path, dataset="cifar", download=False)
    with pytest.raises(ValueError, match="floating"):
        load_mnist("test", data_dir=tmp_path, download=False, dtype=np.uint8)


def test_synthetic_gz_load_and_verify_flag(tmp_path: Path, synthetic: dict) -> None:
    for name, blob in synthetic["files"].items():
        (tmp_path / name).write_bytes(blob)
    x, y = load_mnist("test", data_dir=tmp_path, download=False)
    np.testing.assert_array_equal(np.round((x[..., 0] + 1) * 127.5), synthetic["images"])
    np.testing.assert_array_equal(y, synthetic["labels"])
    assert x[0, 0, 0, 0] == -1.0 and x[0, 0, 1, 0] == 1.0
    # a re-compressed (different bytes, same content) file fails the check unless verify=False
    (tmp_path / TEST_LABELS).write_bytes(gzip.compress(make_idx(synthetic["labels"]), 1, mtime=5))
    with pytest.raises(ChecksumError):
        load_mnist("test", data_dir=tmp_path, download=False)
    _, y2 = load_mnist("test", data_dir=tmp_path, download=False, verify=False)
    np.testing.assert_array_equal(y2, synthetic["labels"])


def test_import_is_cheap() -> None:
    code = ("import sys, rawgan.data; "
            "bad = [m for m in ('tqdm', 'urllib.request', 'ssl') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------------------
# Downloads (local HTTP servers only)
# --------------------------------------------------------------------------------------


def test_download_success(tmp_path: Path, synthetic: dict, serve: Serve) -> None:
    url, log = serve(synthetic["files"])
    root = tmp_path / "data"
    x, y = load_mnist("test", data_dir=root, mirrors=[url], progress=False)
    np.testing.assert_array_equal(y, synthetic["labels"])
    assert x.shape == (7, 28, 28, 1)
    folder = root / "mnist"  # downloads go to the per-dataset subfolder
    assert sorted(p.name for p in folder.iterdir()) == sorted([TEST_IMAGES, TEST_LABELS])
    for name, blob in synthetic["files"].items():
        assert (folder / name).read_bytes() == blob
    assert sorted(name for name, _ in log) == sorted([TEST_IMAGES, TEST_LABELS])
    # second load: found on disk, no request
    load_mnist("test", data_dir=root, mirrors=[url], progress=False)
    assert len(log) == 2


def test_download_uses_module_mirrors_and_cache(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path, synthetic: dict,
                                                serve: Serve) -> None:
    url, _ = serve(synthetic["files"])
    monkeypatch.setitem(data.MIRRORS, "mnist", [url])
    folder = data.download("mnist", ("test",), progress=True)  # bar is off: not a tty
    assert folder == tmp_path / "xdg-cache" / "rawgan" / "mnist"
    _, y = load_mnist("test", download=False)
    np.testing.assert_array_equal(y, synthetic["labels"])


def test_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                    synthetic: dict, serve: Serve) -> None:
    class FakeTerminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    fake = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", fake)
    url, _ = serve(synthetic["files"])
    blob = synthetic["files"][TEST_IMAGES]
    fetch_file(TEST_IMAGES, tmp_path, md5(blob), [url], progress=True)
    assert TEST_IMAGES in fake.getvalue()  # tqdm drew its bar
    fake.seek(0)
    fake.truncate()
    blob = synthetic["files"][TEST_LABELS]
    fetch_file(TEST_LABELS, tmp_path, md5(blob), [url], progress=False)
    assert fake.getvalue() == ""


def test_unwritable_download_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DownloadError, match="cannot create the download folder"):
        fetch_file("x.gz", tmp_path / "file" / "sub", "0" * 32, ["http://127.0.0.1:9/"])


def test_download_checksum_failure(tmp_path: Path, synthetic: dict, serve: Serve) -> None:
    url, log = serve(synthetic["files"], corrupt=True)
    root = tmp_path / "data"
    with pytest.raises(ChecksumError) as info:
        load_mnist("test", data_dir=root, mirrors=[url], progress=False)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert TEST_IMAGES in msg and url in msg
    assert data.CHECKSUMS["mnist"][TEST_IMAGES] in msg
    corrupted = bytes([synthetic["files"][TEST_IMAGES][0] ^ 0xFF])
    corrupted += synthetic["files"][TEST_IMAGES][1:]
    assert md5(corrupted) in msg
    assert list((root / "mnist").iterdir()) == []  # neither final file nor .part left


def test_download_resumes_part_with_range(tmp_path: Path, synthetic: dict,
                                          serve: Serve) -> None:
    url, log = serve(synthetic["files"], ranges=True)
    blob = synthetic["files"][TEST_IMAGES]
    part = tmp_path / (TEST_IMAGES + ".part")
    part.write_bytes(blob[:1000])
    path = fetch_file(TEST_IMAGES, tmp_path, md5(blob), [url], progress=False)
    assert path.read_bytes() == blob and not part.exists()
    assert log == [(TEST_IMAGES, "bytes=1000-")]


def test_download_restarts_when_range_ignored(tmp_path: Path, synthetic: dict,
                                              serve: Serve) -> None:
    url, log = serve(synthetic["files"], ranges=False)  # answers 200 to a Range request
    blob = synthetic["files"][TEST_IMAGES]
    part = tmp_path / (TEST_IMAGES + ".part")
    part.write_bytes(b"\xff" * 500)  # wrong bytes: must be discarded, not appended to
    path = fetch_file(TEST_IMAGES, tmp_path, md5(blob), [url], progress=False)
    assert path.read_bytes() == blob and not part.exists()
    assert log == [(TEST_IMAGES, "bytes=500-")]


def test_download_restarts_on_416(tmp_path: Path, synthetic: dict, serve: Serve) -> None:
    url, log = serve(synthetic["files"], ranges=True)
    blob = synthetic["files"][TEST_LABELS]
    (tmp_path / (TEST_LABELS + ".part")).write_bytes(b"\0" * (len(blob) + 10))
    path = fetch_file(TEST_LABELS, tmp_path, md5(blob), [url], progress=False)
    assert path.read_bytes() == blob
    assert log == [(TEST_LABELS, f"bytes={len(blob) + 10}-"), (TEST_LABELS, None)]


def test_complete_part_is_not_downloaded_again(tmp_path: Path, synthetic: dict) -> None:
    blob = synthetic["files"][TEST_LABELS]
    (tmp_path / (TEST_LABELS + ".part")).write_bytes(blob)
    path = fetch_file(TEST_LABELS, tmp_path, md5(blob), [closed_port_url()], progress=False)
    assert path.read_bytes() == blob


def test_first_mirror_404_then_second(tmp_path: Path, synthetic: dict, serve: Serve) -> None:
    bad, bad_log = serve({})
    good, good_log = serve(synthetic["files"])
    _, y = load_mnist("test", data_dir=tmp_path, mirrors=[bad, good], progress=False)
    np.testing.assert_array_equal(y, synthetic["labels"])
    assert len(bad_log) == 2 and len(good_log) == 2


def test_interrupted_mirror_then_resume_on_next(tmp_path: Path, synthetic: dict,
                                                serve: Serve) -> None:
    blob = synthetic["files"][TEST_IMAGES]
    flaky, _ = serve(synthetic["files"], truncate_at=3000)
    good, good_log = serve(synthetic["files"], ranges=True)
    path = fetch_file(TEST_IMAGES, tmp_path, md5(blob), [flaky, good], progress=False)
    assert path.read_bytes() == blob
    assert good_log == [(TEST_IMAGES, "bytes=3000-")]


def test_interrupted_download_keeps_part(tmp_path: Path, synthetic: dict, serve: Serve) -> None:
    blob = synthetic["files"][TEST_IMAGES]
    flaky, _ = serve(synthetic["files"], truncate_at=3000)
    with pytest.raises(DownloadError, match="connection ended after 3000"):
        fetch_file(TEST_IMAGES, tmp_path, md5(blob), [flaky], progress=False)
    assert not (tmp_path / TEST_IMAGES).exists()
    assert (tmp_path / (TEST_IMAGES + ".part")).read_bytes() == blob[:3000]


def test_all_mirrors_fail(tmp_path: Path, synthetic: dict, serve: Serve) -> None:
    missing, _ = serve({})
    refused = closed_port_url()
    with pytest.raises(DownloadError) as info:
        load_mnist("test", data_dir=tmp_path, mirrors=[missing, refused], progress=False)
    msg = str(info.value)
    assert missing + TEST_IMAGES in msg and "404" in msg and refused + TEST_IMAGES in msg
    assert len(info.value.failures) == 2
    assert not list((tmp_path / "mnist").glob(TEST_IMAGES + "*"))


def test_no_mirrors(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="no mirrors"):
        load_mnist("test", data_dir=tmp_path, progress=False)


def test_download_false_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        load_mnist("test", data_dir=tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST"):
        load_mnist("test", dataset="fashion", download=False)


# --------------------------------------------------------------------------------------
# Toy 2-D mixtures
# --------------------------------------------------------------------------------------


def test_mode_centers() -> None:
    ring = ring_modes()
    assert ring.shape == (8, 2)
    np.testing.assert_allclose(np.linalg.norm(ring, axis=1), 2.0)
    np.testing.assert_allclose(ring[0], [2.0, 0.0])
    assert ring_modes(5, 1.5).shape == (5, 2)
    grid = grid_modes()
    assert grid.shape == (25, 2)
    expected = {(a, b) for a in (-4, -2, 0, 2, 4) for b in (-4, -2, 0, 2, 4)}
    assert {tuple(p) for p in grid.tolist()} == expected
    centers, std = toy_modes("ring")
    np.testing.assert_array_equal(centers, ring)
    assert std == 0.02
    centers, std = toy_modes("grid")
    np.testing.assert_array_equal(centers, grid)
    assert std == 0.05
    with pytest.raises(ValueError, match="toy"):
        toy_modes("spiral")
    with pytest.raises(ValueError):
        ring_modes(0)


@pytest.mark.parametrize(("name", "sampler"), [
    ("ring", lambda n, rng: sample_ring(n, rng)),
    ("grid", lambda n, rng: sample_grid(n, rng)),
    ("ring", lambda n, rng: sample_toy("ring", n, rng)),
    ("grid", lambda n, rng: sample_toy("grid", n, rng)),
])
def test_toy_samplers(name: str, sampler: Callable) -> None:
    centers, std = toy_modes(name)
    n = 20000
    x = sampler(n, np.random.default_rng(123))
    assert x.shape == (n, 2) and x.dtype == np.float32
    dist = np.linalg.norm(x[:, None, :] - centers[None], axis=2)
    nearest = dist.argmin(axis=1)
    counts = np.bincount(nearest, minlength=len(centers))
    expected = n / len(centers)
    assert counts.min() > 0
    assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected))  # uniform weights
    assert dist.min(axis=1).max() < 6 * std  # |z| for 2-D N(0, I) beyond 6: p ~ 1e-8
    resid = x - centers[nearest]
    np.testing.assert_allclose(resid.std(axis=0), std, rtol=0.05)
    np.testing.assert_array_equal(x, sampler(n, np.random.default_rng(123)))
    assert not np.array_equal(x, sampler(n, np.random.default_rng(124)))


def test_toy_sampler_arguments() -> None:
    rng = np.random.default_rng(0)
    assert sample_ring(0, rng).shape == (0, 2)
    x = sample_ring(1000, rng, n_modes=3, radius=5.0, std=0.0)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 5.0, rtol=1e-6)
    assert len(np.unique(np.round(x, 4), axis=0)) == 3
    with pytest.raises(TypeError, match="Generator"):
        sample_grid(10, np.random.RandomState(0))  # noqa: NPY002 (checking it is refused)
    with pytest.raises(TypeError, match="Generator"):
        sample_ring(10, 0)
    with pytest.raises(ValueError):
        sample_ring(-1, rng)
    with pytest.raises(ValueError):
        sample_mixture(10, rng, np.zeros((3, 2)), std=-1.0)
    with pytest.raises(ValueError):
        sample_mixture(10, rng, np.zeros(3), std=1.0)


# --------------------------------------------------------------------------------------
# Minibatches
# --------------------------------------------------------------------------------------


def _rows(n: int) -> np.ndarray:
    return np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1)


def test_minibatches_cover_every_index_once() -> None:
    x = _rows(103)
    batches = list(iterate_minibatches(x, 10, np.random.default_rng(0), drop_last=False))
    assert [len(b) for b in batches] == [10] * 10 + [3]
    seen = np.concatenate([b[:, 0] for b in batches])
    assert sorted(seen.tolist()) == list(range(103))
    assert not np.array_equal(seen, np.arange(103))  # shuffled


def test_minibatches_drop_last() -> None:
    x = _rows(103)
    batches = list(iterate_minibatches(x, 10, np.random.default_rng(0)))
    assert len(batches) == 10 and all(b.shape == (10, 3) for b in batches)
    seen = np.concatenate([b[:, 0] for b in batches])
    assert len(np.unique(seen)) == 100
    assert len(list(iterate_minibatches(x, 103, np.random.default_rng(0)))) == 1
    # batch larger than the data is fine without drop_last: one short batch
    (only,) = iterate_minibatches(x, 500, np.random.default_rng(0), drop_last=False)
    assert only.shape == (103, 3)


def test_minibatches_reproducible_and_new_permutation_per_epoch() -> None:
    x = _rows(50)

    def epoch(rng: np.random.Generator) -> np.ndarray:
        return np.concatenate(list(iterate_minibatches(x, 5, rng)))[:, 0]

    a, b = np.random.default_rng(7), np.random.default_rng(7)
    first_a, first_b = epoch(a), epoch(b)
    np.testing.assert_array_equal(first_a, first_b)
    second_a = epoch(a)
    assert not np.array_equal(first_a, second_a)
    np.testing.assert_array_equal(second_a, epoch(b))


def test_minibatches_with_labels() -> None:
    x = _rows(20)
    labels = np.arange(20) % 10
    for xb, yb in iterate_minibatches(x, 4, np.random.default_rng(1), labels=labels):
        np.testing.assert_array_equal(xb[:, 0].astype(int) % 10, yb)


@pytest.mark.parametrize(("x", "batch_size", "kwargs", "match"), [
    (np.arange(10), 2, {}, "floating"),
    (np.arange(10, dtype=np.uint8), 2, {}, "floating"),
    (np.array([0.0, np.nan, 1.0]), 1, {}, "non-finite"),
    (np.array([[0.0, np.inf]], dtype=np.float32), 1, {}, "non-finite"),
    (np.zeros((10, 2)), 0, {}, "positive"),
    (np.zeros((10, 2)), -3, {}, "positive"),
    (np.zeros((10, 2)), 11, {}, "exceeds"),
    (np.zeros((10, 2)), 2.0, {}, "integer"),
    (np.zeros((10, 2)), True, {}, "integer"),
    (np.zeros((10, 2)), 2, {"labels": np.zeros(9)}, "labels"),
    ([0.0, 1.0], 1, {}, "NumPy array"),
])
def test_minibatch_errors_raised_at_call(x: object, batch_size: object, kwargs: dict,
                                         match: str) -> None:
    with pytest.raises(ValueError, match=match):
        iterate_minibatches(x, batch_size, np.random.default_rng(0), **kwargs)  # no next()


def test_minibatch_rng_must_be_generator() -> None:
    with pytest.raises(TypeError, match="Generator"):
        iterate_minibatches(np.zeros((4, 2)), 2, 0)
