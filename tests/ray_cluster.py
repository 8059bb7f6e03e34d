"""A small local Ray cluster shared by the pipeline tests (import the ``ray_local`` fixture).

Started once per session with 2 CPUs, no dashboard and usage stats off; a test module that
imports the fixture when Ray is already running reuses that cluster. Workers inherit
``PYTHONPATH`` with the repository root so they import ``hspace`` and ``pipeline`` from the tree.

:func:`multinode_cluster` is the node-fault tests' private cluster: a head without CPUs and 1-CPU
worker nodes that a test removes and adds.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local():
    """Yield the ``ray`` module with a local cluster running (num_cpus=2)."""
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    started = not ray.is_initialized()
    if started:
        _init_with_retries(ray)
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()


def _init_with_retries(ray, attempts: int = 3) -> None:
    """``ray.init`` of a fresh local cluster; retried because Ray gives its raylet a fixed 30 s to
    register, which a machine shared with other jobs sometimes exceeds."""
    for attempt in range(attempts):
        try:
            ray.init(
                address="local",  # a fresh cluster of our own, even if another one runs on the machine
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                object_store_memory=200 * 1024 * 1024,
                configure_logging=False,
            )
            return
        except Exception as error:
            if "timed out during startup" not in str(error) or attempt == attempts - 1:
                raise
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# A private multi-node cluster for the node-fault tests

#: Object store of each node of the multi-node cluster (the tiny test runs need a few MB).
NODE_OBJECT_STORE = 100 * 2**20
#: The GCS checks each node every 0.5 s instead of every 3 s: a killed node is marked dead after
#: ~3 s instead of ~15 s (measured), which every node-fault test waits for. A live node
#: is still only marked dead after 5 checks in a row time out at Ray's 10 s each, so a slow node on
#: a loaded machine is not mistaken for a dead one.
NODE_HEALTH_CHECKS = {"health_check_period_ms": 500}


@contextlib.contextmanager
def multinode_cluster(workers: int = 2, setup_hook: str | None = "tests.flaky_fs.register"):
    """A head without CPUs and ``workers`` 1-CPU worker nodes (``ray.cluster_utils.Cluster``),
    with this process connected as its driver; workers run ``setup_hook`` (``flaky://`` known).

    A session cluster already running in this process is shut down meanwhile and started again
    afterwards, so the other modules' ``ray_local`` fixture keeps working. Nodes are removed with
    ``cluster.remove_node(node, allow_graceful=False)`` (raylet and workers killed) and added with
    :func:`add_worker`.
    """
    import ray
    from ray.cluster_utils import Cluster

    from tests import flaky_fs

    was_running = ray.is_initialized()
    if was_running:
        ray.shutdown()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    flaky_fs.register()
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "object_store_memory": NODE_OBJECT_STORE,
            "_system_config": NODE_HEALTH_CHECKS,
        },
    )
    try:
        for _ in range(workers):
            add_worker(c)
        ray.init(
            address=c.address,
            runtime_env={"worker_process_setup_hook": setup_hook} if setup_hook else None,
            log_to_driver=False,
            configure_logging=False,
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield c
    finally:
        ray.shutdown()
        try:
            c.shutdown()
        finally:
            if was_running:
                _init_with_retries(ray)


def add_worker(c) -> None:
    """Add a 1-CPU worker node to the multi-node cluster ``c``."""
    c.add_node(num_cpus=1, object_store_memory=NODE_OBJECT_STORE)


def worker_nodes(c) -> list:
    """The worker nodes (all but the head) of the multi-node cluster ``c``."""
    return [n for n in c.list_all_nodes() if n is not c.head_node]


def node_hosting_actor(c, class_suffix: str):
    """A worker node of ``c`` that hosts a live actor whose class name ends with ``class_suffix``
    (looked up in the GCS actor table)."""
    import ray._private.state

    actors = list(ray._private.state.actors().values())
    alive = [
        a["Address"]["NodeID"]
        for a in actors
        if a["ActorClassName"].endswith(class_suffix) and a["State"] == "ALIVE"
    ]
    nodes = [n for n in worker_nodes(c) if n.node_id in alive]
    assert nodes, (
        f"no live {class_suffix} actor on a worker node: {[(a['ActorClassName'], a['State']) for a in actors]}"
    )
    return nodes[0]


def busy_worker_node(c):
    """A worker node of ``c`` whose CPU is in use (by whatever runs there: in a fault test, the one
    stage running), or None; the node of a running task, which the GCS actor table does not list."""
    import ray._private.state

    free = ray._private.state.available_resources_per_node()
    # a node's entry leaves out a resource none of which is free
    busy = [n for n in worker_nodes(c) if n.node_id in free and free[n.node_id].get("CPU", 0.0) < 1.0]
    return busy[0] if busy else None
