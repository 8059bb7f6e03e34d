"""The versioned direction catalog on any fsspec URL.

A catalog holds, per model, immutable *versions* of a set of h-space directions (the paper's PCA,
Jacobian, supervised, disentangled and random-baseline directions, sections IV-V), optional PCA
state and effect matrix, and named *refs* ("latest", "stable", ...) pointing at versions::

    <root>/<model>/versions/<version>/
        ~claim                   created FIRST, exclusively: the publisher owning this id
        directions.safetensors   one tensor per direction ([T,C,H,W] float32, or [C,H,W] for a
                                 direction used at every step), keys <name>, <name>.sigma,
                                 <name>.timesteps, JSON metadata per direction
        pca.safetensors          optional: PerTimestepPCA state (its to_safetensors_dict())
        effects.json             optional: effect matrix and baselines
        previews/*.png, ...      optional extra files
        manifest.json            created LAST, exclusively: the version exists once it does
    <root>/<model>/refs/<name>   {"version": ..., "updated": ..., "previous": ...}
    <root>/<model>/gc/<version>  {"since": ...}: when gc first found the version unreferenced

Promises (``docs/catalog.md`` has the operator's view):

- A committed version never changes. A publish first creates ``~claim`` exclusively (a second
  publisher of the same id gets :class:`VersionExistsError` before writing anything), then every
  file with exclusive create, never replacing one, then ``manifest.json``. Readers find the files
  where the manifest lies. A publish that fails removes what it wrote (best effort) and raises
  :class:`PublishError`; a version without ``manifest.json`` is never listed or read, and gc
  removes leftovers untouched for ``grace_s``.
- Refs move by compare-and-swap and never backwards: when a ref names a generated version id
  (UTC timestamp + random suffix) that sorts after the one being published (a later publish, or a
  lagging clock), the ref stays and publish raises :class:`RefNotAdvancedError` after committing
  the version. Explicit ids that are not timestamps are not compared: the ref moves.
- Everything a reader loads is verified: the manifest against its schema (:func:`parse_manifest`,
  :class:`ManifestError`), each file's size and sha256 (:class:`ChecksumError`), and each
  direction's name, kind, model fingerprint and shape against its manifest entry
  (:class:`CorruptFileError`, also for unparsable files). Nothing is unpickled. On a local disk a
  model or version directory that resolves outside the root (a symlink) is refused
  (:class:`UnsafePathError`).
- gc never removes the ``keep`` newest versions or a version a ref names (refs are read at the
  start and again right before each removal, which removes the manifest first and restores it
  if a ref moved there meanwhile; a ref moved to a version gc removed is put back), nor an
  incomplete version touched within ``grace_s``. Reader contract: with ``reader_grace_s`` a
  version a reader resolved through a ref stays readable at least ``reader_grace_s`` seconds
  after that ref moved away (gc records when it first found a version unreferenced and removes it
  only ``reader_grace_s`` later); resolve by id only the versions a ref names or the ``keep``
  newest if you need the same. Concurrent gc runs tolerate each other. A malformed ref is
  reported (:class:`MalformedRefWarning`) and skipped; gc keeps every version its bytes mention.

Guarantees per backend (the primitives live in :mod:`hspace._catalog_store`):

- exclusive create: local paths write a temporary file and ``os.link`` it into place (atomic and
  exclusive on POSIX filesystems); S3 uses ``If-None-Match: *`` (atomic on AWS S3 and moto);
  ``memory://`` checks and creates under a process-wide lock (exclusive within one process);
  other filesystems use ``"xb"`` where supported, else a check for existence followed by a write
  (best effort, documented race).
- ref compare-and-swap: S3 reads the ref together with its ETag and writes with ``If-Match``
  (``If-None-Match: *`` for a new ref): a true server-side CAS. Local paths hold an ``flock`` on
  ``<ref>~lock`` while they re-read, write (temporary file + atomic rename) and verify; the kernel
  releases it only when its holder ends, so a stalled holder is waited for (up to
  ``lock_timeout_s``, then :class:`RefConflictError`), never overtaken. ``memory://`` uses a
  process-wide lock per ref. Other filesystems take a lock file by exclusive create carrying a
  unique token; one older than ``lock_timeout_s`` is broken, and a holder checks its token right
  before writing (a stalled holder that lost its lock writes nothing): best effort, with a window
  of one request.
- transient storage errors (ConnectionError, TimeoutError) are retried ``retries`` times with
  exponential backoff; a retried exclusive create that finds its own bytes counts as done.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import secrets
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from types import EllipsisType
from typing import Any

import fsspec
import torch
from torch import Tensor

from hspace._catalog_store import CasConflictError, LockHeldError, LockLostError, Store, mtime
from hspace.directions import Direction, direction_names, directions_to_safetensors
from hspace.io import loads_json, safetensors_from_bytes

__all__ = [
    "Catalog",
    "CatalogDiff",
    "CatalogError",
    "CatalogVersion",
    "ChecksumError",
    "RefConflictError",
    "VersionExistsError",
    "model_key",
    "new_version_id",
    "open",
    "preview_path",
]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DIRECTIONS_FILE = "directions.safetensors"
PCA_FILE = "pca.safetensors"
EFFECTS_FILE = "effects.json"
RESERVED_FILES = frozenset({MANIFEST, DIRECTIONS_FILE, PCA_FILE, EFFECTS_FILE})
CLAIM_FILE = "~claim"  # first file of a publish, created exclusively: the id belongs to its publisher
GC_DIR = "gc"  # <model>/gc/<version>: when gc first found the version unreferenced

# Model, ref and version names: one path segment, no "~" (used by lock and temp files).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_VERSION_TS_RE = re.compile(r"^(\d{8}T\d{6})\.(\d{6})Z-[0-9a-f]+$")

DEFAULT_SIGN_RULES: dict[str, str] = {
    "pca": "principal component; sign fixed consistently across steps (see provenance)",
    "jacobian": "right singular vector of d eps / d h; sign as returned (see provenance)",
    "supervised": "mean(h of top-scored) - mean(h of bottom-scored): +gamma raises the attribute",
    "disentangled": "sign of the source direction it was projected from",
    "random": "arbitrary: seeded matched-norm random baseline",
    "custom": "as given by the publisher",
}


# ---------------------------------------------------------------------- errors
class CatalogError(Exception):
    """Base class of the catalog's own errors."""


