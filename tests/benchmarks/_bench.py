"""Shared helpers of the benchmarks: device and threads, interleaved timing, tables, JSON results.

Speeds are reported as ratios against a baseline timed in the same run: the variants of one
comparison run round-robin (A B C, B C A, ...) so that a change in the machine's load hits all
of them, every variant is repeated, and the ratio reported is the median of the per-round ratios.
Parameters grow on a GPU (``SCALE``); on the CPU they are sized for two shared cores.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hspace.toy.train import TOY_UNET_CONFIG
from tests.conftest import TINY_UNET_CONFIG

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

#: The toy model's architecture: 32 px, h = 64 x 8 x 8 (one definition, in the training script).
TOY_UNET = dict(TOY_UNET_CONFIG)
#: A larger U-Net for GPU runs (64 px, h = 256 x 8 x 8, about 40 M parameters).
GPU_UNET = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=32,
    attention_head_dim=64,
)


def configure_threads() -> int:
    """Intra-op threads for CPU runs: ``HSPACE_BENCH_THREADS`` (default 1) and returns it.

    On the shared 2-core machine two torch threads that wait for each other made small U-Net
    forwards up to 50x slower than one thread, so one thread is the stable default.
    """
    threads = int(os.environ.get("HSPACE_BENCH_THREADS", "1"))
    if not ON_GPU:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call (device synchronised before and after)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def compare(
    variants: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant over ``repeats`` rounds, run round-robin with a rotating
    start so that load changes hit all variants alike; ``warmup`` untimed rounds first."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(timed(variants[name]))
    return times


def alternate(
    variants: Mapping[str, Callable[[], Any]], times: dict[str, list[float]], *, reverse: bool
) -> dict[str, Any]:
    """One interleaved round: every variant once, in the given order or reversed (alternate it per
    round, so that neither variant always runs first); each call's seconds are appended to
    ``times[name]``. Returns each variant's result."""
    results = {}
    for name in reversed(list(variants)) if reverse else list(variants):
        t0 = time.perf_counter()
        results[name] = variants[name]()
        times.setdefault(name, []).append(time.perf_counter() - t0)
    return results


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(times: Mapping[str, Sequence[float]], name: str, baseline: str) -> float:
    """Median over rounds of time(name) / time(baseline) (> 1: slower than the baseline)."""
    return median([a / b for a, b in zip(times[name], times[baseline], strict=True)])


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table, right-aligned numbers; printed and returned."""
    cells = [[str(h) for h in headers], *[[_fmt(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    return text


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}" if abs(value) < 1 else f"{value:,.3f}".rstrip("0").rstrip(".")
        return f"{value:.3e}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name()
        if ON_GPU
        else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return info


#: What every result file says besides the machine and date (``environment``).
RESULT_KEYS = ("figure", "baseline", "ratio", "configuration")


def write_results(name: str, data: Mapping[str, Any]) -> Path:
    """``tests/benchmarks/results/<name>.json`` with the environment (machine, date) added; returns
    the path. ``data`` must give :data:`RESULT_KEYS`: what is measured, against what, the ratio (or
    ratios by variant) and the configuration."""
    missing = [k for k in RESULT_KEYS if k not in data]
    if missing:
        raise ValueError(f"benchmark result {name!r} lacks {missing}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(
        json.dumps({"benchmark": name, "environment": environment(), **data}, indent=1, default=str)
    )
    print(f"-> {path.relative_to(REPO_ROOT)}", flush=True)
    return path


def script_env() -> dict[str, str]:
    """The environment of a benchmark's helper process: this one's, with the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_script(name: str, *args: str, marker: str = "PEAK_JSON", timeout: float = 900) -> Any:
    """Run ``tests/benchmarks/<name>`` in a fresh process (a clean peak-memory reading) and return the
    JSON of its stdout line that starts with ``marker``."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name(name)), *args],
        capture_output=True,
        text=True,
        env=script_env(),
        cwd=REPO_ROOT,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith(marker + " "))
    return json.loads(line.removeprefix(marker + " "))


def bench_unet(config: Mapping[str, Any] | None = None, seed: int = 0):
    """A randomly initialised UNet2DModel (toy architecture on the CPU, GPU_UNET on a GPU)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**dict(config or (GPU_UNET if ON_GPU else TOY_UNET))).eval()


def bench_model(config: Mapping[str, Any] | None = None, seed: int = 0):
    """An HSpaceModel around :func:`bench_unet` on the benchmark device (DDPM scheduler, 1000 steps)."""
    from diffusers import DDPMScheduler

    from hspace.model import HSpaceModel

    unet = bench_unet(config, seed).to(DEVICE)
    return HSpaceModel(unet, dict(DDPMScheduler(num_train_timesteps=1000).config), model_id="bench-random")


def toy_model_or_random():
    """The shipped toy model if its weights are installed, else the same architecture random; and
    which one it is (h statistics, hence compressibility, differ between them)."""
    from hspace.toy import TOY_MODEL_DIR

    if (TOY_MODEL_DIR / "unet" / "config.json").is_file():
        from hspace.toy import load_toy_model

        return load_toy_model(device=DEVICE), "toy (trained)"
    return bench_model(TOY_UNET), "toy architecture, random weights"


#: The tests' tiny U-Net (tests/conftest.py): 16 px, h = 32 x 4 x 4.
TINY_UNET = dict(TINY_UNET_CONFIG)
