"""GPU suite: the CelebA-HQ-256 U-Net's speed with the options of ``hspace.accel`` (CUDA only).

A ``UNet2DModel`` with google/ddpm-ema-celebahq-256's configuration (written out below, random
weights: no hub) measures

- images/s of 50-step DDPM sampling at batch 64 with h captured (float16 host copies), in float32,
  bfloat16, and bfloat16 + channels_last + torch.compile; the ratios of capture and of capture +
  one edit direction to plain sampling;
- seconds per image of k = 32 Jacobian directions (4 images per call) in float32 and bfloat16,
  a fixed 20 iterations, for Alg. 1 (oversample 8) and block Krylov (the pipeline's default;
  ``test_bench_jacobian_accuracy.py`` measures the iterations an accuracy criterion needs on the
  CPU: 9 for Alg. 1, 5 for block Krylov at k = 32 on the toy U-Net);
- seconds per timestep of the streaming PCA of 8,192 x 32,768 h rows with k = 64, batches of 1,024,
  on the GPU, Gram solver vs ``torch.svd_lowrank``;
- Stable Diffusion 1.5 (random weights, its UNet2DConditionModel / AutoencoderKL / CLIP text
  encoder configs from ``_text_pipelines.py``) at 512 px, batch 16, 25 DDIM steps, guidance 7.5,
  in float16 and bfloat16: images/s of ``HSpaceSampler.sample(record_h=True)`` against diffusers'
  ``StableDiffusionPipeline`` on the same components and generators, alternating rounds.

Goals: >= 12 images/s with capture and edits, Jacobian <= 8 s/image, PCA <= 0.2 s/timestep,
Stable Diffusion with capture >= 0.95x the pipeline's images/s.
Without CUDA the suite is skipped; ``HSPACE_BENCH_GPU_ON_CPU=1`` runs it on the CPU with the
tests' tiny U-Net, a small SD and small sizes (a smoke run of the code, not a measurement).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from _bench import TINY_UNET, alternate, configure_threads, median, ratio, table, write_results

SMOKE = os.environ.get("HSPACE_BENCH_GPU_ON_CPU", "") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not (HAS_CUDA or SMOKE),
    reason="GPU suite skipped: no CUDA device (torch.cuda.is_available() is False); "
    "HSPACE_BENCH_GPU_ON_CPU=1 runs a CPU smoke run of its code",
)

#: google/ddpm-ema-celebahq-256's UNet2DModel (113.7 M parameters; h = 512 x 8 x 8).
CELEBAHQ_256_UNET = dict(
    sample_size=256,
    in_channels=3,
    out_channels=3,
    center_input_sample=False,
    time_embedding_type="positional",
    freq_shift=1,
    flip_sin_to_cos=False,
    down_block_types=(
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "AttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    block_out_channels=(128, 128, 256, 256, 512, 512),
    layers_per_block=2,
    mid_block_scale_factor=1,
    downsample_padding=0,
    act_fn="silu",
    attention_head_dim=None,
    norm_num_groups=32,
    norm_eps=1e-6,
)

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
UNET = TINY_UNET if SMOKE and not HAS_CUDA else CELEBAHQ_256_UNET
UNET_NAME = "CelebA-HQ-256 (random weights)" if UNET is CELEBAHQ_256_UNET else "tiny (CPU smoke run)"
BATCH, STEPS = (4, 3) if SMOKE and not HAS_CUDA else (64, 50)
JAC_K, JAC_IMAGES, JAC_ITERS = (4, 2, 2) if SMOKE and not HAS_CUDA else (32, 4, 20)
PCA_N, PCA_D, PCA_K, PCA_BATCH = (512, 2048, 8, 128) if SMOKE and not HAS_CUDA else (8192, 32768, 64, 1024)
SUFFIX = "" if HAS_CUDA else "_cpu_smoke"
GOALS = {
    "images_per_s_capture_edit": 12.0,
    "jacobian_s_per_image": 8.0,
    "pca_s_per_timestep": 0.2,
    "sd_capture_over_pipeline": 0.95,
}
#: Stable Diffusion: batch, DDIM steps, alternating rounds (after one warm-up round each)
SD_BATCH, SD_STEPS, SD_ROUNDS = (2, 2, 2) if SMOKE and not HAS_CUDA else (16, 25, 3)
SD_GUIDANCE = 7.5


def _sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def _model(dtype: torch.dtype, channels_last: bool = False, compile: bool = False):
    from diffusers import DDPMScheduler, UNet2DModel

    from hspace.accel import accelerate
    from hspace.model import HSpaceModel

    torch.manual_seed(0)
    unet = UNet2DModel(**UNET).eval().to(DEVICE, dtype)
    # inductor on a GPU; the CPU smoke run only traces (inductor's C++ build takes minutes there)
    accelerate(
        unet, channels_last=channels_last, compile=compile, backend="inductor" if HAS_CUDA else "aot_eager"
    )
    return HSpaceModel(unet, dict(DDPMScheduler(num_train_timesteps=1000).config), model_id="celebahq-random")


def _images_per_s(sampler, seeds, **kw) -> float:
    sampler.sample(seeds[:BATCH], batch_size=BATCH, **kw)  # warm-up (and compilation)
    times = []
    for _ in range(2):
        _sync()
        t0 = time.perf_counter()
        sampler.sample(seeds, batch_size=BATCH, **kw)
        _sync()
        times.append(time.perf_counter() - t0)
    return len(seeds) / median(times)


def test_gpu_sampling_throughput():
    from hspace.directions import Direction
    from hspace.sampling import Edit, HSpaceSampler

    configure_threads()
    seeds = list(range(BATCH))
    rows, data = [], {}
    variants = {
        "float32": dict(dtype=torch.float32),
        "bfloat16": dict(dtype=torch.bfloat16),
        "bfloat16 + channels_last + compile": dict(dtype=torch.bfloat16, channels_last=True, compile=True),
    }
    for name, opts in variants.items():
        model = _model(**opts)
        sampler = HSpaceSampler(model, num_inference_steps=STEPS)
        v = Direction(vector=torch.randn(model.h_shape), name="v", kind="random", units="raw")
        plain = _images_per_s(sampler, seeds, record_h=False)
        capture = _images_per_s(sampler, seeds, record_h=True, h_dtype=torch.float16)
        edit = _images_per_s(sampler, seeds, record_h=True, h_dtype=torch.float16, edit=Edit(v, scales=1.0))
        data[name] = {"plain": plain, "capture": capture, "capture_edit": edit}
        rows.append([name, plain, capture, edit, capture / plain, edit / plain])
        del model, sampler
        if HAS_CUDA:
            torch.cuda.empty_cache()
    text = table(
        f"Sampling, {STEPS} DDPM steps, batch {BATCH}, U-Net {UNET_NAME} on {DEVICE}: images/s "
        "(median of 2 runs after a warm-up)",
        ["variant", "plain", "capture h", "capture + edit", "capture / plain", "capture+edit / plain"],
        rows,
    )
    best = max(d["capture_edit"] for d in data.values())
    write_results(
        "gpu_sampling" + SUFFIX,
        {
            "figure": "images/s with h capture and one edit",
            "baseline": "float32 eager, plain sampling",
            "ratio": {n: d["capture_edit"] / data["float32"]["plain"] for n, d in data.items()},
            "configuration": {"unet": UNET, "batch": BATCH, "steps": STEPS, "smoke": SMOKE},
            "images_per_s": data,
            "goal": GOALS["images_per_s_capture_edit"],
            "goal_met": best >= GOALS["images_per_s_capture_edit"],
            "table": text,
        },
    )


def test_gpu_jacobian_seconds_per_image():
    from hspace.jacobian import jacobian_directions

    configure_threads()
    rows, data = [], {}
    methods = {
        "Alg. 1, oversample 8": dict(method="subspace", oversample=8),
        "block Krylov": dict(method="krylov"),
    }
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = _model(dtype)
        x = torch.randn(JAC_IMAGES, *model.image_shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        for method_name, method in methods.items():
            kw = dict(n_iter=JAC_ITERS, tol=1e-12, chunk_size=None, **method)
            jacobian_directions(model, x[:1], 500, JAC_K, **{**kw, "n_iter": 1})  # warm-up
            _sync()
            t0 = time.perf_counter()
            res = jacobian_directions(model, x, 500, JAC_K, **kw)
            _sync()
            per_image = (time.perf_counter() - t0) / JAC_IMAGES
            peak = torch.cuda.max_memory_allocated() / 2**30 if HAS_CUDA else float("nan")
            name = f"{method_name}, {dtype_name}"
            data[name] = {"s_per_image": per_image, "iterations": res.iterations, "peak_gib": peak}
            rows.append([method_name, dtype_name, per_image, res.iterations, peak])
            if HAS_CUDA:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        del model
    text = table(
        f"Jacobian directions k = {JAC_K} ({JAC_ITERS} iterations each), {JAC_IMAGES} images per call, t = 500, "
        f"U-Net {UNET_NAME} on {DEVICE}",
        ["method", "dtype", "seconds per image", "J^T J applications", "peak GiB"],
        rows,
    )
    baseline = "Alg. 1, oversample 8, float32"
    write_results(
        "gpu_jacobian" + SUFFIX,
        {
            "figure": "seconds per image for k Jacobian directions",
            "baseline": baseline,
            "ratio": {name: d["s_per_image"] / data[baseline]["s_per_image"] for name, d in data.items()},
            "configuration": {"k": JAC_K, "images": JAC_IMAGES, "n_iter": JAC_ITERS, "smoke": SMOKE},
            "results": data,
            "goal": GOALS["jacobian_s_per_image"],
            "goal_met": min(d["s_per_image"] for d in data.values()) <= GOALS["jacobian_s_per_image"],
            "table": text,
        },
    )


def test_gpu_pca_seconds_per_timestep():
    from hspace.pca import IncrementalPCA

    configure_threads()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    basis = torch.linalg.qr(torch.randn(PCA_D, 96, device=DEVICE, generator=g))[0]
    scales = 8.0 * 0.95 ** torch.arange(96, device=DEVICE)
    x = (torch.randn(PCA_N, 96, device=DEVICE, generator=g) * scales) @ basis.T
    x += 0.5 * torch.randn(PCA_N, PCA_D, device=DEVICE, generator=g)
    x = x.to(torch.float16)  # as stored
    rows, data, comps = [], {}, {}
    for solver in ("gram", "lowrank"):
        for _ in range(2):  # the second run is timed
            est = IncrementalPCA(PCA_K, device=DEVICE, solver=solver)
            _sync()
            t0 = time.perf_counter()
            for i in range(0, PCA_N, PCA_BATCH):
                est.partial_fit(x[i : i + PCA_BATCH])
            _sync()
            seconds = time.perf_counter() - t0
        comps[solver] = est.components_
        data[solver] = seconds
    cos = (comps["gram"] * comps["lowrank"]).sum(1).abs()
    for solver in data:
        rows.append([solver, data[solver], data[solver] / data["gram"], float(cos[:16].min())])
    text = table(
        f"Streaming PCA of {PCA_N} x {PCA_D} (float16 rows, float64 state) k = {PCA_K}, batches of {PCA_BATCH}, "
        f"on {DEVICE}: seconds per timestep",
        ["solver", "seconds per timestep", "ratio to gram", "min |cos| top 16 vs gram"],
        rows,
    )
    write_results(
        "gpu_pca" + SUFFIX,
        {
            "figure": "seconds per timestep",
            "baseline": "gram solver",
            "ratio": data["lowrank"] / data["gram"],
            "configuration": {"n": PCA_N, "d": PCA_D, "k": PCA_K, "batch": PCA_BATCH, "smoke": SMOKE},
            "seconds": data,
            "goal": GOALS["pca_s_per_timestep"],
            "goal_met": min(data.values()) <= GOALS["pca_s_per_timestep"],
            "table": text,
        },
    )
    assert float(cos[: min(16, PCA_K)].min()) > 0.99


def _sd_pipeline(dtype: torch.dtype):
    """SD 1.5's components with random weights (a small SD in the CPU smoke run) on DEVICE in ``dtype``."""
    from _text_pipelines import (
        BENCH_UNET,
        SD15_TEXT,
        SD15_UNET,
        SD15_VAE,
        TINY_TEXT,
        TINY_VAE,
        stable_diffusion,
    )

    if HAS_CUDA:
        configs = (SD15_UNET, SD15_VAE, SD15_TEXT)
    else:  # 8 x 8 latents, 16 px images
        configs = (dict(BENCH_UNET, sample_size=8), dict(TINY_VAE, sample_size=16), TINY_TEXT)
    pipe = stable_diffusion(*configs).to(DEVICE, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, configs


SD_BASE, SD_OURS = "diffusers StableDiffusionPipeline", "HSpaceSampler, capture h"


def _sd_round_times(dtype: torch.dtype) -> tuple[dict[str, list[float]], dict]:
    """Seconds per call of the pipeline and of the capturing sampler in alternating rounds."""
    from _text_pipelines import NEGATIVE, PROMPTS, generators

    from hspace.model import HSpaceModel
    from hspace.sampling import HSpaceSampler

    pipe, configs = _sd_pipeline(dtype)
    model = HSpaceModel.from_pipeline(pipe)
    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=SD_STEPS)
    seeds = list(range(SD_BATCH))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in seeds]
    negative = [NEGATIVE[i % len(NEGATIVE)] for i in seeds]

    def diffusers_pipeline():
        with torch.no_grad():
            images = pipe(
                prompts, negative_prompt=negative, num_inference_steps=SD_STEPS, guidance_scale=SD_GUIDANCE,
                generator=generators(seeds), output_type="pt",
            ).images.float().cpu()  # fmt: skip
        _sync()
        return images

    def capture():
        traj = sampler.sample(
            seeds, prompt=prompts, negative_prompt=negative, guidance_scale=SD_GUIDANCE,
            batch_size=SD_BATCH, record_h=True,
        )  # fmt: skip
        _sync()
        return traj

    variants = {SD_BASE: diffusers_pipeline, SD_OURS: capture}
    alternate(variants, {}, reverse=False)  # warm-up (cuDNN autotuning, the h shape probe)
    times: dict[str, list[float]] = {}
    for r in range(SD_ROUNDS):
        results = alternate(variants, times, reverse=bool(r % 2))
    traj = results[SD_OURS]
    assert traj.h is not None and tuple(traj.h.shape) == (SD_BATCH, SD_STEPS, *model.h_shape)
    return times, {
        "unet": configs[0],
        "vae": configs[1],
        "text_encoder": configs[2],
        "h_shape": model.h_shape,
    }


