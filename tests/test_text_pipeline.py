"""The Ray pipeline on a text-conditional model, end to end: a tiny Stable Diffusion pipeline saved
to disk, prompts cycled over the seeds, h stored at a subset of the steps, a catalog published,
and a direction from it applied to the model through the sampler with a prompt.

The toy attribute classifier scores the tiny model's 16x16 images resized to its 32x32 input
(``hspace.classifier.score_images`` resizes any 3-channel image), so no special model size is needed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tests.ray_cluster import ray_local  # noqa: F401  (pytest fixture)
from tests.tiny_pipelines import save

PROMPTS = ["a photo of a face", "a photo of a smiling person"]
STEPS = 4
STORED = [0, 2, 3]


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory) -> Path:
    return save("text", tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def built(tiny_sd_dir, tmp_path_factory, ray_local):  # noqa: F811
    """One build of the whole pipeline on the tiny SD model; (config path, catalog url, run url, seconds)."""
    from pipeline.build import main

    root = tmp_path_factory.mktemp("text_build")
    config = {
        "name": "tiny-sd",
        "model": {
            "source": str(tiny_sd_dir),
            "prompts": PROMPTS,
            "negative_prompt": "blurry",
            "guidance_scale": 3.0,
            "record_branch": "cond",
        },
        "sampler": {"kind": "ddim", "num_inference_steps": STEPS},
        "generate": {"n_samples": 16, "batch_size": 8, "seeds_per_block": 8, "capture_steps": STORED},
        "resources": {"workers": 1},
        "storage": {"run_url": str(root / "run")},
        "catalog": {"url": str(root / "catalog"), "model_name": "tiny-sd"},
        "pca": {"n_components": 4},
        "annotate": {"classifier": "toy", "attributes": ["glasses", "hat"]},
        "aggregate": {"quantile": 0.25, "random_baselines": 1},
        "evaluate": {"seed_start": 1000, "n_seeds": 2, "scales": [-1.0, 1.0]},
        "jacobian": [{"name": "jac", "seed": 0, "step": 1, "k": 2}],
    }
    path = root / "tiny-sd.yaml"
    path.write_text(yaml.safe_dump(config))
    t0 = time.perf_counter()
    assert main(["--config", str(path)]) == 0
    return path, str(root / "catalog"), root / "run", time.perf_counter() - t0


pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_manifest_records_kind_capture_shapes_and_conditioning(built):
    from hspace import catalog

    _, url, _, seconds = built
    version = catalog.open(url).version("tiny-sd")
    info = version.model_info
    assert info["kind"] == "text" and info["pipeline_class"] == "StableDiffusionPipeline"
    assert info["capture"] == "mid_block"
    assert info["h_shape"] == [32, 4, 4] and info["latent_shape"] == [4, 8, 8]
    assert info["image_shape"] == [3, 16, 16]
    cond = version.conditioning
    assert cond["conditioning"] == "text" and cond["prompts"] == PROMPTS
    assert cond["negative_prompt"] == ["blurry"] and cond["guidance_scale"] == 3.0
    assert cond["record_branch"] == "cond"
    assert version.manifest["sampler"]["scheduler"] == "DDIMScheduler"
    assert version.manifest["sampler"]["capture_steps"] == STORED
    print(f"end-to-end text-model build: {seconds:.1f} s")


def test_samples_shards_record_each_seeds_prompt(built):
    _, _, run, _ = built
    shards = sorted((run / "samples").glob("*.parquet"))
    assert shards
    for shard in shards:
        table = pq.read_table(shard)
        seeds = table.column("seed").to_pylist()
        assert table.column("prompt").to_pylist() == [PROMPTS[s % len(PROMPTS)] for s in seeds]
        assert set(table.column("guidance_scale").to_pylist()) == {3.0}


def test_only_the_configured_steps_are_stored(built):
    _, _, run, _ = built
    stored = sorted(int(p.name.split("=")[1]) for p in (run / "activations").iterdir())
    assert stored == STORED


def test_directions_record_the_capture_point_and_are_zero_at_unstored_steps(built):
    from hspace import catalog

    _, url, _, _ = built
    directions = catalog.open(url).version("tiny-sd").directions()
    assert {"glasses", "hat", "pca_0"} <= set(directions)
    jacobian = [d for d in directions.values() if d.kind == "jacobian"]
    assert len(jacobian) == 2, "the Jacobian at seed 0, step 1 under seed 0's prompt and guidance"
    assert all(d.provenance.get("prompt") == PROMPTS[0] for d in jacobian), jacobian[0].provenance
    for d in directions.values():
        assert d.capture == "mid_block"
    glasses = directions["glasses"]
    assert glasses.vector.shape == (STEPS, 32, 4, 4)
    assert float(glasses.vector[1].abs().max()) == 0.0  # step 1 is not stored
    assert all(float(glasses.vector[s].norm()) > 0 for s in STORED)


def test_a_catalog_direction_edits_the_model_under_a_prompt(built, tiny_sd_dir):
    from hspace import catalog
    from hspace.model import HSpaceModel
    from hspace.sampling import Edit, HSpaceSampler

    _, url, _, _ = built
    direction = catalog.open(url).version("tiny-sd").direction("glasses")
    model = HSpaceModel.from_pretrained(tiny_sd_dir)
    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS)
    conditioning = {"prompt": PROMPTS[0], "negative_prompt": "blurry", "guidance_scale": 3.0}
    plain = sampler.sample([5, 6], record_h=False, **conditioning).images
    edit = Edit(direction, scales=4.0, units="sigma")
    edited = sampler.sample([5, 6], record_h=False, edit=edit, **conditioning).images
    assert torch.isfinite(edited).all()
    assert float((edited - plain).abs().max()) > 1e-3  # the edit changes the images
    again = sampler.sample([5, 6], record_h=False, edit=Edit(direction, scales=0.0), **conditioning).images
    torch.testing.assert_close(again, plain, atol=1e-5, rtol=0)  # scale 0 is no edit


def test_edit_from_the_catalog_renders_each_seed_under_the_prompt_the_build_gave_it(
    built, tiny_sd_dir, tmp_path
):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from hspace.cli import GRID_KEY, app
    from hspace.model import HSpaceModel
    from hspace.sampling import HSpaceSampler

    _, url, _, _ = built
    out = tmp_path / "strip.png"
    args = ["edit", "--catalog", url, "--name", "glasses", "--model", str(tiny_sd_dir), "--seeds", "0-1",
            "--scales", "0", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    sampler = HSpaceSampler(
        HSpaceModel.from_pretrained(tiny_sd_dir), sampler="ddim", num_inference_steps=STEPS
    )
    plain = sampler.sample([0, 1], prompt=PROMPTS[:2], negative_prompt="blurry", guidance_scale=3.0).images
    other = sampler.sample([0, 1], prompt=PROMPTS[1::-1], negative_prompt="blurry", guidance_scale=3.0).images
    image = Image.open(out)
    lay = json.loads(image.text[GRID_KEY])
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    (ch, cw), pad, scale = lay["cell"], lay["pad"], lay["scale"]
    for row in range(2):  # one row per seed, one column (scale 0): the seed's unedited render
        y, x = lay["top"] + pad + row * (ch + pad), lay["left"] + pad
        cell = pixels[y : y + ch : scale, x : x + cw : scale]
        want = (plain[row].permute(1, 2, 0).numpy() * 255).round()
        assert np.abs(cell - want).max() <= 1, f"seed {row} was not rendered under prompt {PROMPTS[row]!r}"
        assert np.abs(cell - (other[row].permute(1, 2, 0).numpy() * 255).round()).max() > 1
