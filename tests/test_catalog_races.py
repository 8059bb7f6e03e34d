"""The catalog under real concurrency: racing publishers, refs, gc runs and stalled lock holders,
on a local directory, memory://, a moto S3 server (s3fs) and a lock-file backend."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from hspace import catalog as hcat
from hspace._catalog_store import Store
from hspace.catalog import MalformedRefWarning, RefConflictError, RefNotAdvancedError, VersionExistsError

try:  # `python -m pytest` puts the repo root on sys.path; bare `pytest` only puts tests/ there
    from tests.catalog_backends import (  # noqa: F401  (pytest fixtures)
        ALL_BACKENDS,
        META,
        any_cat,
        make_direction,
        open_backend,
        s3_bucket,
        s3_server,
    )
except ModuleNotFoundError:  # pragma: no cover
    from catalog_backends import ALL_BACKENDS, META, any_cat, make_direction, open_backend  # noqa: F401
    from s3_server import s3_bucket, s3_server  # noqa: F401


def run_threads(*targets) -> list[BaseException | None]:
    """Run each callable in its own thread, all released at once; their exceptions (or None)."""
    barrier, results = threading.Barrier(len(targets)), [None] * len(targets)

    def wrap(i, fn):
        barrier.wait()
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            results[i] = err

    threads = [
        threading.Thread(target=wrap, args=(i, fn), name=f"worker-{i}") for i, fn in enumerate(targets)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def assert_version_is(cat, version, seed):
    """The version verifies and holds direction 'd' of ``seed``."""
    cv = cat.version("m", version)
    cv.verify()
    assert torch.equal(cv.direction("d").vector, make_direction("d", seed).vector)


# ------------------------------------------------------------------------- 1. immutability
def test_racing_publishers_of_one_version_id_leave_the_winner_intact(any_cat):
    """Four threads publish different content under one explicit id: exactly one wins, the others
    get VersionExistsError, and the winner's files verify afterwards."""
    for round_ in range(3):
        vid = f"v{round_}"
        results = run_threads(
            *[
                (
                    lambda s=seed, vid=vid: any_cat.publish(
                        "m", [make_direction("d", s)], metadata=META, version=vid, ref=None
                    )
                )
                for seed in range(4)
            ]
        )
        winners = [i for i, r in enumerate(results) if r is None]
        assert len(winners) == 1, results
        assert all(isinstance(r, VersionExistsError) for r in results if r is not None), results
        assert_version_is(any_cat, vid, winners[0])


def test_a_slower_publisher_of_the_same_id_never_touches_committed_files(any_cat, monkeypatch):
    """The slower publisher passes the existence check, then the faster one commits: the slower
    must fail without replacing any file (the bytes of every committed file stay the same)."""
    real, checked, committed = hcat.Catalog._write_version, threading.Event(), threading.Event()

    def write_version(self, model, version, files):
        if threading.current_thread().name == "worker-1":  # the slow one: past the existence check
            checked.set()
            assert committed.wait(30)
        real(self, model, version, files)

    monkeypatch.setattr(hcat.Catalog, "_write_version", write_version)

    def fast():
        assert checked.wait(30)
        any_cat.publish("m", [make_direction("d", 0)], metadata=META, version="v1", ref=None)
        committed.set()

    def slow():
        any_cat.publish("m", [make_direction("d", 1)], metadata=META, version="v1", ref=None)

    fast_err, slow_err = run_threads(fast, slow)
    assert fast_err is None and isinstance(slow_err, VersionExistsError), (fast_err, slow_err)
    assert "nothing was written" in str(slow_err)
    assert_version_is(any_cat, "v1", 0)


def test_publish_behind_the_ref_is_reported_on_every_backend(any_cat):
    import datetime as dt

    new = any_cat.publish("m", [make_direction("d", 1)], metadata=META)
    old = hcat.new_version_id(dt.datetime(2001, 1, 1, tzinfo=dt.timezone.utc))
    with pytest.raises(RefNotAdvancedError, match=f"still names {new}"):
        any_cat.publish("m", [make_direction("d", 2)], metadata=META, version=old)
    assert any_cat.resolve("m") == new and any_cat.versions("m") == [old, new]


