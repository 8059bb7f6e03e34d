"""The ``hspace`` command on the tiny random DDPM: images of the right size, edits, catalogs, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from hspace import catalog as catalog_mod
from hspace.cli import GRID_KEY, GRID_PAD, MIN_CELL, app, parse_float_list, parse_int_list
from hspace.directions import Direction

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = 3  # sampler steps: enough to exercise the loop, fast on the tiny model
SIZE = 16  # the tiny model's image size (tests/conftest.py)
H_SHAPE = (32, 4, 4)  # the tiny model's h shape

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def layout(image: Image.Image) -> dict:
    """The grid layout the CLI stores in the PNG (cell size, padding, label margins, labels)."""
    return json.loads(image.text[GRID_KEY])


def check_grid(image: Image.Image, rows: int, cols: int, row_labels=None, col_labels=None) -> None:
    """A CLI grid: rows x cols cells upscaled to >= MIN_CELL px, GRID_PAD px apart, labelled margins
    (with dark text pixels) left of the rows and above the columns."""
    lay = layout(image)
    ch, cw = lay["cell"]
    assert (
        (lay["rows"], lay["cols"]) == (rows, cols) and min(ch, cw) >= MIN_CELL and ch == SIZE * lay["scale"]
    )
    assert image.size == (
        lay["left"] + cols * cw + (cols + 1) * GRID_PAD,
        lay["top"] + rows * ch + (rows + 1) * GRID_PAD,
    )
    assert lay["left"] > 0 and lay["top"] > 0
    a = np.asarray(image)
    assert (a[:, : lay["left"]] < 128).any() and (a[: lay["top"]] < 128).any()  # label text drawn
    if row_labels is not None:
        assert lay["row_labels"] == row_labels
    if col_labels is not None:
        assert lay["col_labels"] == col_labels
    c = cell(image, 0, 0)
    k = lay["scale"]
    assert (np.repeat(np.repeat(c[::k, ::k], k, 0), k, 1) == c).all()  # nearest-neighbour upscaling


def cell(image: Image.Image, row: int, col: int) -> np.ndarray:
    """One cell of a CLI grid at its upscaled size."""
    lay = layout(image)
    ch, cw = lay["cell"]
    x, y = lay["left"] + GRID_PAD + col * (cw + GRID_PAD), lay["top"] + GRID_PAD + row * (ch + GRID_PAD)
    return np.asarray(image)[y : y + ch, x : x + cw].astype(np.int16)


def model_args(model_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--steps", str(STEPS), "--device", "cpu", "--no-progress"]


# ------------------------------------------------------------------------- parsing
def test_seed_ranges_and_lists_expand_in_order():
    assert parse_int_list("0-3,10,12-13") == [0, 1, 2, 3, 10, 12, 13]
    assert parse_int_list(" 5 ") == [5]


@pytest.mark.parametrize("text", ["", "a-3", "3-1", "-1", "1-", "0-2,,3", "1.5"])
def test_bad_seed_strings_raise_value_error_naming_the_option(text):
    with pytest.raises(ValueError, match="--seeds"):
        parse_int_list(text)


def test_scales_accept_negative_numbers_and_reject_words():
    assert parse_float_list("-2,0,2.5") == [-2.0, 0.0, 2.5]
    with pytest.raises(ValueError, match="'big'"):
        parse_float_list("-2,big")


# ------------------------------------------------------------------------- help without Ray
def test_help_works_without_ray_or_the_pipeline():
    """Every command's --help runs with ray and pipeline made unimportable, and imports neither."""
    script = (
        "import sys\n"
        "sys.modules['ray'] = None; sys.modules['pipeline'] = None\n"
        "from typer.testing import CliRunner\n"
        "from hspace.cli import app\n"
        "r = CliRunner()\n"
        "for args in ([], ['--help'], ['sample', '--help'], ['edit', '--help'], ['swap', '--help'],\n"
        "             ['invert', '--help'], ['catalog', '--help'], ['catalog', 'gc', '--help'], ['build', '--help']):\n"
        "    res = r.invoke(app, args)\n"
        "    assert res.exit_code in (0, 2) and 'Usage' in res.output, (args, res.exit_code, res.output)\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


# ------------------------------------------------------------------------- sampling
def test_sample_writes_a_grid_of_the_right_size_and_saves_h(tiny_model_dir, tmp_path):
    out, h_file = tmp_path / "grid.png", tmp_path / "h.safetensors"
    res = invoke(
        "sample",
        "--seeds",
        "0-2,5",
        "--cols",
        "3",
        "--out",
        out,
        "--save-h",
        h_file,
        *model_args(tiny_model_dir),
    )
    assert res.exit_code == 0, res.output
    image = Image.open(out)
    check_grid(image, rows=2, cols=3, row_labels=["seeds 0-2", "seeds 5"])
    assert image.mode == "RGB"
    # 4 seeds in 3 columns: the second row has one sample, its other cells stay background
    assert (cell(image, 1, 1) == 255).all()
    saved = load_file(h_file)
    assert saved["h"].shape == (4, STEPS, *H_SHAPE) and saved["h"].dtype == torch.float16
    assert saved["seeds"].tolist() == [0, 1, 2, 5]
    assert saved["timesteps"].shape == (STEPS,)


def test_bad_seed_string_exits_2_with_a_message_and_no_traceback(tiny_model_dir, tmp_path):
    res = invoke("sample", "--seeds", "0-x", "--out", tmp_path / "g.png", *model_args(tiny_model_dir))
    assert res.exit_code == 2
    assert "--seeds" in res.output and "'0-x'" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "g.png").exists()


