"""Planning a build from its config: the seed-block layout and the dry-run numbers.

A run is cut into seed blocks (:func:`seed_blocks`), the unit of generation work, of shards and of
resumption. :func:`plan` is the dry run: blocks, shards, rows and bytes a build will write,
computed from the config and the model's ``unet/config.json`` without loading weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import BuildConfig, ModelInfo, describe_model

__all__ = ["Plan", "SeedBlock", "plan", "seed_blocks"]


@dataclass(frozen=True)
class SeedBlock:
    """Seeds ``start .. stop - 1``: the unit of generation work, of shards and of resumption."""

    index: int
    start: int
    stop: int

    @property
    def key(self) -> str:
        """Stable manifest key; a block whose range changed (grown run) is a different block."""
        return f"{self.start:012d}-{self.stop:012d}"

    @property
    def seeds(self) -> range:
        return range(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


def seed_blocks(cfg: BuildConfig) -> list[SeedBlock]:
    """Blocks of ``seeds_per_block`` consecutive seeds from ``seed_start``; the last may be short."""
    g = cfg.generate
    end = g.seed_start + g.n_samples
    return [
        SeedBlock(i, s, min(s + g.seeds_per_block, end))
        for i, s in enumerate(range(g.seed_start, end, g.seeds_per_block))
    ]


@dataclass(frozen=True)
class Plan:
    """Dry-run numbers of a build (nothing executed)."""

    n_samples: int
    n_steps: int
    n_blocks: int
    n_activation_shards: int
    n_sample_shards: int
    rows: int
    h_shape: tuple[int, int, int] | None
    bytes_per_row: int | None
    estimated_bytes: int | None
    pca_steps: int
    pca_actors: int
    workers: int
    device: str

    def summary(self) -> str:
        """Human-readable lines for ``--dry-run``."""
        size = (
            "unknown (set model.h_shape)"
            if self.estimated_bytes is None
            else _human_bytes(self.estimated_bytes)
        )
        return "\n".join(
            [
                f"samples:            {self.n_samples} in {self.n_blocks} seed blocks",
                f"sampler steps:      {self.n_steps}",
                f"activation shards:  {self.n_activation_shards} (+{self.n_sample_shards} sample shards)",
                f"activation rows:    {self.rows}",
                f"h shape:            {list(self.h_shape) if self.h_shape else 'unknown'}",
                f"activation bytes:   {size} (float16, before compression)",
                f"pca:                {self.pca_steps} steps over {self.pca_actors} actors",
                f"workers:            {self.workers} on {self.device}",
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")


def plan(cfg: BuildConfig, info: ModelInfo | None = None) -> Plan:
    """Dry run: blocks, shards (one per step per block), rows (seed x step) and float16 h bytes."""
    if info is None:
        info = describe_model(cfg.model)
    steps = cfg.sampler.num_inference_steps
    blocks = seed_blocks(cfg)
    rows = cfg.generate.n_samples * steps
    per_row = 2 * math.prod(info.h_shape) if info.h_shape is not None else None
    n_pca = len(cfg.pca_steps)
    return Plan(
        n_samples=cfg.generate.n_samples,
        n_steps=steps,
        n_blocks=len(blocks),
        n_activation_shards=len(blocks) * steps,
        n_sample_shards=len(blocks),
        rows=rows,
        h_shape=info.h_shape,
        bytes_per_row=per_row,
        estimated_bytes=rows * per_row if per_row is not None else None,
        pca_steps=n_pca,
        pca_actors=math.ceil(n_pca / cfg.pca.steps_per_actor),
        workers=cfg.resources.workers,
        device=cfg.resources.device,
    )
