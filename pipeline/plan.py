"""Planning a build from its config: the seed-block layout and the dry-run numbers.

A run is cut into seed blocks (:func:`seed_blocks`), the unit of generation work, of shards and of
resumption. :func:`plan` is the dry run: blocks, shards, rows and bytes a build will write,
computed from the config and the model's ``unet/config.json`` without loading weights.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, overload

from pipeline.config import (
    CONFIG_ERROR_EXIT_CODE,
    BuildConfig,
    ConfigError,
    ModelInfo,
    describe_model,
    load_config_or_exit,
    probe_config,
)

__all__ = ["Plan", "SeedBlock", "SeedBlocks", "main", "plan", "seed_blocks"]


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


class SeedBlocks(Sequence[SeedBlock]):
    """The seed blocks of a run, computed on access: no per-block allocation (a config may ask for millions)."""

    def __init__(self, seed_start: int, n_samples: int, seeds_per_block: int) -> None:
        if n_samples < 0 or seeds_per_block <= 0:
            raise ValueError(
                f"need n_samples >= 0 and seeds_per_block > 0, got {n_samples}, {seeds_per_block}"
            )
        self.seed_start, self.n_samples, self.seeds_per_block = seed_start, n_samples, seeds_per_block

    def __len__(self) -> int:
        return -(-self.n_samples // self.seeds_per_block)

    def _block(self, i: int) -> SeedBlock:
        start = self.seed_start + i * self.seeds_per_block
        return SeedBlock(i, start, min(start + self.seeds_per_block, self.seed_start + self.n_samples))

    @overload
    def __getitem__(self, i: int) -> SeedBlock: ...
    @overload
    def __getitem__(self, i: slice) -> list[SeedBlock]: ...
    def __getitem__(self, i: int | slice) -> SeedBlock | list[SeedBlock]:
        if isinstance(i, slice):
            return [self._block(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"seed block {i} out of range (the run has {n})")
        return self._block(i % n)

    def __iter__(self) -> Iterator[SeedBlock]:
        return (self._block(i) for i in range(len(self)))

    def __repr__(self) -> str:
        return f"SeedBlocks(seed_start={self.seed_start}, n_samples={self.n_samples}, per_block={self.seeds_per_block})"


def seed_blocks(cfg: BuildConfig) -> SeedBlocks:
    """Blocks of ``seeds_per_block`` consecutive seeds from ``seed_start``; the last may be short (lazy)."""
    g = cfg.generate
    return SeedBlocks(g.seed_start, g.n_samples, g.seeds_per_block)


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
    """Dry run: blocks, shards (one per step per block), rows (seed x step) and float16 h bytes.

    Every number is arithmetic on the config: planning takes the same time for any run size.
    """
    if info is None:
        info = describe_model(cfg.model)
    steps = cfg.sampler.num_inference_steps
    n_blocks = len(seed_blocks(cfg))
    rows = cfg.generate.n_samples * steps
    per_row = 2 * math.prod(info.h_shape) if info.h_shape is not None else None
    n_pca = steps if cfg.pca.steps is None else len(set(cfg.pca.steps))
    return Plan(
        n_samples=cfg.generate.n_samples,
        n_steps=steps,
        n_blocks=n_blocks,
        n_activation_shards=n_blocks * steps,
        n_sample_shards=n_blocks,
        rows=rows,
        h_shape=info.h_shape,
        bytes_per_row=per_row,
        estimated_bytes=rows * per_row if per_row is not None else None,
        pca_steps=n_pca,
        pca_actors=math.ceil(n_pca / cfg.pca.steps_per_actor),
        workers=cfg.resources.workers,
        device=cfg.resources.device,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.plan CONFIG...``: validate configs and print their dry-run plans (exit 2 if bad)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.plan", description=main.__doc__)
    parser.add_argument("configs", nargs="+", help="YAML build configs")
    args = parser.parse_args(argv)
    for path in args.configs:
        cfg = load_config_or_exit(path)
        try:
            notes = probe_config(cfg, source=str(path))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(CONFIG_ERROR_EXIT_CODE) from None
        print(f"{path}: ok ({cfg.name})")
        for note in notes:
            print(note, file=sys.stderr)
        print(plan(cfg).summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
