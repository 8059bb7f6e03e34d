"""Specification of the direction catalog (hspace.catalog) on a local path and on memory://."""

from __future__ import annotations

import hashlib
import json
import threading
import uuid

import fsspec
import pytest
import torch

from hspace import catalog as hcat
from hspace._catalog_store import Store
from hspace.catalog import ChecksumError, RefConflictError, RefNotAdvancedError, VersionExistsError
from hspace.directions import Direction

T, C, H, W = 4, 8, 2, 2
META = {
    "model_id": "toy/ddpm",
    "revision": "r1",
    "config_hash": "abc",
    "sampler": "ddpm",
    "inputs": {"seeds": 16},
}


def make_direction(name: str, seed: int, *, kind: str = "supervised", per_step: bool = True) -> Direction:
    g = torch.Generator().manual_seed(seed)
    shape = (T, C, H, W) if per_step else (C, H, W)
    return Direction(
        vector=torch.randn(shape, generator=g),
        name=name,
        kind=kind,
        units="raw",
        sigma=torch.rand(T, generator=g) + 0.5 if per_step else None,
        timesteps=torch.tensor([999, 666, 333, 0]) if per_step else None,
        model_fingerprint="fp123",
        provenance={"seed": seed},
    )


@pytest.fixture(params=["local", "memory"])
def cat(request, tmp_path):
    """An empty catalog on a local directory or an in-memory filesystem."""
    if request.param == "local":
        yield hcat.open(str(tmp_path / "catalog"))
    else:
        root = f"memory://catalog-{uuid.uuid4().hex}"
        yield hcat.open(root)
        fs, path = fsspec.core.url_to_fs(root)
        if fs.exists(path):
            fs.rm(path, recursive=True)


@pytest.fixture
def local_cat(tmp_path):
    return hcat.open(str(tmp_path / "catalog"))


def test_publish_then_list_resolve_and_load_bit_exact(cat):
    a, b = make_direction("smile", 1), make_direction("jac_0", 2, kind="jacobian", per_step=False)
    effects = {"matrix": [[0.5, -0.1], [0.0, 0.2]], "baseline": [0.01, 0.02]}
    v = cat.publish(
        "toy", [a, b], effects=effects, extra_files={"previews/smile.png": b"\x89PNG fake"}, metadata=META
    )

    assert cat.models() == ["toy"]
    assert cat.versions("toy") == [v]
    assert cat.refs("toy") == {"latest": v}
    assert cat.resolve("toy") == v and cat.resolve("toy", v) == v

    cv = cat.version("toy", "latest")
    assert cv.direction_names() == ["smile", "jac_0"]
    got = cv.directions()
    # float32 in, float32 stored: the round trip is bit-exact (tolerance 0).
    assert torch.equal(got["smile"].vector, a.vector)
    assert torch.equal(got["smile"].sigma, a.sigma)
    assert torch.equal(got["smile"].timesteps, a.timesteps)
    assert got["jac_0"].vector.shape == (C, H, W) and torch.equal(got["jac_0"].vector, b.vector)
    assert got["jac_0"].kind == "jacobian" and got["smile"].provenance == {"seed": 1}
    assert cv.effects() == effects
    assert cv.read_file("previews/smile.png") == b"\x89PNG fake"
    assert cv.pca() is None


def test_manifest_records_files_directions_and_provenance(cat):
    d = make_direction("smile", 1)
    v = cat.publish("toy", [d], metadata={**META, "note": "x"})
    m = cat.version("toy", v).manifest
    assert m["schema_version"] == 1 and m["version"] == v
    assert m["model"] == {
        "name": "toy",
        "id": "toy/ddpm",
        "revision": "r1",
        "config_hash": "abc",
        "fingerprint": "fp123",
    }
    assert m["sampler"] == "ddpm" and m["timesteps"] == [999, 666, 333, 0]
    assert m["inputs"] == {"seeds": 16} and m["extra"] == {"note": "x"}
    assert m["code_version"] and m["created"].endswith("+00:00")
    (entry,) = m["directions"]
    assert entry["name"] == "smile" and entry["shape"] == [T, C, H, W] and entry["dtype"] == "float32"
    assert entry["kind"] == "supervised" and entry["units"] == "raw" and "top-scored" in entry["sign_rule"]
    (f,) = m["files"]
    raw = cat.fs.cat_file(f"{cat.root}/toy/versions/{v}/directions.safetensors")
    assert f == {
        "path": "directions.safetensors",
        "sha256": hashlib.sha256(raw).hexdigest(),
        "bytes": len(raw),
    }


