"""Annotate stage: an attribute classifier scores the final image of every generated seed.

The paper labels its samples with pretrained attribute classifiers before taking mean differences
(Sec. V, "Classifier annotation"). Here a Ray Data ``map_batches`` with a callable class holds the
classifier in each actor (loaded once in ``__init__``); one input row is one completed seed block's
samples shard (read and sha256-checked through :class:`~pipeline.storage.RunStore` inside the
actor, so PNG bytes never pass through the driver) and one output batch is that block's scores.

The result is ``annotations/scores-<id>.parquet`` in the run (the stage record names it): ``seed``
plus one float32 column per attribute (logit for a binary attribute, value for a continuous one),
sorted by seed, joinable with ``samples/`` on ``seed``. The stage record in the run manifest lists
which blocks are scored and by which classifier (sha256 of its files), so a grown run scores only
its new blocks and a different classifier rescores everything.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from hspace.classifier import classifier_fingerprint, load_classifier, score_images
from pipeline.storage import RunStore, ShardInfo

if TYPE_CHECKING:
    import torch

    from hspace.classifier import BaseAttributeClassifier
    from pipeline.config import BuildConfig

__all__ = [
    "AnnotateResult",
    "ClassifierScorer",
    "annotate",
    "classifier_fingerprint",
    "decode_pngs",
    "load_classifier",
    "read_scores",
    "select_attributes",
]

STAGE = "annotate"


# ---------------------------------------------------------------------------------------------
# The classifier


def select_attributes(classifier: BaseAttributeClassifier, wanted: Sequence[str] | None) -> list[str]:
    """``annotate.attributes`` checked against the classifier (None = all of them, in its order)."""
    if wanted is None:
        return list(classifier.attributes)
    unknown = [a for a in wanted if a not in classifier.attributes]
    if unknown:
        raise ValueError(
            f"annotate.attributes: {unknown} are not outputs of the classifier {classifier.attributes}"
        )
    return list(wanted)


# ---------------------------------------------------------------------------------------------
# Scoring


def decode_pngs(pngs: Sequence[bytes]) -> torch.Tensor:
    """PNG bytes -> images [B, 3, H, W] float32 in [0, 1]."""
    import torch
    from PIL import Image

    arrays = [np.asarray(Image.open(io.BytesIO(bytes(p))).convert("RGB")) for p in pngs]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


class ClassifierScorer:
    """Ray Data callable class: holds the classifier, maps a batch of sample shards to scores.

    Input batch: columns ``path``, ``rows``, ``bytes``, ``sha256`` (ShardInfo of samples shards).
    Output batch: ``seed`` int64 and one float32 column per attribute.
    """

    def __init__(
        self,
        run_url: str,
        storage_options: dict[str, Any],
        classifier: str,
        attributes: list[str],
        batch_size: int,
        device: str,
    ) -> None:
        self.store = RunStore(run_url, storage_options)
        self.classifier = load_classifier(classifier, device, storage_options)
        self.attributes = list(attributes)
        self.columns = [self.classifier.index(a) for a in self.attributes]
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seeds, scores = [], []
        for path, rows, nbytes, sha in zip(
            batch["path"], batch["rows"], batch["bytes"], batch["sha256"], strict=True
        ):
            table = self.store.read_table(ShardInfo(str(path), int(rows), int(nbytes), str(sha)))
            images = decode_pngs(table.column("png").to_pylist())
            seeds.append(table.column("seed").to_numpy())
            scores.append(score_images(self.classifier, images, self.columns, self.batch_size).numpy())
        s = np.concatenate(scores) if scores else np.zeros((0, len(self.attributes)), np.float32)
        out = {"seed": np.concatenate(seeds).astype(np.int64) if seeds else np.zeros(0, np.int64)}
        out.update({a: s[:, i] for i, a in enumerate(self.attributes)})
        return out


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class AnnotateResult:
    """What annotate produced: the scores table and how much of it is new."""

    scores: pa.Table
    attributes: list[str]
    binary: list[bool]
    classifier_fingerprint: str
    n_scored_now: int
    seconds: float

    @property
    def n_samples(self) -> int:
        return self.scores.num_rows


def _scores_table(
    seeds: np.ndarray, columns: dict[str, np.ndarray], attributes: Sequence[str], meta: dict
) -> pa.Table:
    table = pa.table(
        {"seed": pa.array(np.asarray(seeds, np.int64), pa.int64())}
        | {a: pa.array(np.asarray(columns[a], np.float32), pa.float32()) for a in attributes}
    )
    return table.replace_schema_metadata({"hspace.annotate": json.dumps(meta, sort_keys=True)}).sort_by(
        "seed"
    )


def read_scores(store: RunStore) -> tuple[pa.Table, dict[str, Any]]:
    """The scores table (checksum-verified) and the annotate stage record; FileNotFoundError if none."""
    record = store.stage(STAGE)
    if record is None:
        raise FileNotFoundError(f"run {store.url} has no annotations yet: run the annotate stage first")
    return store.read_table(ShardInfo.from_dict(record["shard"])), record


def annotate(cfg: BuildConfig, store: RunStore, *, progress: bool = True) -> AnnotateResult:
    """Score every completed seed block not yet scored by this classifier; write the scores table."""
    import time

    import ray

    if cfg.annotate is None:
        raise ValueError("annotate: the config has no annotate section")
    t0 = time.perf_counter()
    ann, res = cfg.annotate, cfg.resources
    fingerprint = classifier_fingerprint(ann.classifier, cfg.storage.storage_options)
    probe = load_classifier(ann.classifier, "cpu", cfg.storage.storage_options)
    attributes = select_attributes(probe, ann.attributes)
    binary = [probe.binary[probe.index(a)] for a in attributes]
    del probe

    blocks = store.blocks()
    if not blocks:
        raise ValueError(f"annotate: run {store.url} has no completed seed blocks; run generate first")
    previous = store.stage(STAGE)
    keep: pa.Table | None = None
    done: set[str] = set()
    if (
        previous is not None
        and previous.get("classifier_fingerprint") == fingerprint
        and previous.get("attributes") == attributes
    ):
        old, _ = read_scores(store)
        done = {k for k in previous.get("blocks", []) if k in blocks}
        ranges = [(blocks[k].start, blocks[k].stop) for k in done]
        seeds = old.column("seed").to_numpy()
        mask = np.zeros(len(seeds), bool)
        for lo, hi in ranges:
            mask |= (seeds >= lo) & (seeds < hi)
        keep = old.filter(pa.array(mask))
    todo = [rec for key, rec in blocks.items() if key not in done]

    new_tables = []
    if todo:
        shards = [rec.samples.to_dict() for rec in todo]
        items = [
            {"path": s["path"], "rows": s["rows"], "bytes": s["bytes"], "sha256": s["sha256"]} for s in shards
        ]
        ds = ray.data.from_items(items).map_batches(
            ClassifierScorer,
            fn_constructor_kwargs={
                "run_url": store.url,
                "storage_options": store.storage_options,
                "classifier": ann.classifier,
                "attributes": attributes,
                "batch_size": ann.batch_size,
                "device": res.device,
            },
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=max(1, min(res.workers, len(items)))),
            num_cpus=res.num_cpus_per_worker,
            num_gpus=res.num_gpus_per_worker or None,
        )
        new_tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    n_new = sum(t.num_rows for t in new_tables)

    parts = ([keep] if keep is not None else []) + new_tables
    combined = pa.concat_tables([t.select(["seed", *attributes]).cast(_schema(attributes)) for t in parts])
    meta = {
        "classifier": ann.classifier,
        "classifier_fingerprint": fingerprint,
        "attributes": attributes,
        "binary": binary,
    }
    table = _scores_table(
        combined.column("seed").to_numpy(),
        {a: combined.column(a).to_numpy() for a in attributes},
        attributes,
        meta,
    )
    expected = sum(rec.n_seeds for rec in blocks.values())
    if table.num_rows != expected or len(set(table.column("seed").to_pylist())) != expected:
        raise RuntimeError(
            f"annotate: scored {table.num_rows} rows for {expected} generated seeds in {store.url}"
        )
    # A fresh file name per write: the manifest names the complete file, a crash leaves only an orphan.
    shard = store.write_table(f"annotations/scores-{uuid.uuid4().hex[:12]}.parquet", table)
    store.record_stage(
        STAGE, meta | {"blocks": sorted(blocks), "shard": shard.to_dict(), "rows": table.num_rows}
    )
    if previous is not None and previous["shard"]["path"] != shard.path:
        store.delete(previous["shard"]["path"])
    seconds = time.perf_counter() - t0
    if progress:
        print(
            f"annotate: {n_new} new / {table.num_rows} samples scored on {len(attributes)} attributes in {seconds:.1f}s"
        )
    return AnnotateResult(table, attributes, binary, fingerprint, n_new, seconds)


def _schema(attributes: Sequence[str]) -> pa.Schema:
    return pa.schema([("seed", pa.int64())] + [(a, pa.float32()) for a in attributes])
