"""Shared fixtures: tiny diffusers models built inside the tests (no hub, no training)."""

from __future__ import annotations

import functools
import os
import re
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


def _cores_per_worker() -> int:
    """The machine's cores shared among the pytest-xdist workers (all of them without xdist)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return max(1, (os.cpu_count() or 1) // max(1, workers))


@pytest.fixture(scope="module")
def all_torch_threads(one_torch_thread):
    """Every core for a module of batch-bound work on the real toy models (the acceptance tests):
    there, two threads sample the toy model about 1.9x faster than one on an idle 2-core machine
    (64 samples x 10 DDPM steps: 4.1-4.8 s against 7.7-10.4 s)."""
    torch.set_num_threads(_cores_per_worker())
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
    ``make test-fast`` (``-m "not slow and not ray"``) can leave them out without a list to keep.

    Modules run longest first: those that start Ray, then those with slow acceptance tests, then
    the rest (a stable sort: each module stays whole and in order). Under xdist the Ray modules
    and the acceptance modules then start together in the two workers, and the many short
    modules fill in behind them instead of one long module running alone at the end."""
    slow_modules = set()
    for item in items:
        if {"ray_local", "ray_head"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
        if item.get_closest_marker("slow") is not None:
            slow_modules.add(item.nodeid.split("::", 1)[0])

    def weight(item) -> int:
        module = item.nodeid.split("::", 1)[0]
        return 0 if _starts_ray(str(config.rootpath / module)) else 1 if module in slow_modules else 2

    items.sort(key=weight)


#: How the xdist controller (which collects nothing) tells a module that starts Ray: it names one
#: of the Ray fixtures, the marker or the private multi-node cluster.
_STARTS_RAY = re.compile(r"\b(ray_local|ray_head|multinode_cluster)\b|pytest\.mark\.ray\b")


@functools.cache
def _starts_ray(module: str) -> bool:
    path = Path(module)
    return path.suffix == ".py" and path.is_file() and bool(_STARTS_RAY.search(path.read_text()))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown, and unused, without it
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` (``make test`` runs ``-n 2 --dist loadfile``) with one change: every
    module that starts Ray is in one scope. Each module runs whole in one worker, so its
    module-scoped fixtures are built once; the Ray modules run one after another in one worker,
    sharing its session cluster and never starting two clusters at once on a 2-core machine,
    while the other worker runs the single-threaded rest of the suite beside them."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # keep the collection's longest-first module order

    class RayModulesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "ray" if _starts_ray(str(config.rootpath / module)) else module

    return RayModulesTogether(config, log)