def test_pca_state_round_trips(cat):
    from hspace.pca import PerTimestepPCA

    pca = PerTimestepPCA(n_components=3, n_steps=T, timesteps=[999, 666, 333, 0])
    pca.partial_fit(torch.randn(12, T, C, H, W, generator=torch.Generator().manual_seed(0)))
    v = cat.publish("toy", pca.directions(2), pca=pca, metadata=META)
    back = cat.version("toy", v).pca()
    # Stored in the accumulation dtype (float64): exact round trip.
    assert torch.equal(back.components_, pca.components_)
    assert back.n_samples_seen_ == [12] * T
    assert cat.version("toy", v).direction_names() == ["pca_0", "pca_1"]


def test_versions_sorted_and_latest_follows_newest_publish(cat):
    v1 = cat.publish("toy", [make_direction("smile", 1)], metadata=META)
    v2 = cat.publish("toy", [make_direction("smile", 2)], metadata=META)
    assert v1 < v2 and cat.versions("toy") == [v1, v2]
    assert cat.resolve("toy", "latest") == v2
    ref = json.loads(cat.fs.cat_file(f"{cat.root}/toy/refs/latest"))
    assert ref["version"] == v2 and ref["previous"] == v1 and "updated" in ref


def test_publish_never_moves_ref_backwards(cat):
    import datetime as dt

    new = cat.publish("toy", [make_direction("smile", 1)], metadata=META)
    old = hcat.new_version_id(dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc))  # a lagging clock
    with pytest.raises(RefNotAdvancedError, match="still names") as info:
        cat.publish("toy", [make_direction("smile", 2)], metadata=META, version=old)
    assert (info.value.version, info.value.current, info.value.ref) == (old, new, "latest")
    # The version is complete and readable by id; the ref still serves the later one.
    assert cat.versions("toy") == [old, new]
    assert cat.resolve("toy") == new
    assert torch.equal(cat.version("toy", old).direction("smile").vector, make_direction("smile", 2).vector)
    # Explicit ids are not ordered against generated ones: the ref simply moves.
    cat.publish("toy", [make_direction("smile", 3)], metadata=META, version="zz-manual")
    assert cat.resolve("toy") == "zz-manual"
    newest = cat.publish("toy", [make_direction("smile", 4)], metadata=META)
    assert cat.resolve("toy") == newest


def test_tampered_file_raises_checksum_error_naming_it(cat):
    v = cat.publish("toy", [make_direction("smile", 1)], effects={"m": [1.0]}, metadata=META)
    path = f"{cat.root}/toy/versions/{v}/directions.safetensors"
    data = bytearray(cat.fs.cat_file(path))
    data[-1] ^= 0x01  # same size, one bit of one float changed
    cat.fs.pipe_file(path, bytes(data))
    with pytest.raises(ChecksumError, match="directions.safetensors"):
        cat.version("toy", v).direction("smile")
    cat.fs.pipe_file(path, bytes(data) + b"\0")  # size change is caught before hashing
    with pytest.raises(ChecksumError, match="size mismatch"):
        cat.version("toy", v).directions()
    assert cat.version("toy", v).effects() == {"m": [1.0]}  # untouched files still load


def test_same_version_id_twice_fails_and_keeps_original(cat):
    cat.publish("toy", [make_direction("smile", 1)], metadata=META, version="v1")
    before = cat.fs.cat_file(f"{cat.root}/toy/versions/v1/manifest.json")
    with pytest.raises(VersionExistsError, match="v1"):
        cat.publish("toy", [make_direction("other", 2)], metadata=META, version="v1")
    assert cat.fs.cat_file(f"{cat.root}/toy/versions/v1/manifest.json") == before
    assert cat.version("toy", "v1").direction_names() == ["smile"]


