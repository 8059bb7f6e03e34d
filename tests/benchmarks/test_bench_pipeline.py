"""The Ray pipeline against in-process work: generate-stage throughput, and PCA actor memory.

Generate: ``pipeline.generate.generate`` on a local Ray cluster with one worker (one CPU, or one
GPU) against ``HSpaceSampler.sample`` in this process at the same batch size, recording h in
float16, block by block. Two pipeline numbers: end to end (the call's wall time: actor start and
model load included, which a short run cannot amortise) and steady state (the median block's
seconds inside the actor: sampling plus writing the parquet shards and PNGs, against the median
block sampled here). Ratio = pipeline throughput / in-process throughput (the project aims at
>= 0.8).

PCA memory: one ``PCAGroupWorker`` actor (the PCA stage's) fits synthetic h shards of a run with
N and 4N samples; its peak RSS above the RSS at the start of ``run`` (VmHWM after resetting it)
should not grow with N, because it streams one batch at a time.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
from _bench import DEVICE, ON_GPU, configure_threads, median, table, toy_model_or_random, write_results

pytest.importorskip("ray", reason="the pipeline benchmark needs Ray (pip install 'hspace[pipeline]')")
generate_mod = pytest.importorskip("pipeline.generate", reason="pipeline.generate is not there yet")
from pipeline.config import validate_config  # noqa: E402
from pipeline.plan import SeedBlock  # noqa: E402
from pipeline.storage import BlockRecord, RunStore  # noqa: E402
from tests.ray_cluster import ray_local  # noqa: E402,F401  (session fixture)

N_SAMPLES, STEPS, BATCH, PER_BLOCK = (512, 50, 64, 128) if ON_GPU else (32, 5, 8, 8)
PIPELINE_RUNS = (
    3 if ON_GPU else 1
)  # on the CPU one run: starting the actor (importing torch) takes minutes under load
LOCAL_REPEATS = 3
PCA_N, PCA_STEPS, PCA_BATCH, PCA_K, PCA_BLOCK = (2048, 4, 256, 32, 512) if ON_GPU else (512, 2, 64, 8, 128)


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
        "resources": {"workers": 1, "num_cpus_per_worker": 1, "num_gpus_per_worker": 1 if ON_GPU else 0},
        "storage": {"run_url": run_url},
        "catalog": {"url": "memory://bench-unused", "model_name": "bench"},
        "pca": {"n_components": 2},
    }
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    return validate_config(data)


def test_generate_stage_vs_in_process_sampler(ray_local, tmp_path):  # noqa: F811
    threads = configure_threads()  # the Ray worker reserves one CPU: the in-process baseline uses one thread
    from hspace.model import HSpaceModel
    from hspace.sampling import HSpaceSampler
    from hspace.toy import TOY_MODEL_DIR

    source, which = _model_source(tmp_path)
    location = str(TOY_MODEL_DIR) if source == "toy" else source
    model = HSpaceModel.from_pretrained(location, device=DEVICE)
    sampler = HSpaceSampler(model, sampler="ddpm", num_inference_steps=STEPS)
    blocks = [list(range(s, min(s + PER_BLOCK, N_SAMPLES))) for s in range(0, N_SAMPLES, PER_BLOCK)]

    def in_process() -> list[float]:
        """Seconds per block, sampled here exactly as the actor samples a block."""
        out = []
        for seeds in blocks:
            t0 = time.perf_counter()
            sampler.sample(seeds, record_h=True, h_dtype=torch.float16, batch_size=BATCH)
            if ON_GPU:
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return out

    in_process()  # warm-up
    local_blocks: list[float] = []
    runs = []
    for r in range(max(PIPELINE_RUNS, LOCAL_REPEATS)):  # interleaved: a pipeline run, an in-process pass
        if r < PIPELINE_RUNS:
            url = str(tmp_path / f"run-{r}")
            report = generate_mod.generate(_config(source, url), progress=False)
            assert report.samples == N_SAMPLES
            actor_blocks = [float(rec.extra["seconds"]) for rec in RunStore(url).blocks().values()]
            runs.append({"pipeline_wall_s": report.seconds, "actor_block_s": actor_blocks})
        if r < LOCAL_REPEATS:
            local_blocks += in_process()
    n_blocks = len(blocks)
    local = median(local_blocks) * n_blocks
    wall = median([x["pipeline_wall_s"] for x in runs])
    steady = median([b for x in runs for b in x["actor_block_s"]]) * n_blocks
    rows = [
        ["in-process HSpaceSampler (baseline)", local, N_SAMPLES / local, 1.0],
        ["Ray generate stage, end to end", wall, N_SAMPLES / wall, local / wall],
        ["Ray generate stage, blocks in the actor", steady, N_SAMPLES / steady, local / steady],
    ]
    text = table(
        f"generate: {N_SAMPLES} samples x {STEPS} DDPM steps, batch {BATCH}, {n_blocks} blocks of {PER_BLOCK}, "
        f"{which}, 1 Ray worker ({'1 GPU' if ON_GPU else '1 CPU'}) vs this process ({threads} thread(s)); seconds "
        f"for all samples from median block times ({PIPELINE_RUNS} pipeline run(s), {LOCAL_REPEATS} in-process "
        f"passes); ratio = throughput / baseline (target >= 0.8)",
        ["path", "seconds", "samples/s", "ratio"],
        rows,
    )
    write_results(
        "pipeline_generate",
        {
            "params": {
                "n_samples": N_SAMPLES,
                "steps": STEPS,
                "batch": BATCH,
                "seeds_per_block": PER_BLOCK,
                "model": which,
                "pipeline_runs": PIPELINE_RUNS,
                "in_process_repeats": LOCAL_REPEATS,
            },
            "runs": runs,
            "in_process_block_s": local_blocks,
            "ratio_end_to_end": local / wall,
            "ratio_steady_state": local / steady,
            "table": text,
        },
    )
    assert steady > 0 and local > 0


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
            "params": {
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
