"""The catalog build, start to end: generate -> pca -> annotate -> aggregate -> evaluate -> publish.

:func:`build_catalog` runs the stages in order, each taking the typed results of the ones before
it, times every stage and returns a :class:`BuildResult` whose ``summary()`` is the closing report:
samples, activation rows per second, bytes written, directions, the effect matrix, the catalog URL
and the report's location. Stages without a config section are skipped: no ``annotate`` means PCA
(and Jacobian) directions only; no ``evaluate`` means no effect matrix.

:func:`main` is the build's command line, shared by ``hspace build`` and ``jobs/build_catalog.py``:
validate the config (exit 2 naming the field, before any work), warn about relative paths that a
submitted Ray job would lose, then dry-run (print the plan) or build and print the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.config import CONFIG_ERROR_EXIT_CODE, BuildConfig, ConfigError, load_config, probe_config
from pipeline.ray_runtime import init_ray, verbose_default
from pipeline.storage import RunStore

__all__ = [
    "BuildResult",
    "build_catalog",
    "build_parser",
    "ephemeral_path_warnings",
    "load_job_config",
    "main",
    "override_urls",
]

T = TypeVar("T")


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
    """What every build entry point does first: validate ``path`` (ConfigError / FileNotFoundError
    naming the field or file), warn on stderr about paths that would vanish inside a submitted Ray
    job, then apply the URL overrides."""
    loaded = load_config(path)
    for line in ephemeral_path_warnings(loaded, run_url=run_url, catalog_url=catalog_url):
        print(line, file=sys.stderr)
    return override_urls(loaded, run_url=run_url, catalog_url=catalog_url)


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
        from pipeline.report import effect_table_text, grade_table_text

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
        if self.effects is not None and self.effects.get("grades"):
            grades = self.effects["grades"]
            graded = {n: g for n, g in grades.items() if self.directions.get(n) != "random"}
            passing = sum(1 for g in graded.values() if g.get("pass"))
            lines.append(
                f"   grades ({passing}/{len(graded)} directions pass; A best, F fails; see hspace.grade; "
                f"the {len(grades) - len(graded)} random baselines are graded in the report):"
            )
            lines += ["     " + row for row in grade_table_text(graded, max_rows=60).splitlines()]
        lines += [
            f"   catalog: {self.catalog_url}  model {self.model}  version {self.version}  (ref {self.ref})",
            f"   report: {self.report_url}",
        ]
        return "\n".join(lines)


def _timed(stage_seconds: dict[str, float], name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        stage_seconds[name] = time.perf_counter() - t0


@contextlib.contextmanager
def native_stderr_to_file() -> Iterator[str | None]:
    """Send what native code and child processes write to file descriptor 2 (Ray's C++ core log
    lines, the local cluster's processes) to a log file, while Python's ``sys.stderr`` (progress
    bars, warnings, tracebacks) stays on the terminal. Yields the file's path (None if fd 2 cannot
    be redirected); restores fd 2 on exit."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield None
        return
    fd, path = tempfile.mkstemp(prefix="hspace-build-", suffix=".log")
    python_stderr = sys.stderr
    sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace")
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield path
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        ours, sys.stderr = sys.stderr, python_stderr
        ours.close()


def build_catalog(cfg: BuildConfig, progress: bool = True, verbose: bool | None = None) -> BuildResult:
    """Run every stage of the build in order and publish a new catalog version.

    ``verbose`` (default: ``HSPACE_VERBOSE``) keeps Ray's own log output on the terminal. Otherwise
    the terminal shows the stages' progress lines and the summary: Ray's Python loggers and the
    workers' deprecation warnings are quieted (``pipeline.ray_runtime.QUIET_ENV``) and, when this
    process starts or joins Ray, the native log lines go to a file named in the first line.
    """
    import ray

    verbose = verbose_default() if verbose is None else verbose
    with contextlib.ExitStack() as stack:
        native_log = None
        if not verbose and not ray.is_initialized():
            native_log = stack.enter_context(native_stderr_to_file())
        return _build(cfg, progress, verbose, native_log)


