"""``hspace explore`` in a real headless Chromium (Playwright, Debian's chromium) on the toy model.

A catalog is published in-process on the shipped toy model (tests/explore_catalog.py: PCA,
supervised, disentangled and random directions, previews, effects; two versions), the explorer
serves it from a thread on a free loopback port, and the page is driven like a person would:
every image loads, a slider drag changes the render, an uploaded image is inverted with its PSNR
shown, an h-swap and a version diff appear. The S3 test runs the ``hspace explore`` command
itself on a moto server and checks its JSON endpoints and that it listens on 127.0.0.1 only.
Screenshots go to ``out/explore/``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hspace.cli import app as cli_app
from hspace.explore.command import default_model
from hspace.explore.explorer import direction_rows
from hspace.explore.render_queue import SUPERSEDED, RenderCancelled, RenderQueue
from hspace.grade import CONFIDENT, LETTERS
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.explore_catalog import MODEL, build_explore_catalog
from tests.explore_server import start_explorer

try:  # `python -m pytest` puts the repo root on sys.path; bare `pytest` only puts tests/ there
    from tests.s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)
except ModuleNotFoundError:  # pragma: no cover
    from s3_server import s3_bucket, s3_server  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "out" / "explore"
STEPS = 10  # the test catalog's sampler steps (the explorer renders with a version's own steps)


# ------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def catalog(tmp_path_factory, one_torch_thread) -> dict:
    path = tmp_path_factory.mktemp("explore") / "catalog"
    return {"path": path, **build_explore_catalog(str(path), steps=STEPS, n_samples=32)}


@pytest.fixture(scope="module")
def server(catalog):
    """The explorer on a free loopback port, in a thread of this process."""
    from hspace import catalog as hcat
    from hspace.explore.explorer import Explorer
    from hspace.toy import load_toy_model

    explorer = Explorer(hcat.open(str(catalog["path"])), load_toy_model(), model_label="toy")
    url, srv, thread = start_explorer(explorer)
    yield {"url": url, "explorer": explorer}
    srv.should_exit = True  # type: ignore[attr-defined]
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the explorer, loaded and with its first render shown; fails on JS errors."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(60_000)  # renders on a loaded 2-core machine
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.goto(server["url"] + "/")
    wait_for_seq(pg, 1)
    yield pg
    context.close()
    assert not errors, errors


def wait_for_seq(pg, seq: int, timeout_ms: int = 60_000) -> None:
    """Wait until the editor shows the image of request ``seq`` (or a later one)."""
    pg.wait_for_function(
        f"Number(document.querySelector('#result').dataset.seq) >= {seq}", timeout=timeout_ms
    )


def last_seq(pg) -> int:
    """The sequence number the page will show last: its newest request, or the next if one waits."""
    return int(pg.evaluate("state.seq + (state.dirty ? 1 : 0)"))


def result_images(pg) -> list[str]:
    return pg.eval_on_selector_all("#result img", "imgs => imgs.map(i => i.src)")


def decode(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def drag(pg, name: str, to_fraction: float, moves: int = 8) -> None:
    """Press a slider's thumb, drag it to a fraction of its width in several moves, release."""
    box = pg.locator(f'input.slider[data-name="{name}"]').bounding_box()
    y = box["y"] + box["height"] / 2
    value = float(
        pg.eval_on_selector(f'input.slider[data-name="{name}"]', "s => (s.value - s.min) / (s.max - s.min)")
    )
    start_x = box["x"] + 8 + value * (box["width"] - 16)
    pg.mouse.move(start_x, y)
    pg.mouse.down()
    end_x = box["x"] + 8 + to_fraction * (box["width"] - 16)
    for i in range(1, moves + 1):
        pg.mouse.move(start_x + (end_x - start_x) * i / moves, y)
        pg.wait_for_timeout(15)
    pg.mouse.up()


def screenshot(pg, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / name))


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


