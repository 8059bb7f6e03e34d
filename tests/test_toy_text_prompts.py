"""Prompts work on the shipped text toy, sampled with diffusers' own pipeline and read by the toy classifier.

At the default guidance (:data:`hspace.toy.text_evaluate.DEFAULT_GUIDANCE` = 7.5, DDPM with
:data:`~hspace.toy.text_evaluate.DEFAULT_STEPS` = 20 steps, 20 seeds per prompt) a named phrase reads
true on at least 90% of samples: measured on the shipped model (2750 denoiser steps) for hair, glasses,
eyes, skin tone and "not smiling" (0.90-1.00). Hat (0.45 / 0.80), "smiling" (0.40) and pose
(0.20-0.40) do not hold yet and are marked xfail with their numbers. Unnamed binary factors drift from
the world's rates under guidance (mean gap 0.19, worst 0.50: "glasses" brings grey hair on every
sample, the world's 0.8), so only the correlated pair's direction and a loose bound are asserted.
Every test logs its numbers (``pytest -s``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from hspace.toy import load_toy_classifier, load_toy_text_pipeline
from hspace.toy.captions import PHRASES, named_factors
from hspace.toy.evaluate import image_quality
from hspace.toy.text_evaluate import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    OPPOSITE_PHRASES,
    adherence,
    generate_report,
    phrase_signal,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("all_torch_threads")]

N = 20  # samples per prompt: >= 90% means at most 2 misses
SEEDS = list(range(5_000_000, 5_000_000 + N))  # the seeds of `python -m hspace.toy.text_evaluate`
#: phrases the shipped model does not follow on 90% of samples yet (measured fraction)
NOT_YET = {
    "hat": 0.45,
    "no hat": 0.80,
    "smiling": 0.40,
    "facing left": 0.35,
    "facing forward": 0.20,
    "facing right": 0.40,
}
COMBINED = ["grey hair, no glasses, eyes open", "dark hair, glasses, not smiling, light skin"]
SINGLE = [p.text for p in PHRASES]


@pytest.fixture(scope="module")
def reports():
    pipe, clf = load_toy_text_pipeline(), load_toy_classifier()
    images = generate_report(pipe, SINGLE + COMBINED + [""], SEEDS, DEFAULT_GUIDANCE, DEFAULT_STEPS)
    return {p: adherence(im, p, clf) | {"images": im} for p, im in images.items()}, clf


def _log(title: str, payload) -> None:
    print(f"\n[claim] {title}: {json.dumps(payload, default=float)}")


@pytest.mark.parametrize(
    "prompt",
    [
        pytest.param(p, marks=pytest.mark.xfail(reason=f"measured {NOT_YET[p]:.2f}", strict=False))
        if p in NOT_YET
        else p
        for p in SINGLE + COMBINED
    ],
)
def test_a_named_phrase_reads_true_on_at_least_90_percent_of_samples(reports, prompt):
    reps, _ = reports
    named = reps[prompt]["named"]
    _log(
        f"named phrase true: {prompt!r} (guidance {DEFAULT_GUIDANCE}, {DEFAULT_STEPS} DDPM steps, n={N})",
        named,
    )
    assert set(named) == set(named_factors(prompt))
    assert min(named.values()) >= 0.9, named


def test_unnamed_binary_factors_stay_near_the_worlds_rates(reports):
    """Single-phrase prompts: the mean gap to the world's rate (given the phrase) over all (prompt, factor) pairs.

    Measured 0.19 (worst 0.50); n = 20 alone gives gaps of about 0.09 on average.
    """
    reps, _ = reports
    gaps = {
        f"{p} / {f}": round(v["model"] - v["world"], 3) for p in SINGLE for f, v in reps[p]["unnamed"].items()
    }
    _log("unnamed rate gaps (model - world)", gaps)
    assert np.mean(np.abs(list(gaps.values()))) <= 0.25


def test_the_model_keeps_the_worlds_correlated_pair(reports):
    reps, _ = reports
    grey, dark = reps["grey hair"]["unnamed"]["glasses"], reps["dark hair"]["unnamed"]["glasses"]
    _log("glasses rate under hair prompts", {"grey hair": grey, "dark hair": dark})
    assert grey["model"] - dark["model"] >= 0.35  # world: 0.8 - 0.2 = 0.6; measured 0.85 - 0.10


def test_the_empty_prompt_samples_the_world(reports):
    reps, clf = reports
    q = image_quality(reps[""]["images"], clf)
    _log("empty prompt quality", q)
    assert q["confident_fraction"] >= 0.8
    for name, f in q["frequencies"].items():
        assert abs(f["model"] - f["generator"]) <= 0.3, name  # n = 20: 2.7 standard errors


def test_phrases_the_model_does_not_follow_barely_reach_its_cross_attention():
    """Why the phrases in NOT_YET fail: the pairs of opposite phrases the model follows change what
    its cross-attention layers return by more than any pair of which neither phrase is followed
    (``phrase_signal``, no sampling). Measured on the shipped weights: followed pairs 0.105-0.257
    (largest over the layers, relative to the layer's input), hat / no hat 0.042, the pose pairs
    0.009-0.023; attention is almost uniform (largest weight 0.041-0.050 against 1/32). The text
    encoder's outputs averaged over the positions (what uniform attention reads) tell the followed
    pairs apart more than twice as well as the others."""
    res = phrase_signal(load_toy_text_pipeline())
    signal = {pair: max(v) for pair, v in res["signal"].items()}
    encoding = res["encoding_difference"]
    _log("phrase signal (largest over cross-attention layers)", signal)
    _log("encoding difference (averaged over the prompt positions)", encoding)
    followed = [f"{a} / {b}" for a, b in OPPOSITE_PHRASES if a not in NOT_YET and b not in NOT_YET]
    neither = [f"{a} / {b}" for a, b in OPPOSITE_PHRASES if a in NOT_YET and b in NOT_YET]
    assert followed and neither
    assert min(signal[p] for p in followed) > 2 * max(signal[p] for p in neither), signal
    # the text encoder's side: measured followed 0.295-0.637, neither 0.038-0.133
    assert min(encoding[p] for p in followed) > 1.5 * max(encoding[p] for p in neither), encoding