class ChecksumError(CatalogError, ValueError):
    """A file's bytes do not match the sha256 or size its version's manifest records."""

    def __init__(self, path: str, expected: str, actual: str, what: str = "sha256") -> None:
        self.path, self.expected, self.actual = path, expected, actual
        super().__init__(
            f"{what} mismatch for {path}: manifest says {expected}, file has {actual}; "
            "the file was modified or corrupted after publishing (do not use this version)"
        )


class VersionExistsError(CatalogError, FileExistsError):
    """Publishing to a version id whose manifest already exists (versions are immutable)."""


class RefConflictError(CatalogError):
    """A ref changed between read and write (compare-and-swap failed) or its lock is held."""


class RefNotAdvancedError(CatalogError):
    """The version was published (complete, readable by id) but the ref was left where it was,
    because it names a later version: refs never move backwards in version-id order."""

    def __init__(self, model: str, ref: str, version: str, current: str) -> None:
        self.model, self.ref, self.version, self.current = model, ref, version, current
        super().__init__(
            f"version {version} of model {model!r} was published, but ref {ref!r} still names {current}, "
            f"which sorts after it (a later publish, or this publisher's clock lags); services reading "
            f"{ref!r} do not see {version}. Point the ref at it explicitly with set_ref if that is wanted"
        )


class ManifestError(CatalogError, ValueError):
    """A manifest.json is not valid JSON or breaks the manifest schema (the message names the field)."""


class CorruptFileError(CatalogError, ValueError):
    """A listed file has the bytes its manifest records but cannot be parsed or disagrees with its
    manifest entry (a hostile or buggy publisher)."""


class UnsafePathError(CatalogError, ValueError):
    """A catalog path resolves outside the catalog root (a symlink leading elsewhere): refused."""


class PublishError(CatalogError, OSError):
    """Storage failed while publishing, after the configured retries; the message says whether the
    version was committed (it never is visible half-written)."""


class MalformedRefWarning(UserWarning):
    """A ref file could not be parsed; it was skipped (refs) or its content kept versions alive (gc)."""


# ---------------------------------------------------------------------- names and small helpers
def _check_name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(
            f"invalid {field} name {value!r}: use 1-128 characters from [A-Za-z0-9._-], starting with a "
            f"letter or digit (no '/', no '~')"
        )
    return value


def _check_relpath(relpath: Any, field: str = "file path") -> str:
    if not isinstance(relpath, str) or not relpath:
        raise ValueError(f"invalid {field} {relpath!r}: must be a non-empty relative path")
    parts = relpath.split("/")
    if not all(_PART_RE.match(p) for p in parts):
        raise ValueError(
            f"invalid {field} {relpath!r}: each '/'-separated part must be 1-128 characters from "
            f"[A-Za-z0-9._+-] starting with a letter or digit (no '..', no absolute paths)"
        )
    return relpath


def preview_path(direction: str) -> str:
    """The file a version holds a direction's edit strip in: ``previews/<name>.png``, the name reduced
    to the catalog's file-name characters (the publish stage writes it, the explorer reads it)."""
    return f"previews/{re.sub(r'[^A-Za-z0-9._+-]', '_', direction)}.png"


def model_key(model_id: str) -> str:
    """A catalog model name for a hub id: ``google/ddpm-ema-celebahq-256`` -> ``google--ddpm-ema-celebahq-256``."""
    return _check_name(model_id.replace("/", "--"), "model")


def new_version_id(now: _dt.datetime | None = None) -> str:
    """A sortable, unique version id: UTC timestamp with microseconds plus 6 random hex digits."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond:06d}Z-{secrets.token_hex(3)}"


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu().tolist()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _dumps(obj: Any, what: str) -> bytes:
    """Strict JSON (no NaN/inf), sorted keys; the error names ``what`` when it is not serialisable."""
    try:
        return json.dumps(obj, sort_keys=True, indent=1, allow_nan=False, default=_json_default).encode()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serialisable without NaN/inf ({err})") from None


def _code_version() -> str:
    """The hspace version that wrote a catalog version (``hspace.__version__``, the package's only one)."""
    import hspace

    return hspace.__version__


def _is_generated_id(version: str) -> bool:
    return _VERSION_TS_RE.match(version) is not None


def _version_timestamp(version: str) -> float | None:
    m = _VERSION_TS_RE.match(version)
    if not m:
        return None
    ts = _dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=_dt.timezone.utc)
    return ts.timestamp() + int(m.group(2)) * 1e-6


# ---------------------------------------------------------------------- encoders
def _as_direction_list(directions: Mapping[str, Direction] | Iterable[Direction]) -> list[Direction]:
    if isinstance(directions, Mapping):
        out = []
        for key, d in directions.items():
            if not isinstance(d, Direction):
                raise ValueError(f"directions[{key!r}] must be a Direction, got {type(d).__name__}")
            if key != d.name:
                raise ValueError(f"directions key {key!r} differs from the direction's name {d.name!r}")
            out.append(d)
    else:
        out = list(directions)
        for i, d in enumerate(out):
            if not isinstance(d, Direction):
                raise ValueError(f"directions[{i}] must be a Direction, got {type(d).__name__}")
    if not out:
        raise ValueError("directions is empty: a catalog version needs at least one direction")
    seen: set[str] = set()
    for d in out:
        if d.name in seen:
            raise ValueError(f"duplicate direction name {d.name!r}")
        seen.add(d.name)
    return out


def _encode_directions(directions: list[Direction]) -> tuple[bytes, list[dict[str, Any]]]:
    """directions.safetensors bytes (float32 vectors) and the manifest's per-direction entries."""
    from safetensors.torch import save

    as_f32 = [dataclasses.replace(d, vector=d.vector.detach().to("cpu", torch.float32)) for d in directions]
    tensors, metadata = directions_to_safetensors(as_f32)
    entries = []
    for d in as_f32:
        _dumps(d.provenance, f"provenance of direction {d.name!r}")
        entries.append(
            {
                "name": d.name,
                "kind": d.kind,
                "shape": list(d.vector.shape),
                "dtype": "float32",
                "units": d.units,
                "sign_rule": str(d.provenance.get("sign_rule") or DEFAULT_SIGN_RULES[d.kind]),
                "has_sigma": d.sigma is not None,
                "model_fingerprint": d.model_fingerprint,
                "norm": float(d.vector.to(torch.float64).norm()),
                "provenance": d.provenance,
            }
        )
    return save(_unshare(tensors), metadata=metadata), entries


