"""The aligned set: one teacher cache mapped onto one student tokenizer (format version 2).

A :class:`~alm_pipeline.cache.dataset.ShardedDataset` folder (local or a URI) with ``manifest.json``, ``tokenizer/`` (the student tokenizer in Hugging Face format, so training
and inference load exactly the tokenizer the chunks were computed with) and ``shards/shard-K.parquet`` — shard
K holds the documents of cache shard K. One row per document; the trainer reads only the first six columns:

==============================  ===============  ==============================================================
column                          type             meaning
==============================  ===============  ==============================================================
doc_id                          string           the cache's document id
input_ids                       list<int32>      student token ids of the cached text (student BOS/EOS included)
chunk_start                     list<int32>      per group (merged chunk): student index of its first token
chunk_end                       list<int32>      per group: student index of its last token (inclusive)
teacher_chunk_logprob           list<float32>    per group: Σ teacher log p over its tokens, clipped at 0
teacher_chunk_boundary_logprob  list<float32>    per group: teacher σ at its last token (debiasing adds it)
text_bytes                      int32            UTF-8 bytes of the cached text
covered_bytes                   int32            bytes inside the document's groups
num_tokens                      int32            len(input_ids) (the trainer's index reads it)
num_chunks                      int32            len(chunk_start) (the trainer's index reads it)
==============================  ===============  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from alm_pipeline.cache import store
from alm_pipeline.cache.dataset import PathLike, ShardedDataset
from alm_pipeline.cache.teacher import open_cache

ALIGNED_KIND = "alm-aligned-set"
ALIGNED_FORMAT_VERSION = 2
TOKENIZER_DIR = "tokenizer"

ALIGNED_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("chunk_start", pa.list_(pa.int32()), nullable=False),
        pa.field("chunk_end", pa.list_(pa.int32()), nullable=False),
        pa.field("teacher_chunk_logprob", pa.list_(pa.float32()), nullable=False),
        pa.field("teacher_chunk_boundary_logprob", pa.list_(pa.float32()), nullable=False),
        pa.field("text_bytes", pa.int32(), nullable=False),
        pa.field("covered_bytes", pa.int32(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("num_chunks", pa.int32(), nullable=False),
    ]
)
TRAINER_COLUMNS = ALIGNED_SCHEMA.names[:6]
# per-document sizes: the trainer's index reads only these (a few bytes per document)
INDEX_COLUMNS = ["num_tokens", "num_chunks"]
# documents per Parquet row group of an aligned shard: the unit a training worker reads
ALIGNED_ROW_GROUP_ROWS = 512


@dataclass
class AlignedSet(ShardedDataset):
    kind = ALIGNED_KIND
    format_version = ALIGNED_FORMAT_VERSION
    what = "aligned set"
    short = "set"
    rerun = "alm-pipeline align"
    schema = ALIGNED_SCHEMA
    token_column = "input_ids"
    contents = (*ShardedDataset.contents, TOKENIZER_DIR)

    @property
    def tokenizer_dir(self) -> Path:
        """The student tokenizer's folder as a local path for ``from_pretrained``: the set's own folder when the
        set is local, a downloaded copy (reused while unchanged) when it is on object storage."""
        from alm_pipeline.storage import local_copy

        return local_copy(self.root / TOKENIZER_DIR)

    @property
    def gamma(self) -> float:
        return float(self.manifest["settings"]["gamma"])

    @property
    def debias(self) -> bool:
        return bool(self.manifest["settings"]["debias"])

    def check_cache(self, cache_root: PathLike | None = None) -> None:
        """Refuse the set if the teacher cache it was made from has changed (or is gone)."""
        cache_path = cache_root or self.manifest["cache"]["path"]
        cache = open_cache(cache_path, verify=False)
        if cache.fingerprint != self.manifest["cache"]["fingerprint"]:
            raise store.CacheIntegrityError(
                f"{self.root}: made from teacher cache {cache_path} with fingerprint "
                f"{self.manifest['cache']['fingerprint']}, but that cache now has fingerprint {cache.fingerprint}; "
                "re-run `alm-pipeline align`"
            )

    def summary(self) -> dict:
        cov = self.manifest["coverage"]
        return {
            "path": str(self.root),
            "state": self.manifest["state"],
            "student_tokenizer": self.manifest["student_tokenizer"]["name"],
            "student_kind": self.manifest["student_tokenizer"]["kind"],
            "student_vocab_size": self.manifest["student_tokenizer"]["vocab_size"],
            "cache": self.manifest["cache"]["path"],
            "gamma": self.gamma,
            "debias": self.debias,
            "max_student_length": self.manifest["settings"]["max_student_length"],
            "docs": cov["documents_kept"],
            "docs_dropped": cov["dropped"],
            "groups": cov["groups"],
            "student_tokens": cov["student_tokens"],
            "coverage": round(cov["coverage"], 4),
            "groups_per_doc": round(cov["groups"] / max(cov["documents_kept"], 1), 2),
            "mean_chunk_bytes": round(cov["mean_chunk_bytes"], 3),
            "mean_chunk_teacher_tokens": round(cov["mean_chunk_teacher_tokens"], 3),
            "mean_chunk_student_tokens": round(cov["mean_chunk_student_tokens"], 3),
            "mean_group_bytes": round(cov["mean_group_bytes"], 3),
            "shards": self.num_shards,
            "bytes_on_disk": int(pa.compute.sum(self.shard_index["bytes"]).as_py() or 0),
        }


def open_aligned_set(
    path: PathLike, verify: bool = True, require_complete: bool = True, checksums: bool = False
) -> AlignedSet:
    """Open an aligned set (local path or URI), refusing (with a clear message) anything that does not check
    out; ``verify``/``checksums`` as in :meth:`ShardedDataset.open`."""
    return AlignedSet.open(path, verify=verify, require_complete=require_complete, checksums=checksums)
