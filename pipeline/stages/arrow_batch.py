"""Reading and setting the columns of a `pyarrow.Table` batch, for stages that take Ray Data batches as Arrow.

Why not pandas there: Ray Data's pandas ↔ Arrow conversion of a batch costs a fixed ~0.5 ms per column (a few
dozen columns pass through the model stage), and each value of a binary column (the frames, ~1 MB a video)
becomes a copied `bytes` when read from pandas. Here the frames are read in place and only new columns are built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

VECTOR = pa.list_(pa.float32())  # the embeddings' column type (the sinks' schemas fix their width)


def values(table: pa.Table, name: str, default: Any = None) -> list[Any]:
    """A column as Python values; `default` for every row when the table has no such column."""
    if name not in table.column_names:
        return [default] * table.num_rows
    return table.column(name).to_pylist()


def binary_view(table: pa.Table, name: str, row: int, shape: Sequence[int]) -> np.ndarray:
    """The uint8 array held by a binary cell, without a copy (a scalar's `as_buffer()` copies): read-only, as
    the block may live in Ray's shared object store."""
    for chunk in table.column(name).chunks:
        if row < len(chunk):
            break
        row -= len(chunk)
    else:
        raise IndexError(f"row out of range for {name}")
    if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
        raise TypeError(f"{name} is {chunk.type}, not binary")
    validity, offsets, data = chunk.buffers()
    i = chunk.offset + row
    if validity is not None and not (validity[i // 8] >> (i % 8)) & 1:
        raise ValueError(f"row {row} has no {name}")
    width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
    start, end = (int(x) for x in np.frombuffer(offsets, dtype=width, count=2, offset=i * np.dtype(width).itemsize))
    array = np.frombuffer(data, dtype=np.uint8, count=end - start, offset=start).reshape(tuple(int(s) for s in shape))
    array.flags.writeable = False
    return array


def vectors(rows: Sequence[np.ndarray | None]) -> pa.Array:
    """float32 vectors (None for a row without one) as a list<float32> column."""
    return pa.array([None if v is None else np.asarray(v, dtype=np.float32) for v in rows], type=VECTOR)


def with_column(table: pa.Table, name: str, column: pa.Array | Sequence[Any], type: pa.DataType | None = None
                ) -> pa.Table:
    """`table` with `name` set to `column` (replaced where it exists, appended otherwise)."""
    if not isinstance(column, pa.Array | pa.ChunkedArray):
        column = pa.array(column, type=type)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, column)
    return table.append_column(name, column)
