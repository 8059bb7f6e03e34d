"""The whole catalog build as one function: generate -> pca -> annotate -> aggregate -> evaluate -> publish.

Each stage is a function of the config and the run store (design.md, "Data flow"); this module
only wires them together, joins or starts Ray, times every stage and returns a
:class:`BuildResult` whose ``summary()`` is the closing report of ``jobs/build_catalog.py``:
samples, activation rows per second, bytes written, directions, the effect matrix, the catalog
URL and the report's location.

Stages without a config section are skipped: no ``annotate`` means PCA (and Jacobian) directions
only; no ``evaluate`` means no effect matrix.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import BuildConfig
from pipeline.storage import RunStore

__all__ = ["BuildResult", "build_catalog", "ephemeral_path_warnings", "init_ray", "override_urls"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def _absolute(url: str) -> str:
    """Local relative paths -> absolute (Ray workers may run in another working directory)."""
    if "://" in url or url.startswith("/"):
        return url
    return str(Path(url).expanduser().resolve())


def override_urls(
    cfg: BuildConfig, *, run_url: str | None = None, catalog_url: str | None = None
) -> BuildConfig:
    """The config with ``storage.run_url`` / ``catalog.url`` replaced (when given) and made absolute."""
    storage = cfg.storage.model_copy(update={"run_url": _absolute(run_url or cfg.storage.run_url)})
    catalog = cfg.catalog.model_copy(update={"url": _absolute(catalog_url or cfg.catalog.url)})
    return cfg.model_copy(update={"storage": storage, "catalog": catalog})


def ephemeral_path_warnings(
    cfg: BuildConfig, *, run_url: str | None = None, catalog_url: str | None = None
) -> list[str]:
    """Warnings for relative local paths inside a submitted Ray job with a working_dir.

    ``ray job submit --working-dir .`` runs the entrypoint in a temporary copy of the directory, so
    ``runs/quickstart`` would land there and vanish with the Ray session.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw or "working_dir" not in raw:
        return []
    out = []
    urls = (
        ("storage.run_url", run_url or cfg.storage.run_url),
        ("catalog.url", catalog_url or cfg.catalog.url),
    )
    for field_name, url in urls:
        if "://" not in url and not url.startswith("/"):
            out.append(
                f"warning: {field_name}={url!r} is relative; in this Ray job it resolves inside the job's temporary "
                f"working dir ({Path(url).resolve()}), which is deleted with the Ray session. Pass an absolute path "
                f"or a URL (--run-url / --catalog-url) to keep the results."
            )
    return out


def load_job_config(
    path: str | Path, *, run_url: str | None = None, catalog_url: str | None = None
) -> BuildConfig:
    """What every job does first: validate ``path`` (exit 2 naming the field on error), warn about
    paths that would vanish inside a submitted Ray job, then apply the URL overrides."""
    import sys

    from pipeline.config import load_config_or_exit

    loaded = load_config_or_exit(path)
    for line in ephemeral_path_warnings(loaded, run_url=run_url, catalog_url=catalog_url):
        print(line, file=sys.stderr)
    return override_urls(loaded, run_url=run_url, catalog_url=catalog_url)


def init_ray(cfg: BuildConfig) -> str:
    """Join the cluster (``resources.ray_address`` or ``RAY_ADDRESS``) or start a local one.

    A local cluster's workers get the repository root on ``PYTHONPATH`` so they import this tree;
    a submitted job already ships it as its working_dir. Returns a description for the log.
    """
    import ray

    if ray.is_initialized():
        return "ray: already initialised"
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    if address is None:
        paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # the raylet waits this long for its agents; on a loaded machine the default is too short
        os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    if (
        address is None
    ):  # a private local cluster (never a stale one from /tmp/ray): no dashboard, starts faster
        ray.init(address="local", log_to_driver=True, configure_logging=False, include_dashboard=False)
    else:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    resources = ray.cluster_resources()
    where = f"cluster at {address}" if address else "local cluster"
    return f"ray: {where}, {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"


