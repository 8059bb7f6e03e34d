"""A synthetic run at real h sizes, written through :class:`pipeline.storage.RunStore` as the
generate stage writes it, and (run as a script) a PCA group worker's peak memory in a fresh process.

h rows per step: ``n_planted`` orthonormal directions (a different random set per step) with
standard deviations ``top_std * decay**j`` over isotropic noise (std ``noise_std``) and a per-step
offset, cast to float16. Blocks of ``seeds_per_block`` seeds get one activation shard per step and
one samples shard (a placeholder 8 x 8 PNG per seed), then are listed in the manifest with the
same identity and model facts the generate stage records, so every later stage reads them as a
real run.

The default size is CelebA-HQ-256's h (512 x 8 x 8 = 32,768 values): 2,048 samples x 10 steps is
1.3 GB of float16. ``HSPACE_BENCH_H_SAMPLES`` / ``HSPACE_BENCH_H_STEPS`` change it;
``HSPACE_BENCH_QUICK=1`` gives 512 x 4.

    python tests/benchmarks/_synthetic_run.py pca-peak RUN_DIR N_BLOCKS STEP BATCH
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
from _bench import alternate

from pipeline.storage import BlockRecord, RunStore

CELEBAHQ_H_SHAPE = (512, 8, 8)


@dataclass(frozen=True)
class SyntheticSpec:
    n_samples: int = 2048
    n_steps: int = 10
    h_shape: tuple[int, int, int] = CELEBAHQ_H_SHAPE
    seeds_per_block: int = 256
    n_planted: int = 24
    top_std: float = 24.0
    decay: float = 0.9
    noise_std: float = 0.5
    seed: int = 0

    @property
    def d(self) -> int:
        return int(np.prod(self.h_shape))

    @property
    def raw_bytes(self) -> int:
        """float16 bytes of all h rows."""
        return self.n_samples * self.n_steps * self.d * 2


def spec_from_env() -> SyntheticSpec:
    """The benchmark size: ``HSPACE_BENCH_QUICK`` / ``HSPACE_BENCH_H_SAMPLES`` / ``HSPACE_BENCH_H_STEPS``."""
    quick = os.environ.get("HSPACE_BENCH_QUICK", "") not in ("", "0")
    n = int(os.environ.get("HSPACE_BENCH_H_SAMPLES", 512 if quick else 2048))
    t = int(os.environ.get("HSPACE_BENCH_H_STEPS", 4 if quick else 10))
    return SyntheticSpec(n_samples=n, n_steps=t, seeds_per_block=min(256, n))


def planted_basis(spec: SyntheticSpec, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthonormal directions [n_planted, D] float32, their stds [n_planted] and the step's offset [D]."""
    rng = np.random.default_rng([spec.seed, step, 1])
    q, _ = np.linalg.qr(rng.standard_normal((spec.d, spec.n_planted)))
    stds = spec.top_std * spec.decay ** np.arange(spec.n_planted)
    offset = rng.standard_normal(spec.d).astype(np.float32) * 0.2
    return q.T.astype(np.float32), stds.astype(np.float32), offset


def block_h(spec: SyntheticSpec, step: int, start: int, stop: int, basis: Any = None) -> np.ndarray:
    """h [stop - start, C, H, W] float16 of seeds start..stop-1 at ``step`` (deterministic per block)."""
    q, stds, offset = basis if basis is not None else planted_basis(spec, step)
    rng = np.random.default_rng([spec.seed, step, 2, start])
    n = stop - start
    z = rng.standard_normal((n, spec.n_planted), dtype=np.float32) * stds
    x = rng.standard_normal((n, spec.d), dtype=np.float32)
    x *= spec.noise_std
    x += z @ q
    x += offset
    return x.astype(np.float16).reshape(n, *spec.h_shape)


def _placeholder_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 64, 32)).save(buf, format="PNG")
    return buf.getvalue()


