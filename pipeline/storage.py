"""Run storage: activation and sample shards as parquet, and the run manifest, on any fsspec URL.

Layout under the run URL::

    _manifest.json                                   completed seed blocks and their shards
    activations/t=<step>/part-<worker>-<n>.parquet   seed int64, h fixed_size_binary(C*H*W*2)
    samples/part-<worker>-<n>.parquet                seed int64, png binary (final image)

An activation shard (run format 2) stores each row's h as one binary value: the float16 array
[C, H, W] in C order, little-endian. Every row is its own row group (zstd, no dictionary), so a
reader can fetch single rows; only ``seed`` has statistics, so the footer alone says which row
group holds which seed. The footer's key-value metadata ``hspace`` (JSON) holds what a reader
needs: ``h_shape``, ``h_dtype``, ``step``, ``timestep`` and ``row_sha256`` (sha256 of each row's
h bytes, in row order). Step and timestep are not columns (measured: as constant columns they grow
the footer by half and a write or read by a quarter); the step is also the ``t=`` directory.

A shard counts only once the manifest lists it (path, rows, bytes, sha256, and for activation
shards the sha256 of the parquet footer), so a crashed worker leaves at most an unlisted file that
a re-run overwrites or ignores. The manifest is replaced atomically (written to a temporary name,
then moved), and only the driver writes it. Full reads check every shard's size and sha256 before
parsing it; partial reads (:meth:`RunStore.read_h`) fetch only the footer, checked against the
manifest, and the wanted rows, each checked against its digest in that footer. So a truncated or
corrupt file fails loudly with its path instead of feeding garbage to the PCA or an aggregation.
Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
import time
import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hspace.io import loads_json

__all__ = [
    "ActivationFooter",
    "BlockRecord",
    "CorruptShardError",
    "ManifestError",
    "RunStore",
    "ShardInfo",
    "StepBatch",
    "activation_table",
    "footer_sha256",
    "h_rows",
    "parse_activation_footer",
    "samples_table",
]

MANIFEST_NAME = "_manifest.json"
MANIFEST_SCHEMA_VERSION = 2

#: Key of an activation shard's parquet key-value metadata (a JSON object; see the module docstring).
H_METADATA_KEY = "hspace"
#: The float16 h bytes of a row: little-endian, C order.
H_DTYPE = np.dtype("<f2")


#: Storage errors that retrying cannot fix.
_FINAL_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


class CorruptShardError(IOError):
    """A listed shard is missing, truncated, fails its checksum, holds the wrong seeds, or is not valid parquet."""


class ManifestError(CorruptShardError, ValueError):
    """The run manifest is not valid JSON of the expected shape; the message names the file and the entry."""


_SHA256_HEX = frozenset("0123456789abcdef")


def _field(d: Any, name: str, kind: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
    """``d[name]`` checked to be of ``kind`` (bool is never an int); ManifestError naming ``where.name``."""
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object, got {type(d).__name__}")
    if name not in d:
        if optional:
            return None
        raise ManifestError(f"{where}: missing {name!r}")
    value = d[name]
    if value is None and optional:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ManifestError(f"{where}.{name}: expected {names}, got {value!r:.80}")
    return value


def _count(d: Any, name: str, where: str) -> int:
    value = _field(d, name, int, where)
    if value < 0:
        raise ManifestError(f"{where}.{name}: must be >= 0, got {value}")
    return value


def _sha256_field(d: Any, name: str, where: str, optional: bool = False) -> Any:
    value = _field(d, name, str, where, optional=optional)
    if value is not None and (len(value) != 64 or not set(value) <= _SHA256_HEX):
        raise ManifestError(f"{where}.{name}: expected 64 lowercase hex digits, got {value!r:.80}")
    return value


@dataclass(frozen=True)
class ShardInfo:
    """One parquet file of the run: path relative to the run root, rows, bytes, sha256, step (or None),
    and for an activation shard the sha256 of its parquet footer (what a partial read verifies)."""

    path: str
    rows: int
    bytes: int
    sha256: str
    step: int | None = None
    footer_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "path": self.path,
            "rows": self.rows,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "step": self.step,
        }
        if self.footer_sha256 is not None:
            d["footer_sha256"] = self.footer_sha256
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "shard", footer: bool = False) -> ShardInfo:
        """Parse a manifest entry; ManifestError naming ``where`` for a missing or mistyped field.
        ``footer``: the entry must record ``footer_sha256`` (activation shards)."""
        path = _field(d, "path", str, where)
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ManifestError(f"{where}.path: must be a relative path inside the run, got {path!r:.80}")
        sha = _sha256_field(d, "sha256", where)
        step = _field(d, "step", int, where, optional=True)
        if step is not None and step < 0:
            raise ManifestError(f"{where}.step: must be >= 0, got {step}")
        footer_sha = _sha256_field(d, "footer_sha256", where, optional=not footer)
        return cls(path, _count(d, "rows", where), _count(d, "bytes", where), sha, step, footer_sha)


@dataclass(frozen=True)
class BlockRecord:
    """A completed seed block: seeds ``start .. stop - 1``, one activation shard per step, one sample shard."""

    key: str
    start: int
    stop: int
    activations: tuple[ShardInfo, ...]
    samples: ShardInfo
    extra: dict[str, Any] = field(default_factory=dict)

    def shard_for_step(self, step: int) -> ShardInfo:
        for s in self.activations:
            if s.step == step:
                return s
        raise KeyError(f"block {self.key} has no activation shard for step {step}")

    @property
    def n_seeds(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "start": self.start,
            "stop": self.stop,
            "activations": [s.to_dict() for s in self.activations],
            "samples": self.samples.to_dict(),
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "block") -> BlockRecord:
        """Parse a manifest entry strictly: every shard has a checksum and one row per seed of the block."""
        key = _field(d, "key", str, where)
        start, stop = _count(d, "start", where), _count(d, "stop", where)
        if stop <= start:
            raise ManifestError(f"{where}: empty or reversed seed range {start}..{stop}")
        raw_acts = _field(d, "activations", list, where)
        activations = tuple(
            ShardInfo.from_dict(s, f"{where}.activations[{i}]", footer=True) for i, s in enumerate(raw_acts)
        )
        samples = ShardInfo.from_dict(_field(d, "samples", dict, where), f"{where}.samples")
        steps = [s.step for s in activations]
        if None in steps:
            raise ManifestError(f"{where}.activations: every activation shard needs a step, got {steps}")
        if len(set(steps)) != len(steps):
            raise ManifestError(f"{where}.activations: duplicate steps {sorted(steps)}")  # type: ignore[type-var]
        for name, shard in [
            *((f"activations[{i}]", a) for i, a in enumerate(activations)),
            ("samples", samples),
        ]:
            if shard.rows != stop - start:
                raise ManifestError(
                    f"{where}.{name}: {shard.rows} rows for the {stop - start} seeds {start}..{stop - 1}"
                )
        extra = _field(d, "extra", dict, where, optional=True)
        return cls(key, start, stop, activations, samples, dict(extra or {}))

    @property
    def bytes(self) -> int:
        return self.samples.bytes + sum(s.bytes for s in self.activations)


@dataclass
class StepBatch:
    """Rows of one sampler step: ``seeds`` [N] int64 and ``h`` [N, C, H, W] float16."""

    step: int
    seeds: np.ndarray
    h: np.ndarray


# ---------------------------------------------------------------------------------------------
# Tables


def activation_table(seeds: Sequence[int] | np.ndarray, step: int, timestep: int, h: np.ndarray) -> pa.Table:
    """Rows of one step: ``h`` [N, C, H, W] as one ``fixed_size_binary`` value (float16 bytes) per row.

    The schema's metadata ``hspace`` carries h's shape and dtype, the step, the timestep and each
    row's sha256; the parquet writer puts it in the footer.
    """
    h = np.ascontiguousarray(np.asarray(h, dtype=H_DTYPE))
    seeds = np.asarray(seeds, dtype=np.int64)
    if h.ndim != 4 or h.shape[0] != seeds.shape[0]:
        raise ValueError(
            f"h must be [N, C, H, W] with N = len(seeds) = {seeds.shape[0]}, got {tuple(h.shape)}"
        )
    n, row_bytes = seeds.shape[0], math.prod(h.shape[1:]) * H_DTYPE.itemsize
    rows = h.reshape(n, row_bytes // H_DTYPE.itemsize).view(np.uint8)
    info = {
        "h_shape": list(h.shape[1:]),
        "h_dtype": "float16",
        "step": int(step),
        "timestep": int(timestep),
        "row_sha256": [hashlib.sha256(r).hexdigest() for r in rows],
    }
    schema = pa.schema(
        [pa.field("seed", pa.int64(), nullable=False), pa.field("h", pa.binary(row_bytes), nullable=False)],
        metadata={H_METADATA_KEY: json.dumps(info, separators=(",", ":"))},
    )
    blob = pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), n, [None, pa.py_buffer(h)])
    return pa.table([pa.array(seeds, pa.int64()), blob], schema=schema)


def samples_table(seeds: Sequence[int] | np.ndarray, pngs: Sequence[bytes]) -> pa.Table:
    """Final images of seeds as PNG bytes."""
    if len(seeds) != len(pngs):
        raise ValueError(f"{len(seeds)} seeds but {len(pngs)} images")
    return pa.table(
        {"seed": pa.array(np.asarray(seeds, np.int64), pa.int64()), "png": pa.array(pngs, pa.binary())}
    )


def _is_activation_table(table: pa.Table) -> bool:
    return H_METADATA_KEY.encode() in (table.schema.metadata or {})


def _parquet_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    """Parquet with zstd and no dictionary. An activation table gets one row per row group,
    statistics only for ``seed``, and its ``hspace`` metadata in the footer (no Arrow schema copy)."""
    buf = io.BytesIO()
    if not _is_activation_table(table):
        pq.write_table(
            table, buf, compression=compression, use_dictionary=False, row_group_size=max(1, table.num_rows)
        )
        return buf.getvalue()
    with pq.ParquetWriter(
        buf,
        table.schema.remove_metadata(),
        compression=compression,
        use_dictionary=False,
        write_statistics=["seed"],
        store_schema=False,
    ) as writer:
        writer.write_table(table.replace_schema_metadata(None), row_group_size=1)
        writer.add_key_value_metadata(table.schema.metadata)
    return buf.getvalue()


def _footer_length(tail: bytes) -> int:
    """The footer length from a parquet file's last 8 bytes; ValueError if they are not a trailer."""
    if len(tail) != 8 or tail[4:] != b"PAR1":
        raise ValueError("no parquet trailer (PAR1) at the end")
    return int.from_bytes(tail[:4], "little")


