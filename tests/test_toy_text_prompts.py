"""Prompts work on the shipped text toy, sampled with diffusers' own pipeline and read by the toy classifier.

At the default guidance (:data:`hspace.toy.text_evaluate.DEFAULT_GUIDANCE` = 7.5, DDPM with
:data:`~hspace.toy.text_evaluate.DEFAULT_STEPS` = 20 steps, 20 seeds per prompt) every named phrase
reads true on at least 90% of samples (measured 1.00 for all fifteen phrases and both combinations).
Unnamed binary factors drift from the world's rates under guidance (the mean gap is bounded; the
world's correlated pair must keep its direction), and the empty prompt samples the world. Every
test logs its numbers (``pytest -s``).
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
COMBINED = ["grey hair, no glasses, eyes open", "dark hair, glasses, not smiling, light skin"]
SINGLE = [p.text for p in PHRASES]


@pytest.fixture(scope="module")
def reports():
    pipe, clf = load_toy_text_pipeline(), load_toy_classifier()
    images = generate_report(pipe, SINGLE + COMBINED + [""], SEEDS, DEFAULT_GUIDANCE, DEFAULT_STEPS)
    return {p: adherence(im, p, clf) | {"images": im} for p, im in images.items()}, clf


def _log(title: str, payload) -> None:
    print(f"\n[claim] {title}: {json.dumps(payload, default=float)}")


@pytest.mark.parametrize("prompt", SINGLE + COMBINED)
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

    Measured 0.20 (worst 0.51: eyes open under "not smiling"); n = 20 alone gives gaps of about
    0.09 on average.
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
    assert grey["model"] - dark["model"] >= 0.35  # world: 0.8 - 0.2 = 0.6; measured 1.00 - 0.10


def test_the_empty_prompt_samples_the_world(reports):
    reps, clf = reports
    q = image_quality(reps[""]["images"], clf)
    _log("empty prompt quality", q)
    assert q["confident_fraction"] >= 0.8
    for name, f in q["frequencies"].items():
        assert abs(f["model"] - f["generator"]) <= 0.3, name  # n = 20: 2.7 standard errors


def test_every_pair_of_opposite_phrases_reaches_the_unets_cross_attention():
    """The text path is open for every phrase (``phrase_signal``, no sampling): each pair of opposite
    phrases changes what some cross-attention layer returns by at least 0.1 of the layer's input,
    and the text encoder's outputs averaged over the prompt positions (what near-uniform attention
    reads) by at least 0.3. Measured on the shipped weights: 0.198-0.837 and 0.466-1.222. A model
    trained on epsilon prediction alone did not follow hat, smiling or pose, and its pairs for them
    measured 0.009-0.048 and 0.038-0.253 (docs/text-toy.md)."""
    res = phrase_signal(load_toy_text_pipeline())
    signal = {pair: max(v) for pair, v in res["signal"].items()}
    encoding = res["encoding_difference"]
    _log("phrase signal (largest over cross-attention layers)", signal)
    _log("encoding difference (averaged over the prompt positions)", encoding)
    assert set(signal) == {f"{a} / {b}" for a, b in OPPOSITE_PHRASES}
    assert min(signal.values()) >= 0.1, signal
    assert min(encoding.values()) >= 0.3, encoding
