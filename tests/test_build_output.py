"""What a build prints: a quiet Ray environment unless verbose, and a summary that ends with the grades."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from hspace.grade import grade_directions
from pipeline.build import BuildResult, build_parser
from pipeline.evaluate import effect_matrix
from pipeline.ray_runtime import QUIET_ENV, _quiet_environment, verbose_default


@pytest.mark.parametrize(
    ("value", "verbose"), [("", False), ("0", False), ("no", False), ("1", True), ("yes", True)]
)
def test_hspace_verbose_switches_ray_output_back_on(monkeypatch, value, verbose):
    monkeypatch.setenv("HSPACE_VERBOSE", value)
    assert verbose_default() is verbose


def test_quiet_environment_keeps_user_settings_and_appends_warning_filters(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning")
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "DEBUG")
    _quiet_environment()
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "DEBUG"  # the user's choice wins
    assert os.environ["PYTHONWARNINGS"] == f"error::DeprecationWarning,{QUIET_ENV['PYTHONWARNINGS']}"
    _quiet_environment()  # idempotent
    assert os.environ["PYTHONWARNINGS"].count("torch.jit.script") == 1


def test_workers_warning_filter_silences_torchs_jit_deprecation_only():
    """A Python started with QUIET_ENV's PYTHONWARNINGS (as a Ray worker is) drops that warning only."""
    code = (
        "import warnings\n"
        "warnings.warn('`torch.jit.script` is deprecated. Please switch to `torch.compile`.', FutureWarning)\n"
        "warnings.warn('something else', FutureWarning)\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": QUIET_ENV["PYTHONWARNINGS"]}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "something else" in proc.stderr and "torch.jit.script" not in proc.stderr


def test_verbose_flag_defaults_to_the_environment():
    assert build_parser().parse_args(["--config", "x"]).verbose is None
    assert build_parser().parse_args(["--config", "x", "--verbose"]).verbose is True


def test_summary_lists_grades_best_first_with_flags():
    rng = np.random.default_rng(0)
    n = 12
    edited = {
        "eyes_open": np.stack([np.full((n, 1), 0.6), np.full((n, 1), -0.6)], 1)
        + 0.01 * rng.standard_normal((n, 2, 1)),
        "eyes_open_boundary": np.stack([np.full((n, 1), -0.8), np.full((n, 1), 0.8)], 1),
    }
    random_of = {}
    for i in range(4):
        edited[f"random_{i}"] = 0.05 * rng.standard_normal((n, 2, 1))
        random_of[f"random_{i}"] = "eyes_open"
    kinds = {k: "random" if k in random_of else "supervised" for k in edited}
    eff = effect_matrix(np.zeros((n, 1)), edited, [-2.0, 2.0], ["eyes_open"], [True], random_of, kinds)
    eff |= {
        "units": "sigma",
        "grades": grade_directions(eff, {"eyes_open": "eyes_open", "eyes_open_boundary": "eyes_open"}),
    }
    result = BuildResult(
        name="t",
        catalog_url="c",
        model="m",
        ref="latest",
        version="v",
        report_url="r",
        n_samples=1,
        rows_generated=1,
        generate_seconds=1.0,
        bytes_written=1,
        directions=kinds,
        effects=eff,
        stage_seconds={"evaluate": 1.0},
    )
    text = result.summary()
    lines = text[text.index("grades (") :].splitlines()
    passing = sum(g["pass"] for n, g in eff["grades"].items() if kinds[n] != "random")
    assert passing == 1 and "1/2 directions pass" in lines[0] and "4 random baselines" in lines[0]
    assert not any(line.split()[0].startswith("random_") for line in lines[2:] if line.strip())
    rows = [line.split() for line in lines[2:]]
    assert rows[0][0] == "eyes_open_boundary" and rows[0][1] in "AB"
    eyes = next(r for r in rows if r[0] == "eyes_open")
    assert eyes[1] == "F" and eyes[-1] == "wrong_sign"


def test_native_stderr_goes_to_a_file_while_python_stderr_stays(tmp_path):
    """Ray's C++ log lines are written to fd 2 by native code: in a quiet build they land in a file."""
    code = (
        "import os, sys\n"
        "from pipeline.build import native_stderr_to_file\n"
        "with native_stderr_to_file() as path:\n"
        "    os.write(2, b'native line\\n')\n"
        "    print('python line', file=sys.stderr)\n"
        "print(path)\n"
        "os.write(2, b'after\\n')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip()
    assert "python line" in proc.stderr and "after" in proc.stderr and "native line" not in proc.stderr
    with open(path) as f:
        assert f.read() == "native line\n"
    os.unlink(path)
