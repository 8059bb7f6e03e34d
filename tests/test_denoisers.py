"""Every supported diffusers denoiser through one capture mechanism, exact against diffusers' own pipelines.

Tiny components of every kind (tests/tiny_pipelines.py) are saved as pipeline directories and
loaded both by ``HSpaceModel.from_pretrained`` and by the diffusers pipeline class. With no edit,
hspace's images equal the pipeline's for the same list of generators and settings to 1e-5 (float32
on the CPU: the same operations in the same order; the bound leaves room for the BLAS picking other
kernels for other batch shapes), and the h hspace records equals what a plain forward hook on the
same module sees.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import tiny_pipelines  # noqa: E402

from hspace import Direction, Edit, HSpaceModel, HSpaceSampler  # noqa: E402

TOL = 1e-5
STEPS = 4
SEEDS = [3, 11]
PROMPTS = ["a photo of a smiling face", "grey hair glasses"]


@pytest.fixture(scope="module")
def pipeline_dirs(tiny_pipeline_dirs):
    return tiny_pipeline_dirs


@pytest.fixture(scope="module")
def models(pipeline_dirs):
    return {kind: HSpaceModel.from_pretrained(path) for kind, path in pipeline_dirs.items()}


def generators(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def diffusers_pipeline(kind, path, sampler):
    """The diffusers pipeline for ``path`` with the scheduler hspace's ``sampler`` names."""
    import diffusers

    from hspace.model import PIPELINE_KINDS, SCHEDULERS

    cls = next(getattr(diffusers, name) for name, k in PIPELINE_KINDS.items() if k.name == kind)
    extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "text" else {}
    pipe = cls.from_pretrained(path, **extra)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------- kinds and capture points
@pytest.mark.parametrize(
    "kind,capture,h_shape",
    [
        ("text", "mid_block", (32, 4, 4)),
        ("text-xl", "mid_block", (32, 4, 4)),
        ("latent", "mid_block", (32, 4, 4)),
        ("dit", "transformer_blocks.2", (16, 4, 4)),
        ("class", "mid_block", (32, 4, 4)),
    ],
)
def test_the_kind_comes_from_the_pipeline_directory(models, kind, capture, h_shape):
    model = models[kind]
    assert model.kind.name == kind
    assert model.capture.spec == capture
    assert model.h_shape == h_shape
    assert model.describe()["kind"] == kind


def test_an_unsupported_diffusers_pipeline_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline.*supported pipelines: .*StableDiffusionPipeline"):
        HSpaceModel.from_pretrained(tmp_path)


def test_an_unknown_capture_module_is_named(pipeline_dirs):
    with pytest.raises(ValueError, match="no module 'middle_block'.*mid_block"):
        HSpaceModel.from_pretrained(pipeline_dirs["text"], capture="middle_block")
    with pytest.raises(ValueError, match="'input' or 'output'"):
        HSpaceModel.from_pretrained(pipeline_dirs["text"], capture="mid_block:inside")


# ---------------------------------------------------------------------- exact against diffusers
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm", "euler", "euler_a"])
def test_stable_diffusion_images_equal_the_pipeline(models, pipeline_dirs, sampler):
    pipe = diffusers_pipeline("text", pipeline_dirs["text"], sampler)
    theirs = pipe(
        PROMPTS, negative_prompt=["blurry", "ugly"], num_inference_steps=STEPS, guidance_scale=5.0,
        generator=generators(SEEDS), output_type="pt",
    ).images  # fmt: skip
    ours = HSpaceSampler(models["text"], sampler=sampler, num_inference_steps=STEPS).sample(
        SEEDS, prompt=PROMPTS, negative_prompt=["blurry", "ugly"], guidance_scale=5.0
    )
    assert (theirs - ours.images).abs().max() <= TOL


