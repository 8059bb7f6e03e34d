"""DDIM inversion of real images to x_T, recording h on the way (paper SM Sec. F).

With eta = 0 the DDIM update (paper eq. 2-4, sigma_t = 0) is deterministic, so it can be run
backwards: x at the next noisier timestep t_i is sqrt(a_{t_i}) P + sqrt(1 - a_{t_i}) eps, where
eps = eps_theta(x, t_i) is evaluated at the current, less noisy x (the usual approximation, as in
diffusers' DDIMInverseScheduler) and P is the x0 it predicts. h is recorded at every step in
sampling order, so an inverted trajectory's ``h`` lines up with a sampled one's. Reconstruction
samples DDIM eta = 0 from the inverted x_T without x0 clipping (clipping is not invertible);
edits of real images are the same call with an :class:`~hspace.sampling.Edit`.
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
    resolve_batch_size,
)

if TYPE_CHECKING:
    from PIL import Image

ImageInput = Tensor | Sequence[Any] | str | os.PathLike | Any


@dataclass
class Inversion:
    """x_T [B, 3, H, W] float32 of DDIM-inverted ``images`` [B, 3, H, W] in [0, 1].

    timesteps [T] in sampling order; h [B, T, C, H, W] recorded at step i (timestep t_i) or None;
    x_t [B, T, 3, H, W] the latent at each step's noise level (``x_t[:, 0]`` is x_T) or None.
    """

    x_T: Tensor
    images: Tensor
    timesteps: Tensor
    num_inference_steps: int
    h: Tensor | None = None
    x_t: Tensor | None = None

    def __len__(self) -> int:
        return int(self.x_T.shape[0])


@dataclass
class ReconstructionReport:
    """PSNR [B] (dB) of each image against its reconstruction from the inverted x_T."""

    psnr: Tensor
    inversion: Inversion
    reconstruction: Trajectory

    @property
    def mean_psnr(self) -> float:
        return float(self.psnr.mean())

    def __str__(self) -> str:
        values = ", ".join(f"{v:.2f}" for v in self.psnr.tolist())
        return f"DDIM reconstruction PSNR (dB): mean {self.mean_psnr:.2f}; per image [{values}]"


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
    record_h: bool = True,
    record_x: bool = False,
    h_dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> Inversion:
    """DDIM-invert images (tensor [B, 3, H, W] in [0, 1], PIL images or paths) to x_T, recording h.

    The latent is kept in float32 whatever the model dtype; the U-Net sees it in its dtype.
    """
    x0 = load_images(images, model.image_shape)
    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=num_inference_steps, eta=0.0)
    scheduler = sampler.make_scheduler()
    timesteps = scheduler.timesteps
    n, num_steps = x0.shape[0], len(timesteps)
    batch_size = resolve_batch_size(batch_size, n, model.device)
    pin = model.device.type == "cuda"
    h_buf = _buffer((n, num_steps, *model.h_shape), h_dtype or model.dtype, pin) if record_h else None
    x_buf = _buffer((n, num_steps, *model.image_shape), torch.float32, pin) if record_x else None
    x_T = torch.empty_like(x0)

    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        x = (x0[rows] * 2 - 1).to(model.device)  # [0, 1] -> [-1, 1], the model's data range
        with model.hooks(capture_h=record_h) as hook:
            for i in _progress(reversed(range(num_steps)), progress, "DDIM inversion"):
                t = timesteps[i]
                alpha_next = scheduler.alphas_cumprod[t]  # the noisier level x moves to
                alpha_cur = _alpha_prod_prev(scheduler, t)  # the level x is at now
                eps = model.unet(x.to(model.dtype), t).sample.float()
                if h_buf is not None:
                    h_buf[rows, i].copy_(hook.h, non_blocking=True)
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
    )


def reconstruct(
    model: HSpaceModel,
    inversion: Inversion,
    *,
    edit: Edit | None = None,
    record_h: bool = True,
    batch_size: int | None = None,
    progress: bool = False,
) -> Trajectory:
    """Sample DDIM (eta = 0, no x0 clipping) from the inverted x_T, optionally with an edit."""
    sampler = HSpaceSampler(
        model, sampler="ddim", num_inference_steps=inversion.num_inference_steps, eta=0.0, clip_sample=False
    )
    return sampler.sample(
        None, x_T=inversion.x_T, edit=edit, record_h=record_h, batch_size=batch_size, progress=progress
    )


def psnr(a: Tensor, b: Tensor, max_val: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image of a, b [B, C, H, W] in [0, max_val]; inf if equal."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(max_val**2 / mse)).float()


def reconstruction_report(
    model: HSpaceModel,
    images: ImageInput,
    num_inference_steps: int = 50,
    *,
    batch_size: int | None = None,
    progress: bool = False,
) -> ReconstructionReport:
    """Invert, reconstruct, and report the PSNR of each image against its reconstruction."""
    inversion = ddim_invert(model, images, num_inference_steps, batch_size=batch_size, progress=progress)
    rec = reconstruct(model, inversion, record_h=False, batch_size=batch_size, progress=progress)
    return ReconstructionReport(
        psnr=psnr(inversion.images, rec.images), inversion=inversion, reconstruction=rec
    )
