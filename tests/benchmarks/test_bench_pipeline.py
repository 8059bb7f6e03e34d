"""The Ray pipeline against bare work: generate-stage throughput, and PCA actor memory.

Generate: ``pipeline.generate.generate`` on a local Ray cluster with ``WORKERS`` workers (one CPU
each, or one GPU) against the bare sampler doing the same work in as many plain processes started
together (``_bare_sampler.py``: ``HSpaceSampler.sample`` of the same seed blocks at the same batch
size, h recorded as float16, nothing written, model load excluded). Two ratios, throughput over the
baseline's (aims: >= 0.8 and >= 0.95):

* end to end: the bare processes' sampling seconds against the whole ``generate`` call (Ray Data
  and actor start, imports, model load, sampling, parquet shards and PNGs, manifest updates);
* inside the actor: the median bare block against the median block in an actor (sampling and
  writing).

Rounds alternate a Ray run and a bare run, so a change in the machine's load hits both; the
ratios are medians over rounds. A profile table splits the Ray run's wall time: start-up until
the first block (worker imports and model load vs Ray's own start), sampling, writing, gaps between
blocks, and the tail after the last block.

PCA memory: one ``PCAGroupWorker`` actor (the PCA stage's) fits synthetic h shards of a run with
N and 4N samples; its peak RSS above the RSS at the start of ``run`` (VmHWM after resetting it)
should not grow with N, because it streams one batch at a time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _bench import ON_GPU, median, script_env, table, toy_model_or_random, write_results

pytest.importorskip("ray", reason="the pipeline benchmark needs Ray (pip install 'hspace[pipeline]')")
generate_mod = pytest.importorskip("pipeline.generate", reason="pipeline.generate is not there yet")
from pipeline.config import validate_config  # noqa: E402
from pipeline.plan import SeedBlock  # noqa: E402
from pipeline.storage import BlockRecord, RunStore  # noqa: E402
from tests.ray_cluster import ray_local  # noqa: E402,F401  (session fixture)

N_SAMPLES, STEPS, BATCH, PER_BLOCK = (2048, 50, 64, 128) if ON_GPU else (1024, 10, 64, 128)
WORKERS = max(1, torch.cuda.device_count()) if ON_GPU else 2  # the local test cluster has 2 CPUs
ROUNDS = int(os.environ.get("HSPACE_BENCH_GEN_ROUNDS", "2"))
PCA_N, PCA_STEPS, PCA_BATCH, PCA_K, PCA_BLOCK = (2048, 4, 256, 32, 512) if ON_GPU else (512, 2, 64, 8, 128)
BARE_SCRIPT = Path(__file__).resolve().parent / "_bare_sampler.py"


def _model_source(tmp_path) -> tuple[str, str]:
    """``toy`` when its weights are installed, else the toy architecture (random) saved to tmp_path."""
    model, which = toy_model_or_random()
    if which.startswith("toy (trained)"):
        return "toy", which
    from diffusers import DDPMPipeline

    path = tmp_path / "bench-model"
    DDPMPipeline(unet=model.unet.cpu(), scheduler=model.make_scheduler("ddpm")).save_pretrained(path)
    return str(path), which


def _config(source: str, run_url: str, **overrides) -> object:
    data = {
        "name": "bench",
        "model": {"source": source},
        "sampler": {"kind": "ddpm", "num_inference_steps": STEPS},
        "generate": {"n_samples": N_SAMPLES, "batch_size": BATCH, "seeds_per_block": PER_BLOCK},
        "resources": {
            "workers": WORKERS,
            "num_cpus_per_worker": 1,
            "num_gpus_per_worker": 1 if ON_GPU else 0,
        },
        "storage": {"run_url": run_url},
        "catalog": {"url": "memory://bench-unused", "model_name": "bench"},
        "pca": {"n_components": 2},
    }
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    return validate_config(data)


def _bare_run(location: str, blocks: list[tuple[int, int]]) -> list[list[float]]:
    """Block seconds of WORKERS bare sampler processes (blocks dealt round-robin), started together."""
    env = script_env()
    env["OMP_NUM_THREADS"] = "1"  # as Ray sets it for a worker with one CPU
    device = "cuda:{}" if ON_GPU else "cpu"
    procs = []
    for w in range(WORKERS):
        spec = {
            "model": location,
            "device": device.format(w),
            "steps": STEPS,
            "batch": BATCH,
            "threads": 1,
            "blocks": blocks[w::WORKERS],
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(BARE_SCRIPT), json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=env,
            )
        )
    for p in procs:  # every process has loaded its model and warmed up
        line = p.stdout.readline()
        assert line.strip() == "READY", f"bare sampler did not start: {line!r}"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=3600)
        assert p.returncode == 0
        line = next(x for x in stdout.splitlines() if x.startswith("RESULT_JSON "))
        out.append(json.loads(line.removeprefix("RESULT_JSON "))["block_seconds"])
    return out


def _profile(wall: float, t_call: float, records: list[BlockRecord]) -> dict[str, float]:
    """Where a Ray run's wall time went, per worker averaged: start-up, sampling, writing, gaps, tail."""
    by_worker: dict[str, list[dict]] = {}
    for rec in records:
        by_worker.setdefault(rec.extra["worker"], []).append(rec.extra)
    parts = {"start-up: Ray Data and actor start": [], "start-up: worker imports + model load": []}
    parts.update({"sampling": [], "writing shards and PNGs": [], "gaps between blocks": [], "tail": []})
    for blocks in by_worker.values():
        blocks.sort(key=lambda e: e["started_unix"])
        first = blocks[0]["started_unix"] - t_call
        init = blocks[0]["worker_init_seconds"]
        parts["start-up: worker imports + model load"].append(init)
        parts["start-up: Ray Data and actor start"].append(first - init)
        parts["sampling"].append(sum(e["sample_seconds"] for e in blocks))
        parts["writing shards and PNGs"].append(sum(e["seconds"] - e["sample_seconds"] for e in blocks))
        ends = [e["started_unix"] + e["seconds"] for e in blocks]
        parts["gaps between blocks"].append(
            sum(b["started_unix"] - a for b, a in zip(blocks[1:], ends[:-1], strict=True))
        )
        parts["tail"].append(t_call + wall - ends[-1])
    return {name: float(np.mean(v)) for name, v in parts.items()}


