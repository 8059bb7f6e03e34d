"""The evaluate stage's rendering: one seed per row, every edit of a seed in one sampler call, an
evaluation sampler of its own, and the same effects whatever the batch size or worker count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hspace.directions import Direction
from hspace.model import HSpaceModel
from hspace.sampling import HSpaceSampler
from pipeline.config import ConfigError, validate_config
from pipeline.evaluate import SeedRenderer, evaluate, seed_rows, split_scores, step_map
from tests.ray_cluster import ray_local  # noqa: F401  (fixture)

IMG = 16
STEPS = 4


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory):
    """A random tiny classifier (16 px) with one binary and one continuous attribute."""
    from hspace.toy.classifier import AttributeClassifier

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clf")
    AttributeClassifier(["round", "size"], [True, False], image_size=IMG, width=8).save_pretrained(path)
    return path


def _directions(model: HSpaceModel, n: int = 3) -> dict[str, Direction]:
    c, h, w = model.h_shape
    g = torch.Generator().manual_seed(3)
    return {
        f"d{i}": Direction(torch.randn(STEPS, c, h, w, generator=g) * 4, f"d{i}", kind="custom")
        for i in range(n)
    }


def _config(tmp_path, model_dir, classifier_dir, *, workers: int = 1, batch_size: int = 16, **evaluate):
    return validate_config(
        {
            "name": "ev",
            "model": {"source": str(model_dir)},
            "sampler": {"kind": "ddpm", "num_inference_steps": STEPS},
            "generate": {"n_samples": 4},
            "pca": {"n_components": 2},
            "resources": {"workers": workers},
            "storage": {"run_url": str(tmp_path / "run")},
            "catalog": {"url": str(tmp_path / "catalog"), "model_name": "tiny"},
            "annotate": {"classifier": str(classifier_dir), "batch_size": 8},
            "evaluate": {"seed_start": 500, "n_seeds": 4, "units": "raw", "batch_size": batch_size}
            | evaluate,
        }
    )


def test_step_map_takes_the_nearest_build_step():
    build = list(range(950, -1, -50))  # 20 DDPM steps, leading spacing
    assert step_map(build, build) == list(range(20))
    assert step_map(build, [800, 600, 400, 200, 0]) == [3, 7, 11, 15, 19]  # 5 steps: a subset
    assert step_map([900, 600, 300, 0], [750, 100]) == [0, 3]  # a tie goes to the noisier step
    with pytest.raises(ValueError, match="no timesteps"):
        step_map([], [1])


def test_seed_rows_are_unedited_then_each_direction_alone_at_each_scale():
    rows = seed_rows(2, [-2.0, 2.0])
    assert rows.tolist() == [[0, 0], [-2, 0], [2, 0], [0, -2], [0, 2]]
    base, edited = split_scores(np.arange(2 * 5 * 1).reshape(2, 5, 1), ["a", "b"], 2)
    assert base[:, 0].tolist() == [0, 5] and edited["b"][1, :, 0].tolist() == [8, 9]
    with pytest.raises(ValueError, match="expected"):
        split_scores(np.zeros((2, 4, 1)), ["a", "b"], 2)


def test_a_seeds_unedited_row_is_the_plain_sample(tiny_model_dir, tiny_classifier_dir):
    from hspace.classifier import load_classifier

    model = HSpaceModel.from_pretrained(str(tiny_model_dir))
    sampler = HSpaceSampler(model, sampler="ddpm", num_inference_steps=STEPS)
    dirs = _directions(model)
    vectors = np.stack([d.vector.numpy() for d in dirs.values()])
    clf = load_classifier(str(tiny_classifier_dir))
    r = SeedRenderer(sampler, clf, [0, 1], vectors, sampler.timesteps.tolist(), [-1.0, 1.0], batch_size=4)
    images = r.render(7)
    assert images.shape == (1 + 3 * 2, 3, IMG, IMG)
    torch.testing.assert_close(images[0], sampler.sample([7], record_h=False).images[0], rtol=0, atol=1e-5)
    assert (images[1:] - images[:1]).abs().amax() > 1e-3  # every edit changes the image


def test_a_seeds_scores_do_not_depend_on_the_batch_size(tiny_model_dir, tiny_classifier_dir):
    """Rows of one seed in U-Net batches of 1, 3 or 16 and classifier batches of 2 or 512: the
    noise is per seed, so only float rounding of differently sized matmuls can differ (< 1e-4)."""
    from hspace.classifier import load_classifier

    model = HSpaceModel.from_pretrained(str(tiny_model_dir))
    sampler = HSpaceSampler(model, sampler="ddpm", num_inference_steps=STEPS)
    vectors = np.stack([d.vector.numpy() for d in _directions(model).values()])
    clf = load_classifier(str(tiny_classifier_dir))
    scores = []
    for batch_size, clf_batch in ((1, 2), (3, 512), (16, 512)):
        r = SeedRenderer(
            sampler,
            clf,
            [0, 1],
            vectors,
            sampler.timesteps.tolist(),
            [-1.0, 1.0],
            batch_size=batch_size,
            classifier_batch_size=clf_batch,
        )
        scores.append(r.score(r.render(11)))
    for s in scores[1:]:
        np.testing.assert_allclose(s, scores[0], rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_effects_do_not_depend_on_worker_count_or_batch_size(tmp_path, tiny_model_dir, tiny_classifier_dir):
    """One task in flight with U-Net batches of 16 against two with batches of 2: the same effects
    (to 1e-4, float rounding of differently sized batches) and the same grades."""
    model = HSpaceModel.from_pretrained(str(tiny_model_dir))
    dirs = _directions(model, 4)
    random_of = {"d3": "d0"}
    runs = []
    for workers, batch_size in ((1, 16), (2, 2)):
        cfg = _config(tmp_path, tiny_model_dir, tiny_classifier_dir, workers=workers, batch_size=batch_size)
        ev = evaluate(
            cfg, dirs, random_of, attributes=["round", "size"], binary=[True, False], progress=False
        )
        runs.append(ev)
    a, b = (r.effects for r in runs)
    for key in ("effect", "plus", "minus"):
        np.testing.assert_allclose(np.array(a["matrix"][key]), np.array(b["matrix"][key]), rtol=0, atol=1e-4)
    assert {n: g["letter"] for n, g in a["grades"].items()} == {
        n: g["letter"] for n, g in b["grades"].items()
    }
    np.testing.assert_array_equal(runs[0].previews["d1"][:, 1], runs[0].previews["d2"][:, 1])  # unedited
    assert runs[0].previews["d1"].shape == (2, 3, 3, IMG, IMG)


@pytest.mark.usefixtures("ray_local")
def test_an_evaluation_sampler_renders_on_a_coarser_grid_and_is_recorded(
    tmp_path, tiny_model_dir, tiny_classifier_dir
):
    """DDIM with 2 of the build's 4 DDPM steps: the edits are applied at the nearest build steps."""
    model = HSpaceModel.from_pretrained(str(tiny_model_dir))
    dirs = _directions(model, 2)
    cfg = _config(
        tmp_path, tiny_model_dir, tiny_classifier_dir, sampler={"kind": "ddim", "num_inference_steps": 2}
    )
    ev = evaluate(cfg, dirs, {"d1": "d0"}, attributes=["round", "size"], binary=[True, False], progress=False)
    assert ev.effects["sampler"] == {"kind": "ddim", "num_inference_steps": 2, "eta": None}
    assert max(abs(x) for x in ev.effects["matrix"]["effect"][0]) > 1e-3
    assert ev.n_images == 4 * (1 + 2 * 2)