def write_synthetic_run(
    store: RunStore, spec: SyntheticSpec, npy_dir: str | None = None, timings: dict | None = None
) -> dict[str, Any]:
    """Write every block's shards and list them in the manifest; returns the store summary.

    With ``npy_dir`` every h array is also written with ``np.save`` (baseline), the two writes
    alternating which goes first; ``timings`` then gets their seconds per shard.
    """
    identity = {"model": "synthetic", "num_inference_steps": spec.n_steps, "h_shape": list(spec.h_shape)}
    store.ensure_identity(identity)
    timesteps = [int(t) for t in np.linspace(999, 0, spec.n_steps).round()]
    png = _placeholder_png()
    bases = [planted_basis(spec, s) for s in range(spec.n_steps)]
    records = []
    for index, start in enumerate(range(0, spec.n_samples, spec.seeds_per_block)):
        stop = min(start + spec.seeds_per_block, spec.n_samples)
        seeds = np.arange(start, stop)
        shards = tuple(
            _write_shard(store, spec, s, timesteps[s], seeds, index, bases[s], npy_dir, timings)
            for s in range(spec.n_steps)
        )
        samples = store.write_samples(seeds, [png] * len(seeds), "synthetic", index)
        facts = {"model_fingerprint": "synthetic", "timesteps": timesteps, "h_shape": list(spec.h_shape)}
        records.append(BlockRecord(f"{start:012d}-{stop:012d}", start, stop, shards, samples, facts))
    store.add_blocks(records)
    store.update_manifest(
        lambda m: (
            m["stages"]
            .setdefault("generate", {})
            .update(
                model={k: records[0].extra[k] for k in ("model_fingerprint", "timesteps", "h_shape")},
                complete=True,
            )
        )
    )
    return store.summary()


def npy_path(npy_dir: str, step: int, index: int) -> str:
    return os.path.join(npy_dir, f"t{step}-b{index:06d}.npy")


def _write_shard(
    store: RunStore,
    spec: SyntheticSpec,
    step: int,
    timestep: int,
    seeds: np.ndarray,
    index: int,
    basis: Any,
    npy_dir: str | None,
    timings: dict | None,
) -> Any:
    h = block_h(spec, step, int(seeds[0]), int(seeds[-1]) + 1, basis)

    def runstore():
        return store.write_activations(step, timestep, seeds, h, "synthetic", index)

    if npy_dir is None:
        return runstore()

    def npy():
        with open(npy_path(npy_dir, step, index), "wb") as f:
            np.save(f, h)

    results = alternate(
        {"runstore": runstore, "npy": npy},
        timings if timings is not None else {},
        reverse=bool((step + index) % 2),
    )
    return results["runstore"]


# ------------------------------------------------------------------------------ memory (script)
def stage_worker(run_url: str, step: int, blocks: list[str], k: int, batch: int, checkpoint: str) -> Any:
    """The PCA stage's group worker (the Ray actor's class, here in-process) for one step, torch
    backend, a checkpoint every 4 batches as in the stage."""
    from pipeline.pca_stage import PCAGroupWorker

    return PCAGroupWorker(
        run_url=run_url,
        storage_options={},
        steps=[step],
        blocks=blocks,
        n_components=k,
        backend="torch",
        batch_size=batch,
        checkpoint_every=4,
        checkpoint_path=checkpoint,
    )


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def pca_worker_peak(run_dir: str, n_blocks: int, step: int, batch: int, k: int = 16) -> dict[str, Any]:
    """Peak RSS above the start of one :class:`PCAGroupWorker` fitting ``step`` over the first
    ``n_blocks`` blocks (checkpoints written to the run as in the stage)."""

    store = RunStore(run_dir)
    blocks = list(store.blocks())[:n_blocks]
    ckpt = f"pca/bench-peak/steps-{step}-{n_blocks}.safetensors"
    store.delete(ckpt)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    status = stage_worker(run_dir, step, blocks, k, batch, ckpt).run()
    peak = (_status_kb("VmHWM") - base) * 1024
    store.delete(ckpt)
    return {"peak_bytes": peak, "n_samples": status["n_samples_seen"][step], "blocks": n_blocks}


def main(argv: list[str]) -> None:
    if argv[0] != "pca-peak":
        raise SystemExit(f"unknown command {argv[0]!r}")
    import torch

    torch.set_num_threads(int(os.environ.get("HSPACE_BENCH_THREADS", "1")))
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: freed batches go back to the OS
    libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    out = pca_worker_peak(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
    print("PEAK_JSON " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
