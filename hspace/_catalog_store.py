"""Storage primitives of the direction catalog: atomic writes, exclusive create, ref locks,
compare-and-swap and retries on any fsspec filesystem (the guarantees per backend are listed in
:mod:`hspace.catalog`).

Private to :mod:`hspace.catalog`: the catalog's logic (layout, manifests, refs, gc) lives there;
this module only knows paths and bytes.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

T = TypeVar("T")

# Errors worth another try: the request may not have reached the storage, or its answer was lost.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)


class LockHeldError(Exception):
    """A ref lock stayed held by another writer for longer than the lock timeout."""


class LockLostError(Exception):
    """The lock was broken by another writer (we held it past the timeout): nothing was written."""


class CasConflictError(Exception):
    """A compare-and-swap kept losing to other writers for every attempt."""


def mtime(info: Mapping[str, Any]) -> float | None:
    """Modification time (epoch seconds) from an fsspec info dict of any backend, if it has one."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, _dt.datetime):
            return (v if v.tzinfo else v.replace(tzinfo=_dt.timezone.utc)).timestamp()
        if isinstance(v, (int, float)):
            return float(v)
        try:
            return _dt.datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return None


# memory:// lives in this process: its exclusive creates and ref locks use process-wide locks.
_MEMORY_GUARD = threading.Lock()
_MEMORY_LOCKS: dict[tuple[int, str], threading.Lock] = {}


def _memory_lock(fs: MemoryFileSystem, path: str) -> threading.Lock:
    with _MEMORY_GUARD:
        return _MEMORY_LOCKS.setdefault((id(fs.store), path), threading.Lock())


