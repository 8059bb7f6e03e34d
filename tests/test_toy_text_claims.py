"""h-space claims on the shipped text toy: directions found under the empty prompt, applied there.

As ``tests/test_toy_claims.py`` does for the unconditional toy: PCA directions and supervised
mean-difference directions (paper eq. 11) are found from h recorded under the empty prompt
(no guidance: both branches would see the same prompt), applied to held-out seeds with identical
noise, and compared with matched-norm random directions; the toy classifier reads the effect (logits
for binary factors). Every test logs its numbers (``pytest -s``).
"""

from __future__ import annotations

import json

import pytest
import torch

from hspace.classifier import score_images
from hspace.directions import random_like, supervised_direction
from hspace.pca import PerTimestepPCA
from hspace.sampling import HSpaceSampler
from hspace.toy import load_toy_classifier, load_toy_text_model
from hspace.toy.evaluate import edit_effects, with_step_norms

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("all_torch_threads")]

STEPS = 20  # DDPM steps (eta = 1)
N_TRAIN = 256  # annotated samples for PCA and supervised directions
N_EVAL = 32  # held-out seeds per effect
N_RANDOM = 4  # random draws per baseline
TRAIN_SEEDS = list(range(1_100_000, 1_100_000 + N_TRAIN))
EVAL_SEEDS = list(range(2_100_000, 2_100_000 + N_EVAL))
Q = 0.2  # top / bottom quantile of the mean difference
STRONG = ["grey_hair", "glasses", "hat"]
EMPTY = {"prompt": "", "guidance_scale": 1.0}


def log(title: str, payload: dict) -> None:
    print(f"\n[claim] {title}: {json.dumps(payload, default=float)}")


@pytest.fixture(scope="module")
def world():
    model, clf = load_toy_text_model(), load_toy_classifier()
    sampler = HSpaceSampler(model, sampler="ddpm", num_inference_steps=STEPS)
    traj = sampler.sample(TRAIN_SEEDS, **EMPTY)
    return {
        "model": model,
        "clf": clf,
        "sampler": sampler,
        "traj": traj,
        "scores": score_images(clf, traj.images),
    }


def test_h_is_recorded_under_the_empty_prompt(world):
    traj = world["traj"]
    assert tuple(traj.h.shape) == (N_TRAIN, STEPS, 64, 8, 8)
    assert torch.isfinite(traj.h).all()


def test_pca_directions_move_attributes_far_more_than_random(world):
    """Top principal directions each move some attribute beyond 5x the random 95th percentile."""
    clf, sampler, traj = world["clf"], world["sampler"], world["traj"]
    pca = PerTimestepPCA(n_components=6, n_steps=STEPS, timesteps=sampler.timesteps)
    for i in range(0, N_TRAIN, 128):
        pca.partial_fit(traj.h[i : i + 128])
    k = 4
    norms = 2.0 * pca.explained_variance_[:, 0].sqrt().float()  # every edit: 2 sigma of component 0
    pcs = [with_step_norms(pca.direction(j, name=f"pc{j}"), norms) for j in range(k)]
    rnd = [
        with_step_norms(random_like(pcs[0], seed=300 + r, name=f"random{r}"), norms) for r in range(N_RANDOM)
    ]
    eff = edit_effects(sampler, clf, pcs + rnd, EVAL_SEEDS, [1.0], conditioning=EMPTY)
    mean = eff.mean()[:, 0].abs()  # [D, A]
    p95 = torch.quantile(mean[k:], 0.95, dim=0)
    ratio = (mean[:k] / p95.clamp_min(1e-6)).max(1)
    log("pca best attribute and ratio to random p95", {
        pcs[j].name: [clf.attributes[int(ratio.indices[j])], round(float(ratio.values[j]), 2)] for j in range(k)
    })  # fmt: skip
    strong = [j for j in range(k) if ratio.values[j] >= 5.0]
    assert len(strong) >= 3, f"only {strong} of the top {k} PCs beat 5x the random p95"


def test_supervised_directions_move_their_attribute_on_90_percent_of_seeds(world):
    """Mean-difference directions move their own attribute toward the state a seed lacks, >= 5x random."""
    clf, sampler, traj, scores = world["clf"], world["sampler"], world["traj"], world["scores"]
    ts, fp = sampler.timesteps, world["model"].fingerprint
    dirs = [
        supervised_direction(traj.h, scores[:, clf.index(a)], Q, a, timesteps=ts, model_fingerprint=fp)
        for a in STRONG
    ]
    eff = edit_effects(sampler, clf, dirs, EVAL_SEEDS, [1.0], toward_absent=STRONG, conditioning=EMPTY)
    rnd_dirs = [random_like(d, seed=17 + r, name=f"{d.name}_random{r}") for d in dirs for r in range(2)]
    rnd = edit_effects(sampler, clf, rnd_dirs, EVAL_SEEDS, [1.0], conditioning=EMPTY)
    report = {}
    for i, a in enumerate(STRONG):
        c = clf.index(a)
        d = eff.deltas[i, 0, :, c] * eff.signs[i]
        rnd_mean = rnd.deltas[2 * i : 2 * i + 2, 0, :, c].mean(1).abs().max()
        report[a] = {
            "frac_intended": float((d > 0).float().mean()),
            "mean": float(d.mean()),
            "random_abs_mean": float(rnd_mean),
            "ratio": float(d.mean() / rnd_mean.clamp_min(1e-6)),
        }
    log("supervised (h, empty prompt)", report)
    for a, r in report.items():
        assert r["frac_intended"] >= 0.9, (a, r)
        assert r["ratio"] >= 5, (a, r)
