"""Cost of recording h and of editing it: HSpaceSampler with and without the mid-block hook's work.

Baseline: the sampler with ``record_h=False`` (the hook is attached but keeps nothing). Compared:
recording h into preallocated host buffers (model dtype and float16), an Edit added by the hook
(mode "both": one U-Net pass per step, the paper's default; mode "asyrp": two passes per step, so
about 2x by construction), and diffusers' own ``DDPMPipeline`` loop as the reference the sampler
reproduces. Ratios are time / baseline time, median over interleaved rounds.
"""

from __future__ import annotations

import torch
from _bench import ON_GPU, bench_model, compare, configure_threads, median, ratio, table, write_results

from hspace.directions import Direction
from hspace.sampling import Edit, HSpaceSampler

BATCH = 32 if ON_GPU else 4
STEPS = 50 if ON_GPU else 5
REPEATS = 7 if ON_GPU else 5


def test_capture_and_edit_overhead():
    threads = configure_threads()
    model = bench_model()
    sampler = HSpaceSampler(model, sampler="ddpm", num_inference_steps=STEPS)
    seeds = list(range(BATCH))
    g = torch.Generator().manual_seed(0)
    direction = Direction(torch.randn(*model.h_shape, generator=g), "random", kind="random")
    edit_both = Edit(direction, scales=1.0, mode="both")
    edit_asyrp = Edit(direction, scales=1.0, mode="asyrp")

    from diffusers import DDPMPipeline

    pipe = DDPMPipeline(unet=model.unet, scheduler=model.make_scheduler("ddpm"))
    pipe.set_progress_bar_config(disable=True)

    def diffusers_loop():
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        with torch.no_grad():
            pipe(batch_size=BATCH, generator=gens, num_inference_steps=STEPS, output_type="np")

    variants = {
        "no capture (baseline)": lambda: sampler.sample(seeds, record_h=False),
        "record h": lambda: sampler.sample(seeds, record_h=True),
        "record h float16": lambda: sampler.sample(seeds, record_h=True, h_dtype=torch.float16),
        "edit (both)": lambda: sampler.sample(seeds, record_h=False, edit=edit_both),
        "edit (both) + record h": lambda: sampler.sample(seeds, record_h=True, edit=edit_both),
        "edit (asyrp, 2 passes)": lambda: sampler.sample(seeds, record_h=False, edit=edit_asyrp),
        "diffusers DDPMPipeline": diffusers_loop,
    }
    times = compare(variants, repeats=REPEATS)
    base = "no capture (baseline)"
    rows = [[name, median(t), BATCH / median(t), ratio(times, name, base)] for name, t in times.items()]
    h_bytes = BATCH * STEPS * int(torch.tensor(model.h_shape).prod()) * 4
    text = table(
        f"capture overhead: {BATCH} samples x {STEPS} DDPM steps, h {model.h_shape}, {model.device}, "
        f"{threads} thread(s); ratio = time / baseline (median of {REPEATS} interleaved rounds)",
        ["variant", "seconds", "images/s", "ratio"],
        rows,
    )
    write_results(
        "capture",
        {
            "figure": "seconds of a sampling call with h capture and edits",
            "baseline": base,
            "ratio": {name: ratio(times, name, base) for name in times},
            "configuration": {
                "batch": BATCH,
                "steps": STEPS,
                "repeats": REPEATS,
                "h_shape": model.h_shape,
                "h_bytes_float32": h_bytes,
            },
            "seconds": times,
            "table": text,
        },
    )
    for name, t in times.items():
        assert all(x > 0 for x in t), name
    # recording h is one copy per step of a tensor far smaller than the U-Net's activations; even
    # on a noisy shared machine it must not double the time (a regression guard, not the claim)
    assert ratio(times, "record h", base) < 2.0
