"""Training data of ``alm-pipeline train``: aligned rows in memory, a deterministic batch plan, micro-batches.

Three layers, each independent of Ray and of the model:

* :class:`AlignedRows` — the trainer columns of some documents of an aligned set (``TRAINER_COLUMNS`` of
  :mod:`alm_pipeline.cache.aligned`; a worker holds those of a few row groups, :mod:`.reader`) as flat numpy
  arrays with offsets (about 4 bytes per student token and 16 bytes per group), validated.
* :class:`BatchPlan` — which documents (positions in the index, :mod:`.index`) make up the global batch of
  optimizer step ``s``: epoch ``e`` is a seeded permutation of all documents (block-wise: row groups permuted,
  then documents shuffled within windows), and the global batch of step ``s`` is the ``batch_size`` documents at positions
  ``s·B … (s+1)·B − 1`` of the concatenated epochs. The data position of a run is therefore its step: resuming
  at step ``s`` continues with exactly the documents an uninterrupted run would have used, and the global batch
  does not depend on the number of workers (worker ``r`` of ``W`` takes slice ``r`` of
  ``np.array_split(batch, W)``).
* :func:`plan_micro_batches` / :func:`build_micro_batch` — a worker's documents of one step, split into
  forward passes under a padded-token budget, either **packed** (several documents per row, first-fit
  decreasing; position ids restart at 0 for every document so that the model's attention mask is
  block-diagonal and no attention crosses a document boundary) or **length-bucketed** (one document per row,
  rows of similar length together).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from alm_pipeline.cache.aligned import TRAINER_COLUMNS
from alm_pipeline.cache.arrow import list_parts
from alm_pipeline.trainer.loss import ALMGroups, tensors_to

__all__ = [
    "AlignedRows",
    "BatchPlan",
    "MicroBatch",
    "build_micro_batch",
    "dummy_micro_batch",
    "plan_micro_batches",
]

# teacher values a hair above 0 are rounding; larger ones are a corrupt set
_POSITIVE_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------------------------------------
# Aligned rows


@dataclass
class AlignedRows:
    """The documents of an aligned set, flat. Document ``i`` has student tokens
    ``ids[ids_offsets[i]:ids_offsets[i+1]]`` and groups ``grp_*[grp_offsets[i]:grp_offsets[i+1]]`` with inclusive
    student indices ``grp_start``/``grp_end`` and the teacher's group log-likelihood / boundary log-prob."""

    doc_ids: np.ndarray  # object (str), [N]
    ids: np.ndarray  # int32
    ids_offsets: np.ndarray  # int64, [N+1]
    grp_start: np.ndarray  # int32
    grp_end: np.ndarray  # int32
    grp_logprob: np.ndarray  # float32
    grp_boundary: np.ndarray  # float32
    grp_offsets: np.ndarray  # int64, [N+1]

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls) -> AlignedRows:
        z64 = np.zeros(1, dtype=np.int64)
        i32, f32 = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
        return cls(np.zeros(0, dtype=object), i32, z64, i32, i32, f32, f32, z64.copy())

    @classmethod
    def from_table(cls, table: pa.Table) -> AlignedRows:
        """From a table with (at least) the trainer columns; validates every document (vectorised)."""
        missing = [c for c in TRAINER_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"aligned rows lack column(s) {', '.join(missing)}")
        doc_ids = np.asarray(table.column("doc_id").to_pylist(), dtype=object)
        ids, ids_off = list_parts(table.column("input_ids"), np.int32)
        start, g_off = list_parts(table.column("chunk_start"), np.int32)
        end, g_off2 = list_parts(table.column("chunk_end"), np.int32)
        lp, g_off3 = list_parts(table.column("teacher_chunk_logprob"), np.float32)
        bl, g_off4 = list_parts(table.column("teacher_chunk_boundary_logprob"), np.float32)
        if not (
            np.array_equal(g_off, g_off2) and np.array_equal(g_off, g_off3) and np.array_equal(g_off, g_off4)
        ):
            bad = np.flatnonzero(
                (np.diff(g_off) != np.diff(g_off2))
                | (np.diff(g_off) != np.diff(g_off3))
                | (np.diff(g_off) != np.diff(g_off4))
            )
            raise ValueError(
                f"document {doc_ids[bad[0]]!r}: chunk_start, chunk_end, teacher_chunk_logprob and "
                "teacher_chunk_boundary_logprob have different lengths"
            )
        rows = cls(doc_ids, ids, ids_off, start, end, lp.copy(), bl.copy(), g_off)
        rows.validate()
        return rows

    @classmethod
    def concat(cls, parts: Iterable[AlignedRows]) -> AlignedRows:
        parts = [p for p in parts if p.num_docs]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]

        def offsets(name: str) -> np.ndarray:
            out = [np.zeros(1, dtype=np.int64)]
            base = 0
            for p in parts:
                off = getattr(p, name)
                out.append(off[1:] + base)
                base += int(off[-1])
            return np.concatenate(out)

        return cls(
            doc_ids=np.concatenate([p.doc_ids for p in parts]),
            ids=np.concatenate([p.ids for p in parts]),
            ids_offsets=offsets("ids_offsets"),
            grp_start=np.concatenate([p.grp_start for p in parts]),
            grp_end=np.concatenate([p.grp_end for p in parts]),
            grp_logprob=np.concatenate([p.grp_logprob for p in parts]),
            grp_boundary=np.concatenate([p.grp_boundary for p in parts]),
            grp_offsets=offsets("grp_offsets"),
        )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad document: group indices outside the document, a group that
        ends before it starts, or teacher values that are NaN / infinite / positive."""
        n_groups = self.num_groups
        doc_of_group = np.repeat(np.arange(self.num_docs), n_groups)
        lengths = self.lengths[doc_of_group]
        checks = [
            (self.grp_start < 0, "a group starts before the document"),
            (self.grp_end < self.grp_start, "a group ends before it starts"),
            (self.grp_end >= lengths, "a group ends after the document's last student token"),
            (~np.isfinite(self.grp_logprob), "teacher_chunk_logprob is not finite"),
            (~np.isfinite(self.grp_boundary), "teacher_chunk_boundary_logprob is not finite"),
            (self.grp_logprob > _POSITIVE_TOLERANCE, "teacher_chunk_logprob is positive"),
            (self.grp_boundary > _POSITIVE_TOLERANCE, "teacher_chunk_boundary_logprob is positive"),
        ]
        for bad, what in checks:
            if bad.any():
                g = int(np.flatnonzero(bad)[0])
                d = int(doc_of_group[g])
                raise ValueError(
                    f"aligned set document {self.doc_ids[d]!r}: {what} (group {g - int(self.grp_offsets[d])}: "
                    f"student tokens [{int(self.grp_start[g])}, {int(self.grp_end[g])}] of {int(self.lengths[d])}, "
                    f"teacher log-prob {float(self.grp_logprob[g])}, boundary {float(self.grp_boundary[g])})"
                )
        np.minimum(self.grp_logprob, 0.0, out=self.grp_logprob)
        np.minimum(self.grp_boundary, 0.0, out=self.grp_boundary)

    # ------------------------------------------------------------------ views
    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.ids_offsets)

    @property
    def num_groups(self) -> np.ndarray:
        return np.diff(self.grp_offsets)

    @property
    def nbytes(self) -> int:
        return sum(
            a.nbytes
            for a in (
                self.ids,
                self.ids_offsets,
                self.grp_start,
                self.grp_end,
                self.grp_logprob,
                self.grp_boundary,
                self.grp_offsets,
            )
        )

    def input_ids(self, i: int) -> np.ndarray:
        return self.ids[self.ids_offsets[i] : self.ids_offsets[i + 1]]

    def groups(self, i: int) -> slice:
        return slice(int(self.grp_offsets[i]), int(self.grp_offsets[i + 1]))

    def take(self, index: np.ndarray) -> AlignedRows:
        """The documents ``index`` (in that order)."""
        index = np.asarray(index, dtype=np.int64)
        lengths, n_groups = self.lengths[index], self.num_groups[index]

        def gather(values: np.ndarray, offsets: np.ndarray, counts: np.ndarray) -> np.ndarray:
            if not len(index):
                return values[:0]
            starts = np.repeat(offsets[index], counts)
            within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            return values[starts + within]

        return AlignedRows(
            doc_ids=self.doc_ids[index],
            ids=gather(self.ids, self.ids_offsets, lengths),
            ids_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            grp_start=gather(self.grp_start, self.grp_offsets, n_groups),
            grp_end=gather(self.grp_end, self.grp_offsets, n_groups),
            grp_logprob=gather(self.grp_logprob, self.grp_offsets, n_groups),
            grp_boundary=gather(self.grp_boundary, self.grp_offsets, n_groups),
            grp_offsets=np.concatenate([[0], np.cumsum(n_groups)]).astype(np.int64),
        )

    def select_trainable(self, need_groups: bool) -> tuple[AlignedRows, dict]:
        """Drop documents that cannot contribute: fewer than 2 student tokens, and (when ``need_groups``, i.e.
        the ALM loss alone) documents without any group. Returns the kept rows and counts of what was dropped."""
        keep = self.lengths >= 2
        short = int((~keep).sum())
        no_groups = 0
        if need_groups:
            has = self.num_groups > 0
            no_groups = int((keep & ~has).sum())
            keep &= has
        kept = self if keep.all() else self.take(np.flatnonzero(keep))
        return kept, {"too_short": short, "no_groups": no_groups}


# ----------------------------------------------------------------------------------------------------------
# Batch plan


class BatchPlan:
    """Deterministic global batches: step ``s`` → document indices (see the module docstring).

    ``blocks`` (one block id per document, documents grouped by block, e.g. the Parquet row group holding
    them) makes the shuffle block-wise: epoch ``e`` permutes the blocks, then shuffles the documents within
    consecutive windows of ``window`` documents, so that a step's documents come from few blocks. Without
    ``blocks`` an epoch is a plain seeded permutation of all documents."""

    def __init__(
        self,
        num_docs: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        blocks: np.ndarray | None = None,
        window: int | None = None,
    ):
        if num_docs < 1:
            raise ValueError("the training set has no usable document")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if blocks is not None and len(blocks) != num_docs:
            raise ValueError(f"blocks has {len(blocks)} entries for {num_docs} documents")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.num_docs, self.batch_size, self.seed, self.shuffle = num_docs, batch_size, seed, shuffle
        self.window = window
        self._block_starts: np.ndarray | None = None
        self._blocks = None if blocks is None else np.asarray(blocks)
        if blocks is not None:
            blocks = np.asarray(blocks)
            if len(blocks) > 1 and (np.diff(blocks) < 0).any():
                raise ValueError("documents must be grouped by block (block ids non-decreasing)")
            self._block_starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]]).astype(np.int64)
        self._epochs: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def permutation(self, epoch: int) -> np.ndarray:
        """The documents of epoch ``epoch`` in their order (a permutation of ``range(num_docs)``)."""
        if epoch in self._epochs:
            self._epochs.move_to_end(epoch)
            return self._epochs[epoch]
        n = self.num_docs
        if not self.shuffle:
            perm = np.arange(n, dtype=np.int64)
        elif self._block_starts is None:
            perm = np.random.default_rng([int(self.seed), int(epoch)]).permutation(n).astype(np.int64)
        else:
            rng = np.random.default_rng([int(self.seed), int(epoch)])
            starts = self._block_starts
            sizes = np.diff(np.r_[starts, n])
            order = rng.permutation(len(starts))
            starts, sizes = starts[order], sizes[order]
            perm = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(n, dtype=np.int64)
            if self.window is not None and self.window > 1:
                keys = rng.random(n)
                perm = perm[np.lexsort((keys, np.arange(n, dtype=np.int64) // self.window))]
        self._epochs[epoch] = perm
        while len(self._epochs) > 2:  # a step spans at most two epochs
            self._epochs.popitem(last=False)
        return perm

    def global_batch(self, step: int) -> np.ndarray:
        """Document indices of optimizer step ``step`` (0-based), ``batch_size`` of them."""
        first = step * self.batch_size
        positions = np.arange(first, first + self.batch_size, dtype=np.int64)
        epochs = positions // self.num_docs
        out = np.empty(self.batch_size, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[positions[sel] - e * self.num_docs]
        return out

    def position(self, step: int) -> dict:
        """Where step ``step`` starts in the data stream (for checkpoints and logs)."""
        first = step * self.batch_size
        return {"epoch": first // self.num_docs, "index_in_epoch": first % self.num_docs, "seed": self.seed}

    def epoch(self, step: int) -> float:
        return step * self.batch_size / self.num_docs

    def worker_slices(self, batch: np.ndarray, world_size: int) -> list[np.ndarray]:
        """The parts of a global batch the workers take (slice ``r`` for rank ``r``). With blocks, the batch is
        ordered by block first: a worker gets the documents of a few blocks, and the same blocks step after step
        within a shuffle window, so it reads about ``1/world_size`` of them (the global batch, and so the
        gradient, does not depend on how it is split)."""
        if self._blocks is not None:
            batch = batch[np.argsort(self._blocks[batch], kind="stable")]
        return np.array_split(batch, world_size)


# ----------------------------------------------------------------------------------------------------------
# Micro-batches


def plan_micro_batches(
    lengths: Sequence[int] | np.ndarray,
    *,
    max_tokens: int,
    packing: bool,
    pack_length: int | None = None,
) -> list[list[list[int]]]:
    """Split documents (given by their lengths) into micro-batches of rows of documents.

    Returns ``micro_batches[k][row] = [document positions]`` (positions into ``lengths``). Each micro-batch
    holds at most ``max_tokens`` padded tokens (rows × longest row), except that a document longer than the
    budget gets a micro-batch of its own. With ``packing``, documents are packed into rows of at most
    ``pack_length`` tokens (default: the longest document) by first-fit decreasing; without it every row holds
    one document and rows are sorted by length (length bucketing). Deterministic in ``lengths``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not len(lengths):
        return []
    order = np.argsort(-lengths, kind="stable")
    if packing:
        cap = int(max(pack_length or 0, lengths.max()))
        rows: list[list[int]] = []
        room: list[int] = []
        for i in order.tolist():
            n = int(lengths[i])
            for r, free in enumerate(room):
                if free >= n:
                    rows[r].append(i)
                    room[r] -= n
                    break
            else:
                rows.append([i])
                room.append(cap - n)
        row_len = [cap - free for free in room]
        # rows longest first, so that a micro-batch's padding (to its longest row) stays small
        row_order = sorted(range(len(rows)), key=lambda r: (-row_len[r], r))
        rows = [rows[r] for r in row_order]
        row_len = [row_len[r] for r in row_order]
    else:
        rows = [[i] for i in order.tolist()]
        row_len = [int(lengths[i]) for i in order.tolist()]

    micro: list[list[list[int]]] = []
    current: list[list[int]] = []
    width = 0
    for row, n in zip(rows, row_len, strict=True):
        w = max(width, n)
        if current and (len(current) + 1) * w > max_tokens:
            micro.append(current)
            current, w = [], n
        current.append(row)
        width = w
    if current:
        micro.append(current)
    return micro


