#!/usr/bin/env python
"""Scheduled rebuild: publish a new catalog version only when an input changed (or on --force / --grow).

    python jobs/rebuild.py --config configs/celebahq.yaml [--force] [--grow N]

What is compared and how a rebuild grows a run: :mod:`pipeline.rebuild`, whose ``main`` this runs.
"""

from pipeline.rebuild import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
