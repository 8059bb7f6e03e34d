"""Run storage: activation and sample shards as parquet, and the run manifest, on any fsspec URL.

Layout under the run URL::

    _manifest.json                                   completed seed blocks and their shards
    activations/t=<step>/part-<worker>-<n>.parquet   seed int64, step int16, timestep int16,
                                                     h fixed_shape_tensor(float16, [C, H, W])
    samples/part-<worker>-<n>.parquet                seed int64, png binary (final image)

A shard counts only once the manifest lists it (path, rows, bytes, sha256), so a crashed worker
leaves at most an unlisted file that a re-run overwrites or ignores. The manifest is replaced
atomically (written to a temporary name, then moved), and only the driver writes it. Readers check
every shard's size and sha256 before parsing it, so a truncated or corrupt file fails loudly with
its path instead of feeding garbage to the PCA. Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "BlockRecord",
    "CorruptShardError",
    "ManifestError",
    "RunStore",
    "ShardInfo",
    "StepBatch",
    "activation_table",
    "samples_table",
]

MANIFEST_NAME = "_manifest.json"
MANIFEST_SCHEMA_VERSION = 1


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


@dataclass(frozen=True)
class ShardInfo:
    """One parquet file of the run: path relative to the run root, rows, bytes, sha256, step (or None)."""

    path: str
    rows: int
    bytes: int
    sha256: str
    step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rows": self.rows,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "step": self.step,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "shard") -> ShardInfo:
        """Parse a manifest entry; ManifestError naming ``where`` for a missing or mistyped field."""
        path = _field(d, "path", str, where)
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ManifestError(f"{where}.path: must be a relative path inside the run, got {path!r:.80}")
        sha = _field(d, "sha256", str, where)
        if len(sha) != 64 or not set(sha) <= _SHA256_HEX:
            raise ManifestError(f"{where}.sha256: expected 64 lowercase hex digits, got {sha!r:.80}")
        step = _field(d, "step", int, where, optional=True)
        if step is not None and step < 0:
            raise ManifestError(f"{where}.step: must be >= 0, got {step}")
        return cls(path, _count(d, "rows", where), _count(d, "bytes", where), sha, step)


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
            ShardInfo.from_dict(s, f"{where}.activations[{i}]") for i, s in enumerate(raw_acts)
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
    """Rows of one step: ``h`` [N, C, H, W] stored as Arrow's canonical fixed_shape_tensor (float16)."""
    h = np.ascontiguousarray(np.asarray(h, dtype=np.float16))
    seeds = np.asarray(seeds, dtype=np.int64)
    if h.ndim != 4 or h.shape[0] != seeds.shape[0]:
        raise ValueError(
            f"h must be [N, C, H, W] with N = len(seeds) = {seeds.shape[0]}, got {tuple(h.shape)}"
        )
    n = seeds.shape[0]
    return pa.table(
        {
            "seed": pa.array(seeds, pa.int64()),
            "step": pa.array(np.full(n, step, np.int16), pa.int16()),
            "timestep": pa.array(np.full(n, timestep, np.int16), pa.int16()),
            "h": pa.FixedShapeTensorArray.from_numpy_ndarray(h),
        }
    )


def samples_table(seeds: Sequence[int] | np.ndarray, pngs: Sequence[bytes]) -> pa.Table:
    """Final images of seeds as PNG bytes."""
    if len(seeds) != len(pngs):
        raise ValueError(f"{len(seeds)} seeds but {len(pngs)} images")
    return pa.table(
        {"seed": pa.array(np.asarray(seeds, np.int64), pa.int64()), "png": pa.array(pngs, pa.binary())}
    )


def _parquet_bytes(table: pa.Table) -> bytes:
    """Parquet with zstd; ``h`` gets byte-stream-split and no dictionary (random floats do not repeat)."""
    names = table.column_names
    dictionary = [c for c in ("step", "timestep") if c in names]
    split = ["h.list.element"] if "h" in names else False
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression="zstd",
        use_dictionary=dictionary,
        use_byte_stream_split=split,
        row_group_size=max(1, table.num_rows),
    )
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The manifest's shape


