"""Joining or starting Ray: the one place every stage that needs a cluster gets it from.

``init_ray`` joins the configured cluster (``resources.ray_address``, else ``RAY_ADDRESS``) or starts
a private local one. It is a no-op when Ray is already initialised (a driver that called
``ray.init`` itself, or a test fixture), so each stage may call it before its first Ray call.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import BuildConfig

__all__ = ["QUIET_ENV", "REPO_ROOT", "init_ray", "verbose_default"]

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Environment of a quiet build (set before Ray starts; ``--verbose`` / ``HSPACE_VERBOSE=1`` keeps
#: Ray's defaults): Ray Data's INFO progress lines and the workers' ``torch.jit.script``
#: deprecation warnings stay off the terminal. A quiet build also leaves ``log_to_driver`` off: the
#: workers', raylet's and GCS's output stays in the session's log files (a failed task still raises
#: in the driver with its traceback).
QUIET_ENV = {
    "RAY_DATA_LOG_LEVEL": "WARNING",
    "PYTHONWARNINGS": "ignore:`torch.jit.script` is deprecated:FutureWarning",
}


def verbose_default() -> bool:
    """``HSPACE_VERBOSE`` set to anything but empty / 0: keep Ray's own log output."""
    return os.environ.get("HSPACE_VERBOSE", "").strip().lower() not in ("", "0", "false", "no")


def _quiet_environment() -> None:
    """Apply :data:`QUIET_ENV` (a user's own settings win; warning filters are appended)."""
    for key, value in QUIET_ENV.items():
        current = os.environ.get(key)
        if key == "PYTHONWARNINGS" and current and value not in current:
            os.environ[key] = f"{current},{value}"
        elif not current:
            os.environ[key] = value


def init_ray(cfg: BuildConfig, *, verbose: bool | None = None) -> str:
    """Join the cluster (``resources.ray_address`` or ``RAY_ADDRESS``) or start a local one.

    A local cluster's workers get the repository root on ``PYTHONPATH`` so they import this tree;
    a submitted job already ships it as its working_dir. Unless ``verbose`` (default
    :func:`verbose_default`), Ray's own log output is kept quiet (:data:`QUIET_ENV`). Returns a
    description for the log.
    """
    quiet = not (verbose_default() if verbose is None else verbose)
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
        if quiet:
            _quiet_environment()  # inherited by the cluster's processes
            # the notice that token authentication is on (Ray's default for a local cluster)
            logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
        # a private local cluster (never a stale one from /tmp/ray): no dashboard, starts faster
        ray.init(address="local", log_to_driver=not quiet, configure_logging=False, include_dashboard=False)
    else:
        ray.init(address=address, log_to_driver=not quiet, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    resources = ray.cluster_resources()
    where = f"cluster at {address}" if address else "local cluster"
    return f"ray: {where}, {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"
