"""A small valid build config on the tiny test model, and a way to change one field of it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def small_config(
    model_dir: str | Path, *, run_url: str = "memory://run", catalog_url: str = "memory://cat"
) -> dict:
    """Every section set, sized for the tiny test U-Net (h [32, 4, 4], 1000 training steps)."""
    return {
        "name": "t",
        "model": {"source": str(model_dir)},
        "sampler": {"kind": "ddpm", "num_inference_steps": 5},
        "generate": {"n_samples": 16, "batch_size": 4, "seeds_per_block": 8},
        "storage": {"run_url": run_url},
        "catalog": {"url": catalog_url, "model_name": "tiny"},
        "pca": {"n_components": 4},
        "annotate": {"classifier": "toy", "attributes": ["glasses", "hat"]},
        "aggregate": {"quantile": 0.25, "disentangle": {"glasses": ["hat"]}},
        "evaluate": {"seed_start": 1000, "n_seeds": 4, "scales": [-1.0, 1.0]},
    }


def with_field(cfg: dict, dotted: str, value: Any) -> dict:
    """A deep copy of ``cfg`` with the field at ``dotted`` (``"generate.n_samples"``) set to ``value``."""
    cfg = copy.deepcopy(cfg)
    *parents, last = dotted.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return cfg
