"""The versioned direction catalog on any fsspec URL (design.md, "Catalog").

A catalog holds, per model, immutable *versions* of a set of h-space directions (the paper's PCA,
Jacobian, supervised, disentangled and random-baseline directions, sections IV-V), optional PCA
state and effect matrix, and named *refs* ("latest", "stable", ...) pointing at versions::

    <root>/<model>/versions/<version>/
        manifest.json            written LAST, with exclusive create: the version exists once it does
        directions.safetensors   one tensor per direction ([T,C,H,W] float32, or [C,H,W] for a
                                 direction used at every step), keys <name>, <name>.sigma,
                                 <name>.timesteps, JSON metadata per direction
        pca.safetensors          optional: PerTimestepPCA state (its to_safetensors_dict())
        effects.json             optional: effect matrix and baselines
        previews/*.png, ...      optional extra files
    <root>/<model>/refs/<name>   {"version": ..., "updated": ..., "previous": ...}

Readers resolve a ref, read the manifest and check the sha256 and size of every file before they
parse it; nothing is unpickled. A version directory without ``manifest.json`` is incomplete: it is
ignored by readers and removed by :meth:`Catalog.gc` after a grace period.

Guarantees per backend:

- manifest exclusive create: local paths write a temporary file and ``os.link`` it into place
  (atomic and exclusive on POSIX filesystems); S3 uses ``If-None-Match: *`` (s3fs ``mode="xb"``,
  atomic on AWS S3 and moto); ``memory://`` checks and creates under fsspec's ``"xb"`` mode
  (exclusive within one process); other filesystems use ``"xb"`` where supported, else a check
  for existence followed by a write (best effort, documented race).
- ref compare-and-swap: S3 reads the ref together with its ETag and writes with ``If-Match``
  (``If-None-Match: *`` for a new ref): a true server-side CAS. Every other backend takes a lock
  object ``<ref>~lock`` by exclusive create, re-reads, writes (local: temporary file + atomic
  rename) and re-reads to verify; a lock older than ``lock_timeout_s`` is considered stale and
  broken. That is a CAS among cooperating writers on local disks and in one process for
  ``memory://``, and best effort elsewhere. Both primitives live in :mod:`hspace._catalog_store`.
- publishing never moves a ref backwards: if the ref already names a generated version id (UTC
  timestamp + random suffix) that sorts after the new one, it is left alone. Explicit version ids
  given by the caller are not compared; they should sort by time, as ``versions()`` and ``gc``
  order versions by id.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from types import EllipsisType
from typing import Any

import fsspec
import torch
from torch import Tensor

from hspace._catalog_store import CasConflictError, LockHeldError, Store, mtime
from hspace.directions import Direction, direction_names, directions_to_safetensors
from hspace.io import safetensors_from_bytes

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
]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DIRECTIONS_FILE = "directions.safetensors"
PCA_FILE = "pca.safetensors"
EFFECTS_FILE = "effects.json"
RESERVED_FILES = frozenset({MANIFEST, DIRECTIONS_FILE, PCA_FILE, EFFECTS_FILE})

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
        if len(data) != entry["bytes"]:
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

    def _direction_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        if self._direction_cache is None:
            data = self.read_file(DIRECTIONS_FILE)
            self._direction_cache = safetensors_from_bytes(data, f"{self.path}/{DIRECTIONS_FILE}")
        return self._direction_cache

    def direction(self, name: str) -> Direction:
        """One direction, from the checksum-verified directions.safetensors."""
        if name not in self.direction_names():
            raise ValueError(
                f"version {self.version} of model {self.model!r} has no direction {name!r}; "
                f"directions: {self.direction_names()}"
            )
        tensors, metadata = self._direction_tensors()
        return Direction.from_safetensors_dict(tensors, metadata, name)

    def directions(self, *, min_grade: str | None = None) -> dict[str, Direction]:
        """Every direction, keyed by name, in published order; with ``min_grade`` (``"A"`` .. ``"F"``)
        only those whose manifest ``grade`` is that letter or better (ungraded ones are left out)."""
        names = self.direction_names()
        if min_grade is not None:
            from hspace.grade import grade_at_least

            entries = {d["name"]: d for d in self.manifest["directions"]}
            names = [n for n in names if grade_at_least(entries[n].get("grade"), min_grade)]
        tensors, metadata = self._direction_tensors()
        stored = set(direction_names(metadata))
        missing = [n for n in names if n not in stored]
        if missing:
            raise ValueError(f"{self.path}/{DIRECTIONS_FILE} lacks directions the manifest lists: {missing}")
        return {n: Direction.from_safetensors_dict(tensors, metadata, n) for n in names}

    def pca_safetensors(self) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        """The verified pca.safetensors as (tensors, metadata), or None if none was published."""
        if PCA_FILE not in self._files:
            return None
        return safetensors_from_bytes(self.read_file(PCA_FILE), f"{self.path}/{PCA_FILE}")

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
        return json.loads(self.read_file(EFFECTS_FILE))


# ---------------------------------------------------------------------- the catalog
class Catalog:
    """A direction catalog rooted at one fsspec location. Create it with :func:`open`."""

    def __init__(
        self, fs: fsspec.AbstractFileSystem, root: str, url: str, *, lock_timeout_s: float = 30.0
    ) -> None:
        self.fs, self.root, self.url = fs, root.rstrip("/"), url
        self.lock_timeout_s = lock_timeout_s
        self._store = Store(fs, lock_timeout_s=lock_timeout_s)

    def __repr__(self) -> str:
        return f"Catalog({self.url!r})"

    # -------------------------------------------------------------- paths
    def _model_dir(self, model: str) -> str:
        return f"{self.root}/{_check_name(model, 'model')}"

    def _version_dir(self, model: str, version: str) -> str:
        return f"{self._model_dir(model)}/versions/{_check_name(version, 'version')}"

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
        """Every ref of a model and the version it names."""
        self._fresh()
        out = {}
        for name in self._ls_names(f"{self._model_dir(model)}/refs", "file"):
            if _NAME_RE.match(name):
                ref = self._read_ref(model, name)
                if ref is not None:
                    out[name] = ref["version"]
        return out

    def _manifest_exists(self, model: str, version: str) -> bool:
        return self.fs.exists(f"{self._version_dir(model, version)}/{MANIFEST}")

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
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
        schema = manifest.get("schema_version") if isinstance(manifest, dict) else None
        if not isinstance(schema, int) or schema > SCHEMA_VERSION:
            raise ValueError(
                f"{path}: schema_version {schema!r} is not supported (this hspace reads up to {SCHEMA_VERSION}); "
                "upgrade hspace"
            )
        for key in ("files", "directions"):
            if not isinstance(manifest.get(key), list):
                raise ValueError(f"{path}: field {key!r} must be a list")
        for f in manifest["files"]:
            if not isinstance(f, dict) or not {"path", "sha256", "bytes"} <= set(f):
                raise ValueError(f"{path}: every entry of 'files' needs path, sha256 and bytes, got {f!r}")
            _check_relpath(f["path"], f"file path in {path}")
        for d in manifest["directions"]:
            if not isinstance(d, dict) or not isinstance(d.get("name"), str):
                raise ValueError(f"{path}: every entry of 'directions' needs a name, got {d!r}")
        return manifest

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
        is written; files go first, ``manifest.json`` last (exclusive create), then the ref moves.
        An exception part-way leaves an incomplete version that readers ignore.
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
        vdir = self._version_dir(model, version)
        if self._manifest_exists(model, version):
            raise VersionExistsError(f"version {version!r} of model {model!r} already exists in {self.url}")
        for rel in sorted(files):
            self._store.write_file(f"{vdir}/{rel}", files[rel])
        try:
            self._store.create_exclusive(f"{vdir}/{MANIFEST}", manifest_bytes)
        except FileExistsError:
            raise VersionExistsError(
                f"version {version!r} of model {model!r} was published concurrently in {self.url}"
            ) from None
        if ref is not None:
            self._advance_ref(model, ref, version)
        return version

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

        def update(current: dict[str, Any] | None) -> dict[str, Any]:
            now = None if current is None else current["version"]
            if expected is not ... and now != expected:
                raise RefConflictError(f"ref {ref!r} of model {model!r} names {now!r}, expected {expected!r}")
            return {"version": version, "updated": _utc_now(), "previous": now}

        self._update_ref(model, ref, update)

    def _advance_ref(self, model: str, ref: str, version: str) -> None:
        """Move ``ref`` to ``version`` unless it names a later generated version id (no moving back)."""

        def update(current: dict[str, Any] | None) -> dict[str, Any] | None:
            now = None if current is None else current["version"]
            if now is not None and _is_generated_id(now) and _is_generated_id(version) and now > version:
                return None  # a later publish already moved it
            return {"version": version, "updated": _utc_now(), "previous": now}

        self._update_ref(model, ref, update)

    def _update_ref(
        self,
        model: str,
        ref: str,
        update: Callable[[dict[str, Any] | None], dict[str, Any] | None],
        attempts: int = 8,
    ) -> None:
        """Read-modify-write one ref by compare-and-swap (``update`` returns None to leave it)."""

        def update_bytes(data: bytes | None) -> bytes | None:
            new = update(None if data is None else self._parse_ref(data, model, ref))
            return None if new is None else _dumps(new, "ref")

        try:
            self._store.compare_and_swap(self._ref_path(model, ref), update_bytes, attempts)
        except CasConflictError:
            raise RefConflictError(
                f"could not move ref {ref!r} of model {model!r}: it kept changing ({attempts} tries)"
            ) from None
        except LockHeldError as err:
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

    def gc(self, model: str, keep: int = 5, *, grace_s: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Remove old versions; returns the removed version ids (sorted).

        Keeps the ``keep`` newest complete versions and every version a ref names; removes the
        other complete versions (manifest first, so readers stop seeing them at once) and
        incomplete version directories older than ``grace_s`` seconds (younger ones may be a
        publish in progress).
        """
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"keep must be an int >= 1 (the newest version is always kept), got {keep!r}")
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s!r}")
        base = f"{self._model_dir(model)}/versions"
        complete = self.versions(model)
        referenced = set(self.refs(model).values())
        keep_set = set(complete[-keep:]) | referenced
        now = time.time()
        removed = []
        for name in self._ls_names(base, "directory"):
            if name in keep_set or not _NAME_RE.match(name):
                continue
            vdir = f"{base}/{name}"
            if name not in complete and now - self._last_modified(vdir, name) < grace_s:
                continue
            removed.append(name)
            if not dry_run:
                if name in complete:
                    self.fs.rm_file(f"{vdir}/{MANIFEST}")
                self.fs.rm(vdir, recursive=True)
        self._fresh()
        return sorted(removed)

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
    url: str, storage_options: Mapping[str, Any] | None = None, *, lock_timeout_s: float = 30.0
) -> Catalog:
    """Open (or start) a catalog at any fsspec URL: a local path, ``memory://...``, ``s3://bucket/prefix``.

    The URL is resolved once with ``fsspec.core.url_to_fs(url, **storage_options)``.
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f"catalog url must be a non-empty string, got {url!r}")
    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return Catalog(fs, root, url, lock_timeout_s=lock_timeout_s)