def test_missing_model_directory_exits_2_naming_it(tmp_path):
    missing = tmp_path / "no-such-model"
    res = invoke("sample", "--seeds", "0", "--model", missing, "--device", "cpu", "--out", tmp_path / "g.png")
    assert res.exit_code == 2
    assert str(missing) in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------- edits
@pytest.fixture(scope="module")
def direction_file(tmp_path_factory) -> Path:
    """A large random [C, H, W] direction with sigma, saved as safetensors."""
    g = torch.Generator().manual_seed(0)
    vector = torch.randn(*H_SHAPE, generator=g) * 3.0
    path = tmp_path_factory.mktemp("dir") / "d.safetensors"
    Direction(vector, "rand", kind="random", sigma=torch.full((STEPS,), 2.0)).save(str(path))
    return path


def test_edit_from_a_direction_file_writes_a_seeds_by_scales_strip(tiny_model_dir, direction_file, tmp_path):
    out = tmp_path / "strip.png"
    res = invoke(
        "edit",
        "--direction",
        direction_file,
        "--seeds",
        "0,1",
        "--scales",
        "-4,0,4",
        "--out",
        out,
        *model_args(tiny_model_dir),
    )
    assert res.exit_code == 0, res.output
    image = Image.open(out)
    check_grid(image, rows=2, cols=3, row_labels=["seed 0", "seed 1"], col_labels=["-4", "+0", "+4"])
    # an edit of this size changes the image: the +-4 columns differ from the scale-0 column by more
    # than 8-bit rounding (mean |diff| > 1 grey level)
    for row in range(2):
        for col in (0, 2):
            assert np.abs(cell(image, row, col) - cell(image, row, 1)).mean() > 1.0


def test_edit_scale_zero_matches_plain_sampling(tiny_model_dir, direction_file, tmp_path):
    """Column scale=0 is the unedited sample. Tolerance: 1 grey level (PNG quantisation of images
    rendered in batches of different sizes, whose convolutions may round differently)."""
    strip, grid = tmp_path / "strip.png", tmp_path / "grid.png"
    assert (
        invoke(
            "edit",
            "--direction",
            direction_file,
            "--seeds",
            "3",
            "--scales=-1,0",
            "--out",
            strip,
            "--sampler",
            "ddim",
            *model_args(tiny_model_dir),
        ).exit_code
        == 0
    )
    assert (
        invoke(
            "sample", "--seeds", "3", "--out", grid, "--sampler", "ddim", *model_args(tiny_model_dir)
        ).exit_code
        == 0
    )
    diff = np.abs(cell(Image.open(strip), 0, 1) - cell(Image.open(grid), 0, 0))
    assert diff.max() <= 1


