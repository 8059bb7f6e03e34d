"""Every direction finder on every kind of denoiser (tests/tiny_pipelines.py: Stable Diffusion,
SDXL, LDM, DiT, a class-conditional U-Net), with the conditioning each takes.

- The Jacobian's split at h is the denoiser's own forward: decoding the captured h gives the
  plain forward's output (float32: 1e-5 of the output's scale), for the guided noise and for each
  branch; the Jacobian's top singular pairs agree with the SVD of the explicit Jacobian (values
  1e-3 relative, subspace 1e-2 rad, the bars of tests/test_jacobian.py), and the guided Jacobian is
  the guidance combination of the branch Jacobians.
- DDIM inversion runs through the VAE under the prompt / class label and reconstructs far better
  than sampling from an unrelated x_T.
- PCA, the supervised mean difference, disentangling, random_like, the Jacobian and the h-swap
  each give directions (or h) that edit the model's images and record the capture point.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import tiny_pipelines  # noqa: E402

from hspace import HSpaceModel, HSpaceSampler  # noqa: E402
from hspace.conditioning import Condition  # noqa: E402
from hspace.directions import (  # noqa: E402
    disentangle,
    mean_difference,
    random_like,
    select_quantiles,
    supervised_direction,
)
from hspace.inversion import Inversion, psnr, reconstruct, reconstruction_report, vae_round_trip  # noqa: E402
from hspace.jacobian import (  # noqa: E402
    explicit_jacobian,
    jacobian_condition,
    jacobian_directions,
    split_denoiser,
)
from hspace.model import forward_ad_safe  # noqa: E402
from hspace.pca import PerTimestepPCA  # noqa: E402

KINDS = list(tiny_pipelines.BUILDERS)
CONDITIONING = {
    "text": {"prompt": "a photo of a smiling face"},
    "text-xl": {"prompt": "a photo of a smiling face"},
    "latent": {},
    "dit": {"class_labels": 3},
    "class": {"class_labels": 3},
}
#: Guidance where the model has an unconditional branch (3: both branches matter), else none.
GUIDANCE = {"text": 3.0, "text-xl": 3.0, "latent": 1.0, "dit": 3.0, "class": 1.0}
STEPS = 3
SEEDS = [0, 1, 2, 3, 4, 5]
T = 500


@pytest.fixture(scope="module")
def models():
    return {kind: HSpaceModel.from_pipeline(build()) for kind, build in tiny_pipelines.BUILDERS.items()}


def conditioning(kind: str) -> dict:
    return {**CONDITIONING[kind], "guidance_scale": GUIDANCE[kind]}


def latent(model: HSpaceModel, n: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *model.latent_shape, generator=torch.Generator().manual_seed(seed))


def encode(model: HSpaceModel, kind: str, n: int, branch: str = "guided") -> Condition:
    request = jacobian_condition(model, n, branch=branch, **conditioning(kind))
    return model.conditioner.encode(request, n, model.device, model.dtype)


# ---------------------------------------------------------------------- the split at h
SPLIT_CASES = [(kind, branch) for kind in KINDS for branch in ("guided", "cond")] + [
    ("text", "uncond"),
    ("text-xl", "uncond"),
    ("dit", "uncond"),
]


@pytest.mark.parametrize("kind,branch", SPLIT_CASES)
def test_decode_of_the_captured_h_equals_the_denoisers_own_forward(models, kind, branch):
    model = models[kind]
    x = latent(model, 2)
    condition = encode(model, kind, 2, branch)
    with torch.no_grad():
        # the reference: one plain forward of the whole (guided) call, no split
        out = model.predict(condition.model_input(x), torch.tensor(T), condition)
        ref = condition.guide(out) if branch == "guided" else out[condition.branch_rows(branch)]
        split = split_denoiser(model, x, T, condition, branch=branch)
        first, again = split.decode(split.h), split.decode(split.h)
    assert split.h.shape == (2, *model.h_shape)
    if condition.guided:
        assert split.condition.guided == (branch == "guided")
    # float32, the same kernels; the guided h of the other branch is h + (h_u - h_c), which rounds
    assert (first - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert torch.equal(first, again), "decoding must not change the recorded prefix"


@pytest.mark.parametrize(
    "kind,capture",
    [
        ("text", "mid_block:input"),
        ("text", "down_blocks.1"),  # a tuple output: h and the skips it passes on
        ("text", "up_blocks.0"),
        ("dit", "transformer_blocks.1"),
        ("latent", "up_blocks.1"),
    ],
)
def test_the_split_works_at_any_capture_point(kind, capture):
    model = HSpaceModel.from_pipeline(tiny_pipelines.BUILDERS[kind](), capture=capture)
    x = latent(model, 1)
    condition = encode(model, kind, 1)
    with torch.no_grad():
        ref = condition.guide(model.predict(condition.model_input(x), torch.tensor(T), condition))
        split = split_denoiser(model, x, T, condition)
        eps = split.decode(split.h)
        moved = split.decode(split.h + 0.1 * torch.randn_like(split.h))
    assert split.h.shape == (1, *model.h_shape)
    assert (eps - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert (moved - ref).abs().max() > 1e-4, "h must reach the output"


@pytest.mark.parametrize("kind", ["text", "text-xl", "dit"])
def test_forward_ad_safe_sets_the_classic_processor_on_every_attention(models, kind):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    denoiser = models[kind].denoiser
    attention = [m for m in denoiser.modules() if isinstance(m, Attention)]
    assert attention, "the tiny model has attention"
    before = [m.processor for m in attention]
    with forward_ad_safe(denoiser):
        assert all(type(m.processor) is AttnProcessor for m in attention)
    assert all(m.processor is p for m, p in zip(attention, before, strict=True))


# ---------------------------------------------------------------------- the Jacobian
def _largest_principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    qa, qb = torch.linalg.qr(a.double().T)[0], torch.linalg.qr(b.double().T)[0]
    return float(torch.arccos(torch.linalg.svdvals(qa.T @ qb).min().clamp(max=1.0)))


@pytest.mark.parametrize(
    "kind,branch",
    [
        ("text", "guided"),
        ("text", "cond"),
        ("text-xl", "guided"),
        ("latent", "guided"),
        ("dit", "guided"),
        ("dit", "uncond"),
        ("class", "cond"),
    ],
)
def test_jacobian_top_singular_vectors_match_the_explicit_svd(models, kind, branch):
    model, k = models[kind], 3
    x = latent(model, 1, seed=1)
    jac = explicit_jacobian(model, x, T, branch=branch, **conditioning(kind))[0].double()
    _, s, vh = torch.linalg.svd(jac, full_matrices=False)
    res = jacobian_directions(
        model, x, T, k, method="krylov", tol=1e-4, n_iter=100, branch=branch, **conditioning(kind)
    )
    assert bool(res.converged.all())
    rel = float(((res.singular_values[0].double() - s[:k]) / s[:k]).abs().max())
    assert rel <= 1e-3, f"singular values off by {rel:.2e} relative"
    angle = _largest_principal_angle(res.vectors[0].reshape(k, -1), vh[:k])
    assert angle <= 1e-2, f"largest principal angle {angle:.2e} rad"
    assert res.meta["branch"] == branch and res.meta["capture"] == model.capture.spec


@pytest.mark.parametrize("kind", ["text", "dit"])
def test_the_guided_jacobian_is_the_guidance_combination_of_the_branch_jacobians(models, kind):
    model, g = models[kind], GUIDANCE[kind]
    x = latent(model, 1, seed=2)
    jac = {
        b: explicit_jacobian(model, x, T, branch=b, **conditioning(kind))[0]
        for b in ("guided", "cond", "uncond")
    }
    combined = (1 - g) * jac["uncond"] + g * jac["cond"]  # h moves by the same vector in both branches
    assert (jac["guided"] - combined).abs().max() <= 1e-4 * float(jac["guided"].abs().max())
    assert (jac["cond"] - jac["uncond"]).abs().max() > 1e-2 * float(jac["cond"].abs().max())


# ---------------------------------------------------------------------- directions from every finder
@pytest.fixture(scope="module")
def recorded(models):
    """Per kind: the sampler and a recorded run (h of the conditional branch, x_t) over SEEDS."""
    out = {}
    for kind, model in models.items():
        sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS)
        traj = sampler.sample(SEEDS, record_x=True, record_branch="cond", **conditioning(kind))
        out[kind] = (sampler, traj)
    return out


def edit_change(kind, sampler, direction, scale) -> float:
    """Largest pixel change of the first two seeds' images when ``direction`` is added at ``scale``."""
    images = sampler.sample_edits(SEEDS[:2], direction, [0.0, scale], **conditioning(kind))
    return float((images[:, 1] - images[:, 0]).abs().max())