# ------------------------------------------------------------------------- the page
def test_page_shows_every_direction_by_kind_with_loaded_previews_effects_and_grade_column(page, catalog):
    pg = page
    pg.wait_for_function("[...document.images].every(i => i.complete)")
    sizes = pg.evaluate("[...document.images].map(i => [i.currentSrc.slice(0, 40), i.naturalWidth])")
    broken = [src for src, width in sizes if width == 0 and src]
    assert not broken, broken
    previews = pg.locator("img.strip")
    assert previews.count() == len(catalog["directions"]) - 1  # the random baseline has no preview
    kinds = pg.eval_on_selector_all("h2.kind", "hs => hs.map(h => h.textContent)")
    assert kinds == ["supervised", "disentangled", "pca", "random"]
    rows = pg.eval_on_selector_all("tr[data-name]", "rs => rs.map(r => r.dataset.name)")
    assert sorted(rows) == sorted(catalog["directions"])
    headers = pg.eval_on_selector_all("h2.kind + table thead th", "ths => ths.map(t => t.textContent)")
    assert {"direction", "edit", "grade", "glasses", "grey_hair", "preview"} <= set(headers)
    # units under the name; provenance (and the grade in full) in the row's detail row
    assert pg.inner_text('tr[data-name="glasses"] td.name .units').startswith("raw · σ")
    detail = pg.locator('tbody[data-name="glasses"] tr.detail')
    assert detail.is_hidden()
    pg.click('tr[data-name="glasses"] button.more')
    assert (
        detail.is_visible()
        and '"sign_rule": "mean(h of top-scored)' in detail.locator("pre.provenance").inner_text()
    )
    # the effect row of the glasses direction: numbers, not dashes
    cells = pg.eval_on_selector_all('tr[data-name="glasses"] td.num', "tds => tds.map(t => t.textContent)")
    assert len(cells) == 2 and all(re.fullmatch(r"[+-][\d.e+-]+", c) for c in cells), cells
    assert pg.locator("#version option:checked").inner_text().endswith("(latest)")
    # sigma units: the random baseline (no sigma) cannot be moved; raw units: it can
    assert pg.locator('input.slider[data-name="glasses_random7"]').is_disabled()
    pg.select_option("#units", "raw")
    assert pg.locator('input.slider[data-name="glasses_random7"]').is_enabled()
    pg.select_option("#units", "sigma")
    screenshot(pg, "page.png")


def _multiple_in(text: str) -> float | None:
    match = re.search(r"(-?[\d.]+)× band", text)
    return None if match is None else float(match.group(1))


def test_grade_column_shows_letter_flags_band_multiple_and_leakage(page, catalog):
    pg = page
    grades = catalog["grades"]
    cells = pg.eval_on_selector_all(
        "tr[data-name]",
        "rs => rs.map(r => [r.dataset.name, r.querySelector('td.grade').innerText, "
        "r.querySelector('td.grade').title])",
    )
    assert sorted(n for n, _, _ in cells) == sorted(grades)
    for name, text, title in cells:
        g = grades[name]
        assert "{" not in text and text.split()[0] == g["letter"], (name, text)
        for flag in g["flags"]:
            assert flag in text, (name, flag, text)
        multiple = g["own"]["multiple"]
        shown = _multiple_in(text)
        assert shown is not None, text
        assert abs(shown - multiple) <= (0.05 if abs(multiple) < 10 else 0.5) + 1e-9, (name, shown, multiple)
        leak = g.get("leakage")
        if leak is None:
            assert "leaks" not in text
        else:
            match = re.search(r"leaks (-?\d+)% into (\w+)", text)
            assert match and match.group(2) == leak["attribute"], (name, text)
            assert abs(int(match.group(1)) - 100 * leak["share"]) <= 0.5 + 1e-9
            assert leak["reference_direction"] in title  # the numbers behind it, on hover
        assert g["own"]["attribute"] in title and f"score {g['score']:g}" in title
        assert f"confidence {round(100 * g['confidence'])}%" in title, (name, title)
        assert ("unsure" in text) == (g["confidence"] < CONFIDENT), (name, text)
    random_text = dict((n, t) for n, t, _ in cells)["glasses_random7"]
    assert random_text.startswith("F") and "within_random" in random_text  # the baseline's own band


