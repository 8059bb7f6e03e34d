"""Faults with real parts: a worker node killed under generation and under the PCA, the driver
killed mid-build and run again, a flaky store under generation. No (seed, step) row is lost or
doubled, and the results equal an undisturbed run's.

The node faults run on a private multi-node Ray cluster on this machine (``ray.cluster_utils``: a
head without CPUs and 1-CPU worker nodes); ``remove_node(..., allow_graceful=False)`` kills a whole
node (raylet and workers). Writes go through ``flaky://`` (tests/flaky_fs.py) with slow writes so a
fault lands while work is in flight. "Undisturbed" is checked against the references the other
tests establish: the generate stage's h equals the single-process sampler bit for bit
(test_generate.py) and the PCA stage equals the single-process fit (test_pca_stage.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import validate_config
from pipeline.generate import generate
from pipeline.pca_stage import fit_in_process, load_stage_pca, pca_stage
from pipeline.plan import seed_blocks
from pipeline.storage import RunStore
from tests.ray_cluster import REPO_ROOT, add_worker, multinode_cluster, node_hosting_actor, worker_nodes

pytestmark = pytest.mark.ray

N_SAMPLES, STEPS, PER_BLOCK, K = 8, 4, 2, 2
#: PCA components of a disturbed run against the undisturbed fit: same rows, same batches, so
#: equal up to float64 rounding; |cos| >= 0.9999 per component is the documented tolerance.
MIN_ABS_COS = 0.9999


def _cfg(model_dir: Path, run_url: str, workers: int = 2, **storage_options):
    return validate_config(
        {
            "name": "fault-test",
            "model": {"source": str(model_dir)},
            "sampler": {"kind": "ddpm", "num_inference_steps": STEPS},
            "generate": {"n_samples": N_SAMPLES, "batch_size": PER_BLOCK, "seeds_per_block": PER_BLOCK},
            "resources": {"workers": workers, "num_cpus_per_worker": 1},
            "storage": {"run_url": run_url, "storage_options": storage_options},
            "catalog": {"url": "memory://unused", "model_name": "tiny"},
            "pca": {"n_components": K, "batch_size": 2, "checkpoint_every": 1, "steps_per_actor": STEPS},
        }
    )


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs and two 1-CPU worker nodes; workers know ``flaky://``."""
    with multinode_cluster() as c:
        yield c


def _worker_nodes(c):
    return worker_nodes(c)


def _node_of_a_pca_actor(c):
    """The cluster node that hosts a live PCA group actor (looked up in the GCS actor table)."""
    return node_hosting_actor(c, "PCAGroupWorker")


