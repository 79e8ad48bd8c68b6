"""Reading a teacher cache: ``open_cache(path)`` validates the manifest, schema and checksums."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alm_pipeline.cache import store
from alm_pipeline.cache.schema import CACHE_KIND, CACHE_SCHEMA, FORMAT_VERSION, check_schema


@dataclass
class TeacherCache:
    root: Path
    manifest: dict

    @property
    def shards(self) -> list[store.ShardInfo]:
        return [store.ShardInfo.from_json(s) for s in self.manifest["shards"]]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def fingerprint(self) -> str:
        """Identifies this cache's content: changes whenever any shard does."""
        import hashlib

        h = hashlib.sha256(str(self.manifest["identity"]).encode())
        for s in self.shards:
            h.update(s.sha256.encode())
        return h.hexdigest()[:32]

    def boundary_token_ids(self) -> np.ndarray:
        data = store.read_json(self.root / self.manifest["boundary_tokens"]["file"])
        return np.asarray(data["ids"], dtype=np.int32)

    def shard_files(self) -> list[Path]:
        return [self.root / s.file for s in self.shards]

    def read_shard(self, index: int, columns: list[str] | None = None) -> pa.Table:
        info = self.shards[index]
        path = self.root / info.file
        table = pq.read_table(path, columns=columns)
        if columns is None:
            check_schema(table.schema, CACHE_SCHEMA, str(path))
        return table

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for k in range(len(self.shards)):
            yield self.read_shard(k, columns)

    def verify(self) -> None:
        """Check every shard's size and SHA-256 against the manifest, and its schema."""
        for info in self.shards:
            store.verify_shard_file(self.root, info)
            schema = pq.read_schema(self.root / info.file)
            check_schema(schema, CACHE_SCHEMA, str(self.root / info.file))

    def summary(self) -> dict:
        """What ``alm-pipeline inspect`` prints."""
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
            "bits_per_byte": round(bits / max(totals["predicted_bytes"], 1), 5),
            "boundary_tokens": self.manifest["boundary_tokens"]["count"],
        }


def open_cache(path: str | Path, verify: bool = True, require_complete: bool = True) -> TeacherCache:
    """Open a teacher cache directory, refusing (with a clear message) anything that does not check out."""
    root = Path(path).absolute()
    manifest = store.read_manifest(
        root, CACHE_KIND, FORMAT_VERSION, "teacher cache", "alm-pipeline teacher-cache", require_complete
    )
    cache = TeacherCache(root=root, manifest=manifest)
    if verify:
        cache.verify()
    return cache