def footer_sha256(data: bytes) -> str:
    """sha256 of a parquet file's footer (the serialized FileMetaData before the 8-byte trailer)."""
    n = _footer_length(data[-8:])
    return hashlib.sha256(data[len(data) - 8 - n : len(data) - 8]).hexdigest()


@dataclass(frozen=True)
class ActivationFooter:
    """What an activation shard's footer says: its parsed metadata, each row's seed (from the
    ``seed`` statistics, row order), h's shape, the step and timestep, and each row's h sha256."""

    metadata: pq.FileMetaData
    seeds: np.ndarray
    h_shape: tuple[int, ...]
    step: int
    timestep: int
    row_sha256: tuple[str, ...]

    def h_range(self, row: int) -> tuple[int, int]:
        """Byte range [start, end) of row ``row``'s h column chunk in the file."""
        col = self.metadata.row_group(row).column(1)
        start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
        return start, start + col.total_compressed_size


def _footer_info(md: pq.FileMetaData) -> dict[str, Any]:
    raw = (md.metadata or {}).get(H_METADATA_KEY.encode())
    if raw is None:
        raise ValueError(f"no {H_METADATA_KEY!r} key-value metadata (not a run-format-2 activation shard)")
    info = json.loads(raw)
    if not isinstance(info, dict):
        raise ValueError(f"malformed {H_METADATA_KEY!r} metadata: {raw[:120]!r}")
    shape, digests = info.get("h_shape"), info.get("row_sha256")
    ok = (
        info.get("h_dtype") == "float16"
        and isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(d, int) and d > 0 for d in shape)
        and all(isinstance(info.get(k), int) for k in ("step", "timestep"))
        and isinstance(digests, list)
        and all(isinstance(d, str) and len(d) == 64 for d in digests)
    )
    if not ok:
        raise ValueError(f"malformed {H_METADATA_KEY!r} metadata: {raw[:120]!r}")
    return info


