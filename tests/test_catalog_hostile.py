"""Hostile and malformed input read through the catalog: manifests breaking the schema, direction
files whose metadata disagrees with their manifest, hostile safetensors headers (also from a
publisher whose manifest checksums match them), symlinks leading out of the root; plus
property-based tests of the manifest reader."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import struct

import fsspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hspace import catalog as hcat
from hspace.catalog import ChecksumError, CorruptFileError, ManifestError, UnsafePathError, parse_manifest

try:  # `python -m pytest` puts the repo root on sys.path; bare `pytest` only puts tests/ there
    from tests.catalog_backends import META, any_cat, make_direction, s3_bucket, s3_server  # noqa: F401
except ModuleNotFoundError:  # pragma: no cover
    from catalog_backends import META, any_cat, make_direction  # noqa: F401
    from s3_server import s3_bucket, s3_server  # noqa: F401


@pytest.fixture
def local_cat(tmp_path):
    return hcat.open(str(tmp_path / "catalog"))


def manifest_path(cat, version: str) -> str:
    return f"{cat.root}/m/versions/{version}/manifest.json"


def rewrite_manifest(cat, version: str, change) -> None:
    """A hostile (or buggy) publisher: edit the manifest in place."""
    m = json.loads(cat.fs.cat_file(manifest_path(cat, version)))
    change(m)
    cat.fs.pipe_file(manifest_path(cat, version), json.dumps(m).encode())


def replace_file(cat, version: str, rel: str, data: bytes, *, fix_checksum: bool) -> None:
    """Replace a version's file; with ``fix_checksum`` the manifest records the new bytes too."""
    cat.fs.pipe_file(f"{cat.root}/m/versions/{version}/{rel}", data)
    if fix_checksum:

        def change(m):
            (entry,) = [f for f in m["files"] if f["path"] == rel]
            entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))

        rewrite_manifest(cat, version, change)


# ------------------------------------------------------------------------- manifest schema
def _drop_sha(m):
    del m["files"][0]["sha256"]


MANIFEST_BREAKS = {
    "no checksum": (_drop_sha, "directions.safetensors' has no valid checksum"),
    "short checksum": (lambda m: m["files"][0].update(sha256="abc"), "no valid checksum"),
    "upper-case checksum": (
        lambda m: m["files"][0].update(sha256=m["files"][0]["sha256"].upper()),
        "checksum",
    ),
    "size as string": (lambda m: m["files"][0].update(bytes="12"), "'bytes'"),
    "size as bool": (lambda m: m["files"][0].update(bytes=True), "'bytes'"),
    "negative size": (lambda m: m["files"][0].update(bytes=-1), "'bytes'"),
    "fractional size": (lambda m: m["files"][0].update(bytes=1.5), "'bytes'"),
    "file listed twice": (lambda m: m["files"].append(dict(m["files"][0])), "listed twice"),
    "file entry not an object": (lambda m: m["files"].append("x"), "must be an object"),
    "version of another directory": (lambda m: m.update(version="other"), "field 'version'"),
    "newer schema": (lambda m: m.update(schema_version=2), "schema_version 2"),
    "schema as string": (lambda m: m.update(schema_version="1"), "schema_version '1'"),
    "schema as bool": (lambda m: m.update(schema_version=True), "schema_version True"),
    "files not a list": (lambda m: m.update(files={}), "field 'files'"),
    "model of another name": (lambda m: m["model"].update(name="other"), "field 'model'"),
    "shape of strings": (lambda m: m["directions"][0].update(shape=["3"]), "'shape'"),
    "kind missing": (lambda m: m["directions"][0].pop("kind"), "'kind'"),
    "fingerprint a number": (lambda m: m["directions"][0].update(model_fingerprint=5), "model_fingerprint"),
    "direction named twice": (lambda m: m["directions"].append(dict(m["directions"][0])), "unique name"),
    "no directions file": (lambda m: m.update(files=[]), "no directions.safetensors"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_BREAKS))
