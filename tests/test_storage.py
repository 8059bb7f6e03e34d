"""RunStore: parquet shard format, the atomic manifest, verified readers (synthetic arrays, no Ray)."""

from __future__ import annotations

import hashlib
import json
import re
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.run_format import footer_sha256
from pipeline.storage import BlockRecord, CorruptShardError, RunStore
from tests.counting_fs import CountingFS

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


def test_activation_shard_has_one_binary_row_per_row_group_and_its_facts_in_the_footer(store):
    shard = store.blocks()["0-5"].shard_for_step(1)
    assert shard.path == "activations/t=1/part-w0-000000.parquet"
    pf = pq.ParquetFile(store.abspath(shard.path))
    assert pf.schema_arrow.names == ["seed", "h"]
    assert pf.schema_arrow.field("seed").type == pa.int64()
    assert pf.schema_arrow.field("h").type == pa.binary(C * H * W * 2)
    md = pf.metadata
    assert md.num_row_groups == md.num_rows == 5
    for i in range(5):
        seed_col, h_col = md.row_group(i).column(0), md.row_group(i).column(1)
        assert md.row_group(i).num_rows == 1
        assert seed_col.statistics.min == seed_col.statistics.max == i  # the row's seed, footer only
        assert h_col.compression == "ZSTD" and not h_col.has_dictionary_page
        assert h_col.statistics is None
    info = json.loads(md.metadata[b"hspace"])
    assert info["h_shape"] == [C, H, W] and info["h_dtype"] == "float16"
    assert (info["step"], info["timestep"]) == (1, 800)
    assert info["row_sha256"] == [hashlib.sha256(_h(s, 1).tobytes()).hexdigest() for s in range(5)]
    assert b"ARROW:schema" not in md.metadata  # no second copy of the schema (and nothing pickled)
    # An external reader needs only the metadata: h is the row's float16 bytes in C order.
    table = pq.read_table(store.abspath(shard.path))
    h3 = np.frombuffer(table.column("h")[3].as_py(), "<f2").reshape(info["h_shape"])
    np.testing.assert_array_equal(h3, _h(3, 1))
    footer = store.read_footers([shard])[0]
    assert footer.seeds.tolist() == list(range(5)) and footer.h_shape == (C, H, W)
    assert (footer.step, footer.timestep) == (1, 800)


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


def _flip(path: str, offset: int) -> None:
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_flipped_byte_in_a_row_fails_both_readers_naming_the_file(store):
    shard = store.blocks()["0-5"].shard_for_step(2)
    start, end = store.read_footers([shard])[0].h_range(3)
    _flip(store.abspath(shard.path), (start + end) // 2)
    with pytest.raises(CorruptShardError, match=r"t=2/part-w0-000000\.parquet: sha256 .* does not match"):
        list(store.iter_step_batches(2, batch_size=4))
    with pytest.raises(
        CorruptShardError, match=r"t=2/part-w0-000000\.parquet: (row 3 \(seed 3\)|cannot read)"
    ):
        store.read_h([1, 3], steps=[2])
    # A partial read verifies the bytes it uses: the shard's other rows are still readable.
    np.testing.assert_array_equal(store.read_h([4, 1], steps=[2])[:, 0], np.stack([_h(4, 2), _h(1, 2)]))


def _footer_span(path: str) -> tuple[bytes, int, int]:
    data = open(path, "rb").read()
    n = int.from_bytes(data[-8:-4], "little")
    return data, len(data) - 8 - n, len(data) - 8


def test_tampered_footer_is_refused_by_both_readers(store):
    shard = store.blocks()["5-10"].shard_for_step(0)
    path = store.abspath(shard.path)
    data, start, end = _footer_span(path)
    digest = hashlib.sha256(_h(6, 0).tobytes()).hexdigest().encode()
    at = data.index(digest, start, end)
    open(path, "wb").write(data[:at] + digest[::-1] + data[at + 64 :])  # same size, other row digest
    with pytest.raises(CorruptShardError, match=r"part-w0-000005\.parquet: footer sha256 .* does not match"):
        store.read_h([6], steps=[0])
    with pytest.raises(CorruptShardError, match=r"part-w0-000005\.parquet: sha256 .* does not match"):
        list(store.iter_step_batches(0, batch_size=4))


def test_a_row_digest_that_does_not_match_its_row_is_refused_even_with_a_consistent_manifest(store):
    """A shard whose manifest entry matches its bytes but whose footer vouches for other h: the
    partial reader checks each row it decodes against the footer."""
    shard = store.blocks()["5-10"].shard_for_step(0)
    path = store.abspath(shard.path)
    data, start, end = _footer_span(path)
    digest = hashlib.sha256(_h(6, 0).tobytes()).hexdigest().encode()
    at = data.index(digest, start, end)
    forged = data[:at] + b"0" * 64 + data[at + 64 :]
    open(path, "wb").write(forged)
    entry = {
        "sha256": hashlib.sha256(forged).hexdigest(),
        "footer_sha256": footer_sha256(forged),
        "bytes": len(forged),
    }
    store.update_manifest(lambda m: m["blocks"]["5-10"]["activations"][0].update(entry))
    with pytest.raises(
        CorruptShardError, match=r"part-w0-000005\.parquet: row 1 \(seed 6\) fails its sha256"
    ):
        store.read_h([6], steps=[0])
    np.testing.assert_array_equal(store.read_h([7], steps=[0])[0, 0], _h(7, 0))


def test_truncated_shard_fails_the_partial_reader_naming_the_file(store):
    shard = store.blocks()["5-10"].shard_for_step(1)
    path = store.abspath(shard.path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-100])
    with pytest.raises(
        CorruptShardError, match=r"t=1/part-w0-000005\.parquet: \d+ bytes, manifest says .*truncated"
    ):
        store.read_h([6])