class Store:
    """Byte-level access to one fsspec filesystem with the atomicity the catalog relies on.

    ``retries`` / ``backoff_s``: a write (or read) failing with a transient error (ConnectionError,
    TimeoutError) is tried again up to ``retries`` more times, waiting ``backoff_s * 2**attempt``.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        *,
        lock_timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.1,
    ) -> None:
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if not isinstance(backoff_s, (int, float)) or backoff_s < 0:
            raise ValueError(f"backoff_s must be a number >= 0, got {backoff_s!r}")
        self.fs = fs
        self.lock_timeout_s = lock_timeout_s
        self.retries, self.backoff_s = retries, float(backoff_s)
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self.is_s3 = any(p in ("s3", "s3a") for p in protocols)
        self.is_local = isinstance(fs, LocalFileSystem)
        self.is_memory = isinstance(fs, MemoryFileSystem)

    # -------------------------------------------------------------- retries
    def retry(self, call: Callable[[], T], *, on_retry: Callable[[], None] | None = None) -> T:
        """``call()``, tried again after a transient error up to ``retries`` times."""
        for attempt in range(self.retries + 1):
            try:
                return call()
            except TRANSIENT_ERRORS:
                if attempt == self.retries:
                    raise
            time.sleep(self.backoff_s * 2**attempt)
            if on_retry is not None:
                on_retry()
            self.fs.invalidate_cache()
        raise AssertionError("unreachable")

    # -------------------------------------------------------------- files
    def create_exclusive(self, path: str, data: bytes) -> None:
        """Create ``path`` with ``data`` only if it does not exist (FileExistsError otherwise)."""
        if self.is_local:
            local = self.fs._strip_protocol(path)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            tmp = f"{local}~tmp-{secrets.token_hex(4)}"
            with fsspec.open(tmp, "wb") as f:  # a complete file before it becomes visible
                f.write(data)
            try:
                os.link(tmp, local)  # atomic, fails if the target exists
                return
            except FileExistsError:
                raise
            except OSError:  # filesystem without hard links: fall back to O_EXCL below
                pass
            finally:
                os.unlink(tmp)
        if self.is_memory:  # fsspec checks and creates: make that one step within the process
            with _memory_lock(self.fs, ""):
                self._open_exclusive(path, data)
            return
        self._open_exclusive(path, data)

    def _open_exclusive(self, path: str, data: bytes) -> None:
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
        except (ValueError, NotImplementedError):  # backend without "x" mode: best effort
            if self.fs.exists(path):
                raise FileExistsError(path) from None
            self.fs.pipe_file(path, data)

    def create_exclusive_retrying(self, path: str, data: bytes) -> None:
        """:meth:`create_exclusive` with retries. A retry that finds the file with exactly ``data``
        takes it as its own earlier attempt (whose answer was lost) and succeeds."""
        tried = []

        def attempt() -> None:
            try:
                self.create_exclusive(path, data)
            except FileExistsError:
                if tried and self.read_raw(path)[0] == data:
                    return
                raise

        self.retry(attempt, on_retry=lambda: tried.append(True))

    def replace_file(self, path: str, data: bytes) -> None:
        """Overwrite ``path`` so readers see the old or the new bytes, never a partial file."""
        if self.is_local:
            local = self.fs._strip_protocol(path)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            tmp = f"{local}~tmp-{secrets.token_hex(4)}"
            with fsspec.open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, local)
        else:
            self.fs.pipe_file(path, data)

    def read_raw(self, path: str) -> tuple[bytes | None, str | None]:
        """File bytes and, on S3, the ETag they were read with (both None if the file does not exist)."""
        if self.is_s3:
            from fsspec.asyn import sync

            bucket, key, _ = self.fs.split_path(path)

            async def _get() -> tuple[bytes, str]:
                resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
                try:
                    return await resp["Body"].read(), resp["ETag"]
                finally:
                    resp["Body"].close()

            try:
                return sync(self.fs.loop, _get)
            except FileNotFoundError:
                return None, None
        try:
            return self.fs.cat_file(path), None
        except FileNotFoundError:
            return None, None

    def remove_file(self, path: str) -> bool:
        """Remove one file; False if it was already gone (another remover got there first)."""
        try:
            self.retry(lambda: self.fs.rm_file(path))
            return True
        except FileNotFoundError:
            return False

    def remove_tree(self, path: str) -> None:
        """Remove a directory and everything below it, tolerating files removed meanwhile."""
        try:
            files = self.fs.find(path)
        except FileNotFoundError:
            files = []
        for f in files:
            self.remove_file(f)
        if self.is_local:  # directories are real only on local disks
            local = self.fs._strip_protocol(path)
            for dirpath, _, _ in sorted(os.walk(local), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(dirpath)
                except OSError:  # not empty (a new file) or already gone
                    pass
        else:
            try:
                self.fs.rm(path, recursive=True)
            except (FileNotFoundError, OSError):
                pass
        self.fs.invalidate_cache()

    # -------------------------------------------------------------- compare-and-swap
    def compare_and_swap(
        self, path: str, update: Callable[[bytes | None], bytes | None], attempts: int = 8
    ) -> bool:
        """Replace the bytes at ``path`` with ``update(current)`` atomically against other writers.

        ``update`` gets the current bytes (None: no file) and returns the new bytes, or None to
        leave the file alone (then False is returned). It may be called again after a conflict.
        Raises CasConflictError if every attempt lost, LockHeldError if a lock stayed held,
        LockLostError if the lock was broken while held (nothing written by this call).
        """
        for attempt in range(attempts):
            written = self._cas_s3(path, update) if self.is_s3 else self._cas_locked(path, update)
            if written is not None:
                return written
            time.sleep(min(0.05 * 2**attempt, 1.0))
        raise CasConflictError(f"{path} kept changing ({attempts} tries)")

    def _cas_s3(self, path: str, update: Callable[[bytes | None], bytes | None]) -> bool | None:
        """One server-side CAS round: If-Match the ETag read (If-None-Match for a new file)."""
        data, etag = self.read_raw(path)
        body = update(data)
        if body is None:
            return False
        try:
            if etag is None:
                self.fs.pipe_file(path, body, mode="create")
            else:
                self.fs.pipe_file(path, body, IfMatch=etag)
            return True
        except (FileExistsError, FileNotFoundError):
            return None  # created or deleted meanwhile: re-read and retry
        except OSError as err:  # 412 PreconditionFailed / 409 ConditionalRequestConflict
            if err.errno != errno.EINVAL and "ConditionalRequestConflict" not in str(err):
                raise
            return None

    def _cas_locked(self, path: str, update: Callable[[bytes | None], bytes | None]) -> bool | None:
        """One CAS round under the ref's lock; the lock's ownership is checked right before writing."""
        with self.lock(path) as lock:
            data, _ = self.read_raw(path)
            body = update(data)
            if body is None:
                return False
            lock.check_owned()
            self.replace_file(path, body)
            if self.read_raw(path)[0] == body:
                return True
        return None

    def lock(self, path: str) -> RefLock | LocalLock | MemoryLock:
        """The lock guarding read-modify-write of ``path`` (a lock file ``<path>~lock`` except in memory)."""
        if self.is_local and _has_flock():
            return LocalLock(self, f"{path}~lock")
        if self.is_memory:
            return MemoryLock(self, path)
        return RefLock(self, f"{path}~lock")


def _has_flock() -> bool:
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - not POSIX
        return False
    return True


class LocalLock:
    """``flock`` on ``<ref>~lock``: held while its holder lives (the kernel releases it when the
    process dies), so a stalled holder is never overtaken and no stale-lock timeout exists."""

    def __init__(self, store: Store, path: str) -> None:
        self.store, self.path = store, store.fs._strip_protocol(path)
        self.fd: int | None = None

    def __enter__(self) -> LocalLock:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        deadline, delay = time.monotonic() + self.store.lock_timeout_s, 0.005
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise LockHeldError(
                        f"ref lock {self.path} is held by another writer (waited {self.store.lock_timeout_s} s)"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
                continue
            try:  # the previous holder unlinks the file before unlocking: lock the file now at path
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return self
            os.close(fd)

    def check_owned(self) -> None:
        """Always owned: nobody can break an flock held by a live process."""

    def __exit__(self, *exc: object) -> None:
        import fcntl

        assert self.fd is not None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


class MemoryLock:
    """A process-wide lock per ``memory://`` path (the filesystem lives in this process)."""

    def __init__(self, store: Store, path: str) -> None:
        self.store, self.lock = store, _memory_lock(store.fs, path)
        self.path = path

    def __enter__(self) -> MemoryLock:
        if not self.lock.acquire(timeout=max(self.store.lock_timeout_s, 0.0)):
            raise LockHeldError(
                f"ref lock for {self.path} is held by another writer (waited {self.store.lock_timeout_s} s)"
            )
        return self

    def check_owned(self) -> None:
        """Always owned: the lock is never broken."""

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


