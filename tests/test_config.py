"""Build config: the shipped configs validate, every kind of bad input names its field, dry-run plans."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from hspace.toy import TOY_TEXT_MODEL_DIR
from pipeline.config import (
    ConfigError,
    describe_model,
    load_config,
    validate_config,
)
from pipeline.plan import main, plan, seed_blocks
from tests.config_examples import small_config, with_field

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LARGE = ("celebahq", "church", "bedroom")


def _toy_ready() -> bool:
    try:
        from hspace.toy import TOY_MODEL_DIR
    except ImportError:
        return False
    return (Path(TOY_MODEL_DIR) / "unet" / "config.json").is_file()


@pytest.fixture
def base(tiny_model_dir) -> dict:
    """A small valid config on the tiny test model (h [32, 4, 4], 1000 training steps)."""
    return small_config(tiny_model_dir)


def test_base_config_is_valid(base):
    cfg = validate_config(base)
    assert cfg.pca_steps == [0, 1, 2, 3, 4]
    assert cfg.resources.device == "cpu"
    assert cfg.torch_dtype is torch.float32


@pytest.mark.parametrize("name", LARGE)
def test_large_configs_validate_and_plan_without_executing(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.source == f"google/ddpm-ema-{name}-256"
    assert cfg.resources.device == "cuda"
    assert cfg.generate.n_samples >= 10_000
    p = plan(cfg)
    n, t, spb = cfg.generate.n_samples, cfg.sampler.num_inference_steps, cfg.generate.seeds_per_block
    blocks = -(-n // spb)
    assert p.h_shape == (512, 8, 8)
    assert p.n_blocks == blocks
    assert p.n_activation_shards == blocks * t
    assert p.n_sample_shards == blocks
    assert p.rows == n * t
    assert p.estimated_bytes == n * t * 512 * 8 * 8 * 2  # float16 h per (seed, step)
    assert "activation shards" in p.summary()


@pytest.mark.skipif(not _toy_ready(), reason="toy model weights (hspace/toy/weights) not built yet")
def test_quickstart_config_matches_the_toy_model():
    cfg = load_config(CONFIGS / "quickstart.yaml")
    info = describe_model(cfg.model)
    assert info.is_local and info.image_size == 32
    p = plan(cfg)
    assert p.device == "cpu" and p.rows == 256 * cfg.sampler.num_inference_steps
    assert p.estimated_bytes == p.rows * 2 * p.h_shape[0] * p.h_shape[1] * p.h_shape[2]


@pytest.mark.skipif(not _toy_ready(), reason="toy model weights (hspace/toy/weights) not built yet")
def test_quickstart_evaluates_on_a_coarser_grid_of_the_builds_own_steps():
    """The quick start grades with fewer sampler steps than it builds with; every evaluation step
    applies a different build step's vector, the last (cleanest) one included."""
    from hspace.sampling import HSpaceSampler
    from hspace.toy import load_toy_model
    from pipeline.evaluate import evaluation_sampler, step_map

    cfg = load_config(CONFIGS / "quickstart.yaml")
    spec = evaluation_sampler(cfg)
    assert spec.num_inference_steps < cfg.sampler.num_inference_steps
    model = load_toy_model()
    build = HSpaceSampler(
        model, sampler=cfg.sampler.kind, num_inference_steps=cfg.sampler.num_inference_steps
    )
    coarse = HSpaceSampler(model, sampler=spec.kind, num_inference_steps=spec.num_inference_steps)
    steps = step_map(build.timesteps.tolist(), coarse.timesteps.tolist())
    assert steps == sorted(set(steps)) and len(steps) == spec.num_inference_steps
    assert steps[-1] == cfg.sampler.num_inference_steps - 1


def test_quickstart_config_schema_is_valid_without_the_model():
    cfg = load_config(CONFIGS / "quickstart.yaml", check_model=False)
    assert cfg.model.source == "toy" and cfg.generate.n_samples == 256
    assert cfg.resources.num_gpus_per_worker == 0


