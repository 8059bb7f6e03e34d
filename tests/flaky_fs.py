"""A seeded, failure-injecting fsspec filesystem that wraps another one, for storage-fault tests.

``FlakyFileSystem(target, fail_rate=0.2, lost_rate=0.1, seed=3)`` forwards every call to
``target`` (a filesystem, or one built from ``target_protocol`` and ``target_options``). Before a
call it fails a seeded fraction ``fail_rate`` of calls with ConnectionError (the request never
reached the storage); after a write it fails a fraction ``lost_rate`` (the
write happened, its answer was lost). ``fail_if(op, path)`` / ``lose_if(op, path)`` do the same
for chosen calls, deterministically; ``write_delay_s`` (or ``slow_s``) slows every write down. Every
injected fault is recorded in ``faults``. ``max_consecutive`` caps the seeded failures in a row on
one path (a caller that retries enough always gets through); ``fail_paths`` (a regular expression)
fails every call on a matching path (storage that is down for those files). ``strict_exists``
makes ``exists`` raise an injected failure instead of answering False (fsspec's default).

Built from plain arguments it also works as a URL: after :func:`register`, ``flaky:///tmp/run``
with ``storage_options={"fail_rate": 0.2, "seed": 3}`` wraps the local directory, also in Ray
workers when :func:`register` is their ``worker_process_setup_hook``.

The catalog sees an unknown filesystem (protocol ``flaky``), so it uses its generic code paths:
``"xb"`` exclusive create and token lock files.
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

WRITES = frozenset({"create", "pipe", "rm_file", "rm", "makedirs", "mv"})


def register() -> None:
    """Make ``flaky://`` URLs resolve to :class:`FlakyFileSystem` in this process."""
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


class FlakyFileSystem(AbstractFileSystem):
    """Wraps ``target``; fails a seeded fraction of calls with ConnectionError."""

    protocol = "flaky"
    cachable = False
    root_marker = ""

    def __init__(
        self,
        target: AbstractFileSystem | None = None,
        *,
        target_protocol: str = "file",
        target_options: dict[str, Any] | None = None,
        fail_rate: float = 0.0,
        lost_rate: float = 0.0,
        seed: int = 0,
        write_delay_s: float = 0.0,
        slow_s: float = 0.0,
        max_consecutive: int | None = None,
        fail_paths: str | None = None,
        strict_exists: bool = False,
        fail_if: Callable[[str, str], bool] | None = None,
        lose_if: Callable[[str, str], bool] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.target = (
            target if target is not None else fsspec.filesystem(target_protocol, **(target_options or {}))
        )
        self.fail_rate, self.lost_rate = fail_rate, lost_rate
        self.write_delay_s = max(write_delay_s, slow_s)
        self.max_consecutive, self.strict_exists = max_consecutive, strict_exists
        self.fail_paths = re.compile(fail_paths) if fail_paths else None
        self._in_a_row: dict[str, int] = {}  # seeded failures in a row per path
        self.fail_if, self.lose_if = fail_if, lose_if
        self.faults: list[tuple[str, str, str]] = []  # (when, op, path)
        self._rng, self._lock = random.Random(seed), threading.Lock()

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = str(path)
        return path[len("flaky://") :] if path.startswith("flaky://") else path

    # -------------------------------------------------------------- fault injection
    def _draw(self, rate: float) -> bool:
        with self._lock:
            return rate > 0 and self._rng.random() < rate

    def _seeded_failure(self, path: str) -> bool:
        fail = self._draw(self.fail_rate)
        with self._lock:
            in_a_row = self._in_a_row.get(path, 0)
            if fail and self.max_consecutive is not None and in_a_row >= self.max_consecutive:
                fail = False
            self._in_a_row[path] = in_a_row + 1 if fail else 0
        return fail

    def _before(self, op: str, path: str) -> None:
        chosen = (self.fail_if is not None and self.fail_if(op, path)) or (
            self.fail_paths is not None and self.fail_paths.search(path) is not None
        )
        if chosen or self._seeded_failure(path):
            self.faults.append(("before", op, path))
            raise ConnectionError(f"injected: connection reset before {op} {path}")
        if op in WRITES and self.write_delay_s:
            time.sleep(self.write_delay_s)

    def _after(self, op: str, path: str) -> None:
        if op in WRITES and (
            (self.lose_if is not None and self.lose_if(op, path)) or self._draw(self.lost_rate)
        ):
            self.faults.append(("after", op, path))
            raise ConnectionError(f"injected: answer to {op} {path} lost")

    def _call(self, op: str, path: str, fn: Callable[[], Any]) -> Any:
        self._before(op, path)
        out = fn()
        self._after(op, path)
        return out

    # -------------------------------------------------------------- forwarded calls
    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" in mode:
            return io.BytesIO(self.cat_file(path))
        if mode not in ("wb", "xb"):
            raise NotImplementedError(f"mode {mode!r}")
        return _Writer(self, path, exclusive=mode == "xb")

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        return self._call("cat", path, lambda: self.target.cat_file(path, start=start, end=end, **kwargs))

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        op = "create" if mode == "create" else "pipe"
        self._call(op, path, lambda: self.target.pipe_file(path, value, mode=mode, **kwargs))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        return self._call("ls", path, lambda: self.target.ls(path, detail=detail, **kwargs))

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._call("info", path, lambda: self.target.info(path, **kwargs))

    def exists(self, path: str, **kwargs: Any) -> bool:
        if not self.strict_exists:
            return super().exists(path, **kwargs)  # fsspec's default: any error answers False
        return self._call("exists", path, lambda: self.target.exists(path))

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        self._call("mv", path1, lambda: self.target.mv(path1, path2, **kwargs))

    def rm_file(self, path: str) -> None:
        self._call("rm_file", path, lambda: self.target.rm_file(path))

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        self._call("rm", str(path), lambda: self.target.rm(path, recursive=recursive, maxdepth=maxdepth))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._call("makedirs", path, lambda: self.target.makedirs(path, exist_ok=exist_ok))

    def invalidate_cache(self, path: str | None = None) -> None:
        self.target.invalidate_cache(path)


class _Writer(io.BytesIO):
    """A file open for writing: its bytes go to the target in one call on close."""

    def __init__(self, fs: FlakyFileSystem, path: str, *, exclusive: bool) -> None:
        super().__init__()
        self.fs, self.path, self.exclusive = fs, path, exclusive

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            self.fs.pipe_file(self.path, data, mode="create" if self.exclusive else "overwrite")
