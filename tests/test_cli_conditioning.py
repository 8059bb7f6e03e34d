"""The ``hspace`` command on text- and class-conditional models: prompts, negative prompts, guidance,
class labels and capture points reach the sampler, and what a model cannot take exits 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from hspace.cli import app
from hspace.directions import Direction

pytest.importorskip("transformers")

runner = CliRunner()
STEPS = "2"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_sample_takes_prompts_cycled_over_seeds_and_records_them(tiny_pipeline_dirs, tmp_path):
    out, h = tmp_path / "grid.png", tmp_path / "h.safetensors"
    result = invoke(
        "sample", "--model", tiny_pipeline_dirs["text"], "--seeds", "0-2", "--steps", STEPS, "--sampler",
        "euler_a", "--prompt", "a cat", "--prompt", "a dog", "--negative-prompt", "blurry", "--guidance", "3",
        "--out", out, "--save-h", h,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.is_file()
    with safe_open(str(h), "pt") as f:
        meta = f.metadata()
        assert tuple(f.get_tensor("h").shape) == (3, 2, 32, 4, 4)
    conditioning = json.loads(meta["conditioning"])
    assert conditioning["prompts"] == ["a cat", "a dog", "a cat"]
    assert conditioning["negative_prompts"] == ["blurry"] * 3
    assert conditioning["guidance_scale"] == 3.0 and conditioning["record_branch"] == "uncond"
    assert json.loads(meta["model"])["kind"] == "text"


def test_sample_at_another_capture_point(tiny_pipeline_dirs, tmp_path):
    h = tmp_path / "h.safetensors"
    result = invoke(
        "sample", "--model", tiny_pipeline_dirs["text"], "--seeds", "0", "--steps", STEPS, "--capture",
        "up_blocks.0", "--out", tmp_path / "g.png", "--save-h", h,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with safe_open(str(h), "pt") as f:
        assert tuple(f.get_tensor("h").shape) == (1, 2, 32, 8, 8)
        assert json.loads(f.metadata()["model"])["capture"] == "up_blocks.0"


def test_class_labels_on_dit(tiny_pipeline_dirs, tmp_path):
    result = invoke(
        "sample", "--model", tiny_pipeline_dirs["dit"], "--seeds", "0-1", "--steps", STEPS, "--sampler", "ddim",
        "--class-labels", "3,9", "--guidance", "4", "--out", tmp_path / "g.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "kind,args,message",
    [
        ("latent", ["--prompt", "a cat"], "takes no prompt"),
        ("dit", [], "class_labels are required"),
        ("class", ["--class-labels", "1", "--guidance", "3"], "no unconditional branch"),
        ("text", ["--capture", "middle_block"], "no module 'middle_block'"),
    ],
)
def test_conditioning_a_model_cannot_take_exits_2_naming_it(
    tiny_pipeline_dirs, tmp_path, kind, args, message
):
    result = invoke(
        "sample", "--model", tiny_pipeline_dirs[kind], "--seeds", "0", "--steps", STEPS, *args,
        "--out", tmp_path / "g.png",
    )  # fmt: skip
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_edit_and_swap_with_a_prompt(tiny_pipeline_dirs, tmp_path):
    direction = Direction(torch.randn(32, 4, 4) * 3, name="d", capture="mid_block")
    direction.save(str(tmp_path / "d.safetensors"))
    result = invoke(
        "edit", "--model", tiny_pipeline_dirs["text"], "--direction", tmp_path / "d.safetensors", "--seeds", "0-1",
        "--scales=-1,0,1", "--steps", STEPS, "--sampler", "ddim", "--prompt", "grey hair", "--guidance", "2",
        "--branches", "cond", "--out", tmp_path / "strip.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = invoke(
        "swap", "--model", tiny_pipeline_dirs["text"], "--seeds-a", "0-1", "--seeds-b", "2-3", "--steps", STEPS,
        "--prompt", "a cat", "--guidance", "2", "--out", tmp_path / "swap.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "swap.png").is_file() and (tmp_path / "strip.png").is_file()


def test_invert_encodes_with_the_vae_and_inverts_under_the_prompt(tiny_pipeline_dirs, tmp_path):
    from PIL import Image

    image = tmp_path / "face.png"
    Image.fromarray((torch.rand(16, 16, 3) * 255).to(torch.uint8).numpy()).save(image)
    save = tmp_path / "inv.safetensors"
    result = invoke(
        "invert", image, "--model", tiny_pipeline_dirs["text"], "--steps", STEPS, "--prompt", "a photo of a face",
        "--out", tmp_path / "inv.png", "--save", save,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "PSNR" in result.output and "VAE round trip" in result.output
    with safe_open(str(save), "pt") as f:
        assert tuple(f.get_tensor("x_T").shape) == (1, 4, 8, 8)  # a latent, not an image


def test_a_catalog_versions_conditioning_is_given_to_each_seed_as_the_build_gave_it():
    from hspace.cli import catalog_conditioning

    recorded = {"prompts": ["a cat", "a dog", "a hat"], "negative_prompt": ["blurry"], "guidance_scale": 3.0}
    assert catalog_conditioning(recorded, [4, 5]) == {
        "prompt": ["a dog", "a hat"],  # seed s got prompts[s % 3]
        "negative_prompt": ["blurry", "blurry"],
        "guidance_scale": 3.0,
    }
    assert catalog_conditioning({"class_labels": [7, 9]}, [0, 1, 2]) == {"class_labels": [7, 9, 7]}
    assert catalog_conditioning({}, [0]) == {}


def test_model_toy_text_names_the_shipped_text_toy(tmp_path):
    from hspace.toy import TOY_TEXT_MODEL_DIR

    h = tmp_path / "h.safetensors"
    args = ["--seeds", "0", "--steps", STEPS, "--prompt", "grey hair", "--guidance", "1"]
    result = invoke("sample", "--model", "toy-text", *args, "--out", tmp_path / "a.png", "--save-h", h)
    assert result.exit_code == 0, result.output
    by_path = tmp_path / "b.safetensors"
    result = invoke(
        "sample", "--model", TOY_TEXT_MODEL_DIR, *args, "--out", tmp_path / "b.png", "--save-h", by_path
    )
    assert result.exit_code == 0, result.output
    with safe_open(str(h), "pt") as a, safe_open(str(by_path), "pt") as b:
        assert json.loads(a.metadata()["conditioning"])["prompts"] == ["grey hair"]  # a text model
        assert tuple(a.get_tensor("h").shape) == (1, 2, 64, 8, 8)
        torch.testing.assert_close(a.get_tensor("h"), b.get_tensor("h"), rtol=0, atol=0)  # the same model
