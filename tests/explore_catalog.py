"""A small real catalog on the shipped toy model, built in-process (no Ray) for the explorer's tests.

Two versions of model ``toy-faces``: the older holds three PCA directions from fewer samples; the
newer (ref ``latest``) holds PCA directions, supervised glasses and grey-hair directions, the
glasses direction disentangled from grey hair, and a matched-norm random baseline (no sigma), with
edit-strip previews and an effect matrix scored by the shipped classifier on the preview renders.
Every direction of the newer version carries its grade (:mod:`hspace.grade`, against the random
baseline's band; the baseline is rendered with the glasses direction's sigma, as the pipeline's
evaluate stage does), with a ``leakage`` entry (the direction's effect on its cross attribute b as
a share of b's own supervised direction's effect on b) where grade.py does not write one itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch

MODEL = "toy-faces"
ATTRIBUTES = ("glasses", "grey_hair")
PREVIEW_SEEDS = [1000, 1001]
PREVIEW_SCALES = [-2.0, 0.0, 2.0]


def build_explore_catalog(
    url: str, storage_options: Mapping[str, Any] | None = None, *, steps: int = 10, n_samples: int = 48
) -> dict[str, Any]:
    """Publish the two versions to ``url``; returns {"old": id, "new": id, "directions": names}."""
    from hspace import HSpaceSampler
    from hspace import catalog as hcat
    from hspace.directions import disentangle, projection_sigma, random_like, supervised_direction
    from hspace.grade import grade_directions
    from hspace.pca import PerTimestepPCA
    from hspace.toy import load_toy_classifier, load_toy_model
    from pipeline.evaluate import effect_matrix, own_attributes, seed_effects
    from pipeline.report import edit_strip_png

    model = load_toy_model()
    clf = load_toy_classifier()
    sampler = HSpaceSampler(model, sampler="ddpm", num_inference_steps=steps)
    traj = sampler.sample(list(range(n_samples)))
    assert traj.h is not None
    with torch.no_grad():
        scores = clf(traj.images)
    fp, ts = model.fingerprint, sampler.timesteps

    def pca_of(h: torch.Tensor, k: int) -> list:
        pca = PerTimestepPCA(n_components=k, n_steps=steps, timesteps=ts, model_fingerprint=fp)
        return pca.partial_fit(h).directions(k)

    supervised = {
        a: supervised_direction(traj.h, scores[:, clf.index(a)], 0.25, a, timesteps=ts, model_fingerprint=fp)
        for a in ATTRIBUTES
    }
    clean = disentangle(supervised["glasses"], supervised["grey_hair"], name="glasses_disentangled")
    clean = replace(clean, sigma=projection_sigma(traj.h, clean.vector))
    directions = [*pca_of(traj.h, 3), *supervised.values(), clean]
    baseline = random_like(supervised["glasses"], seed=7, name="glasses_random7")

    # previews and effects from one batch of edit renders (sigma units, as the pipeline's evaluate)
    previews, edited = {}, {}
    for d in directions:
        images = sampler.sample_edits(PREVIEW_SEEDS, d, PREVIEW_SCALES, units="sigma")
        strip = (images * 255).round().to(torch.uint8).numpy()
        previews[f"previews/{d.name}.png"] = edit_strip_png(strip)
        with torch.no_grad():
            s = clf(images.flatten(0, 1)).view(len(PREVIEW_SEEDS), len(PREVIEW_SCALES), -1)
        edited[d.name] = s[:, [0, 2]][..., [clf.index(a) for a in ATTRIBUTES]].numpy()
    # the random baseline's band: rendered with the sigma of the direction it is matched to
    matched = replace(baseline, sigma=supervised["glasses"].sigma)
    images = sampler.sample_edits(PREVIEW_SEEDS, matched, PREVIEW_SCALES, units="sigma")
    with torch.no_grad():
        s = clf(images.flatten(0, 1)).view(len(PREVIEW_SEEDS), len(PREVIEW_SCALES), -1)
    edited[baseline.name] = s[:, [0, 2]][..., [clf.index(a) for a in ATTRIBUTES]].numpy()
    with torch.no_grad():
        base = clf(sampler.sample(PREVIEW_SEEDS, record_h=False).images)[
            :, [clf.index(a) for a in ATTRIBUTES]
        ]
    effects = effect_matrix(
        base.numpy().astype(np.float64),
        edited,
        [-2.0, 2.0],
        list(ATTRIBUTES),
        [True] * len(ATTRIBUTES),
        {baseline.name: "glasses"},
        {d.name: d.kind for d in [*directions, baseline]},
    ) | {"units": "sigma"}
    # what each supervised direction was built from (the pipeline records it in its provenance)
    own = own_attributes({d.name: d for d in [*directions, baseline]})
    own |= {a: a for a in ATTRIBUTES} | {clean.name: "glasses"}
    base_scores = base.numpy().astype(np.float64)
    grades = grade_directions(effects, own, seed_effect=seed_effects(base_scores, edited, [-2.0, 2.0]))
    add_leakage(grades, effects, {a: supervised[a].name for a in ATTRIBUTES}, skip={baseline.name})

    cat = hcat.open(url, storage_options)
    meta = {
        "model_id": "toy",
        "model_fingerprint": fp,
        "sampler": {"kind": "ddpm", "num_inference_steps": steps, "eta": 1.0},
    }
    old = cat.publish(MODEL, pca_of(traj.h[: n_samples // 2], 3), metadata=meta, ref="stable")
    new = cat.publish(
        MODEL, [*directions, baseline], effects=effects, extra_files=previews, metadata=meta, grades=grades
    )
    names = [d.name for d in [*directions, baseline]]
    return {"old": old, "new": new, "directions": names, "grades": grades}


def add_leakage(
    grades: dict[str, dict[str, Any]],
    effects: Mapping[str, Any],
    reference: Mapping[str, str],
    skip: frozenset[str] | set[str] = frozenset(),
) -> None:
    """Give each grade without one a ``leakage`` entry for its cross attribute b: the direction's
    effect on b as a share of what b's own supervised direction (``reference[b]``) does to b.
    Directions in ``skip`` (the random baseline) get none, so the page meets grades without it."""
    m = effects["matrix"]
    row = {n: i for i, n in enumerate(m["rows"])}
    for name, grade in grades.items():
        cross = grade.get("cross")
        if name in skip or "leakage" in grade or not cross or cross["attribute"] not in reference:
            continue
        b = cross["attribute"]
        ref_name = reference[b]
        ref_effect = m["effect"][row[ref_name]][m["columns"].index(b)]
        if ref_name == name or not ref_effect:
            continue
        grade["leakage"] = {
            "attribute": b,
            "share": cross["effect"] / ref_effect,
            "effect": cross["effect"],
            "reference": ref_effect,
            "reference_direction": ref_name,
        }
