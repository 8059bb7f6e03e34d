"""Specification of hspace.pca: streaming PCA (checked against scikit-learn) and per-timestep PCA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hspace.directions import Direction
from hspace.pca import IncrementalPCA, PerTimestepPCA

STDS = torch.tensor([10.0, 7.0, 5.0, 3.5, 2.5])  # ratios >= 1.4 between neighbours: clear spectral gaps


def _gapped_data(n: int = 600, d: int = 40, noise: float = 0.3, seed: int = 0) -> torch.Tensor:
    """n samples in d dims: 5 orthogonal directions with std STDS plus isotropic noise, mean != 0."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, len(STDS), generator=g, dtype=torch.float64))
    z = torch.randn(n, len(STDS), generator=g, dtype=torch.float64) * STDS.double()
    mean = torch.randn(d, generator=g, dtype=torch.float64) * 3
    return (mean + z @ basis.T + noise * torch.randn(n, d, generator=g, dtype=torch.float64)).float()


def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(torch.split(x, size))


def _abs_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).abs()


@pytest.mark.parametrize("solver", ["gram", "svd"])
def test_matches_sklearn_incremental_pca_on_the_same_batches(solver):
    from sklearn.decomposition import IncrementalPCA as SkIPCA

    x = _gapped_data()
    ours, ref = IncrementalPCA(5, solver=solver), SkIPCA(n_components=5)
    for b in _batches(x, 50):
        ours.partial_fit(b)
        ref.partial_fit(b.numpy())
    cos = _abs_cos(ours.components_, torch.from_numpy(ref.components_))
    assert bool((cos >= 0.999).all()), cos  # the project's bar; gaps >= 1.4x make it far tighter in practice
    # Same algorithm in float64 on both sides: the spectra agree to ~1e-10; 1e-6 relative is generous.
    np.testing.assert_allclose(ours.explained_variance_.numpy(), ref.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(
        ours.explained_variance_ratio_.numpy(), ref.explained_variance_ratio_, rtol=1e-6
    )
    np.testing.assert_allclose(ours.singular_values_.numpy(), ref.singular_values_, rtol=1e-6)
    np.testing.assert_allclose(ours.mean_.numpy(), ref.mean_, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ours.var_.numpy(), ref.var_, rtol=1e-9)
    assert ours.n_samples_seen_ == ref.n_samples_seen_ == 600
    np.testing.assert_allclose(
        ours.transform(x[:7]).double().numpy(), ref.transform(x[:7].numpy()) * 1, atol=1e-4
    )


def test_components_are_the_planted_directions_up_to_sign():
    x = _gapped_data(n=2000)
    est = IncrementalPCA(5)
    for b in _batches(x, 100):
        est.partial_fit(b)
    # explained std ~ planted std (sampling error ~ 1/sqrt(2000) ~ 2%, allow 10%)
    assert torch.allclose(est.explained_variance_.sqrt().float(), STDS, rtol=0.1)
    gram = est.components_ @ est.components_.T
    assert torch.allclose(gram, torch.eye(5, dtype=gram.dtype), atol=1e-10)


def test_merge_equals_one_pass_when_k_covers_the_data_rank():
    # Data in a 4-dim affine subspace: truncation to k=4 discards nothing, so merging two states
    # must equal one pass over all batches up to float64 rounding.
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(30, 4, generator=g, dtype=torch.float64))
    z = torch.randn(400, 4, generator=g, dtype=torch.float64) * torch.tensor(
        [9.0, 5.0, 3.0, 1.0], dtype=torch.float64
    )
    x = 5 + z @ basis.T
    x[:200] += basis[:, 0] * 2  # the two halves have different means
    one = IncrementalPCA(4)
    for b in _batches(x, 40):
        one.partial_fit(b)
    a, b = IncrementalPCA(4), IncrementalPCA(4)
    for batch in _batches(x[:200], 40):
        a.partial_fit(batch)
    for batch in _batches(x[200:], 25):
        b.partial_fit(batch)
    a.merge(b)
    assert a.n_samples_seen_ == 400
    # float64 with values ~10: 1e-9 relative is ~1e5 ulps of slack and still catches any real error.
    assert torch.allclose(a.mean_, one.mean_, rtol=1e-12, atol=1e-12)
    assert torch.allclose(a.var_, one.var_, rtol=1e-9)
    assert torch.allclose(a.singular_values_, one.singular_values_, rtol=1e-9)
    assert bool((_abs_cos(a.components_, one.components_) > 1 - 1e-9).all())
    exact = torch.linalg.svdvals(x - x.mean(0))[:4]
    assert torch.allclose(a.singular_values_, exact, rtol=1e-9)


def test_merge_on_noisy_data_stays_close_to_one_pass():
    x = _gapped_data(seed=3)
    one = IncrementalPCA(5)
    parts = [IncrementalPCA(5) for _ in range(3)]
    for i, b in enumerate(_batches(x, 50)):
        one.partial_fit(b)
        parts[i % 3].partial_fit(b)
    parts[0].merge(parts[1]).merge(parts[2])
    assert bool((_abs_cos(parts[0].components_, one.components_) >= 0.999).all())
    # discarded noise variance (0.09 per dim) is tiny next to the kept spectrum: 1e-3 relative.
    assert torch.allclose(parts[0].explained_variance_, one.explained_variance_, rtol=1e-3)


def test_state_dict_round_trip_resumes_identically():
    x = _gapped_data(seed=4)
    a = IncrementalPCA(5)
    a.partial_fit(x[:300])
    b = IncrementalPCA.from_state_dict(a.state_dict())
    a.partial_fit(x[300:])
    b.partial_fit(x[300:])
    assert torch.equal(a.components_, b.components_) and a.n_samples_seen_ == b.n_samples_seen_