def test_manifest_fields_are_checked_strictly(local_cat, case):
    change, match = MANIFEST_BREAKS[case]
    v = local_cat.publish("m", [make_direction("d", 1)], metadata=META)
    rewrite_manifest(local_cat, v, change)
    with pytest.raises(ManifestError, match=match) as info:
        local_cat.version("m", v)
    assert manifest_path(local_cat, v) in str(info.value) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe", b"[1, 2]", b"null", b'"manifest"', b"{" * 100_000])
def test_manifest_that_is_not_an_object_is_refused(local_cat, raw):
    v = local_cat.publish("m", [make_direction("d", 1)], metadata=META)
    local_cat.fs.pipe_file(manifest_path(local_cat, v), raw)
    with pytest.raises(ManifestError, match="manifest.json"):
        local_cat.version("m", v)


def test_manifest_with_a_repeated_key_is_refused(local_cat):
    """Two readers could take different values of a repeated key: hspace takes neither."""
    v = local_cat.publish("m", [make_direction("d", 1)], metadata=META)
    raw = local_cat.fs.cat_file(manifest_path(local_cat, v))
    local_cat.fs.pipe_file(manifest_path(local_cat, v), raw.replace(b"{", b'{"version": "v-evil", ', 1))
    with pytest.raises(ManifestError, match=r"manifest\.json is not valid JSON \(duplicate key 'version'"):
        local_cat.version("m", v)


# ------------------------------------------------------------------------- directions vs manifest
DIRECTION_BREAKS = {
    "kind": lambda e: e.update(kind="pca"),
    "model_fingerprint": lambda e: e.update(model_fingerprint="someone-elses-model"),
    "shape": lambda e: e.update(shape=[1, 4, 2, 2]),
}


@pytest.mark.parametrize("field", sorted(DIRECTION_BREAKS))
def test_direction_metadata_must_agree_with_the_manifest(any_cat, field):
    v = any_cat.publish("m", [make_direction("d", 1)], metadata=META)
    rewrite_manifest(any_cat, v, lambda m: DIRECTION_BREAKS[field](m["directions"][0]))
    cv = any_cat.version("m", v)
    cv.verify()  # the bytes are the published ones: only the claims about them differ
    with pytest.raises(CorruptFileError, match=f"directions.safetensors: direction 'd' disagrees.*{field}"):
        cv.direction("d")
    with pytest.raises(CorruptFileError, match=field):
        cv.directions()


def test_a_direction_file_holding_other_names_is_refused(any_cat):
    v = any_cat.publish("m", [make_direction("d", 1), make_direction("e", 2)], metadata=META)
    other = hcat.open(f"memory://other-{os.getpid()}-{id(any_cat)}")
    w = other.publish("m", [make_direction("d", 1), make_direction("x", 2)], metadata=META)
    data = other.version("m", w).read_file("directions.safetensors")
    replace_file(any_cat, v, "directions.safetensors", data, fix_checksum=True)
    with pytest.raises(
        CorruptFileError, match=r"holds directions \['d', 'x'\] but its manifest lists \['d', 'e'\]"
    ):
        any_cat.version("m", v).direction("d")


# ------------------------------------------------------------------------- hostile safetensors
def st_file(header, body: bytes = b"", header_len: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if header_len is None else header_len) + h + body


F32 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
HOSTILE = {
    "empty": lambda ok: b"",
    "truncated": lambda ok: ok[: len(ok) // 2],
    "header length past the end": lambda ok: struct.pack("<Q", 1 << 40) + b"{}",
    "header not JSON": lambda ok: st_file(b"\xff\xfe not json"),
    "header a list": lambda ok: st_file([1, 2, 3]),
    "metadata a list": lambda ok: st_file({"__metadata__": [1, 2], "d": F32}, b"\0" * 4),
    "metadata values not strings": lambda ok: st_file({"__metadata__": {"d": 5}, "d": F32}, b"\0" * 4),
    "metadata not JSON per direction": lambda ok: st_file({"__metadata__": {"d": "{"}, "d": F32}, b"\0" * 4),
    "huge declared shape": lambda ok: st_file(
        {"d": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 4]}}, b"\0" * 4
    ),
    "offsets past the end": lambda ok: st_file(
        {"d": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 30]}}, b"\0" * 16
    ),
    "overlapping offsets": lambda ok: st_file(
        {"d": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "e": {**F32, "data_offsets": [4, 8]}},
        b"\0" * 8,
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_direction_files_raise_a_value_error_naming_the_file(any_cat, case):
    v = any_cat.publish("m", [make_direction("d", 1)], metadata=META)
    good = any_cat.version("m", v).read_file("directions.safetensors")
    hostile = HOSTILE[case](good)
    # Replaced after publishing: the checksum catches it.
    replace_file(any_cat, v, "directions.safetensors", hostile, fix_checksum=False)
    with pytest.raises(ChecksumError, match="directions.safetensors"):
        any_cat.version("m", v).directions()
    # A hostile publisher whose manifest records the hostile bytes: the parser catches it.
    replace_file(any_cat, v, "directions.safetensors", hostile, fix_checksum=True)
    with pytest.raises(ValueError, match="directions.safetensors") as info:
        any_cat.version("m", v).direction("d")
    assert isinstance(info.value, hcat.CatalogError), repr(info.value)


def test_hostile_effects_json_names_the_file(local_cat):
    v = local_cat.publish("m", [make_direction("d", 1)], effects={"m": [1.0]}, metadata=META)
    replace_file(local_cat, v, "effects.json", b"\xff{not json", fix_checksum=True)
    with pytest.raises(CorruptFileError, match="effects.json"):
        local_cat.version("m", v).effects()


# ------------------------------------------------------------------------- symlinks (local)
def test_a_model_directory_symlinked_out_of_the_root_is_refused(tmp_path):
    outside = hcat.open(str(tmp_path / "outside"))
    v = outside.publish("m", [make_direction("d", 1)], metadata=META)
    (tmp_path / "catalog").mkdir()
    os.symlink(tmp_path / "outside" / "m", tmp_path / "catalog" / "m")
    cat = hcat.open(str(tmp_path / "catalog"))
    with pytest.raises(UnsafePathError, match="outside the catalog root"):
        cat.version("m", v)
    with pytest.raises(UnsafePathError):
        cat.publish("m", [make_direction("d", 2)], metadata=META)
    assert outside.versions("m") == [v]  # nothing was written through the link


def test_a_version_directory_symlinked_out_of_the_root_is_refused(tmp_path):
    outside = hcat.open(str(tmp_path / "outside"))
    v = outside.publish("m", [make_direction("d", 1)], metadata=META)
    cat = hcat.open(str(tmp_path / "catalog"))
    cat.publish("m", [make_direction("d", 2)], metadata=META)
    os.symlink(tmp_path / "outside" / "m" / "versions" / v, tmp_path / "catalog" / "m" / "versions" / v)
    with pytest.raises(UnsafePathError, match=v):
        cat.version("m", v)


# ------------------------------------------------------------------------- property-based
@functools.cache
def base_manifest() -> dict:
    cat = hcat.open(f"memory://hypothesis-base-{os.getpid()}")
    v = cat.publish("m", [make_direction("d", 1)], effects={"x": 1}, metadata=META, version="v1", ref=None)
    manifest = cat.read_manifest("m", v)
    fs, root = fsspec.core.url_to_fs(cat.url)
    fs.rm(root, recursive=True)
    return manifest


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
PATH = "cat/m/versions/v1/manifest.json"


def check_parse(raw: bytes) -> None:
    """Either a manifest every reader can index, or a ManifestError naming the file."""
    try:
        m = parse_manifest(raw, path=PATH, model="m", version="v1")
    except ManifestError as err:
        assert PATH in str(err)
        return
    cv = hcat.CatalogVersion(None, "m", "v1", m)  # indexes files and directions
    assert cv.files() == sorted(f["path"] for f in m["files"])
    for f in m["files"]:
        assert isinstance(f["bytes"], int) and f["bytes"] >= 0 and len(f["sha256"]) == 64
    assert all(isinstance(n, str) for n in cv.direction_names())


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary(max_size=400))
def test_any_bytes_parse_or_raise_manifest_error(raw):
    check_parse(raw)


