"""Files hspace does not own: hostile safetensors headers, direction and PCA files, images.

Every case must fail with one ValueError naming the file, before anything large is allocated.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from hspace.directions import Direction, load_directions
from hspace.io import check_safetensors_header, safetensors_from_bytes
from hspace.pca import PerTimestepPCA

REPO_ROOT = Path(__file__).resolve().parents[1]


def raw_file(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors-like file with any JSON header (or raw header bytes) and data."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def good_direction() -> Direction:
    return Direction(torch.randn(4, 2, 2), name="smile", sigma=None)


def entry(dtype: str = "F32", shape: list | None = None, offsets: list | None = None) -> dict:
    return {"dtype": dtype, "shape": shape or [4], "data_offsets": offsets or [0, 16]}


HOSTILE = {
    "too_short": b"\x01\x02",
    "header_longer_than_file": raw_file({}, length=10**6),
    "header_length_2_64": struct.pack("<Q", 2**64 - 1) + b"{}",
    "not_json": raw_file(b"{not json"),
    "not_utf8": raw_file(b"\xff\xfe\x00"),
    "header_is_a_list": raw_file([1, 2]),
    "repeated_key": raw_file(
        b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "x": {}}', bytes(16)
    ),
    "metadata_not_a_mapping": raw_file({"__metadata__": ["a"], "x": entry()}, bytes(16)),
    "metadata_value_not_str": raw_file({"__metadata__": {"a": 1}, "x": entry()}, bytes(16)),
    "huge_shape": raw_file({"x": entry(shape=[10**6, 10**6], offsets=[0, 4 * 10**12])}, bytes(16)),
    "shape_does_not_match_offsets": raw_file({"x": entry(shape=[10**6])}, bytes(16)),
    "offsets_past_end": raw_file({"x": entry(shape=[8], offsets=[0, 32])}, bytes(16)),
    "negative_offset": raw_file({"x": entry(offsets=[-16, 0])}, bytes(16)),
    "negative_dim": raw_file({"x": entry(shape=[-4])}, bytes(16)),
    "overlapping": raw_file({"x": entry(), "y": entry(offsets=[8, 24])}, bytes(24)),
    "gap": raw_file({"x": entry(offsets=[8, 24])}, bytes(24)),
    "truncated_data": save({"x": torch.zeros(64)})[:-10],
    "unknown_dtype": raw_file({"x": entry(dtype="F128")}, bytes(16)),
    "extra_entry_key": raw_file({"x": {**entry(), "evil": 1}}, bytes(16)),
    "bool_shape": raw_file({"x": entry(shape=[True, 4])}, bytes(16)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_safetensors_header_raises_value_error_naming_the_file(case, tmp_path):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(HOSTILE[case])
    with pytest.raises(ValueError, match=f"^{path}: ") as err:
        Direction.load(str(path))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="^memory-name: "):
        safetensors_from_bytes(HOSTILE[case], "memory-name")


def test_valid_files_pass_the_header_check_including_empty_and_multi_tensor():
    assert check_safetensors_header(save({}), "f") == {}
    data = save({"a": torch.zeros(3, 2), "b": torch.ones(0), "c": torch.arange(5)}, metadata={"k": "v"})
    assert check_safetensors_header(data, "f") == {"k": "v"}
    tensors, meta = safetensors_from_bytes(data, "f")
    assert meta == {"k": "v"} and tensors["c"].tolist() == [0, 1, 2, 3, 4]


def _direction_file(tmp_path: Path, vector: torch.Tensor, meta: dict[str, str], **extra) -> Path:
    path = tmp_path / "d.safetensors"
    path.write_bytes(save({"smile": vector, **extra}, metadata=meta))
    return path


@pytest.mark.parametrize(
    ("vector", "meta", "extra", "match"),
    [
        (torch.full((4, 2, 2), float("nan")), {"smile": "{}"}, {}, "non-finite"),
        (torch.tensor([[[float("inf")]]]), {"smile": "{}"}, {}, "non-finite"),
        (torch.ones(4, 2, 2), {"smile": "{}"}, {"smile.sigma": torch.tensor([float("nan")])}, "sigma"),
        (torch.ones(4, 2, 2), {"smile": "[1, 2]"}, {}, "JSON object"),
        (torch.ones(4, 2, 2), {"smile": "{nope"}, {}, "not valid JSON"),
        (torch.ones(4, 2, 2), {"smile": "{}", "__directions__": "7"}, {}, "list of names"),
        (torch.ones(4, 2, 2), {"smile": '{"kind": ["pca"]}'}, {}, "kind"),
        (torch.ones(4, 2, 2, dtype=torch.int32), {"smile": "{}"}, {}, "floating point"),
        (torch.ones(5), {"smile": "{}"}, {}, r"\[T,C,H,W\]"),
    ],
    ids=["nan", "inf", "nan_sigma", "meta_list", "meta_bad_json", "order_not_list", "kind_list", "int", "1d"],
)
def test_malformed_direction_content_names_the_file(tmp_path, vector, meta, extra, match):
    path = _direction_file(tmp_path, vector, meta, **extra)
    with pytest.raises(ValueError, match=f"^{path}: .*{match}"):
        Direction.load(str(path))
    with pytest.raises(ValueError, match=f"^{path}: "):
        load_directions(str(path))


def test_cli_edit_with_a_hostile_direction_file_prints_one_line_and_exits_2(tmp_path):
    """As a user runs it: a separate process, one ``Error: FILE: ...`` line, no traceback."""
    path = tmp_path / "evil.safetensors"
    path.write_bytes(HOSTILE["huge_shape"])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hspace.cli",
            "edit",
            "--direction",
            str(path),
            "--out",
            str(tmp_path / "s.png"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    # one error line naming the file, then one hint line
    assert len(lines) == 2 and lines[0].startswith(f"Error: {path}: "), proc.stderr
    assert lines[1].startswith("Hint: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "s.png").exists()


# ------------------------------------------------------------------------------- PCA state files
def _pca(tmp_path: Path) -> tuple[PerTimestepPCA, dict, dict]:
    torch.manual_seed(0)
    pca = PerTimestepPCA(2, 2, h_shape=(2, 2, 2))
    pca.partial_fit(torch.randn(6, 2, 2, 2, 2))
    tensors, meta = pca.to_safetensors_dict()
    return pca, tensors, meta


def _write(tmp_path: Path, tensors: dict, meta: dict) -> str:
    path = tmp_path / "pca.safetensors"
    path.write_bytes(save(tensors, metadata=meta))
    return str(path)


def _with_config(meta: dict, **changes) -> dict:
    config = json.loads(meta["config"])
    config.update(changes)
    return {**meta, "config": json.dumps(config)}


@pytest.mark.parametrize(
    "case",
    [
        "nan_mean",
        "short_var",
        "wrong_components",
        "step_out_of_range",
        "negative_step",
        "bad_config",
        "h_shape",
    ],
)
def test_malformed_pca_state_names_the_file(tmp_path, case):
    pca, tensors, meta = _pca(tmp_path)
    path = _write(tmp_path, tensors, meta)
    assert PerTimestepPCA.load(path).components_.shape == pca.components_.shape  # the good file loads
    if case == "nan_mean":
        tensors["step0.mean_"] = torch.full_like(tensors["step0.mean_"], float("nan"))
    elif case == "short_var":
        tensors["step1.var_"] = tensors["step1.var_"][:3].clone()
    elif case == "wrong_components":
        tensors["step0.components_"] = torch.zeros(2, 7, dtype=torch.float64)
    elif case == "step_out_of_range":
        config = json.loads(meta["config"])
        config["steps"]["9"] = config["steps"]["0"]
        meta = {**meta, "config": json.dumps(config)}
    elif case == "negative_step":
        config = json.loads(meta["config"])
        config["steps"]["-1"] = config["steps"].pop("1")
        meta = {**meta, "config": json.dumps(config)}
    elif case == "bad_config":
        meta = _with_config(meta, n_steps="two")
    elif case == "h_shape":
        meta = _with_config(meta, h_shape=[3, 2, 2])
    path = _write(tmp_path, tensors, meta)
    with pytest.raises(ValueError, match=f"^{path}: "):
        PerTimestepPCA.load(path)


# ------------------------------------------------------------------------------- images
@pytest.mark.parametrize(
    "content", [b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40], ids=["text", "png"]
)
def test_unreadable_image_file_names_it(tmp_path, content):
    from hspace.inversion import load_images

    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{path}: not a readable image"):
        load_images(str(path), (3, 16, 16))


def test_truncated_image_file_names_it(tmp_path):
    from PIL import Image

    from hspace.inversion import load_images

    path = tmp_path / "t.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"^{path}: not a readable image"):
        load_images(str(path), (3, 16, 16))


# ------------------------------------------------------------------------------- model directories
@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{oops", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"num_train_timesteps": -5}', "positive int"),
    ],
    ids=["bad_json", "list", "negative_timesteps"],
)
def test_malformed_scheduler_config_names_the_file(tiny_model_dir, tmp_path, text, match):
    import shutil

    from hspace.model import HSpaceModel

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = model_dir / "scheduler" / "scheduler_config.json"
    config.write_text(text)
    with pytest.raises(ValueError, match=f"^{config}: .*{match}"):
        HSpaceModel.from_pretrained(model_dir)


# ------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--seeds", str(2**63)], "out of range 0..2\\*\\*63-1"),
        (["--sampler", "ddim", "--eta", "nan"], "eta must be a finite number"),
        (["--sampler", "ddim", "--eta", "2"], "eta must be in \\[0, 1\\]"),
    ],
    ids=["seed_2_63", "eta_nan", "eta_2"],
)
def test_cli_sample_refuses_out_of_range_seeds_and_eta_with_exit_2(tiny_model_dir, tmp_path, args, match):
    import re

    from typer.testing import CliRunner

    from hspace.cli import app

    out = tmp_path / "g.png"
    res = CliRunner().invoke(
        app,
        [
            "sample",
            *args,
            "--steps",
            "2",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 2, res.output
    assert re.search(match, res.output) and "Traceback" not in res.output
    assert not out.exists()


def test_image_over_the_pixel_limit_is_refused_naming_it(tmp_path, monkeypatch):
    """Between MAX_IMAGE_PIXELS and twice that PIL only warns; hspace refuses."""
    from PIL import Image

    from hspace.inversion import load_images

    path = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: a warning in PIL
    with pytest.raises(ValueError, match=f"^{path}: not a readable image"):
        load_images(str(path), (3, 16, 16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert load_images(str(path), (3, 16, 16)).shape == (1, 3, 16, 16)


# ------------------------------------------------------------------------------- classifier directories
@pytest.mark.parametrize(
    "case", ["config_list", "config_unknown_key", "weights_nan", "weights_wrong_shape", "weights_header"]
)
def test_malformed_classifier_directory_names_the_file(tmp_path, case):
    from safetensors.torch import load_file, save_file

    from hspace.classifier import load_classifier
    from hspace.toy.classifier import AttributeClassifier

    d = tmp_path / "clf"
    AttributeClassifier(["round"], [True], image_size=16, width=8).save_pretrained(d)
    config, weights = d / "config.json", d / "model.safetensors"
    state = load_file(weights)
    first = next(iter(state))
    if case == "config_list":
        config.write_text("[1]")
    elif case == "config_unknown_key":
        config.write_text(json.dumps({**json.loads(config.read_text()), "evil": 1}))
    elif case == "weights_nan":
        state[first] = torch.full_like(state[first], float("nan"))
        save_file(state, weights)
    elif case == "weights_wrong_shape":
        state[first] = torch.zeros(3)
        save_file(state, weights)
    else:
        weights.write_bytes(HOSTILE["huge_shape"])
    target = config if case.startswith("config") else weights
    with pytest.raises(ValueError, match=f"^{target}: "):
        load_classifier(str(d))