def _attach_grades(entries: list[dict[str, Any]], grades: Mapping[str, Mapping[str, Any]]) -> None:
    """Each graded direction's manifest entry gets its ``grade`` (see :mod:`hspace.grade`)."""
    unknown = sorted(set(grades) - {e["name"] for e in entries})
    if unknown:
        raise ValueError(f"grades name directions that are not published: {unknown}")
    for entry in entries:
        if entry["name"] in grades:
            entry["grade"] = dict(grades[entry["name"]])


def _unshare(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Clone tensors whose memory another entry already uses (directions sharing one timesteps
    tensor, say): safetensors refuses to save shared memory."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _encode_pca(pca: Any) -> bytes:
    """pca.safetensors bytes from a PerTimestepPCA (its ``to_safetensors_dict()``, accumulation dtype
    kept) or a ``(tensors, metadata)`` pair such as ``pca.to_safetensors_dict(torch.float32)``."""
    from safetensors.torch import save

    if hasattr(pca, "to_safetensors_dict"):
        tensors, metadata = pca.to_safetensors_dict()
    elif (
        isinstance(pca, tuple)
        and len(pca) == 2
        and isinstance(pca[0], Mapping)
        and isinstance(pca[1], Mapping)
    ):
        tensors, metadata = pca
    else:
        raise ValueError(
            f"pca must be a PerTimestepPCA or a (tensors, metadata) pair from its to_safetensors_dict(), "
            f"got {type(pca).__name__}"
        )
    bad = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
    if bad or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"pca tensors must be torch.Tensor and metadata str -> str (bad tensor keys: {bad})")
    return save(_unshare(tensors), metadata=dict(metadata))


# ---------------------------------------------------------------------- manifest schema
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_MANIFEST_BYTES = 64 << 20


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_manifest(raw: bytes, *, path: str, model: str, version: str) -> dict[str, Any]:
    """Parse and validate a manifest.json read from ``path`` (the manifest of ``model``/``version``).

    Checks the JSON, ``schema_version``, that ``version`` (and ``model.name``, if given) match where
    the manifest lies, and every ``files`` and ``directions`` entry. Raises :class:`ManifestError`
    (a ValueError) naming the file and the field for anything else.
    """
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{path}: not a manifest (bytes up to {MAX_MANIFEST_BYTES}, got {type(raw).__name__})"
        )
    try:
        manifest = loads_json(raw)
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, or a repeated key
        raise ManifestError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: a manifest is a JSON object, got {type(manifest).__name__}")
    schema = manifest.get("schema_version")
    if not _is_int(schema) or not 1 <= schema <= SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: schema_version {schema!r} is not supported (this hspace reads 1 to {SCHEMA_VERSION}); "
            "upgrade hspace"
        )
    if manifest.get("version") != version:
        raise ManifestError(
            f"{path}: field 'version' is {manifest.get('version')!r}, but the manifest lies in {version!r}"
        )
    info = manifest.get("model")
    if not isinstance(info, dict) or info.get("name", model) != model:
        raise ManifestError(f"{path}: field 'model' must be an object whose name is {model!r}, got {info!r}")
    for key in ("files", "directions"):
        if not isinstance(manifest.get(key), list):
            raise ManifestError(f"{path}: field {key!r} must be a list")
    files = _check_manifest_files(manifest["files"], path)
    _check_manifest_directions(manifest["directions"], path)
    if manifest["directions"] and DIRECTIONS_FILE not in files:
        raise ManifestError(f"{path}: lists directions but no {DIRECTIONS_FILE} in 'files'")
    return manifest


def _check_manifest_files(entries: list[Any], path: str) -> set[str]:
    seen: set[str] = set()
    for f in entries:
        if not isinstance(f, dict):
            raise ManifestError(f"{path}: every entry of 'files' must be an object, got {f!r}")
        try:
            rel = _check_relpath(f.get("path"), f"file path in {path}")
        except ValueError as err:
            raise ManifestError(str(err)) from None
        if rel == MANIFEST or rel in seen:
            raise ManifestError(f"{path}: file {rel!r} is listed twice or is the manifest itself")
        seen.add(rel)
        sha = f.get("sha256")
        if not isinstance(sha, str) or not _SHA256_RE.match(sha):
            raise ManifestError(
                f"{path}: file {rel!r} has no valid checksum (sha256 must be 64 lowercase hex digits, got {sha!r})"
            )
        size = f.get("bytes")
        if not _is_int(size) or size < 0:
            raise ManifestError(f"{path}: file {rel!r} needs 'bytes', an integer >= 0, got {size!r}")
    return seen


def _check_manifest_directions(entries: list[Any], path: str) -> None:
    seen: set[str] = set()
    for d in entries:
        name = d.get("name") if isinstance(d, dict) else None
        if not isinstance(name, str) or not name or name in seen:
            raise ManifestError(f"{path}: every entry of 'directions' needs a unique name, got {d!r}")
        seen.add(name)
        shape = d.get("shape")
        if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
            raise ManifestError(
                f"{path}: direction {name!r} needs 'shape', a list of integers >= 0, got {shape!r}"
            )
        if not isinstance(d.get("kind"), str):
            raise ManifestError(f"{path}: direction {name!r} needs 'kind', a string, got {d.get('kind')!r}")
        if not isinstance(d.get("model_fingerprint"), (str, type(None))):
            raise ManifestError(f"{path}: direction {name!r}: 'model_fingerprint' must be a string or null")


# ---------------------------------------------------------------------- results
@dataclasses.dataclass
class CatalogDiff:
    """Difference between two versions: cosine per common direction (flattened over steps)."""

    a: str
    b: str
    cosine: dict[str, float]
    added: list[str]
    removed: list[str]
    incompatible: list[str]


