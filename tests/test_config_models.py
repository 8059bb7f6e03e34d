"""Build configs of every model kind: the shipped text / latent / DiT configs pass the dry run
offline, stored-step subsets and ``storage.max_bytes`` size the run, and wrong conditioning,
capture points or step lists are refused with exit 2 naming the field, before any work."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from pipeline.build import main as build_main
from pipeline.config import ConfigError, describe_model, load_config, validate_config
from pipeline.plan import plan
from tests.config_examples import small_config, with_field
from tests.tiny_pipelines import save

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: name -> (kind, capture, latent shape, image shape, h shape), as the configs state them.
MODELS = {
    "sd15": ("text", "mid_block", (4, 64, 64), (3, 512, 512), (1280, 8, 8)),
    "sd21-base": ("text", "mid_block", (4, 64, 64), (3, 512, 512), (1280, 8, 8)),
    "sdxl": ("text-xl", "mid_block", (4, 128, 128), (3, 1024, 1024), (1280, 32, 32)),
    "ldm-celebahq": ("latent", "mid_block", (3, 64, 64), (3, 256, 256), (896, 8, 8)),
    "dit-xl-2-256": ("dit", "transformer_blocks.14", (4, 32, 32), (3, 256, 256), (1152, 16, 16)),
}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return save("text", tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory) -> Path:
    return save("dit", tmp_path_factory.mktemp("tiny_dit"))


def _config(model_dir: Path, tmp_path: Path, **model: object) -> dict:
    cfg = small_config(model_dir, run_url=str(tmp_path / "run"), catalog_url=str(tmp_path / "catalog"))
    cfg["model"].update(model)
    return cfg


def _dry_run(tmp_path: Path, capsys, cfg: dict) -> tuple[int, str]:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    code = build_main(["--config", str(path), "--dry-run"])
    return code, capsys.readouterr().err


def _assert_refused(code: int, err: str, field: str) -> None:
    assert code == 2, err
    first = err.strip().splitlines()[0]
    assert first.startswith("Error: invalid build config") and f"{field}:" in err, err


# ------------------------------------------------------------------------------ the shipped configs


@pytest.mark.parametrize("name", MODELS)
def test_model_configs_plan_offline_with_their_stated_shapes(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    kind, capture, latent, image, h = MODELS[name]
    p = plan(cfg)
    assert (p.kind, p.capture, p.latent_shape, p.image_shape, p.h_shape) == (kind, capture, latent, image, h)
    stored = cfg.capture_steps
    assert p.rows == cfg.generate.n_samples * len(stored)
    assert p.n_activation_shards == p.n_blocks * len(stored)
    assert p.estimated_bytes == cfg.generate.n_samples * len(stored) * math.prod(h) * 2
    assert p.max_bytes is not None and p.estimated_bytes <= p.max_bytes
    assert "conditioning:" in p.summary() and "h stored at" in p.summary()


@pytest.mark.parametrize("name", ["sd15", "sd21-base", "sdxl"])
def test_text_configs_name_prompts_negative_prompt_and_guidance(name):
    m = load_config(CONFIGS / f"{name}.yaml").model
    assert m.prompts and m.negative_prompt and m.guidance_scale > 1 and m.class_labels is None


def test_dit_config_names_class_labels_and_guidance():
    m = load_config(CONFIGS / "dit-xl-2-256.yaml").model
    assert m.class_labels and all(0 <= c < 1000 for c in m.class_labels) and m.guidance_scale == 4.0


def test_a_50_step_sdxl_sample_is_131_mb_of_float16_h():
    cfg = load_config(CONFIGS / "sdxl.yaml")
    assert plan(cfg).bytes_per_row * 50 == 131_072_000


def test_sdxl_storing_every_step_is_refused_by_max_bytes(tmp_path, capsys):
    data = yaml.safe_load((CONFIGS / "sdxl.yaml").read_text())
    del data["generate"]["capture_steps"]
    data["storage"]["run_url"], data["catalog"]["url"] = str(tmp_path / "run"), str(tmp_path / "catalog")
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    assert [f for f, _ in info.value.errors] == ["storage.max_bytes"]
    assert "314572800000 bytes" in str(info.value)  # 4000 samples x 30 steps x 1280*32*32 x 2
    code, err = _dry_run(tmp_path, capsys, data)
    _assert_refused(code, err, "storage.max_bytes")


# ------------------------------------------------------------------------------ conditioning per seed


def test_conditioning_cycles_over_seeds_by_seed_number(tiny_sd, tmp_path):
    cfg = validate_config(_config(tiny_sd, tmp_path, prompts=["a", "b", "c"], guidance_scale=2.0))
    kwargs = cfg.model.conditioning_for([0, 1, 5, 7])
    assert kwargs["prompt"] == ["a", "b", "c", "b"]
    assert kwargs["guidance_scale"] == 2.0 and kwargs["record_branch"] == "uncond"
    assert "class_labels" not in kwargs


def test_a_single_prompt_is_used_for_every_seed(tiny_sd, tmp_path):
    cfg = validate_config(_config(tiny_sd, tmp_path, prompts="a face", negative_prompt="blurry"))
    kwargs = cfg.model.conditioning_for([3, 4])
    assert kwargs["prompt"] == ["a face"] * 2 and kwargs["negative_prompt"] == ["blurry"] * 2


def test_local_pipelines_are_described_from_their_config_files(tiny_sd, tiny_dit, tmp_path):
    sd = describe_model(validate_config(_config(tiny_sd, tmp_path)).model)
    assert (sd.kind, sd.capture, sd.h_shape, sd.latent_shape, sd.image_shape) == (
        "text", "mid_block", (32, 4, 4), (4, 8, 8), (3, 16, 16),
    )  # fmt: skip
    cfg = with_field(_config(tiny_dit, tmp_path, class_labels=[1, 2]), "annotate", None)
    for section in ("aggregate", "evaluate"):
        cfg.pop(section)
    dit = describe_model(validate_config(cfg).model)
    assert (dit.kind, dit.capture, dit.h_shape, dit.num_classes) == (
        "dit",
        "transformer_blocks.2",
        (16, 4, 4),
        1000,
    )


def test_capture_every_stores_a_stride_of_steps(tiny_sd, tmp_path):
    cfg = validate_config(with_field(_config(tiny_sd, tmp_path), "generate.capture_every", 2))
    assert cfg.capture_steps == [0, 2, 4] and cfg.pca_steps == [0, 2, 4]
    assert plan(cfg).rows == 16 * 3


# ------------------------------------------------------------------------------ hostile configs

#: (what, change to the tiny SD config, field named)
HOSTILE_SD = [
    ("class labels for a text model", {"model.class_labels": [1]}, "model.class_labels"),
    ("prompts and class labels", {"model.prompts": ["a"], "model.class_labels": [1]}, "model.class_labels"),
    ("negative prompt alone", {"model.negative_prompt": "blurry"}, "model.negative_prompt"),
    ("empty prompt list", {"model.prompts": []}, "model.prompts"),
    ("prompt that is a number", {"model.prompts": [1, 2]}, "model.prompts"),
    ("negative guidance", {"model.guidance_scale": -1.0}, "model.guidance_scale"),
    ("guidance as a string", {"model.guidance_scale": "high"}, "model.guidance_scale"),
    ("unknown record branch", {"model.record_branch": "both"}, "model.record_branch"),
    ("capture after a bad colon", {"model.capture": "mid_block:sideways"}, "model.capture"),
    ("capture that is no module path", {"model.capture": "3 blocks"}, "model.capture"),
    ("kind contradicting the files", {"model.kind": "dit"}, "model.kind"),
    ("unknown kind", {"model.kind": "video"}, "model.kind"),
    ("h shape contradicting the files", {"model.h_shape": [1280, 8, 8]}, "model.h_shape"),
    ("latent shape contradicting the files", {"model.latent_shape": [4, 64, 64]}, "model.latent_shape"),
    ("eta for euler", {"sampler.kind": "euler", "sampler.eta": 0.5}, "sampler.eta"),
    ("unknown sampler", {"sampler.kind": "heun"}, "sampler.kind"),
    ("capture step out of range", {"generate.capture_steps": [0, 5]}, "generate.capture_steps"),
    ("duplicate capture steps", {"generate.capture_steps": [1, 1]}, "generate.capture_steps"),
    ("empty capture steps", {"generate.capture_steps": []}, "generate.capture_steps"),
    (
        "steps and a stride",
        {"generate.capture_steps": [0], "generate.capture_every": 2},
        "generate.capture_every",
    ),
    ("zero stride", {"generate.capture_every": 0}, "generate.capture_every"),
    ("pca on an unstored step", {"generate.capture_steps": [0, 2], "pca.steps": [1]}, "pca.steps"),
    ("max bytes below the run", {"storage.max_bytes": 1000}, "storage.max_bytes"),
    ("max bytes zero", {"storage.max_bytes": 0}, "storage.max_bytes"),
]


@pytest.mark.parametrize(("what", "changes", "field"), HOSTILE_SD, ids=[h[0] for h in HOSTILE_SD])
def test_hostile_text_model_configs_are_refused_naming_the_field(
    tiny_sd, tmp_path, capsys, what, changes, field
):
    cfg = _config(tiny_sd, tmp_path)
    for dotted, value in changes.items():
        cfg = with_field(cfg, dotted, value) if dotted != "jacobian" else {**cfg, "jacobian": value}
    code, err = _dry_run(tmp_path, capsys, cfg)
    _assert_refused(code, err, field)
    assert not (tmp_path / "run").exists() and not (tmp_path / "catalog").exists()  # no work done


HOSTILE_OTHER = [
    ("prompts for an unconditional model", "ddpm", {"model.prompts": ["a"]}, "model.prompts"),
    ("guidance for an unconditional model", "ddpm", {"model.guidance_scale": 3.0}, "model.guidance_scale"),
    ("class labels for an unconditional model", "ddpm", {"model.class_labels": 1}, "model.class_labels"),
    ("DiT without class labels", "dit", {}, "model.class_labels"),
    ("DiT class past its classes", "dit", {"model.class_labels": [3, 1000]}, "model.class_labels"),
    ("DiT with a prompt", "dit", {"model.class_labels": [1], "model.prompts": "a"}, "model.class_labels"),
    ("negative class id", "dit", {"model.class_labels": [-1]}, "model.class_labels"),
]


@pytest.mark.parametrize(
    ("what", "model", "changes", "field"), HOSTILE_OTHER, ids=[h[0] for h in HOSTILE_OTHER]
)
def test_hostile_conditioning_for_other_kinds_is_refused_naming_the_field(
    tiny_model_dir, tiny_dit, tmp_path, capsys, what, model, changes, field
):
    cfg = _config(tiny_model_dir if model == "ddpm" else tiny_dit, tmp_path)
    if model == "dit":  # no attribute classifier for class-conditional toy images
        for section in ("annotate", "aggregate", "evaluate"):
            cfg.pop(section)
    for dotted, value in changes.items():
        cfg = with_field(cfg, dotted, value)
    code, err = _dry_run(tmp_path, capsys, cfg)
    _assert_refused(code, err, field)


def test_max_bytes_needs_a_known_h_shape(tmp_path, capsys):
    data = yaml.safe_load((CONFIGS / "sd15.yaml").read_text())
    del data["model"]["h_shape"]
    data["model"]["source"] = "example-owner/not-downloaded"
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    assert [f for f, _ in info.value.errors] == ["model.h_shape"]


# ------------------------------------------------------------------------------ what publish records


def test_publish_records_the_prompts_and_the_default_guidance_it_used(tiny_sd, tmp_path):
    from pipeline.publish import conditioning_record

    cfg = validate_config(_config(tiny_sd, tmp_path, prompts=["a", "b"], record_branch="cond"))
    record = conditioning_record(cfg, {"conditioning": "text", "default_guidance": 7.5})
    assert record["prompts"] == ["a", "b"] and record["guidance_scale"] == 7.5
    assert record["record_branch"] == "cond" and "class_labels" not in record


def test_publish_records_no_conditioning_for_an_unconditional_model(tiny_model_dir, tmp_path):
    from pipeline.publish import conditioning_record

    cfg = validate_config(_config(tiny_model_dir, tmp_path))
    assert conditioning_record(cfg, {"conditioning": "none", "default_guidance": 1.0}) == {}


def test_config_hash_ignores_new_fields_at_their_defaults_and_sees_conditioning(tiny_sd, tmp_path):
    from pipeline.publish import config_hash

    plain = validate_config(_config(tiny_sd, tmp_path))
    defaults = validate_config(_config(tiny_sd, tmp_path, record_branch="uncond", capture=None))
    prompted = validate_config(_config(tiny_sd, tmp_path, prompts=["a"]))
    assert config_hash(plain) == config_hash(defaults)
    assert config_hash(prompted) != config_hash(plain)