@dataclass
class MicroBatch:
    """One forward pass: right-padded rows, each holding one or more documents.

    ``doc_start`` marks the first token of every document (its log-prob is undefined: the model saw no
    context of that document) and ``position_ids`` restart at 0 there; ``groups`` index the padded rows.
    """

    input_ids: torch.Tensor  # [R, L] int64
    attention_mask: torch.Tensor  # [R, L] bool, real tokens
    position_ids: torch.Tensor  # [R, L] int64, 0 at every document start (and on padding)
    doc_start: torch.Tensor  # [R, L] bool
    groups: ALMGroups
    num_docs: int
    num_tokens: int  # real tokens
    num_predicted: int  # tokens with a log-prob: Σ (length − 1)
    packed: bool

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_groups(self) -> int:
        return self.groups.num_groups

    def to(self, device: torch.device | str) -> MicroBatch:
        return tensors_to(self, device)


def build_micro_batch(
    rows: AlignedRows, docs: Sequence[int], layout: list[list[int]], pad_id: int = 0
) -> MicroBatch:
    """Tensors for one micro-batch: ``layout[row]`` lists positions into ``docs`` (document indices into
    ``rows``) placed one after the other in that row."""
    docs = np.asarray(docs, dtype=np.int64)
    lengths = rows.lengths
    row_lens = [int(sum(int(lengths[docs[p]]) for p in row)) for row in layout]
    width = max(row_lens) if row_lens else 1
    n_rows = max(len(layout), 1)
    ids = np.full((n_rows, width), pad_id, dtype=np.int64)
    mask = np.zeros((n_rows, width), dtype=bool)
    pos = np.zeros((n_rows, width), dtype=np.int64)
    start = np.zeros((n_rows, width), dtype=bool)
    g_batch, g_start, g_end, g_lp, g_bl = [], [], [], [], []
    n_docs = n_tok = n_pred = 0
    for r, row in enumerate(layout):
        col = 0
        for p in row:
            d = int(docs[p])
            tok = rows.input_ids(d)
            n = len(tok)
            ids[r, col : col + n] = tok
            mask[r, col : col + n] = True
            pos[r, col : col + n] = np.arange(n)
            start[r, col] = True
            gs = rows.groups(d)
            k = gs.stop - gs.start
            g_batch.append(np.full(k, r, dtype=np.int64))
            g_start.append(rows.grp_start[gs].astype(np.int64) + col)
            g_end.append(rows.grp_end[gs].astype(np.int64) + col)
            g_lp.append(rows.grp_logprob[gs])
            g_bl.append(rows.grp_boundary[gs])
            col += n
            n_docs += 1
            n_tok += n
            n_pred += n - 1

    def cat(parts: list[np.ndarray], dtype) -> torch.Tensor:
        return torch.from_numpy(
            np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
        )

    groups = ALMGroups(
        batch_index=cat(g_batch, np.int64),
        start=cat(g_start, np.int64),
        end=cat(g_end, np.int64),
        teacher_logprob=cat(g_lp, np.float32),
        teacher_boundary_logprob=cat(g_bl, np.float32),
    )
    return MicroBatch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        position_ids=torch.from_numpy(pos),
        doc_start=torch.from_numpy(start),
        groups=groups,
        num_docs=n_docs,
        num_tokens=n_tok,
        num_predicted=n_pred,
        packed=any(len(row) > 1 for row in layout),
    )


def dummy_micro_batch(pad_id: int = 0) -> MicroBatch:
    """A micro-batch with one padding token, no prediction and no group: it adds exactly zero to every loss and
    gradient. Workers with fewer micro-batches in a step run these so that every worker makes the same number
    of forward/backward passes (DDP's gradient sync and FSDP's collectives need that)."""
    mb = build_micro_batch(AlignedRows.empty(), [], [], pad_id=pad_id)
    return mb
