"""A small local Ray cluster shared by the pipeline tests (import the ``ray_local`` fixture).

Started once per session with 2 CPUs, no dashboard and usage stats off; a test module that
imports the fixture when Ray is already running reuses that cluster. Workers inherit
``PYTHONPATH`` with the repository root so they import ``hspace`` and ``pipeline`` from the tree.
"""

from __future__ import annotations

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
