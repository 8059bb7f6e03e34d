"""Stable Diffusion on the CPU: HSpaceSampler with h capture against diffusers' StableDiffusionPipeline.

A random-weight SD (``_text_pipelines.BENCH_UNET``: 4 x 32 x 32 latents, blocks 32 / 64,
h = 64 x 16 x 16; the tests' tiny VAE and CLIP text encoder) large enough that the U-Net
dominates a call. Every variant renders the same samples (a list of seeded generators), prompts,
negative prompts, DDIM steps and guidance scale 7.5 on the same components, 1 torch thread:

- baseline: ``StableDiffusionPipeline.__call__`` (``output_type="pt"``);
- ``HSpaceSampler.sample`` without recording h, recording h (``record_h=True``), and recording h
  with an :class:`~hspace.sampling.Edit` of one direction in both guidance branches.

Rounds alternate the order (``_bench.alternate``); ratios are medians of per-round ratios, of wall
time and of the process's CPU time (1 thread: the work done, which waiting for a core on a
loaded machine does not inflate). A timing hook on the U-Net splits each call into U-Net seconds
and the rest (prompt encoding, scheduler, VAE decode, hspace's hook and host copies), so a ratio
above 1 can be traced to its part; the U-Net-normalised ratio gives each variant the U-Net
seconds of the same round's pipeline call (the U-Net work is the same). Aim: capture <= 1.05x the
pipeline (CPU time). The images of the unedited variants must equal the pipeline's.
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
    """Wall and CPU seconds spent inside the U-Net's forward (pre- and post-forward hooks)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.wall = self.cpu = 0.0
        self._start = (0.0, 0.0)
        unet.register_forward_pre_hook(self._enter)
        unet.register_forward_hook(self._leave)

    def _enter(self, *_) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def _leave(self, *_) -> None:
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]

    def reset(self) -> tuple[float, float]:
        """(wall, CPU) seconds since the last reset."""
        out = (self.wall, self.cpu)
        self.wall = self.cpu = 0.0
        return out


def unet_normalised_ratio(total: dict, unet: dict, name: str, baseline: str) -> float:
    """Median over rounds of (U_b + rest_v) / (U_b + rest_b): the variant's time with its U-Net seconds
    replaced by the baseline's of the same round (the U-Net work is identical: the same inputs and
    operations, hence the same images), so that load changes inside the U-Net do not enter."""
    per_round = []
    for t_v, u_v, t_b, u_b in zip(total[name], unet[name], total[baseline], unet[baseline], strict=True):
        per_round.append((u_b + t_v - u_v) / t_b)
    return median(per_round)


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
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    unet_wall: dict[str, list[float]] = {name: [] for name in variants}
    unet_cpu: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(ROUNDS):
        for name in reversed(list(variants)) if r % 2 else list(variants):
            clock.reset()
            c0 = time.process_time()
            alternate({name: variants[name]}, wall, reverse=False)
            cpu[name].append(time.process_time() - c0)
            u_wall, u_cpu = clock.reset()
            unet_wall[name].append(u_wall)
            unet_cpu[name].append(u_cpu)

    captured = warm["hspace, capture h"]
    theirs = warm[base]
    diff_plain = float((warm["hspace, no capture"] - theirs).abs().max())
    diff_capture = float((captured.images - theirs).abs().max())
    edit_change = float(
        (warm["hspace, capture h + edit (both branches)"].images - captured.images).abs().max()
    )

    rows = []
    for name in variants:
        rest = [a - b for a, b in zip(cpu[name], unet_cpu[name], strict=True)]
        rows.append([name, median(wall[name]), median(cpu[name]), median(unet_cpu[name]), median(rest),
                     ratio(wall, name, base), ratio(cpu, name, base),
                     unet_normalised_ratio(cpu, unet_cpu, name, base)])  # fmt: skip
    edit_name, capture_name = "hspace, capture h + edit (both branches)", "hspace, capture h"
    edit_vs_capture = {
        "wall": ratio(wall, edit_name, capture_name),
        "cpu": ratio(cpu, edit_name, capture_name),
    }
    text = table(
        f"Stable Diffusion (random weights, latents 4x32x32, h {model.h_shape}) on the CPU, {threads} thread(s): "
        f"{SAMPLES} samples x {STEPS} DDIM steps, guidance {GUIDANCE}; ratios = time / pipeline time, median "
        f"of {ROUNDS} alternating rounds (wall; CPU = process CPU time; U-Net-normalised: CPU time with the "
        "U-Net's seconds of the same round's pipeline call)",
        ["variant", "wall s", "CPU s", "U-Net CPU s", "rest CPU s", "ratio wall", "ratio CPU",
         "ratio U-Net-normalised"],
        rows,
    )  # fmt: skip
    text += (
        f"\nedit (both branches) / capture h: {edit_vs_capture['wall']:.3f} wall, "
        f"{edit_vs_capture['cpu']:.3f} CPU"
    )
    print(text.splitlines()[-1])
    capture_ratio = ratio(cpu, capture_name, base)
    write_results(
        "text_sampling",
        {
            "figure": "seconds of a Stable Diffusion sampling call with h capture and an edit",
            "baseline": base,
            "ratio": {
                "wall": {name: ratio(wall, name, base) for name in variants},
                "cpu": {name: ratio(cpu, name, base) for name in variants},
                "unet_normalised_cpu": {
                    name: unet_normalised_ratio(cpu, unet_cpu, name, base) for name in variants
                },
                "edit / capture h": edit_vs_capture,
            },
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
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            "unet_wall_seconds": unet_wall,
            "unet_cpu_seconds": unet_cpu,
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