@settings(max_examples=200, deadline=None, database=None)
@given(JSON)
def test_any_json_parses_or_raises_manifest_error(value):
    check_parse(json.dumps(value).encode())


def first(value):
    return value[0] if isinstance(value, list) and value else None


@st.composite
def mutated_manifests(draw) -> bytes:
    m = copy.deepcopy(base_manifest())
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "model", "files", "file", "directions", "direction"]))
        obj = {
            "top": m,
            "model": m.get("model"),
            "files": m.get("files"),
            "file": first(m.get("files")),
            "directions": m.get("directions"),
            "direction": first(m.get("directions")),
        }[where]
        if isinstance(obj, dict):
            key = draw(st.sampled_from(sorted(obj) or ["x"]) | st.text(max_size=6))
            if draw(st.booleans()):
                obj.pop(key, None)
            else:
                obj[key] = draw(JSON)
        elif isinstance(obj, list):
            obj.append(draw(JSON)) if draw(st.booleans()) else obj.clear()
    return json.dumps(m).encode()


@settings(max_examples=200, deadline=None, database=None)
@given(mutated_manifests())
def test_mutated_manifests_parse_or_raise_manifest_error(raw):
    check_parse(raw)


def test_the_unmutated_manifest_parses():
    m = parse_manifest(json.dumps(base_manifest()).encode(), path=PATH, model="m", version="v1")
    assert [f["path"] for f in m["files"]] == ["directions.safetensors", "effects.json"]
