"""Hostile build configs: everything a config can know before any work fails the dry run with exit 2.

Each case goes through the build's command line (``pipeline.build.main([... "--dry-run"])``), the
way ``hspace build`` and ``jobs/build_catalog.py`` run it, and must print one ``error:`` line that
names the field (or the file) -- no traceback, nothing written.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.build import main as build_main
from pipeline.config import MAX_BLOCKS, MAX_SEED, ConfigError, load_config, probe_config, validate_config
from pipeline.plan import plan, seed_blocks
from tests.config_examples import small_config, with_field

try:  # `python -m pytest` puts the repo root on sys.path; bare `pytest` only puts tests/ there
    from tests.s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)
except ModuleNotFoundError:  # pragma: no cover
    from s3_server import s3_bucket, s3_server  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def base(tiny_model_dir, tmp_path) -> dict:
    """A small valid config on the tiny test model, writing under ``tmp_path``."""
    return small_config(tiny_model_dir, run_url=str(tmp_path / "run"), catalog_url=str(tmp_path / "catalog"))


def _dry_run(tmp_path: Path, capsys, content: dict | str | bytes) -> tuple[int, str]:
    """Write ``content`` as the config file, dry-run it; (exit status, stderr)."""
    path = tmp_path / "c.yaml"
    if isinstance(content, dict):
        path.write_text(yaml.safe_dump(content))
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    capsys.readouterr()
    code = build_main(["--config", str(path), "--dry-run"])
    return code, capsys.readouterr().err


def _assert_refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    # one error line naming the field, then one hint line
    assert len(lines) == 2 and lines[0].startswith("Error: invalid build config"), err
    assert lines[1].startswith("Hint: "), err
    for needle in needles:
        assert needle in err, err


def test_the_base_config_passes_the_dry_run(base, tmp_path, capsys):
    code, err = _dry_run(tmp_path, capsys, base)
    assert code == 0, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "catalog").exists()


# ---------------------------------------------------------------------------------------------- numbers

NON_FINITE = [
    ("sampler.eta", math.inf),
    ("evaluate.scales", [1.0, math.nan]),
    ("aggregate.quantile", math.nan),
    ("resources.num_cpus_per_worker", math.inf),
    ("resources.num_gpus_per_worker", math.nan),
    ("pca.num_cpus_per_actor", -math.inf),
    ("storage.storage_options", {"timeout": math.inf}),
]


@pytest.mark.parametrize(("field", "value"), NON_FINITE, ids=[f for f, _ in NON_FINITE])
def test_non_finite_numbers_are_refused_naming_the_field(base, tmp_path, capsys, field, value):
    cfg = with_field(base, field, value)
    if field == "sampler.eta":
        cfg["sampler"]["kind"] = "ddim"
    code, err = _dry_run(tmp_path, capsys, cfg)
    _assert_refused(code, err, "must be a finite number")
    assert field in err


def test_non_finite_jacobian_tolerance_from_yaml_text(base, tmp_path, capsys):
    text = yaml.safe_dump(base) + "jacobian:\n- {seed: 0, step: 1, tol: .nan}\n"
    code, err = _dry_run(tmp_path, capsys, text)
    _assert_refused(code, err, "jacobian[0].tol: must be a finite number, got nan")


# ------------------------------------------------------------------------------------------------ seeds


def test_torch_generator_accepts_what_the_seed_rule_allows():
    """The rule's bounds are seeds a Generator takes as given (int64, no wrap-around)."""
    for seed in (0, MAX_SEED):
        assert torch.Generator().manual_seed(seed).initial_seed() == seed


SEEDS = [
    ("generate.seed_start", 2**70, "generate.seed_start"),
    ("generate.seed_start", -1, "generate.seed_start"),
    ("generate.seed_start", MAX_SEED - 3, "generate.n_samples: seed_start + n_samples - 1"),
    ("evaluate.seed_start", 2**63, "evaluate.seed_start"),
    ("evaluate.seed_start", MAX_SEED - 1, "evaluate.n_seeds: seed_start + n_seeds - 1"),
    ("jacobian", [{"seed": -5, "step": 1}], "jacobian[0].seed"),
    ("jacobian", [{"seed": 2**64, "step": 1}], "jacobian[0].seed"),
]


