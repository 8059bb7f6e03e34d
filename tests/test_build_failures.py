"""A failed build says what failed in one line, through the real command (``jobs/build_catalog.py``
and ``jobs/rebuild.py`` in a subprocess): one ``Error:`` line naming the stage, the file and the
cause, one ``Hint:`` line naming the log file that holds the whole error chain, and an exit status
that tells a user error (2) from an infrastructure failure (1).

The builds join the session's local Ray cluster (``RAY_ADDRESS``), so no subprocess starts its own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import validate_config
from pipeline.generate import generate
from pipeline.storage import RunStore
from tests.ray_cluster import REPO_ROOT, ray_local  # noqa: F401  (fixture)

STEPS, N_SAMPLES, PER_BLOCK = 2, 4, 2
BUILD_TIMEOUT_S = 300  # a loaded 2-core machine; the failing builds below take well under a minute


def _config(model_dir: Path, tmp_path: Path, **resources) -> dict:
    data = {
        "name": "failing-build",
        "model": {"source": str(model_dir)},
        "sampler": {"kind": "ddpm", "num_inference_steps": STEPS},
        "generate": {"n_samples": N_SAMPLES, "batch_size": PER_BLOCK, "seeds_per_block": PER_BLOCK},
        "resources": {"workers": 1, "num_cpus_per_worker": 1} | resources,
        "storage": {"run_url": str(tmp_path / "run")},
        "catalog": {"url": str(tmp_path / "catalog"), "model_name": "tiny"},
        "pca": {"n_components": 2, "batch_size": 2},
    }
    validate_config(data)
    return data


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(script: str, *args: str, ray_address: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run(
        [sys.executable, f"jobs/{script}", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )


def _error_and_hint(stderr: str) -> tuple[str, str]:
    """The one Error: and one Hint: line, and no traceback on the terminal."""
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    hints = [line for line in stderr.splitlines() if line.startswith("Hint:")]
    assert len(errors) == 1 and len(hints) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "RayTaskError" not in stderr, stderr[-3000:]
    return errors[0], hints[0]


def _log_named_by(hint: str) -> Path:
    match = re.search(r"the full error is in (\S+\.log)$", hint)
    assert match, hint
    return Path(match.group(1))


def _address() -> str:
    """The address of the session's local cluster (``ray_local``)."""
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.fixture
def corrupt_run(ray_local, tiny_model_dir, tmp_path):  # noqa: F811  (the fixture)
    """A generated run whose step-1 activation shard of the first block has one byte flipped."""
    data = _config(tiny_model_dir, tmp_path)
    cfg = validate_config(data)
    store = RunStore(cfg.storage.run_url)
    generate(cfg, store, progress=False)
    shard = next(iter(store.blocks().values())).activations[1]
    path = Path(store.root) / shard.path
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return data, shard.path


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_a_corrupt_shard_fails_the_build_with_one_line_naming_stage_and_file_and_exit_2(
    corrupt_run, tmp_path
):
    data, shard = corrupt_run
    proc = _run("build_catalog.py", "--config", str(_write(tmp_path, data)), ray_address=_address())
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    error, hint = _error_and_hint(proc.stderr)
    # the PCA actor read the shard inside a Ray task: the line is the stage's own error, unwrapped
    assert error.startswith("Error: pca stage failed: CorruptShardError: "), error
    assert shard in error and "sha256" in error and "(PCA step group [0, 1])" in error, error
    log = _log_named_by(hint)
    chain = log.read_text()
    assert "== build failed in the pca stage" in chain and "RayTaskError" in chain and shard in chain
    # the ray: line names the same log
    assert str(log) in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_a_run_url_under_a_file_fails_the_build_before_any_work_with_exit_2(tiny_model_dir, tmp_path):
    (tmp_path / "plain-file").write_text("not a directory")
    data = _config(tiny_model_dir, tmp_path)
    data["storage"]["run_url"] = str(tmp_path / "plain-file" / "run")
    config = _write(tmp_path, data)
    for script in ("build_catalog.py", "rebuild.py"):
        proc = _run(script, "--config", str(config))
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        error, hint = _error_and_hint(proc.stderr)
        assert "storage.run_url: cannot reach" in error and "plain-file is a file" in error, error
        assert "ray:" not in proc.stdout  # no cluster was started or joined
    assert not (tmp_path / "catalog").exists()


