"""Image grids for people: cells side by side, upscaled with nearest neighbours, optional labels.

One function draws every grid hspace writes (the CLI's sample/edit/swap grids, the README figures,
the report's edit strips): images ``[rows, cols, C, H, W]`` as floats in [0, 1] (torch or numpy)
or uint8, each cell enlarged by an integer factor so small models' pixels stay visible and honest.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["image_grid", "png_bytes", "to_uint8"]

#: Approximate width in pixels of one character of PIL's default bitmap font.
_CHAR_W = 7


def to_uint8(images: Any) -> np.ndarray:
    """[..., C, H, W] floats in [0, 1] (torch or numpy) or uint8 -> [..., H, W, 3] uint8 (grey repeated)."""
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    a = np.asarray(images)
    if a.dtype != np.uint8:
        a = np.round(np.clip(a.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
    if a.shape[-3] == 1:
        a = np.repeat(a, 3, axis=-3)
    return np.moveaxis(a[..., :3, :, :], -3, -1)


def image_grid(
    images: Any,
    *,
    upscale: int = 1,
    min_cell: int = 0,
    pad: int = 2,
    fill: int = 255,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
) -> Image.Image:
    """One RGB image from ``images`` [R, K, C, H, W] (or [N, C, H, W] as one row).

    Each cell is enlarged by ``max(upscale, ceil(min_cell / H))`` with nearest neighbours; ``pad``
    pixels of grey level ``fill`` surround and separate the cells. ``row_labels`` (one per row) are
    written to the left of the rows, ``col_labels`` above the columns.
    """
    from PIL import Image, ImageDraw

    shape = tuple(images.shape)
    if len(shape) == 4:
        images, shape = images[None], (1, *shape)
    if len(shape) != 5:
        raise ValueError(f"image_grid needs [rows, cols, C, H, W], got shape {shape}")
    rows, cols, _, height, width = shape
    _check_labels(row_labels, rows, "row_labels")
    _check_labels(col_labels, cols, "col_labels")
    f = max(1, int(upscale), math.ceil(min_cell / height) if min_cell else 1)
    cells = to_uint8(images).repeat(f, axis=2).repeat(f, axis=3)  # [R, K, fH, fW, 3]
    ch, cw = height * f, width * f
    left = 0 if not row_labels else 8 + _CHAR_W * max(len(s) for s in row_labels)
    top = 0 if not col_labels else 14
    canvas = np.full(
        (top + rows * ch + (rows + 1) * pad, left + cols * cw + (cols + 1) * pad, 3), fill, np.uint8
    )
    for r in range(rows):
        for c in range(cols):
            y, x = top + pad + r * (ch + pad), left + pad + c * (cw + pad)
            canvas[y : y + ch, x : x + cw] = cells[r, c]
    image = Image.fromarray(canvas)
    if row_labels or col_labels:
        draw = ImageDraw.Draw(image)
        for r, label in enumerate(row_labels or []):
            draw.text((4, top + pad + r * (ch + pad) + ch // 2 - 5), label, fill=(0, 0, 0))
        for c, label in enumerate(col_labels or []):
            draw.text((left + pad + c * (cw + pad), 1), label[: max(1, cw // _CHAR_W)], fill=(0, 0, 0))
    return image


def _check_labels(labels: Sequence[str] | None, n: int, what: str) -> None:
    if labels is not None and len(labels) != n:
        raise ValueError(f"{what} has {len(labels)} entries for {n} {what.split('_')[0]}s")


def png_bytes(image: Image.Image, *, optimize: bool = True) -> bytes:
    """The PNG encoding of a PIL image."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=optimize)
    return buf.getvalue()