def _wait_for(predicate, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _in_thread(fn, *args, **kwargs):
    """Start ``fn`` in a thread; returns a join() that gives its result or re-raises its error."""
    out: dict = {}

    def target():
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the test thread
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join(timeout: float = 300.0):
        thread.join(timeout)
        assert not thread.is_alive(), f"{fn.__name__} did not finish within {timeout} s"
        if "error" in out:
            raise out["error"]
        return out["result"]

    return join


def _listed_blocks(run_dir: Path) -> int:
    manifest = run_dir / "_manifest.json"
    if not manifest.exists():
        return 0
    import json

    try:
        return len(json.loads(manifest.read_text())["blocks"])
    except ValueError:
        return 0


def _reference_h(model_dir: Path) -> np.ndarray:
    """h of every seed from the sampler in this process (1 thread, like a 1-CPU Ray actor)."""
    from hspace.model import HSpaceModel
    from hspace.sampling import HSpaceSampler

    sampler = HSpaceSampler(HSpaceModel.from_pretrained(model_dir), sampler="ddpm", num_inference_steps=STEPS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        h = [
            sampler.sample(list(range(s, s + PER_BLOCK)), batch_size=PER_BLOCK, h_dtype=torch.float16).h
            for s in range(0, N_SAMPLES, PER_BLOCK)
        ]
    finally:
        torch.set_num_threads(threads)
    return torch.cat(h).numpy()


@pytest.fixture(scope="module")
def reference_h(tiny_model_dir):
    return _reference_h(tiny_model_dir)


def assert_every_row_once(store: RunStore) -> None:
    """Every (seed, step) row is in the shards the manifest lists exactly once, and no other
    activation or sample file is left in the run."""
    counts: Counter = Counter()
    listed = set()
    for rec in store.blocks().values():
        listed.add(rec.samples.path)
        for shard in rec.activations:
            listed.add(shard.path)
            seeds, _ = store.read_activations(rec, shard)
            assert store.read_footers([shard])[0].step == shard.step
            counts.update((int(s), shard.step) for s in seeds)
    expected = {(s, t) for s in range(N_SAMPLES) for t in range(STEPS)}
    assert set(counts) == expected, f"rows missing: {sorted(expected - set(counts))[:5]}"
    assert max(counts.values()) == 1, f"rows doubled: {[k for k, n in counts.items() if n > 1][:5]}"
    on_disk = {
        str(p.relative_to(store.root))
        for sub in ("activations", "samples")
        for p in (Path(store.root) / sub).rglob("*.parquet")
    }
    assert on_disk == listed, f"unlisted shard files: {sorted(on_disk - listed)[:5]}"


def _components(pca, step: int) -> np.ndarray:
    c = pca.estimators[step].components_.cpu().numpy()
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def assert_pca_equals_undisturbed(pca, store: RunStore) -> None:
    reference = fit_in_process(store, range(STEPS), STEPS, K, batch_size=2)
    for t in range(STEPS):
        cos = np.abs(np.sum(_components(pca, t) * _components(reference, t), axis=1))
        assert cos.min() >= MIN_ABS_COS, f"step {t}: |cos| {cos}"
        assert pca.estimators[t].n_samples_seen_ == N_SAMPLES


@pytest.fixture(scope="module")
def node_killed_generation(cluster, tiny_model_dir, tmp_path_factory):
    """Generate with two 1-CPU worker nodes; once the manifest lists a block, kill a whole worker
    node (raylet and workers) and add a fresh one. Returns (report, run directory)."""
    run_dir = tmp_path_factory.mktemp("node-gen") / "run"
    cfg = _cfg(tiny_model_dir, f"flaky://{run_dir}", slow_s=0.1)
    victim = _worker_nodes(cluster)[0]
    join = _in_thread(generate, cfg, progress=False)
    _wait_for(lambda: _listed_blocks(run_dir) >= 1, "the first listed block")
    assert _listed_blocks(run_dir) < len(seed_blocks(cfg)), "generation finished before the fault"
    cluster.remove_node(victim, allow_graceful=False)
    add_worker(cluster)
    return join(), run_dir


def test_worker_node_killed_during_generation(node_killed_generation, reference_h):
    report, run_dir = node_killed_generation
    store = RunStore(str(run_dir))
    assert report.blocks_generated == N_SAMPLES // PER_BLOCK and store.stage("generate")["complete"]
    assert_every_row_once(store)
    # Seeds fix the samples: the rows are the undisturbed sampler's, bit for bit.
    np.testing.assert_array_equal(store.read_h(list(range(N_SAMPLES))), reference_h)


def test_worker_node_killed_during_pca(cluster, node_killed_generation, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(node_killed_generation[1], run_dir)
    # Two step groups, one actor on each worker node; slow checkpoint writes keep them busy.
    cfg = _cfg(tiny_model_dir, f"flaky://{run_dir}", slow_s=0.1)
    cfg = cfg.model_copy(update={"pca": cfg.pca.model_copy(update={"steps_per_actor": STEPS // 2})})
    add_worker(cluster)  # where the lost actor restarts
    join = _in_thread(pca_stage, cfg, progress=False)
    # Both groups have checkpointed (and neither is done: 8 slow batches each), then a node dies.
    _wait_for(lambda: len(list((run_dir / "pca").rglob("*.sha256.json"))) >= 2, "both groups' checkpoints")
    cluster.remove_node(_node_of_a_pca_actor(cluster), allow_graceful=False)
    result = join()
    restarted = [g for g in result.groups if g["resumed_from"] is not None]
    assert restarted, f"no PCA actor was restarted: {result.groups}"
    store = RunStore(str(run_dir))
    assert result.n_samples == N_SAMPLES
    assert_pca_equals_undisturbed(result.pca, store)
    assert_pca_equals_undisturbed(load_stage_pca(store), store)


def test_driver_killed_mid_build_and_run_again(cluster, tiny_model_dir, tmp_path, reference_h):
    run_dir = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, str(run_dir), workers=1).model_dump()
    cfg["catalog"]["url"] = str(tmp_path / "catalog")
    config = tmp_path / "build.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONPATH": os.environ["PYTHONPATH"]}
    cmd = [sys.executable, "jobs/build_catalog.py", "--config", str(config), "--quiet"]
    first = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _listed_blocks(run_dir) >= 1 or first.poll() is not None, "the first listed block")
        first.kill()  # SIGKILL: no cleanup, no final manifest update
    finally:
        out = first.communicate(timeout=60)[0].decode(errors="replace")
    n_blocks = N_SAMPLES // PER_BLOCK
    listed = _listed_blocks(run_dir)
    assert 1 <= listed < n_blocks, (
        f"the driver was not killed mid-generation ({listed} blocks):\n{out[-3000:]}"
    )
    second = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    store = RunStore(str(run_dir))
    last = store.stage("generate")["last_report"]
    assert (last["blocks_skipped"], last["blocks_generated"]) == (listed, n_blocks - listed)
    assert "catalog build fault-test: done" in second.stdout
    assert_every_row_once(store)
    np.testing.assert_array_equal(store.read_h(list(range(N_SAMPLES))), reference_h)
    assert_pca_equals_undisturbed(load_stage_pca(store), store)


def test_flaky_store_under_generation_is_retried(cluster, tiny_model_dir, tmp_path, reference_h):
    run_dir = tmp_path / "run"
    # 30 % of storage calls fail, at most 2 in a row: every call gets through within the retries.
    options = {"fail_rate": 0.3, "max_consecutive": 2, "seed": 11, "strict_exists": True}
    cfg = _cfg(tiny_model_dir, f"flaky://{run_dir}", workers=1, **options)
    store = RunStore(cfg.storage.run_url, cfg.storage.storage_options)
    report = generate(cfg, store, progress=False)
    assert report.blocks_generated == N_SAMPLES // PER_BLOCK
    assert len(store.fs.faults) >= 3, "the driver's manifest writes met no fault"
    assert_every_row_once(RunStore(str(run_dir)))
    np.testing.assert_array_equal(RunStore(str(run_dir)).read_h(list(range(N_SAMPLES))), reference_h)


def test_storage_down_for_one_step_fails_naming_the_file_and_lists_no_block(
    cluster, tiny_model_dir, tmp_path
):
    run_dir = tmp_path / "run"
    # Every write of step 2's shards fails: each block has written steps 0 and 1 when it fails.
    cfg = _cfg(tiny_model_dir, f"flaky://{run_dir}", workers=1, fail_paths=r"/activations/t=2/")
    with pytest.raises(
        Exception, match=r"activations/t=2/part-.*: write failed after 5 attempts: ConnectionError"
    ):
        generate(cfg, progress=False)
    store = RunStore(str(run_dir))
    assert store.blocks() == {}  # no block is listed with some of its shards missing
    assert any((run_dir / "activations" / "t=1").glob("*.parquet"))  # the fault came mid-block
