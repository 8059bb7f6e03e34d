"""The second half of the pipeline on small in-process data: annotate, aggregate, evaluate, publish, report.

Synthetic runs are written through RunStore (h with a planted attribute signal, PNGs of known
images), a random tiny AttributeClassifier is saved next to them, and the Ray stages run on the
shared 2-CPU local cluster (tests/ray_cluster.py). The whole build is exercised in test_jobs.py.
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from hspace.catalog import preview_path
from hspace.classifier import score_images
from hspace.directions import Direction, supervised_direction
from pipeline.aggregate import (
    _attribute_task,
    _conditional_task,
    _from_wire,
    attribute_directions,
    boundary_normal,
    projection_sigma_streaming,
    random_baselines,
)
from pipeline.annotate import decode_pngs, select_attributes
from pipeline.config import validate_config
from pipeline.evaluate import edit_vectors, effect_matrix
from pipeline.publish import config_hash
from pipeline.report import edit_strip_png, effect_table_text, render_report
from pipeline.storage import BlockRecord, CorruptShardError, RunStore
from tests.ray_cluster import ray_local  # noqa: F401  (fixture)

C, H, W, T = 8, 2, 2, 3
IMG = 16


def _planted(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """h [N, T, C, H, W] = noise + z * u (u a fixed per-step direction), and the score z [N]."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(T, C, H, W, generator=g)
    z = torch.randn(n, generator=g)
    h = torch.randn(n, T, C, H, W, generator=g) + 1.5 * z[:, None, None, None, None] * u
    return h.numpy().astype(np.float16), z.numpy(), u


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (IMG, IMG, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_run(store: RunStore, h: np.ndarray, block: int) -> None:
    n = h.shape[0]
    records = []
    for start in range(0, n, block):
        seeds = np.arange(start, min(n, start + block))
        shards = tuple(
            store.write_activations(t, 900 - 300 * t, seeds, h[seeds, t], "w0", start)
            for t in range(h.shape[1])
        )
        samples = store.write_samples(seeds, [_png(int(s)) for s in seeds], "w0", start)
        records.append(
            BlockRecord(f"{start:012d}-{seeds[-1] + 1:012d}", start, int(seeds[-1]) + 1, shards, samples)
        )
    store.add_blocks(records)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A random tiny AttributeClassifier (16 px) with one binary and one continuous attribute."""
    from hspace.toy.classifier import AttributeClassifier

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clf")
    AttributeClassifier(["round", "size"], [True, False], image_size=IMG, width=8).save_pretrained(path)
    return path


def _config(tmp_path, model_dir, classifier_dir, **overrides) -> object:
    data = {
        "name": "stages",
        "model": {"source": str(model_dir)},
        "sampler": {"kind": "ddpm", "num_inference_steps": 3},
        "generate": {"n_samples": 24, "batch_size": 8, "seeds_per_block": 8},
        "resources": {"workers": 1},
        "storage": {"run_url": str(tmp_path / "run")},
        "catalog": {"url": str(tmp_path / "catalog"), "model_name": "tiny"},
        "pca": {"n_components": 2, "batch_size": 8},
        "annotate": {"classifier": str(classifier_dir), "batch_size": 8},
        "aggregate": {"quantile": 0.25, "random_baselines": 1},
        "evaluate": {"seed_start": 1000, "n_seeds": 3, "scales": [-2.0, 2.0], "batch_size": 6},
    } | overrides
    return validate_config(data)


# --------------------------------------------------------------------------------------------- aggregate


def test_mean_difference_and_boundary_recover_a_planted_direction():
    h, z, u = _planted(300)
    md, boundary, stats = attribute_directions(h, z, 0.2, "attr")
    cos_md = torch.nn.functional.cosine_similarity(
        md.vector.flatten(1).double(), u.flatten(1).double(), dim=1
    )
    cos_b = torch.nn.functional.cosine_similarity(
        boundary.vector.flatten(1).double(), u.flatten(1).double(), dim=1
    )
    # signal 1.5*|z| ~ 2.6 sigma at the 20% quantiles against unit noise in 32 dims: the mean of 60
    # samples per side is within ~0.2 of the truth, so cos > 0.95; the boundary normal is noisier
    # (it weights the within-class covariance) but must point the same way: cos > 0.7.
    assert bool((cos_md > 0.95).all()), cos_md
    assert bool((cos_b > 0.7).all()), cos_b
    assert md.name == "attr" and boundary.name == "attr_boundary" and md.kind == boundary.kind == "supervised"
    # the boundary direction is scaled to the mean difference's norm at every step
    torch.testing.assert_close(boundary.norm_per_step(), md.norm_per_step(), rtol=1e-5, atol=0)
    assert stats["n_pos"] == stats["n_neg"] == 60 and stats["score_pos_mean"] > stats["score_neg_mean"]


def test_boundary_fit_in_the_sample_span_equals_the_full_feature_fit():
    """The SVD reduction is exact for L2 logistic regression (representer theorem)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 120))
    x[:20, :3] += 1.0
    w, acc = boundary_normal(x[:20], x[20:])
    full = (
        LogisticRegression(C=1.0, max_iter=10_000, tol=1e-10)
        .fit(x, np.r_[np.ones(20), np.zeros(20)])
        .coef_[0]
    )
    # both solvers stop at ~1e-8 relative gradient; the unit normals agree to 1e-5 in cosine.
    assert float(w @ (full / np.linalg.norm(full))) > 1 - 1e-5
    assert acc == 1.0