def _build(cfg: BuildConfig, progress: bool, verbose: bool, native_log: str | None) -> BuildResult:
    """The stages in order (see :func:`build_catalog`)."""
    from pipeline.aggregate import aggregate
    from pipeline.annotate import annotate
    from pipeline.evaluate import evaluate
    from pipeline.generate import generate
    from pipeline.pca_stage import pca_stage
    from pipeline.publish import build_inputs, publish
    from pipeline.report import edit_strip_png

    cfg = override_urls(cfg)
    log = print if progress else (lambda *a, **k: None)
    log(init_ray(cfg, verbose=verbose) + (f" (Ray's own log lines: {native_log})" if native_log else ""))
    store = RunStore(cfg.storage.run_url, cfg.storage.storage_options)
    seconds: dict[str, float] = {}

    gen = _timed(seconds, "generate", generate, cfg, store, progress=progress)
    pca = _timed(seconds, "pca", pca_stage, cfg, store, progress=progress)
    ann = None
    if cfg.annotate is not None:
        ann = _timed(seconds, "annotate", annotate, cfg, store, progress=progress)
    agg = _timed(seconds, "aggregate", aggregate, cfg, store, gen, pca, ann, progress=progress)

    effects, previews, preview_scales = None, {}, None
    if cfg.evaluate is not None and ann is not None:
        ev = _timed(
            seconds,
            "evaluate",
            evaluate,
            cfg,
            agg.directions,
            agg.random_of,
            attributes=ann.attributes,
            binary=ann.binary,
            progress=progress,
        )
        effects, preview_scales = ev.effects, ev.preview_scales
        previews = {name: edit_strip_png(images) for name, images in ev.previews.items()}

    run = store.summary()
    clf_fp = ann.classifier_fingerprint if ann is not None else None
    inputs = build_inputs(
        cfg, model_fingerprint=gen.model_fingerprint, classifier_fingerprint=clf_fp, n_samples=run["samples"]
    )
    pub = _timed(
        seconds,
        "publish",
        publish,
        cfg,
        directions=agg.directions,
        pca=pca.pca,
        effects=effects,
        previews=previews,
        preview_scales=preview_scales,
        inputs=inputs,
        timesteps=list(gen.timesteps) if gen.timesteps is not None else None,
        run_summary=run,
        progress=progress,
    )
    return BuildResult(
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


# ---------------------------------------------------------------------------------------------
# The command line


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The build's arguments (also used by tests/test_infra.py to check the manifests' entrypoints)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML build config (see configs/)")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate the config and print the plan; no work"
    )
    parser.add_argument("--run-url", default=None, help="override storage.run_url (any fsspec URL)")
    parser.add_argument("--catalog-url", default=None, help="override catalog.url (any fsspec URL)")
    parser.add_argument("--quiet", action="store_true", help="no progress output, only the closing summary")
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=None,
        help="keep Ray's own log lines and worker warnings (also: HSPACE_VERBOSE=1)",
    )
    return parser


def _config_error(error: Exception) -> int:
    """One error line naming the field or file, one hint line; the exit status for config errors."""
    print(f"Error: {error}", file=sys.stderr)
    print(
        "Hint: configs/quickstart.yaml is a complete example; --dry-run checks a config without doing any work",
        file=sys.stderr,
    )
    return CONFIG_ERROR_EXIT_CODE


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Validate the config (exit 2 naming the field on error), then dry-run or build; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = load_job_config(args.config, run_url=args.run_url, catalog_url=args.catalog_url)
    except (ConfigError, FileNotFoundError) as e:
        return _config_error(e)
    if args.dry_run:
        from pipeline.plan import plan

        try:
            notes = probe_config(cfg, source=args.config)
        except ConfigError as e:
            return _config_error(e)
        print(*notes, sep="\n", file=sys.stderr, end="\n" if notes else "")
        print(f"{args.config}: ok ({cfg.name}); dry run, nothing written")
        print(plan(cfg).summary())
        return 0
    result = build_catalog(cfg, progress=not args.quiet, verbose=args.verbose)
    print(result.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
