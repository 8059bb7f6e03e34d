"""hspace.images: the one grid drawer of the CLI, the README figures and the report."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hspace.images import image_grid, png_bytes, to_uint8


def test_cells_are_upscaled_with_nearest_neighbours_and_padded():
    cells = torch.rand(2, 3, 3, 4, 5)
    img = image_grid(cells, upscale=3, pad=2)
    assert img.size == (3 * 15 + 4 * 2, 2 * 12 + 3 * 2)
    a = np.asarray(img)
    want = to_uint8(cells)  # [2, 3, 4, 5, 3]
    y, x = 2 + 1 * (12 + 2), 2 + 2 * (15 + 2)  # cell (1, 2)
    np.testing.assert_array_equal(a[y : y + 12 : 3, x : x + 15 : 3], want[1, 2])
    np.testing.assert_array_equal(a[y + 2, x + 2], want[1, 2, 0, 0])  # every pixel of a 3x3 block
    assert (a[:2] == 255).all() and (a[:, :2] == 255).all()


def test_min_cell_picks_the_smallest_integer_factor_and_uint8_equals_float():
    u8 = np.random.default_rng(0).integers(0, 256, (1, 2, 3, 6, 6), dtype=np.uint8)
    img = image_grid(u8, min_cell=16, pad=1)
    assert img.size == (2 * 18 + 3, 18 + 2)  # ceil(16 / 6) = 3
    same = image_grid(torch.from_numpy(u8).float() / 255, min_cell=16, pad=1)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(same))


def test_labels_make_room_and_must_match_the_grid():
    cells = torch.zeros(2, 2, 1, 4, 4)  # grey images become RGB
    plain = image_grid(cells)
    labelled = image_grid(cells, row_labels=["a", "long label"], col_labels=["x", "y"])
    assert labelled.width > plain.width and labelled.height > plain.height
    assert np.asarray(labelled)[..., 0].min() == 0  # black cells and text
    with pytest.raises(ValueError, match="row_labels has 1 entries for 2 rows"):
        image_grid(cells, row_labels=["a"])
    with pytest.raises(ValueError, match=r"\[rows, cols, C, H, W\]"):
        image_grid(torch.zeros(3, 4, 4))


def test_png_bytes_round_trip():
    img = image_grid(torch.rand(1, 2, 3, 4, 4), upscale=2)
    back = Image.open(io.BytesIO(png_bytes(img)))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(img))
