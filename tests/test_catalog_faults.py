"""Storage trouble while publishing: a seeded failure-injecting filesystem (tests/flaky_fs.py)
around a local directory, memory:// and a moto S3 server. Transient errors are retried; a final
failure raises PublishError and leaves no visible partial version."""

from __future__ import annotations

import threading
import uuid

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from hspace import catalog as hcat

try:  # `python -m pytest` puts the repo root on sys.path; bare `pytest` only puts tests/ there
    from tests.catalog_backends import META, make_direction, s3_bucket, s3_server  # noqa: F401
    from tests.flaky_fs import FlakyFileSystem
except ModuleNotFoundError:  # pragma: no cover
    from catalog_backends import META, make_direction  # noqa: F401
    from flaky_fs import FlakyFileSystem
    from s3_server import s3_bucket, s3_server  # noqa: F401

TARGETS = ["local", "memory", pytest.param("s3", marks=pytest.mark.s3)]


@pytest.fixture(params=TARGETS)
def target(request, tmp_path):
    """(filesystem, root, a clean catalog on it) for a target the flaky wrapper goes around."""
    if request.param == "local":
        root = str(tmp_path / "catalog")
        yield LocalFileSystem(auto_mkdir=True), root, hcat.open(root)
    elif request.param == "memory":
        root = f"/flaky-{uuid.uuid4().hex}"
        fs = fsspec.filesystem("memory")
        yield fs, root, hcat.open(f"memory://{root}")
        if fs.exists(root):
            fs.rm(root, recursive=True)
    else:
        server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        clean = hcat.open(f"{bucket}/catalog", storage_options=server.storage_options())
        yield clean.fs, clean.root, clean


def flaky_catalog(target, retries: int = 3, **faults) -> tuple[hcat.Catalog, FlakyFileSystem]:
    fs, root, _ = target
    flaky = FlakyFileSystem(fs, **faults)
    return hcat.Catalog(
        flaky, root, f"flaky://{root}", retries=retries, backoff_s=0.0, lock_timeout_s=5
    ), flaky


def test_transient_errors_are_retried(target):
    """15% of calls fail before reaching the storage and 10% of writes lose their answer; with
    retries every publish succeeds, and what a clean reader sees verifies bit for bit."""
    cat, flaky = flaky_catalog(target, retries=10, fail_rate=0.15, lost_rate=0.1, seed=7)
    published = [cat.publish("m", [make_direction("d", i)], metadata=META) for i in range(3)]
    kinds = {when for when, _, _ in flaky.faults}
    assert kinds == {"before", "after"}, flaky.faults  # both kinds of fault did happen
    clean = target[2]
    assert clean.versions("m") == published and clean.resolve("m") == published[-1]
    for i, v in enumerate(published):
        cv = clean.version("m", v)
        cv.verify()
        assert torch.equal(cv.direction("d").vector, make_direction("d", i).vector)
    assert clean.gc("m", keep=3, grace_s=0) == []  # no leftovers of retried writes


def test_a_lost_answer_to_the_manifest_write_still_commits(target):
    lost = []

    def lose_first_manifest(op, path):
        if path.endswith("manifest.json") and not lost:
            lost.append(path)
            return True
        return False

    cat, flaky = flaky_catalog(target, lose_if=lose_first_manifest)
    v = cat.publish("m", [make_direction("d", 1)], metadata=META)
    assert lost and ("after", "create", lost[0]) in flaky.faults
    target[2].version("m", "latest").verify()
    assert target[2].resolve("m") == v


@pytest.mark.parametrize("failing", ["effects.json", "manifest.json"])
def test_a_final_failure_leaves_no_visible_partial_version(target, failing):
    cat, flaky = flaky_catalog(target, retries=2)
    v1 = cat.publish("m", [make_direction("d", 1)], metadata=META)
    flaky.fail_if = lambda op, path: op == "create" and path.endswith(failing)
    with pytest.raises(hcat.PublishError, match=f"{failing}.*nothing was committed") as info:
        cat.publish("m", [make_direction("d", 2)], effects={"x": [1.0]}, metadata=META, version="v2")
    assert isinstance(info.value, OSError) and "v2" in str(info.value)
    assert sum(1 for _, op, p in flaky.faults if p.endswith(failing)) == 3  # 1 try + 2 retries
    clean = target[2]
    assert clean.versions("m") == [v1] and clean.resolve("m") == v1
    with pytest.raises(FileNotFoundError):
        clean.version("m", "v2")
    assert not clean.fs.exists(f"{clean.root}/m/versions/v2/directions.safetensors")  # cleaned up
    flaky.fail_if = None
    cat.publish("m", [make_direction("d", 2)], metadata=META, version="v2")  # the id is free again
    clean.version("m", "v2").verify()


def test_readers_never_see_a_version_being_written(target):
    """Slow writes (20 ms each) while a reader lists and verifies in a loop: every version it
    sees is complete."""
    cat, _ = flaky_catalog(target, write_delay_s=0.02)
    clean, done, seen, errors = target[2], threading.Event(), set(), []

    def read():
        while not done.is_set():
            try:
                for v in clean.versions("m"):
                    clean.version("m", v).verify()
                    seen.add(v)
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        vs = [cat.publish("m", [make_direction("d", i)], effects={"i": i}, metadata=META) for i in range(3)]
    finally:
        done.set()
        reader.join(30)
    assert errors == [] and seen <= set(vs) and clean.versions("m") == vs
