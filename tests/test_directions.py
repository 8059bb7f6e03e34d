"""Specification of hspace.directions: the Direction container, its file format and eqs. 11-12."""

from __future__ import annotations

import json

import pytest
import torch

from hspace.directions import (
    Direction,
    disentangle,
    load_directions,
    mean_difference,
    mean_difference_noise,
    random_like,
    save_directions,
    select_quantiles,
    supervised_direction,
)
from hspace.io import read_safetensors

H_SHAPE = (4, 2, 2)


def _direction(name: str = "d", steps: int | None = 3, seed: int = 0, **kw) -> Direction:
    g = torch.Generator().manual_seed(seed)
    shape = (steps, *H_SHAPE) if steps else H_SHAPE
    return Direction(torch.randn(shape, generator=g), name=name, **kw)


# ---------------------------------------------------------------- container
def test_per_step_and_global_vectors_expand_to_T_steps():
    per_step = _direction(steps=3)
    glob = _direction(steps=None)
    assert per_step.expand(3).shape == (3, *H_SHAPE)
    assert torch.equal(glob.expand(5)[4], glob.vector)
    assert torch.equal(per_step.at_step(1), per_step.vector[1])
    assert torch.equal(glob.at_step(7), glob.vector)
    with pytest.raises(ValueError, match="cannot expand"):
        per_step.expand(4)


def test_normalized_has_unit_norm_at_every_step():
    d = _direction(steps=4).normalized()
    # float32 norms of 16 numbers: 1e-6 is a few ulps.
    assert torch.allclose(d.norm_per_step(), torch.ones(4), atol=1e-6)
    assert d.units == "unit"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "magic"}, "kind"),
        ({"units": "furlongs"}, "units"),
        ({"sigma": torch.ones(2)}, "sigma"),
        ({"timesteps": torch.arange(5)}, "timesteps"),
        ({"provenance": {"x": object()}}, "JSON"),
        ({"name": "a.sigma"}, "reserved"),
    ],
)
def test_bad_fields_raise_value_error_naming_the_field(kwargs, match):
    base = {"vector": torch.zeros(3, *H_SHAPE), "name": "d"}
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Direction(**base)


def test_vector_of_wrong_rank_is_rejected():
    with pytest.raises(ValueError, match="vector"):
        Direction(torch.zeros(4, 4), name="d")


def test_check_compatible_names_the_mismatch():
    d = _direction(steps=3, timesteps=torch.tensor([900, 500, 100]), model_fingerprint="abc")
    d.check_compatible(H_SHAPE, [900, 500, 100], "abc")
    with pytest.raises(ValueError, match="h_shape"):
        d.check_compatible((4, 4, 4))
    with pytest.raises(ValueError, match="steps"):
        d.check_compatible(H_SHAPE, timesteps=[1, 2])
    with pytest.raises(ValueError, match="timesteps"):
        d.check_compatible(H_SHAPE, timesteps=[999, 500, 100])
    with pytest.raises(ValueError, match="fingerprint"):
        d.check_compatible(H_SHAPE, fingerprint="other")
    # A global direction without timesteps fits any sampler.
    _direction(steps=None).check_compatible(H_SHAPE, timesteps=list(range(50)), fingerprint="zzz")


# ---------------------------------------------------------------- files
def test_save_load_round_trip_is_exact_on_a_local_path(tmp_path):
    d = _direction(
        "smile",
        steps=3,
        kind="supervised",
        sigma=torch.tensor([1.0, 2.0, 3.0]),
        timesteps=torch.tensor([900, 500, 100]),
        model_fingerprint="f00",
        provenance={"q": 0.1, "seeds": [1, 2]},
    )
    url = str(tmp_path / "sub" / "smile.safetensors")
    d.save(url)
    back = Direction.load(url)
    assert torch.equal(back.vector, d.vector)
    assert torch.equal(back.sigma, d.sigma)
    assert torch.equal(back.timesteps, d.timesteps)
    assert (back.name, back.kind, back.units, back.model_fingerprint, back.provenance) == (
        "smile",
        "supervised",
        "raw",
        "f00",
        {"q": 0.1, "seeds": [1, 2]},
    )


def test_file_header_holds_json_metadata_and_no_pickle(tmp_path):
    url = str(tmp_path / "d.safetensors")
    _direction("a", provenance={"k": 1}).save(url)
    raw = (tmp_path / "d.safetensors").read_bytes()
    assert b"\x80\x04" not in raw[:16]  # not a pickle protocol header
    _, meta = read_safetensors(url)
    assert json.loads(meta["a"])["provenance"] == {"k": 1}


