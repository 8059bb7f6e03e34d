"""DDIM inversion of real images to x_T, recording h on the way (paper SM Sec. F).

With eta = 0 the DDIM update (paper eq. 2-4, sigma_t = 0) is deterministic, so it can be run
backwards: x at the next noisier timestep t_i is sqrt(a_{t_i}) P + sqrt(1 - a_{t_i}) eps, where
eps = eps_theta(x, t_i) is evaluated at the current, less noisy x (the usual approximation, as in
diffusers' DDIMInverseScheduler) and P is the x0 it predicts. h is recorded at every step in
sampling order, so an inverted trajectory's ``h`` lines up with a sampled one's. Reconstruction
samples DDIM eta = 0 from the inverted x_T without x0 clipping (clipping is not invertible);
edits of real images are the same call with an :class:`~hspace.sampling.Edit`.

Every kind of model inverts the same way: images go through the model's ``encode`` (the VAE of a
latent model), the inversion runs in the denoiser's space under the caller's conditioning (a
prompt, class labels; guidance 1 by default, as inversion usually runs) and the reconstruction
samples under the same conditioning and decodes, so the PSNR is measured in image space.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hspace.model import HSpaceModel
from hspace.sampling import (
    Edit,
    HSpaceSampler,
    Trajectory,
    _alpha_prod_prev,
    _buffer,
    _progress,
    epsilon_from_prediction,
    resolve_batch_size,
)

if TYPE_CHECKING:
    from PIL import Image

ImageInput = Tensor | Sequence[Any] | str | os.PathLike | Any


@dataclass
class Inversion:
    """x_T [B, *latent_shape] float32 of DDIM-inverted ``images`` [B, C, H, W] in [0, 1].

    timesteps [T] in sampling order; h [B, T, C, H, W] recorded at step i (timestep t_i) or None;
    x_t [B, T, *latent_shape] the latent at each step's noise level (``x_t[:, 0]`` is x_T) or None.
    prompts, negative_prompts, class_labels and guidance_scale: the conditioning the inversion ran
    under, one entry per image; :func:`reconstruct` samples under the same.
    """

    x_T: Tensor
    images: Tensor
    timesteps: Tensor
    num_inference_steps: int
    h: Tensor | None = None
    x_t: Tensor | None = None
    prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    class_labels: list[int] | None = None
    guidance_scale: float = 1.0

    def __len__(self) -> int:
        return int(self.x_T.shape[0])

    @property
    def conditioning(self) -> dict[str, Any]:
        """The sampler keyword arguments that reproduce the inversion's conditioning."""
        return {
            "prompt": self.prompts,
            "negative_prompt": self.negative_prompts,
            "class_labels": self.class_labels,
            "guidance_scale": self.guidance_scale,
        }


@dataclass
class ReconstructionReport:
    """PSNR [B] (dB) of each image against its reconstruction from the inverted x_T.

    ``psnr`` compares with the input images. For a latent model the VAE alone loses detail, so
    ``vae_psnr`` [B] gives the PSNR of the images' VAE round trip (decode(encode(image))), the best
    any latent inversion can reach, and ``psnr_vs_vae`` [B] that of the reconstruction against it,
    which isolates the DDIM inversion's own error; both are None for a pixel model.
    """

    psnr: Tensor
    inversion: Inversion
    reconstruction: Trajectory
    vae_psnr: Tensor | None = None
    psnr_vs_vae: Tensor | None = None

    @property
    def mean_psnr(self) -> float:
        return float(self.psnr.mean())

    def __str__(self) -> str:
        values = ", ".join(f"{v:.2f}" for v in self.psnr.tolist())
        text = f"DDIM reconstruction PSNR (dB): mean {self.mean_psnr:.2f}; per image [{values}]"
        if self.vae_psnr is not None and self.psnr_vs_vae is not None:
            text += (
                f"; VAE round trip alone {float(self.vae_psnr.mean()):.2f}; reconstruction vs the VAE "
                f"round trip {float(self.psnr_vs_vae.mean()):.2f}"
            )
        return text


