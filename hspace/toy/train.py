"""Train the toy DDPM of the built-in test bed on freshly generated faces.

Seeded and resumable: a checkpoint (model, EMA model, optimiser, step) is written every
``checkpoint_every`` steps with ``torch.save`` and read back with ``weights_only=True``, and every
step draws its batch from a generator seeded by (seed, step), so a resumed run continues exactly as
an uninterrupted one would (the shipped weights predate this and used one stream per run). The shipped
artefact is the EMA U-Net saved with ``save_pretrained`` (safetensors) together with its scheduler,
in ``DDPMPipeline`` layout, so :class:`hspace.model.HSpaceModel` loads it like any diffusers model.

Run ``python -m hspace.toy.train --out runs/toy-ddpm --steps 3000`` (add ``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from tqdm import tqdm

from hspace.toy.world import make_dataset

#: Architecture of the shipped toy model: h = 64 x 8 x 8 at 32 x 32 pixels, attention at 16 x 16.
TOY_UNET_CONFIG: dict = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
    attention_head_dim=32,
)

#: Seeds used for training images; evaluation seeds in tests start at 10**6 to stay disjoint.
TRAIN_SEED_OFFSET = 10_000_000


def build_toy_unet(seed: int = 0) -> UNet2DModel:
    """A freshly initialised toy U-Net (deterministic from ``seed``)."""
    torch.manual_seed(seed)
    return UNet2DModel(**TOY_UNET_CONFIG)


def _to_model_range(images_uint8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.contiguous()


def train(
    out: Path,
    steps: int,
    batch_size: int = 64,
    lr: float = 4e-4,
    warmup: int = 200,
    ema_decay: float = 0.995,
    n_images: int = 40_000,
    checkpoint_every: int = 100,
    export_every: int = 500,
    device: str = "cpu",
    bf16: bool = False,
    seed: int = 0,
    threads: int | None = None,
    min_snr_gamma: float = 0.0,
) -> Path:
    """Train (or resume) the toy DDPM; returns the directory of the exported pipeline.

    ``min_snr_gamma`` > 0 weights each sample's noise-prediction loss by min(SNR_t, gamma) / SNR_t
    (Min-SNR weighting, Hang et al. 2023): the nearly clean steps, which dominate the plain loss,
    count less, so the noisy steps that fix colour and layout get more of each update.
    """
    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    export_dir = out / "pipeline"

    unet = build_toy_unet(seed).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    start = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
        print(f"resumed from step {start}")

    t0 = time.time()
    images, _ = make_dataset(range(TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + n_images))
    data = _to_model_range(images)
    print(f"generated {n_images} training faces in {time.time() - t0:.1f}s")

    alphas = scheduler.alphas_cumprod.to(device)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train toy DDPM")

    def export() -> None:
        DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(export_dir)

    for step in bar:
        # one generator per step, seeded by (seed, step): a resumed run draws what an uninterrupted one would
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, n_images, (batch_size,), generator=gen)
        x0 = data[idx].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            pred = unet(xt, t).sample
        per_sample = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(a.flatten(), min_snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - d)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            tmp = out / "checkpoint.pt.tmp"
            torch.save(
                {
                    "unet": unet.state_dict(),
                    "ema": ema.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step + 1,
                },
                tmp,
            )
            tmp.replace(ckpt_path)
        if (step + 1) % export_every == 0:
            export()
    export()
    return export_dir


def min_snr_weights(alpha_bar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights min(SNR, gamma) / SNR for noise prediction; all ones if gamma <= 0."""
    if gamma <= 0:
        return torch.ones_like(alpha_bar)
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / snr


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--n-images", type=int, default=40_000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-snr-gamma", type=float, default=0.0, help="Min-SNR loss weighting (0: plain MSE)")
    a = p.parse_args(argv)
    path = train(
        a.out,
        a.steps,
        a.batch_size,
        a.lr,
        n_images=a.n_images,
        device=a.device,
        bf16=a.bf16,
        threads=a.threads,
        seed=a.seed,
        min_snr_gamma=a.min_snr_gamma,
    )
    print(f"exported {path}")


if __name__ == "__main__":
    main()
