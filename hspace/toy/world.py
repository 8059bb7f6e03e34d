"""A procedural world of small cartoon faces whose generating factors are known exactly.

Every image is a deterministic function of its seed. The factors are independent except for
one deliberately correlated pair (glasses are far more frequent on grey-haired faces), so that
supervised directions come out entangled and disentangling by projection (paper eq. 12) has
something to remove, as in the paper's Table I.

Faces are drawn at ``supersample`` times the output resolution with PIL and downsampled with a
Lanczos filter, so edges are smooth at 32x32.
"""

from __future__ import annotations

import colorsys
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

#: Binary factors (classifier logit per factor) and continuous ones (classifier regression value).
BINARY_FACTORS: tuple[str, ...] = ("eyes_open", "glasses", "hat", "grey_hair")
CONTINUOUS_FACTORS: tuple[str, ...] = ("pose", "face_width", "skin_tone", "background_hue", "smile")
FACTORS: tuple[str, ...] = BINARY_FACTORS + CONTINUOUS_FACTORS

#: P(glasses | grey hair) and P(glasses | dark hair): the correlated pair of the world.
GLASSES_GIVEN_GREY = 0.8
GLASSES_GIVEN_DARK = 0.2
GREY_HAIR_RATE = 0.5


@dataclass(frozen=True)
class FaceFactors:
    """The exact generating factors of one face.

    Continuous factors lie in [-1, 1] (``smile`` in [0, 1]); binary ones are 0 or 1.
    """

    pose: float
    face_width: float
    skin_tone: float
    background_hue: float
    smile: float
    eyes_open: int
    glasses: int
    hat: int
    grey_hair: int

    def as_vector(self) -> np.ndarray:
        """Factors in the order of :data:`FACTORS`, as float32."""
        d = asdict(self)
        return np.array([d[name] for name in FACTORS], dtype=np.float32)


