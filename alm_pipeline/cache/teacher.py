"""The teacher cache (format version 2): one teacher's scores of one corpus, reused by every student.

A :class:`~alm_pipeline.cache.dataset.ShardedDataset` with ``boundary_tokens.json`` (the token ids whose
probability σ sums) next to ``manifest.json``. One Parquet row per document. Column names are part of the
public format: other tools may read caches.

ℓ and σ are computed in fp32 and stored as the manifest's ``logprob_dtype`` says (``--logprob-dtype``):
``float32`` (default, lossless), ``float16`` (Parquet halffloat) or ``bfloat16`` (the upper 16 bits of the
fp32 value, rounded to nearest even, stored as ``list<uint16>`` with the field metadata ``alm.dtype:
bfloat16``). Readers (:meth:`TeacherCache.read_shard`) always hand back fp32 columns.

=================  ====================  =====================================================================
column             type                  meaning
=================  ====================  =====================================================================
doc_id             string                stable id of the document (``--id-field``, else a hash of the text)
text               string                exactly the UTF-8 text the teacher saw (cut to the kept tokens when
                                         truncated; unicode-normalized when the teacher tokenizer does that)
token_ids          list<int32>           teacher token ids, including the special tokens its tokenizer adds
offsets            list<int32>           byte END offset of each token in ``text.encode("utf-8")``; a token
                                         covering no bytes (BOS) repeats the previous offset (0 at the start)
logprob            list<float32> (†)     log p_T(t_u | t_<u), fp32, clipped at 0; NaN at position 0
boundary_logprob   list<float32> (†)     σ_u = log of the teacher's total probability (full softmax, fp32) that
                                         the token after position u starts with a space, newline or tab byte or
                                         is a special token; defined at every position, clipped at 0
truncated          bool                  the document was longer than ``max_length`` tokens and was cut
=================  ====================  =====================================================================

(†) as read; stored at ``logprob_dtype``.

A compact cache (``--derive-text``, manifest ``"text": "derived"``) stores neither ``text`` nor ``offsets`` but a
``text_bytes`` int32 per row and the teacher's token bytes once (``token_bytes.parquet``); readers get both
columns back exactly (:mod:`alm_pipeline.cache.token_bytes`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alm_pipeline.cache import store
from alm_pipeline.cache.dataset import PathLike, ShardedDataset
from alm_pipeline.cache.token_bytes import (
    DERIVED_COLUMNS,
    TEXT_BYTES_COLUMN,
    TOKEN_BYTES_FILE,
    add_derived_columns,
    drop_derived_columns,
    load_token_table,
)
from alm_pipeline.storage import Location, location

FORMAT_VERSION = 2
CACHE_KIND = "alm-teacher-cache"
BOUNDARY_FILE = "boundary_tokens.json"
BOUNDARY_DEFINITION = "next token starts with a space, newline or tab byte, or is a special token"

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

# Conversations (see alm_pipeline.pipeline.chat): the messages as canonical JSON, each message's content as
# [start, end) bytes of the rendered ``text``, and per token the message it belongs to (-1: the chat template's
# own text). Null for plain-text rows. Caches written before these columns have none of them.
CHAT_FIELDS = [
    pa.field("messages", pa.string(), nullable=True),
    pa.field("content_spans", pa.list_(pa.int32()), nullable=True),
    pa.field("token_message", pa.list_(pa.int16()), nullable=True),
]
CHAT_COLUMNS = tuple(f.name for f in CHAT_FIELDS)

LOGPROB_COLUMNS = ("logprob", "boundary_logprob")
LOGPROB_DTYPES = ("float32", "float16", "bfloat16")
_DTYPE_KEY = b"alm.dtype"


def cache_schema(logprob_dtype: str = "float32", derive_text: bool = False, chat: bool = False) -> pa.Schema:
    """The schema cache shards are stored with at ``logprob_dtype`` (ℓ and σ columns differ), without ``text``
    and ``offsets`` but with ``text_bytes`` when ``derive_text``, with :data:`CHAT_FIELDS` when ``chat``."""
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprob dtype {logprob_dtype!r}: use one of {', '.join(LOGPROB_DTYPES)}")
    fields = []
    for f in CACHE_SCHEMA:
        if f.name in LOGPROB_COLUMNS and logprob_dtype == "float16":
            f = pa.field(f.name, pa.list_(pa.float16()), nullable=False)
        elif f.name in LOGPROB_COLUMNS and logprob_dtype == "bfloat16":
            f = pa.field(f.name, pa.list_(pa.uint16()), nullable=False, metadata={_DTYPE_KEY: b"bfloat16"})
        if not (derive_text and f.name in DERIVED_COLUMNS):
            fields.append(f)
    if derive_text:
        fields.append(pa.field(TEXT_BYTES_COLUMN, pa.int32(), nullable=False))
    if chat:
        fields.extend(CHAT_FIELDS)
    return pa.schema(fields)


def encode_logprobs(table: pa.Table, logprob_dtype: str) -> pa.Table:
    """``table`` (fp32 ℓ and σ) with ℓ and σ stored at ``logprob_dtype`` (rounded to nearest even)."""
    schema = cache_schema(logprob_dtype)
    for name in LOGPROB_COLUMNS:
        if name not in table.column_names or logprob_dtype == "float32":
            continue
        column = table[name].combine_chunks()
        if logprob_dtype == "float16":
            encoded = column.cast(pa.list_(pa.float16()))
        else:
            values = column.values.to_numpy(zero_copy_only=False).astype(np.float32)
            bits = values.view(np.uint32)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            rounded[np.isnan(values)] = 0x7FC0  # a NaN stays a NaN (rounding could carry it into ±inf)
            encoded = pa.ListArray.from_arrays(column.offsets, pa.array(rounded, type=pa.uint16()))
        idx = table.column_names.index(name)
        table = table.set_column(idx, schema.field(name), encoded)
    return table


def decode_logprobs(table: pa.Table) -> pa.Table:
    """``table`` with ℓ and σ as fp32, whatever they are stored as (see :func:`encode_logprobs`)."""
    for idx, f in enumerate(table.schema):
        if f.name not in LOGPROB_COLUMNS or not pa.types.is_list(f.type):
            continue
        value_type = f.type.value_type
        if pa.types.is_float32(value_type):
            continue
        column = table[f.name].combine_chunks()
        if pa.types.is_float16(value_type):
            decoded = column.cast(pa.list_(pa.float32()))
        elif pa.types.is_uint16(value_type) and (f.metadata or {}).get(_DTYPE_KEY) == b"bfloat16":
            bits = column.values.to_numpy(zero_copy_only=False).astype(np.uint32) << 16
            decoded = pa.ListArray.from_arrays(column.offsets, pa.array(bits.view(np.float32)))
        else:
            continue  # left as it is: the schema check names the column
        table = table.set_column(idx, pa.field(f.name, pa.list_(pa.float32()), nullable=False), decoded)
    return table


_TOTALS = ("truncated_docs", "text_bytes", "predicted_tokens", "predicted_bytes", "sum_logprob", "chat_docs")


@dataclass
class TeacherCache(ShardedDataset):
    kind = CACHE_KIND
    format_version = FORMAT_VERSION
    what = "teacher cache"
    short = "cache"
    rerun = "alm-pipeline teacher-cache"
    schema = CACHE_SCHEMA
    token_column = "token_ids"
    contents = (*ShardedDataset.contents, BOUNDARY_FILE, TOKEN_BYTES_FILE)

    @property
    def logprob_dtype(self) -> str:
        """How ℓ and σ are stored (readers get fp32 whatever it is)."""
        return self.manifest.get("logprob_dtype", "float32")

    @property
    def derive_text(self) -> bool:
        """True for a compact cache: ``text`` and ``offsets`` are derived from the token ids when read."""
        return self.manifest.get("text", "stored") == "derived"

    @property
    def has_chat_columns(self) -> bool:
        """Whether the shards have :data:`CHAT_COLUMNS` (caches written since conversations are supported)."""
        return bool(self.manifest.get("chat_columns", False))

    @property
    def chat_docs(self) -> int:
        return int(self.manifest["totals"].get("chat_docs", 0))

    def stored_schema(self) -> pa.Schema:
        return cache_schema(self.logprob_dtype, self.derive_text, self.has_chat_columns)

    @classmethod
    def read_stored(cls, parquet: pq.ParquetFile, columns: list[str] | None, path: Location) -> pa.Table:
        """ℓ and σ as fp32; a compact cache's ``text``/``offsets`` derived (see :mod:`~.token_bytes`)."""
        stored = parquet.schema_arrow.names
        wanted = list(CACHE_SCHEMA.names) if columns is None else list(columns)
        if TEXT_BYTES_COLUMN not in stored or not set(wanted) & set(DERIVED_COLUMNS):
            return decode_logprobs(parquet.read(columns=columns))
        read = [c for c in wanted if c not in DERIVED_COLUMNS]
        read += [c for c in ("token_ids", TEXT_BYTES_COLUMN) if c not in read]
        table = decode_logprobs(parquet.read(columns=read))
        table = add_derived_columns(table, load_token_table(path.parent.parent.uri), str(path))
        return table.select(wanted)

    @classmethod
    def decode(cls, table: pa.Table) -> pa.Table:
        return decode_logprobs(table)

    @classmethod
    def write_shard(
        cls,
        root: PathLike,
        index: int,
        table: pa.Table,
        stats: dict,
        row_group_size: int | None = None,
        logprob_dtype: str = "float32",
        derive_text: bool = False,
        chat: bool = False,
    ) -> store.ShardInfo:
        """Write shard ``index`` (fp32 rows in :data:`CACHE_SCHEMA`) with ℓ and σ stored at ``logprob_dtype``;
        with ``derive_text``, without ``text`` and ``offsets`` (the cache's ``token_bytes.parquet`` must be
        written first: each row is checked to derive back exactly)."""
        schema = pa.schema([*CACHE_SCHEMA, *CHAT_FIELDS]) if chat else CACHE_SCHEMA
        table = encode_logprobs(table.select(schema.names).cast(schema), logprob_dtype)
        if derive_text:
            where = f"{store.shard_path(root, index)}"
            table = drop_derived_columns(table, load_token_table(location(root).uri), where)
        tokens = int(pc.sum(pc.list_value_length(table[cls.token_column])).as_py() or 0)
        return store.write_shard(
            root, index, table, tokens=tokens, stats=stats, row_group_size=row_group_size
        )

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def fingerprint(self) -> str:
        """Identifies this cache's content: changes whenever any shard does."""
        h = hashlib.sha256(str(self.manifest["identity"]).encode())
        for digest in self.shard_index["sha256"].to_pylist():
            h.update(digest.encode())
        return h.hexdigest()[:32]

    def boundary_token_ids(self) -> np.ndarray:
        name = store.check_relative(self.manifest["boundary_tokens"]["file"], "boundary_tokens entry")
        return read_boundary_tokens(self.root / name)

    def special_token_mask(self) -> np.ndarray:
        """Per teacher token id: is it a special token (from the manifest's tokenizer description)."""
        tok = self.manifest["tokenizer"]
        mask = np.zeros(int(tok["vocab_size"]), dtype=bool)
        mask[np.asarray(tok["special_ids"], dtype=np.int64)] = True
        return mask

    def summary(self) -> dict:
        totals = self.manifest["totals"]
        tokens = max(totals["tokens"], 1)
        predicted = max(totals["predicted_tokens"], 1)
        bits = -totals["sum_logprob"] / math.log(2)
        return {
            "path": str(self.root),
            "state": self.manifest["state"],
            "format_version": self.manifest["format_version"],
            "logprob_dtype": self.logprob_dtype,
            "text": "derived from the token ids" if self.derive_text else "stored",
            "teacher": self.manifest["teacher"]["name"],
            "teacher_path": self.manifest["teacher"]["path"],
            "engine": self.manifest["teacher"]["engine"],
            "dtype": self.manifest["teacher"]["dtype"],
            "tokenizer": {
                "kind": self.manifest["tokenizer"]["kind"],
                "vocab_size": self.manifest["tokenizer"]["vocab_size"],
                "fingerprint": self.manifest["tokenizer"]["fingerprint"],
                "prefix_ids": self.manifest["tokenizer"]["prefix_ids"],
            },
            "corpus": self.manifest["corpus"]["path"],
            "docs": totals["docs"],
            "skipped_empty_docs": self.manifest["corpus"]["stats"]["skipped_empty"],
            "skipped_duplicate_texts": self.manifest["corpus"]["stats"]["skipped_duplicate_text"],
            "truncated_docs": totals["truncated_docs"],
            "tokens": totals["tokens"],
            "shards": self.num_shards,
            "max_length": self.manifest["settings"]["max_length"],
            "bytes_on_disk": totals["bytes_on_disk"],
            "bytes_per_token": round(totals["bytes_on_disk"] / tokens, 3),
            "mean_logprob": round(totals["sum_logprob"] / predicted, 5),
            # over the tokens after each document's first (without a BOS nothing predicts the first one);
            # `evaluate --model TEACHER` scores every byte
            "bits_per_byte": round(bits / max(totals["predicted_bytes"], 1), 5),
            "boundary_tokens": self.manifest["boundary_tokens"]["count"],
        }


