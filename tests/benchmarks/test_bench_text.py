"""Stable Diffusion on the CPU: HSpaceSampler with h capture against diffusers' StableDiffusionPipeline.

A random-weight SD (``_text_pipelines.BENCH_UNET``: 4 x 32 x 32 latents, blocks 32 / 64,
h = 64 x 16 x 16; the tests' tiny VAE and CLIP text encoder) large enough that the U-Net
dominates a call. Every variant renders the same samples (a list of seeded generators), prompts,
negative prompts, DDIM steps and guidance scale 7.5 on the same components, 1 torch thread:

- baseline: ``StableDiffusionPipeline.__call__`` (``output_type="pt"``);
- ``HSpaceSampler.sample`` without recording h, recording h (``record_h=True``), and recording h
  with an :class:`~hspace.sampling.Edit` of one direction in both guidance branches.

Rounds alternate the order (``_bench.alternate``); ratios are medians of per-round ratios. A timing
hook on the U-Net splits each call into U-Net seconds and the rest (prompt encoding, scheduler,
VAE decode, hspace's hook and host copies), so a ratio above 1 can be traced to its part.
Aim: capture <= 1.05x the pipeline. The images of the unedited variants must equal the pipeline's.
"""

from __future__ import annotations

import os
import time

import torch
from _bench import alternate, configure_threads, median, ratio, table, write_results
from _text_pipelines import BENCH_UNET, NEGATIVE, PROMPTS, TINY_TEXT, TINY_VAE, generators, stable_diffusion

from hspace.directions import Direction
from hspace.model import HSpaceModel
from hspace.sampling import Edit, HSpaceSampler

QUICK = os.environ.get("HSPACE_BENCH_QUICK", "") not in ("", "0")
SAMPLES = 4
STEPS = 6 if QUICK else 10
ROUNDS = int(os.environ.get("HSPACE_BENCH_TEXT_ROUNDS", "3" if QUICK else "5"))
GUIDANCE = 7.5
AIM = 1.05
#: images of the unedited variants against the pipeline's (float32, same operations in the same order)
TOL = 1e-5


class UNetClock:
    """Wall seconds spent inside the U-Net's forward (pre- and post-forward hooks)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._start = 0.0
        unet.register_forward_pre_hook(self._enter)
        unet.register_forward_hook(self._leave)

    def _enter(self, *_) -> None:
        self._start = time.perf_counter()

    def _leave(self, *_) -> None:
        self.seconds += time.perf_counter() - self._start

    def reset(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def test_stable_diffusion_capture_against_the_pipeline():
    threads = configure_threads()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    pipe = stable_diffusion(BENCH_UNET, TINY_VAE, TINY_TEXT)
    pipe.set_progress_bar_config(disable=True)
    model = HSpaceModel.from_pipeline(pipe)
    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS)
    seeds = list(range(SAMPLES))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in seeds]
    negative = [NEGATIVE[i % len(NEGATIVE)] for i in seeds]
    g = torch.Generator().manual_seed(1)
    direction = Direction(torch.randn(*model.h_shape, generator=g), "random", kind="random", units="raw")
    edit = Edit(direction, scales=2.0, branches="both")
    conditioning = dict(prompt=prompts, negative_prompt=negative, guidance_scale=GUIDANCE, batch_size=SAMPLES)

    def diffusers_pipeline():
        with torch.no_grad():
            return pipe(
                prompts, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                generator=generators(seeds), output_type="pt",
            ).images  # fmt: skip

    base = "diffusers StableDiffusionPipeline"
    variants = {
        base: diffusers_pipeline,
        "hspace, no capture": lambda: sampler.sample(seeds, record_h=False, **conditioning).images,
        "hspace, capture h": lambda: sampler.sample(seeds, record_h=True, **conditioning),
        "hspace, capture h + edit (both branches)": lambda: sampler.sample(
            seeds, record_h=True, edit=edit, **conditioning
        ),
    }
    clock = UNetClock(pipe.unet)
    warm = alternate(variants, {}, reverse=False)  # warm-up (h shape probe, allocator), untimed
    times: dict[str, list[float]] = {}
    unet_s: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(ROUNDS):
        for name in reversed(list(variants)) if r % 2 else list(variants):
            clock.reset()
            alternate({name: variants[name]}, times, reverse=False)
            unet_s[name].append(clock.reset())

    captured = warm["hspace, capture h"]
    theirs = warm[base]
    diff_plain = float((warm["hspace, no capture"] - theirs).abs().max())
    diff_capture = float((captured.images - theirs).abs().max())
    edit_change = float(
        (warm["hspace, capture h + edit (both branches)"].images - captured.images).abs().max()
    )

    rows = []
    for name, t in times.items():
        rest = [a - b for a, b in zip(t, unet_s[name], strict=True)]
        rows.append([name, median(t), SAMPLES / median(t), median(unet_s[name]), median(rest),
                     ratio(times, name, base)])  # fmt: skip
    edit_vs_capture = ratio(times, "hspace, capture h + edit (both branches)", "hspace, capture h")
    text = table(
        f"Stable Diffusion (random weights, latents 4x32x32, h {model.h_shape}) on the CPU, {threads} thread(s): "
        f"{SAMPLES} samples x {STEPS} DDIM steps, guidance {GUIDANCE}; ratio = time / pipeline time "
        f"(median of {ROUNDS} alternating rounds)",
        ["variant", "seconds", "images/s", "U-Net s", "rest s", "ratio"],
        rows,
    )
    text += f"\nedit (both branches) / capture h: {edit_vs_capture:.3f}"
    print(text.splitlines()[-1])
    capture_ratio = ratio(times, "hspace, capture h", base)
    write_results(
        "text_sampling",
        {
            "figure": "seconds of a Stable Diffusion sampling call with h capture and an edit",
            "baseline": base,
            "ratio": {name: ratio(times, name, base) for name in times}
            | {"edit / capture h": edit_vs_capture},
            "configuration": {
                "unet": BENCH_UNET,
                "vae": TINY_VAE,
                "text_encoder": TINY_TEXT,
                "samples": SAMPLES,
                "steps": STEPS,
                "sampler": "ddim",
                "guidance_scale": GUIDANCE,
                "rounds": ROUNDS,
                "quick": QUICK,
                "h_shape": model.h_shape,
            },
            "seconds": times,
            "unet_seconds": unet_s,
            "aim": AIM,
            "aim_met": capture_ratio <= AIM,
            "max_abs_diff_to_pipeline": {"no capture": diff_plain, "capture h": diff_capture},
            "table": text,
        },
    )
    # the sampler reproduces the pipeline (what makes the timing a like-for-like comparison)
    assert diff_plain <= TOL and diff_capture <= TOL, (diff_plain, diff_capture)
    assert captured.h is not None and tuple(captured.h.shape) == (SAMPLES, STEPS, *model.h_shape)
    assert edit_change > 0, "the edit changed nothing"