def test_an_evaluation_sampler_is_checked_like_the_build_sampler(
    tmp_path, tiny_model_dir, tiny_classifier_dir
):
    with pytest.raises(ConfigError, match=r"evaluate\.sampler\.eta"):
        _config(tmp_path, tiny_model_dir, tiny_classifier_dir, sampler={"kind": "ddpm", "eta": 0.5})
    with pytest.raises(ConfigError, match=r"evaluate\.sampler\.num_inference_steps"):
        _config(
            tmp_path,
            tiny_model_dir,
            tiny_classifier_dir,
            sampler={"kind": "ddim", "num_inference_steps": 5000},
        )


@pytest.mark.usefixtures("ray_local")
def test_a_worker_process_builds_its_scorer_once_per_stage(tmp_path, tiny_model_dir, tiny_classifier_dir):
    """The seeds a worker renders share one scorer (model and classifier loaded once); another
    stage's vectors get a new one, and its scores equal a scorer built directly."""
    import ray

    from pipeline import evaluate as ev_module

    model = HSpaceModel.from_pretrained(str(tiny_model_dir))
    vectors = np.stack([d.vector.numpy() for d in _directions(model).values()])
    cfg_json = _config(tmp_path, tiny_model_dir, tiny_classifier_dir).model_dump(mode="json")
    ref = [ray.put(vectors)]
    first = ev_module._scorer(cfg_json, ["round"], ref)
    assert ev_module._scorer(cfg_json, ["round"], ref) is first
    out = ev_module.score_seed(cfg_json, ["round"], ref, 9, True)
    assert out["scores"].shape == (1 + 3 * 2, 1) and out["preview"].shape == (7, 3, IMG, IMG)
    assert ev_module.score_seed(cfg_json, ["round"], ref, 9, False)["preview"].shape == (0, 3, IMG, IMG)
    other = ev_module._scorer(cfg_json, ["round"], [ray.put(vectors * 2)])
    assert (
        other is not first and ev_module._scorer(cfg_json, ["round"], ref) is not first
    )  # only the latest kept
    direct = ev_module.EditScorer(cfg_json, ["round"], vectors)(9, False)
    np.testing.assert_array_equal(direct["scores"], out["scores"])


@pytest.mark.usefixtures("ray_local")
def test_map_tasks_watched_bounds_the_tasks_in_flight_and_cancels_on_error():
    import ray

    from pipeline.ray_runtime import CapacityWatch, map_tasks_watched

    @ray.remote(num_cpus=0)
    def square(x: int) -> int:
        if x == 13:
            raise ValueError("thirteen")
        return x * x

    submitted, results = [], {}

    def submit(x: int):
        submitted.append(x)
        assert len(submitted) - len(results) <= 2, "more than in_flight tasks pending"
        return square.remote(x)

    watch = CapacityWatch("test", {"CPU": 0.0})
    map_tasks_watched(submit, list(range(7)), watch, in_flight=2, on_result=results.__setitem__)
    assert results == {x: x * x for x in range(7)}
    with pytest.raises(ValueError, match="thirteen"):
        map_tasks_watched(square.remote, [12, 13, 14], watch, in_flight=1, on_result=lambda *_: None)
    with pytest.raises(ValueError, match="in_flight"):
        map_tasks_watched(square.remote, [1], watch, in_flight=0, on_result=lambda *_: None)
