"""The training set's index: where every trainable document is, and its size (16 bytes per document).

The driver builds it once per run from small per-document columns, never from the documents themselves:

* an **aligned set** (:func:`index_aligned_set`): each shard's Parquet footer (its row groups) and its int32
  ``num_tokens`` / ``num_chunks`` columns, read with pyarrow from any filesystem (local, ``s3://``, ``gs://``),
  shards in parallel threads. A *block* is one row group: the unit a worker reads.
* a **teacher cache** aligned on the fly (:func:`index_cache`): only the manifest's per-shard row counts; a
  block is one cache shard (a worker aligns whole shards), and sizes are unknown until a worker aligns it.

Documents that cannot train (fewer than 2 student tokens; no chunk when the ALM loss is alone) are filtered on
the index, so every document of the plan is trainable (stream mode filters after aligning, per worker).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from alm_pipeline.cache.aligned import INDEX_COLUMNS
from alm_pipeline.trainer.errors import TrainingError

__all__ = ["TrainIndex", "index_aligned_set", "index_cache"]

_THREADS = 16


@dataclass
class TrainIndex:
    """Document ``i`` is row ``row[i]`` of block ``block[i]`` (a row group of an aligned shard, or a whole
    cache shard); documents are ordered by (shard, row). Block ``b`` is row group ``block_rg[b]`` of file
    ``files[block_file[b]]``, starting at row ``block_first_row[b]`` of that file."""

    kind: str  # "aligned" | "cache"
    files: list[str]  # shard URIs
    block_file: np.ndarray  # int32 [B]
    block_rg: np.ndarray  # int32 [B]
    block_first_row: np.ndarray  # int64 [B]
    block: np.ndarray  # int32 [N]
    row: np.ndarray  # int32 [N], row within its file
    length: np.ndarray | None  # int32 [N] student tokens (None: unknown until aligned)
    chunks: np.ndarray | None  # int32 [N] groups
    documents_read: int = 0
    dropped: dict = field(default_factory=dict)
    digest: str = ""

    @property
    def num_docs(self) -> int:
        return len(self.block)

    @property
    def num_blocks(self) -> int:
        return len(self.block_file)

    @property
    def nbytes(self) -> int:
        arrays = [self.block, self.row, self.length, self.chunks]
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def sizes_known(self) -> bool:
        return self.length is not None

    def where(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(block, row within the block) of documents ``docs``."""
        docs = np.asarray(docs, dtype=np.int64)
        blocks = self.block[docs]
        return blocks, self.row[docs].astype(np.int64) - self.block_first_row[blocks]


def _digest(files_identity: list[str], *arrays: np.ndarray | None) -> str:
    h = hashlib.sha256()
    h.update("\x00".join(files_identity).encode())
    for a in arrays:
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def _read_shard_sizes(uri: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One aligned shard: (row-group row counts, num_tokens, num_chunks) from its footer and two small columns
    (sets written before those columns existed: the list lengths of input_ids / chunk_start)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from alm_pipeline.storage import location

    loc = location(uri)
    try:
        with loc.open_input_file() as f:
            pf = pq.ParquetFile(f)
            rg_rows = np.array(
                [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)], dtype=np.int64
            )
            names = set(pf.schema_arrow.names)
            if set(INDEX_COLUMNS) <= names:
                table = pf.read(columns=INDEX_COLUMNS)
                tokens = table["num_tokens"].to_numpy().astype(np.int32)
                chunks = table["num_chunks"].to_numpy().astype(np.int32)
            else:
                table = pf.read(columns=["input_ids", "chunk_start"])
                tokens = pc.list_value_length(table["input_ids"]).to_numpy().astype(np.int32)
                chunks = pc.list_value_length(table["chunk_start"]).to_numpy().astype(np.int32)
    except (OSError, ValueError) as err:
        raise TrainingError(f"{loc.uri}: cannot read the aligned shard ({err})") from None
    if int(rg_rows.sum()) != len(tokens):
        raise TrainingError(
            f"{loc.uri}: row groups hold {int(rg_rows.sum())} rows but the file {len(tokens)}"
        )
    return rg_rows, tokens, chunks