def test_text_quickstart_config_plans_on_the_shipped_text_toy():
    cfg = load_config(CONFIGS / "quickstart-text.yaml")
    info = describe_model(cfg.model)
    assert info.is_local and info.kind == "text" and Path(info.location) == Path(TOY_TEXT_MODEL_DIR)
    p = plan(cfg)
    assert (p.h_shape, p.latent_shape, p.image_shape) == ((64, 8, 8), (4, 16, 16), (3, 32, 32))
    assert p.device == "cpu" and p.rows == cfg.generate.n_samples * cfg.sampler.num_inference_steps
    assert cfg.model.conditioning_for([0, 1]) == {"prompt": ["", ""], "guidance_scale": 1.0,
                                                  "record_branch": "uncond"}  # fmt: skip
    assert cfg.annotate.classifier == "toy" and cfg.aggregate.random_baselines > 0


def test_the_dry_run_plans_the_text_quickstart(capsys):
    assert main([str(CONFIGS / "quickstart-text.yaml")]) == 0
    out = capsys.readouterr().out
    assert "quickstart-text.yaml: ok" in out and "model:              text" in out


def test_every_shipped_config_is_valid_without_its_model():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert "quickstart-text.yaml" in names
    for name in names:
        load_config(CONFIGS / name, check_model=False)


def test_h_shape_is_read_from_the_unet_config_without_weights(base, tiny_model_dir):
    from tests.conftest import build_tiny_unet

    info = describe_model(validate_config(base).model)
    seen = {}
    unet = build_tiny_unet()

    def hook(module, args, out):
        seen["h"] = out.shape  # returns None: the output is left unchanged

    handle = unet.mid_block.register_forward_hook(hook)
    with torch.no_grad():
        unet(torch.zeros(1, 3, 16, 16), 10)
    handle.remove()
    assert info.h_shape == tuple(seen["h"][1:]) == (32, 4, 4)
    assert info.num_train_timesteps == 1000


# Every kind of bad input fails with the offending field named in the message.
BAD = [
    ("unknown key", "sampler.steps", 20, "sampler.steps: Extra inputs are not permitted"),
    ("unknown top-level key", "colour", "red", "colour: Extra inputs"),
    ("wrong type", "generate.n_samples", "many", "generate.n_samples: Input should be a valid integer"),
    (
        "bool is not an int",
        "generate.batch_size",
        True,
        "generate.batch_size: Input should be a valid integer",
    ),
    ("zero samples", "generate.n_samples", 0, "generate.n_samples: Input should be greater than 0"),
    ("negative batch", "generate.batch_size", -4, "generate.batch_size: Input should be greater than 0"),
    (
        "sampler kind",
        "sampler.kind",
        "heun",
        "sampler.kind: Input should be 'ddpm', 'ddim', 'dpm', 'euler' or 'euler_a'",
    ),
    (
        "steps above training",
        "sampler.num_inference_steps",
        2000,
        "sampler.num_inference_steps: 2000 exceeds the model's num_train_timesteps=1000",
    ),
    ("quantile zero", "aggregate.quantile", 0.0, "aggregate.quantile: Input should be greater than 0"),
    (
        "quantile above half",
        "aggregate.quantile",
        0.6,
        "aggregate.quantile: Input should be less than or equal to 0.5",
    ),
    ("negative eta", "sampler.eta", -1.0, "sampler.eta: Input should be greater than or equal to 0"),
    (
        "eta with ddpm",
        "sampler.eta",
        0.5,
        "sampler.eta: ddpm sampling has eta=1; for eta=0.5 set sampler.kind: ddim",
    ),
    ("pca step out of range", "pca.steps", [0, 7], "pca.steps: steps [7] outside 0..4"),
    ("pca backend", "pca.backend", "numpy", "pca.backend: Input should be 'torch' or 'sklearn'"),
    ("k above samples", "pca.n_components", 32, "pca.n_components: 32 exceeds generate.n_samples=16"),
    (
        "missing model dir",
        "model.source",
        "./no/such/model",
        "model.source: local model directory './no/such/model' does not exist",
    ),
    ("contradicting h_shape", "model.h_shape", [64, 8, 8], "model.h_shape: [64, 8, 8] contradicts"),
    (
        "missing classifier dir",
        "annotate.classifier",
        "/no/such/classifier",
        "annotate.classifier: classifier directory",
    ),
    (
        "disentangle unknown attr",
        "aggregate.disentangle",
        {"glasses": ["zzz"]},
        "aggregate.disentangle.glasses: unknown attributes ['zzz']",
    ),
    (
        "condition unknown attr",
        "aggregate.condition",
        {"glasses": "zzz"},
        "aggregate.condition.glasses: unknown attributes ['zzz']",
    ),
    (
        "condition on itself",
        "aggregate.condition",
        {"glasses": "glasses"},
        "aggregate.condition.glasses: 'glasses' cannot be held fixed",
    ),
    (
        "held-out seeds overlap",
        "evaluate.seed_start",
        10,
        "evaluate.seed_start: evaluation seeds 10..13 overlap",
    ),
    ("mask box", "jacobian", [{"seed": 0, "step": 1, "mask": [4, 4, 2, 8]}], "jacobian[0].mask"),
    ("jacobian step", "jacobian", [{"seed": 0, "step": 9}], "jacobian[0].step: 9 outside 0..4"),
    (
        "storage options type",
        "storage.storage_options",
        ["anon"],
        "storage.storage_options: Input should be a valid dictionary",
    ),
]