def parse_activation_footer(md: pq.FileMetaData) -> ActivationFooter:
    """Check an activation shard's footer for the run format; ValueError saying what is wrong."""
    info = _footer_info(md)
    shape = tuple(info["h_shape"])
    schema = md.schema
    names = [schema.column(i).name for i in range(len(schema))]
    width = math.prod(shape) * H_DTYPE.itemsize
    if names != ["seed", "h"] or schema.column(1).physical_type != "FIXED_LEN_BYTE_ARRAY":
        raise ValueError(f"columns {names}, expected seed and h (fixed-size binary)")
    if schema.column(1).length != width:
        raise ValueError(f"h is {schema.column(1).length} bytes per row, h_shape {list(shape)} needs {width}")
    n = md.num_rows
    if md.num_row_groups != n or len(info["row_sha256"]) != n:
        raise ValueError(
            f"{n} rows in {md.num_row_groups} row groups with {len(info['row_sha256'])} row digests; "
            "expected one row per row group and one digest per row"
        )
    seeds = np.empty(n, np.int64)
    for i in range(n):
        rg = md.row_group(i)
        stats = rg.column(0).statistics
        if rg.num_rows != 1 or stats is None or not stats.has_min_max or stats.min != stats.max:
            raise ValueError(f"row group {i} does not hold exactly one row with its seed in the statistics")
        seeds[i] = stats.min
    return ActivationFooter(md, seeds, shape, info["step"], info["timestep"], tuple(info["row_sha256"]))