def test_many_directions_in_one_file_on_memory_fs():
    ds = [_direction("a", seed=1, sigma=torch.ones(3)), _direction("b", steps=None, seed=2, kind="jacobian")]
    url = "memory://catalog/directions.safetensors"
    save_directions(ds, url)
    tensors, meta = read_safetensors(url)
    assert {"a", "a.sigma", "b"} <= set(tensors)
    back = load_directions(url)
    assert list(back) == ["a", "b"]
    assert torch.equal(back["b"].vector, ds[1].vector) and back["b"].kind == "jacobian"
    with pytest.raises(ValueError, match="name is required"):
        Direction.from_safetensors_dict(tensors, meta)
    with pytest.raises(ValueError, match="duplicate"):
        save_directions([ds[0], ds[0]], url)


def test_load_of_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        Direction.load(str(tmp_path / "nope.safetensors"))


# ---------------------------------------------------------------- eq. 11
def test_mean_difference_is_difference_of_means():
    pos = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    neg = torch.tensor([[0.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    assert torch.equal(mean_difference(pos, neg), torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="differ"):
        mean_difference(pos, torch.zeros(2, 3))


def test_select_quantiles_picks_top_and_bottom_fraction():
    scores = torch.tensor([0.5, 9.0, -3.0, 2.0, 7.0, -1.0, 0.0, 4.0, 1.0, 3.0])
    pos, neg = select_quantiles(scores, 0.2)
    assert pos.tolist() == [1, 4] and neg.tolist() == [2, 5]
    pos, neg = select_quantiles(scores, 0.5)
    assert len(pos) == len(neg) == 5 and not set(pos.tolist()) & set(neg.tolist())


@pytest.mark.parametrize("q", [0.0, -0.1, 0.51, 1.0])
def test_select_quantiles_rejects_q_outside_half_open_interval(q):
    with pytest.raises(ValueError, match="q must be"):
        select_quantiles(torch.arange(10.0), q)


def test_supervised_direction_recovers_a_planted_attribute_in_h_and_x_T():
    g = torch.Generator().manual_seed(0)
    n, steps = 400, 3
    attr = torch.randn(n, generator=g)
    planted = torch.zeros(steps, *H_SHAPE)
    planted[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0])
    h = 0.1 * torch.randn(n, steps, *H_SHAPE, generator=g) + attr.view(n, 1, 1, 1, 1) * planted
    d = supervised_direction(h, attr, 0.1, "attr", timesteps=torch.tensor([9, 5, 1]))
    assert d.vector.shape == (steps, *H_SHAPE) and d.kind == "supervised"
    cos = torch.nn.functional.cosine_similarity(d.vector.flatten(1), planted.flatten(1), dim=1)
    # noise 0.1 per coordinate vs. a planted separation of >= 3: cos is ~0.99; 0.95 leaves margin.
    assert bool((cos > 0.95).all())
    # sigma = std of projection on the unit direction ~ |planted_t| * std(attr) = 1, 2, 3 (10% slack for n=400).
    assert torch.allclose(d.sigma, torch.tensor([1.0, 2.0, 3.0]), rtol=0.1)
    assert d.provenance["n_pos"] == 40 and d.provenance["space"] == "h"

    x_T = torch.randn(n, 3, 2, 2, generator=g)
    x_T[:, 1, 0, 1] += 2 * attr
    dx = supervised_direction(x_T, attr, 0.25, "attr_xT", space="x_T")
    assert dx.vector.shape == (3, 2, 2) and dx.vector.abs().argmax().item() == 1 * 4 + 0 * 2 + 1


def test_mean_difference_noise_is_its_standard_error_over_the_estimate():
    """Two groups of n unit-variance Gaussians in D = 400 dims, means 0 and 10 along one axis: the
    difference of means carries noise of expected norm sqrt(2 D / n) on an estimate of norm about
    sqrt(100 + 2 D / n). Four times the samples halve it. 5% tolerance: the estimate's norm varies
    by about 1.3% (one standard deviation) at these sizes."""
    g = torch.Generator().manual_seed(0)
    steps, shape = 2, (4, 10, 10)
    for n in (100, 400):
        pos = torch.randn(n, steps, *shape, generator=g)
        pos[:, :, 0, 0, 0] += 10.0
        neg = torch.randn(n, steps, *shape, generator=g)
        noise = mean_difference_noise(pos, neg)
        expected = (800 / n) ** 0.5 / (100 + 800 / n) ** 0.5
        assert noise.shape == (steps,) and noise.dtype == torch.float64
        torch.testing.assert_close(
            noise, torch.full((steps,), expected, dtype=torch.float64), rtol=0.05, atol=0
        )
    # one latent per sample (x_T [N, C, H, W]): one value for the whole latent
    assert mean_difference_noise(pos[:, 0], neg[:, 0]).shape == ()
    with pytest.raises(ValueError, match="two samples per group"):
        mean_difference_noise(pos[:1], neg)
    with pytest.raises(ValueError, match="differ"):
        mean_difference_noise(pos, neg[:, :1])


def test_supervised_direction_records_how_much_of_it_is_noise():
    g = torch.Generator().manual_seed(3)
    n, attr = 200, torch.randn(200, generator=g)
    h = torch.randn(n, 2, *H_SHAPE, generator=g)
    h[:, :, 0, 0, 0] += 2 * attr.view(n, 1)
    d = supervised_direction(h, attr, 0.2, "attr")
    pos, neg = select_quantiles(attr, 0.2)
    assert d.provenance["noise_fraction"] == pytest.approx(
        float(mean_difference_noise(h[pos], h[neg]).mean())
    )
    assert 0 < d.provenance["noise_fraction"] < 1
    # a conditional mean difference averages strata; its noise is not estimated
    strata = (torch.arange(n) % 2).long()
    assert "noise_fraction" not in supervised_direction(h, attr, 0.2, "c", condition_on=strata).provenance
    # one sample a group has no variance to read
    assert "noise_fraction" not in supervised_direction(h[:6], attr[:6], 0.2, "tiny").provenance
    # groups with equal means: the ratio is undefined, and a manifest holds no inf or nan
    flat = torch.zeros(10, 2, *H_SHAPE)
    assert mean_difference_noise(flat[:5], flat[5:]).isnan().all()
    assert "noise_fraction" not in supervised_direction(flat, torch.arange(10.0), 0.2, "flat").provenance


def _correlated_pair(n: int = 2000, steps: int = 2):
    """h = 3 grey * alpha + 3 glasses * beta + noise, with P(glasses | grey) = 0.8 and 0.2 otherwise."""
    g = torch.Generator().manual_seed(1)
    grey = (torch.rand(n, generator=g) < 0.5).float()
    glasses = (torch.rand(n, generator=g) < 0.2 + 0.6 * grey).float()
    alpha, beta = torch.zeros(steps, *H_SHAPE), torch.zeros(steps, *H_SHAPE)
    alpha[:, 0, 0, 0], beta[:, 1, 0, 0] = 1.0, 1.0
    h = 3 * grey.view(n, 1, 1, 1, 1) * alpha + 3 * glasses.view(n, 1, 1, 1, 1) * beta
    h = h + 0.1 * torch.randn(h.shape, generator=g)
    glasses_score = 4 * glasses - 2 + 0.5 * torch.randn(n, generator=g)  # a classifier logit
    return h, glasses_score, grey, alpha, beta


def test_conditional_mean_difference_holds_a_correlated_attribute_fixed():
    h, score, grey, alpha, beta = _correlated_pair()

    def cos(d, ref):
        return torch.nn.functional.cosine_similarity(d.vector.flatten(1), ref.flatten(1), dim=1)

    plain = supervised_direction(h, score, 0.2, "glasses")
    conditional = supervised_direction(h, score, 0.2, "glasses_given_grey", condition_on=grey > 0.5)
    # the plain mean difference carries grey hair (0.8 - 0.2 = 0.6 of it: cos ~ 0.5 with alpha) ...
    assert bool((cos(plain, alpha) > 0.4).all())
    # ... the conditional one does not, and points along the glasses axis
    assert bool((cos(conditional, alpha).abs() < 0.05).all())
    assert bool((cos(conditional, beta) > 0.99).all())
    prov = conditional.provenance
    assert prov["method"] == "conditional_mean_difference" and set(prov["strata_sizes"]) == {"0", "1"}
    assert sum(prov["strata_sizes"].values()) == len(score) and conditional.sigma.shape == (2,)


def test_conditional_mean_difference_rejects_bad_strata():
    h, score, grey, _, _ = _correlated_pair(n=40)
    with pytest.raises(ValueError, match="integer stratum labels"):
        supervised_direction(h, score, 0.2, "x", condition_on=score)
    with pytest.raises(ValueError, match="has 39 entries"):
        supervised_direction(h, score, 0.2, "x", condition_on=grey[:39].long())
    lonely = torch.zeros(40, dtype=torch.long)
    lonely[0] = 1
    with pytest.raises(ValueError, match="stratum 1 of condition_on has 1 sample"):
        supervised_direction(h, score, 0.2, "x", condition_on=lonely)


# ---------------------------------------------------------------- eq. 12
def test_disentangle_result_is_orthogonal_to_every_other_at_every_step():
    v = _direction("v", steps=3, seed=0)
    others = [_direction("a", steps=3, seed=1), _direction("b", steps=None, seed=2)]
    out = disentangle(v, others)
    assert out.kind == "disentangled" and out.vector.shape == v.vector.shape
    for o in others:
        dots = (out.vector.flatten(1).double() * o.expand(3).flatten(1).double()).sum(1)
        # float32 storage of 16-dim vectors of norm ~4: 1e-5 is far above rounding, far below |v|.
        assert dots.abs().max() < 1e-5


def test_disentangle_against_one_other_subtracts_the_projection():
    v = _direction("v", steps=None, seed=3)
    a = _direction("a", steps=None, seed=4)
    expected = v.vector - (v.vector * a.vector).sum() / (a.vector * a.vector).sum() * a.vector
    assert torch.allclose(disentangle(v, a).vector, expected, atol=1e-5)


def test_disentangle_survives_collinear_others():
    v = _direction("v", steps=None, seed=5)
    a = _direction("a", steps=None, seed=6)
    twice = Direction(2 * a.vector, name="a2")
    out = disentangle(v, [a, twice])
    assert torch.allclose(out.vector, disentangle(v, a).vector, atol=1e-5)


# ---------------------------------------------------------------- random baseline
def test_random_like_matches_norms_and_is_deterministic_from_seed():
    v = _direction("v", steps=4, seed=7)
    r1, r2, r3 = random_like(v, 11), random_like(v, 11), random_like(v, 12)
    assert torch.allclose(r1.norm_per_step(), v.norm_per_step(), rtol=1e-5)
    assert torch.equal(r1.vector, r2.vector) and not torch.equal(r1.vector, r3.vector)
    assert r1.kind == "random" and r1.provenance["seed"] == 11


def test_in_units_gives_raw_vectors_or_sigma_scaled_unit_vectors():
    sigma = torch.tensor([0.5, 1.0, 2.0])
    d = _direction(steps=3, sigma=sigma)
    torch.testing.assert_close(d.in_units("raw", 3), d.vector)
    e = d.in_units("sigma", 3)
    torch.testing.assert_close(e.flatten(1).norm(dim=1), sigma)
    torch.testing.assert_close(e / sigma.view(-1, 1, 1, 1), d.normalized().vector)
    borrowed = d.in_units("sigma", 3, sigma=torch.tensor([4.0]))  # one value for every step
    torch.testing.assert_close(borrowed.flatten(1).norm(dim=1), torch.full((3,), 4.0))
    const = _direction(steps=None, sigma=torch.tensor([2.0]))
    assert const.in_units("sigma", 5).shape == (5, *H_SHAPE)
    with pytest.raises(ValueError, match="has no sigma"):
        _direction(steps=3).in_units("sigma", 3)
    with pytest.raises(ValueError, match="sigma has 3 entries but the sampler has 4 steps"):
        _direction(steps=None, sigma=sigma).in_units("sigma", 4)
    with pytest.raises(ValueError, match="units must be 'raw' or 'sigma'"):
        d.in_units("unit", 3)


def test_directions_that_share_one_timesteps_tensor_save_to_one_file(tmp_path):
    from hspace.directions import load_directions, save_directions

    timesteps = torch.tensor([999, 500, 0])
    dirs = [Direction(torch.randn(3, 2, 2, 2), name=n, timesteps=timesteps) for n in ("a", "b")]
    save_directions(dirs, str(tmp_path / "two.safetensors"))
    loaded = load_directions(str(tmp_path / "two.safetensors"))
    assert set(loaded) == {"a", "b"} and torch.equal(loaded["b"].timesteps, timesteps)
