"""Publish stage: write the build as a new immutable catalog version, then move the ref.

Everything goes through :mod:`hspace.catalog`: directions.safetensors, pca.safetensors,
effects.json (stamped with the version id), ``previews/<direction>.png`` edit strips and a
self-contained ``report.html`` are written under a fresh version id with their sha256 in the
manifest, and every direction's grade (:mod:`hspace.grade`) goes into its manifest entry; the
manifest is created last (exclusive create), then the ref moves.

The manifest's ``inputs`` record what the build was made from -- model fingerprint and revision,
a hash of the result-relevant config, a fingerprint of the source code, the classifier, the
number of samples -- which is what ``jobs/rebuild.py`` compares to decide whether anything changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hspace.catalog import preview_path
from hspace.directions import Direction

if TYPE_CHECKING:
    from pipeline.config import BuildConfig

__all__ = [
    "PublishResult",
    "build_inputs",
    "code_version",
    "config_hash",
    "direction_rows",
    "pca_state",
    "publish",
]

#: Config sections that change where and how fast a build runs, not what it produces.
EXECUTION_ONLY = ("storage", "catalog", "resources")
_ROOT = Path(__file__).resolve().parents[1]


def config_hash(cfg: BuildConfig) -> str:
    """sha256 of the canonical JSON of the result-relevant config.

    Leaves out storage/catalog/resources (where and how fast, not what) and ``generate.n_samples``
    (a run may grow; the sample count is an input of its own).
    """
    data = cfg.model_dump(mode="json", exclude=set(EXECUTION_ONLY))
    data["generate"].pop("n_samples", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def code_version() -> dict[str, str]:
    """Package version plus a sha256 over the library and pipeline sources (works without git)."""
    import hspace

    digest = hashlib.sha256()
    for package in ("hspace", "pipeline"):
        for path in sorted((_ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(_ROOT)).encode())
            digest.update(path.read_bytes())
    return {
        "package": hspace.__version__,
        "source_sha256": digest.hexdigest()[:16],
    }


def build_inputs(
    cfg: BuildConfig, *, model_fingerprint: str | None, classifier_fingerprint: str | None, n_samples: int
) -> dict[str, Any]:
    """The inputs a version is built from; equal inputs mean a rebuild would publish the same thing."""
    return {
        "model_source": cfg.model.source,
        "model_revision": cfg.model.revision,
        "model_fingerprint": model_fingerprint,
        "config_hash": config_hash(cfg),
        "code": code_version(),
        "classifier_fingerprint": classifier_fingerprint,
        "n_samples": int(n_samples),
    }


def direction_rows(directions: Mapping[str, Direction]) -> list[dict[str, Any]]:
    """Per-direction summary rows for the report: name, kind, units, norm, mean sigma, and for
    supervised directions the attribute and method they were built with."""
    from pipeline.evaluate import own_attribute

    rows = []
    for name, d in directions.items():
        rows.append(
            {
                "name": name,
                "kind": d.kind,
                "units": d.units,
                "norm": float(d.vector.to(torch.float64).norm()),
                "sigma": None if d.sigma is None else float(d.sigma.mean()),
                "attribute": own_attribute(d),
                "method": d.provenance.get("method"),
            }
        )
    return rows


def pca_state(pca: Any) -> Any:
    """What the catalog stores as pca.safetensors: the PCA's ``(tensors, metadata)`` with float32
    tensors (half the size of the float64 accumulation state; ``CatalogVersion.pca()`` reads it back)."""
    if pca is None:
        return None
    return pca.to_safetensors_dict(torch.float32)


@dataclass(frozen=True)
class PublishResult:
    """Where the version went."""

    catalog_url: str
    model: str
    version: str
    ref: str
    files: list[str]
    bytes: int

    @property
    def report_url(self) -> str:
        return f"{self.catalog_url.rstrip('/')}/{self.model}/versions/{self.version}/report.html"


def _sampler_settings(cfg: BuildConfig) -> dict[str, Any]:
    return {
        "kind": cfg.sampler.kind,
        "num_inference_steps": cfg.sampler.num_inference_steps,
        "eta": cfg.sampler.eta,
    }


def _report_meta(
    cfg: BuildConfig, version: str, inputs: dict[str, Any], run_summary: dict[str, Any]
) -> dict[str, Any]:
    """The facts at the top of report.html."""
    cat_cfg, sampler = cfg.catalog, _sampler_settings(cfg)
    return {
        "version": version,
        "catalog": f"{cat_cfg.url} / {cat_cfg.model_name} (ref {cat_cfg.ref})",
        "build config": cfg.name,
        "model": f"{cfg.model.source} (revision {cfg.model.revision}, fingerprint {inputs.get('model_fingerprint')})",
        "sampler": f"{sampler['kind']}, {sampler['num_inference_steps']} steps, eta {sampler['eta']}",
        "samples": run_summary.get("samples"),
        "activation rows / bytes": f"{run_summary.get('rows')} / {run_summary.get('bytes')}",
        "config hash": inputs.get("config_hash"),
        "code": json.dumps(inputs.get("code")),
    }


def _version_metadata(
    cfg: BuildConfig, inputs: dict[str, Any], timesteps: list[int] | None, run_summary: dict[str, Any]
) -> dict[str, Any]:
    """The version manifest's metadata (what ``jobs/rebuild.py`` compares lives under ``inputs``)."""
    return {
        "model_id": cfg.model.source,
        "revision": cfg.model.revision,
        "config_hash": inputs["config_hash"],
        "model_fingerprint": inputs.get("model_fingerprint"),
        "sampler": _sampler_settings(cfg),
        "timesteps": timesteps,
        "inputs": inputs | {"run": run_summary, "run_url": cfg.storage.run_url},
        # storage_options may hold credentials: never published
        "build_config": cfg.model_dump(
            mode="json", exclude={"storage": {"storage_options"}, "catalog": {"storage_options"}}
        ),
    }