def sample_factors(seed: int) -> FaceFactors:
    """Draw the factors of face ``seed`` (independent of any other seed)."""
    rng = np.random.default_rng([int(seed), 0x5EED])
    grey = int(rng.random() < GREY_HAIR_RATE)
    glasses_rate = GLASSES_GIVEN_GREY if grey else GLASSES_GIVEN_DARK
    return FaceFactors(
        pose=float(rng.uniform(-1, 1)),
        face_width=float(rng.uniform(-1, 1)),
        skin_tone=float(rng.uniform(-1, 1)),
        background_hue=float(rng.uniform(-1, 1)),
        smile=float(rng.uniform(0, 1)),
        eyes_open=int(rng.random() < 0.5),
        glasses=int(rng.random() < glasses_rate),
        hat=int(rng.random() < 0.3),
        grey_hair=grey,
    )


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def render_face(f: FaceFactors, size: int = 32, supersample: int = 4) -> Image.Image:
    """Draw the face described by ``f`` as an RGB image of ``size`` x ``size`` pixels."""
    if size not in (32, 64):
        raise ValueError(f"size must be 32 or 64, got {size}")
    s = size * supersample
    u = s / 32.0  # drawing unit: one output pixel at 32x32

    bg = _rgb(0.5 + 0.5 * f.background_hue, 0.45, 0.85)
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)

    cx = s / 2 + f.pose * 5 * u
    cy = s / 2 + 1.5 * u
    rx = (8.5 + 1.8 * f.face_width) * u
    ry = 10.5 * u
    t = 0.5 + 0.5 * f.skin_tone
    skin = (int(250 - 110 * t), int(215 - 110 * t), int(180 - 100 * t))
    hair = (200, 200, 205) if f.grey_hair else (60, 40, 25)

    # hair behind the head, then the face
    d.ellipse([cx - rx - 1.5 * u, cy - ry - 2 * u, cx + rx + 1.5 * u, cy + ry - 5 * u], fill=hair)
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=skin)
    # fringe
    d.chord([cx - rx, cy - ry - 1 * u, cx + rx, cy - ry + 8 * u], 180, 360, fill=hair)

    # eyes shift with pose, as if the head turned
    ex = cx + f.pose * 1.5 * u
    ey = cy - 1.0 * u
    dx = 3.6 * u
    for sx in (-1, 1):
        x = ex + sx * dx
        if f.eyes_open:
            d.ellipse([x - 1.7 * u, ey - 1.7 * u, x + 1.7 * u, ey + 1.7 * u], fill=(255, 255, 255))
            d.ellipse([x - 0.9 * u, ey - 0.9 * u, x + 0.9 * u, ey + 0.9 * u], fill=(20, 20, 30))
        else:
            d.line([x - 1.8 * u, ey, x + 1.8 * u, ey], fill=(40, 25, 20), width=max(1, int(0.8 * u)))

    if f.glasses:
        w = max(1, int(0.7 * u))
        for sx in (-1, 1):
            x = ex + sx * dx
            d.ellipse([x - 2.6 * u, ey - 2.4 * u, x + 2.6 * u, ey + 2.4 * u], outline=(15, 15, 15), width=w)
        d.line([ex - dx + 2.6 * u, ey, ex + dx - 2.6 * u, ey], fill=(15, 15, 15), width=w)

    # mouth: an arc whose curvature grows with the smile
    mx, my = ex, cy + 5.0 * u
    mw = 3.2 * u
    depth = (0.3 + 3.2 * f.smile) * u
    lip = (150, 40, 50)
    if f.smile > 0.15:
        d.chord([mx - mw, my - depth, mx + mw, my + depth], 0, 180, fill=lip)
    else:
        d.line([mx - mw, my, mx + mw, my], fill=lip, width=max(1, int(0.9 * u)))

    if f.hat:
        hat = (170, 30, 40)
        top = cy - ry - 3.5 * u
        d.rectangle([cx - rx - 2 * u, cy - ry + 2.0 * u, cx + rx + 2 * u, cy - ry + 4.0 * u], fill=hat)
        d.rectangle([cx - rx + 1.5 * u, top, cx + rx - 1.5 * u, cy - ry + 2.5 * u], fill=hat)

    return img.resize((size, size), Image.LANCZOS)


#: Pixel boxes (rows, columns) of a centred face's parts at 32 x 32, for masked (local) edits.
#: Each covers 10.9% of the image; a turned head (pose) moves the parts by up to 5 pixels.
FACE_REGIONS: dict[str, tuple[slice, slice]] = {
    "mouth": (slice(19, 27), slice(9, 23)),
    "eyes": (slice(13, 20), slice(8, 24)),
}


def region_mask(name: str, size: int = 32) -> np.ndarray:
    """A float32 [size, size] mask that is 1 over the face part ``name`` of :data:`FACE_REGIONS`."""
    if name not in FACE_REGIONS:
        raise ValueError(f"unknown face region {name!r}; known: {sorted(FACE_REGIONS)}")
    if size % 32:
        raise ValueError(f"size must be a multiple of 32, got {size}")
    k = size // 32
    rows, cols = FACE_REGIONS[name]
    mask = np.zeros((size, size), dtype=np.float32)
    mask[rows.start * k : rows.stop * k, cols.start * k : cols.stop * k] = 1.0
    return mask


def render_seed(seed: int, size: int = 32) -> tuple[np.ndarray, FaceFactors]:
    """Image (uint8 [size, size, 3]) and factors of face ``seed``."""
    f = sample_factors(seed)
    return np.asarray(render_face(f, size)), f


def make_dataset(seeds: range | list[int], size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, size, size, 3] and factor matrix float32 [N, len(FACTORS)]."""
    seeds = list(seeds)
    images = np.empty((len(seeds), size, size, 3), dtype=np.uint8)
    labels = np.empty((len(seeds), len(FACTORS)), dtype=np.float32)
    for i, s in enumerate(seeds):
        images[i], f = render_seed(s, size)
        labels[i] = f.as_vector()
    return images, labels
