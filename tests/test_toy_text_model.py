"""The shipped text toy is a StableDiffusionPipeline directory that diffusers loads and runs offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from hspace.classifier import score_images
from hspace.toy import TOY_TEXT_MODEL_DIR, load_toy_classifier, load_toy_text_model, load_toy_text_pipeline
from hspace.toy.captions import tokenizer_files
from hspace.toy.text_train import PREDICTION_TYPES, _images_to_model_range, scheduler_config
from hspace.toy.world import BINARY_FACTORS, make_dataset

SIZE_BUDGET = 15 * 2**20  # bytes, every file of the directory


@pytest.fixture(scope="module")
def pipe():
    return load_toy_text_pipeline()


def test_the_directory_is_a_stable_diffusion_pipeline_without_a_safety_checker():
    index = json.loads((TOY_TEXT_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for name, lib, cls in [
        ("vae", "diffusers", "AutoencoderKL"),
        ("unet", "diffusers", "UNet2DConditionModel"),
        ("scheduler", "diffusers", "DDPMScheduler"),
        ("text_encoder", "transformers", "CLIPTextModel"),
        ("tokenizer", "transformers", "CLIPTokenizer"),
    ]:
        assert index[name] == [lib, cls], name
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False


def test_weights_are_safetensors_only_and_within_the_size_budget():
    files = [p for p in TOY_TEXT_MODEL_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert sorted(p.parent.name for p in weights) == ["text_encoder", "unet", "vae"]
    assert all(p.suffix == ".safetensors" for p in weights), weights
    total = sum(p.stat().st_size for p in files)
    assert total <= SIZE_BUDGET, total


def test_diffusers_loads_it_offline_and_renders_one_image_per_generator(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(
        TOY_TEXT_MODEL_DIR, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    prompts = ["grey hair, glasses", "hat", ""]
    kw = dict(num_inference_steps=4, guidance_scale=4.0, output_type="np")
    gens = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    images = pipe(prompts, generator=gens, **kw).images
    assert images.shape == (3, 32, 32, 3) and np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    alone = pipe(prompts[1:2], generator=[torch.Generator().manual_seed(1)], **kw).images
    np.testing.assert_allclose(alone[0], images[1], atol=1e-4)  # a sample is its seed's, not its batch's


def test_the_shipped_configurations_name_no_local_folder():
    for config in TOY_TEXT_MODEL_DIR.glob("*/*config*.json"):
        assert "_name_or_path" not in json.loads(config.read_text()), config


def test_the_shipped_tokenizer_files_are_the_caption_vocabulary(tmp_path):
    fresh = tokenizer_files(tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (TOY_TEXT_MODEL_DIR / "tokenizer" / name).read_text() == (fresh / name).read_text(), name


def test_the_scheduler_is_ddpm_with_1000_linear_training_steps(pipe):
    config = pipe.scheduler.config
    assert config["prediction_type"] in PREDICTION_TYPES
    for key, value in scheduler_config(config["prediction_type"]).items():
        assert config[key] == value, key


def test_h_space_is_the_mid_block_output_of_64x8x8():
    model = load_toy_text_model()
    assert model.h_shape == (64, 8, 8)
    assert model.capture.module == "mid_block"


def test_the_autoencoder_keeps_every_binary_factor_and_unit_variance_latents(pipe):
    """Reconstructions read like the originals to the classifier; scaled latents have variance ~1."""
    images, _ = make_dataset(range(8_000_000, 8_000_128))
    x = _images_to_model_range(images)
    with torch.no_grad():
        post = pipe.vae.encode(x).latent_dist
        rec = pipe.vae.decode(post.mean).sample
    clf = load_toy_classifier()
    a, b = score_images(clf, (x + 1) / 2), score_images(clf, ((rec + 1) / 2).clamp(0, 1))
    for name in BINARY_FACTORS:
        j = clf.index(name)
        agree = float(((a[:, j] > 0) == (b[:, j] > 0)).float().mean())
        assert agree >= 0.95, (name, agree)
    z = post.sample(torch.Generator().manual_seed(0)) * pipe.vae.config.scaling_factor
    assert 0.8 < float(z.std()) < 1.25


def test_phrase_signal_is_zero_for_a_phrase_against_itself_and_leaves_no_hooks(pipe):
    from hspace.toy.text_evaluate import OPPOSITE_PHRASES, phrase_signal

    assert ("hat", "no hat") in OPPOSITE_PHRASES and ("facing left", "facing right") in OPPOSITE_PHRASES
    assert len(OPPOSITE_PHRASES) == 9  # 7 factors; pose has three phrases, so three pairs
    res = phrase_signal(pipe, [("glasses", "glasses"), ("glasses", "no glasses")], n=4)
    assert res["layers"] == [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    assert res["signal"]["glasses / glasses"] == [0.0] * len(res["layers"])
    assert min(res["signal"]["glasses / no glasses"]) > 0.0
    assert res["encoding_difference"]["glasses / glasses"] == 0.0
    assert res["encoding_difference"]["glasses / no glasses"] > 0.0
    assert all(res["uniform_weight"] <= w <= 1.0 for w in res["largest_weight"])
    assert all(not m._forward_pre_hooks for m in pipe.unet.modules())


def test_the_evaluation_command_reports_a_prompt_on_the_seeds_it_is_given(capsys):
    from hspace.toy.text_evaluate import main

    main(["--n", "2", "--steps", "2", "--prompts", "hat", "--first-seed", "6000000"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["prompt"] == "hat" and report["n"] == 2 and set(report["named"]) == {"hat"}