@pytest.mark.parametrize(("field", "value", "needle"), SEEDS, ids=[f"{s[0]}={s[1]}"[:40] for s in SEEDS])
def test_seeds_outside_the_generator_range_are_refused(base, tmp_path, capsys, field, value, needle):
    code, err = _dry_run(tmp_path, capsys, with_field(base, field, value))
    _assert_refused(code, err, needle, "0..2**63-1")


# ------------------------------------------------------------------------------------- the file itself


def test_duplicate_keys_are_refused_at_any_depth_naming_key_and_line(base, tmp_path, capsys):
    top = yaml.safe_dump(base) + "name: other\n"
    code, err = _dry_run(tmp_path, capsys, top)
    _assert_refused(code, err, "duplicate key 'name' on line")
    nested = yaml.safe_dump(base).replace("  n_samples: 16\n", "  n_samples: 16\n  n_samples: 32\n")
    code, err = _dry_run(tmp_path, capsys, nested)
    line = nested.splitlines().index("  n_samples: 32") + 1
    _assert_refused(code, err, f"duplicate key 'n_samples' on line {line} (first given on line {line - 1})")
    flow = yaml.safe_dump(base) + "jacobian: [{seed: 0, step: 1, seed: 2}]\n"
    _assert_refused(*_dry_run(tmp_path, capsys, flow), "duplicate key 'seed'")


def test_a_file_that_is_not_utf8_is_named(base, tmp_path, capsys):
    data = yaml.safe_dump(base).replace("name: t", "name: caf\u00e9").encode("latin-1")
    code, err = _dry_run(tmp_path, capsys, data)
    _assert_refused(code, err, str(tmp_path / "c.yaml"), "not UTF-8")


#: Ten aliases of ten aliases of ...: 10**9 values once expanded, a few hundred bytes of YAML.
ALIAS_BOMB = (
    "storage:\n  run_url: memory://r\n  storage_options:\n    x0: &x0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
    + "".join(f"    x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 10)}]\n" for i in range(1, 9))
)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("", "empty file"),
        ("# only a comment\n", "empty file"),
        ("- a\n- b\n", "top level must be a mapping, got list"),
        ("just text\n", "top level must be a mapping, got str"),
        ("name: [unclosed\n", "not valid YAML"),
        ("a: &x [*x]\n", "a[0]: refers to itself (a recursive YAML alias)"),
        ("? [1, 2]\n: 3\n", "not valid YAML"),
        ("a: " + "[" * 200 + "]" * 200, "nested more than 32 levels deep"),
        (ALIAS_BOMB, "expands to more than 100000 values"),
    ],
    ids=[
        "empty",
        "comment",
        "list",
        "scalar",
        "unclosed",
        "recursive-alias",
        "unhashable-key",
        "deep",
        "alias-bomb",
    ],
)
def test_files_that_are_not_a_config_mapping(tmp_path, capsys, content, needle):
    code, err = _dry_run(tmp_path, capsys, content)
    assert code == 2 and err.startswith("Error: invalid build config") and needle in err, err
    assert "Traceback" not in err


def test_a_directory_instead_of_a_file(tmp_path, capsys):
    code = build_main(["--config", str(tmp_path), "--dry-run"])
    _assert_refused(code, capsys.readouterr().err, str(tmp_path), "is a directory")


# ---------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("catalog.model_name", "m" * 129),
        ("catalog.ref", "a/b"),
        ("catalog.model_name", "x~1"),
        ("catalog.ref", ""),
    ],
)
def test_names_the_catalog_refuses(base, tmp_path, capsys, field, value):
    _assert_refused(*_dry_run(tmp_path, capsys, with_field(base, field, value)), field, "1-128 characters")


def test_a_128_character_model_name_is_accepted(base):
    assert validate_config(with_field(base, "catalog.model_name", "m" * 128)).catalog.model_name == "m" * 128


def _clf_dir(tmp_path: Path, attributes: list[str]) -> str:
    """A classifier directory with only its config.json: the attributes are read without weights."""
    d = tmp_path / "clf"
    d.mkdir(exist_ok=True)
    n = len(attributes)
    (d / "config.json").write_text(
        json.dumps({"attributes": attributes, "binary": [True] * n, "image_size": 16})
    )
    return str(d)


