"""The text toy's quick start (configs/quickstart-text.yaml, ``make run-text``) builds a graded
catalog with the real Ray pipeline, and ``hspace explore`` serves it with a prompt box.

The config file itself is built, with :data:`CI_OVERRIDES` shrinking it for the suite (fewer
samples, steps and held-out seeds; every stage and every direction kind kept). The explorer test
drives Debian's headless Chromium on the same catalog (one build per module).
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from hspace.grade import LETTERS
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.config_examples import with_field
from tests.explore_server import start_explorer
from tests.ray_cluster import ray_local  # noqa: F401  (pytest fixture)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart-text.yaml"

#: What the suite changes in the config, and why: the full quick start takes minutes on 2 cores,
#: and most of a small build's time is the stages' fixed cost (actors importing torch and loading
#: the model), so the sample and seed counts are cut as far as the assertions below allow.
#: Everything else (the model, the empty prompt, the classifier and its nine attributes, every
#: aggregate option, the evaluation scales and units) is the file's own. Measured on the shared
#: 2-core machine at load average 5-8: the build 82 s of stages (95 s fixture setup), the module 108 s.
CI_OVERRIDES = {
    "generate.n_samples": 64,  # 13 faces per top / bottom 20% group: grey hair and glasses still separate
    "generate.seeds_per_block": 32,  # two blocks, one per worker
    "sampler.num_inference_steps": 10,  # half the U-Net passes in generate and evaluate
    "pca.steps_per_actor": 5,  # two PCA actors over the 10 steps
    "evaluate.n_seeds": 4,  # held-out seeds per direction and scale
}

#: The disentangled / conditional pair the config asks for (as the unconditional quick start does).
PAIR = ("glasses", "grey_hair")

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def ci_config(root: Path) -> dict:
    """The quick-start config with :data:`CI_OVERRIDES`, writing under ``root``."""
    cfg = yaml.safe_load(CONFIG.read_text())
    for field, value in CI_OVERRIDES.items():
        cfg = with_field(cfg, field, value)
    cfg = with_field(cfg, "storage.run_url", str(root / "run"))
    return with_field(cfg, "catalog.url", str(root / "catalog"))


def _leaves(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_suite_builds_the_config_file_changed_only_by_its_documented_overrides(tmp_path):
    from pipeline.config import validate_config

    file, ci = _leaves(yaml.safe_load(CONFIG.read_text())), _leaves(ci_config(tmp_path))
    changed = {k for k in file.keys() | ci.keys() if file.get(k) != ci.get(k)}
    assert changed == set(CI_OVERRIDES) | {"storage.run_url", "catalog.url"}
    validate_config(ci_config(tmp_path))


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):  # noqa: F811
    """One build of the shrunk quick start; (config dict, catalog url)."""
    from pipeline.build import main

    root = tmp_path_factory.mktemp("text_quickstart")
    cfg = ci_config(root)
    path = root / "quickstart-text.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(path), "--quiet"]) == 0
    return cfg, cfg["catalog"]["url"]


@pytest.fixture(scope="module")
def version(built):
    from hspace import catalog

    cfg, url = built
    return catalog.open(url).version(cfg["catalog"]["model_name"], cfg["catalog"]["ref"])


def grades_of(version) -> dict[str, dict]:
    return {d["name"]: d.get("grade") for d in version.manifest["directions"]}


def test_the_version_is_published_under_its_ref_and_every_file_verifies(built, version):
    from hspace import catalog

    cfg, url = built
    cat = catalog.open(url)
    assert cat.models() == [cfg["catalog"]["model_name"]]
    assert cat.resolve(cfg["catalog"]["model_name"], "latest") == version.version
    version.verify()  # raises on any file whose sha256 differs from the manifest's
    info = version.model_info
    assert info["kind"] == "text" and info["h_shape"] == [64, 8, 8] and info["image_shape"] == [3, 32, 32]
    assert version.conditioning["prompts"] == [""] and version.conditioning["guidance_scale"] == 1.0


def test_every_toy_attribute_has_graded_supervised_directions(version):
    from hspace.toy import TOY_CLASSIFIER_DIR

    attributes = json.loads((TOY_CLASSIFIER_DIR / "config.json").read_text())["attributes"]
    grades = grades_of(version)
    names = set(grades)
    assert version.effects()["matrix"]["columns"] == attributes  # the config annotates every attribute
    for attribute in attributes:
        for name in (attribute, f"{attribute}_boundary", f"random_{attribute}_0"):
            assert name in names, (name, sorted(names))
            grade = grades[name]
            assert grade is not None and grade["letter"] in LETTERS, (name, grade)
        assert grades[attribute]["own"]["attribute"] == attribute
    for attribute in PAIR:
        for name in (f"{attribute}_disentangled", f"{attribute}_conditional"):
            assert grades.get(name) is not None, (name, sorted(names))
            assert grades[name]["own"]["attribute"] == attribute


@pytest.mark.parametrize("attribute", PAIR)
def test_grey_hair_and_glasses_directions_grade_better_than_every_random_baseline(version, attribute):
    """The supervised direction moves its attribute more than any random edit of the same norm
    does, passes (A..C), has a letter no worse and a score above every random baseline's.

    (A random baseline is graded by the attribute it moves most, so one of them can reach C or
    D by chance; the supervised ones may be lowered one letter for leakage, as glasses and grey
    hair move each other in the toy world.)"""
    grades = grades_of(version)
    randoms = {n: g for n, g in grades.items() if n.startswith("random_")}
    assert randoms
    matrix = version.effects()["matrix"]
    column = matrix["columns"].index(attribute)
    effect = dict(zip(matrix["rows"], (row[column] for row in matrix["effect"]), strict=True))
    own = grades[attribute]
    assert not {"wrong_sign", "within_random"} & set(own["flags"]), own
    assert effect[attribute] > max(abs(effect[n]) for n in randoms), (effect[attribute], attribute)
    assert own["pass"], own
    letters = {n: g["letter"] for n, g in randoms.items()}
    assert LETTERS.index(own["letter"]) <= min(LETTERS.index(x) for x in letters.values()), (own, letters)
    assert own["score"] > max(g["score"] for g in randoms.values()), own


def test_hspace_explore_defaults_to_the_text_toy_for_this_catalog(built):
    from hspace import catalog
    from hspace.explore.command import default_model

    assert default_model(catalog.open(built[1])) == "toy-text"


# ----------------------------------------------------------------------------- the explorer


@pytest.fixture(scope="module")
def served(built):
    from hspace import catalog
    from hspace.explore.explorer import Explorer
    from hspace.toy import load_toy_text_model

    explorer = Explorer(catalog.open(built[1]), load_toy_text_model(), model_label="toy-text")
    base, server, thread = start_explorer(explorer)
    yield base
    server.should_exit = True
    thread.join(10)


def decode(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def test_the_explorer_renders_a_typed_prompt_and_shows_grade_letters(served, version):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    grades = grades_of(version)
    prompt = "grey hair, glasses"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(120_000)  # renders on a loaded 2-core machine
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        sent: list[str] = []
        page.on(
            "request", lambda r: sent.append(r.post_data or "") if r.url.endswith("/api/render") else None
        )
        page.goto(served + "/")
        page.wait_for_function("Number(document.querySelector('#result').dataset.seq) >= 1")
        assert page.locator("#prompt").is_visible() and page.locator("#text-conditioning").is_visible()
        first = decode(page.eval_on_selector("#result img", "i => i.src"))
        # the directions table: every graded direction's row shows its letter
        cells = dict(
            page.eval_on_selector_all(
                "tr[data-name]", "rs => rs.map(r => [r.dataset.name, r.querySelector('td.grade').innerText])"
            )
        )
        assert set(cells) == set(grades)
        for name, text in cells.items():
            assert text.split()[0] == grades[name]["letter"], (name, text)
        page.fill("#prompt", prompt)
        page.dispatch_event("#prompt", "change")
        page.wait_for_function("Number(document.querySelector('#result').dataset.seq) >= 2")
        assert "error" not in (page.locator("#status").get_attribute("class") or "")
        typed = decode(page.eval_on_selector("#result img", "i => i.src"))
        browser.close()
    assert not errors, errors
    assert any(f'"prompt":"{prompt}"' in body.replace(": ", ":") for body in sent), sent
    assert typed.shape == first.shape and typed.shape[0] >= 32 and typed.shape[2] == 3
    assert np.abs(typed.astype(int) - first.astype(int)).max() > 1  # the prompt changed the image
