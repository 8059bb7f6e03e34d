"""A cluster that lost capacity never hangs the build: each stage that runs on workers (generate's
and annotate's Ray Data actor pools, the PCA stage's group actors, evaluate's tasks) finishes on
the nodes that remain, or fails within the capacity timeout naming the resources it lacks.

Cluster: a head without CPUs and two 1-CPU worker nodes (``tests.ray_cluster.multinode_cluster``);
``remove_node(..., allow_graceful=False)`` kills a whole node and no replacement is added unless
a test says so (the tests with a replacement node are in tests/test_faults.py). Results are
checked against the undisturbed references of tests/test_faults.py (every (seed, step) row once;
PCA components |cos| >= 0.9999 to the single-process fit). The capacity timeout is set to
:data:`TIMEOUT_S` here (the default is ``pipeline.ray_runtime.DEFAULT_CAPACITY_TIMEOUT_S``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hspace.directions import Direction
from pipeline.annotate import annotate
from pipeline.config import validate_config
from pipeline.evaluate import evaluate
from pipeline.failure import CapacityError
from pipeline.generate import generate
from pipeline.pca_stage import load_stage_pca, pca_stage
from pipeline.plan import seed_blocks
from pipeline.ray_runtime import CAPACITY_TIMEOUT_ENV
from pipeline.storage import RunStore
from tests.ray_cluster import (
    add_worker,
    busy_worker_node,
    multinode_cluster,
    node_hosting_actor,
    worker_nodes,
)
from tests.test_faults import (
    N_SAMPLES,
    PER_BLOCK,
    STEPS,
    _in_thread,
    _listed_blocks,
    _wait_for,
    assert_every_row_once,
    assert_pca_equals_undisturbed,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

#: The capacity timeout of these tests, in seconds.
TIMEOUT_S = 3.0
#: How long a stage may take to fail once no node can host its actors: Ray marks a killed node
#: dead after its missed health checks (~3 s in this cluster, tests.ray_cluster), then the timeout runs.
FAIL_WITHIN_S = 300.0
#: How long a test waits for a stage to reach the point of the fault, or to finish after it (a
#: generous bound: a machine shared with other jobs can be many times slower than an idle one).
WAIT_S = 600.0


def _cfg(
    model_dir: Path,
    run_url: str,
    classifier_dir: Path | None = None,
    cpus: float = 1,
    n_seeds: int = 2,
    **storage_options,
):
    data = {
        "name": "capacity-test",
        "model": {"source": str(model_dir)},
        "sampler": {"kind": "ddpm", "num_inference_steps": STEPS},
        "generate": {"n_samples": N_SAMPLES, "batch_size": PER_BLOCK, "seeds_per_block": PER_BLOCK},
        "resources": {"workers": 2, "num_cpus_per_worker": cpus},
        "storage": {"run_url": run_url, "storage_options": storage_options},
        "catalog": {"url": "memory://unused", "model_name": "tiny"},
        "pca": {"n_components": 2, "batch_size": 2, "checkpoint_every": 1, "steps_per_actor": STEPS // 2},
    }
    if classifier_dir is not None:
        data["annotate"] = {"classifier": str(classifier_dir), "batch_size": 8}
        data["evaluate"] = {"seed_start": 1000, "n_seeds": n_seeds, "scales": [-2.0, 2.0], "batch_size": 4}
    return validate_config(data)


@pytest.fixture(scope="module")
def cluster():
    with multinode_cluster() as c:
        yield c


@pytest.fixture
def short_capacity_timeout(monkeypatch):
    monkeypatch.setenv(CAPACITY_TIMEOUT_ENV, str(TIMEOUT_S))


@pytest.fixture
def restore_workers(cluster):
    """Bring the cluster back to two worker nodes after the test."""
    yield
    for _ in range(2 - len(worker_nodes(cluster))):
        add_worker(cluster)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A random tiny AttributeClassifier (16 px) with one binary and one continuous attribute."""
    from hspace.toy.classifier import AttributeClassifier

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clf")
    AttributeClassifier(["round", "size"], [True, False], image_size=16, width=8).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def generated_after_losing_a_node(cluster, tiny_model_dir, tmp_path_factory):
    """Generate on two 1-CPU worker nodes; once the manifest lists a block, kill one worker node
    for good (no replacement). Returns (report, run directory); the node is added back after."""
    run_dir = tmp_path_factory.mktemp("capacity-gen") / "run"
    cfg = _cfg(tiny_model_dir, f"flaky://{run_dir}", slow_s=0.1)
    join = _in_thread(generate, cfg, progress=False)
    _wait_for(lambda: _listed_blocks(run_dir) >= 1, "the first listed block", timeout=WAIT_S)
    assert _listed_blocks(run_dir) < len(seed_blocks(cfg)), "generation finished before the fault"
    cluster.remove_node(worker_nodes(cluster)[0], allow_graceful=False)
    try:
        return join(timeout=WAIT_S), run_dir
    finally:
        add_worker(cluster)