def test_direction_names_whose_previews_collide_after_sanitising(base, tmp_path, capsys):
    cfg = with_field(base, "annotate", {"classifier": _clf_dir(tmp_path, ["a b", "a_b"])})
    cfg["aggregate"] = {"quantile": 0.25}
    code, err = _dry_run(tmp_path, capsys, cfg)
    _assert_refused(
        code, err, "annotate.attributes: directions 'a b' and 'a_b' would both publish previews/a_b.png"
    )


def test_direction_name_whose_preview_path_the_catalog_refuses(base, tmp_path, capsys):
    cfg = with_field(base, "annotate", {"classifier": _clf_dir(tmp_path, [" smile", "hat"])})
    cfg["aggregate"] = {"quantile": 0.25}
    _assert_refused(*_dry_run(tmp_path, capsys, cfg), "direction ' smile': the catalog refuses its preview")


def test_attributes_the_classifier_does_not_have(base, tmp_path, capsys):
    cfg = with_field(base, "annotate.attributes", ["glasses", "hat", "wings"])
    _assert_refused(*_dry_run(tmp_path, capsys, cfg), "annotate.attributes: ['wings'] are not attributes of")
    local = with_field(
        base, "annotate", {"classifier": _clf_dir(tmp_path, ["round", "size"]), "attributes": ["round"]}
    )
    local["aggregate"] = {"quantile": 0.25}
    assert validate_config(local).annotate.attributes == ["round"]
    local["annotate"]["attributes"] = ["glasses"]
    _assert_refused(
        *_dry_run(tmp_path, capsys, local), "annotate.attributes: ['glasses'] are not attributes of"
    )


def test_aggregate_names_the_classifier_lacks_when_annotate_lists_no_attributes(base, tmp_path, capsys):
    cfg = with_field(base, "annotate", {"classifier": _clf_dir(tmp_path, ["round", "size"])})
    cfg["aggregate"] = {"quantile": 0.25, "disentangle": {"round": ["size"]}}
    assert validate_config(cfg).annotate.attributes is None
    cfg["aggregate"]["condition"] = {"size": "wings"}
    _assert_refused(
        *_dry_run(tmp_path, capsys, cfg), "aggregate.condition.size: unknown attributes ['wings']"
    )


def test_a_classifier_dir_without_config_json(base, tmp_path, capsys):
    (tmp_path / "empty_clf").mkdir()
    cfg = with_field(base, "annotate.classifier", str(tmp_path / "empty_clf"))
    _assert_refused(*_dry_run(tmp_path, capsys, cfg), "annotate.classifier: cannot read")


# --------------------------------------------------------------------------------------------- storage


@pytest.mark.parametrize("field", ["storage.run_url", "catalog.url", "annotate.classifier"])
def test_unknown_storage_protocol(base, tmp_path, capsys, field):
    _assert_refused(
        *_dry_run(tmp_path, capsys, with_field(base, field, "foo://x")),
        field,
        "unknown storage protocol 'foo'",
    )


def test_chained_url_with_an_unknown_protocol(base, tmp_path, capsys):
    cfg = with_field(base, "storage.run_url", "simplecache::nope://bucket/run")
    _assert_refused(*_dry_run(tmp_path, capsys, cfg), "storage.run_url: unknown storage protocol 'nope'")


def test_local_run_url_under_a_file_cannot_be_reached(base, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    cfg = with_field(base, "storage.run_url", str(tmp_path / "afile" / "run"))
    _assert_refused(
        *_dry_run(tmp_path, capsys, cfg), "storage.run_url: cannot reach", "is a file, not a directory"
    )
    # plain loading does no I/O: the same config loads
    assert load_config_text(tmp_path, cfg).storage.run_url.endswith("run")


def load_config_text(tmp_path: Path, cfg: dict):
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def test_probe_times_out_on_a_storage_that_never_answers(base, monkeypatch):
    import pipeline.config as config

    cfg = validate_config(base)
    monkeypatch.setattr(config, "_reach_error", lambda url, options: time.sleep(5))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"storage\.run_url: cannot reach .*no answer within 0\.2s"):
        probe_config(cfg, timeout=0.2)
    assert time.perf_counter() - t0 < 2


