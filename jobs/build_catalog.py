#!/usr/bin/env python
"""Build a direction catalog from a YAML config: generate -> pca -> annotate -> aggregate -> evaluate -> publish.

Runs locally or as a Ray job:

    python jobs/build_catalog.py --config configs/quickstart.yaml [--dry-run]
    ray job submit --working-dir . -- python jobs/build_catalog.py --config configs/quickstart.yaml

``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` (set for a submitted job) or starts a local
one. A bad config exits with status 2 and the offending field named, before any work starts.
Relative local paths in the config resolve against the current directory; under ``ray job submit``
that is the uploaded working dir, so give ``--run-url`` / ``--catalog-url`` (or absolute paths)
to keep the results. The command line is :func:`pipeline.build.main` (also ``hspace build``).
"""

from pipeline.build import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
