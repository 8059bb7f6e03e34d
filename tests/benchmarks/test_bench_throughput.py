"""Sampler throughput against batch size, and the bytes one (seed, step) of h costs in storage.

Throughput: ``HSpaceSampler.sample`` recording h in float16 (what the generate stage does) at
several batch sizes, interleaved; images/s and the speed-up over batch 1.

Storage: h of a block of seeds written per step with ``RunStore.write_activations`` (parquet,
zstd, one binary value per row and row group, float16) against raw float16 (C*H*W*2 bytes) and
against run format 1's list layout (zstd + byte-stream-split), per (seed, step) row.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from _bench import (
    ON_GPU,
    bench_model,
    compare,
    configure_threads,
    median,
    ratio,
    table,
    toy_model_or_random,
    write_results,
)
from _list_layout import list_parquet, list_table

from hspace.sampling import HSpaceSampler

BATCHES = [1, 8, 32, 128] if ON_GPU else [1, 4, 16, 64, 256]  # CPU: where cache stops helping
THROUGHPUT_STEPS = 20 if ON_GPU else 3
REPEATS = 5 if ON_GPU else 3
STORE_SEEDS = 64 if ON_GPU else 32  # one block: rows per shard
STORE_STEPS = 50 if ON_GPU else 10


def test_sampler_throughput_vs_batch_size():
    threads = configure_threads()
    model = bench_model()
    sampler = HSpaceSampler(model, sampler="ddpm", num_inference_steps=THROUGHPUT_STEPS)
    variants = {
        f"batch {b}": (lambda b=b: sampler.sample(list(range(b)), record_h=True, h_dtype=torch.float16))
        for b in BATCHES
    }
    times = compare(variants, repeats=REPEATS)
    per_image = {f"batch {b}": [t / b for t in times[f"batch {b}"]] for b in BATCHES}
    rows = []
    for b in BATCHES:
        name = f"batch {b}"
        rows.append([b, median(times[name]), b / median(times[name]), 1 / ratio(per_image, name, "batch 1")])
    text = table(
        f"sampler throughput: DDPM {THROUGHPUT_STEPS} steps recording h (float16), h {model.h_shape}, "
        f"{model.device}, {threads} thread(s); speed-up = images/s over batch 1 (median of {REPEATS} rounds)",
        ["batch", "seconds", "images/s", "speed-up"],
        rows,
    )
    write_results(
        "throughput",
        {
            "figure": "images/s of the sampler recording h, by batch size",
            "baseline": "batch 1",
            "ratio": {b: 1 / ratio(per_image, f"batch {b}", "batch 1") for b in BATCHES},
            "configuration": {
                "batches": BATCHES,
                "steps": THROUGHPUT_STEPS,
                "repeats": REPEATS,
                "h_shape": model.h_shape,
            },
            "seconds": times,
            "images_per_s": {b: b / median(times[f"batch {b}"]) for b in BATCHES},
            "table": text,
        },
    )
    assert all(r[2] > 0 for r in rows)


def test_h_storage_bytes_per_seed_step(tmp_path):
    configure_threads()
    from pipeline.storage import RunStore

    model, which = toy_model_or_random()
    sampler = HSpaceSampler(model, sampler="ddpm", num_inference_steps=STORE_STEPS)
    seeds = list(range(STORE_SEEDS))
    traj = sampler.sample(seeds, record_h=True, h_dtype=torch.float16)
    h = traj.h.numpy()  # [N, T, C, H, W] float16
    store = RunStore(str(tmp_path / "run"))
    shards = [
        store.write_activations(step, int(traj.timesteps[step]), seeds, h[:, step], "bench", 0)
        for step in range(STORE_STEPS)
    ]
    rows = sum(s.rows for s in shards)
    assert rows == STORE_SEEDS * STORE_STEPS
    raw = math.prod(model.h_shape) * 2
    stored = sum(s.bytes for s in shards) / rows
    list_layout = (
        sum(
            len(list_parquet(list_table(np.asarray(seeds), step, int(traj.timesteps[step]), h[:, step])))
            for step in range(STORE_STEPS)
        )
        / rows
    )
    per_step = [s.bytes / s.rows for s in shards]
    text = table(
        f"h storage per (seed, step): {which}, h {model.h_shape}, {STORE_SEEDS} seeds per shard, "
        f"{STORE_STEPS} DDPM steps (one shard per step)",
        ["format", "bytes / row", "vs raw float16"],
        [
            ["raw float16", float(raw), 1.0],
            ["parquet zstd, one binary value per row (RunStore)", stored, stored / raw],
            ["format 1 list layout, zstd + byte-stream-split", list_layout, list_layout / raw],
            ["  RunStore, noisiest step", per_step[0], per_step[0] / raw],
            ["  RunStore, last step", per_step[-1], per_step[-1] / raw],
        ],
    )
    write_results(
        "storage",
        {
            "figure": "stored bytes per activation row",
            "baseline": "raw float16",
            "ratio": {"runstore": stored / raw, "format_1_list_layout": list_layout / raw},
            "configuration": {
                "model": which,
                "seeds_per_shard": STORE_SEEDS,
                "steps": STORE_STEPS,
                "h_shape": model.h_shape,
            },
            "bytes_per_row": {
                "raw_float16": raw,
                "runstore": stored,
                "format_1_list_layout": list_layout,
            },
            "runstore_bytes_per_row_by_step": per_step,
            "table": text,
        },
    )
    # the row's metadata columns and the parquet footer are small next to h: within 10% of raw
    # even for incompressible data (zstd does not expand float16 noise by more than that)
    assert stored < 1.1 * raw
    assert np.isfinite(h.astype(np.float32)).all()