def test_random_baselines_match_the_reference_norm_per_step():
    h, z, _ = _planted(50)
    md, _, _ = attribute_directions(h, z, 0.2, "attr")
    randoms, of = random_baselines([md], 2)
    assert [r.name for r in randoms] == ["random_attr_0", "random_attr_1"] and of == {
        r.name: "attr" for r in randoms
    }
    for r in randoms:
        torch.testing.assert_close(r.norm_per_step(), md.norm_per_step(), rtol=1e-5, atol=0)
    cos = float(
        torch.nn.functional.cosine_similarity(randoms[0].vector.flatten(), md.vector.flatten(), dim=0)
    )
    assert abs(cos) < 0.5  # 96 dims: a Gaussian direction is nearly orthogonal (|cos| ~ 0.1)


def test_attribute_task_reads_back_only_the_quantile_seeds_and_matches_in_memory(tmp_path):
    h, z, _ = _planted(40)
    store = RunStore(str(tmp_path / "run"))
    _write_run(store, h, block=16)
    md_w, b_w, stats = _attribute_task(
        store.url, {}, np.arange(40), z, 0.25, "attr", T, [900, 600, 300], "fp", {}
    )
    md, b = _from_wire(md_w), _from_wire(b_w)
    ref_md, ref_b, _ = attribute_directions(h, z, 0.25, "attr")
    # h was stored as float16 and is read back bit-identically: the same float64 mean difference.
    torch.testing.assert_close(md.vector, ref_md.vector, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.vector, ref_b.vector, rtol=1e-4, atol=1e-5)
    assert md.timesteps.tolist() == [900, 600, 300] and md.model_fingerprint == "fp"
    assert stats["n_pos"] == 10
    # the noise fraction of the mean difference, read back step chunk by step chunk, is the in-memory one
    assert md.provenance["noise_fraction"] == pytest.approx(ref_md.provenance["noise_fraction"], rel=1e-6)
    assert "noise_fraction" not in b.provenance


def test_conditional_task_reads_back_the_within_stratum_quantiles_and_matches_in_memory(tmp_path):
    h, z, _ = _planted(40)
    strata = (np.arange(40) % 3 == 0).astype(np.int64)  # two strata of 14 and 26 samples
    store = RunStore(str(tmp_path / "run"))
    _write_run(store, h, block=16)
    w = _conditional_task(
        store.url,
        {},
        np.arange(40),
        z,
        strata,
        0.25,
        "attr_conditional",
        T,
        [900, 600, 300],
        "fp",
        {"conditioned_on": "other"},
    )
    d = _from_wire(w)
    ref = supervised_direction(torch.from_numpy(h), z, 0.25, "ref", condition_on=torch.from_numpy(strata))
    torch.testing.assert_close(d.vector, ref.vector, rtol=0, atol=1e-6)
    assert d.name == "attr_conditional" and d.kind == "supervised" and d.timesteps.tolist() == [900, 600, 300]
    prov = d.provenance
    assert prov["method"] == "conditional_mean_difference" and prov["conditioned_on"] == "other"
    assert prov["strata"] == {"0": {"n": 26, "n_pos": 6, "n_neg": 6}, "1": {"n": 14, "n_pos": 3, "n_neg": 3}}


