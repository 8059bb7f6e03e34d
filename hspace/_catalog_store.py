"""Storage primitives of the direction catalog: atomic writes, exclusive create, ref locks and
compare-and-swap on any fsspec filesystem (see :mod:`hspace.catalog` for the guarantees per backend).

Private to :mod:`hspace.catalog`: the catalog's logic (layout, manifests, refs, gc) lives there;
this module only knows paths and bytes.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


class LockHeldError(Exception):
    """A ref lock stayed held by another writer for longer than the lock timeout."""


class CasConflictError(Exception):
    """A compare-and-swap kept losing to other writers for every attempt."""


def mtime(info: Mapping[str, Any]) -> float | None:
    """Modification time (epoch seconds) from an fsspec info dict of any backend, if it has one."""
    import datetime as _dt

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


class Store:
    """Byte-level access to one fsspec filesystem with the atomicity the catalog relies on."""

    def __init__(self, fs: fsspec.AbstractFileSystem, *, lock_timeout_s: float = 30.0) -> None:
        self.fs = fs
        self.lock_timeout_s = lock_timeout_s
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self.is_s3 = any(p in ("s3", "s3a") for p in protocols)
        self.is_local = isinstance(fs, LocalFileSystem)

    # -------------------------------------------------------------- files
    def write_file(self, path: str, data: bytes) -> None:
        """Write (or overwrite) ``path``."""
        if self.is_local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, data)

    def create_exclusive(self, path: str, data: bytes) -> None:
        """Create ``path`` with ``data`` only if it does not exist (FileExistsError otherwise)."""
        if self.is_local:
            local = self.fs._strip_protocol(path)
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
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
        except (ValueError, NotImplementedError):  # backend without "x" mode: best effort
            if self.fs.exists(path):
                raise FileExistsError(path) from None
            self.fs.pipe_file(path, data)

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

    # -------------------------------------------------------------- compare-and-swap
    def compare_and_swap(
        self, path: str, update: Callable[[bytes | None], bytes | None], attempts: int = 8
    ) -> bool:
        """Replace the bytes at ``path`` with ``update(current)`` atomically against other writers.

        ``update`` gets the current bytes (None: no file) and returns the new bytes, or None to
        leave the file alone (then False is returned). It may be called again after a conflict.
        Raises CasConflictError if every attempt lost, LockHeldError if a lock stayed held.
        """
        for attempt in range(attempts):
            if self.is_s3:
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
                    pass  # created or deleted meanwhile: re-read and retry
                except OSError as err:  # 412 PreconditionFailed / 409 ConditionalRequestConflict
                    if err.errno != errno.EINVAL and "ConditionalRequestConflict" not in str(err):
                        raise
            else:
                with self.lock(path):
                    data, _ = self.read_raw(path)
                    body = update(data)
                    if body is None:
                        return False
                    self.replace_file(path, body)
                    if self.read_raw(path)[0] == body:
                        return True
            time.sleep(min(0.05 * 2**attempt, 1.0))
        raise CasConflictError(f"{path} kept changing ({attempts} tries)")

    def lock(self, path: str) -> RefLock:
        """The lock object ``<path>~lock`` guarding read-modify-write of ``path``."""
        return RefLock(self, f"{path}~lock")


class RefLock:
    """Lock object ``<ref>~lock`` taken by exclusive create; a stale lock is broken after a timeout."""

    def __init__(self, store: Store, path: str) -> None:
        self.store, self.path = store, path
        self.token = secrets.token_hex(8)

    def __enter__(self) -> RefLock:
        fs, deadline = self.store.fs, time.monotonic() + self.store.lock_timeout_s
        body = json.dumps({"token": self.token, "created": time.time()}).encode()
        if self.store.is_local:
            fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        delay = 0.01
        while True:
            try:
                with fs.open(self.path, "xb") as f:
                    f.write(body)
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
            if json.loads(self.store.fs.cat_file(self.path)).get("token") == self.token:
                self.store.fs.rm_file(self.path)
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            pass
