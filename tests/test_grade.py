"""Grades of directions against matched-norm random edits: flags, letters, the report, the catalog filter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hspace import catalog as catalog_mod
from hspace.directions import Direction
from hspace.grade import LETTERS, grade_at_least, grade_directions
from pipeline.evaluate import effect_matrix, own_attributes
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
    eff = effect_matrix(
        np.zeros((N_SEEDS, len(ATTRS))), edited, [-2.0, 2.0], ATTRS, [True, True], random_of, kinds
    )
    own = {"eyes_open": "eyes_open", "eyes_open_boundary": "eyes_open", "smile": "smile"}
    eff["grades"] = grade_directions(eff, own)
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


def test_entangled_direction_is_lowered_one_letter():
    from hspace.grade import grade_one

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
    assert (
        res.exit_code == 0 and rows["eyes_open"].endswith("F (wrong_sign)") and rows["ungraded"].endswith("-")
    )
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
