"""The text toy's training is seeded and resumes exactly where it stopped, in either phase."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hspace.sampling import epsilon_from_prediction
from hspace.toy.text_train import (
    add_pooled_text,
    build_denoiser,
    latent_scaling_factor,
    main,
    prediction_target,
    scheduler_config,
    train,
    v_loss_weights,
)
from hspace.toy.train import min_snr_weights

# a few tiny runs (2 autoencoder + 3 denoiser steps each, the export included) take over 20 s here
slow = pytest.mark.slow

TINY = dict(vae_steps=2, steps=3, batch_size=2, vae_batch_size=2, n_images=8, warmup=2, checkpoint_every=100)
COMPONENTS = (
    "vae/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


def _weights(export_dir) -> dict[str, torch.Tensor]:
    return {f"{c}:{k}": v for c in COMPONENTS for k, v in load_file(str(export_dir / c)).items()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return _weights(train(tmp_path_factory.mktemp("straight"), **TINY))


@slow
@pytest.mark.parametrize("stop_after", [1, 3], ids=["in_the_autoencoder_phase", "in_the_denoiser_phase"])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, straight, stop_after):
    train(tmp_path, stop_after=stop_after, **TINY)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == stop_after
    resumed = _weights(train(tmp_path, **TINY))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 5
    assert resumed.keys() == straight.keys()
    for k in straight:  # all weights, EMA, optimisers and per-step draws resume: equal to rounding
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6, msg=k)


@slow
def test_a_different_seed_trains_different_weights(tmp_path, straight):
    other = _weights(train(tmp_path, seed=1, **TINY))
    assert any(not torch.equal(other[k], straight[k]) for k in straight)


def test_the_latent_scaling_factor_gives_unit_variance_latents():
    g = torch.Generator().manual_seed(0)
    mean = 3.0 * torch.randn(2000, 4, 4, 4, generator=g)
    std = torch.full_like(mean, 4.0)
    sampled = mean + std * torch.randn(mean.shape, generator=g)
    assert abs(float(sampled.std()) * latent_scaling_factor(mean, std) - 1.0) < 0.01  # 0.2% sampling error


def test_a_corrupt_checkpoint_is_named(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.pt"):
        train(tmp_path, **TINY)


@pytest.mark.parametrize("flag", ["--steps", "--vae-steps", "--batch-size", "--n-images"])
def test_the_cli_refuses_a_non_positive_count_before_any_work(tmp_path, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "run"), flag, "0"])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@slow
def test_a_run_from_an_export_trains_the_denoiser_only_and_resumes(tmp_path, straight, tmp_path_factory):
    """``init``: no autoencoder phase, the export's autoencoder and scaling factor kept, the text
    path at its own learning rate; interrupted and resumed, it ends with the weights of a straight run."""
    from diffusers import AutoencoderKL

    init = train(tmp_path_factory.mktemp("init"), **TINY)
    tiny = {k: v for k, v in TINY.items() if k != "vae_steps"}
    straight_from_init = _weights(train(tmp_path / "a", init=init, text_lr=1e-2, **tiny))
    assert torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["step"] == 3
    before = _weights(init)
    vae = [k for k in before if k.startswith("vae/")]
    assert all(torch.equal(straight_from_init[k], before[k]) for k in vae)  # the autoencoder stays frozen
    assert any(not torch.equal(straight_from_init[k], before[k]) for k in before if "attn2" in k)
    scale = AutoencoderKL.load_config(init / "vae")["scaling_factor"]
    assert AutoencoderKL.load_config(tmp_path / "a" / "pipeline" / "vae")["scaling_factor"] == scale
    for part in ("vae", "unet"):  # the export names no local folder it was trained from
        assert "_name_or_path" not in (tmp_path / "a" / "pipeline" / part / "config.json").read_text(), part
    train(tmp_path / "b", init=init, text_lr=1e-2, stop_after=2, **tiny)
    resumed = _weights(train(tmp_path / "b", init=init, text_lr=1e-2, **tiny))
    for k in straight_from_init:
        torch.testing.assert_close(resumed[k], straight_from_init[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_run_from_a_directory_that_is_not_an_export_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not an exported pipeline"):
        train(tmp_path / "run", init=tmp_path, **TINY)


def test_the_v_target_is_the_noise_the_library_reads_back():
    """Training's v target, turned back into noise by the sampler's conversion, is the noise drawn."""
    g = torch.Generator().manual_seed(0)
    latent, noise = torch.randn(6, 4, 4, 4, generator=g), torch.randn(6, 4, 4, 4, generator=g)
    alpha_bar = torch.tensor([0.9999, 0.9, 0.5, 0.1, 1e-2, 1e-4]).view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latent + (1 - alpha_bar).sqrt() * noise
    v = prediction_target(noise, latent, alpha_bar, "v_prediction")
    torch.testing.assert_close(epsilon_from_prediction(v, noisy, alpha_bar, "v_prediction"), noise)
    assert torch.equal(prediction_target(noise, latent, alpha_bar, "epsilon"), noise)


def test_the_v_weights_keep_the_high_noise_steps_where_min_snr_drops_them():
    """In terms of the clean latent's error, Min-SNR weighs a step by min(SNR, gamma), which
    vanishes at high noise; the v weights by min(SNR + 1, gamma), at least 1."""
    alpha_bar = torch.tensor([1e-4, 1e-2, 0.5, 0.99, 0.9999])
    snr = alpha_bar / (1 - alpha_bar)
    clean_weight_v = v_loss_weights(alpha_bar, 5.0) * (snr + 1)
    clean_weight_eps = min_snr_weights(alpha_bar, 5.0) * snr
    torch.testing.assert_close(clean_weight_v, torch.minimum(snr + 1, torch.tensor(5.0)))
    assert clean_weight_v.min() >= 1.0 - 1e-6 and clean_weight_v.max() <= 5.0 + 1e-4
    assert clean_weight_eps[0] < 1e-3
    assert torch.equal(v_loss_weights(alpha_bar, 0.0), torch.ones(5))


@slow
def test_a_v_prediction_run_exports_a_v_prediction_pipeline_that_diffusers_runs(tmp_path, tmp_path_factory):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    init = train(tmp_path_factory.mktemp("init-eps"), **TINY)
    tiny = {k: v for k, v in TINY.items() if k != "vae_steps"}
    export = train(tmp_path / "v", init=init, prediction_type="v_prediction", **tiny)
    assert DDPMScheduler.load_config(export / "scheduler")["prediction_type"] == "v_prediction"
    pipe = StableDiffusionPipeline.from_pretrained(
        export, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe("hat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert image.images.shape == (1, 3, 32, 32) and torch.isfinite(image.images).all()


def test_an_unknown_prediction_type_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "run"), "--prediction-type", "sample"])
    assert e.value.code == 2
    assert "--prediction-type" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="prediction_type"):
        train(tmp_path / "run", prediction_type="x0", **TINY)
    assert not (tmp_path / "run").exists()
    assert scheduler_config("v_prediction")["prediction_type"] == "v_prediction"


def test_adding_the_pooled_caption_path_changes_nothing_until_it_is_trained():
    unet, _ = build_denoiser(seed=3)
    grown = add_pooled_text(unet)
    assert grown.config.addition_embed_type == "text"
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 32, 64, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=text).sample
        after = grown(x, t, encoder_hidden_states=text).sample
    assert torch.equal(before, after)
    with torch.no_grad():  # once the path is open, the caption reaches the timestep embedding
        grown.add_embedding.norm2.weight.fill_(1.0)
        assert not torch.equal(grown(x, t, encoder_hidden_states=text).sample, before)
    with pytest.raises(ValueError, match="addition_embed_type"):
        add_pooled_text(grown)


@slow
def test_a_pooled_caption_run_from_an_export_without_it_resumes_and_hspace_loads_it(
    tmp_path, tmp_path_factory
):
    from diffusers import UNet2DConditionModel

    from hspace import HSpaceModel, HSpaceSampler

    init = train(tmp_path_factory.mktemp("init-plain"), **TINY)
    tiny = {k: v for k, v in TINY.items() if k != "vae_steps"}
    kw = dict(init=init, pooled_text=True, prediction_type="v_prediction", text_lr=1e-2, **tiny)
    straight = _weights(train(tmp_path / "a", **kw))
    assert any(k.startswith("unet/diffusion_pytorch_model.safetensors:add_embedding.") for k in straight)
    assert (
        UNet2DConditionModel.load_config(tmp_path / "a" / "pipeline" / "unet")["addition_embed_type"]
        == "text"
    )
    train(tmp_path / "b", stop_after=2, **kw)
    resumed = _weights(train(tmp_path / "b", **kw))
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6, msg=k)
    model = HSpaceModel.from_pretrained(tmp_path / "a" / "pipeline")
    out = HSpaceSampler(model, sampler="ddim", num_inference_steps=2).sample(
        [0], prompt="hat", guidance_scale=2.0
    )
    assert out.h.shape == (1, 2, 64, 8, 8) and torch.isfinite(out.images).all()