def test_partial_read_of_scattered_seeds_equals_the_full_read(store):
    full = {}  # (seed, step) -> h row of the whole-shard reader
    for step in STEPS:
        for batch in store.iter_step_batches(step, 4):
            full.update({(int(s), step): row for s, row in zip(batch.seeds, batch.h, strict=True)})
    want = [11, 0, 5, 12, 4, 9, 1]
    got = store.read_h(want)
    assert got.dtype == np.float16 and got.shape == (len(want), len(STEPS), C, H, W)
    for i, seed in enumerate(want):
        for t, step in enumerate(STEPS):
            assert got[i, t].tobytes() == full[seed, step].tobytes()


def test_partial_read_of_2_rows_of_a_64_row_shard_reads_only_the_footer_and_those_rows(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    rng = np.random.default_rng(1)
    h = rng.standard_normal((64, 16, 8, 8)).astype(np.float16)
    shard = store.write_activations(0, 999, np.arange(64), h, "w", 0)
    samples = store.write_samples(np.arange(64), [b""] * 64, "w", 0)
    store.add_blocks([BlockRecord("0-64", 0, 64, (shard,), samples)])
    footer = store.read_footers([shard])[0]
    store.fs = counting = CountingFS(store.fs)
    got = store.read_h([40, 3], steps=[0])
    np.testing.assert_array_equal(got[:, 0], h[[40, 3]])
    _, start, end = _footer_span(store.abspath(shard.path))
    chunks = sum(b - a for a, b in (footer.h_range(40), footer.h_range(3)))
    assert counting.bytes_read == 8 + (end - start) + chunks  # trailer, footer, the two rows' h: nothing else
    assert counting.bytes_read < 0.2 * shard.bytes
    assert counting.calls == [1, 1, 2]  # trailer, footer, then both rows in one ranged read


def test_a_transient_error_in_a_ranged_read_is_retried(store, monkeypatch):
    real, calls = store.fs.cat_ranges, []

    def flaky(paths, starts, ends, **kwargs):
        calls.append(len(paths))
        if len(calls) == 2:
            raise ConnectionError("connection reset")
        return real(paths, starts, ends, **kwargs)

    store.retries, store.backoff_s = 2, 0.0
    monkeypatch.setattr(store.fs, "cat_ranges", flaky)
    np.testing.assert_array_equal(store.read_h([8], steps=[1])[0, 0], _h(8, 1))
    assert len(calls) == 4


def test_missing_listed_shard_is_an_error(store):
    shard = store.blocks()["0-5"].samples
    store.delete(shard.path)
    with pytest.raises(CorruptShardError, match="missing"):
        store.read_samples()


def test_missing_activation_shard_is_named_by_the_partial_reader(store):
    shard = store.blocks()["0-5"].shard_for_step(1)
    store.delete(shard.path)
    with pytest.raises(
        CorruptShardError, match=rf"{re.escape(shard.path)}: listed in the manifest but missing"
    ):
        store.read_h([2], steps=[1])


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


def test_manifest_lists_rows_bytes_sha256_and_the_footer_sha256(store):
    manifest = json.loads(open(store.abspath("_manifest.json")).read())
    block = manifest["blocks"]["5-10"]
    assert block["start"] == 5 and block["stop"] == 10
    assert len(block["activations"]) == len(STEPS)
    for shard in block["activations"] + [block["samples"]]:
        assert shard["rows"] == 5
        assert len(shard["sha256"]) == 64
        assert shard["bytes"] == store.fs.size(store.abspath(shard["path"]))
    for shard in block["activations"]:
        assert shard["footer_sha256"] == footer_sha256(open(store.abspath(shard["path"]), "rb").read())
    assert "footer_sha256" not in block["samples"]
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


def test_the_decoder_gets_only_fetched_bytes(store):
    """Rows are decoded from a file object that serves the fetched ranges and nothing else: a row
    whose bytes were not fetched is an error naming the file, never a silent extra read."""
    shard = store.blocks()["0-5"].shard_for_step(0)
    footer = store.read_footers([shard])[0]
    a, b = footer.h_range(2)
    data = open(store.abspath(shard.path), "rb").read()
    h = store._decode_rows(shard, footer, [2], {a: data[a:b]})
    np.testing.assert_array_equal(h[0], _h(2, 0))
    with pytest.raises(
        CorruptShardError, match=r"part-w0-000000\.parquet: cannot read rows \[2, 3\].*not fetched"
    ):
        store._decode_rows(shard, footer, [2, 3], {a: data[a:b]})
