"""The teacher cache (format version 1): one teacher's scores of one corpus, reused by every student.

A :class:`~alm_pipeline.cache.dataset.ShardedDataset` with ``boundary_tokens.json`` (the token ids whose
probability σ sums) next to ``manifest.json``. One Parquet row per document. Column names are part of the
public format: other tools may read caches.

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

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alm_pipeline.cache import store
from alm_pipeline.cache.dataset import ShardedDataset

FORMAT_VERSION = 1
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

_TOTALS = ("truncated_docs", "text_bytes", "predicted_tokens", "predicted_bytes", "sum_logprob")


@dataclass
class TeacherCache(ShardedDataset):
    kind = CACHE_KIND
    format_version = FORMAT_VERSION
    what = "teacher cache"
    short = "cache"
    rerun = "alm-pipeline teacher-cache"
    schema = CACHE_SCHEMA
    token_column = "token_ids"

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def fingerprint(self) -> str:
        """Identifies this cache's content: changes whenever any shard does."""
        h = hashlib.sha256(str(self.manifest["identity"]).encode())
        for s in self.shards:
            h.update(s.sha256.encode())
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
            "shards": len(self.manifest["shards"]),
            "max_length": self.manifest["settings"]["max_length"],
            "bytes_on_disk": totals["bytes_on_disk"],
            "bytes_per_token": round(totals["bytes_on_disk"] / tokens, 3),
            "mean_logprob": round(totals["sum_logprob"] / predicted, 5),
            # over the tokens after each document's first (without a BOS nothing predicts the first one);
            # `evaluate --model TEACHER` scores every byte
            "bits_per_byte": round(bits / max(totals["predicted_bytes"], 1), 5),
            "boundary_tokens": self.manifest["boundary_tokens"]["count"],
        }


def open_cache(path: str | Path, verify: bool = True, require_complete: bool = True) -> TeacherCache:
    """Open a teacher cache directory, refusing (with a clear message) anything that does not check out."""
    return TeacherCache.open(path, verify=verify, require_complete=require_complete)


def write_boundary_tokens(root: Path, ids: np.ndarray) -> dict:
    """Write ``boundary_tokens.json`` (the ids σ sums over) into a cache folder; returns its manifest entry."""
    store.atomic_write_json(root / BOUNDARY_FILE, {"definition": BOUNDARY_DEFINITION, "ids": ids.tolist()})
    return {
        "definition": BOUNDARY_DEFINITION,
        "file": BOUNDARY_FILE,
        "count": int(len(ids)),
        "sha256": hashlib.sha256(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest(),
    }


def read_boundary_tokens(path: Path) -> np.ndarray:
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