def test_manifest_create_is_exclusive(cat):
    v = cat.publish("toy", [make_direction("smile", 1)], metadata=META)
    with pytest.raises(FileExistsError):
        cat._store.create_exclusive(f"{cat.root}/toy/versions/{v}/manifest.json", b"{}")


def test_manifest_create_race_has_exactly_one_winner(local_cat):
    """Eight threads create the same manifest at once: os.link lets exactly one succeed."""
    local_cat.fs.makedirs(f"{local_cat.root}/m/versions/v", exist_ok=True)
    path = f"{local_cat.root}/m/versions/v/manifest.json"
    barrier, results = threading.Barrier(8), []

    def create(i: int) -> None:
        barrier.wait()
        try:
            local_cat._store.create_exclusive(path, json.dumps({"writer": i}).encode())
            results.append(i)
        except FileExistsError:
            pass

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1
    assert json.loads(local_cat.fs.cat_file(path)) == {"writer": results[0]}


def test_failed_publish_leaves_previous_version_and_ref_readable(cat, monkeypatch):
    v1 = cat.publish("toy", [make_direction("smile", 1)], metadata=META)
    real_create, failing = Store.create_exclusive, {"file": "effects.json"}

    def failing_create(self, path, data):
        if path.endswith(failing["file"]):
            raise OSError("disk full (injected)")
        real_create(self, path, data)

    real_remove, removed = Store.remove_file, []

    def recording_remove(self, path):
        removed.append(path.rsplit("/", 1)[-1])
        return real_remove(self, path)

    monkeypatch.setattr(Store, "create_exclusive", failing_create)
    monkeypatch.setattr(Store, "remove_file", recording_remove)
    extra = {"previews/a/smile.png": b"png"}
    for name in ("effects.json", "manifest.json"):
        failing["file"], removed[:] = name, []
        with pytest.raises(hcat.PublishError, match="injected.*nothing was committed"):
            cat.publish(
                "toy", [make_direction("smile", 9)], effects={"m": [1]}, extra_files=extra, metadata=META
            )
        # The claim goes last: until then no other publisher can take the id and lose files to us.
        assert removed[-1] == "~claim" and "directions.safetensors" in removed, removed
    monkeypatch.undo()

    assert cat.versions("toy") == [v1]
    assert cat.resolve("toy") == v1
    assert torch.equal(cat.version("toy").direction("smile").vector, make_direction("smile", 1).vector)
    # The failed publish removed what it had written.
    assert cat._ls_names(f"{cat.root}/toy/versions", "directory") == [v1]


def test_crashed_publish_leftovers_are_removed_by_gc_after_the_grace_period(cat):
    v1 = cat.publish("toy", [make_direction("smile", 1)], metadata=META)
    # A publisher that died after writing a file: no manifest, nobody cleans up but gc.
    cat._store.create_exclusive(f"{cat.root}/toy/versions/crashed/directions.safetensors", b"partial")
    assert cat.versions("toy") == [v1]
    assert cat.gc("toy", keep=1) == []  # younger than the grace period: maybe still publishing
    assert cat.gc("toy", keep=1, grace_s=0) == ["crashed"]
    assert cat._ls_names(f"{cat.root}/toy/versions", "directory") == [v1]


def test_failure_while_moving_ref_keeps_old_ref(cat, monkeypatch):
    v1 = cat.publish("toy", [make_direction("smile", 1)], metadata=META)

    def boom(self, *args, **kwargs):
        raise OSError("network down (injected)")

    monkeypatch.setattr(Store, "replace_file", boom)
    with pytest.raises(OSError, match="injected"):
        cat.publish("toy", [make_direction("smile", 2)], metadata=META)
    monkeypatch.undo()
    assert cat.resolve("toy") == v1
    assert len(cat.versions("toy")) == 2  # the new version is complete, just not referenced yet


