"""Shared fixtures: tiny diffusers models built inside the tests (no hub, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

#: The tests' tiny U-Net: 16 px, h = 32 x 4 x 4; small enough for an explicit Jacobian on a CPU.
TINY_UNET_CONFIG: dict = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=8,
)


def build_tiny_unet(sample_size: int = 16, seed: int = 0):
    """A tiny UNet2DModel with attention and a mid-block; h is [32, 4, 4] at 16x16 input."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY_UNET_CONFIG, "sample_size": sample_size}).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny DDPM saved in DDPMPipeline layout (unet/ + scheduler/)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    path = tmp_path_factory.mktemp("tiny_ddpm")
    unet = build_tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path