def test_url_classifier_is_checked_when_fetchable_else_noted(base, tmp_path, capsys):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/hostile-clf/config.json", json.dumps({"attributes": ["x", "y"]}).encode())
    cfg = with_field(base, "annotate.classifier", "memory://hostile-clf")
    _assert_refused(
        *_dry_run(tmp_path, capsys, cfg), "annotate.attributes: ['glasses', 'hat'] are not attributes"
    )
    code, err = _dry_run(tmp_path, capsys, with_field(base, "annotate.classifier", "memory://absent-clf"))
    assert code == 0 and "note: annotate.classifier: attributes not checked" in err


@pytest.mark.s3
def test_s3_run_url_reachable_bucket_and_missing_bucket(base, tmp_path, capsys, s3_server, s3_bucket):
    opts = s3_server.storage_options()
    cfg = with_field(
        with_field(base, "storage.run_url", f"{s3_bucket}/runs/t"), "storage.storage_options", opts
    )
    cfg = with_field(with_field(cfg, "catalog.url", f"{s3_bucket}/catalog"), "catalog.storage_options", opts)
    code, err = _dry_run(tmp_path, capsys, cfg)
    assert code == 0, err
    missing = with_field(cfg, "storage.run_url", "s3://no-such-bucket-hostile/runs/t")
    _assert_refused(
        *_dry_run(tmp_path, capsys, missing), "storage.run_url: cannot reach s3://no-such-bucket-hostile"
    )


# --------------------------------------------------------------------------------- model-derived limits


def test_jacobian_k_beyond_the_h_space(base, tmp_path, capsys):
    ok = with_field(base, "jacobian", [{"seed": 0, "step": 1, "k": 32 * 4 * 4}])
    assert validate_config(ok).jacobian[0].k == 512
    bad = with_field(base, "jacobian", [{"seed": 0, "step": 1, "k": 513}])
    _assert_refused(*_dry_run(tmp_path, capsys, bad), "jacobian[0].k: 513 exceeds the h-space dimension 512")


def test_jacobian_mask_outside_the_image(base, tmp_path, capsys):
    bad = with_field(base, "jacobian", [{"seed": 0, "step": 1, "mask": [0, 0, 8, 17]}])
    _assert_refused(*_dry_run(tmp_path, capsys, bad), "jacobian[0].mask", "16px image")


# ------------------------------------------------------------------------------------------ plan size


def test_a_billion_samples_plan_lazily_in_bounded_time(base, tmp_path, capsys):
    big = with_field(base, "generate", {"n_samples": 10**9, "seeds_per_block": 10**4})
    big["evaluate"]["seed_start"] = 2 * 10**9
    t0 = time.perf_counter()
    code, err = _dry_run(tmp_path, capsys, big)
    assert code == 0, err
    assert time.perf_counter() - t0 < 2
    blocks = seed_blocks(validate_config(big))
    assert len(blocks) == 10**5 and blocks[-1].stop == 10**9 and blocks[-1].index == 10**5 - 1
    assert plan(validate_config(big)).n_activation_shards == 10**5 * 5


def test_one_seed_per_block_for_a_billion_samples_is_refused_quickly(base, tmp_path, capsys):
    big = with_field(base, "generate", {"n_samples": 10**9, "seeds_per_block": 1})
    big["evaluate"]["seed_start"] = 2 * 10**9
    t0 = time.perf_counter()
    code, err = _dry_run(tmp_path, capsys, big)
    assert time.perf_counter() - t0 < 2
    _assert_refused(code, err, "generate.seeds_per_block", f"more than the limit {MAX_BLOCKS}")


# ----------------------------------------------------------------------------------- real subprocess


def test_build_catalog_script_exits_2_with_one_line_and_no_traceback(base, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(base) + "sampler: {kind: ddim, eta: .inf}\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "build_catalog.py"), "--config", str(path), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and "duplicate key 'sampler'" in lines[0], proc.stderr
    assert lines[1].startswith("Hint: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
