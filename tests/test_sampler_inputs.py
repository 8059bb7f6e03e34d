"""Sampler and inversion inputs that would give garbage (NaN images, wrapped seeds) are refused."""

from __future__ import annotations

import math

import pytest
import torch

from hspace import Direction, Edit, HSpaceModel, HSpaceSampler
from hspace.inversion import ddim_invert, reconstruct

STEPS = 2


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> HSpaceModel:
    return HSpaceModel.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def sampler(model) -> HSpaceSampler:
    return HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def direction(model) -> Direction:
    return Direction(torch.randn(*model.h_shape), name="d")


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64 - 1, 2**64, True, 1.0, "3", None])
def test_seeds_outside_0_to_2_63_or_not_ints_are_refused_everywhere(sampler, direction, seed):
    with pytest.raises(ValueError, match=r"seed") as err:
        sampler.sample([0, seed])
    assert repr(seed) in str(err.value) or str(seed) in str(err.value)
    with pytest.raises(ValueError, match="seed"):
        sampler.sample_edits([seed], direction, [0.0])
    with pytest.raises(ValueError, match="seed"):
        sampler.h_swap([0], [seed])


def test_largest_valid_seed_renders(sampler):
    """2**63 - 1 is a seed; -1 (which torch would wrap to 2**64 - 1) is refused instead."""
    out = sampler.sample([2**63 - 1, 0], record_h=False)
    assert out.seeds == [2**63 - 1, 0] and bool(torch.isfinite(out.images).all())


@pytest.mark.parametrize("steps", [2.5, "10", True, 0, 10**6, None])
def test_num_inference_steps_must_be_an_int_in_range(model, steps):
    with pytest.raises(ValueError, match="num_inference_steps") as err:
        HSpaceSampler(model, sampler="ddim", num_inference_steps=steps)
    assert repr(steps) in str(err.value) or str(steps) in str(err.value)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim_invert(model, torch.rand(1, *model.image_shape), steps)


@pytest.mark.parametrize("eta", [math.nan, math.inf, -0.1, 1.5, True, "0.5"])
def test_eta_must_be_finite_in_0_1(model, eta):
    with pytest.raises(ValueError, match="eta") as err:
        HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS, eta=eta)
    assert repr(eta) in str(err.value) or str(eta) in str(err.value)


def test_ddpm_keeps_eta_1(model):
    assert HSpaceSampler(model, num_inference_steps=STEPS, eta=1).eta == 1.0
    with pytest.raises(ValueError, match="sampler='ddpm' has eta=1"):
        HSpaceSampler(model, num_inference_steps=STEPS, eta=0.5)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_edit_scales_are_refused_naming_the_value(sampler, direction, bad):
    with pytest.raises(ValueError, match=f"Edit.scales must be finite, got {bad}"):
        Edit(direction, scales=bad)
    with pytest.raises(ValueError, match=f"Edit.scales must be finite, got {bad}"):
        Edit(direction, scales=[0.0, bad])
    with pytest.raises(ValueError, match=f"scales must be finite, got {bad}"):
        sampler.sample_edits([0], direction, [1.0, bad])


def test_non_numeric_edit_scales_are_refused(direction):
    with pytest.raises(ValueError, match="Edit.scales must be numbers"):
        Edit(direction, scales="2")


def test_non_finite_direction_vector_or_sigma_is_refused(sampler, direction, model):
    with pytest.raises(ValueError, match="non-finite"):
        Direction(torch.full(model.h_shape, math.nan), name="nan")
    with pytest.raises(ValueError, match="sigma must be finite"):
        Direction(torch.ones(model.h_shape), name="s", sigma=torch.tensor([math.inf]))
    # a vector corrupted after construction is caught before sampling
    broken = Direction(torch.ones(model.h_shape), name="broken")
    broken.vector[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="direction 'broken' in raw units has non-finite values"):
        sampler.sample([0], edit=Edit(broken, scales=1.0))


def test_non_finite_x_T_or_h_replace_is_refused(sampler, model):
    x_T = torch.zeros(1, *model.image_shape)
    x_T[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="x_T has non-finite values"):
        sampler.sample(None, x_T=x_T)
    h = torch.zeros(1, STEPS, *model.h_shape)
    h[0, 1, 0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="h_replace has non-finite values"):
        sampler.sample([0], h_replace=h)


def test_inversion_reconstruct_refuses_a_corrupted_x_T(model):
    inv = ddim_invert(model, torch.rand(1, *model.image_shape), STEPS, record_h=False)
    inv.x_T[0, 0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="x_T has non-finite values"):
        reconstruct(model, inv)


@pytest.mark.parametrize("steps", [[0.5], [True], "0", 1.0])
def test_edit_steps_must_be_int_indices(sampler, direction, steps):
    with pytest.raises(ValueError, match="Edit.steps"):
        sampler.sample([0], edit=Edit(direction, scales=1.0, steps=steps))


def test_edit_steps_accept_ints_tensors_and_slices(sampler):
    from hspace.sampling import resolve_steps

    assert resolve_steps(1, STEPS) == [False, True]
    assert resolve_steps(torch.tensor([0, 1]), STEPS) == [True, True]
    assert resolve_steps(slice(1, None), STEPS) == [False, True]


@pytest.mark.parametrize("seed", [-1, 2**63, True])
def test_random_direction_seed_must_be_in_range(direction, seed):
    from hspace.directions import random_like

    with pytest.raises(ValueError, match=r"seed must be an int in 0..2\*\*63-1"):
        random_like(direction, seed)