def test_gpu_stable_diffusion_capture_against_the_pipeline():
    from diffusers.utils import logging as diffusers_logging

    configure_threads()
    diffusers_logging.set_verbosity_error()
    rows, data, configuration = [], {}, {}
    for dtype_name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        times, configuration = _sd_round_times(dtype)
        per_s = {name: SD_BATCH / median(t) for name, t in times.items()}
        speed = 1 / ratio(times, SD_OURS, SD_BASE)  # images/s of the sampler / the pipeline's, per round
        data[dtype_name] = {"images_per_s": per_s, "capture_over_pipeline": speed, "seconds": times}
        rows.append([dtype_name, per_s[SD_BASE], per_s[SD_OURS], speed])
        if HAS_CUDA:
            torch.cuda.empty_cache()
    name = "SD 1.5 (random weights), 512 px" if HAS_CUDA else "small SD (CPU smoke run)"
    text = table(
        f"Stable Diffusion: {name}, batch {SD_BATCH}, {SD_STEPS} DDIM steps, guidance {SD_GUIDANCE}, on {DEVICE}: "
        f"images/s (median of {SD_ROUNDS} alternating rounds after a warm-up); ratio = capture / pipeline images/s",
        ["dtype", "StableDiffusionPipeline", "HSpaceSampler, capture h", "ratio"],
        rows,
    )
    worst = min(d["capture_over_pipeline"] for d in data.values())
    write_results(
        "gpu_stable_diffusion" + SUFFIX,
        {
            "figure": "images/s of Stable Diffusion sampling with h capture",
            "baseline": SD_BASE,
            "ratio": {n: d["capture_over_pipeline"] for n, d in data.items()},
            "configuration": {
                **configuration,
                "batch": SD_BATCH,
                "steps": SD_STEPS,
                "sampler": "ddim",
                "guidance_scale": SD_GUIDANCE,
                "rounds": SD_ROUNDS,
                "smoke": SMOKE,
            },  # fmt: skip
            "results": data,
            "goal": GOALS["sd_capture_over_pipeline"],
            "goal_met": worst >= GOALS["sd_capture_over_pipeline"],
            "table": text,
        },
    )
