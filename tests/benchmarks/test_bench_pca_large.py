"""Streaming PCA per step at SDXL's h size: peak memory bounded by the batch and k, and seconds.

SDXL's mid-block h is 1280 x 32 x 32 at 1024 px: D = 1,310,720 features per step; SD 1.5's is
1280 x 8 x 8: D = 81,920. For each D, ``_pca_memory.py`` fits one step in a fresh process
(3 float32 batches of 64 rows, k = 16, 1 thread) with

- ``PerTimestepPCA`` (float64 accumulation, the default; the Gram solver: the stacked rows'
  (k + batch + 1)^2 Gram matrix, never a D x D one),
- ``PerTimestepPCA(dtype=torch.float32)``,
- scikit-learn's ``IncrementalPCA`` (``n_components=16``: components 16 x D; its SVD of the
  stacked rows) where the memory it needs, predicted from its multiple at the smaller D, is
  below the machine's available memory,

and reports the peak RSS above the data as a multiple of (batch + k) * D * 4 bytes (the float32
batch and components), the wall and CPU seconds and the ratio of CPU seconds to the float64
hspace fit (CPU time: on a loaded machine wall time mostly measures the wait for a core). The
processes of one D run in alternating order across the two sizes. A D x D float32 matrix would
be 6.9 TB at SDXL's D; the bound asserted is 16 x (batch + k) * D * 4 bytes.

``HSPACE_BENCH_QUICK=1``: 2 batches, and scikit-learn only at SD 1.5's D.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from _bench import configure_threads, run_script, table, write_results

QUICK = os.environ.get("HSPACE_BENCH_QUICK", "") not in ("", "0")
SIZES = {"SD 1.5 (1280x8x8)": 81_920, "SDXL (1280x32x32)": 1_310_720}
BATCH, K = 64, 16
BATCHES = 2 if QUICK else 3
ESTIMATORS = ("hspace", "hspace-float32", "sklearn")
BASELINE = "hspace"
#: peak RSS above the data, in units of (batch + k) * D * 4 bytes, that no estimator may exceed
BOUND = 16.0


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def _abs_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.abs((a * b).sum(1)) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_pca_memory_is_bounded_by_batch_and_k(tmp_path):
    configure_threads()  # the fits run in their own processes with 1 thread
    results: dict[str, dict[str, dict]] = {name: {} for name in SIZES}
    skipped: dict[str, str] = {}
    multiples: dict[str, float] = {}  # sklearn's multiple at the smaller D predicts its need at the larger
    for i, (size, d) in enumerate(SIZES.items()):
        unit = (BATCH + K) * d * 4
        order = ESTIMATORS if i % 2 == 0 else tuple(reversed(ESTIMATORS))
        for est in order:
            if est == "sklearn":
                need = multiples.get(est, BOUND) * unit + BATCHES * BATCH * d * 4
                if QUICK and d > min(SIZES.values()):
                    skipped[size] = "quick mode: scikit-learn only at the smaller D"
                    continue
                if need > 0.8 * _available_bytes():
                    skipped[size] = (
                        f"scikit-learn needs about {need / 2**30:.1f} GiB, "
                        f"{_available_bytes() / 2**30:.1f} GiB available"
                    )
                    continue
            out = tmp_path / f"{est}_{d}.npy"
            r = run_script(
                "_pca_memory.py", est, str(d), str(BATCH), str(BATCHES), str(K), str(out), timeout=3600
            )
            r["multiple"] = r["peak_bytes"] / unit
            r["components"] = out
            multiples[est] = max(multiples.get(est, 0.0), r["multiple"])
            results[size][est] = r

    rows = []
    for size, by_est in results.items():
        d = SIZES[size]
        base = by_est[BASELINE]
        ref = np.load(base["components"])
        for est, r in by_est.items():
            cos = _abs_cos(np.load(r["components"]), ref)
            r["min_abs_cos_to_hspace"] = float(cos.min())
            rows.append([size, d, est, r["peak_bytes"] / 2**20, r["multiple"], r["seconds"], r["cpu_seconds"],
                         r["cpu_seconds"] / base["cpu_seconds"], r["min_abs_cos_to_hspace"]])  # fmt: skip
        if size in skipped:
            rows.append([size, d, "sklearn", "-", "-", "-", "-", "-", f"not run: {skipped[size]}"])
    text = table(
        f"Streaming PCA of one step: {BATCHES} float32 batches of {BATCH} rows, k = {K}, 1 thread, a fresh "
        f"process per fit; peak = peak RSS above the data; multiple = peak / ((batch + k) * D * 4 B)",
        [
            "h size",
            "D",
            "estimator",
            "peak MiB",
            "multiple",
            "wall s",
            "CPU s",
            "CPU ratio to hspace",
            "min |cos| to hspace",
        ],
        rows,
    )
    write_results(
        "pca_large",
        {
            "figure": "peak memory and seconds of a streaming PCA step at SDXL's h size",
            "baseline": "hspace PerTimestepPCA (float64 accumulation)",
            "ratio": {
                f"{size}: {est}": r["cpu_seconds"] / by_est[BASELINE]["cpu_seconds"]
                for size, by_est in results.items()
                for est, r in by_est.items()
            },
            "configuration": {"sizes": SIZES, "batch": BATCH, "batches": BATCHES, "k": K, "quick": QUICK},
            "results": {
                size: {est: {k: v for k, v in r.items() if k != "components"} for est, r in by_est.items()}
                for size, by_est in results.items()
            },
            "skipped": skipped,
            "bound_multiple": BOUND,
            "table": text,
        },
    )
    for size, by_est in results.items():
        for est, r in by_est.items():
            assert r["multiple"] <= BOUND, (size, est, r["multiple"])
            # the same data, the same update rule: the planted directions agree (s_j falls 10 % per j)
            assert r["min_abs_cos_to_hspace"] > 0.99, (size, est, r["min_abs_cos_to_hspace"])
