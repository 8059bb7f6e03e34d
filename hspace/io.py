"""Bytes, JSON and safetensors on fsspec URLs: the file access every part of hspace shares.

Any fsspec URL works (local paths, ``file://``, ``s3://``, ``memory://``); ``storage_options``
are passed to the filesystem. Tensors are only ever read from safetensors (never pickle), and a
file that is not one fails with a ValueError naming it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "read_bytes",
    "read_json",
    "read_safetensors",
    "safetensors_from_bytes",
    "write_bytes",
]


def write_bytes(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write bytes to an fsspec URL, creating parent folders."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """Read the bytes at an fsspec URL; FileNotFoundError names the URL when missing."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    if not fs.exists(path):
        raise FileNotFoundError(f"no such file: {url}")
    with fs.open(path, "rb") as f:
        return f.read()


def read_json(
    url: str | Path, storage_options: Mapping[str, Any] | None = None, *, missing_ok: bool = False
) -> Any:
    """The JSON document at a local path or fsspec URL; None for a missing file when ``missing_ok``."""
    try:
        data = read_bytes(str(url), storage_options)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    return json.loads(data)


def read_safetensors(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file on an fsspec URL."""
    return safetensors_from_bytes(read_bytes(url, storage_options), url)


def safetensors_from_bytes(data: bytes, what: str = "<bytes>") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Parse safetensors bytes into (tensors, metadata); the header is plain JSON.

    ``what`` (a file name or URL) is named in the ValueError raised for bytes that are not safetensors.
    """
    from safetensors.torch import load

    if len(data) < 8:
        raise ValueError(f"{what}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"{what}: not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{what}: not a safetensors file (header is not JSON)") from None
    metadata = header.get("__metadata__") or {}
    return load(data), dict(metadata)