def test_v_prediction_stable_diffusion_equals_the_pipeline(tmp_path):
    path = tmp_path / "sd-v"
    tiny_pipelines.stable_diffusion(prediction_type="v_prediction").save_pretrained(path)
    pipe = diffusers_pipeline("text", path, "ddim")
    theirs = pipe(PROMPTS, num_inference_steps=STEPS, generator=generators(SEEDS), output_type="pt").images
    model = HSpaceModel.from_pretrained(path)
    ours = HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS).sample(SEEDS, prompt=PROMPTS)
    assert (theirs - ours.images).abs().max() <= TOL


def test_sdxl_images_equal_the_pipeline(models, pipeline_dirs):
    pipe = diffusers_pipeline("text-xl", pipeline_dirs["text-xl"], "euler")
    theirs = pipe(
        PROMPTS, num_inference_steps=STEPS, guidance_scale=5.0, generator=generators(SEEDS), output_type="pt"
    ).images
    ours = HSpaceSampler(models["text-xl"], sampler="euler", num_inference_steps=STEPS).sample(
        SEEDS, prompt=PROMPTS, guidance_scale=5.0
    )
    assert (theirs - ours.images).abs().max() <= TOL


def test_ldm_images_equal_the_pipeline(models, pipeline_dirs):
    pipe = diffusers_pipeline("latent", pipeline_dirs["latent"], "ddim")
    theirs = pipe(
        batch_size=2, generator=generators(SEEDS), num_inference_steps=STEPS, output_type="np"
    ).images
    ours = HSpaceSampler(models["latent"], sampler="ddim", num_inference_steps=STEPS).sample(SEEDS)
    assert (torch.from_numpy(theirs).permute(0, 3, 1, 2) - ours.images).abs().max() <= TOL


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_dit_images_equal_the_pipeline(models, pipeline_dirs, sampler):
    pipe = diffusers_pipeline("dit", pipeline_dirs["dit"], sampler)
    theirs = pipe(
        class_labels=[1, 7], guidance_scale=4.0, generator=generators(SEEDS), num_inference_steps=STEPS,
        output_type="pt",
    ).images  # fmt: skip
    ours = HSpaceSampler(models["dit"], sampler=sampler, num_inference_steps=STEPS).sample(
        SEEDS, class_labels=[1, 7], guidance_scale=4.0
    )
    assert (theirs - ours.images).abs().max() <= TOL


# ---------------------------------------------------------------------- h equals a plain hook
def _plain_hook_calls(module, grid=None):
    seen = []

    def hook(_m, _args, output):
        out = output[0] if isinstance(output, tuple) else output
        if out.ndim == 3:
            out = out.transpose(1, 2).unflatten(2, grid)
        seen.append(out.detach().clone())

    return seen, module.register_forward_hook(hook)


@pytest.mark.parametrize("kind", ["text", "text-xl", "dit"])
def test_recorded_h_of_both_branches_equals_a_plain_forward_hook(models, kind):
    model = models[kind]
    cond = {"prompt": PROMPTS} if kind.startswith("text") else {"class_labels": [1, 7]}
    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS)
    module = model.denoiser.get_submodule(model.capture.module)
    seen, handle = _plain_hook_calls(module, model.token_grid)
    try:
        traj = sampler.sample(SEEDS, guidance_scale=3.0, record_branch="both", **cond)
    finally:
        handle.remove()
    assert len(seen) == STEPS and seen[0].shape[0] == 2 * len(SEEDS)
    n = len(SEEDS)
    uncond_first = kind != "dit"  # Stable Diffusion puts the unconditional half first, DiT the conditional
    for i, h in enumerate(seen):
        h_uncond, h_cond = (h[:n], h[n:]) if uncond_first else (h[n:], h[:n])
        assert torch.equal(traj.h[:, i], h_cond)
        assert torch.equal(traj.h_uncond[:, i], h_uncond)
    default = sampler.sample(SEEDS, guidance_scale=3.0, **cond)
    assert torch.equal(default.h, traj.h_uncond), "the unconditional branch is recorded by default"


