"""The Jacobian benchmark's cases, and (run as a script) their peak memory in a fresh process.

Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` above the level at the start of the
call; on the CPU the process's peak RSS above its RSS at the start (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``), with glibc's mmap threshold fixed at 64 kB so that freed
tensors go back to the OS and one case's peak does not hide in the next one's heap. tracemalloc
is no use here: it sees Python's allocator, not torch's. The script runs in its own process
because the malloc setting would slow every later benchmark of the session.

    python tests/benchmarks/_jacobian_cases.py '{"config": "tiny", "k": 16, "block": 4, ...}'
"""

from __future__ import annotations

import ctypes
import gc
import json
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
from _bench import DEVICE, ON_GPU, TINY_UNET, TOY_UNET, bench_model

from hspace.jacobian import explicit_jacobian, jacobian_directions

CONFIGS = {"tiny": TINY_UNET, "toy": TOY_UNET}


def setup(config: str, batch: int = 1, timestep: int = 500, seed: int = 0) -> tuple[Any, torch.Tensor, int]:
    """Model (random weights, fixed seed), x_t [batch, 3, H, W] and timestep."""
    model = bench_model(CONFIGS[config], seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x_t = torch.randn(batch, *model.image_shape, generator=g).to(DEVICE)
    return model, x_t, timestep


def cases(
    model: Any, x_t: torch.Tensor, t: int, *, k: int, block: int, n_iter: int, tol: float, chunk: int
) -> dict[str, Callable[[], Any]]:
    """name -> call; each returns (vectors [B, k, D] float64 on the CPU, singular values [B, k], iterations)."""

    def alg(method: str) -> Callable[[], Any]:
        def run():
            size = None if method == "krylov" else block  # the Krylov method: blocks of all k
            res = jacobian_directions(
                model, x_t, t, k, method=method, n_iter=n_iter, tol=tol, block_size=size
            )
            return res.vectors.flatten(2).double().cpu(), res.singular_values.double().cpu(), res.iterations

        return run

    def explicit():
        jac = explicit_jacobian(model, x_t, t, chunk_size=chunk)  # [B, out, D]
        _, s, vh = torch.linalg.svd(jac.double(), full_matrices=False)
        return vh[:, :k].cpu(), s[:, :k].cpu(), jac.shape[1]

    return {
        f"Alg. 1 subspace (all {k} at once)": alg("subspace"),
        f"Alg. 2 sequential (blocks of {block})": alg("sequential"),
        f"block Krylov (blocks of {k})": alg("krylov"),
        "explicit Jacobian + SVD": explicit,
    }


# ------------------------------------------------------------------------------ memory (script)
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak memory of one call above the level at its start (see the module docstring)."""
    gc.collect()
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - base) * 1024


def main(argv: list[str]) -> None:
    params = json.loads(argv[0])
    if not ON_GPU:
        torch.set_num_threads(int(params.get("threads", 1)))
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixed: no dynamic growth)
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    model, x_t, t = setup(params["config"], params.get("batch", 1))
    todo = cases(
        model,
        x_t,
        t,
        k=params["k"],
        block=params["block"],
        n_iter=params["n_iter"],
        tol=params["tol"],
        chunk=params["chunk"],
    )
    # warm-up with two iterations per block: one-time allocations (kernels, caches) are not the method's
    for fn in cases(
        model,
        x_t,
        t,
        k=params["k"],
        block=params["block"],
        n_iter=2,
        tol=params["tol"],
        chunk=params["chunk"],
    ).values():
        fn()
    out = {name: peak_bytes(fn) for name, fn in todo.items()}
    print("PEAK_JSON " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
