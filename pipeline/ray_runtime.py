"""Joining or starting Ray: the one place every stage that needs a cluster gets it from.

``init_ray`` joins the configured cluster (``resources.ray_address``, else ``RAY_ADDRESS``) or starts
a private local one. It is a no-op when Ray is already initialised (a driver that called
``ray.init`` itself, or a test fixture), so each stage may call it before its first Ray call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import BuildConfig

__all__ = ["REPO_ROOT", "init_ray"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def init_ray(cfg: BuildConfig) -> str:
    """Join the cluster (``resources.ray_address`` or ``RAY_ADDRESS``) or start a local one.

    A local cluster's workers get the repository root on ``PYTHONPATH`` so they import this tree;
    a submitted job already ships it as its working_dir. Returns a description for the log.
    """
    import ray

    if ray.is_initialized():
        return "ray: already initialised"
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    if address is None:
        paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # the raylet waits this long for its agents; on a loaded machine the default is too short
        os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
        # a private local cluster (never a stale one from /tmp/ray): no dashboard, starts faster
        ray.init(address="local", log_to_driver=True, configure_logging=False, include_dashboard=False)
    else:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    resources = ray.cluster_resources()
    where = f"cluster at {address}" if address else "local cluster"
    return f"ray: {where}, {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"