def test_bad_inputs_raise_clear_errors():
    est = IncrementalPCA(5)
    with pytest.raises(ValueError, match="at least n_components rows"):
        est.partial_fit(torch.randn(3, 10))
    with pytest.raises(ValueError, match="2-D"):
        est.partial_fit(torch.randn(10))
    est.partial_fit(torch.randn(10, 10))
    with pytest.raises(ValueError, match="features"):
        est.partial_fit(torch.randn(10, 11))
    with pytest.raises(ValueError, match="NaN"):
        est.partial_fit(torch.full((10, 10), float("nan")))
    with pytest.raises(ValueError, match="n_components"):
        IncrementalPCA(0)


# ---------------------------------------------------------------- per-timestep
H_SHAPE = (4, 2, 2)


def _rotating_h(n: int = 300, steps: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """h [n, T, 4, 2, 2] whose main direction rotates from (1, -0.5, 0..) to (0.5, -1, 0..) over steps,
    so the largest-|entry| sign rule alone would flip it half way."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    alphas = torch.linspace(0, 1, steps)
    u = torch.zeros(steps, d)
    u[:, 0] = 1 - 0.5 * alphas
    u[:, 1] = -0.5 - 0.5 * alphas
    u = u / u.norm(dim=1, keepdim=True)
    z = torch.randn(n, 1, 1, generator=g) * 5
    h = z * u + 0.2 * torch.randn(n, steps, d, generator=g)
    return h.reshape(n, steps, *H_SHAPE), u


def test_per_timestep_direction_is_sign_consistent_across_steps():
    h, u = _rotating_h()
    pca = PerTimestepPCA(3, 4, timesteps=[750, 500, 250, 0])
    for b in torch.split(h, 60):
        pca.partial_fit(b)
    raw_first = pca.components_[:, 0]
    # Precondition: the raw components really do change sign convention between the ends.
    assert float(raw_first[0] @ raw_first[-1]) < 0
    d = pca.direction(0)
    v = d.vector.flatten(1)
    assert d.kind == "pca" and d.units == "unit" and d.name == "pca_0"
    assert bool(((v[1:] * v[:-1]).sum(1) > 0).all())
    assert float(v[0, v[0].abs().argmax()]) > 0  # anchor step: largest entry positive
    assert bool((torch.nn.functional.cosine_similarity(v, u, dim=1) > 0.99).all())
    # sigma = sqrt(explained variance) ~ 5 (the planted std); 10% for n=300
    assert torch.allclose(d.sigma, torch.full((4,), 5.0), rtol=0.1)
    assert d.timesteps.tolist() == [750, 500, 250, 0]
    d_last = pca.direction(0, anchor=3)
    assert float(d_last.vector[3].flatten().abs().argmax()) == float(v[3].abs().argmax())


def test_sigma_of_is_exact_on_components_and_close_on_random_directions():
    h, _ = _rotating_h(n=3000, seed=1)
    pca = PerTimestepPCA(2, 4).partial_fit(h)
    d = pca.direction(1)
    assert torch.allclose(pca.sigma_of(d), d.sigma, rtol=1e-5)
    # A random unit direction: the data's projection std is ~ sqrt(noise^2 + small signal part).
    g = torch.Generator().manual_seed(5)
    r = Direction(torch.randn(4, *H_SHAPE, generator=g), name="r")
    unit = r.normalized().vector.flatten(1)
    empirical = torch.einsum("ntd,td->nt", h.flatten(2), unit).std(0)
    # isotropic-residual approximation on isotropic noise: 5% covers sampling error at n=3000.
    assert torch.allclose(pca.sigma_of(r), empirical, rtol=0.05)


def test_per_step_fits_merge_and_save_load_round_trip():
    h, _ = _rotating_h(n=200, seed=2)
    full = PerTimestepPCA(3, 4, model_fingerprint="fp").partial_fit(h)
    early = PerTimestepPCA(3, 4, model_fingerprint="fp").partial_fit(h[:, :2], steps=[0, 1])
    late = PerTimestepPCA(3, 4)
    for t in (2, 3):
        late.partial_fit_step(t, h[:, t])
    assert early.fitted_steps == [0, 1] and late.fitted_steps == [2, 3]
    with pytest.raises(ValueError, match=r"steps \[2, 3\]"):
        early.direction(0)
    merged = early.merge(late)
    # steps fitted in separate objects see the same rows: equal up to float64 rounding
    assert torch.allclose(merged.components_, full.components_, atol=1e-12)
    url = "memory://pca-test/pca.safetensors"
    merged.save(url)
    back = PerTimestepPCA.load(url)
    assert back.h_shape == H_SHAPE and back.model_fingerprint == "fp" and back.n_samples_seen_ == [200] * 4
    assert torch.equal(back.components_, merged.components_)
    assert torch.equal(back.direction(0).vector, merged.direction(0).vector)
    # A float32 copy for a catalog stays within float32 rounding of the original.
    merged.save(url, dtype=torch.float32)
    small = PerTimestepPCA.load(url)
    assert torch.allclose(small.explained_variance_, merged.explained_variance_, rtol=1e-5)
    dirs = back.directions(2)
    assert [x.name for x in dirs] == ["pca_0", "pca_1"]


def test_per_step_rejects_mismatched_shapes():
    pca = PerTimestepPCA(2, 3)
    with pytest.raises(ValueError, match="steps"):
        pca.partial_fit(torch.randn(5, 4, *H_SHAPE))
    with pytest.raises(ValueError, match="timesteps"):
        PerTimestepPCA(2, 3, timesteps=[1, 2])
    with pytest.raises(ValueError, match="merge"):
        pca.merge(PerTimestepPCA(2, 4))
