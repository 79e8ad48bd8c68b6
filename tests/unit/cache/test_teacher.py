"""The teacher cache's compact log-probs (``--logprob-dtype``): ℓ and σ stored at 16 bits are read back as fp32
within the format's rounding, NaN stays NaN, and the shards get smaller."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alm_pipeline.cache import store
from alm_pipeline.cache.arrow import ragged_list_array
from alm_pipeline.cache.teacher import (
    CACHE_SCHEMA,
    TeacherCache,
    cache_schema,
    decode_logprobs,
    encode_logprobs,
)

# relative rounding of each format (round to nearest: half an ulp)
RELATIVE = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def _cache_rows(n_docs: int, rng) -> pa.Table:
    lengths = rng.integers(2, 300, size=n_docs)
    logprob = [np.concatenate([[np.nan], -rng.gamma(0.6, 3.0, k - 1)]).astype(np.float32) for k in lengths]
    sigma = [np.minimum(0, -rng.gamma(0.3, 1.0, k)).astype(np.float32) for k in lengths]
    ids = [rng.integers(0, 50_000, k).astype(np.int32) for k in lengths]
    offsets = [np.cumsum(rng.integers(1, 6, k)).astype(np.int32) for k in lengths]
    return pa.Table.from_arrays(
        [
            pa.array([f"d{i}" for i in range(n_docs)]),
            pa.array(["x" * int(o[-1]) for o in offsets]),
            ragged_list_array(ids, pa.int32()),
            ragged_list_array(offsets, pa.int32()),
            ragged_list_array(logprob, pa.float32()),
            ragged_list_array(sigma, pa.float32()),
            pa.array([False] * n_docs),
        ],
        schema=CACHE_SCHEMA,
    )


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_logprobs_round_trip_at_each_dtype(tmp_path, dtype):
    table = _cache_rows(20, np.random.default_rng(0))
    info = TeacherCache.write_shard(tmp_path, 0, table, stats={}, logprob_dtype=dtype)
    stored = pq.read_schema(tmp_path / info.file)
    assert stored.field("logprob").type == cache_schema(dtype).field("logprob").type
    back = TeacherCache.read_shard_entry(tmp_path, info)  # what align gets: fp32, CACHE_SCHEMA
    assert back.schema.equals(CACHE_SCHEMA, check_metadata=False)
    for name in ("logprob", "boundary_logprob"):
        want = table[name].combine_chunks().values.to_numpy(zero_copy_only=False)
        got = back[name].combine_chunks().values.to_numpy(zero_copy_only=False)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))  # the NaN at position 0 stays
        finite = ~np.isnan(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=RELATIVE[dtype], atol=1e-7)
        assert np.all(got[finite] <= 0)  # rounding keeps log-probs clipped at 0
    for name in ("doc_id", "token_ids", "offsets", "text"):
        assert back[name].equals(table[name])


def test_sixteen_bit_logprobs_make_smaller_shards(tmp_path):
    table = _cache_rows(40, np.random.default_rng(1))
    sizes = {
        dtype: TeacherCache.write_shard(tmp_path / dtype, 0, table, stats={}, logprob_dtype=dtype).bytes
        for dtype in ("float32", "float16", "bfloat16")
    }
    assert sizes["float16"] < 0.8 * sizes["float32"] and sizes["bfloat16"] < 0.8 * sizes["float32"]


def test_bfloat16_rounds_to_nearest_even_and_keeps_special_values():
    values = np.array([0.0, -0.0, -1.0, -1.00390625, -1.005859375, -np.inf, np.nan, -1e38], np.float32)
    table = pa.table({"logprob": pa.array([values], type=pa.list_(pa.float32()))})
    back = decode_logprobs(encode_logprobs(table, "bfloat16"))["logprob"].to_pylist()[0]
    # -1.00390625 is halfway between -1 and -1.0078125: to even (-1); -1.005859375 rounds up to -1.0078125
    assert back[:5] == [0.0, -0.0, -1.0, -1.0, -1.0078125]
    assert back[5] == -np.inf and np.isnan(back[6]) and np.isfinite(back[7])


def test_an_unknown_logprob_dtype_is_refused():
    with pytest.raises(ValueError, match="logprob dtype 'int8': use one of float32, float16, bfloat16"):
        cache_schema("int8")
    assert store.SHARD_DIR == "shards"
