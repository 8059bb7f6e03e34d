"""The data path at CelebA-HQ-256's h size on the CPU: shard writes and reads, the PCA stage, the
supervised aggregation's read-back.

One synthetic run (``_synthetic_run.py``: 2,048 samples x 10 steps of 512 x 8 x 8 float16 by
default, ``HSPACE_BENCH_QUICK=1`` for 512 x 4) is written through ``RunStore`` exactly as the
generate stage writes it, each shard alternating with an ``np.save`` of the same array. Then:

- write / read throughput against ``np.save`` / ``np.load`` of the same bytes, and which part of
  a shard write / read costs what (Arrow conversion, parquet encoding of the run format's
  one-binary-value-per-row layout and of format 1's list layout per compression setting, sha256,
  file I/O, a verified partial read), timed as interleaved variants on one shard;
- the PCA stage's group worker (the Ray actor's class, run in-process with its real checkpoints)
  against scikit-learn's ``IncrementalPCA`` on the same batches read the same way, same thread
  count; |cos| of the top 16 components; the worker's peak RSS at N and 4N samples (fresh process);
- the supervised aggregation's read-back (``RunStore.read_h`` + mean difference of the top/bottom
  10 % seeds): bytes read (counted at the fsspec filesystem) against the bytes of the rows it
  needs, and time against a numpy mean over the same rows read from ``.npy`` memory maps.

Files are in the page cache after writing, so read numbers measure the CPU side of a read
(decompression, checksums, conversion), not a disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _bench import alternate, compare, configure_threads, median, ratio, run_script, table, write_results
from _list_layout import list_decode, list_parquet, list_table
from _synthetic_run import block_h, npy_path, planted_basis, spec_from_env, stage_worker, write_synthetic_run
from threadpoolctl import threadpool_limits

from pipeline.run_format import activation_table, h_rows, parquet_bytes
from pipeline.storage import BlockRecord, RunStore
from tests.counting_fs import CountingFS

SPEC = spec_from_env()
K = 16
PCA_STEPS = int(os.environ.get("HSPACE_BENCH_PCA_STEPS", "2"))
PCA_BATCH = 256


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The synthetic run, its .npy twin, and the per-shard write times of both."""
    root = tmp_path_factory.mktemp("datapath")
    npy_dir = root / "npy"
    npy_dir.mkdir()
    store = RunStore(str(root / "run"))
    timings: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    summary = write_synthetic_run(store, SPEC, npy_dir=str(npy_dir), timings=timings)
    print(f"\nsynthetic run: {summary} in {time.perf_counter() - t0:.1f} s", flush=True)
    return store, str(npy_dir), timings, summary


def _mb_s(n_bytes: float, seconds: float) -> float:
    return n_bytes / seconds / 1e6


def _decode(data: bytes) -> np.ndarray:
    """h [N, C, H, W] float16 of a run-format-2 shard's bytes (no checks: the decode alone)."""
    pf = pq.ParquetFile(pa.BufferReader(data))
    shape = json.loads(pf.metadata.metadata[b"hspace"])["h_shape"]
    return h_rows(pf.read(columns=["seed", "h"]).column("h"), shape)


