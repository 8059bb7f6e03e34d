"""The catalog build, start to end: generate -> pca -> annotate -> aggregate -> evaluate -> publish.

:func:`build_catalog` runs the stages in order, each taking the typed results of the ones before
it, times every stage and returns a :class:`BuildResult` whose ``summary()`` is the closing report:
samples, activation rows per second, bytes written, directions, the effect matrix, the catalog URL
and the report's location. Stages without a config section are skipped: no ``annotate`` means PCA
(and Jacobian) directions only; no ``evaluate`` means no effect matrix.

:func:`main` is the build's command line, shared by ``hspace build`` and ``jobs/build_catalog.py``:
validate the config (exit 2 naming the field, before any work), warn about relative paths that a
submitted Ray job would lose, probe the storage URLs (as the dry run does), then dry-run (print the
plan) or build and print the summary.

A build that fails prints one ``Error:`` line naming the stage, the block or file and the cause,
and one ``Hint:`` line naming the log file that holds the whole error chain (the file the ``ray:``
line names); it exits 2 for what the user fixes (bad config, corrupt or foreign file, a run store
that refuses the settings) and 1 for infrastructure failures (lost nodes, missing resources,
storage failing after its retries); see :mod:`pipeline.failure`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.config import CONFIG_ERROR_EXIT_CODE, BuildConfig, ConfigError, load_config, probe_config
from pipeline.failure import INFRASTRUCTURE_EXIT_CODE, BuildFailure, write_chain
from pipeline.ray_runtime import CAPACITY_TIMEOUT_ENV, DEFAULT_CAPACITY_TIMEOUT_S, init_ray, verbose_default
from pipeline.storage import RunStore

__all__ = [
    "BuildFailure",
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


@dataclass
class _StageClock:
    """Which stage the build is in (named by a failure) and how long each stage took."""

    seconds: dict[str, float] = field(default_factory=dict)
    current: str = "setup"

    def run(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        self.current = name
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[name] = time.perf_counter() - t0


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

    A stage that fails raises :class:`~pipeline.failure.BuildFailure` (its ``__cause__`` is the
    error raised) naming the stage, after the whole error chain was appended to the log file
    (the native log above, or a new ``hspace-build-*.log`` in the temporary directory).
    """
    import ray

    verbose = verbose_default() if verbose is None else verbose
    clock = _StageClock()
    with contextlib.ExitStack() as stack:
        native_log = None
        if not verbose and not ray.is_initialized():
            native_log = stack.enter_context(native_stderr_to_file())
        try:
            return _build(cfg, progress, verbose, native_log, clock)
        except Exception as error:
            failure = BuildFailure(clock.current, error)
            failure.log_path = native_log or _new_log()
            write_chain(failure, failure.log_path)
            raise failure from error


def _new_log() -> str:
    fd, path = tempfile.mkstemp(prefix="hspace-build-", suffix=".log")
    os.close(fd)
    return path