@dataclass
class BuildResult:
    """What a build did and where its catalog version is."""

    name: str
    catalog_url: str
    model: str
    ref: str
    version: str
    report_url: str
    n_samples: int
    rows_generated: int
    generate_seconds: float
    bytes_written: int
    directions: dict[str, str]  # name -> kind
    effects: dict[str, Any] | None
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        """Activation rows (seed x step) written per second of the generate stage."""
        return self.rows_generated / self.generate_seconds if self.generate_seconds > 0 else 0.0

    def summary(self) -> str:
        """The closing report (plain text)."""
        from pipeline.report import effect_table_text

        kinds: dict[str, int] = {}
        for kind in self.directions.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        total = sum(self.stage_seconds.values())
        lines = [
            f"== catalog build {self.name}: done in {total:.1f}s",
            "   stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items()),
            f"   samples: {self.n_samples}; generated now: {self.rows_generated} rows at {self.rows_per_s:.1f} rows/s",
            f"   bytes written: {self.bytes_written} ({self.bytes_written / 1e6:.2f} MB: run shards + catalog version)",
            f"   directions: {len(self.directions)} "
            + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())),
        ]
        if self.effects is not None:
            lines.append(
                f"   effect matrix ({self.effects['units']} units, gamma={self.effects['gamma']}, "
                f"{self.effects['n_seeds']} held-out seeds; (score(+g) - score(-g)) / 2):"
            )
            lines += ["     " + row for row in effect_table_text(self.effects, max_rows=40).splitlines()]
        lines += [
            f"   catalog: {self.catalog_url}  model {self.model}  version {self.version}  (ref {self.ref})",
            f"   report: {self.report_url}",
        ]
        return "\n".join(lines)


def _timed(stage_seconds: dict[str, float], name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        stage_seconds[name] = time.perf_counter() - t0


def build_catalog(cfg: BuildConfig, progress: bool = True) -> BuildResult:
    """Run every stage of the build in order and publish a new catalog version."""
    from pipeline.aggregate import aggregate
    from pipeline.annotate import annotate, read_scores
    from pipeline.evaluate import evaluate
    from pipeline.generate import generate
    from pipeline.pca_stage import pca_stage
    from pipeline.publish import build_inputs, publish
    from pipeline.report import edit_strip_png

    cfg = override_urls(cfg)
    log = print if progress else (lambda *a, **k: None)
    log(init_ray(cfg))
    store = RunStore(cfg.storage.run_url, cfg.storage.storage_options)
    seconds: dict[str, float] = {}

    gen = _timed(seconds, "generate", generate, cfg, store, progress=progress)
    facts = (store.stage("generate") or {}).get("model") or {}
    fingerprint, timesteps = facts.get("model_fingerprint"), facts.get("timesteps")
    pca = _timed(seconds, "pca", pca_stage, cfg, store, progress=progress).pca

    scores, attributes, binary, clf_fp = None, [], [], None
    if cfg.annotate is not None:
        ann = _timed(seconds, "annotate", annotate, cfg, store, progress=progress)
        scores, record = read_scores(store)
        attributes, binary, clf_fp = ann.attributes, ann.binary, ann.classifier_fingerprint
        del record
    import torch

    agg = _timed(
        seconds,
        "aggregate",
        aggregate,
        cfg,
        store,
        scores=scores,
        attributes=attributes,
        binary=binary,
        pca=pca,
        timesteps=torch.tensor(timesteps) if timesteps is not None else None,
        model_fingerprint=fingerprint,
        classifier_fingerprint=clf_fp,
        progress=progress,
    )
    effects, previews, preview_scales = None, {}, None
    if cfg.evaluate is not None and cfg.annotate is not None:
        ev = _timed(
            seconds,
            "evaluate",
            evaluate,
            cfg,
            agg.directions,
            agg.random_of,
            attributes=attributes,
            binary=binary,
            progress=progress,
        )
        effects, preview_scales = ev.effects, ev.preview_scales
        previews = {name: edit_strip_png(images) for name, images in ev.previews.items()}

    run = store.summary()
    inputs = build_inputs(
        cfg, model_fingerprint=fingerprint, classifier_fingerprint=clf_fp, n_samples=run["samples"]
    )
    pub = _timed(
        seconds,
        "publish",
        publish,
        cfg,
        directions=agg.directions,
        pca=pca,
        effects=effects,
        previews=previews,
        preview_scales=preview_scales,
        inputs=inputs,
        timesteps=timesteps,
        run_summary=run,
        progress=progress,
    )
    result = BuildResult(
        name=cfg.name,
        catalog_url=pub.catalog_url,
        model=pub.model,
        ref=pub.ref,
        version=pub.version,
        report_url=pub.report_url,
        n_samples=run["samples"],
        rows_generated=gen.rows,
        generate_seconds=gen.seconds,
        bytes_written=gen.bytes + pub.bytes,
        directions={n: d.kind for n, d in agg.directions.items()},
        effects=effects,
        stage_seconds=seconds,
    )
    return result
