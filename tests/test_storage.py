"""RunStore: parquet shard format, the atomic manifest, verified readers (synthetic arrays, no Ray)."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.storage import BlockRecord, CorruptShardError, RunStore

C, H, W = 4, 2, 2
STEPS = (0, 1, 2)


def _h(seed: int, step: int) -> np.ndarray:
    """Deterministic fake activation of (seed, step): lets every test check exact bytes."""
    return np.random.default_rng([seed, step]).standard_normal((C, H, W)).astype(np.float16)


def _write_block(store: RunStore, start: int, stop: int, worker: str = "w0") -> BlockRecord:
    seeds = np.arange(start, stop)
    shards = tuple(
        store.write_activations(
            step, 900 - 100 * step, seeds, np.stack([_h(s, step) for s in seeds]), worker, start
        )
        for step in STEPS
    )
    samples = store.write_samples(seeds, [f"png-{s}".encode() for s in seeds], worker, start)
    return BlockRecord(f"{start}-{stop}", start, stop, shards, samples)


@pytest.fixture
def store(tmp_path) -> RunStore:
    s = RunStore(str(tmp_path / "run"))
    s.add_blocks([_write_block(s, 0, 5), _write_block(s, 5, 10), _write_block(s, 10, 13)])
    return s


def test_activation_shard_uses_canonical_tensor_type_zstd_and_byte_stream_split(store):
    shard = store.blocks()["0-5"].shard_for_step(1)
    assert shard.path == "activations/t=1/part-w0-000000.parquet"
    pf = pq.ParquetFile(store.abspath(shard.path))
    h_type = pf.schema_arrow.field("h").type
    assert isinstance(h_type, pa.FixedShapeTensorType)
    assert h_type.value_type == pa.float16() and list(h_type.shape) == [C, H, W]
    assert pf.schema_arrow.field("seed").type == pa.int64()
    assert pf.schema_arrow.field("step").type == pa.int16()
    assert pf.schema_arrow.field("timestep").type == pa.int16()
    cols = {
        pf.metadata.row_group(0).column(i).path_in_schema: pf.metadata.row_group(0).column(i)
        for i in range(4)
    }
    h_col = cols["h.list.element"]
    assert h_col.compression == "ZSTD"
    assert "BYTE_STREAM_SPLIT" in h_col.encodings
    assert not h_col.has_dictionary_page
    # The file carries no pickled payload: only Arrow's JSON extension metadata.
    assert b"pickle" not in pf.schema_arrow.to_string().encode()
    table = pf.read()
    assert table.column("timestep").to_pylist() == [800] * 5


def test_iter_step_batches_streams_in_seed_order_across_shards_bit_exact(store):
    batches = list(store.iter_step_batches(2, batch_size=4))
    assert [len(b.seeds) for b in batches] == [4, 4, 4, 1]  # rechunked across block shards of 5, 5, 3
    seeds = np.concatenate([b.seeds for b in batches])
    assert seeds.tolist() == list(range(13))
    h = np.concatenate([b.h for b in batches])
    assert h.dtype == np.float16 and h.shape == (13, C, H, W)
    np.testing.assert_array_equal(h, np.stack([_h(s, 2) for s in range(13)]))


def test_iter_step_batches_restricted_to_blocks(store):
    seeds = np.concatenate([b.seeds for b in store.iter_step_batches(0, 100, blocks=["10-13", "0-5"])])
    assert seeds.tolist() == [0, 1, 2, 3, 4, 10, 11, 12]


def test_read_h_returns_requested_seeds_in_given_order(store):
    want = [12, 3, 7, 0]
    h = store.read_h(want)
    assert h.shape == (4, len(STEPS), C, H, W)
    expected = np.stack([np.stack([_h(s, t) for t in STEPS]) for s in want])
    np.testing.assert_array_equal(h, expected)
    with pytest.raises(KeyError, match="99"):
        store.read_h([1, 99])


def test_read_samples_sorted_by_seed(store):
    table = store.read_samples()
    assert table.column("seed").to_pylist() == list(range(13))
    assert table.column("png").to_pylist()[7] == b"png-7"


def test_truncated_shard_raises_error_naming_the_file(store):
    shard = store.blocks()["5-10"].shard_for_step(0)
    path = store.abspath(shard.path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match=r"t=0/part-w0-000005\.parquet.*truncated"):
        list(store.iter_step_batches(0, 4))
    # Without the manifest check, the parquet reader's own failure is re-raised naming the file.
    with pytest.raises(CorruptShardError, match=r"part-w0-000005\.parquet: not a valid parquet file"):
        store.open_shard(shard, verify=False)


def test_flipped_byte_fails_checksum_naming_the_file(store):
    shard = store.blocks()["0-5"].shard_for_step(2)
    path = store.abspath(shard.path)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptShardError, match=r"t=2/part-w0-000000\.parquet: sha256"):
        store.read_h([1])


def test_missing_listed_shard_is_an_error(store):
    shard = store.blocks()["0-5"].samples
    store.delete(shard.path)
    with pytest.raises(CorruptShardError, match="missing"):
        store.read_samples()


def test_unlisted_shard_is_ignored(store):
    # A worker that died after writing but before the driver listed its block leaves an orphan.
    seeds = np.arange(13, 20)
    store.write_activations(0, 900, seeds, np.zeros((7, C, H, W), np.float16), "dead", 13)
    seeds_read = np.concatenate([b.seeds for b in store.iter_step_batches(0, 64)])
    assert seeds_read.tolist() == list(range(13))


def test_manifest_update_is_atomic_when_the_write_fails(store, monkeypatch):
    before = store.read_manifest()

    def broken_mv(*args, **kwargs):
        raise OSError("simulated crash during move")

    monkeypatch.setattr(store.fs, "mv", broken_mv)
    with pytest.raises(OSError, match="simulated crash"):
        store.record_stage("pca", {"done": True})
    monkeypatch.undo()
    assert store.read_manifest() == before  # old manifest intact and still valid JSON
    leftovers = [p for p in store.fs.ls(store.root, detail=False) if ".tmp-" in p]
    assert leftovers == []


def test_manifest_lists_rows_bytes_and_sha256(store):
    manifest = json.loads(open(store.abspath("_manifest.json")).read())
    block = manifest["blocks"]["5-10"]
    assert block["start"] == 5 and block["stop"] == 10
    assert len(block["activations"]) == len(STEPS)
    for shard in block["activations"] + [block["samples"]]:
        assert shard["rows"] == 5
        assert len(shard["sha256"]) == 64
        assert shard["bytes"] == store.fs.size(store.abspath(shard["path"]))
    assert store.summary() == {
        "blocks": 3,
        "samples": 13,
        "rows": 13 * len(STEPS),
        "bytes": sum(r.bytes for r in store.blocks().values()),
    }


def test_overlapping_block_replaces_the_stale_one(store):
    # A grown run re-cuts the last block 10-13 into 10-16: seeds must not be listed twice.
    store.add_blocks([_write_block(store, 10, 16, worker="w1")])
    assert list(store.blocks()) == ["0-5", "5-10", "10-16"]
    seeds = np.concatenate([b.seeds for b in store.iter_step_batches(1, 64)])
    assert seeds.tolist() == list(range(16))


def test_identity_mismatch_names_the_setting(store):
    store.ensure_identity({"num_inference_steps": 20, "h_shape": (C, H, W)})
    store.ensure_identity({"num_inference_steps": 20, "h_shape": [C, H, W]})  # same after JSON round trip
    with pytest.raises(ValueError, match=r"num_inference_steps: run has 20, config gives 50"):
        store.ensure_identity({"num_inference_steps": 50, "h_shape": [C, H, W]})


def test_works_on_an_fsspec_memory_url():
    store = RunStore(f"memory://runs-{uuid.uuid4().hex}")
    store.add_blocks([_write_block(store, 0, 3)])
    assert "memory" in store.fs.protocol
    np.testing.assert_array_equal(store.read_h([2])[0, 1], _h(2, 1))
    assert store.stage("pca") is None
    store.record_stage("pca", {"k": 4})
    assert RunStore(store.url).stage("pca") == {"k": 4}


def test_streaming_reader_memory_does_not_grow_with_the_run(tmp_path):
    import tracemalloc

    def peak_bytes(n_blocks: int) -> tuple[int, int]:
        store = RunStore(str(tmp_path / f"run{n_blocks}"))
        rng = np.random.default_rng(0)
        for b in range(n_blocks):
            seeds = np.arange(b * 64, (b + 1) * 64)
            h = rng.standard_normal((64, 16, 8, 8)).astype(np.float16)  # 128 KB per shard
            shard = store.write_activations(0, 999, seeds, h, "w", b)
            samples = store.write_samples(seeds, [b""] * 64, "w", b)
            store.add_blocks([BlockRecord(f"{b}", int(seeds[0]), int(seeds[-1]) + 1, (shard,), samples)])
        tracemalloc.start()
        base_arrow, peak_arrow, rows = pa.total_allocated_bytes(), 0, 0
        for batch in store.iter_step_batches(0, 48):
            rows += len(batch.seeds)
            peak_arrow = max(peak_arrow, pa.total_allocated_bytes() - base_arrow)
        _, peak_py = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return peak_py + peak_arrow, rows * 16 * 8 * 8 * 2

    small, small_total = peak_bytes(4)
    large, large_total = peak_bytes(16)
    # Python/numpy (tracemalloc) plus Arrow pool peaks: a shard and a batch or two, whatever the run
    # size. Four times the data (1.5 MB more) may add at most 10% of that (measured: ~10 KB).
    assert large - small < 0.1 * (large_total - small_total)


def test_a_transient_error_reading_the_manifest_is_not_taken_for_a_new_run(tmp_path, monkeypatch):
    """fsspec's exists() answers False on any error: the manifest is read directly, so a storage
    hiccup is retried (or raised) instead of starting an empty manifest that would drop blocks."""
    store = RunStore(str(tmp_path / "run"), retries=2, backoff_s=0.0)
    store.update_manifest(lambda m: m["stages"].update({"generate": {"done": True}}))
    real_cat, calls = store.fs.cat_file, []

    def flaky_cat(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            raise ConnectionError("connection reset")
        return real_cat(path, *args, **kwargs)

    monkeypatch.setattr(store.fs, "exists", lambda path, **kw: False)  # what fsspec does on errors
    monkeypatch.setattr(store.fs, "cat_file", flaky_cat)
    assert store.read_manifest()["stages"] == {"generate": {"done": True}}
    assert len(calls) == 2
