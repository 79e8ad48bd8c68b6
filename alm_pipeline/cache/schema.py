"""Row schema of teacher-cache shards (format version 1).

One Parquet row per document. Column names are part of the public format: other tools may read caches.

=================  ====================  =====================================================================
column             type                  meaning
=================  ====================  =====================================================================
doc_id             string                stable id of the document (``--id-field``, else a hash of the text)
text               string                exactly the UTF-8 text the teacher saw (cut to the kept tokens when
                                         truncated; unicode-normalized when the teacher tokenizer does that)
token_ids          list<int32>           teacher token ids, including the special tokens its tokenizer adds
offsets            list<int32>           byte END offset of each token in ``text.encode("utf-8")``; a token
                                         covering no bytes (BOS) repeats the previous offset (0 at the start)
logprob            list<float32>         log p_T(t_u | t_<u), fp32, clipped at 0; NaN at position 0
boundary_logprob   list<float32>         σ_u = log of the teacher's total probability (full softmax, fp32) that
                                         the token after position u starts with a space, newline or tab byte or
                                         is a special token; defined at every position, clipped at 0
truncated          bool                  the document was longer than ``max_length`` tokens and was cut
=================  ====================  =====================================================================
"""

from __future__ import annotations

import pyarrow as pa

FORMAT_VERSION = 1
CACHE_KIND = "alm-teacher-cache"

CACHE_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("offsets", pa.list_(pa.int32()), nullable=False),
        pa.field("logprob", pa.list_(pa.float32()), nullable=False),
        pa.field("boundary_logprob", pa.list_(pa.float32()), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
    ]
)

# What the driver stages for the tokenize stage (the validated corpus slice of one shard).
STAGED_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
)

# What the tokenize stage hands to the scoring stage.
TOKENIZED_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("offsets", pa.list_(pa.int32()), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
    ]
)


def check_schema(schema: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Raise a clear error if ``schema`` lacks a column of ``expected`` or has it with another type."""
    problems = []
    for field in expected:
        idx = schema.get_field_index(field.name)
        if idx < 0:
            problems.append(f"missing column {field.name!r}")
        elif not schema.field(idx).type.equals(field.type):
            problems.append(f"column {field.name!r} is {schema.field(idx).type}, expected {field.type}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


def table_to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def ipc_to_table(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(payload)).read_all()
