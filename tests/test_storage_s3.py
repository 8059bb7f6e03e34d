"""RunStore on a real S3 protocol server (moto on 127.0.0.1, via s3fs): partial reads fetch the
footer and the wanted rows with ranged GETs and verify them; full reads verify whole shards."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.storage import BlockRecord, CorruptShardError, RunStore

try:  # `python -m pytest` puts the repo root on sys.path; bare `pytest` only puts tests/ there
    from tests.counting_fs import CountingFS
    from tests.s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)
except ModuleNotFoundError:  # pragma: no cover
    from counting_fs import CountingFS
    from s3_server import s3_bucket, s3_server  # noqa: F401

pytestmark = pytest.mark.s3

SHAPE = (16, 8, 8)
STEPS = (0, 1)
ROWS = 32


@pytest.fixture
def run(s3_bucket, s3_server):
    store = RunStore(f"{s3_bucket}/run", s3_server.storage_options())
    rng = np.random.default_rng(0)
    h = {step: rng.standard_normal((2 * ROWS, *SHAPE)).astype(np.float16) for step in STEPS}
    for start in (0, ROWS):
        seeds = np.arange(start, start + ROWS)
        shards = tuple(
            store.write_activations(t, 900 - t, seeds, h[t][start : start + ROWS], "w", start) for t in STEPS
        )
        samples = store.write_samples(seeds, [b""] * ROWS, "w", start)
        store.add_blocks([BlockRecord(f"{start}", start, start + ROWS, shards, samples)])
    return store, h


def test_partial_read_on_s3_returns_the_rows_and_reads_little(run):
    store, h = run
    want = [40, 3, 17, 63]
    reader = RunStore(store.url, store.storage_options)
    reader.fs = counting = CountingFS(reader.fs)
    got = reader.read_h(want)
    for t, step in enumerate(STEPS):
        np.testing.assert_array_equal(got[:, t], h[step][want])
    stored = sum(s.bytes for r in store.blocks().values() for s in r.activations)
    needed = len(want) * len(STEPS) * np.prod(SHAPE) * 2
    assert counting.bytes_read < 0.25 * stored  # footers + 4 rows of the 64 per step
    assert counting.bytes_read > needed * 0.5  # it did fetch the rows (zstd of random floats: ~0.9)
    full = np.concatenate([b.h for b in store.iter_step_batches(1, 10)])
    np.testing.assert_array_equal(full, h[1])


def test_a_flipped_byte_in_a_row_on_s3_is_refused_naming_the_url(run):
    store, _ = run
    shard = store.blocks()["32"].shard_for_step(0)
    a, b = store.read_footers([shard])[0].h_range(5)
    data = bytearray(store.read_bytes(shard.path))
    data[(a + b) // 2] ^= 0x55
    store.write_bytes(shard.path, bytes(data))
    where = store.describe(shard.path)
    assert where.startswith("s3://")
    with pytest.raises(CorruptShardError, match=rf"{where}: (row 5 \(seed 37\)|cannot read)"):
        store.read_h([37], steps=[0])
    with pytest.raises(CorruptShardError, match=rf"{where}: sha256"):
        list(store.iter_step_batches(0, 16))
