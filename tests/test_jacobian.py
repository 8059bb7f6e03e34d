"""Specification of hspace.jacobian: the U-Net split at h, Alg. 1, Alg. 2 and the masked Jacobian,
checked against the SVD of the explicit Jacobian of the tiny random U-Net (h: 32x4x4 = 512 dims,
eps: 3x16x16 = 768 dims)."""

from __future__ import annotations

import pytest
import torch

import hspace.jacobian
from hspace.jacobian import (
    _broadcast_mask,
    explicit_jacobian,
    jacobian_directions,
    split_unet,
)
from hspace.model import forward_ad_safe
from tests.conftest import build_tiny_unet

T = 500
K = 4


@pytest.fixture(scope="module")
def unet():
    return build_tiny_unet()


@pytest.fixture(scope="module")
def x_t():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def exact(unet, x_t):
    """Explicit Jacobians [2, 768, 512] (float64) and their SVD."""
    jac = explicit_jacobian(unet, x_t, T).double()
    u, s, vh = torch.linalg.svd(jac, full_matrices=False)
    return jac, u, s, vh


@pytest.fixture(scope="module")
def alg1(unet, x_t):
    # oversample=8: the tiny net's spectrum has gaps of only ~5% (s_i / s_{i+1} ~ 1.05), so
    # plain Alg. 1 needs >100 iterations; 8 extra vectors bring it to ~15 at the same accuracy.
    return jacobian_directions(
        unet, x_t, T, K, method="subspace", oversample=8, tol=1e-4, n_iter=200, return_left=True
    )


def _largest_principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle (radians) between span of the rows of a [k, D] and of b [k, D]."""
    qa = torch.linalg.qr(a.double().T)[0]
    qb = torch.linalg.qr(b.double().T)[0]
    return float(torch.arccos(torch.linalg.svdvals(qa.T @ qb).min().clamp(max=1.0)))


def _assert_matches_svd(
    vectors: torch.Tensor, values: torch.Tensor, s: torch.Tensor, vh: torch.Tensor
) -> None:
    """Top-k singular values within 1e-3 relative and subspace within 1e-2 rad (the project's accuracy bars)."""
    k = values.shape[0]
    rel = ((values.double() - s[:k]) / s[:k]).abs().max()
    assert rel <= 1e-3, f"singular values off by {float(rel):.2e} relative"
    angle = _largest_principal_angle(vectors.reshape(k, -1), vh[:k])
    assert angle <= 1e-2, f"largest principal angle {angle:.2e} rad"


# ---------------------------------------------------------------- the split
def test_decode_of_the_encoded_h_reproduces_the_unet_forward(unet, x_t):
    captured = {}
    handle = unet.mid_block.register_forward_hook(lambda _m, _i, out: captured.setdefault("h", out))
    with torch.no_grad():
        ref = unet(x_t, T).sample
        split = split_unet(unet, x_t, T)
        eps = split.decode(captured["h"])
    handle.remove()
    assert split.h.shape == (2, 32, 4, 4)
    assert torch.equal(split.h, captured["h"])
    # Same kernels in the same order: equal up to float32 rounding (|eps| ~ 1).
    assert (eps - ref).abs().max() <= 1e-5


def test_decode_recomputes_only_the_modules_after_h(unet, x_t):
    # a module inside a block runs only when that block's own forward runs
    probes = {
        "down": unet.down_blocks[0].resnets[0],
        "mid": unet.mid_block.resnets[0],
        "up": unet.up_blocks[0].resnets[0],
    }
    calls = dict.fromkeys(probes, 0)
    handles = [
        m.register_forward_pre_hook(lambda *_a, n=n: calls.__setitem__(n, calls[n] + 1))
        for n, m in probes.items()
    ]
    try:
        with torch.no_grad():
            split = split_unet(unet, x_t, T)
            assert calls == {"down": 1, "mid": 1, "up": 1}
            split.decode(split.h)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"down": 1, "mid": 1, "up": 2}, (
        "the down blocks and the mid block answer what they recorded"
    )