def test_an_unknown_storage_protocol_fails_the_rebuild_naming_the_field(tiny_model_dir, tmp_path):
    data = _config(tiny_model_dir, tmp_path)
    data["catalog"]["url"] = "nosuchprotocol://catalog"
    proc = _run("rebuild.py", "--config", str(_write(tmp_path, data)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "catalog.url" in proc.stderr and "nosuchprotocol" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow  # the probe waits its 10 s
def test_storage_that_never_answers_is_an_infrastructure_failure_exit_1(tiny_model_dir, tmp_path):
    import socket

    with socket.socket() as silent:  # accepts connections (the backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        data = _config(tiny_model_dir, tmp_path)
        data["storage"]["run_url"] = f"http://127.0.0.1:{silent.getsockname()[1]}/run"
        proc = _run("build_catalog.py", "--config", str(_write(tmp_path, data)))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    error, hint = _error_and_hint(proc.stderr)
    assert "storage.run_url: cannot reach" in error and "no answer within" in error, error
    assert "did not answer" in hint, hint


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_missing_resources_fail_the_build_within_the_capacity_timeout_with_exit_1(tiny_model_dir, tmp_path):
    # every generate actor asks for 64 CPUs; the session cluster has 2
    data = _config(tiny_model_dir, tmp_path, num_cpus_per_worker=64)
    proc = _run(
        "build_catalog.py",
        "--config",
        str(_write(tmp_path, data)),
        "--capacity-timeout",
        "2",
        ray_address=_address(),
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    error, hint = _error_and_hint(proc.stderr)
    assert re.search(
        r"^Error: generate stage failed: generate: no node can host an actor needing \{CPU: 64\} "
        r"after 2 s; the cluster has \{CPU: 2\} on 1 live node",
        error,
    ), error
    assert "--capacity-timeout" in hint and _log_named_by(hint).exists(), hint


def test_capacity_timeout_must_be_positive(tiny_model_dir, tmp_path):
    config = _write(tmp_path, _config(tiny_model_dir, tmp_path))
    proc = _run("build_catalog.py", "--config", str(config), "--capacity-timeout", "0")
    assert proc.returncode == 2 and "--capacity-timeout: must be a positive number" in proc.stderr


@pytest.mark.usefixtures("ray_local")
def test_the_error_line_unwraps_rays_task_error_to_the_stages_own_error():
    import ray

    from pipeline.failure import BuildFailure
    from pipeline.run_format import CorruptShardError

    @ray.remote(max_retries=0)
    def read_shard():
        raise CorruptShardError("run/activations/t=1/part-x-000000.parquet: sha256 0a... does not match")

    @ray.remote(max_retries=0)
    def write_shard():
        raise ConnectionError("storage down")

    failures = []
    for name, task in (("read_shard", read_shard), ("write_shard", write_shard)):
        with pytest.raises(ray.exceptions.RayTaskError) as info:
            ray.get(task.remote())
        text = str(info.value)  # what the terminal would have shown: the remote traceback
        assert f"ray::{name}()" in text and 'File "' in text and len(text.splitlines()) > 2
        failures.append(BuildFailure("pca", info.value, log_path="/tmp/x.log"))
    corrupt, down = failures
    assert corrupt.error_line() == (
        "pca stage failed: CorruptShardError: run/activations/t=1/part-x-000000.parquet: sha256 0a... does not match"
    )
    assert corrupt.exit_code == 2 and corrupt.hint_line().endswith("the full error is in /tmp/x.log")
    assert down.error_line() == "pca stage failed: ConnectionError: storage down" and down.exit_code == 1


@pytest.mark.parametrize("raw", ["0", "-1", "inf", "nan", "soon"])
def test_a_capacity_timeout_from_the_environment_must_be_a_positive_number(monkeypatch, raw):
    from pipeline.ray_runtime import CAPACITY_TIMEOUT_ENV, capacity_timeout_s

    monkeypatch.setenv(CAPACITY_TIMEOUT_ENV, raw)
    with pytest.raises(ValueError, match=CAPACITY_TIMEOUT_ENV):
        capacity_timeout_s()


def test_the_capacity_timeout_defaults_to_120_s_and_follows_the_environment(monkeypatch):
    from pipeline.ray_runtime import CAPACITY_TIMEOUT_ENV, DEFAULT_CAPACITY_TIMEOUT_S, capacity_timeout_s

    monkeypatch.delenv(CAPACITY_TIMEOUT_ENV, raising=False)
    assert capacity_timeout_s() == DEFAULT_CAPACITY_TIMEOUT_S == 120.0
    monkeypatch.setenv(CAPACITY_TIMEOUT_ENV, "7.5")
    assert capacity_timeout_s() == 7.5
