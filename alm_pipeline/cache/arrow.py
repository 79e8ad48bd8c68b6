"""Arrow list columns as flat numpy arrays with row pointers, and Arrow IPC payloads.

A list column (one list per document) is handled as ``values`` (every row's entries, concatenated) plus
``rows`` (int64, one per row + 1: row r is ``values[rows[r]:rows[r + 1]]``). Stages and the trainer work on
that form; these are the only conversions between it and Arrow.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def list_parts(column: pa.ChunkedArray | pa.ListArray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (all values concatenated, as ``dtype``; row pointers int64, one per row + 1)."""
    if isinstance(column, pa.ChunkedArray):
        arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    else:
        arr = column
    if arr.null_count:
        raise ValueError(f"list column of type {arr.type} has {arr.null_count} null rows")
    offsets = arr.offsets.to_numpy().astype(np.int64)  # respects a sliced table; relative to arr.values
    lo, hi = (int(offsets[0]), int(offsets[-1])) if len(offsets) else (0, 0)
    values = arr.values.slice(lo, hi - lo).to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=dtype), offsets - lo


def take_rows(values: np.ndarray, rows: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows ``keep`` (bool per row) of a flat ragged array: (values, row pointers)."""
    lengths = np.diff(rows)
    new_rows = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(lengths[keep], out=new_rows[1:])
    return values[np.repeat(keep, lengths)], new_rows


def list_array(values: np.ndarray, rows: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """The list array of flat ``values`` and row pointers ``rows`` (int32 Arrow offsets)."""
    return pa.ListArray.from_arrays(
        pa.array(rows.astype(np.int32)), pa.array(np.asarray(values, dtype=value_type.to_pandas_dtype()))
    )


def ragged_list_array(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """The list array with one row per numpy array of ``arrays``."""
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(value_type.to_pandas_dtype())))


def table_to_ipc(table: pa.Table) -> bytes:
    """A table as one Arrow IPC stream payload (how a shard travels between Ray Data stages)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def ipc_to_table(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(payload)).read_all()
