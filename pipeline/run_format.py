"""The run's format on storage: its manifest records and its parquet shards, with no I/O.

Layout under the run URL::

    _manifest.json                                   completed seed blocks and their shards
    activations/t=<step>/part-<worker>-<n>.parquet   seed int64, h fixed_size_binary(C*H*W*2)
    samples/part-<worker>-<n>.parquet                seed int64, png binary (final image); for a
                                                     conditioned model also prompt, negative_prompt
                                                     (string), class_label (int64), guidance_scale

An activation shard (run format 2) stores each row's h as one binary value: the float16 array
[C, H, W] in C order, little-endian. Every row is its own row group (zstd, no dictionary), so a
reader can fetch single rows; only ``seed`` has statistics, so the footer alone says which row
group holds which seed. The footer's key-value metadata ``hspace`` (JSON) holds what a reader
needs: ``h_shape``, ``h_dtype``, ``step``, ``timestep`` and ``row_sha256`` (sha256 of each row's
h bytes, in row order). Step and timestep are not columns (measured: as constant columns they grow
the footer by half and a write or read by a quarter); the step is also the ``t=`` directory.

The manifest lists each shard with its path, rows, bytes and sha256, and for activation shards the
sha256 of the parquet footer; its entries are parsed strictly (:class:`ManifestError` names the
file and the entry). :mod:`pipeline.storage` reads and writes all of this on an fsspec URL.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hspace.io import loads_json

__all__ = [
    "H_DTYPE",
    "H_METADATA_KEY",
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA_VERSION",
    "ActivationFooter",
    "BlockRecord",
    "CorruptShardError",
    "ManifestError",
    "PrefetchedFile",
    "ShardInfo",
    "StepBatch",
    "activation_table",
    "footer_length",
    "footer_sha256",
    "h_rows",
    "is_activation_table",
    "parquet_bytes",
    "parse_activation_footer",
    "parse_blocks",
    "parse_manifest",
    "samples_table",
]

MANIFEST_NAME = "_manifest.json"
MANIFEST_SCHEMA_VERSION = 2

#: Key of an activation shard's parquet key-value metadata (a JSON object; see the module docstring).
H_METADATA_KEY = "hspace"
#: The float16 h bytes of a row: little-endian, C order.
H_DTYPE = np.dtype("<f2")


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


#: Optional columns of a samples shard: what each seed was conditioned on (text and class models).
CONDITION_COLUMNS = {
    "prompt": pa.string(),
    "negative_prompt": pa.string(),
    "class_label": pa.int64(),
    "guidance_scale": pa.float32(),
}


def samples_table(
    seeds: Sequence[int] | np.ndarray,
    pngs: Sequence[bytes],
    conditions: dict[str, Sequence[Any]] | None = None,
) -> pa.Table:
    """Final images of seeds as PNG bytes, plus one column per :data:`CONDITION_COLUMNS` entry
    given in ``conditions`` (one value per seed)."""
    if len(seeds) != len(pngs):
        raise ValueError(f"{len(seeds)} seeds but {len(pngs)} images")
    columns = {"seed": pa.array(np.asarray(seeds, np.int64), pa.int64()), "png": pa.array(pngs, pa.binary())}
    for name, values in (conditions or {}).items():
        if name not in CONDITION_COLUMNS:
            raise ValueError(f"unknown samples column {name!r}; known: {sorted(CONDITION_COLUMNS)}")
        if len(values) != len(seeds):
            raise ValueError(f"{len(seeds)} seeds but {len(values)} values of {name!r}")
        columns[name] = pa.array(list(values), CONDITION_COLUMNS[name])
    return pa.table(columns)


def is_activation_table(table: pa.Table) -> bool:
    return H_METADATA_KEY.encode() in (table.schema.metadata or {})


def parquet_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    """Parquet with zstd and no dictionary. An activation table gets one row per row group,
    statistics only for ``seed``, and its ``hspace`` metadata in the footer (no Arrow schema copy)."""
    buf = io.BytesIO()
    if not is_activation_table(table):
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


def footer_length(tail: bytes) -> int:
    """The footer length from a parquet file's last 8 bytes; ValueError if they are not a trailer."""
    if len(tail) != 8 or tail[4:] != b"PAR1":
        raise ValueError("no parquet trailer (PAR1) at the end")
    return int.from_bytes(tail[:4], "little")


def footer_sha256(data: bytes) -> str:
    """sha256 of a parquet file's footer (the serialized FileMetaData before the 8-byte trailer)."""
    n = footer_length(data[-8:])
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


class PrefetchedFile(io.RawIOBase):
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
