"""Run storage: a run's shards and manifest on any fsspec URL (:class:`RunStore`).

The format (layout, shard encoding, manifest records) is :mod:`pipeline.run_format`; its records
and errors are importable from here too. A shard counts only once the manifest lists it, so a
crashed worker leaves at most an unlisted file that a re-run overwrites or ignores. The manifest is
replaced atomically (written to a temporary name, then moved), and only the driver writes it. Full
reads check every shard's size and sha256 before parsing it; partial reads (:meth:`RunStore.read_h`)
fetch only the footer, checked against the manifest, and the wanted rows, each checked against its
digest in that footer. So a truncated or corrupt file fails loudly with its path instead of feeding
garbage to the PCA or an aggregation. Transient storage errors are retried. Nothing here unpickles
anything.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.run_format import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    ActivationFooter,
    BlockRecord,
    CorruptShardError,
    ManifestError,
    PrefetchedFile,
    ShardInfo,
    StepBatch,
    activation_table,
    footer_length,
    footer_sha256,
    h_rows,
    is_activation_table,
    parquet_bytes,
    parse_activation_footer,
    parse_blocks,
    parse_manifest,
    samples_table,
)

#: ``RunStore``, and the format's records and errors that its callers handle (their home is
#: :mod:`pipeline.run_format`).
__all__ = [
    "MANIFEST_NAME",
    "BlockRecord",
    "CorruptShardError",
    "ManifestError",
    "RunStore",
    "ShardInfo",
    "StepBatch",
]

#: Storage errors that retrying cannot fix.
_FINAL_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


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
        data = parquet_bytes(table)
        self.write_bytes(rel, data)
        footer = footer_sha256(data) if is_activation_table(table) else None
        return ShardInfo(rel, table.num_rows, len(data), hashlib.sha256(data).hexdigest(), step, footer)

    def write_activations(
        self, step: int, timestep: int, seeds: Sequence[int] | np.ndarray, h: np.ndarray, worker: str, n: int
    ) -> ShardInfo:
        """``activations/t=<step>/part-<worker>-<n>.parquet`` with h [N, C, H, W] as float16."""
        rel = f"activations/t={step}/part-{worker}-{n:06d}.parquet"
        return self.write_table(rel, activation_table(seeds, step, timestep, h), step=step)

    def write_samples(
        self,
        seeds: Sequence[int] | np.ndarray,
        pngs: Sequence[bytes],
        worker: str,
        n: int,
        conditions: dict[str, Sequence[Any]] | None = None,
    ) -> ShardInfo:
        """``samples/part-<worker>-<n>.parquet`` with the final images as PNG bytes (and what each
        seed was conditioned on, see ``run_format.CONDITION_COLUMNS``)."""
        table = samples_table(seeds, pngs, conditions)
        return self.write_table(f"samples/part-{worker}-{n:06d}.parquet", table)

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
                n = footer_length(tail)
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
                PrefetchedFile(shard.bytes, ranges), metadata=footer.metadata, pre_buffer=False
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

    def read_samples(
        self, blocks: Iterable[str] | None = None, columns: Sequence[str] = ("seed", "png")
    ) -> pa.Table:
        """Final images: a table (seed int64, png binary, or the named ``columns``) sorted by seed."""
        cols = list(dict.fromkeys(["seed", *columns]))
        tables = [self._block_table(r, r.samples, cols) for r in self._select(blocks)]
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