def test_diff_reports_cosine_added_and_removed(cat):
    a, b, c = make_direction("a", 1), make_direction("b", 2), make_direction("c", 3)
    v1 = cat.publish("toy", [a, b], metadata=META)
    neg_b = Direction(vector=-b.vector, name="b", kind="supervised")
    scaled_a = Direction(vector=3 * a.vector, name="a", kind="supervised")
    v2 = cat.publish("toy", [scaled_a, neg_b, c], metadata=META)
    d = cat.diff("toy", v1, v2)
    assert (d.a, d.b) == (v1, v2)
    # Cosine of float32 vectors accumulated in float64: |error| < 1e-6 (float32 rounding of 3*a).
    assert d.cosine["a"] == pytest.approx(1.0, abs=1e-6)
    assert d.cosine["b"] == pytest.approx(-1.0, abs=1e-6)
    assert d.added == ["c"] and d.removed == [] and d.incompatible == []
    assert cat.diff("toy", v2, v1).removed == ["c"]


def test_gc_keeps_newest_and_every_referenced_version(cat):
    vs = [cat.publish("toy", [make_direction("smile", i)], metadata=META) for i in range(4)]
    cat.set_ref("toy", "stable", vs[0])
    assert cat.gc("toy", keep=1, reader_grace_s=0, dry_run=True) == [vs[1], vs[2]]
    assert cat.versions("toy") == vs
    assert cat.gc("toy", keep=1, reader_grace_s=0) == [vs[1], vs[2]]
    assert cat.versions("toy") == [vs[0], vs[3]]
    assert cat.resolve("toy", "stable") == vs[0] and cat.resolve("toy") == vs[3]
    assert cat.version("toy", "stable").direction("smile").vector.shape == (T, C, H, W)
    assert not cat.fs.exists(f"{cat.root}/toy/versions/{vs[1]}")


def test_set_ref_is_compare_and_swap(cat):
    v1 = cat.publish("toy", [make_direction("smile", 1)], metadata=META, ref=None)
    v2 = cat.publish("toy", [make_direction("smile", 2)], metadata=META, ref=None)
    assert cat.refs("toy") == {}
    cat.set_ref("toy", "prod", v1, expected=None)
    with pytest.raises(RefConflictError, match="expected None"):
        cat.set_ref("toy", "prod", v2, expected=None)
    with pytest.raises(RefConflictError, match=v1):
        cat.set_ref("toy", "prod", v2, expected=v2)
    cat.set_ref("toy", "prod", v2, expected=v1)
    cat.set_ref("toy", "prod", v1)  # expected=... : unconditional (rollback)
    assert cat.refs("toy") == {"prod": v1}
    assert not cat.fs.exists(f"{cat.root}/toy/refs/prod~lock")