def h_norm(traj) -> float:
    return float(traj.h.flatten(2).norm(dim=2).mean())


@pytest.mark.parametrize("kind", KINDS)
def test_pca_directions_edit_the_images_and_record_the_capture_point(models, recorded, kind):
    model, (sampler, traj) = models[kind], recorded[kind]
    pca = PerTimestepPCA(2, STEPS, timesteps=traj.timesteps, model_fingerprint=model.fingerprint)
    direction = pca.partial_fit(traj.h).direction(0, capture=model.capture.spec)
    assert direction.capture == model.capture.spec and direction.vector.shape == (STEPS, *model.h_shape)
    assert edit_change(kind, sampler, direction, 0.5 * h_norm(traj)) > 1e-3


@pytest.fixture(scope="module")
def supervised(models, recorded):
    """Per kind: the mean difference of h between the brighter and the darker half of the images."""
    out = {}
    for kind, model in models.items():
        _, traj = recorded[kind]
        scores = traj.images.mean(dim=(1, 2, 3))  # any function of the images: the models have no classifier
        out[kind] = supervised_direction(
            traj.h, scores, 0.5, "brightness", timesteps=traj.timesteps,
            model_fingerprint=model.fingerprint, capture=model.capture.spec,
        )  # fmt: skip
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_supervised_mean_difference_edits_the_images_and_records_the_capture_point(
    models, recorded, supervised, kind
):
    model, (sampler, traj) = models[kind], recorded[kind]
    direction = supervised[kind]
    pos, neg = select_quantiles(traj.images.mean(dim=(1, 2, 3)), 0.5)
    assert torch.allclose(direction.vector, mean_difference(traj.h[pos], traj.h[neg]), atol=1e-6)
    assert direction.capture == model.capture.spec
    assert edit_change(kind, sampler, direction, 2.0) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_disentangled_direction_is_orthogonal_and_edits(models, recorded, supervised, kind):
    model, (sampler, traj) = models[kind], recorded[kind]
    other = PerTimestepPCA(1, STEPS).partial_fit(traj.h).direction(0, capture=model.capture.spec)
    direction = disentangle(supervised[kind], other)
    cos = torch.nn.functional.cosine_similarity(direction.vector.flatten(1), other.vector.flatten(1))
    assert float(cos.abs().max()) <= 1e-5
    assert direction.capture == model.capture.spec
    assert edit_change(kind, sampler, direction, 2.0) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_random_like_matches_the_norm_and_edits(models, recorded, supervised, kind):
    model, (sampler, _) = models[kind], recorded[kind]
    source = supervised[kind]
    direction = random_like(source, seed=1)
    assert torch.allclose(direction.norm_per_step(), source.norm_per_step(), rtol=1e-5)
    assert direction.capture == model.capture.spec
    assert edit_change(kind, sampler, direction, 2.0) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_jacobian_directions_edit_the_images_and_record_the_capture_point(models, recorded, kind):
    model, (sampler, traj) = models[kind], recorded[kind]
    step = 1
    result = jacobian_directions(
        model, traj.x_t[:1, step], traj.timesteps[step], 2, method="krylov", n_iter=3, **conditioning(kind)
    )
    direction = result.to_directions(0, seed=SEEDS[0], step=step)[0]
    assert direction.capture == model.capture.spec
    assert direction.provenance["guidance_scale"] == GUIDANCE[kind]
    assert edit_change(kind, sampler, direction, 0.5 * h_norm(traj)) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_h_swap_renders_with_the_donors_h(models, recorded, kind):
    _, (sampler, traj) = models[kind], recorded[kind]
    swapped = sampler.h_swap(SEEDS[:2], SEEDS[2:4], **conditioning(kind))
    donor = sampler.sample(SEEDS[2:4], **conditioning(kind))  # the same (default) recorded branch
    assert torch.allclose(swapped.h, donor.h, atol=1e-5), "every step's h is the donor's"
    assert float((swapped.images - traj.images[:2]).abs().max()) > 1e-3