# ------------------------------------------------------------------------- 2. gc and refs
def test_gc_keeps_a_version_a_ref_moves_to_while_gc_runs(any_cat, monkeypatch):
    """A ref moves to v0 after gc read the refs: gc re-reads them right before removing v0."""
    vs = [any_cat.publish("m", [make_direction("d", i)], metadata=META) for i in range(3)]
    real = hcat.Catalog._remove_version

    def remove_version(self, model, version, *, complete):
        if version == vs[0]:
            any_cat.set_ref("m", "stable", vs[0])  # another service pins it right now
        return real(self, model, version, complete=complete)

    monkeypatch.setattr(hcat.Catalog, "_remove_version", remove_version)
    assert any_cat.gc("m", keep=1, reader_grace_s=0) == [vs[1]]
    assert_version_is(any_cat, vs[0], 0)


def test_gc_puts_back_the_manifest_when_a_ref_moved_there_during_the_removal(any_cat, monkeypatch):
    """A set_ref checked that v0 exists, then gc removed its manifest, then the ref was written:
    gc sees the ref on its second look and restores the manifest; v0 stays complete."""
    vs = [any_cat.publish("m", [make_direction("d", i)], metadata=META) for i in range(2)]
    real = Store.remove_file

    def remove_file(self, path):
        removed = real(self, path)
        if path.endswith(f"{vs[0]}/manifest.json"):
            body = json.dumps({"version": vs[0], "updated": "2020-01-01T00:00:00+00:00", "previous": None})
            self.fs.pipe_file(f"{any_cat.root}/m/refs/stable", body.encode())
        return removed

    monkeypatch.setattr(Store, "remove_file", remove_file)
    assert any_cat.gc("m", keep=1, reader_grace_s=0) == []
    monkeypatch.undo()
    assert any_cat.versions("m") == vs and any_cat.resolve("m", "stable") == vs[0]
    assert_version_is(any_cat, vs[0], 0)


def test_set_ref_to_a_version_gc_removed_meanwhile_is_put_back(any_cat, monkeypatch):
    vs = [any_cat.publish("m", [make_direction("d", i)], metadata=META) for i in range(2)]
    any_cat.set_ref("m", "stable", vs[1])
    real = Store.compare_and_swap

    def cas(self, path, update, attempts=8):
        if path.endswith("refs/stable") and any_cat._manifest_exists("m", vs[0]):
            self.remove_tree(f"{any_cat.root}/m/versions/{vs[0]}")  # gc, between check and write
        return real(self, path, update, attempts)

    monkeypatch.setattr(Store, "compare_and_swap", cas)
    with pytest.raises(FileNotFoundError, match="removed .by gc. while ref 'stable' moved"):
        any_cat.set_ref("m", "stable", vs[0])
    monkeypatch.undo()
    assert any_cat.resolve("m", "stable") == vs[1]


def test_two_gc_runs_at_once_both_succeed(any_cat):
    vs = [any_cat.publish("m", [make_direction("d", i)], metadata=META) for i in range(6)]
    got: list[list[str]] = [[], []]

    def gc(i):
        got[i] = any_cat.gc("m", keep=1, grace_s=0)

    assert run_threads(lambda: gc(0), lambda: gc(1)) == [None, None]
    assert set(got[0]) | set(got[1]) == set(vs[:-1])
    assert any_cat.versions("m") == vs[-1:]
    assert_version_is(any_cat, vs[-1], 5)


def test_a_reader_keeps_reading_for_the_reader_grace_period(any_cat):
    """Reader contract: a reader resolved 'latest'; the ref moves on; gc runs with keep=1 and
    reader_grace_s: the reader still reads until that time has passed, then gc removes it."""
    v1 = any_cat.publish("m", [make_direction("d", 1)], metadata=META)
    reader = any_cat.version("m", "latest")
    v2 = any_cat.publish("m", [make_direction("d", 2)], metadata=META)
    t0, grace = time.time(), 1.0
    assert any_cat.gc("m", keep=1, reader_grace_s=grace) == []  # first sight: recorded
    assert torch.equal(reader.direction("d").vector, make_direction("d", 1).vector)
    reader.verify()
    while True:  # gc again and again: v1 goes, but not before the grace period has passed
        started = time.time()
        removed = any_cat.gc("m", keep=1, reader_grace_s=grace)
        ended = time.time()  # gc read its clock between started and ended: only ended bounds it
        if removed:
            break
        reader.verify()  # still there: still readable
        assert started < t0 + grace + 10, "gc never removed the version"
        time.sleep(0.1)
    assert removed == [v1] and ended >= t0 + grace
    assert any_cat.versions("m") == [v2] and not any_cat.fs.exists(f"{any_cat.root}/m/gc/{v1}")
    with pytest.raises(FileNotFoundError):
        reader.read_file("directions.safetensors")


