"""How responsive ``hspace explore`` is: ms from slider release to the new image on screen.

A catalog like the quick start's (toy model, DDPM, 20 steps: the explorer renders with a version's
own steps) is published in-process; the ``hspace explore`` command serves it as a user would run
it (default threads); headless Chromium drags the ``glasses`` slider 20 times (10 mouse moves,
15 ms apart, then release) and the page records the time from release to the decoded image of the
released position. Reported: median and max, for one seed and for four seeds, with the release
cancelling the render of an older position (the page's default) and without, alternating drags;
plus the render queue's counters (requests dropped as superseded, cancelled batches). A screenshot of the
page goes next to the JSON results. Threads: ``HSPACE_BENCH_THREADS`` (default 1), for the
explorer too (``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request

from _bench import REPO_ROOT, RESULTS_DIR, configure_threads, table, write_results

from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.explore_catalog import build_explore_catalog

STEPS = 20
DRAGS = 10


def _drag(pg, name: str, to_fraction: float, moves: int = 10) -> None:
    selector = f'input.slider[data-name="{name}"]'
    box = pg.locator(selector).bounding_box()
    y = box["y"] + box["height"] / 2
    value = float(pg.eval_on_selector(selector, "s => (s.value - s.min) / (s.max - s.min)"))
    x0, x1 = box["x"] + 8 + value * (box["width"] - 16), box["x"] + 8 + to_fraction * (box["width"] - 16)
    pg.mouse.move(x0, y)
    pg.mouse.down()
    for i in range(1, moves + 1):
        pg.mouse.move(x0 + (x1 - x0) * i / moves, y)
        pg.wait_for_timeout(15)
    pg.mouse.up()


def _latencies(pg, seeds: str) -> dict[str, list[float]]:
    """Release-to-image ms of DRAGS drags with the release preempting the render of an older
    position and DRAGS without, alternating (so a change in the machine's load hits both)."""
    pg.fill("#seeds", seeds)
    pg.locator("#seeds").blur()
    pg.wait_for_function("state.inFlight === 0 && !state.dirty", timeout=120_000)
    out: dict[str, list[float]] = {"preempt": [], "no preempt": []}
    for i in range(2 * DRAGS):
        variant = "preempt" if i % 4 in (0, 3) else "no preempt"  # ABBA: both drag left and right
        pg.evaluate(f"state.preemptOnRelease = {'true' if variant == 'preempt' else 'false'}")
        done = int(pg.evaluate("window.hspaceLatencies.length"))
        _drag(pg, "glasses", [0.15, 0.85][i % 2])  # the value must change for a release to count
        pg.wait_for_function(f"window.hspaceLatencies.length > {done}", timeout=120_000)
        out[variant].append(float(pg.evaluate("window.hspaceLatencies.at(-1)")))
        pg.wait_for_function("state.inFlight === 0 && !state.dirty", timeout=120_000)
    return out


def test_bench_explore_release_to_image(tmp_path):
    from playwright.sync_api import sync_playwright

    threads = configure_threads()
    start = time.perf_counter()
    catalog = tmp_path / "catalog"
    build_explore_catalog(str(catalog), steps=STEPS, n_samples=64)
    print(f"catalog built in {time.perf_counter() - start:.0f} s", flush=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hspace.cli", "explore", "catalog", "--port", "0", "--device", "cpu"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": str(threads)},
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        url = re.search(r"(http://127\.0\.0\.1:\d+/)", line).group(1)  # type: ignore[union-attr]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            pg = browser.new_page(viewport={"width": 1400, "height": 900})
            pg.goto(url)
            pg.wait_for_function(
                "Number(document.querySelector('#result').dataset.seq) >= 1", timeout=120_000
            )
            one = _latencies(pg, "0")
            print(f"1 seed: { {k: [round(ms) for ms in v] for k, v in one.items()} }", flush=True)
            four = _latencies(pg, "0-3")
            print(f"4 seeds: { {k: [round(ms) for ms in v] for k, v in four.items()} }", flush=True)
            pg.fill("#seeds", "0")
            pg.locator("#seeds").blur()
            pg.wait_for_function("state.inFlight === 0 && !state.dirty", timeout=120_000)
            pg.click("#swap-go")
            pg.wait_for_function(
                "document.querySelectorAll('#swap-result img').length === 3", timeout=120_000
            )
            pg.click("#diff-go")
            pg.wait_for_selector("#diff-table")
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            pg.screenshot(path=str(RESULTS_DIR / "explore.png"))
            browser.close()
        with urllib.request.urlopen(url + "api/stats") as r:
            stats = json.loads(r.read())
    finally:
        proc.terminate()
        proc.wait(30)
    rows = [
        [label, variant, len(ms), statistics.median(ms), max(ms)]
        for label, result in (("1 seed", one), ("4 seeds", four))
        for variant, ms in result.items()
    ]
    table(
        f"explore: slider release -> new image (ms), toy model, DDPM {STEPS} steps, CPU",
        ["seeds", "release", "drags", "median", "max"],
        rows,
    )
    print(f"render queue: {stats}")
    write_results(
        "explore",
        {
            "figure": "ms from slider release to the new image, 1 and 4 seeds",
            "baseline": "1 seed",
            "ratio": {
                variant: statistics.median(four[variant]) / statistics.median(one[variant])
                for variant in one
                if variant in four
            },
            "configuration": {"steps": STEPS, "drags": DRAGS, "threads": threads},
            "one_seed_ms": one,
            "four_seeds_ms": four,
            "render_queue": stats,
        },
    )
    assert all(ms > 0 for result in (one, four) for v in result.values() for ms in v)