@pytest.mark.parametrize(("what", "field", "value", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_field(base, what, field, value, message):
    with pytest.raises(ConfigError) as info:
        validate_config(with_field(base, field, value))
    assert message in str(info.value), str(info.value)


def test_missing_required_section_is_named(base):
    bad = copy.deepcopy(base)
    del bad["catalog"]
    with pytest.raises(ConfigError, match=r"catalog: Field required"):
        validate_config(bad)


def test_all_errors_are_reported_at_once(base):
    bad = with_field(with_field(base, "generate.n_samples", 0), "sampler.kind", "heun")
    with pytest.raises(ConfigError) as info:
        validate_config(bad)
    fields = {f for f, _ in info.value.errors}
    assert {"generate.n_samples", "sampler.kind"} <= fields


def test_cli_exits_2_on_a_bad_config_and_0_on_a_good_one(base, tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_field(base, "sampler.num_inference_steps", 5000)))
    assert main([str(good)]) == 0
    assert "activation shards:  10" in capsys.readouterr().out  # 2 blocks x 5 steps
    with pytest.raises(SystemExit) as info:
        main([str(bad)])
    assert info.value.code == 2
    assert "sampler.num_inference_steps: 5000 exceeds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "absent.yaml")])
    assert info.value.code == 2


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_hub_model_without_local_files_needs_explicit_h_shape_for_bytes(base):
    cfg = validate_config(with_field(base, "model", {"source": "someone/some-ddpm"}))
    p = plan(cfg)
    assert p.h_shape is None and p.estimated_bytes is None
    assert "set model.h_shape" in p.summary()
    json.dumps(p.to_dict())  # plans are JSON-serialisable for --dry-run --json


def test_seed_blocks_partition_the_seed_range(base):
    cfg = validate_config(with_field(with_field(base, "generate.n_samples", 19), "generate.seed_start", 100))
    blocks = seed_blocks(cfg)
    assert [(b.start, b.stop) for b in blocks] == [(100, 108), (108, 116), (116, 119)]
    assert [s for b in blocks for s in b.seeds] == list(cfg.seeds)
    assert len({b.key for b in blocks}) == 3