# ---------------------------------------------------------------------------------------------
def test_shard_write_read_throughput(run):
    threads = configure_threads()
    store, npy_dir, timings, summary = run
    raw = SPEC.raw_bytes
    write_rs, write_np = sum(timings["runstore"]), sum(timings["npy"])

    # full read: every step through the stage's reader vs np.load of every .npy, alternating per step
    read_t: dict[str, list[float]] = {"runstore": [], "npy": []}
    n_blocks = len(store.blocks())

    def read_rs(step: int) -> None:
        for batch in store.iter_step_batches(step, PCA_BATCH):
            batch.h.sum(dtype=np.float32)  # touch it, as a consumer does

    def read_np(step: int) -> None:
        for i in range(n_blocks):
            np.load(npy_path(npy_dir, step, i)).sum(dtype=np.float32)

    for step in range(SPEC.n_steps):
        alternate(
            {"runstore": partial(read_rs, step), "npy": partial(read_np, step)},
            read_t,
            reverse=bool(step % 2),
        )
    read_rs_s, read_np_s = sum(read_t["runstore"]), sum(read_t["npy"])
    text_a = table(
        f"Shards at real h size: {SPEC.n_samples} samples x {SPEC.n_steps} steps x {SPEC.h_shape} float16 "
        f"({raw / 1e9:.2f} GB raw, {summary['bytes'] / 1e9:.2f} GB stored, {summary['bytes'] / raw:.3f} of raw), "
        f"{SPEC.seeds_per_block} seeds per shard; {threads} torch thread(s); page-cached local files",
        ["operation", "seconds", "MB/s (raw)", "ratio to numpy"],
        [
            ["RunStore.write_activations (all shards)", write_rs, _mb_s(raw, write_rs), write_rs / write_np],
            ["np.save of the same arrays", write_np, _mb_s(raw, write_np), 1.0],
            [
                "RunStore.iter_step_batches (all steps)",
                read_rs_s,
                _mb_s(raw, read_rs_s),
                read_rs_s / read_np_s,
            ],
            ["np.load of the same arrays", read_np_s, _mb_s(raw, read_np_s), 1.0],
        ],
    )

    # what a shard write / read costs, part by part, on one shard
    h = block_h(SPEC, 0, 0, SPEC.seeds_per_block, planted_basis(SPEC, 0))
    seeds = np.arange(SPEC.seeds_per_block)
    tbl = activation_table(seeds, 0, 999, h)
    ltbl = list_table(seeds, 0, 999, h)
    shard_raw = h.nbytes
    default = "binary rows, zstd (run format 2)"
    encoded = {
        default: parquet_bytes(tbl),
        "binary rows, uncompressed": parquet_bytes(tbl, "none"),
        "format 1 list, zstd + byte_stream_split": list_parquet(ltbl),
        "format 1 list, zstd": list_parquet(ltbl, "zstd", False),
        "format 1 list, lz4 + byte_stream_split": list_parquet(ltbl, "lz4", True),
        "format 1 list, uncompressed": list_parquet(ltbl, None, False),
    }
    encoders = {
        default: lambda: parquet_bytes(tbl),
        "binary rows, uncompressed": lambda: parquet_bytes(tbl, "none"),
        "format 1 list, zstd + byte_stream_split": lambda: list_parquet(ltbl),
        "format 1 list, zstd": lambda: list_parquet(ltbl, "zstd", False),
        "format 1 list, lz4 + byte_stream_split": lambda: list_parquet(ltbl, "lz4", True),
        "format 1 list, uncompressed": lambda: list_parquet(ltbl, None, False),
    }
    tmp = Path(npy_dir) / "_part.bin"

    def write_file(data: bytes):
        with open(tmp, "wb") as f:
            f.write(data)

    npy_buf = io.BytesIO()
    np.save(npy_buf, h)
    npy_bytes = npy_buf.getvalue()
    shard = store.write_activations(0, 999, seeds, h, "bench", 0)
    rec = BlockRecord("bench", 0, len(seeds), (shard,), shard)
    two_rows = [[3, len(seeds) - 7]]
    parts = {
        "np.save to a file (baseline)": lambda: np.save(str(tmp) + ".npy", h),
        "activation_table (numpy -> Arrow, row sha256s)": lambda: activation_table(seeds, 0, 999, h),
        "format 1 list_table (numpy -> Arrow)": lambda: list_table(seeds, 0, 999, h),
        **{f"parquet encode: {name}": fn for name, fn in encoders.items()},
        "sha256 of the shard": lambda: hashlib.sha256(encoded[default]).digest(),
        "file write of the shard bytes": lambda: write_file(encoded[default]),
        "RunStore.write_activations (all of it)": lambda: store.write_activations(
            0, 999, seeds, h, "bench", 0
        ),
    }
    reads = {
        "np.load from bytes (baseline)": lambda: np.load(io.BytesIO(npy_bytes)),
        **{
            f"parquet decode: {name}": (lambda d=d, f=(list_decode if "list" in name else _decode): f(d))
            for name, d in encoded.items()
        },
        "sha256 of the shard": lambda: hashlib.sha256(encoded[default]).digest(),
        "RunStore.read_activations (whole shard, verified)": lambda: store.read_activations(rec, shard),
        "RunStore.read_rows (2 rows, footer + rows verified)": lambda: store.read_rows([shard], two_rows),
    }
    repeats = 5
    wt = compare(parts, repeats=repeats)
    rt = compare(reads, repeats=repeats)
    base_w, base_r = "np.save to a file (baseline)", "np.load from bytes (baseline)"
    size_of = {f"parquet encode: {n}": len(d) for n, d in encoded.items()} | {
        f"parquet decode: {n}": len(d) for n, d in encoded.items()
    }
    rows = [
        [
            "write: " + n,
            median(wt[n]),
            _mb_s(shard_raw, median(wt[n])),
            ratio(wt, n, base_w),
            size_of.get(n, ""),
        ]
        for n in parts
    ] + [
        [
            "read: " + n,
            median(rt[n]),
            _mb_s(shard_raw, median(rt[n])),
            ratio(rt, n, base_r),
            size_of.get(n, ""),
        ]
        for n in reads
    ]
    assert np.array_equal(store.read_rows([shard], two_rows)[0], h[two_rows[0]])
    assert all(np.array_equal(_decode(encoded[n]), h) for n in encoded if "list" not in n)
    text_b = table(
        f"One shard ({SPEC.seeds_per_block} x {SPEC.h_shape} float16 = {shard_raw / 1e6:.1f} MB), parts timed as "
        f"interleaved variants (median of {repeats} rounds); ratio = median per-round time / baseline",
        ["part", "seconds", "MB/s (raw)", "ratio to np.save/np.load", "bytes"],
        rows,
    )
    write_results(
        "datapath_shards",
        {
            "figure": "shard write and read time vs np.save / np.load of the same bytes",
            "baseline": "np.save / np.load",
            "ratio": {"write": write_rs / write_np, "read": read_rs_s / read_np_s},
            "configuration": {**SPEC.__dict__, "threads": threads},
            "stored_over_raw": summary["bytes"] / raw,
            "seconds": {"write": timings, "read": read_t},
            "parts_seconds": {"write": wt, "read": rt},
            "encoded_bytes": {n: len(d) for n, d in encoded.items()},
            "table": text_a + "\n\n" + text_b,
        },
    )
    assert summary["rows"] == SPEC.n_samples * SPEC.n_steps