def _copy_run(source: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    return run_dir


def test_generate_finishes_on_the_remaining_node_when_a_node_is_lost_for_good(generated_after_losing_a_node):
    report, run_dir = generated_after_losing_a_node
    store = RunStore(str(run_dir))
    assert report.blocks_generated == N_SAMPLES // PER_BLOCK and store.stage("generate")["complete"]
    assert_every_row_once(store)


@pytest.mark.usefixtures("restore_workers")
def test_pca_finishes_on_the_remaining_node_when_a_node_is_lost_after_the_first_checkpoint(
    cluster, generated_after_losing_a_node, tiny_model_dir, tmp_path
):
    # Two step groups, one actor on each worker node. The surviving node's CPU is held by its
    # group's actor until that group is done; the lost group's actor restarts there afterwards.
    run_dir = _copy_run(generated_after_losing_a_node[1], tmp_path)
    cfg = _cfg(tiny_model_dir, f"flaky://{run_dir}", slow_s=0.1)
    join = _in_thread(pca_stage, cfg, progress=False)
    _wait_for(
        lambda: len(list((run_dir / "pca").rglob("*.sha256.json"))) >= 2,
        "both groups' checkpoints",
        timeout=WAIT_S,
    )
    cluster.remove_node(node_hosting_actor(cluster, "PCAGroupWorker"), allow_graceful=False)
    result = join(timeout=WAIT_S)
    assert [g for g in result.groups if g["resumed_from"] is not None], result.groups
    store = RunStore(str(run_dir))
    assert result.n_samples == N_SAMPLES
    assert_pca_equals_undisturbed(result.pca, store)
    assert_pca_equals_undisturbed(load_stage_pca(store), store)


@pytest.mark.usefixtures("restore_workers", "short_capacity_timeout")
def test_pca_fails_naming_the_missing_resources_when_no_node_is_left(
    cluster, generated_after_losing_a_node, tiny_model_dir, tmp_path
):
    run_dir = _copy_run(generated_after_losing_a_node[1], tmp_path)
    cfg = _cfg(tiny_model_dir, f"flaky://{run_dir}", slow_s=0.1)
    join = _in_thread(pca_stage, cfg, progress=False)
    _wait_for(lambda: any((run_dir / "pca").rglob("*.sha256.json")), "a first checkpoint", timeout=WAIT_S)
    for node in worker_nodes(cluster):
        cluster.remove_node(node, allow_graceful=False)
    removed = time.monotonic()
    with pytest.raises(
        CapacityError,
        match=r"^pca: no node can host an actor needing \{CPU: 1\} after 3 s; the cluster has \{\} on 1 live",
    ):
        join(timeout=FAIL_WITHIN_S)
    print(f"pca: failed {time.monotonic() - removed:.1f} s after the last worker node was removed")


@pytest.mark.usefixtures("restore_workers", "short_capacity_timeout")
def test_generate_fails_naming_the_missing_resources_when_no_node_is_left(cluster, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, f"flaky://{run_dir}", slow_s=0.1)
    join = _in_thread(generate, cfg, progress=False)
    _wait_for(lambda: _listed_blocks(run_dir) >= 1, "the first listed block", timeout=WAIT_S)
    for node in worker_nodes(cluster):
        cluster.remove_node(node, allow_graceful=False)
    removed = time.monotonic()
    with pytest.raises(
        CapacityError, match=r"^generate: no node can host an actor needing \{CPU: 1\} after 3 s"
    ):
        join(timeout=FAIL_WITHIN_S)
    print(f"generate: failed {time.monotonic() - removed:.1f} s after the last worker node was removed")
    assert 1 <= len(RunStore(str(run_dir)).blocks()) < len(seed_blocks(cfg))  # finished blocks are kept


# The Ray Data stages below ask for actors bigger than any node (2 CPUs on 1-CPU nodes): the
# capacity that remains cannot run them at all, and no actor ever starts.


@pytest.mark.usefixtures("short_capacity_timeout")
def test_annotate_fails_naming_the_missing_resources_when_no_node_can_host_a_scorer(
    generated_after_losing_a_node, tiny_model_dir, classifier_dir, tmp_path
):
    run_dir = _copy_run(generated_after_losing_a_node[1], tmp_path)
    cfg = _cfg(tiny_model_dir, str(run_dir), classifier_dir, cpus=2)
    started = time.monotonic()
    with pytest.raises(
        CapacityError,
        match=r"^annotate: no node can host an actor needing \{CPU: 2\} after 3 s; the cluster has \{CPU: 2\} "
        r"on 3 live node",
    ):
        annotate(cfg, RunStore(str(run_dir)), progress=False)
    print(f"annotate: failed after {time.monotonic() - started:.1f} s")


@pytest.mark.usefixtures("cluster", "short_capacity_timeout")
def test_evaluate_fails_naming_the_missing_resources_when_no_node_can_host_a_scorer(
    tiny_model_dir, classifier_dir, tmp_path
):
    cfg = _cfg(tiny_model_dir, str(tmp_path / "run"), classifier_dir, cpus=2)
    started = time.monotonic()
    with pytest.raises(
        CapacityError, match=r"^evaluate: no node can host a seed's task needing \{CPU: 2\} after 3 s"
    ):
        evaluate(cfg, _directions(1), RANDOM_OF, attributes=["round"], binary=[True], progress=False)
    print(f"evaluate: failed after {time.monotonic() - started:.1f} s")


@pytest.mark.usefixtures("restore_workers")
@pytest.mark.parametrize("replacement", [False, True], ids=["for-good", "replaced"])
def test_annotate_scores_every_seed_when_a_node_is_lost(
    cluster, generated_after_losing_a_node, tiny_model_dir, classifier_dir, tmp_path, replacement
):
    run_dir = _copy_run(generated_after_losing_a_node[1], tmp_path)
    cfg = _cfg(tiny_model_dir, str(run_dir), classifier_dir)
    join = _in_thread(annotate, cfg, RunStore(str(run_dir)), progress=False)
    _lose_a_node_hosting(cluster, "ClassifierScorer))", replacement)
    result = join(timeout=WAIT_S)
    assert sorted(result.scores.column("seed").to_pylist()) == list(range(N_SAMPLES))
    assert np.isfinite(result.scores.column("round").to_numpy()).all()


@pytest.mark.usefixtures("restore_workers")
@pytest.mark.parametrize("replacement", [False, True], ids=["for-good", "replaced"])
def test_evaluate_scores_every_direction_when_a_node_is_lost(
    cluster, tiny_model_dir, classifier_dir, tmp_path, replacement
):
    # 8 seeds, two tasks in flight: the killed node is one running a seed's task (its CPU in use)
    cfg = _cfg(tiny_model_dir, str(tmp_path / "run"), classifier_dir, n_seeds=8)
    directions = _directions(3)
    join = _in_thread(
        evaluate, cfg, directions, RANDOM_OF, attributes=["round"], binary=[True], progress=False
    )
    _wait_for(lambda: busy_worker_node(cluster) is not None, "a node running a seed's task", timeout=WAIT_S)
    cluster.remove_node(busy_worker_node(cluster), allow_graceful=False)
    if replacement:
        add_worker(cluster)
    effects = join(timeout=WAIT_S).effects
    assert effects["directions"] == list(directions)
    assert all(v is not None and np.isfinite(v) for row in effects["matrix"]["effect"] for v in row)


#: The random baseline of :func:`_directions` and the direction whose norm it matches.
RANDOM_OF = {"random_0": "d0"}


def _directions(n: int) -> dict[str, Direction]:
    """``n`` custom directions ``d0``.. and the random baseline ``random_0`` matched to ``d0``."""
    g = torch.Generator().manual_seed(1)
    shape = (STEPS, 32, 4, 4)  # the tiny U-Net's h per step
    out = {
        f"d{i}": Direction(
            vector=torch.randn(shape, generator=g), name=f"d{i}", kind="custom", sigma=torch.ones(STEPS)
        )
        for i in range(n)
    }
    out["random_0"] = Direction(vector=torch.randn(shape, generator=g), name="random_0", kind="random")
    return out


def _lose_a_node_hosting(cluster, class_suffix: str, replacement: bool) -> None:
    """Once an actor of ``class_suffix`` is alive, kill its node; add a fresh one if ``replacement``."""
    _wait_for(lambda: _has_live_actor(class_suffix), f"a live {class_suffix} actor", timeout=WAIT_S)
    cluster.remove_node(node_hosting_actor(cluster, class_suffix), allow_graceful=False)
    if replacement:
        add_worker(cluster)


def _has_live_actor(class_part: str) -> bool:
    import ray._private.state

    return any(
        class_part in a["ActorClassName"] and a["State"] == "ALIVE"
        for a in ray._private.state.actors().values()
    )