def test_concurrent_ref_moves_end_on_newest_version(local_cat):
    """Six threads advance one ref with the lock-based CAS; no update is lost or reordered."""
    vs = [local_cat.publish("m", [make_direction("d", i)], metadata=META, ref=None) for i in range(6)]
    barrier, not_advanced = threading.Barrier(len(vs)), []

    def advance(v: str) -> None:
        barrier.wait()
        try:
            local_cat._advance_ref("m", "latest", v)
        except RefNotAdvancedError as err:
            not_advanced.append(err)

    threads = [threading.Thread(target=advance, args=(v,)) for v in vs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert local_cat.resolve("m") == vs[-1]
    # Whoever came after a later version was told so; the newest never was.
    assert all(e.current > e.version for e in not_advanced) and vs[-1] not in [
        e.version for e in not_advanced
    ]


def test_stale_ref_lock_is_broken(local_cat):
    v = local_cat.publish("m", [make_direction("d", 1)], metadata=META, ref=None)
    lock = f"{local_cat.root}/m/refs/latest~lock"
    local_cat.fs.makedirs(f"{local_cat.root}/m/refs", exist_ok=True)
    local_cat.fs.pipe_file(lock, json.dumps({"token": "dead", "created": 0.0}).encode())
    local_cat.set_ref("m", "latest", v)
    assert local_cat.resolve("m") == v and not local_cat.fs.exists(lock)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_held_ref_lock_times_out_with_clear_error(tmp_path, where):
    url = str(tmp_path / "c") if where == "local" else f"memory://held-{uuid.uuid4().hex}"
    cat = hcat.open(url, lock_timeout_s=0.2)
    v = cat.publish("m", [make_direction("d", 1)], metadata=META, ref=None)
    with cat._store.lock(f"{cat.root}/m/refs/latest"):  # a live holder (another writer)
        with pytest.raises(RefConflictError, match="held by another writer"):
            cat.set_ref("m", "latest", v)
    cat.set_ref("m", "latest", v)  # released: the update goes through
    assert cat.resolve("m") == v


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda c: c.publish("../evil", [make_direction("d", 1)], metadata=META), ValueError, "model"),
        (lambda c: c.publish("a/b", [make_direction("d", 1)], metadata=META), ValueError, "model"),
        (lambda c: c.publish("m", [make_direction("d", 1)], metadata=META, ref="x/y"), ValueError, "ref"),
        (
            lambda c: c.publish("m", [make_direction("d", 1)], metadata=META, version="v~1"),
            ValueError,
            "version",
        ),
        (lambda c: c.publish("m", [], metadata=META), ValueError, "empty"),
        (lambda c: c.publish("m", [make_direction("d", 1)] * 2, metadata=META), ValueError, "duplicate"),
        (lambda c: c.publish("m", {"x": make_direction("d", 1)}, metadata=META), ValueError, "differs"),
        (
            lambda c: c.publish("m", [make_direction("d", 1)], metadata=META, effects={"x": float("nan")}),
            ValueError,
            "effects",
        ),
        (
            lambda c: c.publish(
                "m", [make_direction("d", 1)], metadata=META, extra_files={"manifest.json": b""}
            ),
            ValueError,
            "reserved",
        ),
        (
            lambda c: c.publish("m", [make_direction("d", 1)], metadata=META, extra_files={"../x.png": b""}),
            ValueError,
            "extra_files",
        ),
        (lambda c: c.resolve("nomodel"), FileNotFoundError, "no model 'nomodel'"),
        (lambda c: c.version("m", "nope"), FileNotFoundError, "no ref or complete version 'nope'"),
        (lambda c: c.version("m").direction("nope"), ValueError, "no direction 'nope'"),
        (lambda c: c.version("m").read_file("../../etc/passwd"), ValueError, "file path"),
        (lambda c: c.version("m").read_file("report.html"), FileNotFoundError, "no file 'report.html'"),
        (lambda c: c.gc("m", keep=0), ValueError, "keep"),
    ],
)
def test_bad_input_gives_clear_errors(local_cat, call, error, match):
    local_cat.publish("m", [make_direction("d", 1)], metadata=META)
    with pytest.raises(error, match=match):
        call(local_cat)
    assert local_cat.models() == ["m"]  # nothing half-written became visible


def test_ref_naming_a_missing_version_is_reported(local_cat):
    local_cat.publish("m", [make_direction("d", 1)], metadata=META)
    local_cat.fs.pipe_file(f"{local_cat.root}/m/refs/broken", json.dumps({"version": "gone"}).encode())
    with pytest.raises(FileNotFoundError, match="names version 'gone'"):
        local_cat.resolve("m", "broken")


def test_hub_ids_map_to_catalog_model_names():
    assert hcat.model_key("google/ddpm-ema-celebahq-256") == "google--ddpm-ema-celebahq-256"
    with pytest.raises(ValueError, match="model"):
        hcat.model_key("../x")


def test_manifest_listing_a_path_outside_the_version_is_rejected(local_cat):
    v = local_cat.publish("m", [make_direction("d", 1)], metadata=META, version="v1")
    path = f"{local_cat.root}/m/versions/{v}/manifest.json"
    manifest = json.loads(local_cat.fs.cat_file(path))
    manifest["files"].append({"path": "../../../etc/passwd", "sha256": "0" * 64, "bytes": 1})
    local_cat.fs.pipe_file(path, json.dumps(manifest).encode())
    with pytest.raises(ValueError, match="file path"):
        local_cat.version("m", v)