def publish(
    cfg: BuildConfig,
    *,
    directions: Mapping[str, Direction],
    pca: Any,
    effects: dict[str, Any] | None,
    previews: Mapping[str, bytes],
    preview_scales: list[float] | None,
    inputs: dict[str, Any],
    timesteps: list[int] | None,
    run_summary: dict[str, Any],
    progress: bool = True,
) -> PublishResult:
    """Write one catalog version (files, manifest last, then the ref) and return where it is."""
    from hspace import catalog as hcatalog
    from pipeline.report import render_report

    cat_cfg = cfg.catalog
    cat = hcatalog.open(cat_cfg.url, cat_cfg.storage_options)
    version = hcatalog.new_version_id()
    effects = None if effects is None else dict(effects) | {"version": version, "model": cat_cfg.model_name}
    extra: dict[str, bytes] = {preview_path(n): png for n, png in previews.items()}
    extra["report.html"] = render_report(
        title=f"hspace catalog: {cat_cfg.model_name} {version}",
        meta=_report_meta(cfg, version, inputs, run_summary),
        directions=direction_rows(directions),
        effects=effects,
        previews=previews,
        preview_scales=preview_scales,
    ).encode()
    published = cat.publish(
        cat_cfg.model_name,
        dict(directions),
        pca=pca_state(pca),
        effects=effects,
        extra_files=extra,
        metadata=_version_metadata(cfg, inputs, timesteps, run_summary),
        ref=cat_cfg.ref,
        version=version,
        grades=(effects or {}).get("grades") or None,
    )
    v = cat.version(cat_cfg.model_name, published)
    files = v.files()
    size = sum(int(f["bytes"]) for f in v.manifest["files"])
    result = PublishResult(cat_cfg.url, cat_cfg.model_name, published, cat_cfg.ref, files, size)
    if progress:
        print(
            f"publish: {cat_cfg.model_name} version {published} ({len(files)} files, {size / 1e6:.2f} MB) "
            f"-> ref {cat_cfg.ref!r} in {cat_cfg.url}"
        )
    return result