def test_generate_stage_vs_bare_sampler(ray_local, tmp_path):  # noqa: F811
    source, which = _model_source(tmp_path)
    from hspace.toy import TOY_MODEL_DIR

    location = str(TOY_MODEL_DIR) if source == "toy" else source
    blocks = [(s, min(s + PER_BLOCK, N_SAMPLES)) for s in range(0, N_SAMPLES, PER_BLOCK)]
    rounds = []
    for r in range(ROUNDS):  # alternating: a Ray run, then the bare processes
        url = str(tmp_path / f"run-{r}")
        t_call = time.time()
        report = generate_mod.generate(_config(source, url), progress=False)
        assert report.samples == N_SAMPLES
        records = list(RunStore(url).blocks().values())
        bare = _bare_run(location, blocks)
        rounds.append(
            {
                "ray_wall_s": report.seconds,
                "ray_block_s": [float(rec.extra["seconds"]) for rec in records],
                "ray_profile_s": _profile(report.seconds, t_call, records),
                "bare_block_s": bare,
                "bare_wall_s": max(sum(x) for x in bare),
            }
        )
    end_to_end = median([x["bare_wall_s"] / x["ray_wall_s"] for x in rounds])
    in_actor = median(
        [median([b for w in x["bare_block_s"] for b in w]) / median(x["ray_block_s"]) for x in rounds]
    )
    rows = []
    for i, x in enumerate(rounds):
        bare_block, ray_block = median([b for w in x["bare_block_s"] for b in w]), median(x["ray_block_s"])
        rows.append([i, "bare sampler, all samples", x["bare_wall_s"], N_SAMPLES / x["bare_wall_s"], 1.0])
        rows.append(
            [
                i,
                "Ray generate, end to end",
                x["ray_wall_s"],
                N_SAMPLES / x["ray_wall_s"],
                x["bare_wall_s"] / x["ray_wall_s"],
            ]
        )
        rows.append([i, "bare sampler, median block", bare_block, PER_BLOCK / bare_block, 1.0])
        rows.append(
            [
                i,
                "Ray generate, median block in an actor",
                ray_block,
                PER_BLOCK / ray_block,
                bare_block / ray_block,
            ]
        )
    device = f"{WORKERS} GPU(s)" if ON_GPU else f"{WORKERS} CPUs, 1 thread each"
    text = table(
        f"generate: {N_SAMPLES} samples x {STEPS} DDPM steps, batch {BATCH}, {len(blocks)} blocks of {PER_BLOCK}, "
        f"{which}, {WORKERS} Ray workers vs {WORKERS} bare processes ({device}); ratio = throughput / bare "
        f"(aims >= 0.8 end to end, >= 0.95 in the actor); medians over {ROUNDS} rounds: end to end "
        f"{end_to_end:.3f}, in the actor {in_actor:.3f}",
        ["round", "path", "seconds", "samples/s", "ratio"],
        rows,
    )
    profile_names = list(rounds[0]["ray_profile_s"])
    wall = median([x["ray_wall_s"] for x in rounds])
    profile_rows = []
    for name in profile_names:
        seconds = median([x["ray_profile_s"][name] for x in rounds])
        profile_rows.append([name, seconds, seconds / wall])
    text += "\n" + table(
        f"where a Ray run's wall time goes (per worker, median over rounds; wall {wall:.1f} s)",
        ["part", "seconds", "share of wall"],
        profile_rows,
    )
    write_results(
        "pipeline_generate",
        {
            "figure": "samples/s of the Ray generate stage, end to end and per block in an actor",
            "baseline": f"the bare sampler in {WORKERS} plain processes",
            "ratio": {"end_to_end": end_to_end, "in_actor": in_actor},
            "configuration": {
                "n_samples": N_SAMPLES,
                "steps": STEPS,
                "batch": BATCH,
                "seeds_per_block": PER_BLOCK,
                "workers": WORKERS,
                "model": which,
                "rounds": ROUNDS,
            },
            "rounds": rounds,
            "table": text,
        },
    )
    assert end_to_end > 0 and in_actor > 0