# ---------------------------------------------------------------------------------------------
def _abs_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs((a * b).sum(1)) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _peak(run_dir: str, n_blocks: int, batch: int) -> dict:
    """Peak memory of the PCA stage's worker over a run, measured in a fresh process."""
    return run_script("_synthetic_run.py", "pca-peak", run_dir, str(n_blocks), "0", str(batch))


def test_pca_stage_vs_sklearn(run):
    from sklearn.decomposition import IncrementalPCA as SkIPCA

    from pipeline.pca_stage import fit_batches

    threads = configure_threads()
    store, _, _, _ = run
    blocks = list(store.blocks())
    steps = list(range(min(PCA_STEPS, SPEC.n_steps)))
    comps: dict[str, dict[int, np.ndarray]] = {"stage": {}, "sklearn": {}}
    times: dict[str, list[float]] = {"stage": [], "sklearn": []}

    def stage(step: int) -> None:
        ckpt = f"pca/bench/steps-{step}.safetensors"
        store.delete(ckpt)
        w = stage_worker(store.url, step, blocks, K, PCA_BATCH, ckpt)
        w.run()
        comps["stage"][step] = w.estimators[step].est.components_.numpy()

    def sklearn(step: int) -> None:
        est = SkIPCA(n_components=K)
        for batch in fit_batches(store, step, PCA_BATCH, K, blocks):
            est.partial_fit(np.asarray(batch.h.reshape(len(batch.h), -1), np.float64))
        comps["sklearn"][step] = est.components_

    with threadpool_limits(threads):
        for step in steps:
            alternate(
                {"stage": partial(stage, step), "sklearn": partial(sklearn, step)},
                times,
                reverse=bool(step % 2),
            )
    speedup = ratio(times, "sklearn", "stage")
    min_cos = {s: float(_abs_cos(comps["stage"][s], comps["sklearn"][s]).min()) for s in steps}
    planted_cos = {s: float(_abs_cos(comps["stage"][s], planted_basis(SPEC, s)[0][:K]).min()) for s in steps}
    quarter = max(1, len(blocks) // 4)
    peak_n, peak_4n = _peak(store.url, quarter, PCA_BATCH), _peak(store.url, 4 * quarter, PCA_BATCH)
    mem_ratio = peak_4n["peak_bytes"] / max(peak_n["peak_bytes"], 1)
    text = table(
        f"PCA stage group worker (torch backend, real checkpoints every 4 batches) vs sklearn IncrementalPCA, "
        f"same batches of {PCA_BATCH} read from the run, k = {K}, D = {SPEC.d}, {SPEC.n_samples} samples per step, "
        f"{threads} thread(s); {len(steps)} step(s) = rounds",
        ["method", "seconds per step (median)", "speed-up vs sklearn", "min |cos| top-16 vs other"],
        [
            ["PCA stage worker", median(times["stage"]), speedup, min(min_cos.values())],
            ["sklearn IncrementalPCA", median(times["sklearn"]), 1.0, min(min_cos.values())],
        ],
    )
    text_m = table(
        "PCA worker peak RSS above its start (fresh process, one step)",
        ["samples", "peak MiB", "ratio to N"],
        [
            [peak_n["n_samples"], peak_n["peak_bytes"] / 2**20, 1.0],
            [peak_4n["n_samples"], peak_4n["peak_bytes"] / 2**20, mem_ratio],
        ],
    )
    write_results(
        "datapath_pca",
        {
            "figure": "seconds per step of the PCA stage worker",
            "baseline": "sklearn IncrementalPCA partial_fit on the same batches",
            "ratio": speedup,
            "configuration": {
                "k": K,
                "batch": PCA_BATCH,
                "steps": steps,
                "threads": threads,
                **SPEC.__dict__,
            },
            "seconds": times,
            "min_abs_cos_stage_vs_sklearn": min_cos,
            "min_abs_cos_stage_vs_planted": planted_cos,
            "peak": {"n": peak_n, "4n": peak_4n, "ratio": mem_ratio},
            "table": text + "\n\n" + text_m,
        },
    )
    assert min(min_cos.values()) > 0.9  # the two fits find the same planted subspace


# ---------------------------------------------------------------------------------------------


def test_aggregate_read_back(run):
    from hspace.directions import mean_difference, select_quantiles

    threads = configure_threads()
    store, npy_dir, _, _ = run
    q = 0.1
    scores = np.random.default_rng(3).standard_normal(SPEC.n_samples)
    pos, neg = (i.numpy() for i in select_quantiles(torch.from_numpy(scores), q))
    wanted = np.concatenate([pos, neg])  # seed == row index in the synthetic run
    needed = len(wanted) * SPEC.n_steps * SPEC.d * 2
    counting = RunStore(store.url)
    counting.fs = fs = CountingFS(counting.fs)
    per_block = SPEC.seeds_per_block
    results = {}

    def stage() -> None:
        fs.bytes_read = 0
        h = torch.from_numpy(counting.read_h(wanted))
        results["stage"] = mean_difference(h[: len(pos)], h[len(pos) :]).numpy()

    def numpy_mean() -> None:
        out = np.empty((SPEC.n_steps, SPEC.d), np.float64)
        for step in range(SPEC.n_steps):
            sums = {"pos": np.zeros(SPEC.d), "neg": np.zeros(SPEC.d)}
            for name, rows in (("pos", pos), ("neg", neg)):
                for b in np.unique(rows // per_block):
                    m = np.load(npy_path(npy_dir, step, int(b)), mmap_mode="r")
                    sel = rows[rows // per_block == b] - b * per_block
                    sums[name] += m[np.sort(sel)].reshape(len(sel), -1).sum(0, dtype=np.float64)
            out[step] = sums["pos"] / len(pos) - sums["neg"] / len(neg)
        results["numpy"] = out

    repeats = 3
    times = compare(
        {"RunStore.read_h + mean_difference": stage, "numpy mean over .npy memmaps": numpy_mean},
        repeats=repeats,
    )
    r = ratio(times, "RunStore.read_h + mean_difference", "numpy mean over .npy memmaps")
    err = float(
        np.abs(results["stage"].reshape(SPEC.n_steps, -1) - results["numpy"]).max()
        / np.abs(results["numpy"]).max()
    )
    text = table(
        f"Supervised aggregation read-back: top/bottom {q:.0%} of {SPEC.n_samples} seeds ({len(wanted)} rows) x "
        f"{SPEC.n_steps} steps, D = {SPEC.d}; median of {repeats} interleaved rounds, {threads} thread(s)",
        ["method", "seconds", "time ratio", "bytes read", "bytes needed", "read / needed"],
        [
            [
                "RunStore.read_h + mean_difference",
                median(times["RunStore.read_h + mean_difference"]),
                r,
                fs.bytes_read,
                needed,
                fs.bytes_read / needed,
            ],
            [
                "numpy mean over .npy memmaps",
                median(times["numpy mean over .npy memmaps"]),
                1.0,
                "",
                needed,
                "",
            ],
        ],
    )
    write_results(
        "datapath_aggregate",
        {
            "figure": "seconds of read_h + mean difference, and bytes read / bytes of the rows needed",
            "baseline": "numpy mean over the same rows of .npy memory maps",
            "ratio": r,
            "bytes_read": fs.bytes_read,
            "bytes_read_over_needed": fs.bytes_read / needed,
            "configuration": {"q": q, "rows": len(wanted), "threads": threads, **SPEC.__dict__},
            "seconds": times,
            "max_rel_err_vs_numpy": err,
            "table": text,
        },
    )
    assert err < 1e-3