def test_grade_header_sorts_rows_by_letter_then_score_and_back(page, catalog):
    pg = page
    grades = catalog["grades"]

    def order() -> dict[str, list[str]]:
        tables = pg.eval_on_selector_all(
            "table.directions", "ts => ts.map(t => [...t.tBodies].map(b => b.dataset.name))"
        )
        return {names[0]: names for names in tables}

    def expected(names: list[str], worst_first: bool) -> list[str]:
        key = [(LETTERS.index(grades[n]["letter"]), -grades[n]["score"], i) for i, n in enumerate(names)]
        ranked = [n for _, n in sorted(zip(key, names, strict=True))]
        return ranked[::-1] if worst_first else ranked

    published = order()
    header = pg.locator("table.directions th.sortable").first
    header.click()
    assert pg.get_attribute("table.directions th.sortable", "aria-sort") == "ascending"
    best = order()
    for names in published.values():
        assert next(v for v in best.values() if set(v) == set(names)) == expected(names, False)
    header.click()
    worst = order()
    for names in published.values():
        assert next(v for v in worst.values() if set(v) == set(names)) == expected(names, True)
    # mixed letters, flags and grades without leakage or without a letter, in one table
    mixed = {
        "pca_0": {"letter": "C", "score": 0.3, "flags": ["entangled"], "own": {"multiple": 2.44}},
        "pca_1": {
            "letter": "F",
            "score": 0.0,
            "flags": ["wrong_sign"],
            "own": {"multiple": -1.3},
            "confidence": 0.95,
        },
        "pca_2": {
            "letter": "C",
            "score": 0.5,
            "flags": [],
            "own": {"multiple": 12.0},
            "leakage": {"attribute": "glasses", "share": 0.95, "effect": 1.0, "reference": 1.05},
            "confidence": 0.62,
        },
        "glasses": {"score": "A", "by": "an older format"},
    }
    pg.evaluate(
        """mixed => { const info = structuredClone(state.info);
           for (const d of info.directions) { d.kind = "pca"; d.grade = mixed[d.name] ?? null; }
           buildDirections(info); state.info = info; sortByGrade("ascending"); }""",
        mixed,
    )
    (names,) = order().values()
    assert names[:3] == ["pca_2", "pca_0", "pca_1"]  # C 0.5, C 0.3, F; then the ungraded
    assert names[3:] == [n for n in catalog["directions"] if n not in ("pca_0", "pca_1", "pca_2")]
    text = lambda n: pg.inner_text(f'tr[data-name="{n}"] td.grade')  # noqa: E731
    assert text("pca_1").split() == ["F", "-1.3×", "band", "wrong_sign"]
    assert "entangled" in text("pca_0") and "2.4× band" in text("pca_0")
    assert "12× band" in text("pca_2") and "leaks 95% into glasses" in text("pca_2")
    assert "unsure (62%)" in text("pca_2") and "unsure" not in text("pca_0")  # pca_0: no confidence
    assert text("glasses").strip() == "?" and text("grey_hair").strip() == "–"


