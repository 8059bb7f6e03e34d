"""Grades of directions against matched-norm random edits: flags, letters, the report, the catalog filter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hspace import catalog as catalog_mod
from hspace.directions import Direction
from hspace.grade import (
    LEAKAGE_THRESHOLD,
    LETTERS,
    REFERENCE_MULTIPLE,
    confidence_text,
    grade_at_least,
    grade_directions,
    grade_one,
    leakage_references,
    leakage_text,
)
from pipeline.evaluate import effect_matrix, own_attributes, seed_effects
from pipeline.report import grade_table_text, render_report, sorted_by_grade

ATTRS = ["eyes_open", "smile"]
N_SEEDS = 20


def _scores(rng: np.random.Generator, move: tuple[float, float], noise: float = 0.05) -> np.ndarray:
    """Edited scores [B, 2 scales (-g, +g), A] around zero: +g adds ``move``, -g subtracts it."""
    m = np.asarray(move)
    minus = -m + noise * rng.standard_normal((N_SEEDS, len(ATTRS)))
    plus = m + noise * rng.standard_normal((N_SEEDS, len(ATTRS)))
    return np.stack([minus, plus], axis=1)


@pytest.fixture
def effects() -> dict:
    """A quick-start-like build: eyes_open (mean difference) closes eyes, its boundary opens them."""
    rng = np.random.default_rng(0)
    edited = {
        "eyes_open": _scores(rng, (-0.66, 0.05)),
        "eyes_open_boundary": _scores(rng, (0.80, 0.05)),
        "smile": _scores(rng, (0.12, 0.11)),  # own effect inside the random band
        "pca_0": _scores(rng, (0.02, -0.9)),  # unsupervised, moves smile down
    }
    random_of = {}
    for i in range(8):
        edited[f"random_eyes_open_{i}"] = _scores(rng, tuple(0.1 * rng.standard_normal(2)))
        random_of[f"random_eyes_open_{i}"] = "eyes_open"
    kinds = {
        n: ("random" if n in random_of else "pca" if n.startswith("pca") else "supervised") for n in edited
    }
    base = np.zeros((N_SEEDS, len(ATTRS)))
    eff = effect_matrix(base, edited, [-2.0, 2.0], ATTRS, [True, True], random_of, kinds)
    own = {"eyes_open": "eyes_open", "eyes_open_boundary": "eyes_open", "smile": "smile"}
    eff["grades"] = grade_directions(eff, own, seed_effect=seed_effects(base, edited, [-2.0, 2.0]))
    return eff


def test_wrong_sign_and_within_random_are_flagged_and_fail(effects):
    g = effects["grades"]
    assert g["eyes_open"]["flags"] == ["wrong_sign"] and g["eyes_open"]["letter"] == "F"
    assert not g["eyes_open"]["pass"] and g["eyes_open"]["score"] == 0
    assert g["eyes_open"]["own"]["effect"] == pytest.approx(-0.66, abs=0.03)
    assert g["eyes_open"]["own"]["share"] == 0.0  # no seed moved towards open eyes
    ok = g["eyes_open_boundary"]
    assert ok["flags"] == [] and ok["pass"] and ok["letter"] in "AB" and ok["own"]["share"] == 1.0
    assert ok["own"]["multiple"] > 3 and ok["cross"]["attribute"] == "smile"
    assert "within_random" in g["smile"]["flags"] and g["smile"]["letter"] == "F"
    json.dumps(effects, allow_nan=False)


def test_unsupervised_directions_are_graded_by_their_largest_effect_without_a_sign(effects):
    g = effects["grades"]["pca_0"]
    assert g["own"]["attribute"] == "smile" and g["own"]["from"] == "largest_effect"
    assert g["own"]["effect"] < 0 and g["own"]["multiple"] > 1 and "wrong_sign" not in g["flags"]
    assert g["own"]["share"] == 1.0 and g["pass"]
    assert all(
        effects["grades"][f"random_eyes_open_{i}"]["own"]["from"] == "largest_effect" for i in range(8)
    )


def test_no_random_rows_means_no_grades():
    eff = effect_matrix(
        np.zeros((3, 1)), {"a": np.ones((3, 2, 1))}, [-1.0, 1.0], ["x"], [True], {}, {"a": "pca"}
    )
    assert grade_directions(eff, {}) == {}


def _with_seeds(per_seed: dict[str, np.ndarray], random_of: dict[str, str]) -> tuple[dict, np.ndarray]:
    """effects.json content and seed effects [D, B, A] from each direction's per-seed effect [B, A]
    (edited scores +-e around unedited zeros, so every seed's symmetric effect is exactly e)."""
    edited = {n: np.stack([-e, e], axis=1) for n, e in per_seed.items()}
    n_seeds = next(iter(per_seed.values())).shape[0]
    kinds = {n: "random" if n in random_of else "supervised" for n in per_seed}
    base = np.zeros((n_seeds, len(ATTRS)))
    eff = effect_matrix(base, edited, [-2.0, 2.0], ATTRS, [True, True], random_of, kinds)
    return eff, seed_effects(base, edited, [-2.0, 2.0])


def test_seed_effects_average_to_the_effect_matrix():
    rng = np.random.default_rng(3)
    edited = {"a": rng.standard_normal((7, 2, 2)), "b": rng.standard_normal((7, 2, 2))}
    base = rng.standard_normal((7, 2))
    eff = effect_matrix(base, edited, [-1.0, 1.0], ATTRS, [True, True], {}, {"a": "pca", "b": "pca"})
    per_seed = seed_effects(base, edited, [-1.0, 1.0])
    assert per_seed.shape == (2, 7, 2)
    np.testing.assert_allclose(per_seed.mean(1), np.array(eff["matrix"]["effect"]), rtol=0, atol=1e-12)
    np.testing.assert_allclose((per_seed > 0).mean(1), np.array(eff["matrix"]["share_up"]))


def test_confidence_is_the_share_of_seed_resamples_that_keep_the_letter():
    """A direction far outside the band on every seed keeps its letter in every resample; one whose
    share of seeds sits on the A/B threshold (18 of 20 = 0.9) keeps it in only some."""
    rng = np.random.default_rng(0)
    own = np.zeros((N_SEEDS, 2))
    clear, edge = own.copy(), own.copy()
    clear[:, 0] = 5.0 + 0.1 * rng.standard_normal(N_SEEDS)
    edge[:, 0] = np.where(np.arange(N_SEEDS) < 18, 5.0, -1.0)
    per_seed = {"clear": clear, "edge": edge}
    random_of = {}
    for i in range(8):
        per_seed[f"random_{i}"] = 0.3 * rng.standard_normal((N_SEEDS, 2))
        random_of[f"random_{i}"] = "eyes_open"
    eff, seeds = _with_seeds(per_seed, random_of)
    own_of = {"clear": "eyes_open", "edge": "eyes_open"}
    grades = grade_directions(eff, own_of, seed_effect=seeds)
    assert grades["clear"]["letter"] == "A" and grades["clear"]["confidence"] == 1.0
    assert grades["edge"]["letter"] == "A" and grades["edge"]["own"]["share"] == pytest.approx(0.9)
    assert 0.2 < grades["edge"]["confidence"] < 0.9  # about half the resamples draw fewer than 18 of 20
    assert confidence_text(grades["edge"]).endswith("%") and confidence_text({"letter": "A"}) == "-"
    again = grade_directions(eff, own_of, seed_effect=seeds)
    assert {n: g["confidence"] for n, g in again.items()} == {n: g["confidence"] for n, g in grades.items()}
    assert "confidence" not in grade_directions(eff, own_of)["clear"]  # no seeds, no confidence
    with pytest.raises(ValueError, match="seed_effect has shape"):
        grade_directions(eff, own_of, seed_effect=seeds[:, :, :1])


def test_entangled_direction_is_lowered_one_letter():
    band = np.array([0.1, 0.1])
    up, down = np.array([1.0, 0.5]), np.array([0.0, 0.5])
    clean = grade_one(np.array([0.5, 0.0]), (up, down), band, ATTRS, "eyes_open")
    tangled = grade_one(np.array([0.5, 0.9]), (up, down), band, ATTRS, "eyes_open")
    assert clean["letter"] == "A" and tangled["flags"] == ["entangled"] and tangled["letter"] == "B"
    assert tangled["cross"] == {"attribute": "smile", "effect": 0.9, "multiple": pytest.approx(9.0)}


def test_grade_order_and_min_grade_check(effects):
    order = sorted_by_grade(effects["grades"])
    letters = [effects["grades"][n]["letter"] for n in order]
    assert letters == sorted(letters, key=LETTERS.index)
    assert order.index("eyes_open_boundary") < order.index("eyes_open")
    assert grade_at_least({"letter": "B"}, "C") and not grade_at_least({"letter": "D"}, "C")
    assert not grade_at_least(None, "F")
    with pytest.raises(ValueError, match="min_grade"):
        grade_at_least({"letter": "A"}, "E")
    text = grade_table_text(effects["grades"])
    assert text.splitlines()[1].startswith(order[0]) and "wrong_sign" in text
    header, first = text.splitlines()[:2]
    assert header.split()[1:3] == ["grade", "conf"]
    assert first.split()[2] == confidence_text(effects["grades"][order[0]])


def test_report_shows_grades_and_methods_side_by_side(effects):
    directions = [
        {
            "name": "eyes_open",
            "kind": "supervised",
            "norm": 1.0,
            "attribute": "eyes_open",
            "method": "mean_difference",
        },
        {
            "name": "eyes_open_boundary",
            "kind": "supervised",
            "norm": 1.0,
            "attribute": "eyes_open",
            "method": "logistic_regression_boundary",
        },
    ]
    html = render_report(title="t", meta={}, directions=directions, effects=effects, previews={})
    assert "<h2>Grades</h2>" in html and "wrong_sign" in html and "Methods side by side" in html
    side = html[html.index("Methods side by side") :]
    row = side[side.index("<td class=name>eyes_open</td>") :].split("</tr>")[0]
    assert "mean_difference" in side and "<b>F</b>" in row and row.count("<td") == 3
    grades = html[html.index("<table class=grades>") :]
    assert grades.index("eyes_open_boundary") < grades.index(">eyes_open<")


def test_catalog_filters_directions_by_grade(tmp_path, effects):
    cat = catalog_mod.open(str(tmp_path / "cat"))
    shape = (2, 4, 4)
    names = ["eyes_open", "eyes_open_boundary", "smile", "ungraded"]
    dirs = [Direction(torch.ones(shape) * (i + 1), n) for i, n in enumerate(names)]
    grades = {n: effects["grades"][n] for n in names[:3]}
    leak = {
        "attribute": "eyes_open",
        "share": 0.25,
        "effect": 0.2,
        "reference": 0.8,
        "reference_direction": "b",
    }
    grades["smile"] = {**grades["smile"], "leakage": leak}
    v = cat.publish("m", dirs, metadata={}, grades=grades)
    version = cat.version("m", v)
    entries = {d["name"]: d for d in version.manifest["directions"]}
    assert entries["eyes_open"]["grade"]["flags"] == ["wrong_sign"] and "grade" not in entries["ungraded"]
    assert list(version.directions(min_grade="C")) == ["eyes_open_boundary"]
    assert list(version.directions(min_grade="F")) == names[:3]
    assert list(version.directions()) == names
    from typer.testing import CliRunner

    from hspace.cli import app

    res = CliRunner().invoke(app, ["catalog", "show", str(tmp_path / "cat"), "m"])
    rows = {
        line.split()[0]: line
        for line in res.output.splitlines()
        if line.split()[:1] and line.split()[0] in names
    }
    assert res.exit_code == 0, res.output
    confidence = confidence_text(grades["eyes_open"])
    assert confidence.endswith("%")
    # grade, confidence, then leakage: none
    assert rows["eyes_open"].split()[-4:] == ["F", "(wrong_sign)", confidence, "-"]
    assert rows["smile"].split()[-2:] == ["eyes_open", "25%"]
    assert rows["ungraded"].split()[-3:] == ["-", "-", "-"]
    with pytest.raises(ValueError, match="not published"):
        cat.publish("m", dirs[:1], metadata={}, grades={"nope": grades["smile"]})


def test_own_attribute_comes_from_provenance_of_supervised_directions():
    v = torch.ones(2, 4, 4)
    dirs = {
        "a": Direction(v, "a", kind="supervised", provenance={"attribute": "smile"}),
        "p": Direction(v, "p", kind="pca", provenance={"attribute": "smile"}),
        "d": Direction(v, "d", kind="disentangled", provenance={"source_provenance": {"attribute": "hat"}}),
    }
    assert own_attributes(dirs) == {"a": "smile", "p": None, "d": "hat"}


# --------------------------------------------------------------------------------------------- leakage

LEAK_ATTRS = ["glasses", "grey_hair", "hat"]


def _leak_effects(rows: dict[str, tuple[float, float, float]], own: dict[str, str]) -> dict:
    """effects with exact per-seed effects ``rows`` (no noise) plus four small random rows."""
    n = 8
    edited = {name: np.stack([-np.tile(e, (n, 1)), np.tile(e, (n, 1))], 1) for name, e in rows.items()}
    random_of = {}
    for i, e in enumerate([(0.2, -0.1, 0.05), (-0.1, 0.2, -0.05), (0.1, 0.1, 0.1), (-0.2, -0.2, 0.0)]):
        edited[f"random_{i}"] = np.stack([-np.tile(e, (n, 1)), np.tile(e, (n, 1))], 1)
        random_of[f"random_{i}"] = "glasses"
    kinds = {k: "random" if k in random_of else "supervised" for k in edited}
    eff = effect_matrix(np.zeros((n, 3)), edited, [-2.0, 2.0], LEAK_ATTRS, [True] * 3, random_of, kinds)
    eff["grades"] = grade_directions(eff, own)
    return eff


def test_leakage_is_the_cross_effect_as_a_share_of_the_attributes_best_own_direction():
    """grey_hair moves glasses by 9.14 where the best glasses direction moves them by 9.59: 95%."""
    rows = {
        "glasses": (9.59, 6.0, 0.0),
        "glasses_boundary": (7.0, 1.0, 0.0),
        "grey_hair": (9.14, 12.0, 0.5),
        "hat": (0.3, 0.0, 5.0),
    }
    own = {"glasses": "glasses", "glasses_boundary": "glasses", "grey_hair": "grey_hair", "hat": "hat"}
    g = _leak_effects(rows, own)["grades"]
    leak = g["grey_hair"]["leakage"]
    assert set(leak) == {"attribute", "share", "effect", "reference", "reference_direction"}
    assert leak["attribute"] == "glasses" and leak["reference_direction"] == "glasses"
    assert leak["effect"] == pytest.approx(9.14) and leak["reference"] == pytest.approx(9.59)
    assert leak["share"] == pytest.approx(9.14 / 9.59)  # exact: the test rows have no noise
    # glasses' largest leakage is on grey hair: 6.0 of the 12.0 grey_hair itself does
    assert g["glasses"]["leakage"]["attribute"] == "grey_hair"
    assert g["glasses"]["leakage"]["share"] == pytest.approx(0.5)
    assert g["hat"]["leakage"]["share"] == pytest.approx(0.3 / 9.59)
    json.dumps(g, allow_nan=False)


def test_leakage_above_the_threshold_flags_entangled_and_lowers_the_letter():
    rows = {"glasses": (9.59, 6.0, 0.0), "grey_hair": (9.14, 12.0, 0.5), "hat": (0.3, 0.0, 5.0)}
    own = {n: n for n in rows}
    g = _leak_effects(rows, own)["grades"]
    assert LEAKAGE_THRESHOLD == 0.5
    # grey_hair: 50x its band on its own attribute, so the band-relative cross check alone passes it
    assert g["grey_hair"]["cross"]["multiple"] < g["grey_hair"]["own"]["multiple"]
    assert g["grey_hair"]["flags"] == ["entangled"] and g["grey_hair"]["letter"] == "B"
    # glasses: a share of exactly 0.5 does not pass the threshold
    assert g["glasses"]["flags"] == [] and g["glasses"]["letter"] == "A"
    assert g["hat"]["flags"] == [] and g["hat"]["letter"] == "A"


def test_leakage_references_skip_attributes_whose_best_direction_is_under_three_bands():
    effect = np.array([[5.0, 0.1], [4.0, 0.5], [0.2, 0.02]])
    band = np.array([0.5, 0.2])
    own = {"a": "glasses", "b": "grey_hair", "c": None}
    refs = leakage_references(effect, band, ["a", "b", "c"], ["glasses", "grey_hair"], own)
    assert REFERENCE_MULTIPLE == 3.0
    assert refs == {"glasses": ("a", 5.0)}  # grey_hair's direction moves it by 0.5 = 2.5x its band
    g = grade_one(effect[1], (np.ones(2), np.zeros(2)), band, ["glasses", "grey_hair"], "grey_hair", refs)
    assert g["leakage"]["share"] == pytest.approx(0.8) and g["leakage"]["reference_direction"] == "a"


def test_an_attribute_that_nothing_moves_has_no_leakage_reference():
    """A zero band (no random edit moved the attribute) and a zero own effect are no reference:
    a share against it would divide by zero."""
    effect = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    band = np.array([0.0, 0.5])
    own = {"a": "glasses", "b": None, "c": "grey_hair"}
    refs = leakage_references(effect, band, ["a", "b", "c"], ["glasses", "grey_hair"], own)
    assert refs == {"grey_hair": ("c", 2.0)}
    grades = [
        grade_one(row, (np.ones(2), np.zeros(2)), band, ["glasses", "grey_hair"], own[n], refs)
        for n, row in zip("abc", effect, strict=True)
    ]
    assert grades[1]["leakage"] == {
        "attribute": "grey_hair",
        "share": 0.0,
        "effect": 0.0,
        "reference": 2.0,
        "reference_direction": "c",
    }


def test_leakage_of_a_cross_effect_inside_its_band_does_not_flag():
    """A share above the threshold from an effect the random edits also reach is noise, not leakage."""
    band = np.array([1.0, 1.0])
    refs = {"grey_hair": ("grey_hair", 1.5)}
    g = grade_one(
        np.array([8.0, 0.9]), (np.ones(2), np.zeros(2)), band, ["glasses", "grey_hair"], "glasses", refs
    )
    assert g["leakage"]["share"] == pytest.approx(0.6) and g["flags"] == [] and g["letter"] == "A"


def test_grades_without_leakage_still_read_and_display():
    """A grade written before leakage was measured (no ``leakage`` key) keeps working everywhere."""
    old = {
        "schema": "hspace.grade/1",
        "letter": "B",
        "score": 0.6,
        "pass": True,
        "flags": [],
        "own": {
            "attribute": "smile",
            "from": "provenance",
            "effect": 0.5,
            "band": 0.1,
            "multiple": 5.0,
            "share": 0.8,
        },
        "cross": {"attribute": "hat", "effect": 0.1, "multiple": 0.5},
    }
    assert leakage_text(old) == "-" and leakage_text(None) == "-" and grade_at_least(old, "B")
    assert "smile" in grade_table_text({"old": old})
    html = render_report(title="t", meta={}, directions=[], effects=_old_effects(old), previews={})
    assert "<td class=name>old</td>" in html and "<td class=name>-</td>" in html


def _old_effects(grade: dict) -> dict:
    return {
        "matrix": {"rows": ["old"], "columns": ["smile"], "effect": [[0.5]], "z": [[1.0]]},
        "kinds": {"old": "supervised"},
        "grades": {"old": grade},
    }


def test_leakage_text_names_share_effect_and_reference():
    grade = {
        "leakage": {
            "attribute": "glasses",
            "share": 0.953,
            "effect": 9.14,
            "reference": 9.59,
            "reference_direction": "glasses",
        }
    }
    assert leakage_text(grade) == "glasses 95% (+9.14 of +9.59 by glasses)"
    assert leakage_text(grade, short=True) == "glasses 95%"


# ------------------------------------------------------------------ leakage on the real toy model


@pytest.mark.slow
def test_toy_glasses_and_grey_hair_mean_differences_leak_and_their_fixes_leak_less():
    """The toy world makes glasses 4x more likely on grey hair: each raw mean difference moves the
    other attribute and is flagged ``entangled``; the disentangled (eq. 12) and conditional versions
    leak less. Directions from 160 DDPM samples at 8 steps, evaluated as the evaluate stage does
    (sigma units, gamma +-2, matched-norm random baselines, the same sampler) on 12 held-out seeds."""
    from dataclasses import replace

    from hspace.classifier import score_images
    from hspace.directions import disentangle, projection_sigma, supervised_direction
    from hspace.sampling import HSpaceSampler
    from hspace.toy import load_toy_classifier, load_toy_model
    from pipeline.aggregate import random_baselines
    from pipeline.evaluate import SeedRenderer, edit_vectors, split_scores

    torch.manual_seed(0)
    model, clf = load_toy_model(), load_toy_classifier()
    build = HSpaceSampler(model, sampler="ddpm", num_inference_steps=8)
    traj = build.sample(list(range(160)), batch_size=32)
    scores = score_images(clf, traj.images)
    cg, ca = clf.index("glasses"), clf.index("grey_hair")

    def md(attr: str, col: int, name: str, condition=None) -> Direction:
        d = supervised_direction(
            traj.h, scores[:, col], 0.2, name, provenance={"attribute": attr}, condition_on=condition
        )
        return d

    g, a = md("glasses", cg, "glasses"), md("grey_hair", ca, "grey_hair")
    dirs = {
        "glasses": g,
        "grey_hair": a,
        "glasses_conditional": md("glasses", cg, "glasses_conditional", scores[:, ca] > 0),
        "grey_hair_conditional": md("grey_hair", ca, "grey_hair_conditional", scores[:, cg] > 0),
        "glasses_disentangled": disentangle(g, [a], name="glasses_disentangled"),
        "grey_hair_disentangled": disentangle(a, [g], name="grey_hair_disentangled"),
    }
    dirs = {n: replace(d, sigma=projection_sigma(traj.h, d.vector)) for n, d in dirs.items()}
    randoms, random_of = random_baselines([g, a], 2)
    dirs |= {r.name: r for r in randoms}
    names = list(dirs)
    vectors = edit_vectors(dirs, random_of, "sigma", 8)
    attributes = ["glasses", "grey_hair", "hat"]
    renderer = SeedRenderer(
        build,
        clf,
        [clf.index(x) for x in attributes],
        np.stack([vectors[n].numpy() for n in names]),
        build.timesteps.tolist(),
        [-2.0, 2.0],
    )
    per_seed = np.stack([renderer.score(renderer.render(s)) for s in range(5_000_000, 5_000_012)])
    base, edited = split_scores(per_seed, names, 2)
    kinds = {n: d.kind for n, d in dirs.items()}
    eff = effect_matrix(base, edited, [-2.0, 2.0], attributes, [True] * 3, random_of, kinds)
    grades = grade_directions(eff, own_attributes(dirs))
    leak = {n: grades[n]["leakage"] for n in names if not n.startswith("random_")}
    print({n: (grades[n]["letter"], grades[n]["flags"], leak[n]) for n in leak})
    # measured 2026-12-01: raw glasses 0.81 of grey hair's effect, raw grey hair 0.66 of glasses';
    # conditional 0.07 / 0.57, disentangled 0.32 / 0.35 (the test took 10 min at load 8-20 on 2 cores)
    for raw, other in (("glasses", "grey_hair"), ("grey_hair", "glasses")):
        assert leak[raw]["attribute"] == other and leak[raw]["share"] > LEAKAGE_THRESHOLD, leak
        assert "entangled" in grades[raw]["flags"], grades[raw]
        for fix in ("conditional", "disentangled"):
            assert leak[f"{raw}_{fix}"]["share"] < leak[raw]["share"], leak