def load_images(images: ImageInput, image_shape: Sequence[int]) -> Tensor:
    """Images as float32 [B, C, H, W] in [0, 1] from a tensor, PIL images or file paths.

    Tensors must already have the model's shape ([C, H, W] or [B, C, H, W], float in [0, 1] or
    uint8); PIL images and files are converted to RGB (L for one channel), centre-cropped to the
    model's aspect ratio and resized to its size.
    """
    channels, height, width = (int(s) for s in image_shape)
    if isinstance(images, Tensor):
        x = images.detach().cpu()
        x = x.unsqueeze(0) if x.ndim == 3 else x
        if x.dtype == torch.uint8:
            x = x.float() / 255
        if x.ndim != 4 or tuple(x.shape[1:]) != (channels, height, width):
            raise ValueError(
                f"images tensor has shape {tuple(images.shape)}, expected [B, {channels}, {height}, {width}]"
            )
        if not x.is_floating_point():
            raise ValueError(f"images tensor must be float in [0, 1] or uint8, got {images.dtype}")
        x = x.float()
        if x.numel() and (x.min() < 0 or x.max() > 1 or not torch.isfinite(x).all()):
            raise ValueError(
                f"images must be in [0, 1], got min {float(x.min()):.3f} max {float(x.max()):.3f} "
                "(for [-1, 1] tensors pass (x + 1) / 2)"
            )
        if x.shape[0] == 0:
            raise ValueError("images is empty")
        return x
    items = [images] if isinstance(images, str | os.PathLike) or hasattr(images, "convert") else list(images)
    if not items:
        raise ValueError("images is empty")
    return torch.stack([_pil_to_tensor(_open(item), channels, height, width) for item in items])


def _open(item: Any) -> Image.Image:
    from PIL import Image

    if isinstance(item, str | os.PathLike):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with warnings.catch_warnings():
                # PIL only warns between MAX_IMAGE_PIXELS and twice that: refuse it too
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    img.load()
                    return img.copy()
        except (
            OSError,
            ValueError,
            SyntaxError,
            Image.DecompressionBombWarning,
            Image.DecompressionBombError,
        ) as err:
            # not an image, truncated, or more pixels than PIL.Image.MAX_IMAGE_PIXELS
            raise ValueError(f"{path}: not a readable image ({err})") from None
    if isinstance(item, Image.Image):
        return item
    raise ValueError(f"images must be a tensor, PIL images or paths; got {type(item).__name__}")


def _pil_to_tensor(img: Image.Image, channels: int, height: int, width: int) -> Tensor:
    import numpy as np
    from PIL import Image, ImageOps

    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (width, height):
        img = ImageOps.fit(img, (width, height), method=Image.Resampling.BICUBIC)
    array = np.asarray(img, dtype=np.float32) / 255.0
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@torch.no_grad()
def ddim_invert(
    model: HSpaceModel,
    images: ImageInput,
    num_inference_steps: int = 50,
    *,
    prompt: str | Sequence[str] | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    class_labels: int | Sequence[int] | None = None,
    guidance_scale: float = 1.0,
    record_branch: str = "cond",
    record_h: bool = True,
    record_x: bool = False,
    h_dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> Inversion:
    """DDIM-invert images (tensor [B, C, H, W] in [0, 1], PIL images or paths) to x_T, recording h.

    The images go through :meth:`HSpaceModel.encode` (the VAE for a latent model) and the
    inversion runs in the denoiser's space under the conditioning (a prompt for text models, class
    labels for class-conditional ones), as the sampler takes it. ``guidance_scale`` defaults to 1
    (no guidance), as DDIM inversion usually runs: guidance makes the inverse ODE step much less
    accurate; with a scale > 1 the guided eps is used and h is recorded from ``record_branch``.
    The latent is kept in float32 whatever the model dtype; the denoiser sees it in its dtype.
    """
    x0 = load_images(images, model.image_shape)
    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=num_inference_steps, eta=0.0)
    n = x0.shape[0]
    request = sampler._request(n, prompt, negative_prompt, class_labels, guidance_scale)
    if record_branch not in ("cond", "uncond"):
        raise ValueError(f"record_branch must be 'cond' or 'uncond', got {record_branch!r}")
    scheduler = sampler.make_scheduler()
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"DDIM inversion: unsupported prediction_type {prediction_type!r}")
    timesteps = scheduler.timesteps
    num_steps = len(timesteps)
    batch_size = resolve_batch_size(batch_size, n, model.device)
    pin = model.device.type == "cuda"
    h_buf = _buffer((n, num_steps, *model.h_shape), h_dtype or model.dtype, pin) if record_h else None
    x_buf = _buffer((n, num_steps, *model.latent_shape), torch.float32, pin) if record_x else None
    x_T = torch.empty(n, *model.latent_shape)

    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        cond = model.conditioner.encode(request.rows(rows), rows.stop - rows.start, model.device, model.dtype)
        x = model.encode(x0[rows]).float()  # [0, 1] -> the denoiser's x_0 (2x - 1, or the VAE latent)
        with model.hooks(capture_h=record_h) as hook:
            for i in _progress(reversed(range(num_steps)), progress, "DDIM inversion"):
                t = timesteps[i]
                alpha_next = scheduler.alphas_cumprod[t]  # the noisier level x moves to
                alpha_cur = _alpha_prod_prev(scheduler, t)  # the level x is at now
                x_in = scheduler.scale_model_input(cond.model_input(x), t).to(model.dtype)
                out = cond.guide(model.predict(x_in, t, cond)).float()
                eps = epsilon_from_prediction(out, x, alpha_cur, prediction_type)
                if h_buf is not None:
                    h_buf[rows, i].copy_(hook.h[cond.branch_rows(record_branch)], non_blocking=True)
                pred_x0 = (x - (1 - alpha_cur) ** 0.5 * eps) / alpha_cur**0.5
                x = alpha_next**0.5 * pred_x0 + (1 - alpha_next) ** 0.5 * eps
                if x_buf is not None:
                    x_buf[rows, i].copy_(x, non_blocking=True)
        x_T[rows] = x.cpu()
    if pin:
        torch.cuda.synchronize(model.device)
    return Inversion(
        x_T=x_T,
        images=x0,
        timesteps=timesteps.clone(),
        num_inference_steps=int(num_inference_steps),
        h=h_buf,
        x_t=x_buf,
        prompts=request.prompts,
        negative_prompts=request.negative_prompts,
        class_labels=request.class_labels,
        guidance_scale=float(request.guidance_scale),
    )


