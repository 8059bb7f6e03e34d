"""Prompts work on the shipped text toy, sampled with diffusers' own pipeline and read by the toy classifier.

At the default guidance (:data:`hspace.toy.text_evaluate.DEFAULT_GUIDANCE`, DDPM with
:data:`~hspace.toy.text_evaluate.DEFAULT_STEPS` steps) every phrase a prompt names reads true on at
least 90% of samples; the binary factors it leaves unnamed keep the world's rates given the named
ones (the correlated pair included: "grey hair" brings glasses, "dark hair" mostly not); the empty
prompt samples the world. Every test logs its numbers (``pytest -s``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from hspace.toy import load_toy_classifier, load_toy_text_pipeline
from hspace.toy.captions import PHRASES
from hspace.toy.evaluate import image_quality
from hspace.toy.text_evaluate import DEFAULT_GUIDANCE, DEFAULT_STEPS, adherence, generate_report

pytestmark = pytest.mark.slow

N = 20  # samples per prompt: >= 90% means at most 2 misses
SEEDS = list(range(6_000_000, 6_000_000 + N))
COMBINED = [
    "grey hair, no glasses, hat",
    "dark hair, glasses, smiling, facing left",
    "eyes closed, facing right, dark skin",
]
SINGLE = [p.text for p in PHRASES]


@pytest.fixture(scope="module")
def reports():
    pipe, clf = load_toy_text_pipeline(), load_toy_classifier()
    images = generate_report(pipe, SINGLE + COMBINED + [""], SEEDS, DEFAULT_GUIDANCE, DEFAULT_STEPS)
    return {p: adherence(im, p, clf) | {"images": im} for p, im in images.items()}, clf


def _log(title: str, payload) -> None:
    print(f"\n[claim] {title}: {json.dumps(payload, default=float)}")


def test_every_named_phrase_reads_true_on_at_least_90_percent_of_samples(reports):
    reps, _ = reports
    table = {p: r["named"] for p, r in reps.items() if p}
    _log(f"named phrase true (guidance {DEFAULT_GUIDANCE}, {DEFAULT_STEPS} DDPM steps, n={N})", table)
    failures = {p: named for p, named in table.items() if min(named.values()) < 0.9}
    assert not failures, failures


def test_unnamed_binary_factors_keep_the_worlds_rates(reports):
    """Single-phrase prompts: each unnamed binary factor's rate is near the world's (given the phrase).

    n = 20 per prompt gives a binomial standard error up to 0.11; the bound is on the mean absolute
    gap over all (prompt, factor) pairs (0.12) and on the worst one (0.35).
    """
    reps, _ = reports
    gaps = {
        f"{p} / {f}": round(v["model"] - v["world"], 3) for p in SINGLE for f, v in reps[p]["unnamed"].items()
    }
    _log("unnamed rate gaps (model - world)", gaps)
    assert np.mean(np.abs(list(gaps.values()))) <= 0.12
    assert max(np.abs(list(gaps.values()))) <= 0.35


def test_the_model_keeps_the_worlds_correlated_pair(reports):
    reps, _ = reports
    grey, dark = reps["grey hair"]["unnamed"]["glasses"], reps["dark hair"]["unnamed"]["glasses"]
    _log("glasses rate under hair prompts", {"grey hair": grey, "dark hair": dark})
    assert grey["model"] - dark["model"] >= 0.35  # world: 0.8 - 0.2 = 0.6


def test_the_empty_prompt_samples_the_world(reports):
    reps, clf = reports
    q = image_quality(reps[""]["images"], clf)
    _log("empty prompt quality", q)
    assert q["confident_fraction"] >= 0.8
    for name, f in q["frequencies"].items():
        assert abs(f["model"] - f["generator"]) <= 0.3, name  # n = 20: 2.7 standard errors