def h_rows(column: pa.Array | pa.ChunkedArray, h_shape: Sequence[int]) -> np.ndarray:
    """A ``fixed_size_binary`` h column -> float16 [N, *h_shape], one copy at most (chunks combined)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width, need = arr.type.byte_width, math.prod(h_shape) * H_DTYPE.itemsize
    if width != need:
        raise ValueError(f"h is {width} bytes per row; float16 of h_shape {list(h_shape)} is {need}")
    data = arr.buffers()[1]
    count = len(arr) * width // H_DTYPE.itemsize
    if count == 0:
        return np.empty((0, *h_shape), np.float16)
    flat = np.frombuffer(data, dtype=H_DTYPE, count=count, offset=arr.offset * width)
    return flat.astype(np.float16, copy=False).reshape(len(arr), *h_shape)


class _PrefetchedFile(io.RawIOBase):
    """A read-only file of ``size`` bytes that serves only prefetched ranges; any other read raises,
    so pyarrow cannot silently read (or be handed) bytes that were not fetched and verified."""

    def __init__(self, size: int, ranges: dict[int, bytes]) -> None:
        self._size, self._pos = size, 0
        self._starts = sorted(ranges)
        self._ranges = ranges

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else n
        if n == 0:
            return b""
        i = bisect_right(self._starts, self._pos) - 1
        if i >= 0:
            start = self._starts[i]
            data = self._ranges[start]
            if self._pos + n <= start + len(data):
                out = data[self._pos - start : self._pos - start + n]
                self._pos += n
                return out
        raise OSError(f"reader asked for {n} bytes at offset {self._pos}, which were not fetched")

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


# ---------------------------------------------------------------------------------------------
# The manifest's shape


def parse_manifest(raw: bytes, where: str = MANIFEST_NAME) -> dict[str, Any]:
    """Manifest bytes -> the manifest mapping; ManifestError naming ``where`` for anything else."""
    try:
        manifest = loads_json(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ManifestError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None
    except ValueError as e:  # not JSON, or a repeated key
        raise ManifestError(f"{where}: not valid JSON: {e}") from None
    except RecursionError:
        raise ManifestError(f"{where}: not valid JSON: nested too deeply") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if version == 1 and not isinstance(version, bool):
        raise ManifestError(
            f"{where}: schema_version 1: this run was written by an older version of hspace (activation "
            "shards as parquet lists), which this version does not read; regenerate it into a new "
            "storage.run_url or delete the run"
        )
    if isinstance(version, bool) or version != MANIFEST_SCHEMA_VERSION:
        raise ManifestError(
            f"{where}: schema_version {version!r:.40}, this code reads {MANIFEST_SCHEMA_VERSION}"
        )
    _field(manifest, "identity", dict, where, optional=True)
    _field(manifest, "blocks", dict, where)
    _field(manifest, "stages", dict, where)
    for name, info in manifest["stages"].items():
        if not isinstance(info, dict):
            raise ManifestError(f"{where}: stages.{name}: expected an object, got {type(info).__name__}")
    return manifest


def parse_blocks(raw: dict[str, Any], where: str = MANIFEST_NAME) -> dict[str, BlockRecord]:
    """The ``blocks`` of a manifest -> records by key in seed order; seed ranges must be disjoint."""
    records = []
    for key, d in raw.items():
        rec = BlockRecord.from_dict(d, f"{where}: blocks.{key}")
        if rec.key != key:
            raise ManifestError(f"{where}: blocks.{key}: entry says key {rec.key!r:.80}")
        records.append(rec)
    records.sort(key=lambda r: r.start)
    for a, b in zip(records, records[1:], strict=False):
        if b.start < a.stop:
            raise ManifestError(
                f"{where}: blocks {a.key} ({a.start}..{a.stop - 1}) and {b.key} ({b.start}..{b.stop - 1}) "
                "overlap; their rows would be counted twice"
            )
    return {r.key: r for r in records}


# ---------------------------------------------------------------------------------------------
# The store


class RunStore:
    """A run directory on any fsspec URL: shards, checkpoints and the manifest.

    ``RunStore(url, storage_options)`` resolves the filesystem once with ``fsspec.core.url_to_fs``;
    every path handed out or recorded is relative to the run root.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        retries: int = 4,
        backoff_s: float = 0.05,
    ) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.retries, self.backoff_s = retries, backoff_s

    def _retry(self, what: str, rel: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, retried ``retries`` times with exponential backoff on transient storage errors
        (connection resets, timeouts, other OSErrors); a missing file or a permission error is final.
        The last failure is re-raised as an OSError naming the file and the attempts."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except _FINAL_ERRORS:
                raise
            except (OSError, TimeoutError) as e:
                if attempt == self.retries:
                    raise OSError(
                        f"{self.describe(rel)}: {what} failed after {attempt + 1} attempts: {type(e).__name__}: {e}"
                    ) from e
                time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def __repr__(self) -> str:
        return f"RunStore({self.url!r})"

    # -- paths and raw bytes ------------------------------------------------------------------

    def abspath(self, rel: str) -> str:
        """Filesystem path of a path relative to the run root."""
        return posixpath.join(self.root, rel)

    def describe(self, rel: str) -> str:
        """A path as a user-readable URL (for error messages)."""
        return posixpath.join(self.url.rstrip("/"), rel)

    def exists(self, rel: str) -> bool:
        return self._retry("exists", rel, lambda: self.fs.exists(self.abspath(rel)))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file (parents created). Not atomic by itself; see :meth:`write_bytes_atomic`."""
        path = self.abspath(rel)

        def write() -> None:
            with self.fs.open(path, "wb") as f:
                f.write(data)

        self._retry("makedirs", rel, lambda: self.fs.makedirs(posixpath.dirname(path), exist_ok=True))
        self._retry("write", rel, write)

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Write to a unique temporary name, then move over ``rel``: readers see old or new, never half."""
        tmp = f"{rel}.tmp-{uuid.uuid4().hex}"
        self.write_bytes(tmp, data)
        try:
            self._retry("move", rel, lambda: self.fs.mv(self.abspath(tmp), self.abspath(rel)))
        except BaseException:
            self.delete(tmp)
            raise

    def read_bytes(self, rel: str) -> bytes:
        path = self.abspath(rel)
        if not self.exists(rel):
            raise FileNotFoundError(f"{self.describe(rel)} does not exist")
        return self._retry("read", rel, lambda: self.fs.cat_file(path))

    def delete(self, rel: str, recursive: bool = False) -> None:
        path = self.abspath(rel)
        if self.exists(rel):
            self._retry("delete", rel, lambda: self.fs.rm(path, recursive=recursive))

    def write_table(self, rel: str, table: pa.Table, step: int | None = None) -> ShardInfo:
        """Write a parquet shard and return what the manifest records about it."""
        data = _parquet_bytes(table)
        self.write_bytes(rel, data)
        footer = footer_sha256(data) if _is_activation_table(table) else None
        return ShardInfo(rel, table.num_rows, len(data), hashlib.sha256(data).hexdigest(), step, footer)

    def write_activations(
        self, step: int, timestep: int, seeds: Sequence[int] | np.ndarray, h: np.ndarray, worker: str, n: int
    ) -> ShardInfo:
        """``activations/t=<step>/part-<worker>-<n>.parquet`` with h [N, C, H, W] as float16."""
        rel = f"activations/t={step}/part-{worker}-{n:06d}.parquet"
        return self.write_table(rel, activation_table(seeds, step, timestep, h), step=step)

    def write_samples(
        self, seeds: Sequence[int] | np.ndarray, pngs: Sequence[bytes], worker: str, n: int
    ) -> ShardInfo:
        """``samples/part-<worker>-<n>.parquet`` with the final images as PNG bytes."""
        return self.write_table(f"samples/part-{worker}-{n:06d}.parquet", samples_table(seeds, pngs))

    # -- verified reads -------------------------------------------------------------------------

    def verified_bytes(self, shard: ShardInfo) -> bytes:
        """The shard's bytes after checking size and sha256 against the manifest."""
        try:
            data = self.read_bytes(shard.path)
        except FileNotFoundError as e:
            raise CorruptShardError(f"{self.describe(shard.path)}: listed in the manifest but missing") from e
        if len(data) != shard.bytes:
            raise CorruptShardError(
                f"{self.describe(shard.path)}: {len(data)} bytes, manifest says {shard.bytes} (truncated or rewritten)"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard.sha256:
            raise CorruptShardError(
                f"{self.describe(shard.path)}: sha256 {digest[:12]}... does not match the manifest"
            )
        return data

    def open_shard(self, shard: ShardInfo, verify: bool = True) -> pq.ParquetFile:
        """A ParquetFile over the verified bytes; parquet errors are re-raised naming the file."""
        data = self.verified_bytes(shard) if verify else self.read_bytes(shard.path)
        try:
            pf = pq.ParquetFile(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as e:
            raise CorruptShardError(f"{self.describe(shard.path)}: not a valid parquet file: {e}") from e
        if pf.metadata.num_rows != shard.rows:
            raise CorruptShardError(
                f"{self.describe(shard.path)}: {pf.metadata.num_rows} rows, manifest says {shard.rows}"
            )
        return pf

    def read_table(
        self, shard: ShardInfo, columns: Sequence[str] | None = None, verify: bool = True
    ) -> pa.Table:
        pf = self.open_shard(shard, verify=verify)
        try:
            return pf.read(columns=list(columns) if columns is not None else None)
        except (pa.ArrowException, OSError) as e:
            raise CorruptShardError(f"{self.describe(shard.path)}: cannot read parquet data: {e}") from e

    def check_block_seeds(self, rec: BlockRecord, shard: ShardInfo, seeds: np.ndarray) -> None:
        """A shard of block ``rec`` must hold each of the block's seeds exactly once (no stray rows)."""
        seeds = np.asarray(seeds)
        ok = seeds.shape[0] == rec.n_seeds and np.array_equal(np.sort(seeds), np.arange(rec.start, rec.stop))
        if not ok:
            stray = seeds[(seeds < rec.start) | (seeds >= rec.stop)]
            what = f"seeds {stray[:5].tolist()} outside" if stray.size else "duplicate or missing seeds of"
            raise CorruptShardError(
                f"{self.describe(shard.path)}: {what} its block {rec.key} (seeds {rec.start}..{rec.stop - 1})"
            )

    def _step_shard(self, rec: BlockRecord, step: int) -> ShardInfo:
        """The block's shard of ``step``; a block without it is a ManifestError naming the manifest."""
        try:
            return rec.shard_for_step(step)
        except KeyError:
            steps = sorted(s.step for s in rec.activations if s.step is not None)
            raise ManifestError(
                f"{self.describe(MANIFEST_NAME)}: block {rec.key} has no activation shard for step {step} "
                f"(it has steps {steps})"
            ) from None

    def _block_table(self, rec: BlockRecord, shard: ShardInfo, columns: Sequence[str]) -> pa.Table:
        table = self.read_table(shard, columns=columns)
        self.check_block_seeds(rec, shard, table.column("seed").to_numpy())
        return table

    def _parse_footer(self, shard: ShardInfo, md: pq.FileMetaData) -> ActivationFooter:
        try:
            footer = parse_activation_footer(md)
        except ValueError as e:
            raise CorruptShardError(
                f"{self.describe(shard.path)}: not a run-format-2 activation shard: {e}"
            ) from e
        if footer.step != shard.step:
            raise CorruptShardError(
                f"{self.describe(shard.path)}: holds step {footer.step}, manifest says {shard.step}"
            )
        if len(footer.seeds) != shard.rows:
            raise CorruptShardError(
                f"{self.describe(shard.path)}: {len(footer.seeds)} rows, manifest says {shard.rows}"
            )
        return footer

    def read_activations(self, rec: BlockRecord, shard: ShardInfo) -> tuple[np.ndarray, np.ndarray]:
        """Seeds [N] int64 and h [N, C, H, W] float16 of a whole activation shard of block ``rec``,
        after checking the file's size and sha256 and that it holds exactly the block's seeds."""
        pf = self.open_shard(shard)
        footer = self._parse_footer(shard, pf.metadata)
        try:
            table = pf.read(columns=["seed", "h"], use_threads=False)
            seeds = table.column("seed").to_numpy()
            h = h_rows(table.column("h"), footer.h_shape)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise CorruptShardError(f"{self.describe(shard.path)}: cannot read its rows: {e}") from e
        self.check_block_seeds(rec, shard, seeds)
        if not np.array_equal(seeds, footer.seeds):
            raise CorruptShardError(f"{self.describe(shard.path)}: seed column and seed statistics disagree")
        return seeds, h

    # -- partial, verified reads ----------------------------------------------------------------

    def _cat_ranges(self, rels: Sequence[str], starts: Sequence[int], ends: Sequence[int]) -> list[bytes]:
        """Byte ranges of run files in one ``fs.cat_ranges`` call (parallel ranged GETs on object
        stores, no read-ahead cache), retried on transient errors."""
        if not rels:
            return []
        paths = [self.abspath(r) for r in rels]
        where = rels[0] if len(set(rels)) == 1 else f"{posixpath.dirname(rels[0])} ({len(set(rels))} shards)"

        def fetch() -> list[bytes]:
            out = self.fs.cat_ranges(paths, list(starts), list(ends), on_error="raise")
            for got in out:
                if isinstance(got, BaseException):
                    raise got
            return out

        return self._retry("ranged read", where, fetch)

    def _check_size(self, shard: ShardInfo) -> None:
        try:
            size = self._retry("size", shard.path, lambda: self.fs.size(self.abspath(shard.path)))
        except FileNotFoundError as e:
            raise CorruptShardError(f"{self.describe(shard.path)}: listed in the manifest but missing") from e
        if size != shard.bytes:
            raise CorruptShardError(
                f"{self.describe(shard.path)}: {size} bytes, manifest says {shard.bytes} (truncated or rewritten)"
            )

    def read_footers(self, shards: Sequence[ShardInfo]) -> list[ActivationFooter]:
        """The footers of activation shards, reading only their last bytes (where the manifest's
        size puts them): each footer's sha256 is checked against the manifest before it is parsed.

        The file sizes are asked for only when something fails (a missing, truncated or rewritten
        file then gets that message): on an object store each would be one more request per shard.
        """
        for shard in shards:
            if shard.footer_sha256 is None:
                raise ManifestError(
                    f"{self.describe(shard.path)}: the manifest records no footer_sha256 for it"
                )
        rels = [s.path for s in shards]
        try:
            tails = self._cat_ranges(rels, [s.bytes - 8 for s in shards], [s.bytes for s in shards])
        except (FileNotFoundError, ValueError):
            for shard in shards:
                self._check_size(shard)
            raise
        lengths = []
        for shard, tail in zip(shards, tails, strict=True):
            try:
                n = _footer_length(tail)
                if not 0 < n <= shard.bytes - 12:
                    raise ValueError(f"footer length {n} does not fit in {shard.bytes} bytes")
            except ValueError as e:
                self._check_size(shard)
                raise CorruptShardError(f"{self.describe(shard.path)}: not a valid parquet file: {e}") from e
            lengths.append(n)
        raw = self._cat_ranges(
            rels,
            [s.bytes - 8 - n for s, n in zip(shards, lengths, strict=True)],
            [s.bytes - 8 for s in shards],
        )
        footers = []
        for shard, data, tail in zip(shards, raw, tails, strict=True):
            digest = hashlib.sha256(data).hexdigest()
            if digest != shard.footer_sha256:
                self._check_size(shard)
                raise CorruptShardError(
                    f"{self.describe(shard.path)}: footer sha256 {digest[:12]}... does not match the manifest"
                )
            try:
                md = pq.read_metadata(pa.BufferReader(b"PAR1" + data + tail))
            except (pa.ArrowException, OSError) as e:
                raise CorruptShardError(f"{self.describe(shard.path)}: cannot parse its footer: {e}") from e
            footers.append(self._parse_footer(shard, md))
        return footers

    def read_rows(self, shards: Sequence[ShardInfo], rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """h [len(rows[i]), C, H, W] float16 of the given rows of each activation shard (in the order
        given), fetching only the verified footers and those rows' h column chunks (one
        ``cat_ranges`` for all of them); every row is checked against its sha256 in the footer."""
        return self._rows_of(shards, self.read_footers(shards), rows)

    def _rows_of(
        self, shards: Sequence[ShardInfo], footers: Sequence[ActivationFooter], rows: Sequence[Sequence[int]]
    ) -> list[np.ndarray]:
        wanted = [sorted(set(int(r) for r in rs)) for rs in rows]
        rels, starts, ends = [], [], []
        for shard, footer, rs in zip(shards, footers, wanted, strict=True):
            for r in rs:
                if not 0 <= r < shard.rows:
                    raise IndexError(f"{self.describe(shard.path)} has no row {r}")
                a, b = footer.h_range(r)
                rels.append(shard.path)
                starts.append(a)
                ends.append(b)
        chunks = iter(self._cat_ranges(rels, starts, ends))
        out = []
        for shard, footer, rs, asked in zip(shards, footers, wanted, rows, strict=True):
            ranges = {footer.h_range(r)[0]: next(chunks) for r in rs}
            h = self._decode_rows(shard, footer, rs, ranges)
            pos = {r: i for i, r in enumerate(rs)}
            out.append(h[[pos[int(r)] for r in asked]])
        return out

    def _decode_rows(
        self, shard: ShardInfo, footer: ActivationFooter, rows: list[int], ranges: dict[int, bytes]
    ) -> np.ndarray:
        """Decode prefetched row groups ``rows`` (sorted) and check each row's sha256."""
        if not rows:
            return np.empty((0, *footer.h_shape), np.float16)
        try:
            pf = pq.ParquetFile(
                _PrefetchedFile(shard.bytes, ranges), metadata=footer.metadata, pre_buffer=False
            )
            h = h_rows(pf.read_row_groups(rows, columns=["h"], use_threads=False).column("h"), footer.h_shape)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise CorruptShardError(f"{self.describe(shard.path)}: cannot read rows {rows[:5]}: {e}") from e
        flat = h.reshape(len(rows), -1).view(np.uint8)
        for i, r in enumerate(rows):
            if hashlib.sha256(flat[i]).hexdigest() != footer.row_sha256[r]:
                raise CorruptShardError(
                    f"{self.describe(shard.path)}: row {r} (seed {footer.seeds[r]}) fails its sha256 in the footer"
                )
        return h

    # -- the manifest ---------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any]:
        """The manifest, or an empty one for a new run.

        Raises :class:`ManifestError` (naming the file) for bytes that are not a manifest: not UTF-8
        JSON, another schema version, or a top level without its ``identity`` / ``blocks`` /
        ``stages`` of the right types. Block entries are checked by :meth:`blocks`.
        """
        # Read directly rather than ask exists(): fsspec's exists() answers False on any error, and a
        # transient error mistaken for "no manifest" would let the next update drop listed blocks.
        path = self.abspath(MANIFEST_NAME)
        try:
            data = self._retry("read", MANIFEST_NAME, lambda: self.fs.cat_file(path))
        except FileNotFoundError:
            return {"schema_version": MANIFEST_SCHEMA_VERSION, "identity": None, "blocks": {}, "stages": {}}
        return parse_manifest(data, self.describe(MANIFEST_NAME))

    def update_manifest(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read, apply ``change`` in place, write atomically. Only the driver calls this (single writer)."""
        manifest = self.read_manifest()
        change(manifest)
        self.write_bytes_atomic(MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True).encode())
        return manifest

    def identity(self) -> dict[str, Any] | None:
        return self.read_manifest()["identity"]

    def ensure_identity(self, identity: dict[str, Any]) -> None:
        """Record what generated this run, or refuse to mix data from a different model/sampler."""
        current = self.read_manifest()["identity"]
        if current is None:
            self.update_manifest(lambda m: m.__setitem__("identity", identity))
            return
        normal = json.loads(json.dumps(identity))  # tuples -> lists, as stored
        diff = sorted(k for k in set(current) | set(normal) if current.get(k) != normal.get(k))
        if diff:
            details = "; ".join(
                f"{k}: run has {current.get(k)!r}, config gives {normal.get(k)!r}" for k in diff
            )
            raise ValueError(
                f"run {self.url} was generated with different settings ({details}); "
                "use a new storage.run_url or delete the run"
            )

    def blocks(self) -> dict[str, BlockRecord]:
        """Completed seed blocks by key, in seed order; ManifestError for a malformed or overlapping entry."""
        return parse_blocks(self.read_manifest()["blocks"], self.describe(MANIFEST_NAME))

    def add_blocks(self, records: Iterable[BlockRecord]) -> None:
        """List completed blocks; a listed block whose seed range overlaps a new one is replaced."""
        records = list(records)
        if not records:
            return

        def change(m: dict[str, Any]) -> None:
            for rec in records:
                stale = [k for k, d in m["blocks"].items() if d["start"] < rec.stop and rec.start < d["stop"]]
                for k in stale:
                    del m["blocks"][k]
                m["blocks"][rec.key] = rec.to_dict()

        self.update_manifest(change)

    def remove_blocks(self, keys: Iterable[str]) -> None:
        keys = set(keys)
        self.update_manifest(lambda m: [m["blocks"].pop(k, None) for k in keys])

    def stage(self, name: str) -> dict[str, Any] | None:
        """What a stage recorded about itself (None if nothing)."""
        return self.read_manifest()["stages"].get(name)

    def record_stage(self, name: str, info: dict[str, Any]) -> None:
        """Record a stage's result (JSON-serialisable) in the manifest."""
        self.update_manifest(lambda m: m["stages"].__setitem__(name, info))

    # -- readers --------------------------------------------------------------------------------

    def _select(self, blocks: Iterable[str] | None) -> list[BlockRecord]:
        all_blocks = self.blocks()
        if blocks is None:
            return list(all_blocks.values())
        wanted = list(blocks)
        missing = [k for k in wanted if k not in all_blocks]
        if missing:
            raise KeyError(f"blocks {missing} are not completed in run {self.url}")
        return sorted((all_blocks[k] for k in wanted), key=lambda r: r.start)

    def iter_step_batches(
        self, step: int, batch_size: int, blocks: Iterable[str] | None = None
    ) -> Iterator[StepBatch]:
        """Rows of one step in seed order, ``batch_size`` at a time (the last batch may be shorter).

        Only one shard and one batch are in memory at a time. ``blocks`` restricts to those block
        keys (e.g. the new blocks of a grown run). Each shard is read whole and checked against
        its size and sha256 in the manifest.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        pending_s: list[np.ndarray] = []
        pending_h: list[np.ndarray] = []
        n_pending = 0
        for rec in self._select(blocks):
            seeds_col, h_col = self.read_activations(rec, self._step_shard(rec, step))
            pending_s.append(seeds_col)
            pending_h.append(h_col)
            n_pending += len(seeds_col)
            del seeds_col, h_col
            while n_pending >= batch_size:
                seeds, h = np.concatenate(pending_s), np.concatenate(pending_h)
                yield StepBatch(step, seeds[:batch_size], h[:batch_size])
                pending_s, pending_h = [seeds[batch_size:]], [h[batch_size:]]
                n_pending -= batch_size
        if n_pending:
            yield StepBatch(step, np.concatenate(pending_s), np.concatenate(pending_h))

    def read_h(self, seeds: Sequence[int], steps: Sequence[int] | None = None) -> np.ndarray:
        """h of the given seeds, [N, T, C, H, W] float16 in the order given (steps: all recorded by default).

        Reads only what it needs (for aggregate: the top/bottom quantiles): per step, the footers of
        the shards that hold the seeds (size and footer sha256 checked against the manifest), then
        the wanted rows' h in one ranged read, each row checked against its sha256 in the footer.
        """
        want = np.asarray(list(seeds), dtype=np.int64)
        if want.size == 0:
            raise ValueError("no seeds requested")
        recs = self._select(None)
        if steps is None:
            steps = sorted({s.step for r in recs for s in r.activations if s.step is not None})
        steps = list(steps)
        if not steps:
            raise ValueError(f"no steps requested (the run {self.url} records none)")
        by_block = self._positions_by_block(want, recs)
        out: np.ndarray | None = None
        for ti, step in enumerate(steps):
            parts = list(by_block.values())
            shards = [self._step_shard(rec, step) for rec, _ in parts]
            footers = self.read_footers(shards)
            rows = []
            for (rec, positions), shard, footer in zip(parts, shards, footers, strict=True):
                self.check_block_seeds(rec, shard, footer.seeds)
                row_of = {int(s): i for i, s in enumerate(footer.seeds)}
                rows.append([row_of[int(want[p])] for p in positions])
            for (_, positions), shard, h in zip(
                parts, shards, self._rows_of(shards, footers, rows), strict=True
            ):
                if out is None:
                    out = np.empty((len(want), len(steps), *h.shape[1:]), dtype=np.float16)
                if h.shape[1:] != out.shape[2:]:
                    raise CorruptShardError(
                        f"{self.describe(shard.path)}: h shape {list(h.shape[1:])}, other shards have "
                        f"{list(out.shape[2:])}"
                    )
                out[positions, ti] = h
        assert out is not None  # steps and seeds are non-empty
        return out

    def _positions_by_block(
        self, want: np.ndarray, recs: list[BlockRecord]
    ) -> dict[str, tuple[BlockRecord, list[int]]]:
        """Positions in ``want`` grouped by the block that holds the seed; KeyError for seeds in none."""
        starts = np.array([r.start for r in recs], dtype=np.int64)  # blocks are disjoint and sorted
        by_block: dict[str, tuple[BlockRecord, list[int]]] = {}
        missing = []
        for pos, s in enumerate(want.tolist()):
            i = int(np.searchsorted(starts, s, side="right")) - 1
            if i < 0 or not recs[i].start <= s < recs[i].stop:
                missing.append(s)
            else:
                by_block.setdefault(recs[i].key, (recs[i], []))[1].append(pos)
        if missing:
            raise KeyError(
                f"seeds {missing[:10]}{'...' if len(missing) > 10 else ''} are in no completed block of {self.url}"
            )
        return by_block

    def read_samples(self, blocks: Iterable[str] | None = None) -> pa.Table:
        """Final images: a table (seed int64, png binary) sorted by seed."""
        tables = [self._block_table(r, r.samples, ["seed", "png"]) for r in self._select(blocks)]
        if not tables:
            return samples_table([], [])
        return pa.concat_tables(tables).sort_by("seed")

    def summary(self) -> dict[str, int]:
        """Blocks, samples, activation rows and bytes listed in the manifest."""
        recs = list(self.blocks().values())
        return {
            "blocks": len(recs),
            "samples": sum(r.n_seeds for r in recs),
            "rows": sum(s.rows for r in recs for s in r.activations),
            "bytes": sum(r.bytes for r in recs),
        }
