"""The run manifest reader is strict: a malformed entry or a shard with another block's seeds is a clear
error naming the file, never a bare KeyError or rows counted twice."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.storage import MANIFEST_NAME, BlockRecord, CorruptShardError, ManifestError, RunStore

C, H, W = 2, 2, 2
STEPS = (0, 1)


def _write_block(store: RunStore, start: int, stop: int, seeds: np.ndarray | None = None) -> BlockRecord:
    seeds = np.arange(start, stop) if seeds is None else seeds
    h = np.random.default_rng(start).standard_normal((len(seeds), C, H, W)).astype(np.float16)
    shards = tuple(store.write_activations(t, 900 - t, seeds, h, "w", start) for t in STEPS)
    samples = store.write_samples(seeds, [b"png"] * len(seeds), "w", start)
    return BlockRecord(f"{start}-{stop}", start, stop, shards, samples)


@pytest.fixture
def store(tmp_path) -> RunStore:
    s = RunStore(str(tmp_path / "run"))
    s.add_blocks([_write_block(s, 0, 4), _write_block(s, 4, 8)])
    return s


def _edit(store: RunStore, change) -> None:
    """Rewrite the manifest file by hand (what a bad tool or a botched merge could leave)."""
    m = json.loads(store.read_bytes(MANIFEST_NAME))
    change(m)
    store.write_bytes(MANIFEST_NAME, json.dumps(m).encode())


def _first_shard(m: dict) -> dict:
    return m["blocks"]["0-4"]["activations"][0]


HOSTILE = [
    ("no checksum", lambda m: _first_shard(m).pop("sha256"), "blocks.0-4.activations[0]: missing 'sha256'"),
    ("short checksum", lambda m: _first_shard(m).update(sha256="abc"), "activations[0].sha256: expected 64"),
    (
        "no footer checksum",
        lambda m: _first_shard(m).pop("footer_sha256"),
        "blocks.0-4.activations[0]: missing 'footer_sha256'",
    ),
    (
        "null footer checksum",
        lambda m: _first_shard(m).update(footer_sha256=None),
        "blocks.0-4.activations[0].footer_sha256: expected str, got None",
    ),
    (
        "upper-case footer checksum",
        lambda m: _first_shard(m).update(footer_sha256="A" * 64),
        "activations[0].footer_sha256: expected 64 lowercase hex",
    ),
    (
        "footer checksum as a number",
        lambda m: _first_shard(m).update(footer_sha256=7),
        "activations[0].footer_sha256: expected str, got 7",
    ),
    (
        "rows as string",
        lambda m: _first_shard(m).update(rows="4"),
        "activations[0].rows: expected int, got '4'",
    ),
    ("rows as bool", lambda m: _first_shard(m).update(rows=True), "activations[0].rows: expected int"),
    ("negative bytes", lambda m: _first_shard(m).update(bytes=-1), "activations[0].bytes: must be >= 0"),
    (
        "absolute path",
        lambda m: _first_shard(m).update(path="/etc/passwd"),
        "activations[0].path: must be a rel",
    ),
    (
        "parent path",
        lambda m: _first_shard(m).update(path="../x.parquet"),
        "activations[0].path: must be a rel",
    ),
    (
        "rows != seeds",
        lambda m: _first_shard(m).update(rows=3),
        "activations[0]: 3 rows for the 4 seeds 0..3",
    ),
    ("no step", lambda m: _first_shard(m).update(step=None), "every activation shard needs a step"),
    (
        "duplicate step",
        lambda m: m["blocks"]["0-4"]["activations"].append(_first_shard(m)),
        "duplicate steps",
    ),
    ("no samples", lambda m: m["blocks"]["0-4"].pop("samples"), "blocks.0-4: missing 'samples'"),
    ("reversed range", lambda m: m["blocks"]["0-4"].update(start=9), "empty or reversed seed range 9..4"),
    ("key mismatch", lambda m: m["blocks"]["0-4"].update(key="other"), "blocks.0-4: entry says key 'other'"),
    ("block not an object", lambda m: m["blocks"].update({"0-4": [1, 2]}), "blocks.0-4: expected an object"),
]


@pytest.mark.parametrize(("what", "change", "needle"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_malformed_block_entries_name_the_file_and_entry(store, what, change, needle):
    _edit(store, change)
    with pytest.raises(ManifestError) as info:
        store.blocks()
    msg = str(info.value)
    assert MANIFEST_NAME in msg and needle in msg, msg


def test_overlapping_blocks_would_double_count_rows(store):
    rec = store.blocks()["4-8"]
    shifted = BlockRecord("2-6", 2, 6, rec.activations, rec.samples)

    def change(m):
        m["blocks"]["2-6"] = shifted.to_dict()

    _edit(store, change)
    with pytest.raises(ManifestError, match=r"blocks 0-4 \(0\.\.3\) and 2-6 \(2\.\.5\) overlap"):
        store.summary()


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"schema_version": true, "identity": null, "blocks": {}, "stages": {}}', "schema_version True"),
        (b'{"schema_version": 3, "identity": null, "blocks": {}, "stages": {}}', "schema_version 3"),
        (b'{"schema_version": 2, "identity": null, "stages": {}}', "missing 'blocks'"),
        (b'{"schema_version": 2, "identity": [], "blocks": {}, "stages": {}}', "identity: expected dict"),
        (b'{"schema_version": 2, "identity": null, "blocks": [], "stages": {}}', "blocks: expected dict"),
        (
            b'{"schema_version": 2, "identity": null, "blocks": {}, "stages": {"pca": 3}}',
            "stages.pca: expected",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (
            b'{"schema_version": 2, "identity": null, "blocks": {}, "blocks": {}, "stages": {}}',
            "not valid JSON: duplicate key 'blocks'",
        ),
    ],
    ids=[
        "utf8",
        "json",
        "list",
        "bool-version",
        "version",
        "no-blocks",
        "identity",
        "blocks",
        "stage",
        "deep",
        "duplicate-key",
    ],
)
def test_manifest_bytes_that_are_not_a_manifest(store, raw, needle):
    store.write_bytes(MANIFEST_NAME, raw)
    with pytest.raises(ManifestError) as info:
        store.read_manifest()
    assert store.describe(MANIFEST_NAME) in str(info.value) and needle in str(info.value), str(info.value)
    assert isinstance(info.value, CorruptShardError) and isinstance(info.value, ValueError)


def _swap_in_shard_of(store: RunStore, victim: str, donor_seeds: np.ndarray) -> None:
    """Overwrite block ``victim``'s step-0 shard with rows of other seeds, fixing the manifest's checksum
    so that only the seed check can notice."""
    rec = store.blocks()[victim]
    h = np.zeros((len(donor_seeds), C, H, W), np.float16)
    forged = store.write_activations(0, 900, donor_seeds, h, "forged", 0)

    def change(m):
        entry = m["blocks"][victim]["activations"][0]
        entry.update(forged.to_dict())

    _edit(store, change)
    assert store.blocks()[victim].n_seeds == rec.n_seeds


@pytest.mark.parametrize(
    "seeds", [np.arange(4, 8), np.array([0, 1, 2, 2]), np.array([0, 1, 2, 9])], ids=["other", "dup", "stray"]
)
def test_a_shard_holding_seeds_of_another_block_is_refused_by_every_reader(store, seeds):
    _swap_in_shard_of(store, "0-4", seeds)
    with pytest.raises(
        CorruptShardError, match=r"part-forged-000000\.parquet: .* its block 0-4 \(seeds 0\.\.3\)"
    ):
        list(store.iter_step_batches(0, batch_size=3))
    with pytest.raises(CorruptShardError, match=r"part-forged-000000\.parquet"):
        store.read_h([1], steps=[0])


def test_a_samples_shard_with_other_seeds_is_refused(store):
    rec = store.blocks()["4-8"]
    forged = store.write_samples(np.arange(0, 4), [b"x"] * 4, "forged", 4)
    _edit(store, lambda m: m["blocks"]["4-8"]["samples"].update(forged.to_dict()))
    assert store.blocks()["4-8"].samples.path != rec.samples.path
    with pytest.raises(CorruptShardError, match=r"seeds \[0, 1, 2, 3\] outside its block 4-8"):
        store.read_samples()


def test_a_block_missing_a_step_the_others_have_is_named(store):
    _edit(store, lambda m: m["blocks"]["4-8"]["activations"].pop())
    with pytest.raises(ManifestError, match=r"_manifest\.json: block 4-8 has no activation shard for step 1"):
        store.read_h([0, 5])
    with pytest.raises(
        ManifestError, match=r"block 4-8 has no activation shard for step 1 \(it has steps \[0\]\)"
    ):
        list(store.iter_step_batches(1, batch_size=2))


def test_a_valid_manifest_round_trips(store):
    blocks = store.blocks()
    assert [(r.start, r.stop) for r in blocks.values()] == [(0, 4), (4, 8)]
    assert all(BlockRecord.from_dict(r.to_dict()) == r for r in blocks.values())
    got = np.concatenate([b.seeds for b in store.iter_step_batches(1, batch_size=3)])
    assert got.tolist() == list(range(8))


def test_a_version_1_manifest_is_refused_with_what_to_do(store):
    """Run format 1 stored h as parquet lists; its shards are not reinterpreted, the run is refused."""
    _edit(store, lambda m: m.update(schema_version=1))
    for read in (store.blocks, lambda: store.read_h([0]), lambda: list(store.iter_step_batches(0, 2))):
        with pytest.raises(ManifestError) as info:
            read()
        msg = str(info.value)
        assert store.describe(MANIFEST_NAME) in msg and "schema_version 1" in msg, msg
        assert "older version of hspace" in msg and "new storage.run_url or delete the run" in msg, msg
