"""The Ray batch pipeline that turns a diffusion model into a published direction catalog.

Stages (each a function of the build config and the run store): ``generate`` samples seeded
trajectories and stores h per step as parquet shards, ``pca_stage`` streams them through a
per-timestep PCA in Ray actors, then annotate / aggregate / evaluate / publish. Imports flow one
way: ``jobs -> pipeline -> hspace``; modules here import Ray lazily where they can so that
``pipeline.config`` and ``pipeline.storage`` work without a cluster.
"""

from __future__ import annotations

__all__ = ["config", "storage"]
