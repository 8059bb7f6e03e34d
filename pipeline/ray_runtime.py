"""Joining or starting Ray: the one place every stage that needs a cluster gets it from.

``init_ray`` joins the configured cluster (``resources.ray_address``, else ``RAY_ADDRESS``) or starts
a private local one. It is a no-op when Ray is already initialised (a driver that called
``ray.init`` itself, or a test fixture), so each stage may call it before its first Ray call.

:class:`CapacityWatch` is how a stage that runs actors notices that the cluster lost the capacity
to host them (every node big enough for one actor is gone): after :func:`capacity_timeout_s` it
raises :class:`~pipeline.failure.CapacityError` instead of waiting forever; :func:`iterate_watched`
applies it to a Ray Data stage's output and :func:`map_tasks_watched` to a stage of plain tasks.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from pipeline.config import BuildConfig

__all__ = [
    "CAPACITY_TIMEOUT_ENV",
    "DEFAULT_CAPACITY_TIMEOUT_S",
    "QUIET_ENV",
    "REPO_ROOT",
    "CapacityWatch",
    "actor_demand",
    "capacity_timeout_s",
    "init_ray",
    "iterate_watched",
    "map_tasks_watched",
    "verbose_default",
]

T = TypeVar("T")

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


# ---------------------------------------------------------------------------------------------
# Capacity: a stage whose actors no live node can host fails instead of waiting forever

#: How long a stage waits for a node that can host its actors (a replacement node may take a
#: while to join) before it fails with :class:`~pipeline.failure.CapacityError`. The build's
#: ``--capacity-timeout`` sets it through :data:`CAPACITY_TIMEOUT_ENV`.
DEFAULT_CAPACITY_TIMEOUT_S = 120.0
CAPACITY_TIMEOUT_ENV = "HSPACE_CAPACITY_TIMEOUT_S"


def capacity_timeout_s() -> float:
    """:data:`CAPACITY_TIMEOUT_ENV` in seconds (a positive number), else :data:`DEFAULT_CAPACITY_TIMEOUT_S`."""
    raw = os.environ.get(CAPACITY_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_CAPACITY_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{CAPACITY_TIMEOUT_ENV}={raw!r}: must be a positive number of seconds")
    return value


def actor_demand(num_cpus: float, num_gpus: float = 0.0) -> dict[str, float]:
    """The resources one actor of a stage reserves (``{CPU: 1}``, ``{CPU: 1, GPU: 0.5}``)."""
    demand = {"CPU": float(num_cpus)}
    if num_gpus:
        demand["GPU"] = float(num_gpus)
    return {k: v for k, v in demand.items() if v > 0}


class CapacityWatch:
    """Raises :class:`~pipeline.failure.CapacityError` once no live node of the cluster has had
    the total resources for one actor (or task: ``unit``) of ``stage`` for ``timeout`` seconds.

    Total, not free, resources: a node whose resources are only in use will free them when the
    work on it ends; a cluster where no node is big enough (all nodes that could were lost) never
    will. :meth:`check` is cheap to call often: it asks the GCS at most every ``poll_s`` seconds.
    """

    def __init__(
        self,
        stage: str,
        demand: dict[str, float],
        timeout: float | None = None,
        poll_s: float = 1.0,
        unit: str = "an actor",
    ) -> None:
        self.stage = stage
        self.unit = unit
        self.demand = dict(demand)
        self.timeout = capacity_timeout_s() if timeout is None else timeout
        self.poll_s = poll_s
        self._last_poll = -float("inf")
        self._missing_since: float | None = None

    def _live_nodes(self) -> list[dict[str, float]]:
        import ray

        return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]

    def _can_host(self, resources: dict[str, float]) -> bool:
        return all(resources.get(k, 0.0) >= v for k, v in self.demand.items())

    def check(self) -> None:
        """Raise CapacityError when the demand has had no host for ``timeout`` seconds."""
        now = time.monotonic()
        if now - self._last_poll < self.poll_s:
            return
        self._last_poll = now
        nodes = self._live_nodes()
        if any(self._can_host(n) for n in nodes):
            self._missing_since = None
            return
        if self._missing_since is None:
            self._missing_since = now
        if now - self._missing_since >= self.timeout:
            from pipeline.failure import CapacityError, describe_resources

            total: dict[str, float] = {}
            for n in nodes:
                for k, v in n.items():
                    total[k] = total.get(k, 0.0) + v
            per_node = ", ".join(describe_resources(n) for n in nodes) or "none"
            raise CapacityError(
                f"{self.stage}: no node can host {self.unit} needing {describe_resources(self.demand)} after "
                f"{self.timeout:g} s; the cluster has {describe_resources(total)} on {len(nodes)} live "
                f"node(s) ({per_node})"
            )


def _read_in_thread(rows: Iterable[T], name: str) -> tuple[queue.Queue[tuple[str, Any]], threading.Event]:
    """Read ``rows`` in a daemon thread into a small queue of ``("row", x)``, then ``("end", None)``
    or ``("error", e)``; setting the returned event makes the thread stop after its current row."""
    box: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=8)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for row in rows:
                if not put(("row", row)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer
            put(("error", e))

    threading.Thread(target=produce, daemon=True, name=name).start()
    return box, stop


def _capture_executors(dataset: Any) -> list[Any]:
    """The executors ``dataset`` creates from now on (Ray Data names its executor on the dataset
    only once it produced a first output; a pool that never starts an actor produces none)."""
    created: list[Any] = []
    create = getattr(dataset, "_create_executor", None)
    if create is None:
        return created

    def capture(*args: Any, **kwargs: Any) -> Any:
        executor = create(*args, **kwargs)
        created.append(executor)
        return executor

    try:
        dataset._create_executor = capture
    except AttributeError:
        pass
    return created


def _shut_down(executors: list[Any]) -> None:
    """Stop a Ray Data dataset's execution (best effort), so it stops asking for actors."""
    for executor in executors:
        try:
            executor.shutdown(force=True)
        except Exception as e:  # the stage's own error matters more
            logging.getLogger(__name__).debug("could not shut down the dataset: %s", e)


