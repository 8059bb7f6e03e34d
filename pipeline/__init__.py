"""The Ray batch pipeline that turns a diffusion model into a published direction catalog.

Stages (each a function of the build config and the run store, returning a typed result that the
next stage takes): ``generate`` samples seeded trajectories and stores h per step as parquet
shards, ``pca_stage`` streams them through a per-timestep PCA in Ray actors, then annotate /
aggregate / evaluate / publish. ``pipeline.build`` runs them in order and is the build's command
line; ``pipeline.rebuild`` decides whether a scheduled rebuild is needed. ``pipeline.config`` is the
config schema and loading, ``pipeline.plan`` the seed-block layout and dry run,
``pipeline.ray_runtime`` the one place Ray is started or joined. Imports flow one way:
``jobs -> pipeline -> hspace``; modules here import Ray lazily where they can so that
``pipeline.config``, ``pipeline.plan`` and ``pipeline.storage`` work without a cluster.
"""

from __future__ import annotations

__all__ = ["config", "storage"]
