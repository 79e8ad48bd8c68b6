"""The align stage's part for conversations: both sides in content coordinates, and which chunks the loss sees.

A cache row holding a conversation (``messages`` not null; see :mod:`alm_pipeline.pipeline.chat`) stores the
teacher's rendering as ``text``, each message's content span in it and, per token, the message it belongs to.
:func:`encode_rows` puts every row of a table - conversations and plain texts alike - into the form the batched
aligner takes: per document the teacher's and the student's token ids, byte end offsets and special flags. For a
conversation the student renders the same messages with its own template, and both sides' offsets are moved
to content coordinates: template tokens cover no content bytes and are flagged special, so that the aligner
pairs a run of them with the other side's run at the same content position (the same point between two
messages) and drops a run the other side has no counterpart for. The bytes a conversation is measured by (its
coverage denominator) are its content bytes within the teacher's kept text.

``--loss-on assistant`` (the default for conversations) keeps in the loss the chunks inside assistant messages and
the template run that ends an assistant turn (the teacher's end-of-turn tokens), and nothing of system, user
or tool turns; ``all`` keeps every chunk. Plain-text rows are never restricted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from alm_pipeline.cache.arrow import list_parts
from alm_pipeline.pipeline.byteview import ByteView, TokenizerMismatchError
from alm_pipeline.pipeline.chat import (
    ChatError,
    ChatTemplate,
    content_offsets,
    encode_chat,
    messages_from_json,
)

LOSS_ON = ("auto", "all", "assistant")


@dataclass
class ChatStats:
    """What happened to the conversations of an aligned set (the coverage report's ``chat`` entry)."""

    conversations: int = 0
    content_bytes: int = 0  # within the teacher's kept text
    loss_bytes: int = (
        0  # of those, the bytes whose chunks may count (assistant messages under --loss-on assistant)
    )
    teacher_template_runs: int = 0  # runs of template tokens (one per point between messages, per side)
    student_template_runs: int = 0
    paired_template_runs: int = 0  # runs with a counterpart on the other side: special chunks
    covered_bytes: int = 0  # content bytes inside chunks that count

    def add(self, other: ChatStats | dict) -> None:
        values = other if isinstance(other, dict) else asdict(other)
        for name, value in values.items():
            setattr(self, name, getattr(self, name) + int(value))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class EncodedRows:
    """Every row of a table ready for ``align_batch``: flat per-token arrays with row pointers per side, the
    student failures (row → message), per row the bytes it is measured by and (conversations under ``assistant``)
    the content ranges whose chunks count."""

    t_off: np.ndarray
    t_special: np.ndarray
    s_ids: np.ndarray
    s_off: np.ndarray
    s_rows: np.ndarray
    s_special: np.ndarray
    failed: dict[int, str]
    text_bytes: np.ndarray
    loss_ranges: dict[int, np.ndarray] = field(default_factory=dict)  # row → (k, 2) content ranges that count


def is_conversation(table: pa.Table) -> np.ndarray:
    """Per row: does it hold a conversation (a cache written before conversations were supported: none)."""
    if "messages" not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    return ~np.asarray(table["messages"].is_null().to_numpy(zero_copy_only=False), dtype=bool)


def encode_rows(
    table: pa.Table,
    chat_rows: np.ndarray,
    t_ids: np.ndarray,
    t_off: np.ndarray,
    t_rows: np.ndarray,
    teacher_is_special: np.ndarray,
    student: ByteView,
    template: ChatTemplate | None,
    max_student_length: int | None,
    loss_on: str,
    stats: ChatStats,
) -> EncodedRows:
    """See the module docstring. Plain rows are encoded in one batch (:meth:`ByteView.encode_batch`)."""
    texts = table["text"].to_pylist()
    doc_ids = table["doc_id"].to_pylist()
    pieces: dict = {}  # the student's tokens of template texts seen in this table
    n = len(texts)
    spans_flat, spans_rows = _lists(table["content_spans"])
    owner_flat, owner_rows = _lists(table["token_message"])
    messages = table["messages"].to_pylist()

    t_off_parts = [t_off[t_rows[d] : t_rows[d + 1]] for d in range(n)]
    t_special_parts = [teacher_is_special[t_ids[t_rows[d] : t_rows[d + 1]]] for d in range(n)]
    s_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [None] * n  # type: ignore[list-item]
    failed: dict[int, str] = {}
    text_bytes = np.zeros(n, dtype=np.int64)
    loss_ranges: dict[int, np.ndarray] = {}

    plain = np.flatnonzero(~chat_rows)
    if len(plain):
        enc = student.encode_batch([texts[d] for d in plain], max_student_length, [doc_ids[d] for d in plain])
        for i, d in enumerate(plain.tolist()):
            ids = enc.token_ids[enc.rows[i] : enc.rows[i + 1]]
            s_parts[d] = (ids, enc.offsets[enc.rows[i] : enc.rows[i + 1]], student.is_special[ids])
            text_bytes[d] = enc.text_bytes[i]
            if i in enc.failed:
                failed[d] = enc.failed[i]

    empty = (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, bool))
    for d in np.flatnonzero(chat_rows).tolist():
        stats.conversations += 1
        where = f"document {doc_ids[d]}"
        spans = spans_flat[spans_rows[d] : spans_rows[d + 1]]
        owners = owner_flat[owner_rows[d] : owner_rows[d + 1]]
        cc, template_t, ranges = content_offsets(t_off_parts[d], owners, spans)
        t_off_parts[d] = cc
        t_special_parts[d] = t_special_parts[d] | template_t
        content = int(ranges[-1]) if len(ranges) else 0
        conversation = messages_from_json(messages[d])
        if loss_on == "assistant":
            keep = np.array([m.role == "assistant" for m in conversation], dtype=bool)
            pairs = ranges.reshape(-1, 2)[keep]
            loss_ranges[d] = pairs
            text_bytes[d] = int((pairs[:, 1] - pairs[:, 0]).sum())
        else:
            text_bytes[d] = content
        stats.content_bytes += content
        stats.loss_bytes += int(text_bytes[d])
        stats.teacher_template_runs += _runs(cc, template_t)
        if template is None:  # the driver refuses this up front; a direct caller gets it per document
            failed[d] = "the student tokenizer has no chat template (pass --chat-template FILE)"
            s_parts[d] = empty
            continue
        try:
            rendered = template.render(conversation, where)
            enc = encode_chat(student, rendered, len(conversation), max_student_length, where, pieces)
        except (ChatError, TokenizerMismatchError) as err:
            failed[d] = str(err)
            s_parts[d] = empty
            continue
        s_cc, template_s, _ = content_offsets(enc.offsets, enc.token_message, enc.content_spans)
        s_parts[d] = (enc.token_ids, s_cc, student.is_special[enc.token_ids] | template_s)
        stats.student_template_runs += _runs(s_cc, template_s)

    s_rows = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(p[0]) for p in s_parts], out=s_rows[1:])
    return EncodedRows(
        t_off=_concat(t_off_parts, np.int32),
        t_special=_concat(t_special_parts, bool),
        s_ids=_concat([p[0] for p in s_parts], np.int32),
        s_off=_concat([p[1] for p in s_parts], np.int32),
        s_rows=s_rows,
        s_special=_concat([p[2] for p in s_parts], bool),
        failed=failed,
        text_bytes=text_bytes,
        loss_ranges=loss_ranges,
    )


