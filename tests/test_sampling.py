"""HSpaceSampler: seeded sampling, agreement with diffusers' pipelines, edits, asyrp, h-swap."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline

from hspace import Direction, Edit, HSpaceModel, HSpaceSampler, Trajectory

STEPS = 10
SEEDS = list(range(8))
# fp32 on the CPU: the same math in a different batch composition or a different (but
# equivalent) expression order differs by float rounding only, ~1e-6 after 10 steps.
TOL = 1e-5


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> HSpaceModel:
    return HSpaceModel.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def ddpm(model) -> HSpaceSampler:
    return HSpaceSampler(model, num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def ddim(model) -> HSpaceSampler:
    return HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def plain(ddpm) -> Trajectory:
    """Unedited DDPM samples of SEEDS with h and x_t recorded, shared by the tests below."""
    return ddpm.sample(SEEDS, record_x=True)


def direction(model, seed: int = 0, *, steps: int | None = STEPS, **kwargs) -> Direction:
    shape = (steps, *model.h_shape) if steps else model.h_shape
    vector = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return Direction(vector=vector, name=f"d{seed}", **kwargs)


# ---------------------------------------------------------------------------------- seeding
def test_sample_does_not_depend_on_its_batch(ddpm, plain):
    one_by_one = [ddpm.sample([seed]) for seed in SEEDS]
    images = torch.cat([t.images for t in one_by_one])
    h = torch.cat([t.h for t in one_by_one])
    assert (images - plain.images).abs().max() <= TOL
    assert (h - plain.h).abs().max() <= TOL
    reversed_order = ddpm.sample(SEEDS[::-1], batch_size=3, record_h=False)
    assert (reversed_order.images.flip(0) - plain.images).abs().max() <= TOL


def test_default_batch_is_small_on_the_cpu_and_explicit_sizes_are_checked():
    from hspace.sampling import CPU_DEFAULT_BATCH_SIZE, GPU_DEFAULT_BATCH_SIZE, resolve_batch_size

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_batch_size(None, 1000, cpu) == CPU_DEFAULT_BATCH_SIZE
    assert resolve_batch_size(None, 3, cpu) == 3
    assert resolve_batch_size(None, 1000, cuda) == GPU_DEFAULT_BATCH_SIZE  # bounded activation memory
    assert resolve_batch_size(None, 5, cuda) == 5
    assert resolve_batch_size(7, 1000, cpu) == 7
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        resolve_batch_size(0, 10, cpu)


def test_trajectory_fields(ddpm, plain, model):
    assert plain.images.shape == (8, 3, 16, 16) and plain.images.dtype == torch.float32
    assert 0 <= plain.images.min() and plain.images.max() <= 1
    assert plain.h.shape == (8, STEPS, *model.h_shape)
    assert plain.x_t.shape == (8, STEPS, 3, 16, 16)
    assert torch.equal(plain.x_t[:, 0], plain.x_T)  # step 0's input is x_T
    assert plain.timesteps.tolist() == list(range(900, -1, -100)) == ddpm.timesteps.tolist()
    assert plain.seeds == SEEDS and len(plain) == 8
    x_T = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(SEEDS[2]))
    assert torch.equal(plain.x_T[2], x_T)  # x_T is the first draw of the sample's own generator
    pil = plain.to_pil()
    assert len(pil) == 8 and pil[0].size == (16, 16) and pil[0].mode == "RGB"


def test_given_x_T_reproduces_the_seed_run(ddpm, plain):
    again = ddpm.sample(SEEDS[:3], x_T=plain.x_T[:3])
    assert (again.images - plain.images[:3]).abs().max() <= TOL  # same x_T and the seeds' own z_t


def test_records_mid_input_and_fp16_h(ddpm, plain, model):
    traj = ddpm.sample(SEEDS[:2], record_mid_input=True, h_dtype=torch.float16)
    assert traj.h.dtype == torch.float16
    assert traj.mid_input.shape == (2, STEPS, *model.mid_input_shape)
    # fp16 storage: relative rounding 2**-11 of values of order 10
    assert (traj.h.float() - plain.h[:2]).abs().max() <= 1e-2 * plain.h.abs().max()


# ---------------------------------------------------------------------------- vs diffusers
def test_matches_ddpm_pipeline(model, plain):
    pipe = DDPMPipeline(unet=model.unet, scheduler=model.make_scheduler("ddpm"))
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    out = pipe(batch_size=8, generator=generators, num_inference_steps=STEPS, output_type="pt").images
    assert (out - plain.images).abs().max() <= TOL


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_matches_ddim_pipeline(model, eta):
    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS, eta=eta)
    ours = sampler.sample(SEEDS[:4], record_h=False)
    pipe = DDIMPipeline(unet=model.unet, scheduler=model.make_scheduler("ddpm"))
    generators = [torch.Generator().manual_seed(s) for s in SEEDS[:4]]
    out = pipe(
        batch_size=4, generator=generators, eta=eta, num_inference_steps=STEPS, output_type="pt"
    ).images
    assert (out - ours.images).abs().max() <= TOL


def test_sampler_arguments_are_validated(model):
    with pytest.raises(ValueError, match="sampler='ddim'"):
        HSpaceSampler(model, sampler="ddpm", eta=0.3)
    with pytest.raises(ValueError, match="sampler"):
        HSpaceSampler(model, sampler="heun")
    with pytest.raises(ValueError, match="num_inference_steps"):
        HSpaceSampler(model, num_inference_steps=0)
    sampler = HSpaceSampler(model, num_inference_steps=2)
    with pytest.raises(ValueError, match="seeds"):
        sampler.sample(["a"])
    with pytest.raises(ValueError, match="x_T"):
        sampler.sample([0], x_T=torch.zeros(2, 3, 16, 16))


# ----------------------------------------------------------------------------------- edits
def test_scale_zero_equals_unedited(ddpm, plain, model):
    traj = ddpm.sample(SEEDS, edit=Edit(direction(model), scales=0.0))
    assert torch.equal(traj.images, plain.images)  # h + 0 * v is h: bit-identical


def test_edit_adds_gamma_v_only_at_its_steps(ddpm, plain, model):
    d, gamma, first = direction(model, 1), 2.5, 4
    traj = ddpm.sample(SEEDS, edit=Edit(d, scales=gamma, steps=range(first, 7)))
    # before the first edited step nothing changed, bit for bit
    assert torch.equal(traj.h[:, :first], plain.h[:, :first])
    assert torch.equal(traj.x_T, plain.x_T)
    # at the first edited step x_t is still the unedited one, so h = h_plain + gamma * v
    assert (traj.h[:, first] - (plain.h[:, first] + gamma * d.vector[first])).abs().max() <= TOL
    assert (traj.images - plain.images).abs().max() > 1e-2


def test_edit_with_per_step_and_shared_vectors_and_several_directions(ddpm, plain, model):
    shared = direction(model, 2, steps=None)  # [C, H, W]: the same vector at every step
    per_step = direction(model, 3)
    traj = ddpm.sample(SEEDS[:2], edit=Edit([shared, per_step], scales=[1.5, -0.5], steps=[0]))
    expected = plain.h[:2, 0] + 1.5 * shared.vector - 0.5 * per_step.vector[0]
    assert (traj.h[:, 0] - expected).abs().max() <= TOL  # deltas add up


def test_per_row_scales(ddpm, plain, model):
    d = direction(model, 4)
    rows = ddpm.sample([5, 5, 5], edit=Edit(d, scales=[0.0, 2.0, -1.0]), record_h=False)
    assert (rows.images[0] - plain.images[5]).abs().max() <= TOL
    for i, gamma in [(1, 2.0), (2, -1.0)]:
        single = ddpm.sample([5], edit=Edit(d, scales=gamma), record_h=False)
        assert (rows.images[i] - single.images[0]).abs().max() <= TOL


def test_sigma_units_scale_the_unit_vector(ddpm, model):
    sigma = torch.linspace(0.5, 3.0, STEPS)
    d = direction(model, 6, sigma=sigma)
    in_sigma = ddpm.sample([1, 2], edit=Edit(d, scales=1.5, units="sigma"), record_h=False)
    unit = d.vector / d.vector.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    raw = Direction(vector=unit * sigma.view(-1, 1, 1, 1), name="raw")
    in_raw = ddpm.sample([1, 2], edit=Edit(raw, scales=1.5), record_h=False)
    assert (in_sigma.images - in_raw.images).abs().max() <= TOL
    with pytest.raises(ValueError, match="no sigma"):
        ddpm.sample([0], edit=Edit(direction(model, 7), scales=1.0, units="sigma"))


def test_sample_edits_renders_seeds_by_scales(ddpm, plain, model):
    d = direction(model, 8)
    scales = [-2.0, 0.0, 3.0]
    grid = ddpm.sample_edits(SEEDS[:2], d, scales)
    assert grid.shape == (2, 3, 3, 16, 16)
    assert torch.equal(grid[:, 1], plain.images[:2])  # scale 0 is the unedited sample
    single = ddpm.sample([SEEDS[1]], edit=Edit(d, scales=3.0), record_h=False)
    assert (grid[1, 2] - single.images[0]).abs().max() <= TOL


def test_asyrp_with_zero_scale_equals_plain_ddim(ddim, model):
    base = ddim.sample(SEEDS[:3])
    asyrp = ddim.sample(SEEDS[:3], edit=Edit(direction(model, 9), scales=0.0, mode="asyrp"))
    # eq. 2-5 with sigma_t = 0 and both eps equal is DDIMScheduler.step in the same op order
    assert (asyrp.images - base.images).abs().max() <= TOL


def test_asyrp_with_zero_scale_equals_plain_ddpm_without_clipping(model):
    # eq. 2-5 with eta = 1 is the DDPM posterior (fixed_small variance) when x0 is not clipped,
    # with z_t from the same generators; a different expression: rounding bound 1e-4 (measured ~1e-6)
    sampler = HSpaceSampler(model, num_inference_steps=STEPS, clip_sample=False)
    base = sampler.sample(SEEDS[:3], record_h=False)
    asyrp = sampler.sample(
        SEEDS[:3], edit=Edit(direction(model, 9), scales=0.0, mode="asyrp"), record_h=False
    )
    assert (asyrp.images - base.images).abs().max() <= 1e-4


def test_asyrp_differs_from_both(ddim, model):
    d = direction(model, 10)
    base = ddim.sample(SEEDS[:3], record_h=False)
    both = ddim.sample(SEEDS[:3], edit=Edit(d, scales=2.0, steps=range(0, 6)))
    asyrp = ddim.sample(SEEDS[:3], edit=Edit(d, scales=2.0, steps=range(0, 6), mode="asyrp"))
    assert (both.images - base.images).abs().max() > 1e-2
    assert (asyrp.images - base.images).abs().max() > 1e-2
    assert (asyrp.images - both.images).abs().max() > 1e-2
    # at step 0 both modes see the same x_T, so the recorded (edited) h agree
    assert (asyrp.h[:, 0] - both.h[:, 0]).abs().max() <= TOL


# ------------------------------------------------------------------------- compatibility
def test_incompatible_directions_raise(ddpm, model):
    with pytest.raises(ValueError, match="h_shape|shape"):
        ddpm.sample([0], edit=Edit(Direction(vector=torch.zeros(STEPS, 16, 4, 4), name="small"), scales=1.0))
    with pytest.raises(ValueError, match="steps"):
        ddpm.sample([0], edit=Edit(direction(model, steps=STEPS + 1), scales=1.0))
    wrong_ts = direction(model, timesteps=torch.arange(STEPS))
    with pytest.raises(ValueError, match="timesteps"):
        ddpm.sample([0], edit=Edit(wrong_ts, scales=1.0))
    with pytest.raises(ValueError, match="fingerprint"):
        ddpm.sample([0], edit=Edit(direction(model, model_fingerprint="0123456789abcdef"), scales=1.0))
    with pytest.raises(ValueError, match="out of range"):
        ddpm.sample([0], edit=Edit(direction(model), scales=1.0, steps=[STEPS]))
    with pytest.raises(ValueError, match="scales"):
        ddpm.sample([0, 1, 2], edit=Edit([direction(model), direction(model, 1)], scales=[1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="mode"):
        Edit(direction(model), mode="asym")
    with pytest.raises(TypeError, match="Edit.directions must be hspace.Direction objects, got Tensor"):
        Edit(direction(model).vector)
    with pytest.raises(TypeError, match="edit_directions must be hspace.Direction objects, got str"):
        ddpm.sample_edits([0], ["not a direction"], [1.0])
    matching = direction(model, timesteps=ddpm.timesteps, model_fingerprint=model.fingerprint)
    ddpm.sample([0], edit=Edit(matching, scales=1.0, steps=[STEPS - 1]), record_h=False)  # no error


# ---------------------------------------------------------------------------------- h-swap
def test_h_swap_all_steps_replaces_h_with_the_donors(ddpm, plain):
    swapped = ddpm.h_swap([0, 1], [2, 3])
    donor = ddpm.sample([2, 3])  # same batch composition as the donor run inside h_swap
    assert torch.equal(swapped.h, donor.h)  # h at every step is the donor's, bit for bit
    assert torch.equal(swapped.x_T, plain.x_T[:2])  # x_T and z_t stay the receiver's
    assert (swapped.images - plain.images[:2]).abs().max() > 1e-2
    assert (swapped.images - plain.images[[2, 3]]).abs().max() > 1e-2


def test_h_swap_with_itself_reproduces_the_sample(ddpm, plain):
    swapped = ddpm.h_swap([4, 5], [4, 5])
    alone = ddpm.sample([4, 5], record_h=False)  # same batch composition: exact comparison
    assert torch.equal(swapped.images, alone.images)


def test_h_swap_of_a_step_range_leaves_earlier_steps(ddpm, plain):
    swapped = ddpm.h_swap([0], [2], steps=range(5, STEPS))
    # batch of 1 here vs 8 in `plain`: float rounding only
    assert (swapped.h[:, :5] - plain.h[[0], :5]).abs().max() <= TOL
    assert (swapped.h[:, 5:] - plain.h[[2], 5:]).abs().max() <= TOL
    assert (swapped.h[:, 5] - plain.h[[0], 5]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="h_replace"):
        ddpm.sample([0], h_replace=torch.zeros(1, STEPS - 1, 32, 4, 4))
