"""A grade for every evaluated direction: does it do what it says, measurably more than a random edit?

Inputs are the evaluate stage's effects (``pipeline.evaluate.effect_matrix``): per direction and
attribute the symmetric effect ``(score(+gamma) - score(-gamma)) / 2``, the share of held-out seeds
whose own change was positive, and per attribute the spread of the matched-norm random directions.

The *band* of an attribute is the 95th percentile of |effect| over the random directions (an edit of
the same norm in a random direction moves the score this much in 1 of 20 cases). Everything is
measured against it:

- ``own``: the attribute a direction should move. A supervised direction's own attribute is the one
  it was built from (``provenance["attribute"]``; a disentangled direction's is its source's) and
  its intended sign is +. PCA, Jacobian, random and custom directions have no own attribute: they
  are graded by the attribute they move most (largest |effect| / band), intended sign = the sign
  they have, so they are never ``wrong_sign``.
- ``multiple``: own effect / band (signed; a positive multiple above 1 lies outside the random band).
- ``share``: fraction of held-out seeds whose own score moved the intended way.
- ``cross``: the largest effect on any other attribute (attribute, effect, multiple of its band).
- ``leakage``: the largest cross effect measured against what that attribute's own direction does.
  The *reference* of an attribute b is the largest effect on b of any supervised direction built
  for b (mean difference, boundary, conditional, disentangled: whichever moves b most), counted
  only when it is at least :data:`REFERENCE_MULTIPLE` = 3 times b's random band (an attribute
  whose own directions barely move it has no reference: a weak reference would make every
  direction's share on it large). For every other attribute b with a reference,
  ``share = |effect on b| / reference(b)``; the largest is recorded as ``{"attribute", "share",
  "effect", "reference", "reference_direction"}`` (None when no other attribute has a reference).
  A direction that moves glasses by +9.1 logits while the glasses direction itself moves them by
  +9.6 has a leakage share of 0.95, however strong its own effect is.

Flags: ``wrong_sign`` (a supervised direction whose own effect is negative), ``within_random``
(|own| <= band), ``entangled``: a cross-effect is larger, relative to its band, than the own
effect, or the leakage share exceeds :data:`LEAKAGE_THRESHOLD` = 0.5 with that cross effect
outside its attribute's random band (the direction does more than half of what another
attribute's own direction does to it). Letters, best first:

- ``A``: multiple >= 3 and share >= 0.9; ``B``: multiple >= 2 and share >= 0.75;
  ``C``: multiple > 1 and share >= 0.6; ``D``: outside the band but weaker than that;
- ``F``: flagged ``wrong_sign`` or ``within_random``.
- ``entangled`` lowers the letter by one (A -> B, ..., C -> D; never to F).

``pass`` is true for A, B and C. ``score`` in [0, 1] orders directions within and across letters:
0 for F, else ``min(multiple, 4) / 4 * share`` (halved when entangled). Without random baselines
(``aggregate.random_baselines: 0``) there is no band and no grade.

``confidence`` says how far a letter can be trusted: the share of :data:`RESAMPLES` bootstrap
resamples of the held-out seeds (drawn with replacement, from a fixed seed, so a grade is
reproducible) whose letter is the same, every resample graded as above with its own bands and
references. A letter is a threshold on noisy numbers: on the quick-start catalog with 16 held-out
seeds, letters of confidence >= :data:`CONFIDENT` = 0.9 came out the same on another 16 seeds 88 %
of the time, those under 0.5 only 32 % (docs/benchmarks.md). It needs every seed's effect
(``grade_directions(..., seed_effect=...)``); without it there is no ``confidence``.

Grade objects written before ``leakage`` or ``confidence`` existed (``hspace.grade/1`` without the
keys) stay valid: readers treat a missing key as not measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "GRADE_SCHEMA",
    "LEAKAGE_THRESHOLD",
    "LETTERS",
    "REFERENCE_MULTIPLE",
    "CONFIDENT",
    "RESAMPLES",
    "confidence_text",
    "grade_at_least",
    "grade_directions",
    "leakage_references",
    "leakage_text",
    "random_band",
]

GRADE_SCHEMA = "hspace.grade/1"
#: Grade letters, best first.
LETTERS = ("A", "B", "C", "D", "F")
PASSING = frozenset("ABC")
BAND_PERCENTILE = 95.0
#: (letter, minimum multiple, minimum share), checked in order; a multiple <= 1 is ``within_random``.
_THRESHOLDS = (("A", 3.0, 0.9), ("B", 2.0, 0.75), ("C", 1.0, 0.6))
#: A leakage share above this flags ``entangled``: the direction does more than half of what
#: another attribute's best own direction does to that attribute.
LEAKAGE_THRESHOLD = 0.5

#: A reference (an attribute's best own effect) counts only at this multiple of its random band or
#: more (an A-grade strength): a direction that barely moves its attribute says nothing about how
#: much other directions should.
REFERENCE_MULTIPLE = 3.0

#: Bootstrap resamples of the held-out seeds behind a grade's ``confidence``, and their seed.
RESAMPLES = 100
RESAMPLE_SEED = 0
#: A letter at least this confident is shown without a warning.
CONFIDENT = 0.9

#: attribute -> (name of its best supervised direction, that direction's effect on it)
References = dict[str, tuple[str, float]]


def grade_at_least(grade: Mapping[str, Any] | None, min_grade: str) -> bool:
    """True if ``grade`` (a manifest entry's ``grade`` dict) is ``min_grade`` or better."""
    if min_grade not in LETTERS:
        raise ValueError(f"min_grade must be one of {', '.join(LETTERS)}, got {min_grade!r}")
    if not grade or grade.get("letter") not in LETTERS:
        return False
    return LETTERS.index(grade["letter"]) <= LETTERS.index(min_grade)


def random_band(random_effects: np.ndarray) -> np.ndarray:
    """Per attribute, the 95th percentile of |effect| over the random rows [R, A] -> [A]."""
    return np.percentile(np.abs(np.asarray(random_effects, np.float64)), BAND_PERCENTILE, axis=0)


def leakage_references(
    effect: np.ndarray,
    band: np.ndarray,
    names: list[str],
    attributes: list[str],
    own_attribute: Mapping[str, str | None],
) -> References:
    """Per attribute b, the supervised direction built for b that moves b most, and that effect
    (effect [D, A] rows in ``names`` order); attributes whose best effect is under
    :data:`REFERENCE_MULTIPLE` times their band are left out."""
    out: References = {}
    for r, name in enumerate(names):
        b = own_attribute.get(name)
        if b not in attributes:
            continue
        k = attributes.index(b)
        x = float(effect[r, k])
        if (
            math.isfinite(x)
            and x > 0
            and x >= REFERENCE_MULTIPLE * band[k]
            and (b not in out or x > out[b][1])
        ):
            out[b] = (name, x)
    return out


def _leakage(effect: np.ndarray, attributes: list[str], k: int, references: References) -> dict | None:
    """The largest |effect on b| / reference(b) over the attributes b != attributes[k] with a reference."""
    best = None
    for j, b in enumerate(attributes):
        if j == k or b not in references or not math.isfinite(effect[j]):
            continue
        direction, reference = references[b]
        share = abs(float(effect[j])) / reference
        if best is None or share > best["share"]:
            best = {
                "attribute": b,
                "share": share,
                "effect": float(effect[j]),
                "reference": reference,
                "reference_direction": direction,
            }
    return best


def leakage_text(grade: Mapping[str, Any] | None, *, short: bool = False) -> str:
    """'glasses 95% (+9.14 of +9.59 by glasses)' (``short``: 'glasses 95%'), or '-' for a grade
    without leakage (written before leakage was measured, or no other attribute has a reference)."""
    leak = grade.get("leakage") if isinstance(grade, Mapping) else None
    if not isinstance(leak, Mapping) or not isinstance(leak.get("share"), (int, float)):
        return "-"
    head = f"{leak.get('attribute')} {float(leak['share']):.0%}"
    if short:
        return head

    def signed(x: Any) -> str:
        return f"{x:+.3g}" if isinstance(x, (int, float)) and math.isfinite(x) else "?"

    effect, reference = signed(leak.get("effect")), signed(leak.get("reference"))
    return f"{head} ({effect} of {reference} by {leak.get('reference_direction')})"


def confidence_text(grade: Mapping[str, Any] | None) -> str:
    """'87%' (the share of resamples giving the letter), or '-' for a grade without it."""
    c = grade.get("confidence") if isinstance(grade, Mapping) else None
    return f"{float(c):.0%}" if isinstance(c, (int, float)) and math.isfinite(c) else "-"


def _letter(multiple: float, share: float, flags: list[str]) -> str:
    if "wrong_sign" in flags or "within_random" in flags:
        return "F"
    letter = next((name for name, m, s in _THRESHOLDS if multiple >= m and share >= s), "D")
    if "entangled" in flags and letter != "D":
        letter = LETTERS[LETTERS.index(letter) + 1]
    return letter


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def grade_one(
    effect: np.ndarray,
    shares: tuple[np.ndarray, np.ndarray],
    band: np.ndarray,
    attributes: list[str],
    own: str | None,
    references: References | None = None,
) -> dict[str, Any]:
    """The grade of one direction from its effect row [A], the shares of seeds moved up and down
    ([A] each), the band [A] and the attributes' leakage references (:func:`leakage_references`;
    None: no leakage measured)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        multiples = np.where(band > 0, effect / band, np.where(effect == 0, 0.0, np.inf * np.sign(effect)))
    supervised = own is not None and own in attributes
    k = attributes.index(own) if supervised else int(np.nanargmax(np.abs(multiples)))
    sign = 1.0 if supervised else (1.0 if effect[k] >= 0 else -1.0)
    multiple = float(sign * multiples[k])
    share = float(shares[0][k] if sign > 0 else shares[1][k])
    flags = ["wrong_sign"] if multiple < 0 else []
    if abs(multiple) <= 1.0:
        flags.append("within_random")
    others = [j for j in range(len(attributes)) if j != k]
    cross = None
    if others:
        j = max(others, key=lambda i: abs(multiples[i]) if math.isfinite(multiples[i]) else math.inf)
        cross = {"attribute": attributes[j], "effect": float(effect[j]), "multiple": _finite(multiples[j])}
        if abs(multiples[j]) > abs(multiple) and abs(multiples[j]) > 1.0 and not flags:
            flags.append("entangled")
    leakage = _leakage(effect, attributes, k, references or {})
    if leakage is not None and leakage["share"] > LEAKAGE_THRESHOLD and not flags:
        j = attributes.index(leakage["attribute"])
        if abs(leakage["effect"]) > band[j]:
            flags.append("entangled")
    letter = _letter(multiple, share, flags)
    score = 0.0 if letter == "F" else min(max(multiple, 0.0), 4.0) / 4.0 * share
    if "entangled" in flags:
        score /= 2
    return {
        "schema": GRADE_SCHEMA,
        "letter": letter,
        "score": round(score, 4),
        "pass": letter in PASSING,
        "flags": flags,
        "own": {
            "attribute": attributes[k],
            "from": "provenance" if supervised else "largest_effect",
            "effect": float(effect[k]),
            "band": float(band[k]),
            "multiple": _finite(multiple),
            "share": share,
        },
        "cross": cross,
        "leakage": leakage,
    }


def grade_directions(
    effects: Mapping[str, Any],
    own_attribute: Mapping[str, str | None],
    seed_effect: np.ndarray | None = None,
) -> dict[str, Any]:
    """``{direction: grade}`` for every row of ``effects`` (see module doc); {} without random rows.

    ``own_attribute``: direction -> the attribute a supervised direction was built from (None or
    missing for the others). ``seed_effect`` [D, B, A], rows in ``effects["matrix"]["rows"]`` order:
    every held-out seed's own effect (``pipeline.evaluate.seed_effects``); with it (and at least two
    seeds) each grade gets its ``confidence``.
    """
    m = effects["matrix"]
    names, attributes = list(m["rows"]), list(m["columns"])
    effect = np.array(m["effect"], dtype=np.float64)
    up, down = np.array(m["share_up"], dtype=np.float64), np.array(m["share_down"], dtype=np.float64)
    randoms = [r for r, n in enumerate(names) if n in effects.get("baseline_of", {})]
    if not randoms or not attributes:
        return {}
    grades = _grade_all(effect, up, down, names, attributes, randoms, own_attribute)
    if seed_effect is not None:
        per_seed = np.asarray(seed_effect, dtype=np.float64)
        if per_seed.ndim != 3 or per_seed.shape[0] != len(names) or per_seed.shape[2] != len(attributes):
            raise ValueError(
                f"seed_effect has shape {per_seed.shape}, expected [{len(names)}, seeds, {len(attributes)}]"
            )
        if per_seed.shape[1] >= 2:
            for name, c in _confidence(per_seed, grades, names, attributes, randoms, own_attribute).items():
                grades[name]["confidence"] = c
    return grades


def _grade_all(
    effect: np.ndarray,
    up: np.ndarray,
    down: np.ndarray,
    names: list[str],
    attributes: list[str],
    randoms: list[int],
    own_attribute: Mapping[str, str | None],
) -> dict[str, Any]:
    band = random_band(effect[randoms])
    references = leakage_references(effect, band, names, attributes, own_attribute)
    return {
        name: grade_one(effect[r], (up[r], down[r]), band, attributes, own_attribute.get(name), references)
        for r, name in enumerate(names)
    }


def _confidence(
    per_seed: np.ndarray,
    grades: Mapping[str, Mapping[str, Any]],
    names: list[str],
    attributes: list[str],
    randoms: list[int],
    own_attribute: Mapping[str, str | None],
) -> dict[str, float]:
    """Per direction, the share of :data:`RESAMPLES` bootstrap resamples of the seeds (one draw
    of seeds for all directions, so bands and references move with them) giving its letter."""
    rng = np.random.default_rng(RESAMPLE_SEED)
    n_seeds = per_seed.shape[1]
    same = dict.fromkeys(names, 0)
    for _ in range(RESAMPLES):
        rows = per_seed[:, rng.integers(0, n_seeds, n_seeds)]  # [D, B, A]
        resampled = _grade_all(
            rows.mean(1), (rows > 0).mean(1), (rows < 0).mean(1), names, attributes, randoms, own_attribute
        )
        for name in names:
            same[name] += resampled[name]["letter"] == grades[name]["letter"]
    return {name: round(same[name] / RESAMPLES, 3) for name in names}