def test_capture_at_the_mid_block_input_and_at_other_blocks(pipeline_dirs):
    path = pipeline_dirs["text"]
    for spec, module_name in [("mid_block:input", "mid_block"), ("up_blocks.0", "up_blocks.0")]:
        model = HSpaceModel.from_pretrained(path, capture=spec)
        assert model.h_shape  # measured by a dry forward before the plain hook is attached
        module = model.denoiser.get_submodule(module_name)
        seen: list[torch.Tensor] = []
        if spec.endswith(":input"):
            handle = module.register_forward_pre_hook(
                lambda _m, args, seen=seen: seen.append(args[0].clone())
            )
        else:
            handle = module.register_forward_hook(lambda _m, _a, out, seen=seen: seen.append(out.clone()))
        try:
            traj = HSpaceSampler(model, sampler="ddim", num_inference_steps=2).sample(
                SEEDS, prompt=PROMPTS, guidance_scale=1.0
            )
        finally:
            handle.remove()
        assert traj.h.shape[2:] == model.h_shape == tuple(seen[0].shape[1:])
        assert torch.equal(traj.h[:, 0], seen[0])


# ---------------------------------------------------------------------- seeds, branches, edits
def test_a_sample_does_not_depend_on_its_batch_or_its_neighbours_prompts(models):
    sampler = HSpaceSampler(models["text"], sampler="euler_a", num_inference_steps=STEPS)
    together = sampler.sample(
        [5, 6, 7], prompt=["a cat", "a dog"], guidance_scale=4.0
    )  # cycled: cat, dog, cat
    alone = sampler.sample([7], prompt="a cat", guidance_scale=4.0, batch_size=1)
    assert together.prompts == ["a cat", "a dog", "a cat"]
    assert (together.images[2] - alone.images[0]).abs().max() <= TOL
    assert (together.h[2] - alone.h[0]).abs().max() <= TOL


def _direction(model, name="d", capture=None, scale=1.0):
    g = torch.Generator().manual_seed(0)
    return Direction(torch.randn(*model.h_shape, generator=g) * scale, name=name, capture=capture)


@pytest.mark.parametrize("branches", ["cond", "uncond"])
def test_an_edit_enters_only_the_branches_it_names(models, branches):
    model = models["text"]
    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS)
    plain = sampler.sample(SEEDS, prompt=PROMPTS, guidance_scale=3.0, record_branch="both")
    d = _direction(model)
    edited = sampler.sample(
        SEEDS, prompt=PROMPTS, guidance_scale=3.0, record_branch="both", edit=Edit(d, 2.0, branches=branches)
    )
    changed, kept = (edited.h, edited.h_uncond) if branches == "cond" else (edited.h_uncond, edited.h)
    ref_changed, ref_kept = (plain.h, plain.h_uncond) if branches == "cond" else (plain.h_uncond, plain.h)
    # at the first step x_T is the same: the edited branch moved by exactly 2 d, the other not at all
    assert torch.allclose(
        changed[:, 0] - ref_changed[:, 0], 2.0 * d.vector.expand(len(SEEDS), -1, -1, -1), atol=1e-5
    )
    assert torch.equal(kept[:, 0], ref_kept[:, 0])
    both = sampler.sample(SEEDS, prompt=PROMPTS, guidance_scale=3.0, record_branch="both", edit=Edit(d, 2.0))
    assert torch.allclose(both.h_uncond[:, 0] - plain.h_uncond[:, 0], 2.0 * d.vector, atol=1e-5)
    assert torch.allclose(both.h[:, 0] - plain.h[:, 0], 2.0 * d.vector, atol=1e-5)


@pytest.mark.parametrize("kind", ["text", "latent", "dit", "class"])
def test_edits_move_images_and_scale_zero_changes_nothing(models, kind):
    model = models[kind]
    cond = {"text": {"prompt": PROMPTS}, "dit": {"class_labels": [1, 7]}, "class": {"class_labels": [1, 7]}}
    kwargs = cond.get(kind, {})
    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS)
    strip = sampler.sample_edits(SEEDS, _direction(model, scale=5.0), scales=[0.0, 3.0], **kwargs)
    plain = sampler.sample(SEEDS, **kwargs).images
    assert strip.shape == (len(SEEDS), 2, *model.image_shape)
    assert (strip[:, 0] - plain).abs().max() <= TOL
    assert (strip[:, 1] - plain).abs().max() > 1e-3