# ------------------------------------------------------------------------------ PCA actor memory
def _synthetic_run(url: str, n: int, h_shape: tuple[int, int, int]) -> RunStore:
    """A run with ``n`` seeds of random float16 h at PCA_STEPS steps, in blocks of PCA_BLOCK."""
    store = RunStore(url)
    rng = np.random.default_rng(0)
    records = []
    for index, start in enumerate(range(0, n, PCA_BLOCK)):
        block = SeedBlock(index, start, min(start + PCA_BLOCK, n))
        seeds = list(block.seeds)
        shards = tuple(
            store.write_activations(
                step,
                999 - step,
                seeds,
                rng.standard_normal((len(seeds), *h_shape)).astype(np.float16),
                "synthetic",
                index,
            )
            for step in range(PCA_STEPS)
        )
        samples = store.write_samples(seeds, [b""] * len(seeds), "synthetic", index)
        records.append(BlockRecord(block.key, block.start, block.stop, shards, samples, {}))
    store.add_blocks(records)
    return store


def test_pca_actor_peak_rss_is_flat_in_the_sample_count(ray_local, tmp_path):  # noqa: F811
    pca_stage = pytest.importorskip("pipeline.pca_stage", reason="pipeline.pca_stage is not there yet")
    for name in ("remote_worker", "worker_kwargs", "step_groups"):
        if not hasattr(pca_stage, name):
            pytest.skip(f"pipeline.pca_stage has no {name}() (API changed): cannot start its actor here")
    ray = ray_local
    h_shape = (256, 8, 8) if ON_GPU else (64, 8, 8)

    def reset_hwm(_actor) -> int:  # runs inside the actor process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        with open("/proc/self/status") as f:
            return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024

    def read_hwm(_actor) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024

    measured = {}
    for n in (PCA_N, 4 * PCA_N):
        url = str(tmp_path / f"pca-run-{n}")
        store = _synthetic_run(url, n, h_shape)
        cfg = validate_config(
            {
                "name": "bench-pca",
                "model": {"source": "toy"},
                "sampler": {"kind": "ddpm", "num_inference_steps": PCA_STEPS},
                "generate": {"n_samples": n, "batch_size": PCA_BLOCK, "seeds_per_block": PCA_BLOCK},
                "storage": {"run_url": url},
                "catalog": {"url": "memory://bench-unused", "model_name": "bench"},
                "pca": {
                    "n_components": PCA_K,
                    "batch_size": PCA_BATCH,
                    "checkpoint_every": 4,
                    "steps_per_actor": PCA_STEPS,
                },
            },
            check_model=False,
        )
        group = pca_stage.step_groups(cfg.pca_steps, cfg.pca.steps_per_actor)[0]
        actor = pca_stage.remote_worker(cfg).remote(
            **pca_stage.worker_kwargs(cfg, store, group, list(store.blocks()))
        )
        try:
            base = ray.get(actor.__ray_call__.remote(reset_hwm))
            t0 = time.perf_counter()
            status = ray.get(actor.run.remote())
            seconds = time.perf_counter() - t0
            peak = ray.get(actor.__ray_call__.remote(read_hwm))
        finally:
            ray.kill(actor, no_restart=True)
        assert min(status["n_samples_seen"].values()) == n
        measured[n] = {
            "rss_at_start": base,
            "peak_rss": peak,
            "growth": peak - base,
            "seconds": seconds,
            "batches": status["batches_run"],
        }
    small, large = measured[PCA_N], measured[4 * PCA_N]
    shard_bytes = PCA_BLOCK * int(np.prod(h_shape)) * 2
    text = table(
        f"PCA actor memory: {PCA_STEPS} steps, h {h_shape}, k = {PCA_K}, batches of {PCA_BATCH}, shards of "
        f"{PCA_BLOCK} seeds ({shard_bytes / 2**20:.1f} MiB of float16 h); peak RSS above RSS at the start of run()",
        ["samples", "batches", "seconds", "RSS at start MiB", "peak growth MiB", "growth ratio"],
        [
            [
                n,
                m["batches"],
                m["seconds"],
                m["rss_at_start"] / 2**20,
                m["growth"] / 2**20,
                m["growth"] / max(small["growth"], 1),
            ]
            for n, m in measured.items()
        ],
    )
    write_results(
        "pipeline_pca_memory",
        {
            "figure": "peak RSS growth of a PCA actor over its run",
            "baseline": f"{PCA_N} samples",
            "ratio": large["growth"] / max(small["growth"], 1),
            "configuration": {
                "steps": PCA_STEPS,
                "h_shape": h_shape,
                "k": PCA_K,
                "batch": PCA_BATCH,
                "block": PCA_BLOCK,
            },
            "measured": measured,
            "table": text,
        },
    )
    # streaming: 4x the samples may not need 4x the memory; allow 1.5x + 32 MiB for allocator noise
    assert large["growth"] <= 1.5 * small["growth"] + 32 * 2**20
