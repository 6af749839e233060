"""sampling.image_grid / save_image_grid: the layout, the value mapping, bad arguments."""

from __future__ import annotations

import numpy as np
import pytest

from rawgan.sampling import image_grid, save_image_grid


def test_layout_padding_and_value_mapping():
    # three 2x3 tiles, two per row: 2 rows; padding 1 around and between the tiles
    x = np.stack([np.full((2, 3), v) for v in (-1.0, 0.0, 1.0)])
    g = image_grid(x, nrow=2, padding=1, pad_value=7)
    assert g.shape == (2 * 2 + 3 * 1, 2 * 3 + 3 * 1) and g.dtype == np.uint8
    np.testing.assert_array_equal(g[1:3, 1:4], 0)      # -1 -> 0
    np.testing.assert_array_equal(g[1:3, 5:8], 128)    # 0 -> rint(127.5) = 128 (half to even)
    np.testing.assert_array_equal(g[4:6, 1:4], 255)    # 1 -> 255
    np.testing.assert_array_equal(g[4:6, 5:8], 7)      # the empty fourth cell is padding
    assert (g[0] == 7).all() and (g[:, 0] == 7).all() and (g[3] == 7).all()


def test_default_columns_scale_clipping_and_rgb():
    x = np.random.default_rng(0).uniform(-3, 3, (5, 4, 4, 3))
    g = image_grid(x, padding=0, scale=2)               # ceil(sqrt(5)) = 3 per row
    assert g.shape == (2 * 8, 3 * 8, 3)
    tile = np.clip(np.rint((x[4] + 1) * 127.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(g[8:16, 8:16], tile.repeat(2, 0).repeat(2, 1))
    assert image_grid(x[:1, ..., :1]).shape == (8, 8)   # one channel -> 2-D picture


@pytest.mark.parametrize("kw, msg", [
    ({"nrow": 0}, r"nrow must be an integer >= 1, got 0"),
    ({"nrow": 2.5}, r"nrow must be an integer >= 1, got 2\.5"),
    ({"padding": -1}, r"padding must be an integer >= 0, got -1"),
    ({"scale": 0}, r"scale must be an integer >= 1, got 0"),
    ({"scale": 1.5}, r"scale must be an integer >= 1, got 1\.5"),
    ({"pad_value": 256}, r"pad_value must be an integer in \[0, 255\], got 256"),
])
def test_bad_arguments_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        image_grid(np.zeros((4, 2, 2, 1)), **kw)


@pytest.mark.parametrize("shape", [(2, 2, 2, 2), (2, 2), (0, 2, 2, 1)])
def test_bad_image_shapes_are_named(shape):
    with pytest.raises(ValueError, match=r"expected images \(N, H, W, 1\|3\)"):
        image_grid(np.zeros(shape))


def test_nan_images_are_refused():
    x = np.zeros((2, 2, 2))
    x[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        image_grid(x)


def test_save_image_grid_writes_the_grid_as_png(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    x = np.random.default_rng(1).uniform(-1, 1, (3, 5, 5, 1))
    path = save_image_grid(tmp_path / "g.png", x, nrow=3, scale=2)
    np.testing.assert_array_equal(np.asarray(Image.open(path)),
                                  image_grid(x, nrow=3, scale=2))
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # no temporary left behind


def test_the_suffix_picks_the_image_type(tmp_path):
    pytest.importorskip("PIL.Image")
    x = np.zeros((2, 4, 4, 1))
    assert save_image_grid(tmp_path / "g.jpg", x).read_bytes()[:2] == b"\xff\xd8"  # JPEG
    assert save_image_grid(tmp_path / "g", x).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"Pillow cannot write '\.xyz' images"):
        save_image_grid(tmp_path / "g.xyz", x)
    assert not (tmp_path / "g.xyz").exists()


def test_scatter_suffix_picks_the_type(tmp_path):
    pytest.importorskip("matplotlib")
    from rawgan.sampling import save_scatter

    pts = np.random.default_rng(0).normal(size=(20, 2))
    assert b"<svg" in save_scatter(tmp_path / "s.svg", pts).read_bytes()[:400]
    assert save_scatter(tmp_path / "s.png", pts).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"matplotlib cannot write 'xyz' files"):
        save_scatter(tmp_path / "s.xyz", pts)