def test_directions_table_fits_a_1400_px_window(page):
    """No horizontal overflow at 1400 px: the last column (the previews) is inside the viewport and
    no effect number or grade is cut off, with the test catalog's 2 effect columns and with 6."""
    pg = page
    assert pg.evaluate("innerWidth") == 1400

    def check() -> None:
        fit = pg.evaluate(
            """() => ({scroll: document.documentElement.scrollWidth, width: innerWidth,
                 inner: [...document.querySelectorAll('#directions')].map(s => s.scrollWidth - s.clientWidth),
                 last: [...document.querySelectorAll('table.directions tr')]
                    .filter(r => !r.hidden && r.lastElementChild)
                    .map(r => r.lastElementChild.getBoundingClientRect().right),
                 strips: [...document.querySelectorAll('img.strip')].map(i => i.getBoundingClientRect().right),
                 clipped: [...document.querySelectorAll('td.num, td.grade')]
                    .filter(c => c.scrollWidth > c.clientWidth).map(c => c.textContent)})"""
        )
        assert fit["scroll"] <= fit["width"], fit
        assert all(x <= 0 for x in fit["inner"]), fit  # nothing hidden behind a scroll bar
        assert fit["last"] and max(fit["last"]) <= fit["width"], fit
        assert all(0 < right <= fit["width"] for right in fit["strips"]), fit
        assert not fit["clipped"], fit["clipped"]  # every effect number and grade readable in full

    pg.wait_for_function("[...document.images].every(i => i.complete)")
    check()
    screenshot(pg, "directions-1400.png")
    pg.evaluate(
        """() => { const info = structuredClone(state.info);
           const cols = ["glasses", "grey_hair", "smiling", "eyes_open", "wearing_hat", "pose"];
           info.effects.columns = cols;
           for (const d of info.directions) if (d.effect) { d.effect = cols.map((_, i) => 0.123 * i - 0.3);
             d.z = cols.map(() => 1.5); }
           buildDirections(info); }"""
    )
    pg.wait_for_function("[...document.images].every(i => i.complete)")
    check()
    screenshot(pg, "directions-1400-six-columns.png")


def test_slider_drag_changes_the_rendered_image_and_sliders_add_up(page):
    pg = page
    before = result_images(pg)
    assert len(before) == 1
    drag(pg, "glasses", 0.9)
    target = last_seq(pg)
    wait_for_seq(pg, target)
    after = result_images(pg)
    assert after != before
    moved = np.abs(decode(after[0]).astype(int) - decode(before[0]).astype(int)).mean()
    assert moved > 1.0, moved
    assert pg.evaluate("window.hspaceLatencies.length") >= 1
    # a second slider on top of the first changes the image again (edits add up)
    drag(pg, "grey_hair", 0.9)
    wait_for_seq(pg, last_seq(pg))
    both = result_images(pg)
    assert both != after
    # several seeds: one image per seed
    pg.fill("#seeds", "0-2")
    pg.press("#seeds", "Enter")
    pg.locator("#seeds").blur()
    wait_for_seq(pg, last_seq(pg))
    assert len(result_images(pg)) == 3
    assert (
        pg.evaluate("getComputedStyle(document.querySelector('#result img')).imageRendering") == "pixelated"
    )
    screenshot(pg, "slider.png")


def test_edit_step_range_mode_and_units_change_the_render(page):
    pg = page
    pg.locator('input.slider[data-name="pca_0"]').fill("2.5")
    wait_for_seq(pg, last_seq(pg))
    all_steps = result_images(pg)
    pg.locator("#step-lo").fill(str(STEPS - 2))  # edit only the last two steps: a smaller change
    wait_for_seq(pg, last_seq(pg))
    late = result_images(pg)
    pg.select_option("#mode", "asyrp")
    wait_for_seq(pg, last_seq(pg))
    asyrp = result_images(pg)
    assert len({all_steps[0], late[0], asyrp[0]}) == 3