def parse_manifest(raw: bytes, where: str = MANIFEST_NAME) -> dict[str, Any]:
    """Manifest bytes -> the manifest mapping; ManifestError naming ``where`` for anything else."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ManifestError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: not valid JSON: {e}") from None
    except RecursionError:
        raise ManifestError(f"{where}: not valid JSON: nested too deeply") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("schema_version")
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
        return ShardInfo(rel, table.num_rows, len(data), hashlib.sha256(data).hexdigest(), step)

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
        keys (e.g. the new blocks of a grown run).
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        pending_s: list[np.ndarray] = []
        pending_h: list[np.ndarray] = []
        n_pending = 0
        for rec in self._select(blocks):
            shard = self._step_shard(rec, step)
            pf = self.open_shard(shard)
            try:
                seeds_col = pf.read(columns=["seed"]).column("seed").to_numpy()
            except (pa.ArrowException, OSError, KeyError) as e:
                raise CorruptShardError(f"{self.describe(shard.path)}: cannot read its seeds: {e}") from e
            self.check_block_seeds(rec, shard, seeds_col)
            for rb in pf.iter_batches(batch_size=batch_size, columns=["seed", "h"]):
                pending_s.append(rb.column("seed").to_numpy())
                pending_h.append(rb.column("h").to_numpy_ndarray())
                n_pending += rb.num_rows
                while n_pending >= batch_size:
                    seeds, h = np.concatenate(pending_s), np.concatenate(pending_h)
                    yield StepBatch(step, seeds[:batch_size], h[:batch_size])
                    pending_s, pending_h = [seeds[batch_size:]], [h[batch_size:]]
                    n_pending -= batch_size
        if n_pending:
            yield StepBatch(step, np.concatenate(pending_s), np.concatenate(pending_h))

    def read_h(self, seeds: Sequence[int], steps: Sequence[int] | None = None) -> np.ndarray:
        """h of the given seeds, [N, T, C, H, W] float16 in the order given (steps: all recorded by default).

        Reads only the blocks that contain the seeds (for aggregate: the top/bottom quantiles).
        """
        want = np.asarray(list(seeds), dtype=np.int64)
        recs = self._select(None)
        if steps is None:
            steps = sorted({s.step for r in recs for s in r.activations if s.step is not None})
        steps = list(steps)
        owner: dict[int, BlockRecord] = {}
        starts = np.array([r.start for r in recs], dtype=np.int64)  # blocks are disjoint and sorted
        missing = []
        for s in want.tolist():
            i = int(np.searchsorted(starts, s, side="right")) - 1
            if i < 0 or not recs[i].start <= s < recs[i].stop:
                missing.append(s)
            else:
                owner[s] = recs[i]
        if missing:
            raise KeyError(
                f"seeds {missing[:10]}{'...' if len(missing) > 10 else ''} are in no completed block of {self.url}"
            )
        out: np.ndarray | None = None
        by_block: dict[str, tuple[BlockRecord, list[int]]] = {}
        for pos, s in enumerate(want.tolist()):
            by_block.setdefault(owner[s].key, (owner[s], []))[1].append(pos)
        for rec, positions in by_block.values():
            for ti, step in enumerate(steps):
                table = self._block_table(rec, self._step_shard(rec, step), ["seed", "h"])
                block_seeds = table.column("seed").to_numpy()
                h = table.column("h").combine_chunks().to_numpy_ndarray()
                if out is None:
                    out = np.empty((len(want), len(steps), *h.shape[1:]), dtype=np.float16)
                row_of = {int(s): i for i, s in enumerate(block_seeds)}
                idx = [row_of[int(want[p])] for p in positions]
                out[positions, ti] = h[idx]
        if out is None:
            raise ValueError("no seeds requested")
        return out

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
