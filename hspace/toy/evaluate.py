"""Measuring what a direction does on the toy world, with the attribute classifier as the judge.

The paper judges edits by eye and by CLIP (Table I); here the classifier of the toy world reads
every factor, so an edit's effect is a number: the mean change of each attribute's score (logit
for binary factors, value for continuous ones; logits because probabilities saturate) between
the edited and the unedited render of the same seeds, with identical noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hspace.classifier import score_images
from hspace.directions import Direction
from hspace.sampling import Edit, HSpaceSampler
from hspace.toy.classifier import AttributeClassifier
from hspace.toy.world import FACTORS, make_dataset


@dataclass
class EditEffects:
    """Per-seed score changes of edits: ``deltas`` [D, S, B, A] = score(edited) - score(unedited).

    Rows follow ``names`` (directions), ``scales`` the edit strengths, ``seeds`` the renders and
    ``attributes`` the classifier outputs.
    """

    names: list[str]
    scales: list[float]
    seeds: list[int]
    attributes: list[str]
    base_scores: torch.Tensor  # [B, A]
    deltas: torch.Tensor  # [D, S, B, A]
    #: [D, B]: the sign each seed's scales were multiplied by (all +1 unless ``toward_absent``)
    signs: torch.Tensor | None = None

    def mean(self) -> torch.Tensor:
        """Mean effect over seeds [D, S, A]."""
        return self.deltas.mean(2)

    def column(self, attribute: str) -> int:
        return self.attributes.index(attribute)


def edit_effects(
    sampler: HSpaceSampler,
    classifier: AttributeClassifier,
    directions: Sequence[Direction],
    seeds: Sequence[int],
    scales: Sequence[float],
    *,
    mode: str = "both",
    units: str = "raw",
    batch_size: int | None = None,
    toward_absent: Sequence[str | None] | None = None,
    conditioning: dict | None = None,
) -> EditEffects:
    """Render every seed unedited and edited by each direction at each scale; score all renders.

    One unedited render per seed serves every direction (same seed, same noise), so each effect
    is a paired difference.

    ``toward_absent[i]`` names a binary attribute for direction i (or None): seeds whose unedited
    render already shows it (logit > 0) are edited with negated scales, so every edit points to the
    state the seed lacks. Why: adding glasses to a face that wears them moves a saturated logit by
    noise only, which says nothing about the direction. ``signs`` records the sign per seed.

    ``conditioning`` (``prompt``, ``negative_prompt``, ``class_labels``, ``guidance_scale``) is
    passed to every render of a conditional model, the unedited one included.
    """
    seeds = list(seeds)
    cond = dict(conditioning or {})
    base = sampler.sample(seeds, record_h=False, batch_size=batch_size, **cond).images
    base_scores = score_images(classifier, base)
    targets = list(toward_absent) if toward_absent is not None else [None] * len(directions)
    if len(targets) != len(directions):
        raise ValueError(f"toward_absent has {len(targets)} entries for {len(directions)} directions")
    deltas, signs = [], []
    for d, target in zip(directions, targets, strict=True):
        sign = torch.ones(len(seeds))
        if target is not None:
            col = classifier.index(target)
            if not classifier.binary[col]:
                raise ValueError(f"toward_absent needs a binary attribute, {target!r} is continuous")
            sign = torch.where(base_scores[:, col] > 0, -1.0, 1.0)
        row_scales = (sign[:, None] * torch.tensor([float(s) for s in scales])[None, :]).reshape(-1, 1)
        row_seeds = [seed for seed in seeds for _ in scales]  # row b * S + j: seed b at scale j
        row_cond = {
            k: ([v[i] for i in range(len(seeds)) for _ in scales] if isinstance(v, (list, tuple)) else v)
            for k, v in cond.items()
        }  # per-seed prompts / labels follow their seed's rows
        imgs = sampler.sample(
            row_seeds,
            edit=Edit(d, scales=row_scales, mode=mode, units=units),
            record_h=False,
            batch_size=batch_size,
            **row_cond,
        ).images
        scores = score_images(classifier, imgs).view(len(seeds), len(scales), -1)  # [B, S, A]
        deltas.append((scores - base_scores[:, None, :]).permute(1, 0, 2))
        signs.append(sign)
    return EditEffects(
        names=[d.name for d in directions],
        scales=[float(s) for s in scales],
        seeds=seeds,
        attributes=list(classifier.attributes),
        base_scores=base_scores,
        deltas=torch.stack(deltas),
        signs=torch.stack(signs),
    )


def with_step_norms(direction: Direction, norms: torch.Tensor, name: str | None = None) -> Direction:
    """``direction`` rescaled so that its vector has the given per-step norms [T] (equal-norm comparisons)."""
    v = direction.vector
    own = v.flatten(1).norm(dim=1) if v.ndim == 4 else v.norm().reshape(1)
    factor = (norms.to(v.dtype) / own.clamp_min(1e-12)).reshape(-1, *([1] * 3))
    vec = v * factor if v.ndim == 4 else (v * factor[0])
    return Direction(
        vector=vec,
        name=name or direction.name,
        kind=direction.kind,
        units=direction.units,
        sigma=direction.sigma,
        timesteps=direction.timesteps,
        model_fingerprint=direction.model_fingerprint,
        provenance={**direction.provenance, "rescaled_to_step_norms": True},
    )


@torch.no_grad()
def sample_quality(
    sampler: HSpaceSampler,
    classifier: AttributeClassifier,
    seeds: Sequence[int],
    margin: float = 2.0,
    batch_size: int | None = None,
) -> dict:
    """How world-like the model's samples of ``seeds`` are; see :func:`image_quality`."""
    images = sampler.sample(list(seeds), record_h=False, batch_size=batch_size).images
    return image_quality(images, classifier, margin)