def loss_mask(
    chunk_doc: np.ndarray,
    byte_start: np.ndarray,
    byte_end: np.ndarray,
    is_special: np.ndarray,
    ranges_by_doc: dict[int, np.ndarray],
) -> np.ndarray:
    """Per chunk: may it count in the loss? Chunks of documents without ranges: yes. Otherwise a regular chunk
    must lie inside one of its document's ranges, and a special (template) chunk must sit at a range's end
    (the run that ends an assistant turn)."""
    mask = np.ones(len(chunk_doc), dtype=bool)
    for d, ranges in ranges_by_doc.items():
        chunks = np.flatnonzero(chunk_doc == d)
        if not len(chunks):
            continue
        starts, ends = byte_start[chunks], byte_end[chunks]
        special = is_special[chunks]
        inside = np.zeros(len(chunks), dtype=bool)
        for a, b in ranges.tolist():
            regular_in = ~special & (starts >= a) & (ends <= b)
            ends_turn = special & (starts > a) & (starts == b)
            inside |= regular_in | ends_turn
        mask[chunks] = inside
    return mask


def _runs(cc: np.ndarray, template: np.ndarray) -> int:
    """Runs of template tokens: distinct content positions they sit at."""
    return int(len(np.unique(cc[template])))


def _lists(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A nullable list column (null for plain-text rows) as flat values + row pointers, nulls as empty."""
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if arr.null_count:
        arr = pa.ListArray.from_arrays(arr.offsets, arr.values)
    return list_parts(arr, np.int64)


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)
