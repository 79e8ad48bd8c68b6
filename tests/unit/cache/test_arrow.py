"""Arrow list-column helpers (alm_pipeline.cache.arrow): split into values and row ids, filter, rebuild."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from alm_pipeline.cache.arrow import list_array, list_parts, ragged_list_array, take_rows


def test_list_column_helpers_round_trip():
    rng = np.random.default_rng(1)
    arrays = [rng.integers(-5, 5, size=k) for k in (3, 0, 4, 1, 2)]
    column = pa.chunked_array(
        [ragged_list_array(arrays[:2], pa.int32()), ragged_list_array(arrays[2:], pa.int32())]
    )
    values, rows = list_parts(column.slice(1), np.int32)  # a sliced, chunked column
    assert rows.tolist() == [0, 0, 4, 5, 7]
    assert values.tolist() == np.concatenate(arrays[1:]).tolist()
    keep = np.array([True, False, True, True])
    kept, kept_rows = take_rows(values, rows, keep)
    assert kept_rows.tolist() == [0, 0, 1, 3]
    rebuilt = list_array(kept, kept_rows, pa.int32())
    assert rebuilt.to_pylist() == [a.tolist() for a, k in zip(arrays[1:], keep, strict=True) if k]
    with pytest.raises(ValueError, match="null rows"):
        list_parts(pa.chunked_array([pa.array([[1], None], type=pa.list_(pa.int32()))]), np.int32)
