"""How well the text toy follows its prompts, judged by the toy attribute classifier.

For a prompt, every factor it names should read true (:func:`hspace.toy.captions.phrase_reads_true`)
on the samples, and every binary factor it leaves unnamed should keep the world's rate given the
named ones (:func:`world_rates`: a prompt "grey hair" keeps glasses at 0.8, the world's
correlated pair). Samples come from diffusers' own ``StableDiffusionPipeline`` call with one
generator per sample, so a sample is fixed by its seed and does not depend on its batch.

``python -m hspace.toy.text_evaluate --grid samples.png`` prints the adherence table of the
shipped model and writes a grid of samples (one row per prompt); ``--phrase-signal`` prints, without
sampling, how much each pair of opposite phrases changes what the U-Net's cross-attention layers
return (:func:`phrase_signal`): a phrase whose change there is small is one the model cannot follow.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hspace.classifier import score_images
from hspace.toy.captions import PHRASES, named_factors, phrase_holds, phrase_reads_true
from hspace.toy.world import BINARY_FACTORS, sample_factors

#: Guidance scale at which the shipped text toy is evaluated (and its prompt claims hold).
DEFAULT_GUIDANCE = 7.5
#: DDPM steps for evaluation samples (the pipeline's DDPMScheduler, eta = 1).
DEFAULT_STEPS = 20

#: Prompts of the adherence report: every phrase alone, a few combinations, and the empty prompt.
REPORT_PROMPTS: tuple[str, ...] = (
    "grey hair",
    "dark hair",
    "glasses",
    "no glasses",
    "hat",
    "no hat",
    "eyes open",
    "eyes closed",
    "smiling",
    "not smiling",
    "facing left",
    "facing forward",
    "facing right",
    "light skin",
    "dark skin",
    "grey hair, no glasses, hat",
    "dark hair, glasses, smiling, facing left",
    "",
)


@torch.no_grad()
def generate(
    pipe,
    prompt: str | Sequence[str],
    seeds: Sequence[int],
    guidance_scale: float = DEFAULT_GUIDANCE,
    num_inference_steps: int = DEFAULT_STEPS,
    batch_size: int = 128,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1], one ``torch.Generator`` per seed.

    ``prompt``: one for every seed, or one per seed. Rows of several prompts share batches, so
    a whole report renders in a few large pipeline calls (a sample depends on its seed only).
    """
    prompts = [prompt] * len(seeds) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    out = []
    for i in range(0, len(seeds), batch_size):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        res = pipe(
            prompts[i : i + batch_size],
            generator=gens,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            output_type="pt",
        )
        out.append(res.images.float().cpu())
    return torch.cat(out)


def generate_report(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    guidance_scale: float = DEFAULT_GUIDANCE,
    num_inference_steps: int = DEFAULT_STEPS,
) -> dict[str, torch.Tensor]:
    """Images of every prompt on the same seeds, rendered in shared batches: {prompt: [N, 3, H, W]}."""
    rows = [p for p in prompts for _ in seeds]
    images = generate(pipe, rows, [s for _ in prompts for s in seeds], guidance_scale, num_inference_steps)
    return {p: images[i * len(seeds) : (i + 1) * len(seeds)] for i, p in enumerate(prompts)}


def world_rates(prompt: str, n: int = 20_000, seed_offset: int = 40_000_000) -> dict[str, float]:
    """Rate of each binary factor among world faces that fit every phrase the prompt names."""
    named = named_factors(prompt)
    rows = []
    for s in range(seed_offset, seed_offset + n):
        values = vars(sample_factors(s))
        if all(phrase_holds(p, values[f]) for f, p in named.items()):
            rows.append([values[b] for b in BINARY_FACTORS])
    if not rows:
        raise ValueError(f"no world face fits {prompt!r}")
    rates = np.mean(np.asarray(rows, dtype=np.float64), axis=0)
    return {b: float(r) for b, r in zip(BINARY_FACTORS, rates, strict=True)}


def adherence(images: torch.Tensor, prompt: str, classifier) -> dict:
    """Share of samples on which each named phrase reads true, and binary rates of the unnamed factors.

    Returns ``{"named": {factor: fraction}, "unnamed": {factor: {"model": rate, "world": rate}}}``.
    """
    scores = score_images(classifier, images)
    named = named_factors(prompt)
    out: dict = {"prompt": prompt, "n": len(images), "named": {}, "unnamed": {}}
    for factor, phrase in named.items():
        col = scores[:, classifier.index(factor)]
        out["named"][factor] = float(np.mean([phrase_reads_true(phrase, v) for v in col.tolist()]))
    world = world_rates(prompt)
    for factor in BINARY_FACTORS:
        if factor not in named:
            rate = float((scores[:, classifier.index(factor)] > 0).float().mean())
            out["unnamed"][factor] = {"model": rate, "world": world[factor]}
    return out


#: Every pair of phrases that name the same factor ("hat" / "no hat", "facing left" / "facing right", ...).
OPPOSITE_PHRASES: tuple[tuple[str, str], ...] = tuple(
    (a.text, b.text) for i, a in enumerate(PHRASES) for b in PHRASES[i + 1 :] if a.factor == b.factor
)


