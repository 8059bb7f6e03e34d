"""The job entry points for real: a catalog build submitted to a Ray head with the job SDK, and the
scheduled rebuild's two paths (nothing changed -> exit 0 without work; --grow -> new version).

A private Ray head is started for this module with free ports for every service (so it coexists
with any other local cluster) and token auth with a fresh token (Ray 2.60's job server wants it);
it is stopped by terminating the ``ray start --block`` process this module started.
The build uses a tiny random DDPM (16 px, 4 steps), a random tiny classifier and 16 samples.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import JacobianSpec

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# runtime_env upload: the code only (Ray's default limit is 100 MiB; .venv alone is gigabytes)
EXCLUDES = [
    ".venv",
    ".git",
    "**/__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "runs",
    "catalog",
    "out",
    "build",
    "dist",
    "tests/benchmarks/results",
    "*.egg-info",
]
JOB_TIMEOUT_S = 600  # a loaded 2-core machine; the build itself takes ~1 minute
HEAD_START_ATTEMPTS = 5  # a failed start costs about a minute (the deadline, then the stop)
HEAD_RETRY_PAUSE_S = 15.0


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start_head(env: dict, log: Path) -> tuple[subprocess.Popen, str, str]:
    gcs, dash, agent, agent_grpc, runtime_env, metrics, client = _free_ports(7)
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client}",
        "--num-cpus=2",
        "--disable-usage-stats",
        "--include-dashboard=true",
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"


def _stop_head(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop exactly the head this module started: its `ray start --block` process group (the GCS,
    the raylet, the dashboard and every worker are in it). SIGTERM first; Ray's orderly stop takes
    ~33 s on this machine, so after ``grace_s`` the group is killed (the head is private to this
    module and nothing of it is kept)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # nothing left in the group
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A local Ray head (2 CPUs, token auth, free ports); yields (gcs address, dashboard URL, env).

    On a heavily loaded machine the head may miss Ray's fixed 30 s start-up deadline (its raylet
    not registered with the GCS in time); the start is then retried with fresh ports, after a
    pause that lets a burst of load from the tests beside it pass, up to HEAD_START_ATTEMPTS times.
    """
    env = dict(os.environ)
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in the entrypoint = this venv
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("RAY_ADDRESS", None)
    env.pop("PYTHONPATH", None)  # jobs must import the project from their uploaded working_dir alone
    logs = tmp_path_factory.mktemp("ray_head")
    failures = []
    for attempt in range(HEAD_START_ATTEMPTS):
        if attempt:
            time.sleep(HEAD_RETRY_PAUSE_S)
        log = logs / f"head-{attempt}.log"
        proc, gcs, url = _start_head(env, log)
        try:
            _wait_for_job_server(url, env, proc, log)
        except RuntimeError as err:
            failures.append(str(err))
            _stop_head(proc)
            continue
        try:
            yield gcs, url, env
        finally:
            _stop_head(proc)
        return
    pytest.fail("could not start a Ray head:\n" + "\n---\n".join(failures))