def test_gc_leaves_a_publish_in_progress_alone(any_cat, monkeypatch):
    """A publish stalled between its files and its manifest is not removed by gc (grace_s)."""
    real, written, go = hcat.Catalog._commit, threading.Event(), threading.Event()

    def commit(self, model, version, manifest_bytes):
        written.set()
        assert go.wait(30)
        real(self, model, version, manifest_bytes)

    monkeypatch.setattr(hcat.Catalog, "_commit", commit)
    out = {}
    t = threading.Thread(
        target=lambda: out.setdefault("v", any_cat.publish("m", [make_direction("d", 7)], metadata=META))
    )
    t.start()
    assert written.wait(30)
    assert any_cat.gc("m", keep=1, grace_s=60) == []
    go.set()
    t.join(30)
    assert_version_is(any_cat, out["v"], 7)


def test_a_malformed_ref_does_not_stop_refs_or_gc(any_cat):
    vs = [any_cat.publish("m", [make_direction("d", i)], metadata=META) for i in range(4)]
    any_cat.set_ref("m", "stable", vs[1])
    # A truncated ref that still mentions vs[0]; gc cannot parse it, so it keeps vs[0].
    any_cat.fs.pipe_file(f"{any_cat.root}/m/refs/broken", f'{{"version": "{vs[0]}", "upd'.encode())
    any_cat.fs.pipe_file(f"{any_cat.root}/m/refs/garbage", b"\xff\x00 not json")
    with pytest.warns(MalformedRefWarning) as caught:
        assert any_cat.refs("m") == {"latest": vs[3], "stable": vs[1]}
    assert sorted(str(w.message).split("'")[1] for w in caught) == ["broken", "garbage"]
    with pytest.warns(MalformedRefWarning) as caught:
        assert any_cat.gc("m", keep=1, reader_grace_s=0) == [vs[2]]
    assert len(caught) == 2 and all(w.filename == __file__ for w in caught)  # points at the caller
    assert any_cat.versions("m") == [vs[0], vs[1], vs[3]]


# ------------------------------------------------------------------------- 2. stalled lock holders
@pytest.mark.parametrize("kind", ALL_BACKENDS)
def test_a_stalled_ref_writer_never_loses_an_update(kind, request, tmp_path, monkeypatch):
    """Writer A stalls inside its compare-and-swap longer than lock_timeout_s while writer B moves
    the same ref: exactly one of the two CAS updates succeeds and the ref names its version."""
    gen = open_backend(request, kind, tmp_path, lock_timeout_s=0.3)
    cat = next(gen)
    v1, v2, v3 = (cat.publish("m", [make_direction("d", i)], metadata=META, ref=None) for i in range(3))
    cat.set_ref("m", "latest", v1)
    real, stalled = Store.read_raw, threading.Event()

    def read_raw(self, path):
        out = real(self, path)
        if (
            path.endswith("refs/latest")
            and threading.current_thread().name == "worker-0"
            and not stalled.is_set()
        ):
            stalled.set()
            time.sleep(0.9)  # past lock_timeout_s, inside the critical section
        return out

    monkeypatch.setattr(Store, "read_raw", read_raw)

    def b():
        assert stalled.wait(10)
        time.sleep(0.05)
        cat.set_ref("m", "latest", v3, expected=v1)

    results = run_threads(lambda: cat.set_ref("m", "latest", v2, expected=v1), b)
    monkeypatch.undo()
    ok = [v for v, r in zip((v2, v3), results, strict=True) if r is None]
    assert len(ok) == 1, results
    assert all(isinstance(r, RefConflictError) for r in results if r is not None), results
    assert cat.resolve("m") == ok[0]
    ref = json.loads(cat.fs.cat_file(f"{cat.root}/m/refs/latest"))
    assert ref["previous"] == v1  # the winner's update is on top of v1: nothing was overwritten
    for _ in gen:
        pass