@torch.no_grad()
def phrase_signal(
    pipe,
    pairs: Sequence[tuple[str, str]] = OPPOSITE_PHRASES,
    timestep: int = 700,
    n: int = 16,
    seed: int = 0,
) -> dict:
    """How much of each phrase pair's difference reaches the U-Net, per cross-attention layer.

    The U-Net is run once on ``n`` noise latents at ``timestep`` under the empty prompt, recording
    what enters every cross-attention layer (``attn2``); each layer is then called on those inputs
    with the encodings of phrase a and of phrase b. The signal of a pair at a layer is the mean norm
    of the difference of the two outputs over the mean norm of the layer's input: 0 when the U-Net
    cannot tell the phrases apart there, whatever the text encoder does. Also returned per layer:
    the mean largest attention weight of a query under the empty prompt (1 / positions is uniform
    attention, which reads only the average of the prompt's positions); and per pair, the text
    encoder's side of it: the norm of the difference of the two encodings averaged over the
    positions, over the norm of one such average (what uniform attention reads of the pair).

    Returns ``{"layers": [...], "uniform_weight": float, "largest_weight": [...], "signal": {"a / b":
    [...]}, "encoding_difference": {"a / b": float}}``.
    """
    unet, tokenizer, text_encoder = pipe.unet, pipe.tokenizer, pipe.text_encoder
    layers = {name: m for name, m in unet.named_modules() if name.endswith("attn2")}
    if not layers:
        raise ValueError("the U-Net has no cross-attention layers (attn2)")
    device = next(unet.parameters()).device

    def encode(prompt: str) -> torch.Tensor:
        """The prompt's encoding once, repeated for the ``n`` latents."""
        ids = tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        return text_encoder(ids.to(device))[0].expand(n, -1, -1)

    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
        for name, m in layers.items()
    ]
    try:
        gen = torch.Generator().manual_seed(seed)
        shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        empty = encode("")
        unet(torch.randn(shape, generator=gen).to(device), torch.full((n,), timestep, device=device), empty)
    finally:
        for h in hooks:
            h.remove()
    largest = []
    for name, m in layers.items():
        q = m.head_to_batch_dim(m.to_q(inputs[name]))
        k = m.head_to_batch_dim(m.to_k(empty))
        largest.append(float(m.get_attention_scores(q, k).max(-1).values.mean()))
    signal, encoding_difference = {}, {}
    for a, b in pairs:
        ea, eb = encode(a), encode(b)
        mean_a, mean_b = ea[0].mean(0), eb[0].mean(0)
        encoding_difference[f"{a} / {b}"] = float((mean_a - mean_b).norm() / mean_a.norm())
        signal[f"{a} / {b}"] = [
            float(
                (m(inputs[name], ea) - m(inputs[name], eb)).norm(dim=-1).mean()
                / inputs[name].norm(dim=-1).mean()
            )
            for name, m in layers.items()
        ]
    return {
        "layers": list(layers),
        "uniform_weight": 1.0 / empty.shape[1],
        "largest_weight": largest,
        "signal": signal,
        "encoding_difference": encoding_difference,
    }


def save_grid(rows: Sequence[torch.Tensor], path: str | Path, scale: int = 3) -> Path:
    """Write image rows (each [N, 3, H, W] in [0, 1]) as one PNG, upscaled ``scale`` times."""
    from PIL import Image

    grid = torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2)  # [3, R*H, N*W]
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    img.save(path)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    from diffusers import StableDiffusionPipeline

    from hspace.toy import TOY_TEXT_MODEL_DIR, load_toy_classifier

    p = argparse.ArgumentParser(description="Prompt adherence of the text toy, read by the toy classifier")
    p.add_argument("--model", type=Path, default=TOY_TEXT_MODEL_DIR)
    p.add_argument("--n", type=int, default=32, help="samples per prompt")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument(
        "--grid", type=Path, default=None, help="write a PNG grid of the first 12 samples per prompt"
    )
    p.add_argument("--prompts", nargs="*", default=list(REPORT_PROMPTS))
    p.add_argument(
        "--first-seed",
        type=int,
        default=5_000_000,
        help="seeds first-seed .. first-seed + n - 1 (default: the prompt tests' seeds; "
        "6000000 was used to choose the shipped weights' training steps)",
    )
    p.add_argument(
        "--phrase-signal",
        action="store_true",
        help="print how much each pair of opposite phrases reaches the U-Net (no sampling) and exit",
    )
    a = p.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(
        a.model, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    if a.phrase_signal:
        res = phrase_signal(pipe)
        print(
            f"largest attention weight per layer (uniform {res['uniform_weight']:.3f}): "
            + " ".join(f"{w:.3f}" for w in res["largest_weight"])
        )
        for pair, values in res["signal"].items():
            print(
                f"{pair:32s} max {max(values):.3f}  per layer "
                + " ".join(f"{v:.3f}" for v in values)
                + f"  encoding difference {res['encoding_difference'][pair]:.3f}"
            )
        return
    clf = load_toy_classifier()
    seeds = list(range(a.first_seed, a.first_seed + a.n))
    report = generate_report(pipe, a.prompts, seeds, a.guidance, a.steps)
    for prompt, images in report.items():
        print(json.dumps(adherence(images, prompt, clf)), flush=True)
    if a.grid:
        print(f"wrote {save_grid([images[:12] for images in report.values()], a.grid)}")


if __name__ == "__main__":
    main()