def test_edit_sigma_units_without_sigma_exit_2(tiny_model_dir, tmp_path):
    path = tmp_path / "nosigma.safetensors"
    Direction(torch.ones(*H_SHAPE), "plain").save(str(path))
    res = invoke(
        "edit",
        "--direction",
        path,
        "--units",
        "sigma",
        "--seeds",
        "0",
        "--out",
        tmp_path / "s.png",
        *model_args(tiny_model_dir),
    )
    assert res.exit_code == 2
    assert "sigma" in res.output and "Traceback" not in res.output


def test_edit_needs_exactly_one_direction_source(tiny_model_dir, tmp_path):
    res = invoke("edit", "--seeds", "0", "--out", tmp_path / "s.png", *model_args(tiny_model_dir))
    assert res.exit_code == 2 and "--direction" in res.output and "--catalog" in res.output


def test_swap_writes_three_rows(tiny_model_dir, tmp_path):
    out = tmp_path / "swap.png"
    res = invoke("swap", "--seeds-a", "0,1", "--seeds-b", "2,3", "--out", out, *model_args(tiny_model_dir))
    assert res.exit_code == 0, res.output
    check_grid(Image.open(out), rows=3, cols=2, col_labels=["0/2", "1/3"])


def test_invert_prints_psnr_and_writes_originals_over_reconstructions(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / "inv.png"
    res = invoke("invert", *paths, "--out", out, *model_args(tiny_model_dir))
    assert res.exit_code == 0, res.output
    assert res.output.count("PSNR") >= 2 and "dB" in res.output
    check_grid(Image.open(out), rows=2, cols=2, col_labels=["img0.png", "img1.png"])


def test_invert_missing_image_exits_2(tiny_model_dir, tmp_path):
    res = invoke("invert", tmp_path / "nope.png", "--out", tmp_path / "inv.png", *model_args(tiny_model_dir))
    assert res.exit_code == 2 and "nope.png" in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------- catalog
@pytest.fixture()
def published(tmp_path):
    """A local catalog with three versions of model 'tiny': v1 (a, b), v2 (a rotated, c), v3 (a)."""
    url = str(tmp_path / "cat")
    cat = catalog_mod.open(url)
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(*H_SHAPE, generator=g) for _ in range(3))
    meta = {"model_id": "tiny", "sampler": {"kind": "ddpm", "num_inference_steps": STEPS, "eta": None}}
    v1 = cat.publish(
        "tiny",
        [Direction(a, "a"), Direction(b, "b")],
        metadata=meta,
        version="20240101T000000.000000Z-aaaaaa",
    )
    v2 = cat.publish(
        "tiny",
        [Direction(-a, "a"), Direction(c, "c")],
        metadata=meta,
        version="20240102T000000.000000Z-bbbbbb",
    )
    v3 = cat.publish(
        "tiny",
        [Direction(a, "a", sigma=torch.ones(STEPS))],
        metadata=meta,
        version="20240103T000000.000000Z-cccccc",
    )
    cat.set_ref("tiny", "stable", v1)
    return url, (v1, v2, v3)


def test_catalog_list_shows_models_and_versions_with_refs(published):
    url, (v1, v2, v3) = published
    res = invoke("catalog", "list", url)
    assert res.exit_code == 0, res.output
    assert "tiny" in res.output and f"latest -> {v3}" in res.output and f"stable -> {v1}" in res.output
    res = invoke("catalog", "list", url, "--model", "tiny")
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("2024")]
    assert [line.split()[0] for line in lines] == [v1, v2, v3]  # oldest first
    assert lines[0].rstrip().endswith("stable") and lines[2].rstrip().endswith("latest")


