#!/usr/bin/env python
"""Build a direction catalog from a YAML config: generate -> pca -> annotate -> aggregate -> evaluate -> publish.

Runs locally or as a Ray job:

    python jobs/build_catalog.py --config configs/quickstart.yaml [--dry-run]
    ray job submit --working-dir . -- python jobs/build_catalog.py --config configs/quickstart.yaml

``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` (set for a submitted job) or starts a local
one. A bad config exits with status 2 and the offending field named, before any work starts.
Relative local paths in the config resolve against the current directory; under ``ray job submit``
that is the uploaded working dir, so give ``--run-url`` / ``--catalog-url`` (or absolute paths)
to keep the results.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python jobs/x.py` puts jobs/ on sys.path, not the repository root
    sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments (also used by tests/test_infra.py to check the manifests' entrypoints)."""
    parser = argparse.ArgumentParser(prog="build_catalog.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML build config (see configs/)")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate the config and print the plan; no work"
    )
    parser.add_argument("--run-url", default=None, help="override storage.run_url (any fsspec URL)")
    parser.add_argument("--catalog-url", default=None, help="override catalog.url (any fsspec URL)")
    parser.add_argument("--quiet", action="store_true", help="no progress output, only the closing summary")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Validate the config (exit 2 on error), then dry-run or build; returns the exit status."""
    args = build_parser().parse_args(argv)
    from pipeline.config import plan
    from pipeline.graph import load_job_config

    cfg = load_job_config(args.config, run_url=args.run_url, catalog_url=args.catalog_url)
    if args.dry_run:
        print(f"{args.config}: ok ({cfg.name}); dry run, nothing written")
        print(plan(cfg).summary())
        return 0

    from pipeline.graph import build_catalog

    result = build_catalog(cfg, progress=not args.quiet)
    print(result.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
