"""The direction catalog against a real S3 protocol server (moto on 127.0.0.1, via s3fs)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hspace import catalog as hcat
from hspace._catalog_store import Store
from hspace.catalog import ChecksumError, RefConflictError, VersionExistsError
from hspace.directions import Direction

try:  # `python -m pytest` puts the repo root on sys.path; bare `pytest` only puts tests/ there
    from tests.s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)
except ModuleNotFoundError:  # pragma: no cover
    from s3_server import s3_bucket, s3_server  # noqa: F401

pytestmark = pytest.mark.s3

REPO = Path(__file__).resolve().parents[1]
META = {"model_id": "toy/ddpm", "sampler": "ddpm", "inputs": {"seeds": 8}}

CONSUMER = """
import hashlib, json, sys
from hspace import catalog
url, opts = sys.argv[1], json.loads(sys.argv[2])
cat = catalog.open(url, storage_options=opts)
v = cat.version("toy", "latest")
dirs = v.directions()
print(json.dumps({
    "version": v.version,
    "models": cat.models(),
    "versions": cat.versions("toy"),
    "sha": {n: hashlib.sha256(d.vector.numpy().tobytes()).hexdigest() for n, d in dirs.items()},
    "effects": v.effects(),
    "ray_imported": "ray" in sys.modules,
}))
"""


def make_direction(name: str, seed: int) -> Direction:
    g = torch.Generator().manual_seed(seed)
    return Direction(
        vector=torch.randn(3, 4, 2, 2, generator=g), name=name, kind="supervised", provenance={"seed": seed}
    )


@pytest.fixture
def cat(s3_bucket, s3_server):  # noqa: F811
    return hcat.open(f"{s3_bucket}/catalog", storage_options=s3_server.storage_options())


def test_publish_then_consume_in_another_process(cat, s3_server):  # noqa: F811
    dirs = [make_direction("smile", 1), make_direction("age", 2)]
    cat.publish("toy", dirs, metadata=META, ref=None)
    v2 = cat.publish("toy", dirs, effects={"matrix": [[1.0, 0.0]]}, metadata=META)
    out = subprocess.run(
        [sys.executable, "-c", CONSUMER, cat.url, json.dumps(s3_server.storage_options())],
        capture_output=True,
        text=True,
        timeout=180,  # a hang guard only: a cold torch import takes 3-40 s on a loaded 2-core box
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["version"] == v2 and got["models"] == ["toy"] and len(got["versions"]) == 2
    # Bit-exact float32 round trip through S3: compare hashes of the raw bytes.
    assert got["sha"] == {d.name: hashlib.sha256(d.vector.numpy().tobytes()).hexdigest() for d in dirs}
    assert got["effects"] == {"matrix": [[1.0, 0.0]]}
    assert got["ray_imported"] is False


def test_manifest_exclusive_create_is_enforced_by_the_server(cat):
    v = cat.publish("toy", [make_direction("smile", 1)], metadata=META, version="v1")
    manifest = f"{cat.root}/toy/versions/{v}/manifest.json"
    before = cat.fs.cat_file(manifest)
    with pytest.raises(VersionExistsError):
        cat.publish("toy", [make_direction("smile", 2)], metadata=META, version="v1")
    # No existence pre-check here: the If-None-Match put itself must fail.
    with pytest.raises(FileExistsError):
        cat._store.create_exclusive(manifest, b"{}")
    assert cat.fs.cat_file(manifest) == before


def test_tampered_object_raises_checksum_error(cat):
    v = cat.publish("toy", [make_direction("smile", 1)], metadata=META)
    path = f"{cat.root}/toy/versions/{v}/directions.safetensors"
    data = bytearray(cat.fs.cat_file(path))
    data[-1] ^= 0x01
    cat.fs.pipe_file(path, bytes(data))
    with pytest.raises(ChecksumError, match="directions.safetensors"):
        hcat.open(cat.url, storage_options=cat.fs.storage_options).version("toy").direction("smile")


def test_ref_compare_and_swap_detects_a_concurrent_move(cat, monkeypatch):
    v1 = cat.publish("toy", [make_direction("d", 1)], metadata=META)
    v2 = cat.publish("toy", [make_direction("d", 2)], metadata=META, ref=None)
    v3 = cat.publish("toy", [make_direction("d", 3)], metadata=META, ref=None)
    ref_path = f"{cat.root}/toy/refs/latest"

    # The server refuses a write whose If-Match ETag is stale.
    with pytest.raises(OSError):
        cat.fs.pipe_file(ref_path, b"{}", IfMatch='"0123456789abcdef0123456789abcdef"')

    # Another writer moves the ref to v3 right after our read: our conditional put fails,
    # the retry re-reads, and set_ref(expected=v1) then reports the conflict instead of
    # overwriting v3.
    real_read, moved = Store.read_raw, []

    def read_then_someone_moves_it(self, path):
        result = real_read(self, path)
        if not moved:
            moved.append(True)
            body = json.dumps({"version": v3, "updated": "x", "previous": v1}).encode()
            self.fs.pipe_file(path, body)
        return result

    monkeypatch.setattr(Store, "read_raw", read_then_someone_moves_it)
    with pytest.raises(RefConflictError, match=v3):
        cat.set_ref("toy", "latest", v2, expected=v1)
    monkeypatch.undo()
    assert cat.resolve("toy") == v3


def test_gc_on_s3_keeps_referenced_and_drops_incomplete(cat):
    vs = [cat.publish("toy", [make_direction("d", i)], metadata=META) for i in range(3)]
    cat.set_ref("toy", "stable", vs[0])
    cat.fs.pipe_file(f"{cat.root}/toy/versions/half-written/directions.safetensors", b"partial")
    assert cat.versions("toy") == vs  # the incomplete version is invisible
    assert cat.gc("toy", keep=1, grace_s=0) == sorted([vs[1], "half-written"])
    assert cat.versions("toy") == [vs[0], vs[2]]
    assert cat.version("toy", "stable").direction("d").vector.shape == (3, 4, 2, 2)
