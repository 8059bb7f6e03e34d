"""A seeded, failure-injecting fsspec filesystem wrapping another one, for storage-fault tests.

``FlakyFileSystem(target_protocol="file", fail_rate=0.2, seed=3, slow_s=0.05)`` forwards every
call to a filesystem of ``target_protocol`` (built from ``target_options``). Before a call it fails
a seeded fraction ``fail_rate`` of calls with ConnectionError (the request never reached the
storage), never more than ``max_consecutive`` times in a row on one path when that is set, so a
caller that retries enough always gets through. ``fail_paths`` (a regular expression) fails every call on a
matching path, always: a storage that is down for those files. ``slow_s`` delays every write.

Because it is built from plain arguments it works as a URL: after :func:`register`,
``flaky:///tmp/run`` with ``storage_options={"fail_rate": 0.2, "seed": 3}`` is a run store, also
in Ray workers when :func:`register` is their ``worker_process_setup_hook``.
"""

from __future__ import annotations

import io
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

__all__ = ["FlakyFileSystem", "register"]

WRITES = frozenset({"pipe", "rm", "makedirs", "mv"})


def register() -> None:
    """Make ``flaky://`` URLs resolve to :class:`FlakyFileSystem` in this process."""
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


class FlakyFileSystem(AbstractFileSystem):
    """Wraps a ``target_protocol`` filesystem; fails a seeded fraction of calls with ConnectionError."""

    protocol = "flaky"
    cachable = False
    root_marker = "/"

    def __init__(
        self,
        target_protocol: str = "file",
        target_options: dict[str, Any] | None = None,
        *,
        fail_rate: float = 0.0,
        seed: int = 0,
        slow_s: float = 0.0,
        max_consecutive: int | None = None,
        fail_paths: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.target = fsspec.filesystem(target_protocol, **(target_options or {}))
        self.fail_rate, self.slow_s, self.max_consecutive = fail_rate, slow_s, max_consecutive
        self.fail_paths = re.compile(fail_paths) if fail_paths else None
        self.faults: list[tuple[str, str]] = []  # (op, path) of every injected failure
        self._rng, self._lock = random.Random(seed), threading.Lock()
        self._in_a_row: dict[str, int] = {}  # failures in a row per path

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = str(path)
        path = path[len("flaky://") :] if path.startswith("flaky://") else path
        return path.rstrip("/") or "/"

    # -- fault injection ------------------------------------------------------------------------

    def _fails(self, path: str) -> bool:
        if self.fail_paths is not None and self.fail_paths.search(path):
            return True
        with self._lock:
            fail = self.fail_rate > 0 and self._rng.random() < self.fail_rate
            in_a_row = self._in_a_row.get(path, 0)
            if fail and self.max_consecutive is not None and in_a_row >= self.max_consecutive:
                fail = False
            self._in_a_row[path] = in_a_row + 1 if fail else 0
            return fail

    def _call(self, op: str, path: str, fn: Callable[[], Any]) -> Any:
        if self._fails(path):
            self.faults.append((op, path))
            raise ConnectionError(f"injected: connection reset during {op} {path}")
        if op in WRITES and self.slow_s:
            time.sleep(self.slow_s)
        return fn()

    # -- forwarded calls ------------------------------------------------------------------------

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" in mode:
            return io.BytesIO(self.cat_file(path))
        if mode != "wb":
            raise NotImplementedError(f"mode {mode!r}")
        return _Writer(self, path)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        return self._call("cat", path, lambda: self.target.cat_file(path, start=start, end=end, **kwargs))

    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> None:
        self._call("pipe", path, lambda: self.target.pipe_file(path, value, **kwargs))

    def exists(self, path: str, **kwargs: Any) -> bool:
        return self._call("exists", path, lambda: self.target.exists(path))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        return self._call("ls", path, lambda: self.target.ls(path, detail=detail, **kwargs))

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._call("info", path, lambda: self.target.info(path, **kwargs))

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        self._call("mv", path1, lambda: self.target.mv(path1, path2, **kwargs))

    def rm_file(self, path: str) -> None:
        self._call("rm", path, lambda: self.target.rm_file(path))

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        self._call("rm", str(path), lambda: self.target.rm(path, recursive=recursive, maxdepth=maxdepth))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._call("makedirs", path, lambda: self.target.makedirs(path, exist_ok=exist_ok))

    def invalidate_cache(self, path: str | None = None) -> None:
        self.target.invalidate_cache(path)


class _Writer(io.BytesIO):
    """A file open for writing: its bytes go to the target in one call on close."""

    def __init__(self, fs: FlakyFileSystem, path: str) -> None:
        super().__init__()
        self.fs, self.path = fs, path

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            self.fs.pipe_file(self.path, data)
