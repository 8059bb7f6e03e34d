"""The explorer on text- and class-conditional models: a prompt box and a class picker that reach
the sampler, and requests the loaded model cannot take refused by name (400)."""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.explore_server import start_explorer

pytest.importorskip("transformers")

STEPS = 3


def publish_one_direction(url: str, model) -> str:
    """A catalog version for ``model`` holding one random direction (sigma per step)."""
    from hspace import HSpaceSampler
    from hspace import catalog as hcat
    from hspace.directions import Direction

    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS)
    g = torch.Generator().manual_seed(0)
    vector = torch.randn(STEPS, *model.h_shape, generator=g)
    vector = vector / vector.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    d = Direction(
        vector, name="wobble", kind="custom", sigma=torch.full((STEPS,), 4.0), timesteps=sampler.timesteps,
        model_fingerprint=model.fingerprint, capture=model.capture.spec,
    )  # fmt: skip
    meta = {"model_id": "tiny", "model_fingerprint": model.fingerprint,
            "sampler": {"kind": "ddim", "num_inference_steps": STEPS, "eta": 0.0}}  # fmt: skip
    return hcat.open(url).publish("tiny", [d], metadata=meta)


@pytest.fixture(scope="module", params=["text", "class"])
def served(request, tiny_pipeline_dirs, tmp_path_factory):
    from hspace import HSpaceModel
    from hspace import catalog as hcat
    from hspace.explore.explorer import Explorer

    model = HSpaceModel.from_pretrained(tiny_pipeline_dirs[request.param])
    url = str(tmp_path_factory.mktemp("explore-cond") / "catalog")
    version = publish_one_direction(url, model)
    explorer = Explorer(hcat.open(url), model, model_label=request.param)
    base, server, thread = start_explorer(explorer)
    yield {"kind": request.param, "url": base, "version": version, "explorer": explorer}
    server.should_exit = True
    thread.join(10)


def post(url: str, body: dict) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def pixels(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))), dtype=np.float64)


_seq = iter(range(1, 10**6))


def render(served, **extra):
    body = {"client": "test", "seq": next(_seq), "model": "tiny", "version": served["version"], "seeds": [0],
            "edits": {}, **extra}  # fmt: skip
    return post(served["url"] + "/api/render", body)


def test_the_catalog_overview_says_what_the_model_is_conditioned_on(served):
    with urllib.request.urlopen(served["url"] + "/api/catalog", timeout=30) as r:
        model = json.loads(r.read())["model"]
    assert model["kind"] == served["kind"] and model["capture"] == "mid_block"
    assert model["conditioning"]["conditioning"] == served["kind"]


def test_the_prompt_or_class_label_changes_the_render(served):
    if served["kind"] == "text":
        a, b = (
            render(served, prompt="a photo of a cat", guidance=3.0),
            render(served, prompt="grey hair", guidance=3.0),
        )
    else:
        a, b = render(served, class_label=1), render(served, class_label=8)
    assert a[0] == b[0] == 200, (a, b)
    assert np.abs(pixels(a[1]["images"][0]) - pixels(b[1]["images"][0])).max() > 1


def test_conditioning_the_model_cannot_take_is_a_400_naming_it(served):
    if served["kind"] == "text":
        cases = [({"class_label": 3}, "takes no class label"), ({"prompt": 7}, "prompt must be a string"),
                 ({"guidance": 99}, "guidance must be in")]  # fmt: skip
    else:
        cases = [({"prompt": "a cat"}, "takes no prompt"), ({"class_label": 10}, "out of range"),
                 ({"guidance": 3.0}, "no unconditional branch")]  # fmt: skip
    for extra, message in cases:
        code, reply = render(served, **extra)
        assert code == 400 and message in json.dumps(reply), (extra, code, reply)


def test_the_page_shows_a_prompt_box_for_text_models_and_a_class_picker_for_class_models(served):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(served["url"] + "/")
        page.wait_for_function("Number(document.querySelector('#result').dataset.seq) >= 1")
        text_box, class_box = page.locator("#text-conditioning"), page.locator("#class-conditioning")
        if served["kind"] == "text":
            assert text_box.is_visible() and not class_box.is_visible()
            assert page.locator("#guidance").input_value() == "7.5"
            page.fill("#prompt", "grey hair glasses")
            page.dispatch_event("#prompt", "change")
        else:
            assert class_box.is_visible() and not text_box.is_visible()
            page.fill("#class-label", "4")
            page.dispatch_event("#class-label", "change")
        page.wait_for_function("Number(document.querySelector('#result').dataset.seq) >= 2")
        assert "error" not in (page.locator("#status").get_attribute("class") or "")
        browser.close()