def test_upload_is_inverted_with_psnr_and_then_edited(page, tmp_path):
    from hspace.toy.world import render_face, sample_factors

    pg = page
    face = tmp_path / "face.png"
    render_face(sample_factors(5)).save(face)
    seq = last_seq(pg)
    pg.set_input_files("#upload", str(face))
    pg.wait_for_function("document.querySelector('#psnr').textContent.endsWith('dB')", timeout=60_000)
    psnr = float(pg.inner_text("#psnr").split()[0])
    assert 15.0 < psnr < 60.0, psnr  # a faithful reconstruction, not a copy
    assert pg.evaluate("document.querySelector('#upload-recon').naturalWidth") >= 256
    wait_for_seq(pg, seq + 1)
    assert pg.locator("#source-image").is_checked()
    reconstructed = result_images(pg)
    drag(pg, "grey_hair", 0.95)
    wait_for_seq(pg, last_seq(pg))
    assert result_images(pg) != reconstructed
    screenshot(pg, "upload.png")


def test_h_swap_shows_a_b_and_a_with_the_h_of_b(page):
    pg = page
    pg.fill("#swap-a", "3")
    pg.fill("#swap-b", "4")
    pg.click("#swap-go")
    pg.wait_for_function("document.querySelectorAll('#swap-result img').length === 3", timeout=60_000)
    srcs = pg.eval_on_selector_all("#swap-result img", "imgs => imgs.map(i => i.src)")
    a, b, swapped = (decode(s).astype(int) for s in srcs)
    assert np.abs(swapped - a).mean() > 1.0 and np.abs(swapped - b).mean() > 1.0
    captions = pg.eval_on_selector_all("#swap-result figcaption", "fs => fs.map(f => f.textContent)")
    assert captions == ["seed 3", "seed 4", "3 with h of 4"]
    screenshot(pg, "swap.png")


def test_version_diff_lists_cosines_and_added_directions(page, catalog):
    pg = page
    pg.select_option("#diff-b", catalog["old"])
    pg.click("#diff-go")
    pg.wait_for_selector("#diff-table")
    rows = pg.eval_on_selector_all(
        "#diff-table tr td.name", "tds => tds.map(t => [t.textContent, t.nextElementSibling.textContent])"
    )
    assert [n for n, _ in rows] == ["pca_0", "pca_1", "pca_2"]
    assert all(-1.0 <= float(c) <= 1.0 for _, c in rows)
    assert "glasses" in pg.inner_text("#diff-result")  # added in the newer version
    screenshot(pg, "diff.png")


def test_release_to_image_latency_is_recorded_per_drag(page):
    """ms from slider release to the new image on screen, median of 5 drags (logged; see the
    README for the measured number at the explorer's default steps)."""
    pg = page
    for i in range(5):
        drag(pg, "glasses", 0.2 + 0.15 * i, moves=5)
        wait_for_seq(pg, last_seq(pg))
        pg.wait_for_function(f"window.hspaceLatencies.length >= {i + 1}")
    latencies = pg.evaluate("window.hspaceLatencies")
    assert len(latencies) == 5 and all(0 < ms < 60_000 for ms in latencies)
    print(f"release -> image: median {statistics.median(latencies):.0f} ms over 5 drags ({STEPS} steps)")


# ------------------------------------------------------------------------- the server's API
def test_coalesced_renders_equal_separate_renders_and_edits_add(server):
    from hspace import Edit
    from hspace.explore.explorer import png_data_url

    ex = server["explorer"]
    body = {"model": MODEL, "version": "latest", "units": "sigma", "sampler": "ddim"}
    key1, job1 = ex.render_job({**body, "seeds": [2], "edits": {"glasses": 1.5, "grey_hair": -1.0}})
    key2, job2 = ex.render_job({**body, "seeds": [3, 4], "edits": {"pca_1": 2.0}})
    assert key1 == key2
    together = ex.render_batch(key1, [job1, job2])
    apart = ex.render_batch(key1, [job1]) + ex.render_batch(key2, [job2])
    assert together[0]["batch_requests"] == 2 and together[0]["batch_rows"] == 3
    for t, a in zip(together, apart, strict=True):
        for x, y in zip(t["images"], a["images"], strict=True):
            assert np.abs(decode(x).astype(int) - decode(y).astype(int)).max() <= 1
    # the two sliders of request 1 are one additive edit of both directions
    version, dirs = ex.version(MODEL, "latest")
    sampler = ex.sampler("ddim", STEPS)
    edit = Edit([dirs["glasses"], dirs["grey_hair"]], scales=[1.5, -1.0], units="sigma")
    direct = sampler.sample([2], edit=edit, record_h=False).images[0]
    assert (
        np.abs(decode(png_data_url(direct)).astype(int) - decode(together[0]["images"][0]).astype(int)).max()
        <= 1
    )