def confident_reads(
    scores: torch.Tensor, classifier: AttributeClassifier, margin: float = 2.0
) -> torch.Tensor:
    """[...] bool: renders whose every binary logit in ``scores`` [..., A] is at least ``margin`` from 0.

    The classifier reads such a render unambiguously: a face of the toy world. A broken render
    (an edit pushed far off the faces) reads near 0 on some factor, so a logit past 0 on it is no
    evidence that the factor changed.
    """
    binary_cols = [i for i, b in enumerate(classifier.binary) if b]
    return (scores[..., binary_cols].abs() >= margin).all(-1)


@torch.no_grad()
def image_quality(images: torch.Tensor, classifier: AttributeClassifier, margin: float = 2.0) -> dict:
    """How world-like model samples ``images`` [N, 3, H, W] are, judged by the classifier.

    ``confident_fraction``: share of samples whose every binary logit has magnitude >= ``margin``
    (the classifier reads them unambiguously). ``frequencies``: rate of each binary factor among
    model samples next to the generator's own rate on as many fresh generator images.
    ``background``: mean saturation and value of the background (the top rows, never covered by
    a face) in model samples next to generator images; colour drift of a model shows here first.
    """
    n = len(images)
    scores = score_images(classifier, images)
    real, labels = make_dataset(range(30_000_000, 30_000_000 + n))
    real_t = torch.from_numpy(real).permute(0, 3, 1, 2).float() / 255.0
    out: dict = {"n": n, "margin": margin, "frequencies": {}}
    binary_cols = [i for i, b in enumerate(classifier.binary) if b]
    out["confident_fraction"] = float(confident_reads(scores, classifier, margin).float().mean())
    for i in binary_cols:
        name = classifier.attributes[i]
        out["frequencies"][name] = {
            "model": float((scores[:, i] > 0).float().mean()),
            "generator": float(np.mean(labels[:, FACTORS.index(name)])),
        }
    model_bg, real_bg = background_colour(images), background_colour(real_t)
    out["background"] = {
        key: {"model": float(model_bg[:, i].mean()), "generator": float(real_bg[:, i].mean())}
        for i, key in enumerate(("saturation", "value"))
    }
    return out


def background_colour(images: torch.Tensor, rows: int = 3) -> torch.Tensor:
    """HSV saturation and value [N, 2] of the mean colour of each image's top ``rows`` rows.

    In the toy world no face, hair or hat reaches the top three rows at 32 x 32, so these pixels
    are pure background.
    """
    rgb = images[..., :rows, :].clamp(0, 1).mean(dim=(-2, -1))  # [N, 3]
    value = rgb.max(dim=-1).values
    saturation = (value - rgb.min(dim=-1).values) / value.clamp_min(1e-6)
    return torch.stack([saturation, value], dim=-1)
