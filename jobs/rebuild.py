#!/usr/bin/env python
"""Scheduled rebuild: publish a new catalog version only when an input changed (or on --force / --grow).

    python jobs/rebuild.py --config configs/celebahq.yaml [--force] [--grow N]

Inputs compared with the version the catalog ref names (its manifest's ``inputs``): the model's
weights fingerprint and revision, the hash of the result-relevant config, the source-code
fingerprint, the classifier's fingerprint and the number of samples. When all are equal (and
neither --force nor --grow is given) it prints that nothing changed and exits 0 without touching
Ray. ``--grow N`` adds N seeds to the run: generate writes only the new seed blocks, the PCA stage
continues from its stored state, and a new version is published. The sample count never shrinks:
a rebuild uses at least as many samples as the published version.

Bad config: exit 2 naming the field, before any work.
The command line is :func:`pipeline.rebuild.main`.
"""

from pipeline.rebuild import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