def reconstruct(
    model: HSpaceModel,
    inversion: Inversion,
    *,
    edit: Edit | None = None,
    record_h: bool = True,
    record_branch: str = "cond",
    batch_size: int | None = None,
    progress: bool = False,
) -> Trajectory:
    """Sample DDIM (eta = 0, no x0 clipping) from the inverted x_T under the inversion's
    conditioning (same prompts / class labels / guidance scale), optionally with an edit."""
    sampler = HSpaceSampler(
        model, sampler="ddim", num_inference_steps=inversion.num_inference_steps, eta=0.0, clip_sample=False
    )
    return sampler.sample(
        None, x_T=inversion.x_T, edit=edit, record_h=record_h, record_branch=record_branch,
        batch_size=batch_size, progress=progress, **inversion.conditioning,
    )  # fmt: skip


def psnr(a: Tensor, b: Tensor, max_val: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image of a, b [B, C, H, W] in [0, max_val]; inf if equal."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(max_val**2 / mse)).float()


@torch.no_grad()
def vae_round_trip(model: HSpaceModel, images: Tensor) -> Tensor:
    """decode(encode(images)) [B, C, H, W] in [0, 1]: what a latent model can represent at all."""
    return model.decode(model.encode(images)).cpu()


def reconstruction_report(
    model: HSpaceModel,
    images: ImageInput,
    num_inference_steps: int = 50,
    *,
    prompt: str | Sequence[str] | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    class_labels: int | Sequence[int] | None = None,
    guidance_scale: float = 1.0,
    batch_size: int | None = None,
    progress: bool = False,
) -> ReconstructionReport:
    """Invert under the conditioning, reconstruct under the same, and report the PSNR of each
    image against its reconstruction (in image space; for a latent model also against the
    images' VAE round trip, see :class:`ReconstructionReport`)."""
    inversion = ddim_invert(
        model, images, num_inference_steps, prompt=prompt, negative_prompt=negative_prompt,
        class_labels=class_labels, guidance_scale=guidance_scale, batch_size=batch_size, progress=progress,
    )  # fmt: skip
    rec = reconstruct(model, inversion, record_h=False, batch_size=batch_size, progress=progress)
    vae_psnr = psnr_vs_vae = None
    if model.is_latent:
        round_trip = vae_round_trip(model, inversion.images)
        vae_psnr = psnr(inversion.images, round_trip)
        psnr_vs_vae = psnr(round_trip, rec.images)
    return ReconstructionReport(
        psnr=psnr(inversion.images, rec.images), inversion=inversion, reconstruction=rec,
        vae_psnr=vae_psnr, psnr_vs_vae=psnr_vs_vae,
    )  # fmt: skip