def _blocks(rg_rows_per_file: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Blocks from the row-group sizes of each file, and the block of every row (in file order)."""
    block_file = np.concatenate(
        [np.full(len(r), f, dtype=np.int32) for f, r in enumerate(rg_rows_per_file)]
        or [np.zeros(0, np.int32)]
    )
    block_rg = np.concatenate(
        [np.arange(len(r), dtype=np.int32) for r in rg_rows_per_file] or [np.zeros(0, np.int32)]
    )
    first = np.concatenate(
        [np.concatenate([[0], np.cumsum(r)[:-1]]).astype(np.int64) for r in rg_rows_per_file if len(r)]
        or [np.zeros(0, np.int64)]
    )
    sizes = np.concatenate([r for r in rg_rows_per_file if len(r)] or [np.zeros(0, np.int64)])
    block_of_row = np.repeat(np.arange(len(block_file), dtype=np.int32), sizes)
    return block_file, block_rg, first, block_of_row


def _trainable(length: np.ndarray, chunks: np.ndarray, need_groups: bool) -> tuple[np.ndarray, dict]:
    keep = length >= 2
    dropped = {"too_short": int((~keep).sum()), "no_groups": 0}
    if need_groups:
        has = chunks > 0
        dropped["no_groups"] = int((keep & ~has).sum())
        keep &= has
    return keep, dropped


def index_aligned_set(
    files: list[str], need_groups: bool, checksums: list[str] | None = None, threads: int = _THREADS
) -> TrainIndex:
    """The index of an aligned set's shard files (URIs), keeping trainable documents only. ``checksums``
    (the manifest's sha256 per shard) make the digest name the content cheaply."""
    if not files:
        raise TrainingError("the aligned set has no shard")
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        parts = list(pool.map(_read_shard_sizes, files))
    block_file, block_rg, first, block_of_row = _blocks([p[0] for p in parts])
    rows = np.concatenate([np.arange(len(p[1]), dtype=np.int32) for p in parts])
    length = np.concatenate([p[1] for p in parts])
    chunks = np.concatenate([p[2] for p in parts])
    keep, dropped = _trainable(length, chunks, need_groups)
    index = TrainIndex(
        kind="aligned",
        files=list(files),
        block_file=block_file,
        block_rg=block_rg,
        block_first_row=first,
        block=block_of_row[keep],
        row=rows[keep],
        length=length[keep],
        chunks=chunks[keep],
        documents_read=len(length),
        dropped=dropped,
    )
    ident = [os.path.basename(f) for f in files] + list(checksums or [])
    index.digest = _digest(ident, index.block, index.row, index.length, index.chunks)
    return index


def index_cache(files: list[str], rows: list[int], checksums: list[str] | None = None) -> TrainIndex:
    """The index of a teacher cache aligned on the fly: every document of every shard (``rows`` per shard, from
    the manifest); one block per shard. Sizes are unknown: workers filter after aligning."""
    per_file = [np.array([n], dtype=np.int64) if n else np.zeros(0, np.int64) for n in rows]
    block_file, block_rg, first, block_of_row = _blocks(per_file)
    row = np.concatenate([np.arange(n, dtype=np.int32) for n in rows] or [np.zeros(0, np.int32)])
    index = TrainIndex(
        kind="cache",
        files=list(files),
        block_file=block_file,
        block_rg=block_rg,
        block_first_row=first,
        block=block_of_row,
        row=row,
        length=None,
        chunks=None,
        documents_read=int(sum(rows)),
    )
    ident = [os.path.basename(f) for f in files] + list(checksums or [])
    index.digest = _digest(ident, index.block, index.row)
    return index