def _build(
    cfg: BuildConfig, progress: bool, verbose: bool, native_log: str | None, clock: _StageClock
) -> BuildResult:
    """The stages in order (see :func:`build_catalog`); ``clock`` tracks the current stage."""
    from pipeline.aggregate import aggregate
    from pipeline.annotate import annotate
    from pipeline.evaluate import evaluate
    from pipeline.generate import generate
    from pipeline.pca_stage import pca_stage
    from pipeline.publish import build_inputs, publish
    from pipeline.report import edit_strip_png

    cfg = override_urls(cfg)
    log = print if progress else (lambda *a, **k: None)
    clock.current = "ray"
    log(init_ray(cfg, verbose=verbose) + (f" (Ray's own log lines: {native_log})" if native_log else ""))
    clock.current = "storage"
    store = RunStore(cfg.storage.run_url, cfg.storage.storage_options)
    seconds = clock.seconds

    gen = clock.run("generate", generate, cfg, store, progress=progress)
    pca = clock.run("pca", pca_stage, cfg, store, progress=progress)
    ann = None
    if cfg.annotate is not None:
        ann = clock.run("annotate", annotate, cfg, store, progress=progress)
    agg = clock.run("aggregate", aggregate, cfg, store, gen, pca, ann, progress=progress)

    effects, previews, preview_scales = None, {}, None
    if cfg.evaluate is not None and ann is not None:
        ev = clock.run(
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

    clock.current = "publish"
    run = store.summary()
    clf_fp = ann.classifier_fingerprint if ann is not None else None
    inputs = build_inputs(
        cfg, model_fingerprint=gen.model_fingerprint, classifier_fingerprint=clf_fp, n_samples=run["samples"]
    )
    pub = clock.run(
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
    parser.add_argument(
        "--capacity-timeout",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds a stage waits for a node that can host its actors before it fails "
        f"(default {DEFAULT_CAPACITY_TIMEOUT_S:g}; also: {CAPACITY_TIMEOUT_ENV})",
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


#: A probe reason that means the storage did not answer (an outage), not that the URL is wrong.
_UNREACHABLE = re.compile(r"\b\w*(Timeout|Connection)\w*Error\b|no answer within")


def probe_storage(cfg: BuildConfig, source: str) -> int | None:
    """The dry run's storage probe (:func:`~pipeline.config.probe_config`) before any work.

    Prints its notes; on a failure prints the ``Error:`` / ``Hint:`` lines and returns the exit
    status: 1 when every failing URL did not answer (timeout, connection refused), else 2 (a URL
    under a file, a missing bucket, ...). None when every URL answers.
    """
    try:
        notes = probe_config(cfg, source=source)
    except ConfigError as e:
        if all(_UNREACHABLE.search(message) for _, message in e.errors):
            print(f"Error: {e}".replace("\n", " "), file=sys.stderr)
            print(
                "Hint: the storage did not answer: check the network, endpoint and credentials "
                "(storage_options), then run again",
                file=sys.stderr,
            )
            return INFRASTRUCTURE_EXIT_CODE
        return _config_error(e)
    print(*notes, sep="\n", file=sys.stderr, end="\n" if notes else "")
    return None


def report_failure(failure: BuildFailure) -> int:
    """Print a failed build's ``Error:`` and ``Hint:`` lines; returns its exit status."""
    print(f"Error: {failure.error_line()}", file=sys.stderr)
    print(f"Hint: {failure.hint_line()}", file=sys.stderr)
    return failure.exit_code


def apply_capacity_timeout(seconds: float | None) -> int | None:
    """``--capacity-timeout``: set :data:`~pipeline.ray_runtime.CAPACITY_TIMEOUT_ENV` for the stages;
    exit status 2 (with the error lines) for a value that is not a positive finite number."""
    if seconds is None:
        return None
    if not 0 < seconds < float("inf"):
        return _config_error(
            ValueError(f"--capacity-timeout: must be a positive number of seconds, got {seconds}")
        )
    os.environ[CAPACITY_TIMEOUT_ENV] = repr(seconds)
    return None


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Validate the config (exit 2 naming the field on error), probe the storage, then dry-run or
    build; returns the exit status (0, 1 for an infrastructure failure, 2 for a user error)."""
    args = build_parser(prog).parse_args(argv)
    refused = apply_capacity_timeout(args.capacity_timeout)
    if refused is not None:
        return refused
    try:
        cfg = load_job_config(args.config, run_url=args.run_url, catalog_url=args.catalog_url)
    except (ConfigError, FileNotFoundError) as e:
        return _config_error(e)
    refused = probe_storage(cfg, args.config)
    if refused is not None:
        return refused
    if args.dry_run:
        from pipeline.plan import plan

        print(f"{args.config}: ok ({cfg.name}); dry run, nothing written")
        print(plan(cfg).summary())
        return 0
    try:
        result = build_catalog(cfg, progress=not args.quiet, verbose=args.verbose)
    except BuildFailure as failure:
        return report_failure(failure)
    print(result.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