def test_decode_handles_skip_blocks_fourier_time_and_per_image_timesteps():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        time_embedding_type="fourier",
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10.0, 300.0])
    with torch.no_grad():
        ref = unet(x, t).sample
        split = split_unet(unet, x, t)
        assert (split.decode(split.h) - ref).abs().max() <= 1e-5


def test_forward_ad_safe_swaps_attention_processors_and_restores_them(unet):
    from diffusers.models.attention_processor import AttnProcessor

    attn = [m for m in unet.modules() if hasattr(m, "set_processor")]
    before = [m.processor for m in attn]
    with forward_ad_safe(unet):
        assert all(type(m.processor) is AttnProcessor for m in attn)
    assert all(m.processor is p for m, p in zip(attn, before, strict=True))


# ---------------------------------------------------------------- Alg. 1
def test_alg1_matches_the_explicit_svd_for_each_image_in_a_batch(alg1, exact):
    jac, u, s, vh = exact
    assert alg1.vectors.shape == (2, K, 32, 4, 4) and alg1.singular_values.shape == (2, K)
    assert bool(alg1.converged.all())
    for b in range(2):
        _assert_matches_svd(alg1.vectors[b], alg1.singular_values[b], s[b], vh[b])


def test_alg1_reports_true_residuals_and_left_vectors(alg1, exact):
    jac, u, s, vh = exact
    for b in range(2):
        v = alg1.vectors[b].reshape(K, -1).double()
        sv = alg1.singular_values[b].double()
        true_res = (jac[b].T @ (jac[b] @ v.T) - v.T * sv**2).norm(dim=0)
        scale = s[b, 0] ** 2
        # Reported residuals are float32 J products: they agree with the float64 ones to ~1e-6 * s_1^2.
        assert (true_res - alg1.residuals[b].double()).abs().max() <= 1e-5 * scale
        assert true_res.max() <= 2e-4 * scale  # the stopping rule tol=1e-4, with float32 slack
        left = alg1.left_vectors[b].reshape(K, -1).double()
        cos = (left * u[b, :, :K].T).sum(1).abs()
        assert bool((cos >= 0.999).all()), cos


def test_alg1_directions_carry_provenance(alg1):
    dirs = alg1.to_directions(1, name_prefix="jac", seed=7, step=12, model_fingerprint="fp")
    assert [d.name for d in dirs] == [f"jac_{i}" for i in range(K)]
    d = dirs[0]
    assert d.kind == "jacobian" and d.units == "unit" and d.vector.shape == (32, 4, 4) and not d.per_step
    assert abs(float(d.vector.norm()) - 1) <= 1e-5
    assert d.provenance["seed"] == 7 and d.provenance["step"] == 12 and d.provenance["timestep"] == T
    assert d.provenance["mask"] is None and d.model_fingerprint == "fp"
    assert d.capture == "mid_block" and d.provenance["branch"] == "guided"
    assert d.provenance["singular_value"] == pytest.approx(float(alg1.singular_values[1, 0]))


# ---------------------------------------------------------------- Alg. 2
def test_alg2_sequential_agrees_with_alg1_and_the_explicit_svd(unet, x_t, alg1, exact):
    _, _, s, vh = exact
    seq = jacobian_directions(
        unet, x_t[:1], T, K, method="sequential", block_size=2, oversample=10, tol=1e-4, n_iter=200
    )
    assert len(seq.block_iterations) == 2 and bool(seq.converged.all())
    _assert_matches_svd(seq.vectors[0], seq.singular_values[0], s[0], vh[0])
    assert torch.allclose(seq.singular_values[0], alg1.singular_values[0], rtol=1e-3)
    cos = (seq.vectors[0].flatten(1) * alg1.vectors[0].flatten(1)).sum(1).abs()
    assert bool((cos >= 0.999).all()), cos  # each vector, not only the subspace (gaps are >= 3%)