# ---------------------------------------------------------------------- DDIM inversion
INVERSION_STEPS = 10
#: Measured (10 steps, the mild schedule below): reconstruction vs the images' VAE round trip,
#: lowest image: text 30.9, text-xl 32.4, latent (VQ) 41.0, dit 30.9 dB; the class pixel model
#: against its images 24.5 dB. From an unrelated x_T: 14.5, 14.8, 32.2, 14.4, 4.6 dB.
MIN_PSNR = {"text": 25.0, "text-xl": 25.0, "latent": 36.0, "dit": 25.0, "class": 20.0}
#: How far the inversion must beat an unrelated x_T (measured: 16-18 dB; the VQ decoder maps
#: every latent near the same image, so there only 9.8 dB; pixels 20 dB).
MIN_GAIN = {"text": 10.0, "text-xl": 10.0, "latent": 5.0, "dit": 10.0, "class": 15.0}


def inversion_model(kind: str) -> HSpaceModel:
    """A tiny model whose inversion is well conditioned: a random denoiser is no denoiser, so the
    schedule is milder (beta_end 0.005, as tests/test_inversion.py does), and the random VAE's
    scaling factor makes its latents unit-variance, as a real VAE's scaling factor does."""
    model = HSpaceModel.from_pipeline(tiny_pipelines.BUILDERS[kind]())
    model.scheduler_config.update(beta_schedule="linear", beta_start=0.0001, beta_end=0.005)
    if model.vae is not None:
        probe = torch.rand(8, *model.image_shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            raw = model.encode(probe) / model.vae.config.scaling_factor
        model.vae.register_to_config(scaling_factor=float(1 / raw.std()))
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_inversion_under_the_prompt_reconstructs_through_the_vae(kind):
    model = inversion_model(kind)
    cond = CONDITIONING[kind]
    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=INVERSION_STEPS, clip_sample=False)
    images = sampler.sample([0, 1, 2], guidance_scale=1.0, record_h=False, **cond).images
    report = reconstruction_report(model, images, INVERSION_STEPS, **cond)
    print(kind, report)
    inv = report.inversion
    assert inv.x_T.shape == (3, *model.latent_shape) and inv.h.shape == (3, INVERSION_STEPS, *model.h_shape)
    assert inv.guidance_scale == 1.0  # inversion runs unguided unless asked
    target = vae_round_trip(model, images) if model.is_latent else images
    unrelated = Inversion(
        torch.randn(inv.x_T.shape, generator=torch.Generator().manual_seed(99)) * inv.x_T.std(),
        images, inv.timesteps, INVERSION_STEPS, prompts=inv.prompts, class_labels=inv.class_labels,
    )  # fmt: skip
    baseline = psnr(target, reconstruct(model, unrelated, record_h=False).images)
    achieved = report.psnr_vs_vae if model.is_latent else report.psnr
    assert float(achieved.min()) >= MIN_PSNR[kind]
    assert float(achieved.min()) >= float(baseline.max()) + MIN_GAIN[kind]
    if model.is_latent:  # as close to the input images as the VAE itself allows (measured within 0.6 dB)
        assert bool((report.psnr >= report.vae_psnr - 1.0).all())
