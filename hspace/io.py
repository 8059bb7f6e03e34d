"""Bytes, JSON and safetensors on fsspec URLs: the file access every part of hspace shares.

Any fsspec URL works (local paths, ``file://``, ``s3://``, ``memory://``); ``storage_options``
are passed to the filesystem. Tensors are only ever read from safetensors (never pickle); the
header is checked against the file's size (:func:`check_safetensors_header`) before the
safetensors library sees it, and a file that is not well formed fails with a ValueError naming it.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "loads_json",
    "read_bytes",
    "read_json",
    "read_safetensors",
    "check_safetensors_header",
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


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r:.80} in a JSON object")
        out[key] = value
    return out


def loads_json(data: bytes | str) -> Any:
    """``json.loads`` that refuses an object with a repeated key (ValueError naming the key).

    Parsers disagree on which of two equal keys wins, so such a document could mean one thing to
    hspace and another to a different reader of the same file; none of hspace's files has one.
    """
    return json.loads(data, object_pairs_hook=_unique_keys)


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
    return loads_json(data)


def read_safetensors(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file on an fsspec URL."""
    return safetensors_from_bytes(read_bytes(url, storage_options), url)


#: Bytes per element of every safetensors dtype that torch can hold.
SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
#: Largest header accepted (the safetensors library's own limit).
MAX_HEADER_BYTES = 100_000_000


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(what: str, name: str, entry: Any) -> tuple[int, int]:
    """(begin, end) of one tensor entry after checking its dtype, shape and byte size."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{what}: tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{what}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ValueError(f"{what}: tensor {name!r} shape {shape!r} is not a list of sizes >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise ValueError(f"{what}: tensor {name!r} data_offsets {offsets!r} are not two offsets >= 0")
    begin, end = offsets
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]  # Python ints: a huge shape cannot overflow
    if end - begin != nbytes:
        raise ValueError(
            f"{what}: tensor {name!r} of shape {shape} {dtype} needs {nbytes} bytes "
            f"but its data_offsets {offsets} span {end - begin}"
        )
    return begin, end


def check_safetensors_header(data: bytes, what: str = "<bytes>") -> dict[str, str]:
    """Validate a safetensors file's header against its size before anything is allocated.

    Checks the 8-byte little-endian header length, that the header is a JSON object, that
    ``__metadata__`` maps str to str, and that every tensor has a known dtype, a shape whose byte
    size equals its data_offsets, and that the tensors tile the data exactly (no overlap, no gap,
    nothing past the end). Returns the metadata; ValueError naming ``what`` otherwise.
    """
    if len(data) < 8:
        raise ValueError(f"{what}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, MAX_HEADER_BYTES):
        raise ValueError(
            f"{what}: not a safetensors file (header length {n} but the file has {len(data)} bytes)"
        )
    try:
        header = loads_json(data[8 : 8 + n])
    except ValueError as err:  # not JSON, not UTF-8, or a repeated key
        raise ValueError(f"{what}: not a safetensors file (header is not valid JSON: {err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{what}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError(f"{what}: __metadata__ must map strings to strings")
    spans = sorted(_check_entry(what, name, entry) for name, entry in header.items())
    size, pos = len(data) - 8 - n, 0
    for begin, end in spans:
        if begin != pos:
            problem = "overlap" if begin < pos else "leave a gap"
            raise ValueError(f"{what}: tensor data_offsets {problem} at byte {min(begin, pos)}")
        pos = end
    if pos != size:
        raise ValueError(f"{what}: tensors cover {pos} bytes but the file holds {size} bytes of data")
    return dict(metadata)


def safetensors_from_bytes(data: bytes, what: str = "<bytes>") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Parse safetensors bytes into (tensors, metadata) after :func:`check_safetensors_header`.

    ``what`` (a file name or URL) is named in the ValueError raised for bytes that are not a
    well-formed safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    metadata = check_safetensors_header(data, what)
    try:
        return load(data), metadata
    except (SafetensorError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{what}: not a valid safetensors file ({err})") from None
