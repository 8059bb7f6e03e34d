"""One streaming PCA fit in a fresh process: peak resident memory above the data, and seconds.

``python _pca_memory.py ESTIMATOR D BATCH BATCHES K [COMPONENTS.npy]`` with ESTIMATOR one of
``hspace`` (``PerTimestepPCA``, float64 accumulation, the default), ``hspace-float32``
(``PerTimestepPCA(dtype=torch.float32)``) or ``sklearn`` (``sklearn.decomposition.IncrementalPCA``).
The float32 batches [BATCH, D] (24 planted directions, s_j = 8 * 0.9^j, over noise of std 0.5, and
an offset) are made first; then the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``)
and the fit runs, one ``partial_fit`` per batch, 1 thread. Prints one line
``PEAK_JSON {...}``: the peak RSS of the fit minus the RSS before it, the wall and CPU seconds
(the process's, all threads), and the first batch's wall seconds. The components go to
COMPONENTS.npy (float32) when a path is given.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

LATENT = 24


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> int:
    """Reset the peak-RSS mark (VmHWM) to the current RSS; returns that RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def batches(d: int, batch: int, n_batches: int, seed: int = 0) -> list[torch.Tensor]:
    """The float32 batches, built in place (no float64 or [N, D] temporaries beyond one batch)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(LATENT, d, generator=g)
    basis /= basis.norm(dim=1, keepdim=True)  # nearly orthogonal at this D
    offset = torch.randn(d, generator=g)
    s = 8.0 * 0.9 ** torch.arange(LATENT, dtype=torch.float32)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, d, generator=g).mul_(0.5)
        x.addmm_(torch.randn(batch, LATENT, generator=g) * s, basis).add_(offset)
        out.append(x)
    return out


def main(argv: list[str]) -> None:
    estimator, d, batch, n_batches, k = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    save_to = argv[5] if len(argv) > 5 else None
    torch.set_num_threads(1)
    data = batches(d, batch, n_batches)
    if estimator == "sklearn":
        from sklearn.decomposition import IncrementalPCA
        from threadpoolctl import threadpool_limits

        arrays = [x.numpy() for x in data]
        threadpool_limits(limits=1)  # for the rest of this process
        est = IncrementalPCA(n_components=k)
        fit = est.partial_fit
    elif estimator in ("hspace", "hspace-float32"):
        from hspace.pca import PerTimestepPCA

        arrays = data
        dtype = torch.float32 if estimator == "hspace-float32" else torch.float64
        est = PerTimestepPCA(k, 1, dtype=dtype)

        def fit(x):
            return est.partial_fit_step(0, x)

    else:
        raise SystemExit(f"unknown estimator {estimator!r}: hspace, hspace-float32 or sklearn")
    before = reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    first = None
    for x in arrays:
        fit(x)
        first = first if first is not None else time.perf_counter() - t0
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = peak_bytes() - before
    if estimator == "sklearn":
        components = np.asarray(est.components_, dtype=np.float32)
    else:
        components = est.components_[0].to(torch.float32).numpy()
    if save_to:
        np.save(save_to, components)
    result = {"estimator": estimator, "d": d, "batch": batch, "batches": n_batches, "k": k,
              "peak_bytes": peak, "rss_before": before, "seconds": seconds, "cpu_seconds": cpu_seconds,
              "first_batch_seconds": first}  # fmt: skip
    print("PEAK_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