def _client(url: str, env: dict):
    """A job SDK client carrying the head's token itself (no process-wide auth state touched)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(url, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})


def _wait_for_job_server(
    url: str, env: dict, proc: subprocess.Popen, log: Path, timeout_s: float = 240
) -> None:
    """Until the job server answers; RuntimeError (with the head's log) if the head died or timed out."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            _client(url, env).list_jobs()
            if "Ray runtime started" in log.read_text():  # printed once the raylet has registered
                return
        except Exception as err:  # not up yet
            last = err
            time.sleep(2)
    raise RuntimeError(
        f"Ray job server at {url} not ready after {timeout_s}s ({last}):\n{log.read_text()[-2000:]}"
    )


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny build config (absolute local paths; the job runs on this machine)."""
    import torch

    from hspace.toy.classifier import AttributeClassifier

    root = tmp_path_factory.mktemp("job")
    torch.manual_seed(0)
    AttributeClassifier(["round", "size"], [True, False], image_size=16, width=8).save_pretrained(
        root / "clf"
    )
    cfg = {
        "name": "tiny-job",
        "model": {"source": str(tiny_model_dir)},
        "sampler": {"kind": "ddpm", "num_inference_steps": 4},
        "generate": {"n_samples": 16, "batch_size": 8, "seeds_per_block": 8},
        "resources": {"workers": 1},
        "storage": {"run_url": str(root / "run")},
        "catalog": {"url": str(root / "catalog"), "model_name": "tiny"},
        "pca": {"n_components": 2, "batch_size": 8, "steps_per_actor": 4},
        "annotate": {"classifier": str(root / "clf"), "batch_size": 8},
        "aggregate": {
            "quantile": 0.25,
            "random_baselines": 1,
            "disentangle": {"round": ["size"]},
            "condition": {"size": "round"},
        },
        "evaluate": {"seed_start": 100_000, "n_seeds": 2, "scales": [-2.0, 2.0], "batch_size": 4},
        "jacobian": [{"name": "j", "seed": 0, "step": 2, "k": 1, "mask": [0, 0, 8, 8]}],
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _submit_and_wait(ray_head, entrypoint: str) -> str:
    """Submit ``entrypoint`` with this repository as working_dir; wait; return the logs (fail if not SUCCEEDED)."""
    from ray.job_submission import JobStatus

    _, url, env = ray_head
    client = _client(url, env)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:  # the head answers before its job agent has registered: retry that one error
        try:
            job = client.submit_job(
                entrypoint=entrypoint, runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES}
            )
            break
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(3)
    status = client.get_job_status(job)
    while (
        status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        and time.monotonic() < deadline
    ):
        time.sleep(2)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, f"job {job} ({entrypoint}) ended {status}:\n{logs[-6000:]}"
    return logs


@pytest.fixture(scope="module")
def built(ray_head, tiny_config):
    """Submit the build with the job SDK and wait for it; yields (config dict, job logs)."""
    logs = _submit_and_wait(ray_head, f"python jobs/build_catalog.py --config {tiny_config}")
    return yaml.safe_load(tiny_config.read_text()), logs


def _run_job_script(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"jobs/{script}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )


# ----------------------------------------------------------------------------------------------- tests


def test_bad_config_exits_2_naming_the_field_before_any_work(tmp_path, tiny_config):
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["sampler"]["num_inference_steps"] = 0
    cfg["storage"]["run_url"] = str(tmp_path / "run")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    for script in ("build_catalog.py", "rebuild.py"):
        proc = _run_job_script(script, "--config", str(bad))
        assert proc.returncode == 2, proc.stderr
        assert "sampler.num_inference_steps" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tiny_config):
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["storage"]["run_url"] = str(tmp_path / "run")
    cfg["catalog"]["url"] = str(tmp_path / "catalog")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _run_job_script("build_catalog.py", "--config", str(path), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "activation rows:    64" in proc.stdout  # 16 samples x 4 steps
    assert not (tmp_path / "run").exists() and not (tmp_path / "catalog").exists()


@pytest.mark.ray
def test_submitted_build_publishes_a_verified_catalog_version(built):
    from hspace import catalog as hcatalog

    cfg, logs = built
    cat = hcatalog.open(cfg["catalog"]["url"])
    assert len(cat.versions("tiny")) == 1
    v = cat.version("tiny", "latest")
    v.verify()  # sha256 and size of every listed file
    names = v.direction_names()
    kinds = {d["name"]: d["kind"] for d in v.manifest["directions"]}
    assert {
        "round",
        "size",
        "round_boundary",
        "size_boundary",
        "round_disentangled",
        "size_conditional",
        "random_round_0",
        "pca_0",
        "pca_1",
        "jac_j_0",
    } <= set(names)
    assert kinds["round_disentangled"] == "disentangled" and kinds["jac_j_0"] == "jacobian"
    assert kinds["size_conditional"] == "supervised"
    jac = v.directions()["jac_j_0"]
    default_oversample = JacobianSpec(seed=0, step=0).oversample
    assert jac.provenance["oversample"] == default_oversample and jac.provenance["converged"], jac.provenance
    assert {"effects.json", "report.html", "pca.safetensors", "previews/round.png"} <= set(v.files())
    effects = v.effects()
    assert effects["version"] == v.version and effects["matrix"]["rows"] == names
    assert v.manifest["inputs"]["n_samples"] == 16
    # every direction is graded in its manifest entry; the closing summary of the job ends with the grades
    assert all(d["grade"]["letter"] in "ABCDF" for d in v.manifest["directions"])
    assert "rows/s" in logs and f"version {v.version}" in logs and "report:" in logs and "grades (" in logs


@pytest.mark.ray
def test_rebuild_with_unchanged_inputs_exits_0_and_publishes_nothing(built, tiny_config):
    cfg, _ = built
    from hspace import catalog as hcatalog

    before = hcatalog.open(cfg["catalog"]["url"]).versions("tiny")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = _run_job_script("rebuild.py", "--config", str(tiny_config), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "nothing changed" in proc.stdout
    assert hcatalog.open(cfg["catalog"]["url"]).versions("tiny") == before


@pytest.mark.ray
def test_rebuild_grow_adds_seeds_continues_pca_and_publishes_a_new_version(built, tiny_config, ray_head):
    from hspace import catalog as hcatalog
    from pipeline.storage import RunStore

    cfg, _ = built
    cat = hcatalog.open(cfg["catalog"]["url"])
    old = cat.resolve("tiny", "latest")
    # the scheduled path: the rebuild runs as a Ray job, like the RayCronJob's entrypoint
    logs = _submit_and_wait(ray_head, f"python jobs/rebuild.py --config {tiny_config} --grow 8 --quiet")
    reason = next(line for line in logs.splitlines() if line.startswith("rebuilding tiny-job: "))
    assert "n_samples" in reason and reason.endswith("(samples 16 -> 24)"), reason
    new = cat.resolve("tiny", "latest")
    assert new != old and cat.versions("tiny") == sorted([old, new])
    v = cat.version("tiny", new)
    v.verify()
    assert v.manifest["inputs"]["n_samples"] == 24
    run = RunStore(cfg["storage"]["run_url"])
    gen = run.stage("generate")["last_report"]
    assert gen["blocks_generated"] == 1 and gen["blocks_skipped"] == 2  # only the new seeds were sampled
    assert run.stage("pca")["n_samples"] == 24 and run.stage("annotate")["rows"] == 24
    assert set(v.pca().n_samples_seen_) == {24}  # the PCA continued over the new block
    assert json.loads(json.dumps(v.effects()))["n_seeds"] == 2
