"""DDIM inversion: generated samples of a tiny model invert to an x_T that reconstructs them."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_unet
from diffusers import DDPMScheduler

from hspace import Direction, Edit, HSpaceModel, HSpaceSampler
from hspace.inversion import (
    Inversion,
    ddim_invert,
    load_images,
    psnr,
    reconstruct,
    reconstruction_report,
)

STEPS = 10


@pytest.fixture(scope="module")
def model() -> HSpaceModel:
    """The conftest tiny U-Net (random weights) with a milder noise schedule (beta_end 0.005).

    A random U-Net is no denoiser: with the standard schedule (beta_end 0.02, alpha_bar_T ~ 4e-5)
    its DDIM ODE amplifies eps errors by up to 1/sqrt(alpha_bar) and no inversion can undo it
    (measured: 3.7 dB reconstruction vs 3.2 dB from a random x_T). With beta_end 0.005 the same
    network gives a well-conditioned ODE, which is what an inversion test needs.
    """
    config = dict(DDPMScheduler(num_train_timesteps=1000, beta_end=0.005).config)
    return HSpaceModel(build_tiny_unet(), config)


@pytest.fixture(scope="module")
def samples(model) -> torch.Tensor:
    """Generated samples of the model: DDIM eta=0, no x0 clipping, in [0, 1]."""
    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS, clip_sample=False)
    return sampler.sample(list(range(4)), record_h=False).images


@pytest.fixture(scope="module")
def report(model, samples):
    return reconstruction_report(model, samples, STEPS)


def test_inversion_reconstructs_generated_samples(model, samples, report):
    print(report)  # measured at 10 steps: mean 27.7 dB, per image 25.9-28.9 dB
    random_x_T = torch.randn(report.inversion.x_T.shape, generator=torch.Generator().manual_seed(99))
    random_x_T *= report.inversion.x_T.std()  # same scale: only the inversion differs
    baseline = reconstruct(model, Inversion(random_x_T, samples, report.inversion.timesteps, STEPS))
    baseline_psnr = psnr(samples, baseline.images)  # measured ~4.6 dB
    # Bounds from measurements with margin, each catching a broken variant we tried: the x
    # noise level off by one step gives 14-15 dB (caught by min >= 22, 3.9 dB under the lowest
    # measured image); eps always evaluated at t=0 gives mean 24.2 dB (caught by mean >= 26,
    # 1.7 dB under the measured 27.7; the computation is deterministic); and any real inversion
    # must beat reconstructing from a random x_T by far.
    assert report.psnr.min() >= 22.0
    assert report.mean_psnr >= 26.0
    assert report.psnr.min() >= baseline_psnr.max() + 15.0


def test_inversion_records_h_in_sampling_order(model, samples, report):
    inv = report.inversion
    assert inv.x_T.shape == (4, 3, 16, 16)
    assert inv.h.shape == (4, STEPS, *model.h_shape)
    assert inv.timesteps.tolist() == list(range(900, -1, -100))
    # inversion evaluates step i at the less noisy x_{t_(i+1)} with timestep t_i, reconstruction
    # at x_{t_i}: h agrees approximately (measured <= 0.19 relative per step), much closer than
    # the h of another image (rolled batch)
    rec = reconstruct(model, inv)
    rel = (rec.h - inv.h).flatten(2).norm(dim=2) / rec.h.flatten(2).norm(dim=2)
    rel_other = (rec.h.roll(1, 0) - inv.h).flatten(2).norm(dim=2) / rec.h.flatten(2).norm(dim=2)
    assert rel.max() <= 0.3
    assert (rel < rel_other).all()


def test_images_as_tensor_pil_or_paths_agree(model, samples, tmp_path):
    from PIL import Image

    as_uint8 = (samples * 255).round().to(torch.uint8)
    pil = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in as_uint8]
    paths = []
    for i, img in enumerate(pil[:2]):
        paths.append(tmp_path / f"img{i}.png")
        img.save(paths[-1])
    from_tensor = load_images(as_uint8[:2], model.image_shape)
    assert torch.equal(load_images(pil[:2], model.image_shape), from_tensor)
    assert torch.equal(load_images([str(p) for p in paths], model.image_shape), from_tensor)
    big = pil[0].resize((40, 32))
    assert load_images(big, model.image_shape).shape == (1, 3, 16, 16)  # centre crop + resize


def test_bad_images_raise(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_images([tmp_path / "missing.png"], model.image_shape)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_images(torch.full((1, 3, 16, 16), -0.5), model.image_shape)
    with pytest.raises(ValueError, match="shape"):
        load_images(torch.zeros(1, 3, 8, 8), model.image_shape)


def test_edit_of_inverted_images(model, samples, report):
    inv = report.inversion
    d = Direction(vector=torch.randn(*model.h_shape, generator=torch.Generator().manual_seed(1)), name="v")
    unchanged = reconstruct(model, inv, edit=Edit(d, scales=0.0), record_h=False)
    assert torch.equal(unchanged.images, report.reconstruction.images)
    edited = reconstruct(model, inv, edit=Edit(d, scales=3.0), record_h=False)
    assert (edited.images - report.reconstruction.images).abs().max() > 1e-2


def test_psnr():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[1] += 0.1  # mse 0.01 -> 20 dB
    values = psnr(a, b)
    assert values[0] == float("inf") and values[1] == pytest.approx(20.0, abs=1e-4)


def test_inversion_batch_size_does_not_change_x_T(model, samples, report):
    inv = ddim_invert(model, samples, STEPS, batch_size=1, record_h=False)
    assert (inv.x_T - report.inversion.x_T).abs().max() <= 1e-5  # fp32 rounding only