class RefLock:
    """Lock object ``<ref>~lock`` taken by exclusive create, carrying a unique token; a lock older
    than the timeout is considered stale and broken. Best effort: the holder checks the token right
    before it writes (:meth:`check_owned`), which leaves a window of one request."""

    def __init__(self, store: Store, path: str) -> None:
        self.store, self.path = store, path
        self.token = secrets.token_hex(8)

    def __enter__(self) -> RefLock:
        fs, deadline = self.store.fs, time.monotonic() + self.store.lock_timeout_s
        body = json.dumps({"token": self.token, "created": time.time()}).encode()
        delay = 0.01
        while True:
            try:
                self.store.create_exclusive_retrying(self.path, body)
                return self
            except FileExistsError:
                pass
            stale = self._stale_content()
            if stale is not None:
                try:  # re-check right before removing, so a lock just re-taken is left alone
                    if fs.cat_file(self.path) == stale:
                        fs.rm_file(self.path)
                except FileNotFoundError:
                    pass
                continue
            if time.monotonic() > deadline:
                raise LockHeldError(
                    f"ref lock {self.path} is held by another writer (waited {self.store.lock_timeout_s} s)"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _token_now(self) -> str | None:
        try:
            return json.loads(self.store.fs.cat_file(self.path)).get("token")
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None

    def check_owned(self) -> None:
        """Raise LockLostError if another writer broke this lock (we held it past the timeout)."""
        if self._token_now() != self.token:
            raise LockLostError(
                f"ref lock {self.path} was broken by another writer after {self.store.lock_timeout_s} s "
                "(this writer stalled); nothing was written"
            )

    def _stale_content(self) -> bytes | None:
        """The lock's bytes if it is older than the timeout (its holder presumably died), else None."""
        fs = self.store.fs
        try:
            data = fs.cat_file(self.path)
            try:
                created = float(json.loads(data)["created"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
                created = mtime(fs.info(self.path)) or 0.0  # half-written lock: use its mtime
        except FileNotFoundError:
            return None
        return data if time.time() - created > self.store.lock_timeout_s else None

    def __exit__(self, *exc: object) -> None:
        try:
            if self.store.retry(self._token_now) == self.token:
                self.store.remove_file(self.path)
        except OSError:  # storage unreachable: the lock goes stale after the timeout
            pass