def test_asyrp_with_guidance_at_scale_zero_is_plain_ddim(models):
    model = models["text"]
    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS)
    plain = sampler.sample(SEEDS, prompt=PROMPTS, guidance_scale=3.0).images
    zero = sampler.sample(
        SEEDS, prompt=PROMPTS, guidance_scale=3.0, edit=Edit(_direction(model), 0.0, mode="asyrp")
    )
    assert (plain - zero.images).abs().max() <= TOL
    moved = sampler.sample(
        SEEDS, prompt=PROMPTS, guidance_scale=3.0, edit=Edit(_direction(model), 5.0, mode="asyrp")
    )
    assert (plain - moved.images).abs().max() > 1e-3


def test_asyrp_on_a_v_prediction_model_at_scale_zero_is_plain_ddim(tmp_path):
    """asyrp turns a v-prediction model's outputs into noise for P_t and D_t (eq. 2-5)."""
    path = tmp_path / "sd-v"
    tiny_pipelines.stable_diffusion(prediction_type="v_prediction").save_pretrained(path)
    model = HSpaceModel.from_pretrained(path)
    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS)
    plain = sampler.sample(SEEDS, prompt=PROMPTS, guidance_scale=3.0).images
    zero = sampler.sample(
        SEEDS, prompt=PROMPTS, guidance_scale=3.0, edit=Edit(_direction(model), 0.0, mode="asyrp")
    )
    assert (plain - zero.images).abs().max() <= TOL
    both = sampler.sample(SEEDS, prompt=PROMPTS, guidance_scale=3.0, edit=Edit(_direction(model), 5.0))
    moved = sampler.sample(
        SEEDS, prompt=PROMPTS, guidance_scale=3.0, edit=Edit(_direction(model), 5.0, mode="asyrp")
    )
    assert (plain - moved.images).abs().max() > 1e-3
    assert (both.images - moved.images).abs().max() > 1e-3


def test_h_swap_under_guidance_takes_each_branch_from_the_donor(models):
    model = models["text"]
    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS)
    swapped = sampler.h_swap([1, 2], [3, 4], prompt=PROMPTS, guidance_scale=3.0)
    donor = sampler.sample([3, 4], prompt=PROMPTS, guidance_scale=3.0, record_branch="both")
    assert torch.equal(swapped.h, donor.h_uncond)  # the recorded (unconditional) branch is the donor's


def test_a_direction_from_another_capture_point_is_refused_naming_both(models):
    model = models["text"]
    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=2)
    d = _direction(model, capture="up_blocks.0")
    with pytest.raises(
        ValueError, match=r"capture point 'up_blocks.0' with h_shape \(32, 4, 4\).*'mid_block'"
    ):
        sampler.sample(SEEDS, prompt=PROMPTS, edit=Edit(d, 1.0))
    wrong = Direction(torch.ones(16, 4, 4), name="small")
    with pytest.raises(ValueError, match=r"h_shape \(16, 4, 4\) does not match the model's \(32, 4, 4\)"):
        sampler.sample(SEEDS, prompt=PROMPTS, edit=Edit(wrong, 1.0))


def test_conditioning_a_model_does_not_take_is_refused(models):
    with pytest.raises(ValueError, match="takes no prompt"):
        HSpaceSampler(models["latent"], num_inference_steps=2).sample(SEEDS, prompt="a cat")
    with pytest.raises(ValueError, match="class_labels are required"):
        HSpaceSampler(models["dit"], num_inference_steps=2).sample(SEEDS)
    with pytest.raises(ValueError, match="no unconditional branch"):
        HSpaceSampler(models["class"], num_inference_steps=2).sample(
            SEEDS, class_labels=1, guidance_scale=3.0
        )
    with pytest.raises(ValueError, match="out of range"):
        HSpaceSampler(models["class"], num_inference_steps=2).sample(SEEDS, class_labels=10)
    with pytest.raises(ValueError, match="eta applies to the ddim sampler only"):
        HSpaceSampler(models["text"], sampler="euler", eta=0.5)