def test_streaming_sigma_equals_the_std_of_projections(tmp_path):
    h, z, u = _planted(37)
    store = RunStore(str(tmp_path / "run"))
    _write_run(store, h, block=10)
    d = Direction(vector=u, name="u")
    c = Direction(vector=torch.ones(C, H, W), name="const")  # [C,H,W]: the same vector at every step
    sigma = projection_sigma_streaming(store, [d, c], T, batch_size=8, use_ray=False)
    x = torch.from_numpy(h.astype(np.float64))
    for t in range(T):
        want_u = (x[:, t].flatten(1) @ (u[t].flatten().double() / u[t].norm().double())).std()
        want_c = (
            x[:, t].flatten(1) @ (torch.ones(C * H * W, dtype=torch.float64) / (C * H * W) ** 0.5)
        ).std()
        # float32 products of float16 data: relative error ~1e-6
        assert abs(float(sigma["u"][t]) - float(want_u)) < 1e-4 * float(want_u)
        assert abs(float(sigma["const"][t]) - float(want_c)) < 1e-4 * float(want_c)


# --------------------------------------------------------------------------------------------- evaluate math


def test_edit_vectors_in_sigma_units_and_random_rows_borrow_the_reference_sigma():
    v = Direction(vector=torch.randn(T, C, H, W), name="a", sigma=torch.tensor([1.0, 2.0, 3.0]))
    r = Direction(
        vector=torch.randn(T, C, H, W), name="random_a_0", kind="random", sigma=torch.tensor([9.0, 9.0, 9.0])
    )
    e = edit_vectors({"a": v, "random_a_0": r}, {"random_a_0": "a"}, "sigma", T)
    torch.testing.assert_close(e["a"].flatten(1).norm(dim=1), torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(e["random_a_0"].flatten(1).norm(dim=1), torch.tensor([1.0, 2.0, 3.0]))
    raw = edit_vectors({"a": v}, {}, "raw", T)
    torch.testing.assert_close(raw["a"], v.vector)
    with pytest.raises(ValueError, match="has no sigma"):
        edit_vectors({"b": Direction(vector=torch.ones(C, H, W), name="b")}, {}, "sigma", T)


def test_effect_matrix_reads_mean_changes_and_the_random_baseline():
    base = np.array([[0.0, 1.0], [2.0, 1.0]])  # 2 seeds x 2 attributes
    edited = {
        "a": np.array([[[-1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [3.0, 1.0]]]),  # attr 0 moves by -1 / +1
        "random_a_0": np.array([[[0.0, 1.1], [0.0, 0.9]], [[2.0, 1.1], [2.0, 0.9]]]),
    }
    eff = effect_matrix(
        base,
        edited,
        [-2.0, 2.0],
        ["x", "y"],
        [True, False],
        {"random_a_0": "a"},
        {"a": "supervised", "random_a_0": "random"},
    )
    m = eff["matrix"]
    assert m["plus"][0] == [1.0, 0.0] and m["minus"][0] == [-1.0, 0.0] and m["effect"][0] == [1.0, 0.0]
    assert eff["delta"]["a"]["x"] == {"-2": -1.0, "+2": 1.0}
    assert eff["score_units"] == {"x": "logit", "y": "value"}
    assert eff["random_baseline"]["y"]["rms"] == pytest.approx(0.1)
    assert m["z"][0][1] == pytest.approx(0.0) and m["z"][0][0] is None  # random rms 0 on x: no z
    json.dumps(eff, allow_nan=False)  # effects.json is strict JSON
    with pytest.raises(ValueError, match="positive scale"):
        effect_matrix(base, edited, [-2.0, -1.0], ["x", "y"], [True, False], {}, {})


# --------------------------------------------------------------------------------------------- report / publish helpers


def test_edit_strip_is_a_png_grid_of_upscaled_cells():
    images = np.zeros((2, 3, 3, 8, 8), np.uint8)
    images[1, 2] = 200
    png = edit_strip_png(images, min_cell=32, gutter=2)
    im = np.asarray(Image.open(io.BytesIO(png)))
    assert im.shape == (2 * 32 + 3 * 2, 3 * 32 + 4 * 2, 3)
    assert (im[2 + 32 + 2 + 5, 2 + 2 * (32 + 2) + 5] == 200).all()  # seed 1, scale 2 upscaled 4x
    with pytest.raises(ValueError, match="uint8"):
        edit_strip_png(images.astype(np.float32))


def test_report_is_self_contained_html_with_inline_images_and_escaped_names():
    effects = effect_matrix(
        np.zeros((2, 1)), {"a<b": np.ones((2, 2, 1))}, [-1.0, 1.0], ["x"], [True], {}, {"a<b": "pca"}
    )
    png = edit_strip_png(np.zeros((1, 3, 3, 4, 4), np.uint8))
    html = render_report(
        title="t",
        meta={"version": "v1"},
        directions=[{"name": "a<b", "kind": "pca", "units": "unit", "norm": 1.0, "sigma": 0.5}],
        effects=effects,
        previews={"a<b": png},
        preview_scales=[-1, 0, 1],
    )
    assert "a&lt;b" in html and "a<b" not in html
    srcs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(srcs) == 1 and base64.b64decode(srcs[0]) == png
    assert "http" not in html.replace("https://", "")  # nothing fetched from elsewhere
    assert "<table" in html and "<td>+0</td>" in html  # effect (1 - 1) / 2 = 0 in the matrix
    assert "x" in effect_table_text(effects)


def test_config_hash_ignores_execution_settings_and_sample_count(tmp_path, tiny_model_dir, classifier_dir):
    a = _config(tmp_path, tiny_model_dir, classifier_dir)
    b = _config(
        tmp_path / "elsewhere",
        tiny_model_dir,
        classifier_dir,
        resources={"workers": 2},
        generate={"n_samples": 48, "batch_size": 8, "seeds_per_block": 8},
    )
    c = _config(tmp_path, tiny_model_dir, classifier_dir, sampler={"kind": "ddpm", "num_inference_steps": 4})
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert preview_path("jac_face/0") == "previews/jac_face_0.png"


# --------------------------------------------------------------------------------------------- annotate (Ray)


@pytest.mark.usefixtures("ray_local")
def test_annotate_scores_every_seed_and_only_new_blocks_on_growth(tmp_path, tiny_model_dir, classifier_dir):
    from hspace.toy.classifier import AttributeClassifier
    from pipeline.annotate import annotate, read_scores

    cfg = _config(tmp_path, tiny_model_dir, classifier_dir)
    store = RunStore(cfg.storage.run_url)
    h, _, _ = _planted(24)
    _write_run(store, h[:16], block=8)
    first = annotate(cfg, store, progress=False)
    assert (
        first.n_scored_now == 16 and first.attributes == ["round", "size"] and first.binary == [True, False]
    )

    clf = AttributeClassifier.from_pretrained(classifier_dir)
    want = score_images(clf, decode_pngs([_png(s) for s in range(16)]), [0, 1], 5)
    table, record = read_scores(store)
    assert (
        first.scores.equals(table) and first.scores.schema.metadata == table.schema.metadata
    )  # no read-back needed
    assert (
        table.column_names == ["seed", "round", "size"] and table.schema.field("round").type == pa.float32()
    )
    got = np.stack([table.column("round").to_numpy(), table.column("size").to_numpy()], 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # same weights, same images: float32 rounding
    assert record["classifier_fingerprint"] == first.classifier_fingerprint

    # grow the run by one block: only its 8 seeds are scored, the table covers all 24
    seeds = np.arange(16, 24)
    shards = tuple(store.write_activations(t, 900, seeds, h[16:, t], "w1", 16) for t in range(T))
    store.add_blocks(
        [BlockRecord("g", 16, 24, shards, store.write_samples(seeds, [_png(s) for s in seeds], "w1", 16))]
    )
    second = annotate(cfg, store, progress=False)
    assert second.n_scored_now == 8 and second.n_samples == 24
    table, _ = read_scores(store)
    assert table.column("seed").to_pylist() == list(range(24))
    np.testing.assert_allclose(table.column("round").to_numpy()[:16], want[:, 0], rtol=1e-5, atol=1e-5)


def test_annotate_refuses_a_samples_shard_holding_another_blocks_seeds(tmp_path, classifier_dir):
    """A samples shard that passes its checksum but belongs to another block is named, not scored."""
    import dataclasses
    import json

    from pipeline.annotate import ClassifierScorer

    store = RunStore(str(tmp_path / "run"))
    h, _, _ = _planted(16)
    _write_run(store, h, block=8)
    first, second = store.blocks().values()
    scorer = ClassifierScorer(store.url, {}, str(classifier_dir), ["round", "size"], 8, "cpu")
    out = scorer({"block": np.array([json.dumps(first.to_dict())])})
    assert out["seed"].tolist() == list(range(8))
    swapped = dataclasses.replace(second, samples=first.samples)  # checksum right, seeds 0..7 for block 8..15
    with pytest.raises(CorruptShardError, match=rf"{first.samples.path}.*outside its block {second.key}"):
        scorer({"block": np.array([json.dumps(swapped.to_dict())])})


def test_annotate_rejects_unknown_attributes(classifier_dir):
    from hspace.toy.classifier import AttributeClassifier

    clf = AttributeClassifier.from_pretrained(classifier_dir)
    assert select_attributes(clf, None) == ["round", "size"]
    with pytest.raises(ValueError, match=r"annotate\.attributes: \['smile'\]"):
        select_attributes(clf, ["round", "smile"])


# ------------------------------------------------------------------- evaluate + publish (Ray, tiny model)


@pytest.mark.usefixtures("ray_local")
def test_evaluate_effects_and_publish_a_verified_version(tmp_path, tiny_model_dir, classifier_dir):
    from hspace import catalog as hcatalog
    from pipeline.evaluate import evaluate, load_model
    from pipeline.publish import build_inputs, publish

    cfg = _config(tmp_path, tiny_model_dir, classifier_dir)
    model = load_model(cfg, device="cpu")
    c, hh, ww = model.h_shape
    g = torch.Generator().manual_seed(1)
    big = Direction(
        vector=torch.randn(3, c, hh, ww, generator=g), name="big", kind="custom", sigma=torch.full((3,), 5.0)
    )
    zero_ish = Direction(
        vector=torch.randn(3, c, hh, ww, generator=g),
        name="tiny",
        kind="custom",
        sigma=torch.full((3,), 1e-6),
    )
    rnd = Direction(vector=torch.randn(3, c, hh, ww, generator=g), name="random_big_0", kind="random")
    dirs = {"big": big, "tiny": zero_ish, "random_big_0": rnd}
    ev = evaluate(
        cfg, dirs, {"random_big_0": "big"}, attributes=["round", "size"], binary=[True, False], progress=False
    )
    eff = ev.effects
    assert eff["directions"] == ["big", "tiny", "random_big_0"] and eff["n_seeds"] == 3
    tiny_row = eff["matrix"]["effect"][1]
    big_row = eff["matrix"]["effect"][0]
    # an edit of norm 2e-6 in h moves the float images (which the classifier scores) by ~1e-6: no
    # effect (renders are deterministic per seed, so edited and unedited differ only by the edit).
    assert max(abs(x) for x in tiny_row) < 1e-3
    assert max(abs(x) for x in big_row) > 1e-3  # a 5-sigma-norm edit changes what the classifier sees
    assert ev.previews["big"].shape == (2, 3, 3, IMG, IMG) and ev.preview_scales == [-2.0, 0.0, 2.0]
    np.testing.assert_array_equal(
        ev.previews["big"][:, 1], ev.previews["tiny"][:, 1]
    )  # the same unedited column

    inputs = build_inputs(
        cfg, model_fingerprint=model.fingerprint, classifier_fingerprint="clf", n_samples=24
    )
    previews = {n: edit_strip_png(p) for n, p in ev.previews.items()}
    pub = publish(
        cfg,
        directions=dirs,
        pca=None,
        effects=eff,
        previews=previews,
        preview_scales=ev.preview_scales,
        inputs=inputs,
        timesteps=None,
        run_summary={"samples": 24, "rows": 72, "bytes": 1},
        progress=False,
    )
    cat = hcatalog.open(cfg.catalog.url)
    v = cat.version("tiny", "latest")
    assert v.version == pub.version
    v.verify()  # every listed file's size and sha256
    assert set(v.files()) >= {"directions.safetensors", "effects.json", "report.html", "previews/big.png"}
    assert v.effects()["version"] == pub.version
    assert v.direction_names() == ["big", "tiny", "random_big_0"]
    assert v.manifest["inputs"]["config_hash"] == config_hash(cfg)
    assert "storage_options" not in json.dumps(v.manifest["extra"])
    html = v.read_file("report.html").decode()
    assert pub.version in html and html.count("data:image/png;base64,") == 3
    # every direction's grade is in its manifest entry; the no-effect edit lies within the random band
    grades = {d["name"]: d["grade"] for d in v.manifest["directions"]}
    assert grades == eff["grades"] and set(grades) == set(dirs)
    assert grades["tiny"]["letter"] == "F" and "within_random" in grades["tiny"]["flags"]
    assert grades["big"]["own"]["from"] == "largest_effect" and "wrong_sign" not in grades["big"]["flags"]
    assert "tiny" not in v.directions(min_grade="D") and "<h2>Grades</h2>" in html


def test_relative_paths_inside_a_submitted_job_are_flagged(
    tmp_path, tiny_model_dir, classifier_dir, monkeypatch
):
    from pipeline.build import ephemeral_path_warnings, override_urls

    cfg = _config(tmp_path, tiny_model_dir, classifier_dir, storage={"run_url": "runs/x"})
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ephemeral_path_warnings(cfg) == []  # a local run: relative to the user's directory, fine
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://pkg.zip"}})
    )
    warnings = ephemeral_path_warnings(cfg)
    assert len(warnings) == 1 and "storage.run_url='runs/x'" in warnings[0]
    assert ephemeral_path_warnings(cfg, run_url="s3://bucket/run") == []
    assert override_urls(cfg).storage.run_url.startswith("/")  # made absolute for the workers
