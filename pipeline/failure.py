"""What a failed build tells its user: one ``Error:`` line, one ``Hint:`` line, an exit status.

A block that fails inside a Ray task or a Ray Data actor reaches the driver wrapped in Ray's
``RayTaskError`` (and Ray Data's ``UserCodeException``), whose text is the whole remote traceback.
:func:`root_cause` unwraps those wrappers down to the error the stage raised (which names the
block or file), :class:`BuildFailure` pairs it with the stage it came from, and the build's
command line prints :meth:`BuildFailure.error_line` and :meth:`BuildFailure.hint_line` while the
full chain goes to the build's log file.

Exit status: :data:`USER_ERROR_EXIT_CODE` (2) when the user can fix the input (a bad config, a
corrupt or foreign file in the run, a run store that refuses the config's settings), else
:data:`INFRASTRUCTURE_EXIT_CODE` (1): nodes or workers lost, resources missing, storage failing
after its retries. Running the same build again after an infrastructure failure continues it.
"""

from __future__ import annotations

import traceback
from typing import Any

from pipeline.config import CONFIG_ERROR_EXIT_CODE, ConfigError
from pipeline.run_format import CorruptShardError

__all__ = [
    "INFRASTRUCTURE_EXIT_CODE",
    "USER_ERROR_EXIT_CODE",
    "BuildFailure",
    "CapacityError",
    "describe_resources",
    "is_user_error",
    "root_cause",
    "write_chain",
]

USER_ERROR_EXIT_CODE = CONFIG_ERROR_EXIT_CODE
INFRASTRUCTURE_EXIT_CODE = 1
#: The longest ``Error:`` line printed; the full message is in the log file.
MAX_LINE = 600


class CapacityError(RuntimeError):
    """A stage needs resources that no live node of the cluster has (raised after the stage's
    capacity timeout, naming the demand and what the cluster has)."""


def _wrappers() -> tuple[type[BaseException], ...]:
    try:
        import ray.exceptions
    except ImportError:  # pragma: no cover - ray is a dependency of the pipeline
        return ()
    found: list[type[BaseException]] = [ray.exceptions.RayTaskError]
    try:
        from ray.exceptions import UserCodeException  # Ray Data's wrapper of a UDF's error
    except ImportError:
        try:
            from ray.data.exceptions import UserCodeException
        except ImportError:
            UserCodeException = None  # type: ignore[assignment,misc]  # noqa: N806
    if UserCodeException is not None:
        found.append(UserCodeException)
    return tuple(found)


def root_cause(error: BaseException) -> BaseException:
    """The error a stage raised, with Ray's task and Ray Data's user-code wrappers taken off.

    ``RayTaskError.cause`` holds the remote error; a ``UserCodeException`` carries it as its
    ``__cause__``. Any other error is its own root cause (its ``__cause__`` is detail, not the
    message).
    """
    wrappers = _wrappers()
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        if not wrappers or not isinstance(error, wrappers):
            break
        inner = getattr(error, "cause", None)
        if not isinstance(inner, BaseException):
            inner = error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    return error


def is_user_error(error: BaseException) -> bool:
    """True for what the user fixes in the input: a bad config or value, a corrupt or foreign
    file, a missing input file, a run store that refuses the settings (all ``ValueError``,
    ``CorruptShardError`` or ``FileNotFoundError`` in this package and hspace). Lost nodes,
    missing resources, storage errors after the retries and anything unexpected are not."""
    if isinstance(error, CapacityError):
        return False
    return isinstance(error, ValueError | CorruptShardError | FileNotFoundError)


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 3] + "..."


class BuildFailure(Exception):
    """A stage of the build failed: the stage, the unwrapped cause, the exit status, the log."""

    def __init__(self, stage: str, error: BaseException, log_path: str | None = None) -> None:
        self.stage = stage
        self.error = error
        self.cause = root_cause(error)
        self.log_path = log_path
        super().__init__(self.error_line())

    @property
    def exit_code(self) -> int:
        return USER_ERROR_EXIT_CODE if is_user_error(self.cause) else INFRASTRUCTURE_EXIT_CODE

    def error_line(self) -> str:
        """``<stage> stage failed: <ErrorType>: <message naming the block or file>`` on one line,
        with the notes the stage added to the error (which seed block, which step group)."""
        message = str(self.cause) or "(no message)"
        notes = [str(n) for n in getattr(self.cause, "__notes__", ()) if str(n) not in message]
        if notes:
            message += " (" + "; ".join(notes) + ")"
        if isinstance(self.cause, ConfigError | CapacityError):
            return _one_line(f"{self.stage} stage failed: {message}")
        return _one_line(f"{self.stage} stage failed: {type(self.cause).__name__}: {message}")

    def hint_line(self) -> str:
        """What to do about it, and where the full error is."""
        where = f"; the full error is in {self.log_path}" if self.log_path else ""
        return _hint(self.cause) + where


def _hint(cause: BaseException) -> str:
    import ray.exceptions

    if isinstance(cause, ConfigError):
        return "fix the field named above; --dry-run checks a config without doing any work"
    if isinstance(cause, CorruptShardError):
        return (
            "the file named above is damaged or was not written by this build: delete the run "
            "(storage.run_url) or give a new storage.run_url, and build again"
        )
    if isinstance(cause, FileNotFoundError):
        return "the file named above is missing: check the config's paths and URLs (--dry-run probes them)"
    if isinstance(cause, ValueError):
        return "fix the input or setting named above (--dry-run checks a config without doing any work)"
    if isinstance(cause, CapacityError):
        return (
            "add nodes with the missing resources, or lower resources.workers / num_cpus_per_worker / "
            "num_gpus_per_worker (or pca.num_cpus_per_actor); --capacity-timeout sets how long a stage waits"
        )
    if isinstance(cause, ray.exceptions.RayError):
        return (
            "a Ray node or worker was lost: run the same build again; finished blocks and PCA "
            "checkpoints are kept and only the rest is redone"
        )
    if isinstance(cause, OSError):
        return (
            "the storage failed after its retries: check that storage.run_url / catalog.url answer and "
            "run the same build again; finished blocks are kept"
        )
    return "run the same build again; finished blocks and PCA checkpoints are kept"


def write_chain(failure: BuildFailure, path: str) -> None:
    """Append the failure's whole chain (Ray's remote tracebacks included) to the log at ``path``."""
    text = "".join(traceback.format_exception(failure.error))
    with open(path, "a", encoding="utf-8", errors="backslashreplace") as f:
        f.write(f"\n== build failed in the {failure.stage} stage\n{text}")


def describe_resources(resources: dict[str, Any]) -> str:
    """``{CPU: 1, GPU: 0.5}``: a resource dict as the error messages print it (memory left out)."""
    shown = {k: v for k, v in resources.items() if not k.startswith(("node:", "memory", "object_store"))}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"
