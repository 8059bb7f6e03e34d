"""Shared fixtures: tiny diffusers models built inside the tests (no hub, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hspace.toy.train import TOY_UNET_CONFIG

#: The tests' tiny U-Net: 16 px, h = 32 x 4 x 4; small enough for an explicit Jacobian on a CPU.
TINY_UNET_CONFIG: dict = {
    **TOY_UNET_CONFIG,  # the shipped toy architecture, narrowed
    "sample_size": 16,
    "block_out_channels": (16, 32, 32),
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}


def build_tiny_unet(sample_size: int = 16, seed: int = 0):
    """A tiny UNet2DModel with attention and a mid-block; h is [32, 4, 4] at 16x16 input."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY_UNET_CONFIG, "sample_size": sample_size}).eval()


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op torch thread for the whole suite: the tiny test models gain nothing from more,
    and on a shared 2-core machine threads waiting for each other made them many times slower
    (measured: tests/test_denoisers.py 658 s with two threads at load 20, 52 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def all_torch_threads(one_torch_thread):
    """Every core for a module of batch-bound work on the real toy models (the acceptance tests):
    there, two threads sample the toy model about 1.9x faster than one on an idle 2-core machine
    (64 samples x 10 DDPM steps: 4.1-4.8 s against 7.7-10.4 s)."""
    import os

    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny DDPM saved in DDPMPipeline layout (unet/ + scheduler/)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    path = tmp_path_factory.mktemp("tiny_ddpm")
    unet = build_tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_pipeline_dirs(tmp_path_factory) -> dict[str, Path]:
    """Every supported kind as a tiny pipeline directory (tests/tiny_pipelines.py): text (Stable
    Diffusion), text-xl (SDXL), latent (LDM), dit, class (class-conditional U-Net)."""
    pytest.importorskip("transformers")
    import tiny_pipelines

    root = tmp_path_factory.mktemp("pipelines")
    return {kind: tiny_pipelines.save(kind, root / kind) for kind in tiny_pipelines.BUILDERS}


def pytest_collection_modifyitems(config, items) -> None:
    """Every test that starts or joins a Ray cluster carries the ``ray`` marker, so that
    ``make test-fast`` (``-m "not slow and not ray"``) can leave them out without a list to keep."""
    for item in items:
        if {"ray_local", "ray_head"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
