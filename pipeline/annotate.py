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
from hspace.toy import resolve_classifier_source
from pipeline.storage import BlockRecord, RunStore, ShardInfo

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

    Input batch: column ``block`` (a completed block's record as JSON); its samples shard is read
    verified (size, sha256) and must hold exactly the block's seeds.
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
        self.classifier = load_classifier(resolve_classifier_source(classifier), device, storage_options)
        self.attributes = list(attributes)
        self.columns = [self.classifier.index(a) for a in self.attributes]
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seeds, scores = [], []
        for raw in batch["block"]:
            rec = BlockRecord.from_dict(json.loads(str(raw)))
            table = self.store.read_table(rec.samples, columns=["seed", "png"])
            self.store.check_block_seeds(rec, rec.samples, table.column("seed").to_numpy())
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

    #: the complete table written to the run (``seed`` + one float32 column per attribute, sorted
    #: by seed, annotate's record in the schema metadata): what :func:`read_scores` returns
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
    """Score every completed seed block not yet scored by this classifier; write the scores table.

    The result holds the complete table it wrote (``result.scores``), so callers need not read it
    back; :func:`read_scores` is for a later process resuming the run.
    """
    import time

    if cfg.annotate is None:
        raise ValueError("annotate: the config has no annotate section")
    t0 = time.perf_counter()
    ann = cfg.annotate
    fingerprint, attributes, binary = _classifier_facts(
        ann.classifier, ann.attributes, cfg.storage.storage_options
    )
    blocks = store.blocks()
    if not blocks:
        raise ValueError(f"annotate: run {store.url} has no completed seed blocks; run generate first")
    previous = store.stage(STAGE)
    keep, done = _reusable_scores(store, previous, blocks, fingerprint, attributes)
    todo = [rec for key, rec in blocks.items() if key not in done]
    new_tables = _score_blocks(cfg, store, todo, attributes) if todo else []
    n_new = sum(t.num_rows for t in new_tables)

    meta = {
        "classifier": ann.classifier,
        "classifier_fingerprint": fingerprint,
        "attributes": attributes,
        "binary": binary,
    }
    table = _combined_table(([keep] if keep is not None else []) + new_tables, attributes, meta)
    expected = sum(rec.n_seeds for rec in blocks.values())
    if table.num_rows != expected or len(set(table.column("seed").to_pylist())) != expected:
        raise RuntimeError(
            f"annotate: scored {table.num_rows} rows for {expected} generated seeds in {store.url}"
        )
    _write_scores(store, table, meta, sorted(blocks), previous)
    seconds = time.perf_counter() - t0
    if progress:
        print(
            f"annotate: {n_new} new / {table.num_rows} samples scored on {len(attributes)} attributes in {seconds:.1f}s"
        )
    return AnnotateResult(table, attributes, binary, fingerprint, n_new, seconds)


def _classifier_facts(
    spec: str, wanted: Sequence[str] | None, storage_options: dict[str, Any]
) -> tuple[str, list[str], list[bool]]:
    """(fingerprint, attributes to score, whether each is binary) of the configured classifier."""
    try:
        source = resolve_classifier_source(spec)
        fingerprint = classifier_fingerprint(source, storage_options)
        probe = load_classifier(source, "cpu", storage_options)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"annotate.classifier: {error}") from None
    attributes = select_attributes(probe, wanted)
    return fingerprint, attributes, [probe.binary[probe.index(a)] for a in attributes]


def _reusable_scores(
    store: RunStore,
    previous: dict[str, Any] | None,
    blocks: dict[str, BlockRecord],
    fingerprint: str,
    attributes: list[str],
) -> tuple[pa.Table | None, set[str]]:
    """Rows of the previous scores table still valid (same classifier and attributes, block still
    in the run) and the keys of the blocks they cover."""
    if (
        previous is None
        or previous.get("classifier_fingerprint") != fingerprint
        or previous.get("attributes") != attributes
    ):
        return None, set()
    old, _ = read_scores(store)
    done = {k for k in previous.get("blocks", []) if k in blocks}
    seeds = old.column("seed").to_numpy()
    mask = np.zeros(len(seeds), bool)
    for key in done:
        mask |= (seeds >= blocks[key].start) & (seeds < blocks[key].stop)
    return old.filter(pa.array(mask)), done


def _score_blocks(
    cfg: BuildConfig, store: RunStore, todo: list[BlockRecord], attributes: list[str]
) -> list[pa.Table]:
    """Score the samples shards of ``todo`` blocks with a Ray Data actor pool; one table per block."""
    import ray

    from pipeline.ray_runtime import init_ray

    init_ray(cfg)
    ann, res = cfg.annotate, cfg.resources
    assert ann is not None
    items = [{"block": json.dumps(rec.to_dict())} for rec in todo]
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
    return [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]


def _combined_table(parts: list[pa.Table], attributes: list[str], meta: dict[str, Any]) -> pa.Table:
    """One scores table (seed + float32 attribute columns, sorted by seed, ``meta`` in the schema)."""
    combined = pa.concat_tables([t.select(["seed", *attributes]).cast(_schema(attributes)) for t in parts])
    return _scores_table(
        combined.column("seed").to_numpy(),
        {a: combined.column(a).to_numpy() for a in attributes},
        attributes,
        meta,
    )


def _write_scores(
    store: RunStore, table: pa.Table, meta: dict[str, Any], blocks: list[str], previous: dict[str, Any] | None
) -> None:
    """Write the table under a fresh name, record it in the manifest, then drop the previous file.

    A fresh file name per write: the manifest names the complete file, a crash leaves only an orphan.
    """
    shard = store.write_table(f"annotations/scores-{uuid.uuid4().hex[:12]}.parquet", table)
    store.record_stage(STAGE, meta | {"blocks": blocks, "shard": shard.to_dict(), "rows": table.num_rows})
    if previous is not None and previous["shard"]["path"] != shard.path:
        store.delete(previous["shard"]["path"])


def _schema(attributes: Sequence[str]) -> pa.Schema:
    return pa.schema([("seed", pa.int64())] + [(a, pa.float32()) for a in attributes])