def test_catalog_show_summarises_the_manifest(published):
    url, (v1, _, _) = published
    res = invoke("catalog", "show", url, "tiny", "stable", "--verify")
    assert res.exit_code == 0, res.output
    assert v1 in res.output and "(refs: stable)" in res.output and "(verified)" in res.output
    assert "directions.safetensors" in res.output
    rows = {line.split()[0]: line.split() for line in res.output.splitlines() if line[:2] in ("a ", "b ")}
    assert rows["a"][1:4] == ["custom", "32x4x4", "raw"] and set(rows) == {"a", "b"}
    res = invoke("catalog", "show", url, "tiny", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["version"] == published[1][2]


def test_catalog_diff_reports_cosines_added_and_removed(published):
    url, (v1, v2, _) = published
    res = invoke("catalog", "diff", url, "tiny", v1, v2)
    assert res.exit_code == 0, res.output
    cos = {
        line.split()[0]: float(line.split()[1]) for line in res.output.splitlines() if line.startswith("a ")
    }
    assert cos["a"] == pytest.approx(-1.0, abs=1e-6)  # v2 stores -a: cosine -1 up to float32 rounding
    assert "added: c" in res.output and "removed: b" in res.output


def test_catalog_gc_dry_run_then_remove_keeps_referenced_versions(published):
    url, (v1, v2, v3) = published
    res = invoke("catalog", "gc", url, "tiny", "--keep", "1", "--reader-grace-s", "0", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "would remove 1 version" in res.output and v2 in res.output
    assert catalog_mod.open(url).versions("tiny") == [v1, v2, v3]
    res = invoke("catalog", "gc", url, "tiny", "--keep", "1")  # default: readers get the grace period
    assert res.exit_code == 0 and "removed 0 version" in res.output
    assert catalog_mod.open(url).versions("tiny") == [v1, v2, v3]
    res = invoke("catalog", "gc", url, "tiny", "--keep", "1", "--reader-grace-s", "0")
    assert res.exit_code == 0 and "removed 1 version" in res.output
    assert catalog_mod.open(url).versions("tiny") == [v1, v3]  # v1 kept: 'stable' names it


def test_catalog_errors_exit_non_zero_without_traceback(published, tmp_path):
    url, _ = published
    res = invoke("catalog", "show", url, "tiny", "no-such-ref")
    assert res.exit_code == 2 and "no-such-ref" in res.output and "Traceback" not in res.output
    res = invoke("catalog", "list", url, "--storage-options", "[1, 2]")
    assert res.exit_code == 2 and "--storage-options" in res.output
    res = invoke("catalog", "gc", url, "tiny", "--keep", "0")
    assert res.exit_code == 2 and "keep" in res.output


def test_catalog_checksum_error_exits_1(published):
    url, (_, _, v3) = published
    target = Path(url) / "tiny" / "versions" / v3 / "directions.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    res = invoke("catalog", "show", url, "tiny", "--verify")
    assert res.exit_code == 1 and "sha256 mismatch" in res.output and "Traceback" not in res.output


def test_catalog_list_and_show_as_json(published):
    url, (v1, v2, v3) = published
    res = invoke("catalog", "list", url, "--json")
    assert res.exit_code == 0, res.output
    listing = json.loads(res.output)
    assert listing["models"] == [
        {"model": "tiny", "versions": [v1, v2, v3], "refs": {"latest": v3, "stable": v1}}
    ]
    res = invoke("catalog", "list", url, "--model", "tiny", "--json")
    versions = json.loads(res.output)["versions"]
    assert [v["version"] for v in versions] == [v1, v2, v3] and versions[0]["refs"] == ["stable"]
    assert [v["directions"] for v in versions] == [2, 2, 1]
    res = invoke("catalog", "show", url, "tiny", v2, "--json")
    assert [d["name"] for d in json.loads(res.output)["directions"]] == ["a", "c"]


def test_catalog_verify_names_every_bad_file_and_exits_1(published):
    url, (v1, v2, v3) = published
    res = invoke("catalog", "verify", url)
    assert res.exit_code == 0, res.output
    assert all(v in res.output for v in (v1, v2, v3)) and "all match" in res.output
    vdir = Path(url) / "tiny" / "versions"
    target = vdir / v2 / "directions.safetensors"
    target.write_bytes(target.read_bytes()[:-1] + bytes([target.read_bytes()[-1] ^ 0xFF]))  # same size
    (vdir / v1 / "directions.safetensors").unlink()
    res = invoke("catalog", "verify", url, "tiny")
    assert res.exit_code == 1, res.output
    assert f"tiny/{v2}/directions.safetensors" in res.output and "sha256" in res.output
    assert f"tiny/{v1}/directions.safetensors" in res.output and "missing" in res.output
    assert "2 of 3 files" in res.output and "Traceback" not in res.output
    assert invoke("catalog", "verify", url, "tiny", "latest").exit_code == 0  # v3 is intact


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hspace.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def test_user_errors_are_one_message_with_a_hint_and_a_non_zero_exit(published, tmp_path):
    url, _ = published
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("name: x\nmodel: {source: toy}\nsampler: {kind: ddpm, num_inference_steps: -3}\n")
    cases = [
        (["build", "--config", bad_config, "--dry-run"], 2, "num_inference_steps"),
        (["catalog", "list", tmp_path / "nowhere"], 2, "no catalog at"),
        (["catalog", "show", "foo://bar", "tiny"], 2, "cannot be opened"),
        (["catalog", "show", url, "nomodel"], 2, "'nomodel'"),
        (["catalog", "verify", url, "tiny", "no-such-version"], 2, "'no-such-version'"),
        (
            ["edit", "--catalog", url, "--catalog-model", "tiny", "--name", "zz", "--model", tmp_path],
            2,
            "'zz'",
        ),
        (["build", "--config", tmp_path / "missing.yaml"], 2, "missing.yaml"),
    ]
    for args, code, needle in cases:
        proc = _cli(*args)
        assert proc.returncode == code, (args, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and needle in proc.stderr, (args, proc.stderr)
        assert "Hint:" in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_edit_from_a_catalog_direction(tiny_model_dir, published, tmp_path):
    url, (_, _, v3) = published
    out = tmp_path / "strip.png"
    res = invoke(
        "edit",
        "--catalog",
        url,
        "--name",
        "a",
        "--units",
        "sigma",
        "--scales=-2,2",
        "--seeds",
        "0",
        "--out",
        out,
        *model_args(tiny_model_dir),
    )
    assert res.exit_code == 0, res.output
    assert v3 in res.output
    check_grid(Image.open(out), rows=1, cols=2, col_labels=["-2", "+2"])


# ------------------------------------------------------------------------- build and train-toy
def test_build_dry_run_prints_the_plan_and_bad_configs_exit_2(tiny_model_dir, tmp_path):
    config = {
        "name": "cli-test",
        "model": {"source": str(tiny_model_dir)},
        "sampler": {"kind": "ddpm", "num_inference_steps": STEPS},
        "generate": {"n_samples": 8, "batch_size": 4, "seeds_per_block": 4},
        "resources": {"workers": 1},
        "storage": {"run_url": str(tmp_path / "run")},
        "catalog": {"url": str(tmp_path / "cat"), "model_name": "tiny"},
        "pca": {"n_components": 2},
    }
    good = tmp_path / "good.yaml"
    good.write_text(json.dumps(config))  # JSON is YAML
    res = invoke("build", "--config", good, "--dry-run")
    assert res.exit_code == 0, res.output
    assert "dry run" in res.output and not (tmp_path / "run").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        json.dumps({**config, "sampler": {"kind": "ddpm", "num_inference_steps": STEPS, "bogus": 1}})
    )
    res = invoke("build", "--config", bad, "--dry-run")
    assert res.exit_code == 2 and "bogus" in res.output


def test_train_toy_forwards_its_options(tmp_path):
    res = invoke("train-toy", "--help")
    assert res.exit_code == 0 and "--steps" in res.output and "--out" in res.output
