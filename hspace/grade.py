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

Flags: ``wrong_sign`` (a supervised direction whose own effect is negative), ``within_random``
(|own| <= band), ``entangled`` (a cross-effect is larger, relative to its band, than the own
effect). Letters, best first:

- ``A``: multiple >= 3 and share >= 0.9; ``B``: multiple >= 2 and share >= 0.75;
  ``C``: multiple > 1 and share >= 0.6; ``D``: outside the band but weaker than that;
- ``F``: flagged ``wrong_sign`` or ``within_random``.
- ``entangled`` lowers the letter by one (A -> B, ..., C -> D; never to F).

``pass`` is true for A, B and C. ``score`` in [0, 1] orders directions within and across letters:
0 for F, else ``min(multiple, 4) / 4 * share`` (halved when entangled). Without random baselines
(``aggregate.random_baselines: 0``) there is no band and no grade.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["GRADE_SCHEMA", "LETTERS", "grade_at_least", "grade_directions", "random_band"]

GRADE_SCHEMA = "hspace.grade/1"
#: Grade letters, best first.
LETTERS = ("A", "B", "C", "D", "F")
PASSING = frozenset("ABC")
BAND_PERCENTILE = 95.0
#: (letter, minimum multiple, minimum share), checked in order; a multiple <= 1 is ``within_random``.
_THRESHOLDS = (("A", 3.0, 0.9), ("B", 2.0, 0.75), ("C", 1.0, 0.6))


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
) -> dict[str, Any]:
    """The grade of one direction from its effect row [A], the shares of seeds moved up and down
    ([A] each) and the band [A]."""
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
    }


def grade_directions(effects: Mapping[str, Any], own_attribute: Mapping[str, str | None]) -> dict[str, Any]:
    """``{direction: grade}`` for every row of ``effects`` (see module doc); {} without random rows.

    ``own_attribute``: direction -> the attribute a supervised direction was built from (None or
    missing for the others).
    """
    m = effects["matrix"]
    names, attributes = list(m["rows"]), list(m["columns"])
    effect = np.array(m["effect"], dtype=np.float64)
    up, down = np.array(m["share_up"], dtype=np.float64), np.array(m["share_down"], dtype=np.float64)
    randoms = [r for r, n in enumerate(names) if n in effects.get("baseline_of", {})]
    if not randoms or not attributes:
        return {}
    band = random_band(effect[randoms])
    return {
        name: grade_one(effect[r], (up[r], down[r]), band, attributes, own_attribute.get(name))
        for r, name in enumerate(names)
    }