def iterate_watched(dataset: Any, rows: Iterable[T], watch: CapacityWatch) -> Iterator[T]:
    """Yield ``rows`` (an iterator over a Ray Data ``dataset``) while ``watch`` checks capacity.

    Ray Data waits without end for an actor its pool cannot place (every node that could host
    one was lost). The rows are read in a helper thread; while none arrives, ``watch.check()``
    runs, and when it raises, the dataset's execution is shut down and the error propagates.
    """
    executors = _capture_executors(dataset)
    box, stop = _read_in_thread(rows, f"hspace-{watch.stage}-rows")
    try:
        while True:
            try:
                kind, value = box.get(timeout=watch.poll_s)
            except queue.Empty:
                watch.check()
                continue
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    except BaseException:
        stop.set()
        current = getattr(dataset, "_current_executor", None)
        _shut_down([*executors, *([current] if current is not None else [])])
        raise


def map_tasks_watched(
    submit: Callable[[T], Any],
    items: Sequence[T],
    watch: CapacityWatch,
    *,
    in_flight: int,
    on_result: Callable[[T, Any], None],
) -> None:
    """Run ``submit(item)`` (a Ray task's ObjectRef) for every item, at most ``in_flight`` at a
    time, handing each result to ``on_result`` as it finishes (in any order).

    Plain tasks run in the cluster's pooled worker processes, so a stage of tasks starts on the
    workers the previous stage warmed (modules imported) instead of spawning actors; Ray retries a
    task whose node died. While no result arrives ``watch.check()`` runs; when it raises (no node
    can host a task any more), the tasks still pending are cancelled and the error propagates.
    """
    import ray

    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight}")
    waiting = collections.deque(items)
    pending: dict[Any, T] = {}
    try:
        while waiting or pending:
            while waiting and len(pending) < in_flight:
                item = waiting.popleft()
                pending[submit(item)] = item
            done, _ = ray.wait(list(pending), num_returns=1, timeout=watch.poll_s)
            if not done:
                watch.check()
                continue
            for ref in done:
                on_result(pending.pop(ref), ray.get(ref))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=False)
        raise
