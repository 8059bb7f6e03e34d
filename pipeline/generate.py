"""Generate stage: seeded trajectories -> h per step as parquet shards, resumable by seed block.

Ray Data maps over the seed blocks that the run manifest does not list yet. A callable class
(:class:`BlockGenerator`) loads the model once per actor and, for each block, samples its seeds
with :class:`hspace.sampling.HSpaceSampler` (x_T and z_t from each seed's own generator), writes
one activation shard per sampler step and one shard of PNG images, and returns the block's
record. The driver lists each record in the manifest as it arrives, so an interrupted run keeps
every finished block and a re-run redoes only the rest.

Determinism: a block is always sampled as the same sub-batches (``generate.batch_size``) of the
same seeds, whichever actor gets it, so h is bit-identical for any number of workers and across
re-runs. A different batch size changes only floating-point rounding of batched convolutions.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import BuildConfig, ModelInfo, describe_model
from pipeline.plan import SeedBlock, seed_blocks
from pipeline.progress import progress_bar
from pipeline.ray_runtime import CapacityWatch, actor_demand, init_ray, iterate_watched
from pipeline.storage import BlockRecord, RunStore

__all__ = ["BlockGenerator", "GenerateReport", "generate", "run_identity"]


@dataclass(frozen=True)
class GenerateReport:
    """What a generate call did: blocks skipped (already listed) and generated, rows, bytes, speed.

    ``model_fingerprint`` and ``timesteps`` are the run's model facts (every block shares them; see
    ``stages.generate.model`` in the manifest), which the later stages record with their directions;
    None only for a run without any block.
    """

    blocks_total: int
    blocks_skipped: int
    blocks_generated: int
    samples: int
    rows: int
    bytes: int
    seconds: float
    model_fingerprint: str | None = None
    timesteps: tuple[int, ...] | None = None
    #: ``HSpaceModel.describe()`` of the run's model (kind, capture point, shapes, conditioning).
    model_description: dict[str, Any] | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else math.inf

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.inf

    def summary(self) -> str:
        return (
            f"generate: {self.blocks_generated} blocks generated, {self.blocks_skipped} already complete; "
            f"{self.samples} samples, {self.rows} rows, {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s "
            f"({self.samples_per_s:.2f} samples/s, {self.rows_per_s:.1f} rows/s)"
        )

    def to_dict(self) -> dict[str, Any]:
        """The counters and speeds (the model facts are recorded once, under ``stages.generate.model``)."""
        out = asdict(self)
        for key in ("model_fingerprint", "timesteps", "model_description"):
            out.pop(key)
        return {**out, "rows_per_s": self.rows_per_s, "samples_per_s": self.samples_per_s}


def run_identity(cfg: BuildConfig) -> dict[str, Any]:
    """The settings that determine every stored row; a run never mixes rows made with other ones."""
    info = describe_model(cfg.model)
    return {
        "model": cfg.model.source,
        "revision": cfg.model.revision,
        "sampler": cfg.sampler.kind,
        "num_inference_steps": cfg.sampler.num_inference_steps,
        "eta": cfg.sampler.eta,
        "dtype": cfg.dtype,
        "h_shape": list(info.h_shape) if info.h_shape is not None else None,
        "batch_size": cfg.generate.batch_size,
        "weights_sha256": local_weights_digest(info),
        **_conditioning_identity(cfg),
    }


def _conditioning_identity(cfg: BuildConfig) -> dict[str, Any]:
    """The identity keys of the capture point, stored steps and conditioning, present only when set,
    so that runs of unconditional models made before these settings existed keep their identity."""
    m, out = cfg.model, {}
    if m.capture is not None:
        out["capture"] = m.capture
    if cfg.generate.capture_steps is not None or cfg.generate.capture_every is not None:
        out["capture_steps"] = cfg.capture_steps
    if m.conditioned:
        out["conditioning"] = {
            "prompts": m.prompts,
            "negative_prompt": m.negative_prompt,
            "class_labels": m.class_labels,
            "guidance_scale": m.guidance_scale,
            "record_branch": m.record_branch,
        }
    return out


def local_weights_digest(info: ModelInfo) -> str | None:
    """sha256 over a local model's denoiser weight files (None for a hub id, which its revision pins).

    Part of the run identity: retrained weights in the same directory (the toy model after an
    upgrade) must not resume a run whose stored h came from the old ones.
    """
    if not info.is_local:
        return None
    digest = hashlib.sha256()
    root = Path(info.location)
    files = (
        sorted((root / "unet").glob("*.safetensors"))
        or sorted((root / "transformer").glob("*.safetensors"))
        or sorted(root.glob("*.safetensors"))
    )
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


class BlockGenerator:
    """Ray Data callable class: holds the model, turns a batch of seed blocks into block records.

    Input batch: columns ``index``, ``start``, ``stop`` (one row per block). Output: column
    ``record`` (the block's :class:`BlockRecord` as JSON) and ``worker``.
    """

    def __init__(
        self,
        *,
        run_url: str,
        storage_options: dict[str, Any],
        model_location: str,
        revision: str | None,
        device: str,
        dtype: str,
        sampler: str,
        num_inference_steps: int,
        eta: float | None,
        batch_size: int,
        capture: str | None = None,
        conditioning: dict[str, Any] | None = None,
        capture_steps: list[int] | None = None,
    ) -> None:
        started = time.perf_counter()
        import torch

        from hspace.model import HSpaceModel
        from hspace.sampling import HSpaceSampler
        from pipeline.config import ModelConfig

        self.store = RunStore(run_url, storage_options)
        self.model = HSpaceModel.from_pretrained(
            model_location, revision=revision, device=device, dtype=getattr(torch, dtype), capture=capture
        )
        #: the config's model section (conditioning per seed: ModelConfig.conditioning_for)
        self.conditioning = ModelConfig.model_validate(conditioning or {"source": model_location})
        self.capture_steps = capture_steps
        self.sampler = HSpaceSampler(
            self.model, sampler=sampler, num_inference_steps=num_inference_steps, eta=eta
        )
        self.batch_size = batch_size
        self.worker = uuid.uuid4().hex[:8]  # unique file names even if a block is retried elsewhere
        self.init_seconds = time.perf_counter() - started  # imports and model load, reported with each block

    def generate_block(self, block: SeedBlock) -> BlockRecord:
        """Sample the block's seeds, write one shard per step and the images; return the record."""
        import torch

        t0 = time.perf_counter()
        started_unix = time.time()
        seeds = list(block.seeds)
        traj = self.sampler.sample(
            seeds,
            record_h=True,
            h_dtype=torch.float16,
            batch_size=self.batch_size,
            **self.conditioning.conditioning_for(seeds),
        )
        h = traj.h.cpu().numpy()  # [B, T, C, H, W] float16
        sampled = time.perf_counter()
        timesteps = [int(t) for t in traj.timesteps]
        stored = self.capture_steps if self.capture_steps is not None else range(h.shape[1])
        shards = tuple(
            self.store.write_activations(step, timesteps[step], seeds, h[:, step], self.worker, block.index)
            for step in stored
        )
        samples = self.store.write_samples(
            seeds, [_png(im) for im in traj.to_pil()], self.worker, block.index, _conditions(traj)
        )
        extra = {
            "worker": self.worker,
            "seconds": time.perf_counter() - t0,
            "sample_seconds": sampled - t0,
            "started_unix": started_unix,
            "worker_init_seconds": self.init_seconds,
            "model_fingerprint": self.model.fingerprint,
            "timesteps": timesteps,
            "h_shape": list(self.model.h_shape),
            "capture": self.model.capture.spec,
            "description": self.model.describe(),
        }
        return BlockRecord(block.key, block.start, block.stop, shards, samples, extra)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        records = []
        for index, start, stop in zip(batch["index"], batch["start"], batch["stop"], strict=True):
            block = SeedBlock(int(index), int(start), int(stop))
            try:
                rec = self.generate_block(block)
            except Exception as e:  # the build's error line names the block
                e.add_note(f"seed block {block.key}, seeds {block.start}..{block.stop - 1}")
                raise
            records.append(json.dumps(rec.to_dict()))
        return {"record": records, "worker": [self.worker] * len(records)}


def _conditions(traj: Any) -> dict[str, list[Any]]:
    """The samples shard's conditioning columns of a trajectory (none for an unconditional model)."""
    out: dict[str, list[Any]] = {}
    n = len(traj)
    if traj.prompts is not None:
        out["prompt"] = list(traj.prompts)
        out["negative_prompt"] = list(traj.negative_prompts) if traj.negative_prompts else [None] * n
    if traj.class_labels is not None:
        out["class_label"] = [int(c) for c in traj.class_labels]
    if out:
        out["guidance_scale"] = [float(traj.guidance_scale)] * n
    return out


_MODEL_FACTS = ("model_fingerprint", "timesteps", "h_shape", "capture", "description")


def _record_model_facts(store: RunStore, rec: BlockRecord) -> None:
    """Every block of a run must come from the same weights, timesteps and capture point; the first
    block sets them (facts a run made before a fact existed lacks are not compared).

    They are kept in the manifest under ``stages.generate.model`` for the later stages.
    """
    facts = {k: rec.extra[k] for k in _MODEL_FACTS if k in rec.extra}
    known = store.stage("generate")
    if known is None or "model" not in known:
        store.update_manifest(lambda m: m["stages"].setdefault("generate", {}).__setitem__("model", facts))
        return
    diff = [k for k in facts if k in known["model"] and known["model"][k] != facts[k]]
    if diff:
        raise ValueError(
            f"block {rec.key} was generated with a different {', '.join(diff)} than the rest of run {store.url} "
            f"({[known['model'].get(k) for k in diff]} vs {[facts[k] for k in diff]}); the model changed"
        )


def generate(
    cfg: BuildConfig,
    store: RunStore | None = None,
    *,
    progress: bool = True,
    max_blocks: int | None = None,
) -> GenerateReport:
    """Generate every seed block the run manifest does not list yet; returns the report.

    ``max_blocks`` stops after that many new blocks (a partial run, e.g. to grow a run in steps
    or to test resumption).
    """
    store = store or RunStore(cfg.storage.run_url, cfg.storage.storage_options)
    store.ensure_identity(run_identity(cfg))
    t0 = time.perf_counter()
    blocks = seed_blocks(cfg)
    done = store.blocks()
    todo = [b for b in blocks if b.key not in done]
    if max_blocks is not None:
        todo = todo[:max_blocks]
    generated: list[BlockRecord] = []
    if todo:
        generated = _run_blocks(cfg, store, todo, progress)
        _remove_unlisted_shards(store, todo)
    seconds = time.perf_counter() - t0
    facts = (store.stage("generate") or {}).get("model") or {}
    timesteps = facts.get("timesteps")
    report = GenerateReport(
        blocks_total=len(blocks),
        blocks_skipped=len(blocks) - len([b for b in blocks if b.key not in done]),
        blocks_generated=len(generated),
        samples=sum(r.n_seeds for r in generated),
        rows=sum(s.rows for r in generated for s in r.activations),
        bytes=sum(r.bytes for r in generated),
        seconds=seconds,
        model_fingerprint=facts.get("model_fingerprint"),
        timesteps=tuple(int(t) for t in timesteps) if timesteps is not None else None,
        model_description=facts.get("description"),
    )

    def record(m: dict[str, Any]) -> None:
        stage = m["stages"].setdefault("generate", {})
        stage["last_report"] = report.to_dict()
        listed = [b for b in blocks if b.key in m["blocks"]]
        stage["complete"] = len(listed) == len(blocks)

    store.update_manifest(record)
    if progress:
        print(report.summary(), flush=True)
    return report


def _remove_unlisted_shards(store: RunStore, blocks: list[SeedBlock], attempts: int = 3) -> None:
    """Delete shard files of ``blocks`` that the manifest does not list.

    A block whose worker died (node lost, driver killed) is done again by another worker under
    another file name; the first attempt's files are never read, and removing them keeps one file
    per listed shard. Best effort: a storage error here is logged, not fatal.
    """
    listed = store.blocks()
    for block in blocks:
        rec = listed.get(block.key)
        if rec is None:
            continue
        keep = {store.abspath(s.path) for s in (*rec.activations, rec.samples)}
        suffix = f"part-*-{block.index:06d}.parquet"
        for attempt in range(attempts):
            try:
                found = store.fs.glob(store.abspath(f"activations/t=*/{suffix}"))
                found += store.fs.glob(store.abspath(f"samples/{suffix}"))
                for path in sorted({p.rstrip("/") for p in found} - keep):
                    store.fs.rm(path)
                break
            except OSError as e:
                if attempt == attempts - 1:
                    print(f"warning: could not remove stale shards of block {block.key}: {e}", flush=True)


def _run_blocks(
    cfg: BuildConfig, store: RunStore, todo: list[SeedBlock], progress: bool
) -> list[BlockRecord]:
    import ray

    init_ray(cfg)
    info = describe_model(cfg.model)
    res = cfg.resources
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress  # on a non-terminal Ray Data logs its progress instead of drawing it
    ds = ray.data.from_items(
        [{"index": b.index, "start": b.start, "stop": b.stop} for b in todo], override_num_blocks=len(todo)
    )
    out = ds.map_batches(
        BlockGenerator,
        fn_constructor_kwargs={
            "run_url": cfg.storage.run_url,
            "storage_options": cfg.storage.storage_options,
            "model_location": info.location,
            "revision": cfg.model.revision,
            "device": res.device,
            "dtype": cfg.dtype,
            "sampler": cfg.sampler.kind,
            "num_inference_steps": cfg.sampler.num_inference_steps,
            "eta": cfg.sampler.eta,
            "batch_size": cfg.generate.batch_size,
            "capture": cfg.model.capture,
            "conditioning": cfg.model.model_dump(mode="json"),
            "capture_steps": cfg.capture_steps
            if len(cfg.capture_steps) < cfg.sampler.num_inference_steps
            else None,
        },
        batch_size=1,
        # No idle actors loading a model for nothing; one block in flight per actor so the
        # last blocks are not queued behind a busy actor while another one idles.
        compute=ray.data.ActorPoolStrategy(size=min(res.workers, len(todo)), max_tasks_in_flight_per_actor=1),
        num_gpus=res.num_gpus_per_worker or None,
        num_cpus=res.num_cpus_per_worker,
    )
    records: list[BlockRecord] = []
    watch = CapacityWatch("generate", actor_demand(res.num_cpus_per_worker, res.num_gpus_per_worker))
    bar = progress_bar(total=len(todo), desc="seed blocks", unit="block", progress=progress)
    try:
        for row in iterate_watched(out, out.iter_rows(), watch):
            rec = BlockRecord.from_dict(json.loads(row["record"]))
            _record_model_facts(store, rec)
            store.add_blocks([rec])  # listed as soon as it is done: an interruption keeps it
            records.append(rec)
            bar.update(1)
            bar.set_postfix(samples=sum(r.n_seeds for r in records))
    finally:
        bar.close()
    return records