class CatalogVersion:
    """One complete, immutable version: its manifest and checksum-verified access to its files."""

    def __init__(self, catalog: Catalog, model: str, version: str, manifest: dict[str, Any]) -> None:
        self.catalog, self.model, self.version, self.manifest = catalog, model, version, manifest
        self._files = {f["path"]: f for f in manifest["files"]}
        self._entries = {d["name"]: d for d in manifest["directions"]}
        self._direction_cache: tuple[dict[str, Tensor], dict[str, str]] | None = None

    def __repr__(self) -> str:
        return f"CatalogVersion(model={self.model!r}, version={self.version!r}, directions={self.direction_names()})"

    @property
    def path(self) -> str:
        return self.catalog._version_dir(self.model, self.version)

    def files(self) -> list[str]:
        """Relative paths of every file the manifest lists (manifest.json itself excluded)."""
        return sorted(self._files)

    def read_file(self, relpath: str) -> bytes:
        """The bytes of a listed file, after checking its size and sha256 against the manifest."""
        _check_relpath(relpath)
        entry = self._files.get(relpath)
        if entry is None:
            raise FileNotFoundError(
                f"version {self.version} of model {self.model!r} has no file {relpath!r}; files: {self.files()}"
            )
        full = f"{self.path}/{relpath}"
        try:
            data = self.catalog.fs.cat_file(full)
        except FileNotFoundError:
            raise FileNotFoundError(f"{full} is listed in the manifest but missing from storage") from None
        if len(data) != entry["bytes"]:  # types checked by parse_manifest
            raise ChecksumError(full, f"{entry['bytes']} bytes", f"{len(data)} bytes", what="size")
        digest = _sha256(data)
        if digest != entry["sha256"]:
            raise ChecksumError(full, entry["sha256"], digest)
        return data

    def verify(self) -> None:
        """Check every listed file; raises ChecksumError / FileNotFoundError on the first bad one."""
        for rel in self.files():
            self.read_file(rel)

    def direction_names(self) -> list[str]:
        """Names of the directions in this version, in published order."""
        return [d["name"] for d in self.manifest["directions"]]

    def _safetensors(self, relpath: str) -> tuple[dict[str, Tensor], dict[str, str]]:
        """A verified safetensors file parsed; anything unparsable is a CorruptFileError naming it."""
        from safetensors import SafetensorError

        full = f"{self.path}/{relpath}"
        data = self.read_file(relpath)
        try:
            tensors, metadata = safetensors_from_bytes(data, full)
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise ValueError("header metadata must map str to str")
        except (SafetensorError, ValueError, TypeError, AttributeError, KeyError, OverflowError) as err:
            raise CorruptFileError(f"{full} is not a readable safetensors file ({err})") from None
        return tensors, metadata

    def _direction_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        if self._direction_cache is None:
            tensors, metadata = self._safetensors(DIRECTIONS_FILE)
            full = f"{self.path}/{DIRECTIONS_FILE}"
            try:
                stored = direction_names(metadata)
            except (ValueError, TypeError, AttributeError, KeyError) as err:
                raise CorruptFileError(f"{full}: unreadable direction metadata ({err})") from None
            listed = self.direction_names()
            if sorted(stored) != sorted(listed):
                raise CorruptFileError(
                    f"{full} holds directions {sorted(stored)} but its manifest lists {sorted(listed)}"
                )
            self._direction_cache = tensors, metadata
        return self._direction_cache

    def _load_direction(self, name: str) -> Direction:
        """One direction from the verified file, checked against its manifest entry."""
        tensors, metadata = self._direction_tensors()
        full = f"{self.path}/{DIRECTIONS_FILE}"
        try:
            d = Direction.from_safetensors_dict(tensors, metadata, name)
        except (ValueError, TypeError, AttributeError, KeyError, RuntimeError) as err:
            raise CorruptFileError(f"{full}: direction {name!r} is unreadable ({err})") from None
        entry = self._entries[name]
        stored = {
            "name": d.name,
            "kind": d.kind,
            "model_fingerprint": d.model_fingerprint,
            "shape": list(d.vector.shape),
        }
        wrong = {k: (v, entry.get(k)) for k, v in stored.items() if v != entry.get(k)}
        if wrong:
            detail = ", ".join(f"{k}: file {a!r} vs manifest {b!r}" for k, (a, b) in wrong.items())
            raise CorruptFileError(f"{full}: direction {name!r} disagrees with its manifest entry ({detail})")
        return d

    def direction(self, name: str) -> Direction:
        """One direction, from the checksum-verified directions.safetensors."""
        if name not in self.direction_names():
            raise ValueError(
                f"version {self.version} of model {self.model!r} has no direction {name!r}; "
                f"directions: {self.direction_names()}"
            )
        return self._load_direction(name)

    def directions(self, *, min_grade: str | None = None) -> dict[str, Direction]:
        """Every direction, keyed by name, in published order; with ``min_grade`` (``"A"`` .. ``"F"``)
        only those whose manifest ``grade`` is that letter or better (ungraded ones are left out)."""
        names = self.direction_names()
        if min_grade is not None:
            from hspace.grade import grade_at_least

            entries = {d["name"]: d for d in self.manifest["directions"]}
            names = [n for n in names if grade_at_least(entries[n].get("grade"), min_grade)]
        return {n: self._load_direction(n) for n in names}

    def pca_safetensors(self) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        """The verified pca.safetensors as (tensors, metadata), or None if none was published."""
        if PCA_FILE not in self._files:
            return None
        return self._safetensors(PCA_FILE)

    def pca(self, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> Any:
        """The published ``hspace.pca.PerTimestepPCA``, or None if none was published."""
        raw = self.pca_safetensors()
        if raw is None:
            return None
        from hspace.pca import PerTimestepPCA

        return PerTimestepPCA.from_safetensors_dict(*raw, device=device, dtype=dtype)

    def effects(self) -> Any:
        """The published effects.json content, or None if none was published."""
        if EFFECTS_FILE not in self._files:
            return None
        try:
            return json.loads(self.read_file(EFFECTS_FILE))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptFileError(f"{self.path}/{EFFECTS_FILE} is not valid JSON ({err})") from None


@dataclasses.dataclass
class _GcState:
    """What one gc run decided at its start."""

    complete: set[str]
    keep: set[str]  # the newest versions and those the refs name
    left: dict[str, float]  # version -> when a ref last moved away from it
    marks: dict[str, float]  # version -> when a gc run first found it unreferenced
    now: float
    grace_s: float
    reader_grace_s: float
    dry_run: bool


# ---------------------------------------------------------------------- the catalog
class Catalog:
    """A direction catalog rooted at one fsspec location. Create it with :func:`open`."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        url: str,
        *,
        lock_timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.1,
    ) -> None:
        self.fs, self.root, self.url = fs, root.rstrip("/"), url
        self.lock_timeout_s = lock_timeout_s
        self._store = Store(fs, lock_timeout_s=lock_timeout_s, retries=retries, backoff_s=backoff_s)

    def __repr__(self) -> str:
        return f"Catalog({self.url!r})"

    # -------------------------------------------------------------- paths
    def _model_dir(self, model: str) -> str:
        return self._inside_root(f"{self.root}/{_check_name(model, 'model')}")

    def _version_dir(self, model: str, version: str) -> str:
        return self._inside_root(f"{self._model_dir(model)}/versions/{_check_name(version, 'version')}")

    def _inside_root(self, path: str) -> str:
        """``path``, after checking that on a local disk it does not resolve outside the root."""
        if self._store.is_local:
            root = os.path.realpath(self.fs._strip_protocol(self.root))
            real = os.path.realpath(self.fs._strip_protocol(path))
            if real != root and not real.startswith(root + os.sep):
                raise UnsafePathError(
                    f"{path} resolves to {real}, outside the catalog root {root} (a symlink?): refused"
                )
        return path

    def _ref_path(self, model: str, ref: str) -> str:
        return f"{self._model_dir(model)}/refs/{_check_name(ref, 'ref')}"

    def _fresh(self) -> None:
        """Drop cached listings so other writers' versions and refs are seen."""
        self.fs.invalidate_cache()

    def _ls_names(self, path: str, kind: str) -> list[str]:
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return sorted({e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == kind})

    # -------------------------------------------------------------- listing
    def models(self) -> list[str]:
        """Models that have at least one complete version, sorted."""
        self._fresh()
        found = self.fs.glob(f"{self.root}/*/versions/*/{MANIFEST}")
        names = {p.rstrip("/").split("/")[-4] for p in found}
        return sorted(n for n in names if _NAME_RE.match(n))

    def versions(self, model: str) -> list[str]:
        """Complete versions (manifest present) of a model, oldest first (ids sort by time)."""
        base = f"{self._model_dir(model)}/versions"
        self._fresh()
        found = self.fs.glob(f"{base}/*/{MANIFEST}")
        names = {p.rstrip("/").split("/")[-2] for p in found}
        return sorted(n for n in names if _NAME_RE.match(n))

    def refs(self, model: str) -> dict[str, str]:
        """Every ref of a model and the version it names.

        A malformed ref file is skipped with a :class:`MalformedRefWarning` naming it; the others
        are still returned.
        """
        good, bad = self._scan_refs(model)
        self._warn_malformed(model, bad)
        return {name: ref["version"] for name, ref in good.items()}

    def _scan_refs(self, model: str) -> tuple[dict[str, dict[str, Any]], dict[str, bytes]]:
        """(parsed refs, raw bytes of malformed refs) of a model."""
        self._fresh()
        good, bad = {}, {}
        for name in self._ls_names(f"{self._model_dir(model)}/refs", "file"):
            if not _NAME_RE.match(name):  # lock and temporary files
                continue
            path = self._ref_path(model, name)
            data, _ = self._store.retry(lambda path=path: self._store.read_raw(path))
            if data is None:
                continue
            try:
                good[name] = self._parse_ref(data, model, name)
            except ValueError:
                bad[name] = data
        return good, bad

    def _warn_malformed(self, model: str, bad: Mapping[str, bytes], stacklevel: int = 3) -> None:
        for name, data in sorted(bad.items()):
            warnings.warn(
                MalformedRefWarning(
                    f"ref {name!r} of model {model!r} in {self.url} is malformed and was skipped "
                    f"({len(data)} bytes, starting {data[:60]!r}); fix it with set_ref"
                ),
                stacklevel=stacklevel,
            )

    def _manifest_exists(self, model: str, version: str) -> bool:
        path = f"{self._version_dir(model, version)}/{MANIFEST}"

        def probe() -> bool:  # not fs.exists: it answers False for any error, a transient one too
            try:
                self.fs.info(path)
                return True
            except FileNotFoundError:
                return False

        return self._store.retry(probe)

    def resolve(self, model: str, ref_or_version: str = "latest") -> str:
        """The version id a ref names, or the id itself if it is a complete version (refs win)."""
        _check_name(ref_or_version, "ref or version")
        self._fresh()
        ref = self._read_ref(model, ref_or_version)
        if ref is not None:
            version = ref["version"]
            if not self._manifest_exists(model, version):
                raise FileNotFoundError(
                    f"ref {ref_or_version!r} of model {model!r} names version {version!r}, which has no "
                    f"manifest in {self.url} (deleted or incomplete)"
                )
            return version
        if self._manifest_exists(model, ref_or_version):
            return ref_or_version
        versions = self.versions(model)
        if not versions:
            raise FileNotFoundError(f"catalog {self.url} has no model {model!r}; models: {self.models()}")
        raise FileNotFoundError(
            f"model {model!r} in {self.url} has no ref or complete version {ref_or_version!r}; "
            f"refs: {sorted(self.refs(model))}, newest versions: {versions[-5:]}"
        )

    def read_manifest(self, model: str, version: str) -> dict[str, Any]:
        """The parsed manifest.json of a complete version, with its structure validated."""
        path = f"{self._version_dir(model, version)}/{MANIFEST}"
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} does not exist: version {version!r} is missing or incomplete"
            ) from None
        return parse_manifest(raw, path=path, model=model, version=version)

    def version(self, model: str, ref_or_version: str = "latest") -> CatalogVersion:
        """A complete version by ref or id, with verified access to its files."""
        version = self.resolve(model, ref_or_version)
        return CatalogVersion(self, model, version, self.read_manifest(model, version))

    # -------------------------------------------------------------- publishing
    def publish(
        self,
        model: str,
        directions: Mapping[str, Direction] | Iterable[Direction],
        *,
        pca: Any = None,
        effects: Any = None,
        extra_files: Mapping[str, bytes] | None = None,
        metadata: Mapping[str, Any],
        ref: str | None = "latest",
        version: str | None = None,
        grades: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> str:
        """Write a new immutable version and move ``ref`` to it; returns the version id.

        ``grades`` (direction -> :mod:`hspace.grade` dict) become each manifest entry's ``grade``.

        ``metadata`` (JSON-able) may hold ``model_id``, ``revision``, ``config_hash``,
        ``model_fingerprint``, ``sampler``, ``timesteps``, ``inputs`` (the run manifest summary);
        other keys are kept under the manifest's ``extra``. Every input is validated before anything
        is written; the id is claimed (``~claim``), every file is created exclusively,
        ``manifest.json`` last, then the ref moves.

        Raises VersionExistsError if another publisher has (or is publishing) the id; PublishError
        (an OSError) if storage fails after the retries, having removed what it wrote; and
        RefNotAdvancedError, after committing, if ``ref`` names a later generated version id.
        """
        _check_name(model, "model")
        if ref is not None:
            _check_name(ref, "ref")
        version = new_version_id() if version is None else _check_name(version, "version")
        if not isinstance(metadata, Mapping):
            raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
        dir_list = _as_direction_list(directions)

        files: dict[str, bytes] = {}
        files[DIRECTIONS_FILE], entries = _encode_directions(dir_list)
        _attach_grades(entries, grades or {})
        if pca is not None:
            files[PCA_FILE] = _encode_pca(pca)
        if effects is not None:
            files[EFFECTS_FILE] = _dumps(effects, "effects")
        for rel, data in (extra_files or {}).items():
            _check_relpath(rel, "extra_files key")
            if rel in RESERVED_FILES:
                raise ValueError(f"extra_files key {rel!r} is reserved for the catalog's own files")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"extra_files[{rel!r}] must be bytes, got {type(data).__name__}")
            files[rel] = bytes(data)

        manifest_bytes = _dumps(
            self._manifest(model, version, metadata, dir_list, entries, files), "metadata"
        )
        if self._manifest_exists(model, version):
            raise VersionExistsError(f"version {version!r} of model {model!r} already exists in {self.url}")
        self._write_version(model, version, files)
        self._commit(model, version, manifest_bytes)
        if ref is not None:
            self._advance_ref(model, ref, version)
        return version

    def _write_version(self, model: str, version: str, files: Mapping[str, bytes]) -> None:
        """Claim the version id, then create every file (never replacing one); on failure remove
        what this call created and raise (VersionExistsError if another publisher owns the id)."""
        vdir = self._version_dir(model, version)
        claim = _dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": _utc_now(),
                "token": secrets.token_hex(8),
            },
            "claim",
        )
        written: list[str] = []
        try:
            for rel, data in [(CLAIM_FILE, claim), *sorted(files.items())]:
                try:
                    self._store.create_exclusive_retrying(f"{vdir}/{rel}", data)
                except FileExistsError:
                    raise VersionExistsError(
                        f"version {version!r} of model {model!r} is being published or was published by "
                        f"another writer in {self.url} ({vdir}/{rel} exists); nothing was written"
                    ) from None
                written.append(f"{vdir}/{rel}")
        except BaseException as err:
            self._discard(vdir, written)
            if isinstance(err, OSError) and not isinstance(err, CatalogError):
                raise PublishError(
                    f"publishing version {version!r} of model {model!r} to {self.url} failed "
                    f"({type(err).__name__}: {err}; transient errors are retried {self._store.retries} times); "
                    "nothing was committed and readers do not see the version"
                ) from err
            raise

    def _commit(self, model: str, version: str, manifest_bytes: bytes) -> None:
        """Create manifest.json exclusively: the version exists, complete, once this succeeds."""
        vdir = self._version_dir(model, version)
        path = f"{vdir}/{MANIFEST}"
        try:
            self._store.create_exclusive_retrying(path, manifest_bytes)
            return
        except FileExistsError:
            raise VersionExistsError(
                f"version {version!r} of model {model!r} was published concurrently in {self.url}"
            ) from None
        except OSError as err:
            failure = err
        try:  # the answer to the last try may have been lost: is the manifest there, and ours?
            found, _ = self._store.retry(lambda: self._store.read_raw(path))
        except OSError:
            raise PublishError(
                f"publishing version {version!r} of model {model!r} to {self.url}: writing {path} failed "
                f"({failure}) and the storage cannot be read; the version is complete if versions() lists it"
            ) from failure
        if found == manifest_bytes:
            return
        if found is not None:
            raise VersionExistsError(
                f"version {version!r} of model {model!r} was published concurrently in {self.url}"
            ) from None
        listed = [f"{vdir}/{f['path']}" for f in json.loads(manifest_bytes)["files"]]
        self._discard(vdir, [f"{vdir}/{CLAIM_FILE}", *listed])  # the claim goes last
        raise PublishError(
            f"publishing version {version!r} of model {model!r} to {self.url} failed writing {MANIFEST} "
            f"({failure}; transient errors are retried {self._store.retries} times); nothing was committed "
            "and readers do not see the version"
        ) from failure

    def _discard(self, vdir: str, written: list[str]) -> None:
        """Best-effort removal of the files an uncommitted publish created, in reverse order so that
        the claim (first in ``written``) goes last (gc removes whatever is left)."""
        for path in reversed(written):
            try:
                self._store.remove_file(path)
            except OSError:
                return
        if self._store.is_local:  # the now empty directories, deepest first
            local = self.fs._strip_protocol(vdir)
            subdirs = set()
            for p in written:
                d = os.path.dirname(self.fs._strip_protocol(p))
                while d.startswith(local + os.sep):
                    subdirs.add(d)
                    d = os.path.dirname(d)
            for d in [*sorted(subdirs, key=len, reverse=True), local]:
                try:
                    os.rmdir(d)
                except OSError:
                    pass

    def _manifest(
        self,
        model: str,
        version: str,
        metadata: Mapping[str, Any],
        directions: list[Direction],
        entries: list[dict[str, Any]],
        files: Mapping[str, bytes],
    ) -> dict[str, Any]:
        known = {"model_id", "revision", "config_hash", "model_fingerprint", "sampler", "timesteps", "inputs"}
        timesteps = metadata.get("timesteps")
        if timesteps is None:
            timesteps = next((d.timesteps.tolist() for d in directions if d.timesteps is not None), None)
        fingerprints = sorted({d.model_fingerprint for d in directions if d.model_fingerprint})
        return {
            "schema_version": SCHEMA_VERSION,
            "model": {
                "name": model,
                "id": metadata.get("model_id", model),
                "revision": metadata.get("revision"),
                "config_hash": metadata.get("config_hash"),
                "fingerprint": metadata.get(
                    "model_fingerprint", fingerprints[0] if len(fingerprints) == 1 else None
                ),
            },
            "version": version,
            "sampler": metadata.get("sampler"),
            "timesteps": timesteps,
            "code_version": _code_version(),
            "created": _utc_now(),
            "inputs": metadata.get("inputs", {}),
            "extra": {k: v for k, v in metadata.items() if k not in known},
            "files": [
                {"path": rel, "sha256": _sha256(data), "bytes": len(data)}
                for rel, data in sorted(files.items())
            ],
            "directions": entries,
        }

    # -------------------------------------------------------------- refs
    def _read_ref(self, model: str, ref: str) -> dict[str, Any] | None:
        data, _ = self._store.read_raw(self._ref_path(model, ref))
        return None if data is None else self._parse_ref(data, model, ref)

    def _parse_ref(self, data: bytes, model: str, ref: str) -> dict[str, Any]:
        try:
            obj = json.loads(data)
            _check_name(obj["version"], "version")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"ref {ref!r} of model {model!r} in {self.url} is malformed ({err})") from None
        return obj

    def set_ref(
        self, model: str, ref: str, version: str, *, expected: str | None | EllipsisType = ...
    ) -> None:
        """Point ``ref`` at a complete ``version`` by compare-and-swap.

        ``expected``: the version the ref must name now (None: the ref must not exist; ``...``: any).
        Raises RefConflictError if it names something else, FileNotFoundError for an unknown version.
        """
        _check_name(version, "version")
        if not self._manifest_exists(model, version):
            raise FileNotFoundError(f"model {model!r} has no complete version {version!r} in {self.url}")

        def update(current: dict[str, Any] | None) -> dict[str, Any] | None:
            now = None if current is None else current["version"]
            if now == version:  # already there (or our earlier try's answer was lost)
                return None
            if expected is not ... and now != expected:
                raise RefConflictError(f"ref {ref!r} of model {model!r} names {now!r}, expected {expected!r}")
            return {"version": version, "updated": _utc_now(), "previous": now}

        self._move_ref(model, ref, version, update)

    def _advance_ref(self, model: str, ref: str, version: str) -> None:
        """Move ``ref`` to ``version`` unless it names a later generated version id (no moving back);
        then raise RefNotAdvancedError so the publisher knows its version is not what the ref serves."""
        later: list[str] = []

        def update(current: dict[str, Any] | None) -> dict[str, Any] | None:
            now = None if current is None else current["version"]
            later.clear()
            if now == version:
                return None
            if now is not None and _is_generated_id(now) and _is_generated_id(version) and now > version:
                later.append(now)
                return None
            return {"version": version, "updated": _utc_now(), "previous": now}

        self._move_ref(model, ref, version, update)
        if later:
            raise RefNotAdvancedError(model, ref, version, later[0])

    def _move_ref(
        self,
        model: str,
        ref: str,
        version: str,
        update: Callable[[dict[str, Any] | None], dict[str, Any] | None],
    ) -> None:
        """Update a ref by CAS, then check that its version survived: gc may have removed it between
        the caller's existence check and the write. If so, put the ref back and raise."""
        if not self._update_ref(model, ref, update) or self._manifest_exists(model, version):
            return

        def undo(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is None or current["version"] != version or not current.get("previous"):
                return None
            return {"version": current["previous"], "updated": _utc_now(), "previous": version}

        self._update_ref(model, ref, undo)
        raise FileNotFoundError(
            f"version {version!r} of model {model!r} was removed (by gc) while ref {ref!r} moved to it; "
            "the ref was put back"
        )

    def _update_ref(
        self,
        model: str,
        ref: str,
        update: Callable[[dict[str, Any] | None], dict[str, Any] | None],
        attempts: int = 8,
    ) -> bool:
        """Read-modify-write one ref by compare-and-swap (``update`` returns None to leave it);
        True if it was written."""

        def update_bytes(data: bytes | None) -> bytes | None:
            new = update(None if data is None else self._parse_ref(data, model, ref))
            return None if new is None else _dumps(new, "ref")

        try:
            path = self._ref_path(model, ref)
            return self._store.retry(lambda: self._store.compare_and_swap(path, update_bytes, attempts))
        except CasConflictError:
            raise RefConflictError(
                f"could not move ref {ref!r} of model {model!r}: it kept changing ({attempts} tries)"
            ) from None
        except (LockHeldError, LockLostError) as err:
            raise RefConflictError(str(err)) from None

    # -------------------------------------------------------------- comparing and cleaning
    def diff(self, model: str, a: str, b: str) -> CatalogDiff:
        """Cosine similarity (over all steps) of every direction the two versions share, plus
        the names only in ``b`` (added), only in ``a`` (removed), and shared with different shapes."""
        va, vb = self.version(model, a), self.version(model, b)
        da, db = va.directions(), vb.directions()
        cosine, incompatible = {}, []
        for name in [n for n in da if n in db]:
            x, y = da[name].vector.to(torch.float64).flatten(), db[name].vector.to(torch.float64).flatten()
            if da[name].vector.shape != db[name].vector.shape:
                incompatible.append(name)
                continue
            denom = float(x.norm() * y.norm())
            cosine[name] = float(x @ y) / denom if denom > 0 else float("nan")
        return CatalogDiff(
            a=va.version,
            b=vb.version,
            cosine=cosine,
            added=[n for n in db if n not in da],
            removed=[n for n in da if n not in db],
            incompatible=incompatible,
        )

    def gc(
        self,
        model: str,
        keep: int = 5,
        *,
        grace_s: float = 3600.0,
        reader_grace_s: float | None = None,
        dry_run: bool = False,
    ) -> list[str]:
        """Remove old versions; returns the removed version ids (sorted).

        Keeps the ``keep`` newest complete versions and every version a ref names (refs are read
        at the start and again right before each removal). Removes the other complete versions
        (manifest first, so readers stop seeing them at once) and incomplete version directories
        (failed or running publishes) untouched for ``grace_s`` seconds.

        ``reader_grace_s`` (default: ``grace_s``) protects readers: a complete version is removed
        only once ``reader_grace_s`` seconds have passed since a gc run first found it unreferenced
        (it is then recorded under ``<model>/gc/``) and since a ref last named it, so a reader that
        resolved it through a ref can use it at least that long; a scheduled gc removes it on a
        later run. With 0 unreferenced versions beyond ``keep`` are removed at once. Concurrent
        gc runs are safe.
        """
        if reader_grace_s is None:
            reader_grace_s = grace_s
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"keep must be an int >= 1 (the newest version is always kept), got {keep!r}")
        for name, value in (("grace_s", grace_s), ("reader_grace_s", reader_grace_s)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        complete = self.versions(model)
        named, left = self._named_versions(model, complete, warn=True)
        state = _GcState(
            complete=set(complete),
            keep=set(complete[-keep:]) | named,
            left=left,
            marks=self._gc_marks(model),
            now=time.time(),
            grace_s=grace_s,
            reader_grace_s=reader_grace_s,
            dry_run=dry_run,
        )
        removed = []
        dirs = self._ls_names(f"{self._model_dir(model)}/versions", "directory")
        for name in dirs:
            if not _NAME_RE.match(name) or not self._gc_due(model, name, state):
                continue
            if dry_run or self._remove_version(model, name, complete=name in state.complete):
                removed.append(name)
        if not dry_run:
            for name in set(state.marks) - set(dirs):  # the version is gone (removed by another gc run)
                self._store.remove_file(self._mark_path(model, name))
        self._fresh()
        return sorted(removed)

    def _gc_due(self, model: str, name: str, state: _GcState) -> bool:
        """Whether gc may remove version directory ``name`` now (records first sightings)."""
        if name in state.keep:
            if name in state.marks and not state.dry_run:
                self._store.remove_file(self._mark_path(model, name))  # referenced again
            return False
        if name not in state.complete:
            vdir = f"{self._model_dir(model)}/versions/{name}"
            return state.now - self._last_modified(vdir, name) >= state.grace_s
        if state.reader_grace_s <= 0:
            return True
        since = max(state.marks.get(name, state.now), state.left.get(name, 0.0))
        if name not in state.marks and not state.dry_run:
            self._mark(model, name, state.now)
        return state.now - since >= state.reader_grace_s

    def _named_versions(
        self, model: str, complete: list[str], *, warn: bool
    ) -> tuple[set[str], dict[str, float]]:
        """Versions the refs name now and, per version a ref named before its last move, when that
        move happened. A malformed ref keeps alive every version whose id appears in its bytes."""
        good, bad = self._scan_refs(model)
        if warn:
            self._warn_malformed(model, bad, stacklevel=4)
        named = {r["version"] for r in good.values()}
        named |= {v for v in complete for data in bad.values() if v.encode() in data}
        left: dict[str, float] = {}
        for r in good.values():
            prev, updated = r.get("previous"), r.get("updated")
            try:
                t = _dt.datetime.fromisoformat(str(updated)).timestamp()
            except (ValueError, OverflowError, OSError):
                continue
            if isinstance(prev, str):
                left[prev] = max(left.get(prev, 0.0), t)
        return named, left

    def _mark_path(self, model: str, version: str) -> str:
        return f"{self._model_dir(model)}/{GC_DIR}/{_check_name(version, 'version')}"

    def _mark(self, model: str, version: str, now: float) -> None:
        try:
            self._store.create_exclusive(self._mark_path(model, version), _dumps({"since": now}, "gc mark"))
        except FileExistsError:  # another gc run marked it first: its (earlier) time stands
            pass

    def _gc_marks(self, model: str) -> dict[str, float]:
        """When gc runs first found each version unreferenced (unreadable marks: now)."""
        marks = {}
        for name in self._ls_names(f"{self._model_dir(model)}/{GC_DIR}", "file"):
            if not _NAME_RE.match(name):
                continue
            data, _ = self._store.read_raw(self._mark_path(model, name))
            try:
                marks[name] = float(json.loads(data or b"")["since"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
                marks[name] = time.time()
        return marks

    def _remove_version(self, model: str, version: str, *, complete: bool) -> bool:
        """Remove one version unless a ref names it right now; the manifest goes first and comes
        back if a ref moved to the version meanwhile. False if the version was left alone."""
        vdir = self._version_dir(model, version)
        manifest = f"{vdir}/{MANIFEST}"
        if complete:
            if version in self._named_versions(model, [version], warn=False)[0]:
                return False
            data, _ = self._store.read_raw(manifest)
            self._store.remove_file(manifest)
            if version in self._named_versions(model, [version], warn=False)[0]:
                if data is not None:
                    try:
                        self._store.create_exclusive(manifest, data)
                    except FileExistsError:
                        pass
                return False
        elif self._manifest_exists(model, version):  # a slow publish committed meanwhile
            return False
        self._store.remove_tree(vdir)
        self._store.remove_file(self._mark_path(model, version))
        return True

    def _last_modified(self, vdir: str, version: str) -> float:
        """Newest modification time of anything in a version directory (epoch seconds)."""
        try:
            infos = self.fs.find(vdir, detail=True).values()
        except FileNotFoundError:
            infos = []
        times = [t for t in (mtime(i) for i in infos) if t is not None]
        if not times:
            t = _version_timestamp(version)
            times = [t] if t is not None else [0.0]
        return max(times)


def open(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    lock_timeout_s: float = 30.0,
    retries: int = 3,
    backoff_s: float = 0.1,
) -> Catalog:
    """Open (or start) a catalog at any fsspec URL: a local path, ``memory://...``, ``s3://bucket/prefix``.

    The URL is resolved once with ``fsspec.core.url_to_fs(url, **storage_options)``.
    ``lock_timeout_s``: how long a ref update waits for another writer's lock (and, on backends
    with lock files, when such a lock counts as stale). ``retries`` / ``backoff_s``: how often a
    write failing with a transient error (ConnectionError, TimeoutError) is tried again, waiting
    ``backoff_s * 2**attempt`` in between.
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f"catalog url must be a non-empty string, got {url!r}")
    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return Catalog(fs, root, url, lock_timeout_s=lock_timeout_s, retries=retries, backoff_s=backoff_s)
