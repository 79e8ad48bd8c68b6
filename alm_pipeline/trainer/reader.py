"""A worker's training documents: read block by block from storage, never the whole set.

* :class:`BlockReader` — the documents of an aligned set by index position: it reads only the Parquet row
  groups (blocks) that hold them, with pyarrow from any filesystem, validates each as
  :meth:`~alm_pipeline.trainer.data.AlignedRows.from_table` does, and keeps recently used blocks in an LRU
  bounded in bytes (a block in use is always kept).
* :class:`CacheBlockReader` — the same over a teacher cache aligned on the fly: a block is one cache shard,
  aligned to the student tokenizer when first needed; documents that turn out untrainable (dropped by the
  alignment, too short, no chunk) are skipped and counted.
* :class:`Prefetcher` — a thread that fetches the worker's documents of the next steps ahead of the training
  loop (a bounded queue: at most ``ahead`` steps wait in memory).
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from alm_pipeline.cache.aligned import TRAINER_COLUMNS
from alm_pipeline.trainer.data import AlignedRows
from alm_pipeline.trainer.errors import TrainingError
from alm_pipeline.trainer.index import TrainIndex

__all__ = ["BlockReader", "CacheBlockReader", "Prefetcher"]


class BlockReader:
    """Documents of an aligned set by index position (see the module docstring). ``reads`` lists the
    ``(file, row group)`` of every block read from storage, in order."""

    def __init__(self, index: TrainIndex, cache_bytes: int = 512 * 2**20, open_files: int = 8):
        self.index = index
        self.cache_bytes = int(cache_bytes)
        self.reads: list[tuple[int, int]] = []
        self.skipped = 0  # documents of the plan that turned out untrainable (stream mode)
        # block → (rows, position of each of the block's rows in ``rows`` or -1)
        self._blocks: collections.OrderedDict[int, tuple[AlignedRows, np.ndarray]] = collections.OrderedDict()
        self._files: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._open_files = open_files

    # ------------------------------------------------------------------ storage
    def _parquet(self, f: int):
        import pyarrow.parquet as pq

        from alm_pipeline.storage import location

        if f in self._files:
            self._files.move_to_end(f)
            return self._files[f]
        pf = pq.ParquetFile(location(self.index.files[f]).open_input_file())
        self._files[f] = pf
        while len(self._files) > self._open_files:
            _, old = self._files.popitem(last=False)
            old.close()
        return pf

    def _read_block(self, b: int) -> tuple[AlignedRows, np.ndarray]:
        f, g = int(self.index.block_file[b]), int(self.index.block_rg[b])
        uri = self.index.files[f]
        try:
            table = self._parquet(f).read_row_group(g, columns=TRAINER_COLUMNS)
        except (OSError, ValueError) as err:
            raise TrainingError(f"{uri}: cannot read row group {g} ({err})") from None
        try:
            rows = AlignedRows.from_table(table)
        except ValueError as err:
            raise TrainingError(f"{uri}: {err}") from None
        return rows, np.arange(rows.num_docs, dtype=np.int64)

    def close(self) -> None:
        for pf in self._files.values():
            pf.close()
        self._files.clear()
        self._blocks.clear()

    # ------------------------------------------------------------------ blocks
    def block(self, b: int, pinned: set[int] = frozenset()) -> tuple[AlignedRows, np.ndarray]:
        if b in self._blocks:
            self._blocks.move_to_end(b)
            return self._blocks[b]
        data = self._read_block(b)
        self.reads.append((int(self.index.block_file[b]), int(self.index.block_rg[b])))
        self._blocks[b] = data
        used = sum(r.nbytes for r, _ in self._blocks.values())
        for old in list(self._blocks):
            if used <= self.cache_bytes:
                break
            if old in pinned or old == b:
                continue
            used -= self._blocks.pop(old)[0].nbytes
        return data

    @property
    def cached_bytes(self) -> int:
        return sum(r.nbytes for r, _ in self._blocks.values())

    def rows(self, docs: np.ndarray) -> AlignedRows:
        """The documents ``docs`` (index positions) in that order; in stream mode without those that turned out
        untrainable (counted in ``skipped``)."""
        docs = np.asarray(docs, dtype=np.int64)
        if not len(docs):
            return AlignedRows.empty()
        blocks, within = self.index.where(docs)
        needed = set(np.unique(blocks).tolist())
        parts, order = [], []
        for b in sorted(needed):
            rows, pos = self.block(b, pinned=needed)
            sel = np.flatnonzero(blocks == b)
            at = pos[within[sel]]
            keep = at >= 0
            self.skipped += int((~keep).sum())
            parts.append(rows.take(at[keep]))
            order.append(sel[keep])
        out = AlignedRows.concat(parts)
        where = np.concatenate(order)
        out = out.take(np.argsort(where, kind="stable"))
        self._check(docs, where, out)
        return out

    def _check(self, docs: np.ndarray, where: np.ndarray, rows: AlignedRows) -> None:
        index = self.index
        if index.length is None:
            return
        expected = index.length[docs[np.sort(where)]]
        if not np.array_equal(rows.lengths, expected):
            raise TrainingError(
                "the aligned set's shards changed while training (a row group's documents no longer match the "
                f"index built at the start, files {sorted({index.files[int(f)] for f in index.block_file[index.block[docs]]})})"
            )

    def sample(self, n: int = 2) -> AlignedRows:
        """The first ``n`` trainable documents (for the worker's self-checks); fewer if the set has fewer."""
        parts, have = [], 0
        for b in range(self.index.num_blocks):
            rows, pos = self.block(b)
            docs = np.flatnonzero(self.index.block == b)
            if not len(docs):
                continue
            at = pos[self.index.where(docs)[1]]
            at = at[at >= 0][: n - have]
            parts.append(rows.take(at))
            have += len(at)
            if have >= n:
                break
        return AlignedRows.concat(parts)


class CacheBlockReader(BlockReader):
    """Documents of a teacher cache aligned on the fly (blocks = cache shards; see the module docstring)."""

    def __init__(self, index: TrainIndex, align: Callable[[pa.Table], pa.Table], need_groups: bool, **kw):
        super().__init__(index, **kw)
        self.align = align
        self.need_groups = need_groups

    def _read_block(self, b: int) -> tuple[AlignedRows, np.ndarray]:
        from alm_pipeline.cache.teacher import CHAT_COLUMNS, TeacherCache
        from alm_pipeline.pipeline.align_stage import CACHE_COLUMNS
        from alm_pipeline.storage import location

        f = int(self.index.block_file[b])
        uri = self.index.files[f]
        try:  # as every cache reader gets them: ℓ and σ as fp32, text/offsets of a compact cache derived
            parquet = self._parquet(f)
            stored = parquet.schema_arrow.names
            columns = CACHE_COLUMNS + [c for c in CHAT_COLUMNS if c in stored]
            table = TeacherCache.read_stored(parquet, columns, location(uri))
        except (OSError, ValueError) as err:
            raise TrainingError(f"{uri}: cannot read the cache shard ({err})") from None
        try:
            aligned = self.align(table)
            rows = AlignedRows.from_table(aligned.select(TRAINER_COLUMNS))
        except ValueError as err:
            raise TrainingError(f"{uri}: {err}") from None
        # the aligned rows are the cache rows the alignment kept, in order: match them by document id
        ids_in = table["doc_id"].to_pylist()
        pos = np.full(len(ids_in), -1, dtype=np.int64)
        j = 0
        for i, doc in enumerate(ids_in):
            if j < rows.num_docs and rows.doc_ids[j] == doc:
                pos[i] = j
                j += 1
        trainable = rows.lengths >= 2
        if self.need_groups:
            trainable &= rows.num_groups > 0
        pos[pos >= 0] = np.where(trainable[pos[pos >= 0]], pos[pos >= 0], -1)
        return rows, pos


class Prefetcher:
    """Runs ``fetch(step)`` for ``steps`` in a thread, at most ``ahead`` results waiting; :meth:`get` returns
    them in order (re-raising the thread's error)."""

    def __init__(self, fetch: Callable[[int], Any], steps: range, ahead: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._steps = steps
        self._thread = threading.Thread(
            target=self._run, args=(fetch,), name="alm-train-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, fetch: Callable[[int], Any]) -> None:
        for step in self._steps:
            if self._stop.is_set():
                return
            try:
                item: Any = fetch(step)
                ok = True
            except BaseException as err:  # noqa: BLE001 - handed to the training loop
                item, ok = err, False
            while not self._stop.is_set():
                try:
                    self._queue.put((step, ok, item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not ok:
                return

    def get(self, step: int) -> Any:
        got, ok, item = self._queue.get()
        if not ok:
            raise item
        if got != step:
            raise RuntimeError(f"prefetcher out of order: wanted step {step}, got {got}")
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