# ---------------------------------------------------------------- block Krylov
def test_krylov_matches_the_explicit_svd_with_fewer_products_than_alg1(unet, x_t, alg1, exact):
    _, _, s, vh = exact
    kry = jacobian_directions(unet, x_t, T, K, method="krylov", tol=1e-4, n_iter=200)
    assert kry.meta["method"] == "block_krylov_iteration" and kry.meta["block_size"] == K
    assert bool(kry.converged.all()) and kry.block_iterations == [kry.iterations]
    for b in range(2):
        _assert_matches_svd(kry.vectors[b], kry.singular_values[b], s[b], vh[b])
    # J^T J vector products: K per Krylov block against K + 8 per Alg. 1 iteration
    assert kry.iterations * K < alg1.iterations * (K + 8), (kry.iterations, alg1.iterations)


def test_krylov_with_small_blocks_restarts_and_a_basis_filling_h_space(unet, x_t, exact, monkeypatch):
    _, _, s, vh = exact
    # blocks of 128 fill the 512 dimensions of h after 4 products: then the Ritz pairs are exact
    full = jacobian_directions(unet, x_t[:1], T, K, method="krylov", oversample=124, tol=1e-14, n_iter=50)
    assert full.iterations == 4 and not bool(full.converged.all())  # float32 products: residual > 1e-14
    assert float(((full.singular_values[0].double() - s[0, :K]) / s[0, :K]).abs().max()) <= 1e-5
    assert _largest_principal_angle(full.vectors[0].reshape(K, -1), vh[0, :K]) <= 1e-4
    sizes = []
    ritz = hspace.jacobian._ritz
    monkeypatch.setattr(hspace.jacobian, "_ritz", lambda v, w: sizes.append(v.shape[2]) or ritz(v, w))
    monkeypatch.setattr(hspace.jacobian, "KRYLOV_MAX_BLOCKS", 3)  # cap 2 (K + 2) = 12 vectors
    small = jacobian_directions(unet, x_t[:1], T, K, method="krylov", block_size=2, tol=1e-4, n_iter=200)
    assert bool(small.converged.all()) and max(sizes) == 12 and len(sizes) > 6, sizes  # restarted
    _assert_matches_svd(small.vectors[0], small.singular_values[0], s[0], vh[0])
    with pytest.raises(ValueError, match="n_iter"):
        jacobian_directions(unet, x_t, T, K, method="krylov", block_size=1, n_iter=3)


# ---------------------------------------------------------------- masked Jacobian (eq. 9)
def test_masked_jacobian_matches_svd_of_the_explicitly_masked_jacobian(unet, x_t, exact):
    jac = exact[0]
    mask = torch.zeros(16, 16)
    mask[4:12, 2:9] = 1.0
    res = jacobian_directions(unet, x_t[:1], T, 3, mask=mask, oversample=8, tol=1e-4, n_iter=200)
    masked = jac[0] * mask.reshape(1, -1).repeat(3, 1).reshape(-1, 1).double()
    _, s, vh = torch.linalg.svd(masked, full_matrices=False)
    _assert_matches_svd(res.vectors[0], res.singular_values[0], s, vh)
    # A different region gives a different subspace: the mask really is applied.
    assert _largest_principal_angle(res.vectors[0].reshape(3, -1), exact[3][0, :3]) > 0.1
    assert res.meta["mask"]["coverage"] == pytest.approx(56 / 256)


@pytest.mark.parametrize("shape", [(16, 16), (1, 16, 16), (2, 16, 16), (2, 1, 16, 16), (1, 1, 16, 16)])
def test_mask_shapes_broadcast_to_batch_by_pixels(shape):
    m = _broadcast_mask(torch.ones(shape), 2, (16, 16), torch.zeros(1))
    assert m.ndim == 4 and m.shape[1:] == (1, 16, 16) and m.shape[0] in (1, 2)


def test_bad_arguments_raise_clear_errors(unet, x_t):
    with pytest.raises(ValueError, match="mask"):
        jacobian_directions(unet, x_t, T, 2, mask=torch.ones(8, 8))
    with pytest.raises(ValueError, match="method"):
        jacobian_directions(unet, x_t, T, 2, method="lanczos")
    with pytest.raises(ValueError, match="exceeds"):
        jacobian_directions(unet, x_t, T, 513)
    with pytest.raises(ValueError, match="init"):
        jacobian_directions(unet, x_t, T, 2, init=torch.randn(3, 32, 4, 4))
