"""Scheduled rebuild: publish a new catalog version only when an input changed (or on --force / --grow).

    python jobs/rebuild.py --config configs/celebahq.yaml [--force] [--grow N]

Inputs compared with the version the catalog ref names (its manifest's ``inputs``): the model's
weights fingerprint and revision, the hash of the result-relevant config, the source-code
fingerprint, the classifier's fingerprint and the number of samples. When all are equal (and
neither --force nor --grow is given) it prints that nothing changed and exits 0 without touching
Ray. ``--grow N`` adds N seeds to the run: generate writes only the new seed blocks, the PCA stage
continues from its stored state, and a new version is published. The sample count never shrinks:
a rebuild uses at least as many samples as the published version.

Bad config: exit 2 naming the field, before any work. :func:`main` is the command line of
``jobs/rebuild.py``; the build itself is :func:`pipeline.build.build_catalog`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.build import build_catalog, load_job_config
from pipeline.config import CONFIG_ERROR_EXIT_CODE, BuildConfig, ConfigError, validate_config

__all__ = ["COMPARED", "build_parser", "changed_inputs", "current_inputs", "main", "published_inputs"]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """Command-line arguments (also used by tests/test_infra.py to check the manifests' entrypoints)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML build config (see configs/)")
    parser.add_argument("--force", action="store_true", help="rebuild even if no input changed")
    parser.add_argument(
        "--grow", type=int, default=0, metavar="N", help="add N seeds to the run and republish"
    )
    parser.add_argument("--run-url", default=None, help="override storage.run_url (any fsspec URL)")
    parser.add_argument("--catalog-url", default=None, help="override catalog.url (any fsspec URL)")
    parser.add_argument("--quiet", action="store_true", help="no progress output, only the result")
    return parser


def current_inputs(cfg: BuildConfig, n_samples: int) -> dict[str, Any]:
    """The inputs a build of ``cfg`` with ``n_samples`` samples would record (loads the weights to hash them)."""
    from hspace.toy import resolve_classifier_source
    from pipeline.annotate import classifier_fingerprint
    from pipeline.evaluate import load_model
    from pipeline.publish import build_inputs

    fingerprint = load_model(cfg, device="cpu").fingerprint
    clf = None
    if cfg.annotate:
        source = resolve_classifier_source(cfg.annotate.classifier)
        clf = classifier_fingerprint(source, cfg.storage.storage_options)
    return build_inputs(cfg, model_fingerprint=fingerprint, classifier_fingerprint=clf, n_samples=n_samples)


def published_inputs(cfg: BuildConfig) -> dict[str, Any] | None:
    """``inputs`` of the version the configured ref names, or None if the catalog has none yet."""
    from hspace import catalog as hcatalog

    cat = hcatalog.open(cfg.catalog.url, cfg.catalog.storage_options)
    try:
        version = cat.version(cfg.catalog.model_name, cfg.catalog.ref)
    except FileNotFoundError:
        return None
    return dict(version.manifest.get("inputs") or {}) | {"version": version.version}


COMPARED = (
    "model_fingerprint",
    "model_revision",
    "config_hash",
    "code",
    "classifier_fingerprint",
    "n_samples",
)


def changed_inputs(now: dict[str, Any], before: dict[str, Any] | None) -> list[str]:
    """Names of the inputs that differ (all of them when nothing was published)."""
    if before is None:
        return ["no published version"]
    return [k for k in COMPARED if now.get(k) != before.get(k)]


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Decide, then build or not; returns the exit status (0 also when nothing changed, 2 for a bad config)."""
    args = build_parser(prog).parse_args(argv)
    if args.grow < 0:
        print(f"error: --grow must be >= 0, got {args.grow}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    try:
        cfg = load_job_config(args.config, run_url=args.run_url, catalog_url=args.catalog_url)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    before = published_inputs(cfg)
    n_before = int(before.get("n_samples", 0)) if before else 0
    n_samples = max(cfg.generate.n_samples, n_before) + args.grow
    now = current_inputs(cfg, n_samples)
    changed = changed_inputs(now, before)
    if not changed and not args.force:
        print(
            f"nothing changed: {cfg.catalog.model_name} version {before['version']} in {cfg.catalog.url} "
            f"already has these inputs (config {now['config_hash']}, model {now['model_fingerprint']}, "
            f"code {now['code']['source_sha256']}, {n_samples} samples); no rebuild"
        )
        return 0
    reason = ", ".join(changed) if changed else "--force"
    print(f"rebuilding {cfg.name}: {reason} (samples {n_before} -> {n_samples})")

    data = cfg.model_dump(mode="json")
    data["generate"]["n_samples"] = n_samples
    try:  # growing must keep the config valid (e.g. evaluation seeds stay disjoint from generation seeds)
        grown = validate_config(data, source=f"{args.config} grown to {n_samples} samples", check_model=False)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    result = build_catalog(grown, progress=not args.quiet)
    print(result.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