def open_cache(
    path: PathLike, verify: bool = True, require_complete: bool = True, checksums: bool = False
) -> TeacherCache:
    """Open a teacher cache (local path or URI), refusing (with a clear message) anything that does not check
    out; ``verify``/``checksums`` as in :meth:`ShardedDataset.open`."""
    return TeacherCache.open(path, verify=verify, require_complete=require_complete, checksums=checksums)


def write_boundary_tokens(root: PathLike, ids: np.ndarray) -> dict:
    """Write ``boundary_tokens.json`` (the ids σ sums over) into a cache folder; returns its manifest entry."""
    store.atomic_write_json(
        location(root) / BOUNDARY_FILE, {"definition": BOUNDARY_DEFINITION, "ids": np.asarray(ids).tolist()}
    )
    return {
        "definition": BOUNDARY_DEFINITION,
        "file": BOUNDARY_FILE,
        "count": int(len(ids)),
        "sha256": hashlib.sha256(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest(),
    }


def read_boundary_tokens(path: PathLike) -> np.ndarray:
    return np.asarray(store.read_json(path)["ids"], dtype=np.int32)


def shard_stats(table: pa.Table) -> dict:
    """Totals of one cache shard used by ``inspect`` (and bits per byte)."""
    tokens = pc.list_value_length(table["token_ids"]).to_numpy()
    offsets = table["offsets"].to_numpy(zero_copy_only=False)
    logprob = table["logprob"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    predicted_bytes = sum(int(o[-1] - o[0]) for o in offsets if len(o))
    return {
        "docs": table.num_rows,
        "tokens": int(tokens.sum()),
        "truncated_docs": int(pc.sum(table["truncated"]).as_py() or 0),
        "text_bytes": int(sum(len(t.encode("utf-8")) for t in table["text"].to_pylist())),
        "predicted_tokens": int(np.isfinite(logprob).sum()),
        "predicted_bytes": predicted_bytes,
        "sum_logprob": float(np.nansum(logprob.astype(np.float64))),
        "chat_docs": int(table.num_rows - table["messages"].null_count)
        if "messages" in table.column_names
        else 0,
    }


def cache_totals(shards: list[store.ShardInfo]) -> dict:
    """The manifest's ``totals``: the shards' rows, tokens and bytes, and the sums of their :func:`shard_stats`."""
    totals = {
        "docs": sum(s.rows for s in shards),
        "tokens": sum(s.tokens for s in shards),
        "bytes_on_disk": sum(s.bytes for s in shards),
    }
    for key in _TOTALS:
        totals[key] = sum(s.stats.get(key, 0) for s in shards)
    return totals
