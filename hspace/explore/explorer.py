"""What the explorer page shows and renders: catalog listings, version summaries, edits, inversions.

:class:`Explorer` holds an open :class:`~hspace.catalog.Catalog` and one loaded
:class:`~hspace.model.HSpaceModel`. Catalog reads go through the catalog API (every file checked
against its manifest sha256); versions are immutable, so a version's manifest and directions are
cached by id while refs are resolved on every request. Model work (:meth:`render_batch`,
:meth:`invert`, :meth:`swap`) must run on one thread at a time: the web app runs it on its
:class:`~hspace.explore.render_queue.RenderQueue` worker.

Images leave the server as PNG data URLs upscaled by an integer factor with nearest neighbours,
so a 32-pixel face stays sharp at 256 pixels (the page also sets ``image-rendering: pixelated``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hspace.catalog import preview_path

if TYPE_CHECKING:
    from torch import Tensor

    from hspace.catalog import Catalog, CatalogVersion
    from hspace.directions import Direction
    from hspace.inversion import Inversion
    from hspace.model import HSpaceModel
    from hspace.sampling import HSpaceSampler

__all__ = ["Explorer", "RenderJob", "direction_rows", "png_data_url"]

#: Most seeds one render or swap request may hold (a typo like 0-10000 fails fast instead).
MAX_SEEDS = 16
#: Largest upload accepted for inversion, in bytes.
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
#: Slider half-range in sigma units.
SIGMA_RANGE = 3.0
#: Default slider half-range in raw units for directions stored in raw h units (mean differences).
RAW_RANGE = 2.0


def png_data_url(image: Tensor, min_size: int = 256) -> str:
    """``data:image/png;base64,...`` of one image [C, H, W] in [0, 1], upscaled by the smallest
    integer factor that makes it at least ``min_size`` pixels tall (nearest neighbour)."""
    import numpy as np
    from PIL import Image

    a = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    a = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a[:3]
    factor = max(1, math.ceil(min_size / a.shape[1]))
    a = a.transpose(1, 2, 0).repeat(factor, axis=0).repeat(factor, axis=1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def direction_rows(manifest: Mapping[str, Any], files: Sequence[str], effects: Any) -> list[dict[str, Any]]:
    """One row per direction of a manifest for the page: name, kind, units, sign rule, norm,
    provenance, the grade when the manifest has one, the preview file, and its effect-matrix row."""
    matrix = (effects or {}).get("matrix") if isinstance(effects, Mapping) else None
    rows_of = {name: i for i, name in enumerate(matrix.get("rows", []))} if matrix else {}
    have = set(files)
    out = []
    for entry in manifest.get("directions", []):
        name = entry["name"]
        preview = preview_path(name)
        r = rows_of.get(name)
        out.append(
            {
                "name": name,
                "kind": entry.get("kind", "custom"),
                "units": entry.get("units"),
                "has_sigma": bool(entry.get("has_sigma")),
                "norm": entry.get("norm"),
                "sign_rule": entry.get("sign_rule"),
                "provenance": entry.get("provenance", {}),
                "grade": entry.get("grade"),
                "preview": preview if preview in have else None,
                "effect": None if r is None else _matrix_row(matrix, "effect", r),
                "z": None if r is None else _matrix_row(matrix, "z", r),
            }
        )
    return out


def _matrix_row(matrix: Mapping[str, Any], field: str, row: int) -> list[float | None] | None:
    values = matrix.get(field)
    if not isinstance(values, list) or row >= len(values):
        return None
    return values[row]


@dataclass(frozen=True)
class RenderJob:
    """One validated render request: rows from seeds or from an inverted image's x_T, and the
    scale of each direction (summed: h-space edits add up)."""

    seeds: tuple[int, ...]
    x_T: Tensor | None
    directions: tuple[Direction, ...]
    scales: tuple[float, ...]

    @property
    def n_rows(self) -> int:
        return len(self.seeds) if self.x_T is None else int(self.x_T.shape[0])


class Explorer:
    """The explorer's state and operations over one catalog and one loaded model."""

    def __init__(
        self,
        catalog: Catalog,
        model: HSpaceModel,
        *,
        model_label: str,
        image_size: int = 256,
        cache_size: int = 8,
    ) -> None:
        self.catalog, self.model, self.model_label = catalog, model, model_label
        self.image_size = int(image_size)
        self.cache_size = int(cache_size)
        self._lock = threading.Lock()
        self._versions: OrderedDict[tuple[str, str], tuple[CatalogVersion, dict[str, Direction]]] = (
            OrderedDict()
        )
        self._inversions: OrderedDict[str, Inversion] = OrderedDict()
        self._samplers: dict[tuple, HSpaceSampler] = {}
        self._h_norm: dict[tuple, float] = {}

    # ------------------------------------------------------------------ catalog reads (any thread)
    def overview(self) -> dict[str, Any]:
        """Catalog URL, the loaded model, and every catalog model with its versions and refs."""
        models = []
        for name in self.catalog.models():
            refs = self.catalog.refs(name)
            by_version: dict[str, list[str]] = {}
            for ref, version in sorted(refs.items()):
                by_version.setdefault(version, []).append(ref)
            versions = [
                {"id": v, "refs": by_version.get(v, [])} for v in reversed(self.catalog.versions(name))
            ]
            models.append({"name": name, "refs": refs, "versions": versions})
        return {
            "catalog": self.catalog.url,
            "model": {
                "label": self.model_label,
                "fingerprint": self.model.fingerprint,
                "image_shape": list(self.model.image_shape),
            },
            "models": models,
        }

    def version(self, model: str, ref: str) -> tuple[CatalogVersion, dict[str, Direction]]:
        """A version by ref or id and its directions (checksum verified; cached by version id)."""
        version_id = self.catalog.resolve(model, ref)
        key = (model, version_id)
        with self._lock:
            hit = self._versions.get(key)
            if hit is not None:
                self._versions.move_to_end(key)
                return hit
        version = self.catalog.version(model, version_id)
        loaded = (version, version.directions())
        with self._lock:
            self._versions[key] = loaded
            while len(self._versions) > self.cache_size:
                self._versions.popitem(last=False)
        return loaded

    def steps_of(self, version: CatalogVersion, directions: Mapping[str, Direction]) -> int:
        """Sampler steps of a version: its manifest's sampler, else its timesteps, else its directions'."""
        sampler = version.manifest.get("sampler")
        if isinstance(sampler, Mapping) and sampler.get("num_inference_steps"):
            return int(sampler["num_inference_steps"])
        if version.manifest.get("timesteps"):
            return len(version.manifest["timesteps"])
        per_step = [d.n_steps for d in directions.values() if d.n_steps]
        return int(per_step[0]) if per_step else 20

    def version_info(self, model: str, ref: str) -> dict[str, Any]:
        """What the page shows for a version: manifest summary, direction rows, effects, slider ranges."""
        version, directions = self.version(model, ref)
        m = version.manifest
        effects = version.effects()
        steps = self.steps_of(version, directions)
        sampler = m.get("sampler") if isinstance(m.get("sampler"), Mapping) else {}
        rows = direction_rows(m, version.files(), effects)
        problem = self._compatibility(directions, steps)
        for row in rows:
            row["raw_range"] = self._raw_range(directions[row["name"]], steps)
        matrix = (effects or {}).get("matrix") if isinstance(effects, Mapping) else None
        return {
            "model": model,
            "version": version.version,
            "refs": sorted(r for r, v in self.catalog.refs(model).items() if v == version.version),
            "created": m.get("created"),
            "source_model": m.get("model"),
            "sampler": {"kind": sampler.get("kind") or "ddpm", "steps": steps, "eta": sampler.get("eta")},
            "compatible": problem is None,
            "problem": problem,
            "directions": rows,
            "effects": None
            if matrix is None
            else {
                "columns": matrix.get("columns", []),
                "units": effects.get("score_units", {}),
                "gamma": effects.get("gamma"),
                "effect_units": effects.get("units"),
                "n_seeds": effects.get("n_seeds"),
            },
            "sigma_range": SIGMA_RANGE,
        }

    def preview(self, model: str, version_id: str, relpath: str) -> bytes:
        """A preview PNG of a version, checksum verified (only files under ``previews/``)."""
        if not relpath.startswith("previews/") or not relpath.endswith(".png"):
            raise FileNotFoundError(f"not a preview: {relpath!r}")
        version, _ = self.version(model, version_id)
        return version.read_file(relpath)

    def diff(self, model: str, a: str, b: str) -> dict[str, Any]:
        """Cosine per shared direction between two versions (:meth:`Catalog.diff`)."""
        d = self.catalog.diff(model, a, b)
        return {
            "a": d.a,
            "b": d.b,
            "cosine": {n: (c if math.isfinite(c) else None) for n, c in d.cosine.items()},
            "added": d.added,
            "removed": d.removed,
            "incompatible": d.incompatible,
        }

    def _compatibility(self, directions: Mapping[str, Direction], steps: int) -> str | None:
        from hspace.sampling import check_direction

        sampler = self.sampler("ddim", steps)
        for d in directions.values():
            try:
                check_direction(d, self.model, sampler.timesteps)
            except ValueError as err:
                return f"{err} (loaded model: {self.model_label})"
        return None

    def _raw_range(self, d: Direction, steps: int) -> float:
        """Slider half-range in raw units: 3 sigma where the direction has sigma, 2 for raw-unit
        directions, and the mean norm of h for unit directions without sigma."""
        norms = d.norm_per_step().double().clamp_min(1e-12)
        if d.sigma is not None:
            value = float((SIGMA_RANGE * d.sigma.double() / norms).mean())
        elif d.units == "raw":
            value = RAW_RANGE
        else:
            value = self.h_norm(steps) / float(norms.mean())
        return value if math.isfinite(value) and value > 0 else RAW_RANGE

    # ------------------------------------------------------------------ requests -> jobs (any thread)
    def render_job(self, body: Mapping[str, Any]) -> tuple[Hashable, RenderJob]:
        """Validate a render request; returns (batch key, job). ValueError names the bad field.

        body: ``model``, ``version``, ``seeds`` (list) or ``image`` (an id from :meth:`invert`),
        ``edits`` {direction: scale}, ``units`` raw|sigma, ``mode`` both|asyrp, ``steps`` [lo, hi]
        (edited step range, inclusive, 0 = noisiest), ``sampler`` ddpm|ddim.
        """
        from hspace.sampling import check_direction

        model, ref = _text(body, "model"), _text(body, "version")
        version, directions = self.version(model, ref)
        n_steps = self.steps_of(version, directions)
        units = _choice(body, "units", ("raw", "sigma"), "sigma")
        mode = _choice(body, "mode", ("both", "asyrp"), "both")
        kind = _choice(body, "sampler", ("ddpm", "ddim"), "ddim")
        lo, hi = _step_range(body.get("steps"), n_steps)
        edits = body.get("edits") or {}
        if not isinstance(edits, Mapping):
            raise ValueError("edits must be an object {direction name: scale}")
        names, scales = [], []
        for name, scale in edits.items():
            if name not in directions:
                raise ValueError(f"edits: version {version.version} has no direction {name!r}")
            value = _number(scale, f"edits[{name!r}]")
            if value == 0.0:
                continue
            if units == "sigma" and directions[name].sigma is None:
                raise ValueError(f"edits[{name!r}]: the direction has no sigma; use units 'raw'")
            names.append(name)
            scales.append(value)
        image = body.get("image")
        if image is not None:
            inversion = self._inversion(str(image), n_steps)
            kind = "image"
            job = RenderJob((), inversion.x_T, tuple(directions[n] for n in names), tuple(scales))
        else:
            seeds = _seeds(body.get("seeds"))
            job = RenderJob(seeds, None, tuple(directions[n] for n in names), tuple(scales))
        sampler = self.sampler(kind, n_steps)
        for d in job.directions:
            check_direction(d, self.model, sampler.timesteps)
        return (kind, n_steps, mode, units, lo, hi), job

    # ------------------------------------------------------------------ model work (worker thread)
    def render_batch(
        self, key: Hashable, jobs: Sequence[RenderJob], cancel: threading.Event | None = None
    ) -> list[dict[str, Any]]:
        """Render jobs that share a key in one sampler call: the union of their directions, one row
        of scales per image row (zeros for directions a job does not move). Once ``cancel`` is set,
        the next U-Net call raises :class:`~hspace.explore.render_queue.RenderCancelled`."""
        from hspace.explore.render_queue import RenderCancelled
        from hspace.sampling import Edit

        def check_cancel(module: Any, args: Any) -> None:
            if cancel is not None and cancel.is_set():
                raise RenderCancelled

        kind, n_steps, mode, units, lo, hi = key  # type: ignore[misc]
        start = time.perf_counter()
        names: dict[str, Direction] = {}
        for job in jobs:
            for d in job.directions:
                names.setdefault(d.name, d)
        order = list(names)
        rows = sum(job.n_rows for job in jobs)
        scales = torch.zeros(rows, len(order))
        r = 0
        for job in jobs:
            for d, s in zip(job.directions, job.scales, strict=True):
                scales[r : r + job.n_rows, order.index(d.name)] = s
            r += job.n_rows
        edit = None
        if order:
            edit = Edit(list(names.values()), scales=scales, steps=range(lo, hi + 1), mode=mode, units=units)
        sampler = self.sampler(kind, n_steps)
        handle = self.model.unet.register_forward_pre_hook(check_cancel)
        try:
            if kind == "image":
                x_T = torch.cat([job.x_T for job in jobs])  # type: ignore[misc]
                images = sampler.sample(None, x_T=x_T, edit=edit, record_h=False).images
            else:
                seeds = [s for job in jobs for s in job.seeds]
                images = sampler.sample(seeds, edit=edit, record_h=False).images
        finally:
            handle.remove()
        ms = (time.perf_counter() - start) * 1000
        out, r = [], 0
        for job in jobs:
            urls = [png_data_url(images[i], self.image_size) for i in range(r, r + job.n_rows)]
            r += job.n_rows
            out.append(
                {"images": urls, "render_ms": round(ms, 1), "batch_requests": len(jobs), "batch_rows": rows}
            )
        return out

    def invert(self, model: str, ref: str, data: bytes) -> dict[str, Any]:
        """DDIM-invert an uploaded image with the version's steps; its reconstruction and PSNR."""
        from PIL import Image, UnidentifiedImageError

        from hspace.inversion import ddim_invert, psnr, reconstruct

        if not data:
            raise ValueError("upload: the file is empty")
        if len(data) > MAX_UPLOAD_BYTES:
            raise ValueError(f"upload: {len(data)} bytes is more than the {MAX_UPLOAD_BYTES} allowed")
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                picture = img.copy()
        except (UnidentifiedImageError, OSError):
            raise ValueError("upload: not an image file PIL can read (PNG, JPEG, ...)") from None
        version, directions = self.version(model, ref)
        n_steps = self.steps_of(version, directions)
        image_id = f"{hashlib.sha256(data).hexdigest()[:16]}-{n_steps}"
        inversion = ddim_invert(self.model, [picture], n_steps, record_h=False)
        rec = reconstruct(self.model, inversion, record_h=False)
        with self._lock:
            self._inversions[image_id] = inversion
            while len(self._inversions) > self.cache_size:
                self._inversions.popitem(last=False)
        return {
            "image": image_id,
            "steps": n_steps,
            "psnr": float(psnr(inversion.images, rec.images)[0]),
            "original": png_data_url(inversion.images[0], self.image_size),
            "reconstruction": png_data_url(rec.images[0], self.image_size),
        }

    def swap(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """h-swap (paper Fig. 2a): seeds a rendered with the h of seeds b, next to a and b."""
        model, ref = _text(body, "model"), _text(body, "version")
        version, directions = self.version(model, ref)
        n_steps = self.steps_of(version, directions)
        kind = _choice(body, "sampler", ("ddpm", "ddim"), "ddim")
        seeds_a, seeds_b = _seeds(body.get("seeds_a"), "seeds_a"), _seeds(body.get("seeds_b"), "seeds_b")
        if len(seeds_a) != len(seeds_b):
            raise ValueError(f"seeds_a has {len(seeds_a)} seeds but seeds_b has {len(seeds_b)}")
        lo, hi = _step_range(body.get("steps"), n_steps)
        sampler = self.sampler(kind, n_steps)
        plain = sampler.sample(list(seeds_a) + list(seeds_b), record_h=False).images
        swapped = sampler.h_swap(list(seeds_a), list(seeds_b), steps=range(lo, hi + 1)).images
        n, size = len(seeds_a), self.image_size
        return {
            "a": [png_data_url(plain[i], size) for i in range(n)],
            "b": [png_data_url(plain[n + i], size) for i in range(n)],
            "swapped": [png_data_url(swapped[i], size) for i in range(n)],
        }

    # ------------------------------------------------------------------ helpers
    def sampler(self, kind: str, n_steps: int) -> HSpaceSampler:
        """A cached sampler: ddpm, ddim (eta 0), or ``image`` (DDIM eta 0 without x0 clipping, the
        sampler that reconstructs inverted images)."""
        from hspace.sampling import HSpaceSampler

        key = (kind, n_steps)
        with self._lock:
            sampler = self._samplers.get(key)
            if sampler is None:
                if kind == "image":
                    sampler = HSpaceSampler(
                        self.model, sampler="ddim", num_inference_steps=n_steps, eta=0.0, clip_sample=False
                    )
                else:
                    sampler = HSpaceSampler(self.model, sampler=kind, num_inference_steps=n_steps)
                self._samplers[key] = sampler
            return sampler

    def h_norm(self, n_steps: int) -> float:
        """Mean ||h_t|| over the steps of one DDIM sample (seed 0): the scale of h for sliders of
        unit directions that have no sigma."""
        with self._lock:
            value = self._h_norm.get(n_steps)
        if value is None:
            traj = self.sampler("ddim", n_steps).sample([0])
            assert traj.h is not None
            value = float(traj.h[0].float().flatten(1).norm(dim=1).mean())
            with self._lock:
                self._h_norm[n_steps] = value
        return value

    def _inversion(self, image_id: str, n_steps: int) -> Inversion:
        with self._lock:
            inversion = self._inversions.get(image_id)
        if inversion is None:
            raise ValueError(f"image {image_id!r} is not (or no longer) inverted here: upload it again")
        if inversion.num_inference_steps != n_steps:
            raise ValueError(
                f"image {image_id!r} was inverted with {inversion.num_inference_steps} steps, "
                f"this version samples {n_steps}: upload it again"
            )
        return inversion


# ---------------------------------------------------------------------- request fields
def _text(body: Mapping[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field} must be a non-empty string, got {value!r}")
    return value


def _choice(body: Mapping[str, Any], field: str, allowed: tuple[str, ...], default: str) -> str:
    value = body.get(field, default)
    if value not in allowed:
        raise ValueError(f"{field} must be one of {list(allowed)}, got {value!r}")
    return str(value)


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r}")
    return float(value)


def _seeds(value: Any, field: str = "seeds") -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{field} must be a non-empty list of seeds, got {value!r}")
    if len(value) > MAX_SEEDS:
        raise ValueError(f"{field}: {len(value)} seeds; at most {MAX_SEEDS} at once")
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"{field} must hold integers >= 0, got {s!r}")
    return tuple(value)


def _step_range(value: Any, n_steps: int) -> tuple[int, int]:
    """[lo, hi] inclusive step indices (0 = noisiest); None = every step."""
    if value is None:
        return 0, n_steps - 1
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"steps must be [first, last] step indices, got {value!r}")
    lo, hi = value
    if not 0 <= lo <= hi < n_steps:
        raise ValueError(f"steps {value} must satisfy 0 <= first <= last <= {n_steps - 1}")
    return lo, hi
