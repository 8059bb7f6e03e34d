"""Run format 1's activation layout, kept as a measured alternative in the storage benchmarks:
h as Arrow's ``fixed_shape_tensor<float16>`` (a parquet list column) next to constant ``step`` /
``timestep`` columns, one row group per shard. ``pipeline.storage`` no longer reads or writes it."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def list_table(seeds: np.ndarray, step: int, timestep: int, h: np.ndarray) -> pa.Table:
    """Rows of one step in the list layout: seed int64, step int16, timestep int16, h tensor."""
    n = len(seeds)
    return pa.table(
        {
            "seed": pa.array(np.asarray(seeds, np.int64), pa.int64()),
            "step": pa.array(np.full(n, step, np.int16), pa.int16()),
            "timestep": pa.array(np.full(n, timestep, np.int16), pa.int16()),
            "h": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(h, np.float16)),
        }
    )


def list_parquet(table: pa.Table, compression: str | None = "zstd", split: bool = True) -> bytes:
    """The list layout as format 1 wrote it (zstd + byte_stream_split by default)."""
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression=compression or "none",
        use_dictionary=["step", "timestep"],
        use_byte_stream_split=["h.list.element"] if split else False,
        row_group_size=table.num_rows,
    )
    return buf.getvalue()


def list_decode(data: bytes) -> np.ndarray:
    """h [N, C, H, W] float16 of a list-layout shard."""
    t = pq.ParquetFile(pa.BufferReader(data)).read(columns=["seed", "h"])
    return t.column("h").combine_chunks().to_numpy_ndarray()