def test_raw_slider_ranges_follow_sigma_units_or_the_norm_of_h(server):
    from dataclasses import replace

    ex = server["explorer"]
    _, dirs = ex.version(MODEL, "latest")
    pc = dirs["pca_0"]  # unit norm per step, with sigma: 3 sigma
    assert ex._raw_range(pc, STEPS) == pytest.approx(float(3 * pc.sigma.double().mean()), rel=1e-5)
    unit = replace(pc, sigma=None)  # e.g. a Jacobian singular vector: the scale of h itself
    h_norm = ex.h_norm(STEPS)
    assert h_norm > 1.0 and ex._raw_range(unit, STEPS) == pytest.approx(h_norm, rel=1e-5)
    assert ex._raw_range(dirs["glasses_random7"], STEPS) == 2.0  # raw units without sigma


def test_bad_render_requests_get_one_clear_error(server):
    url = server["url"] + "/api/render"
    base = {"client": "t", "seq": 1, "model": MODEL, "version": "latest", "seeds": [0]}
    for body, needle in [
        ({**base, "edits": {"nope": 1.0}}, "no direction 'nope'"),
        ({**base, "edits": {"glasses_random7": 1.0}}, "no sigma"),
        ({**base, "steps": [5, 99]}, "steps"),
        ({**base, "seeds": list(range(40))}, "at most"),
        ({**base, "units": "parsecs"}, "units"),
        ({**base, "image": "unknown"}, "upload it again"),
        ({**base, "directions": {"glasses": 2.0}}, "unknown field 'directions'; accepted: client, seq"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as err:
            post_json(url, body)
        assert err.value.code == 400
        assert needle in json.loads(err.value.read())["error"]
    with pytest.raises(urllib.error.HTTPError) as err:
        get_json(server["url"] + f"/api/version?model={MODEL}&ref=nosuchref")
    assert err.value.code == 404


def test_render_queue_drops_superseded_requests_and_batches_the_rest():
    gate, calls = threading.Event(), []

    def render(key, payloads, cancel):
        calls.append((key, list(payloads)))
        if payloads == ["a1"]:
            gate.wait(10)
        return [f"image of {p}" for p in payloads]

    queue = RenderQueue(render)
    try:
        first = queue.submit("a", 1, "k", "a1")
        deadline = time.monotonic() + 10
        while not calls:  # the worker is now busy with a1
            assert time.monotonic() < deadline
            time.sleep(0.005)
        a2 = queue.submit("a", 2, "k", "a2")
        a3 = queue.submit("a", 3, "k", "a3")
        b1 = queue.submit("b", 1, "k", "b1")
        c1 = queue.submit("c", 1, "other-key", "c1")
        assert a2.result(1) is SUPERSEDED  # answered at once, never rendered
        stale = queue.submit("a", 2, "k", "late a2")  # older than a3: out of order
        assert stale.result(1) is SUPERSEDED
        gate.set()
        assert first.result(10) == "image of a1"
        assert a3.result(10) == "image of a3" and b1.result(10) == "image of b1"
        assert c1.result(10) == "image of c1"
        assert ("k", ["a3", "b1"]) in calls and ("other-key", ["c1"]) in calls
        assert all("a2" not in payloads for _, payloads in calls)
        stats = queue.stats.as_dict()
        assert stats["superseded"] == 2 and stats["largest_batch"] == 2 and stats["rendered"] == 4
    finally:
        queue.close()


def test_render_queue_gives_a_batch_error_to_each_request_and_keeps_going():
    def render(key, payloads, cancel):
        if "bad" in payloads:
            raise ValueError("no such direction")
        return payloads

    queue = RenderQueue(render)
    try:
        gate: Future = queue.run(time.sleep, 0.2)  # hold the worker so both land in one batch
        bad, good = queue.submit("a", 1, "k", "bad"), queue.submit("b", 1, "k", "ok")
        gate.result(5)
        with pytest.raises(ValueError, match="no such direction"):
            bad.result(5)
        with pytest.raises(ValueError):
            good.result(5)
        assert queue.submit("b", 2, "k", "fine").result(5) == "fine"
        assert queue.run(lambda: 42).result(5) == 42
    finally:
        queue.close()


def test_release_preempts_the_render_of_an_older_position_of_the_same_page_only():
    started: list[str] = []

    def render(key, payloads, cancel):
        started.extend(payloads)
        if not cancel.wait(10):  # a long render that stops at the next U-Net call once cancelled
            return list(payloads)
        raise RenderCancelled

    def wait_started(n: int) -> None:
        deadline = time.monotonic() + 10
        while len(started) < n:
            assert time.monotonic() < deadline
            time.sleep(0.005)

    queue = RenderQueue(render)
    try:
        a1 = queue.submit("a", 1, "k", "a1")
        wait_started(1)
        assert queue.preempt("b", 5) is False  # another page's render is never cancelled
        assert queue.preempt("a", 1) is False  # nor the released position itself
        a2 = queue.submit("a", 2, "k", "a2", preempt=True)
        assert a1.result(10) is SUPERSEDED
        wait_started(2)  # a2 renders next
        assert queue.preempt("a", 3) is True
        assert a2.result(10) is SUPERSEDED
        assert started == ["a1", "a2"]
        assert queue.stats.cancelled_batches == 2 and queue.stats.rendered == 0
    finally:
        queue.close()


def test_explorer_render_stops_at_the_next_unet_call_once_cancelled(server):
    ex = server["explorer"]
    key, job = ex.render_job({"model": MODEL, "version": "latest", "seeds": [0]})
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(RenderCancelled):
        ex.render_batch(key, [job], cancel)
    assert not ex.model.unet._forward_pre_hooks  # the check is removed again
    assert len(ex.render_batch(key, [job], threading.Event())[0]["images"]) == 1


def test_direction_rows_show_a_grade_when_the_manifest_has_one():
    manifest = {
        "directions": [
            {"name": "smile", "kind": "supervised", "units": "raw", "grade": {"score": "A", "by": "x"}},
            {"name": "pc/0", "kind": "pca", "units": "unit"},
        ]
    }
    effects = {"matrix": {"rows": ["smile"], "columns": ["smile"], "effect": [[1.5]], "z": [[4.0]]}}
    rows = direction_rows(manifest, ["previews/pc_0.png"], effects)
    assert rows[0]["grade"] == {"score": "A", "by": "x"} and rows[1]["grade"] is None
    assert rows[0]["effect"] == [1.5] and rows[1]["effect"] is None
    assert rows[0]["preview"] is None and rows[1]["preview"] == "previews/pc_0.png"


# ------------------------------------------------------------------------- the command
def test_default_model_is_toy_only_for_toy_catalogs(catalog, tmp_path):
    from hspace import catalog as hcat
    from hspace.directions import Direction

    assert default_model(hcat.open(str(catalog["path"]))) == "toy"
    other = hcat.open(str(tmp_path / "other"))
    other.publish(
        "faces", [Direction(torch.ones(4, 2, 2), "d")], metadata={"model_id": "google/ddpm-celebahq-256"}
    )
    with pytest.raises(ValueError, match="--model is required.*google/ddpm-celebahq-256"):
        default_model(other)


def test_command_errors_are_one_line_with_exit_2(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli_app, ["explore", str(tmp_path), "--storage-options", "oops"])
    assert res.exit_code == 2 and "Error: --storage-options is not valid JSON" in res.output
    res = runner.invoke(cli_app, ["explore", str(tmp_path), "--storage-options", "[1]"])
    assert res.exit_code == 2 and "--storage-options must be a JSON object" in res.output
    res = runner.invoke(cli_app, ["explore", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "has no models" in res.output
    assert "Traceback" not in res.output


def test_hspace_imports_and_explains_without_the_explore_extra():
    script = (
        "import sys\n"
        "sys.modules['starlette'] = None; sys.modules['uvicorn'] = None\n"
        "import hspace, hspace.catalog\n"
        "from typer.testing import CliRunner\n"
        "from hspace.cli import app\n"
        "r = CliRunner().invoke(app, ['explore', '--help'])\n"
        "assert r.exit_code == 0 and 'Usage' in r.output, r.output\n"
        "r = CliRunner().invoke(app, ['explore', 'catalog'])\n"
        "assert r.exit_code == 1 and \"pip install 'hspace[explore]'\" in r.output, r.output\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.s3
def test_command_serves_an_s3_catalog_on_127_0_0_1_only(catalog, s3_bucket, s3_server):  # noqa: F811
    import fsspec

    url = f"{s3_bucket}/hspace"
    opts = s3_server.storage_options()
    fs = fsspec.filesystem("s3", **opts)
    fs.put(str(catalog["path"]) + "/", url.removeprefix("s3://") + "/", recursive=True)
    cmd = [sys.executable, "-m", "hspace.cli", "explore", url, "--port", "0", "--device", "cpu"]
    cmd += ["--storage-options", json.dumps(opts)]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"with model toy on http://([\d.]+):(\d+)/", line)
        assert match, line + (proc.stdout.read() if proc.poll() is not None else "")  # type: ignore[union-attr]
        host, port = match.group(1), int(match.group(2))
        assert host == "127.0.0.1"
        base = f"http://127.0.0.1:{port}"
        with pytest.raises(OSError):  # nothing listens on the other loopback addresses
            socket.create_connection(("127.0.0.2", port), timeout=2).close()
        overview = get_json(base + "/api/catalog")
        assert overview["catalog"] == url and overview["model"]["label"] == "toy"
        (model,) = overview["models"]
        assert model["name"] == MODEL and model["refs"]["latest"] == catalog["new"]
        info = get_json(base + f"/api/version?model={MODEL}&ref=latest")
        assert info["version"] == catalog["new"] and info["compatible"] and info["sampler"]["steps"] == STEPS
        assert [d["name"] for d in info["directions"]] == catalog["directions"]
        glasses = next(d for d in info["directions"] if d["name"] == "glasses")
        assert glasses["effect"] is not None and glasses["has_sigma"]
        with urllib.request.urlopen(
            base + f"/api/preview/{MODEL}/{catalog['new']}/{glasses['preview']}"
        ) as r:
            png = r.read()
        manifest = fs.cat_file(f"{url.removeprefix('s3://')}/{MODEL}/versions/{catalog['new']}/manifest.json")
        entry = next(f for f in json.loads(manifest)["files"] if f["path"] == glasses["preview"])
        assert hashlib.sha256(png).hexdigest() == entry["sha256"]
        diff = get_json(base + f"/api/diff?model={MODEL}&a={catalog['old']}&b=latest")
        assert set(diff["cosine"]) == {"pca_0", "pca_1", "pca_2"} and "glasses" in diff["added"]
        reply = post_json(
            base + "/api/render",
            {
                "client": "s3",
                "seq": 1,
                "model": MODEL,
                "version": "latest",
                "seeds": [0],
                "edits": {"glasses": 1},
            },
        )
        assert reply["seq"] == 1 and decode(reply["images"][0]).shape == (256, 256, 3)
    finally:
        proc.terminate()
        proc.wait(30)
