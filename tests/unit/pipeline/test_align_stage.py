"""align_stage.align_table (alm_pipeline.pipeline.align_stage): the whole shard at once equals the per-document
loop it replaced (ByteView.encode, align_document, merge_and_debias, coverage_stats per row)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, reject
from hypothesis import strategies as st

from alm_pipeline.pipeline.align import (
    CoverageStats,
    align_document,
    coverage_stats,
    merge_and_debias,
)
from alm_pipeline.pipeline.align_stage import CACHE_COLUMNS, AlignSettings, DroppedDocs, align_table
from alm_pipeline.pipeline.byteview import TokenizerMismatchError
from tests.factories import random_scores
from tests.strategies import CHAR_TEXT, FAST, GENERAL_TEXT, MAX_LENGTH


def align_table_per_document(table, teacher_is_special, student, settings, coverage, dropped):
    """The per-document align_table (ByteView.encode, align_document, merge_and_debias, coverage_stats per
    row): the reference for align_stage.align_table."""
    from alm_pipeline.cache.aligned import ALIGNED_SCHEMA

    out = {name: [] for name in ALIGNED_SCHEMA.names}
    rows = table.to_pylist()
    for row in rows:
        doc_id, text = row["doc_id"], row["text"]
        t_ids = np.asarray(row["token_ids"], dtype=np.int32)
        text_bytes = len(text.encode("utf-8"))
        try:
            enc = student.encode(text, max_length=settings.max_student_length, doc_ref=doc_id)
        except TokenizerMismatchError as err:
            dropped.add("student tokenizer cannot reproduce the text", doc_id, str(err)[:200])
            continue
        alignment = align_document(
            t_ids,
            np.asarray(row["offsets"], dtype=np.int32),
            teacher_is_special[t_ids],
            enc.token_ids,
            enc.offsets,
            student.is_special[enc.token_ids],
        )
        merged = merge_and_debias(
            alignment,
            np.asarray(row["logprob"], dtype=np.float32),
            np.asarray(row["boundary_logprob"], dtype=np.float32),
            gamma=settings.gamma,
            debias=settings.debias,
        )
        coverage.add(coverage_stats(alignment, merged, text_bytes))
        if merged.num_groups == 0:
            dropped.add("no valid chunk", doc_id)
            continue
        out["doc_id"].append(doc_id)
        out["input_ids"].append(enc.token_ids.tolist())
        out["chunk_start"].append(merged.chunk_start.tolist())
        out["chunk_end"].append(merged.chunk_end.tolist())
        out["teacher_chunk_logprob"].append(merged.teacher_chunk_logprob.tolist())
        out["teacher_chunk_boundary_logprob"].append(merged.teacher_chunk_boundary_logprob.tolist())
        out["text_bytes"].append(text_bytes)
        out["covered_bytes"].append(int((merged.byte_end - merged.byte_start).sum()))
        out["num_tokens"].append(len(enc.token_ids))
        out["num_chunks"].append(merged.num_groups)
    return pa.table(out, schema=ALIGNED_SCHEMA)


def cache_table(view, texts, max_length, rng):
    """Teacher-cache rows (the cache's schema) for ``texts`` tokenized by ``view``."""
    from alm_pipeline.cache.teacher import CACHE_SCHEMA

    rows = []
    for i, text in enumerate(texts):
        enc = view.encode(text, max_length=max_length)
        logprob, sigma = random_scores(rng, len(enc.token_ids))
        rows.append(
            {
                "doc_id": f"doc-{i}",
                "text": text,
                "token_ids": enc.token_ids.tolist(),
                "offsets": enc.offsets.tolist(),
                "logprob": logprob.tolist(),
                "boundary_logprob": sigma.tolist(),
            }
        )
    schema = pa.schema([CACHE_SCHEMA.field(name) for name in CACHE_COLUMNS])
    return pa.Table.from_pylist(rows, schema=schema)


def check_align_table(table, teacher_view, student_view, settings) -> pa.Table:
    got_cov, got_drop = CoverageStats(), DroppedDocs()
    got = align_table(table, teacher_view.is_special, student_view, settings, got_cov, got_drop)
    want_cov, want_drop = CoverageStats(), DroppedDocs()
    want = align_table_per_document(
        table, teacher_view.is_special, student_view, settings, want_cov, want_drop
    )
    assert got.schema == want.schema
    for name in want.column_names:
        assert got[name].to_pylist() == want[name].to_pylist(), name
    assert got.equals(want)
    assert got_cov == want_cov
    assert got_drop.counts == want_drop.counts and got_drop.examples == want_drop.examples
    return got


STUDENT_MAX_LENGTH = st.one_of(st.none(), st.integers(min_value=1, max_value=48), st.just(2000))


@pytest.mark.parametrize(
    ("teacher", "student"),
    [("byte_level", "bytes"), ("sentencepiece", "byte_level_small"), ("byte_level", "sentencepiece"),
     ("byte_level", "char"), ("bytes", "char")],
)  # fmt: skip
@FAST
@given(data=st.data(), max_t=MAX_LENGTH, max_s=STUDENT_MAX_LENGTH, seed=st.integers(0, 2**32 - 1))
def test_align_table_equals_the_per_document_path(views, teacher, student, data, max_t, max_s, seed):
    # For the char student, texts outside its vocabulary are kept: the student cannot tokenize them and
    # they are dropped and counted. Empty texts and one-character texts have no valid chunk.
    texts = data.draw(
        st.lists(
            st.one_of(CHAR_TEXT if student == "char" else GENERAL_TEXT, st.sampled_from(["", "a", "\u2603"])),
            max_size=10,
        ),
        label="texts",
    )
    rng = np.random.default_rng(seed)
    vt, vs = views[teacher], views[student]
    try:
        table = cache_table(vt, texts, max_t, rng)
    except TokenizerMismatchError:
        reject()
    gamma = float(rng.choice([0.0, 0.1, 0.5]))
    settings_ = AlignSettings(gamma=gamma, max_student_length=max_s)
    check_align_table(table, vt, vs, settings_)
    if table.num_rows > 2:  # a sliced table (list offsets not starting at 0) and a table of several chunks
        check_align_table(table.slice(1, table.num_rows - 2), vt, vs, settings_)
        check_align_table(pa.concat_tables([table.slice(0, 2), table.slice(2)]), vt, vs, settings_)


def test_align_table_drops_and_counts_like_the_per_document_path(views):
    texts = ["Hello world", "", "snow \u2603 man", "a", "Hello again", "\u2603"]
    table = cache_table(views["byte_level"], texts, None, np.random.default_rng(0))
    out = check_align_table(table, views["byte_level"], views["char"], AlignSettings())
    assert out["doc_id"].to_pylist() == ["doc-0", "doc-4"]
    drop = DroppedDocs()
    align_table(table, views["byte_level"].is_special, views["char"], AlignSettings(), dropped=drop)
    assert drop.counts == {"no valid chunk": 2, "student tokenizer cannot reproduce the text": 2}
    assert [e.split(":")[0] for e in drop.examples] == ["doc-1", "doc-2", "doc-3", "doc-5"]
    # truncation of the student: every document is cut at 4 tokens
    out = check_align_table(table, views["byte_level"], views["bytes"], AlignSettings(max_student_length=4))
    assert all(len(ids) <= 4 for ids in out["input_ids"].to_pylist())
    # a corrupt cache row: the error names the document
    corrupt = table.set_column(
        table.schema.get_field_index("logprob"),
        "logprob",
        pa.array(
            [[float("nan")] * len(r) for r in table["logprob"].to_pylist()], type=pa.list_(pa.float32())
        ),
    )
    with pytest.raises(ValueError, match=r"teacher_logprob is NaN at position \d+, .*\(document doc-0\)"):
        align_table(corrupt, views["byte_level"].is_special, views["bytes"], AlignSettings())
    # no rows at all
    check_align_table(table.slice(0, 0), views["byte_level"], views["bytes"], AlignSettings())


def test_align_table_refuses_texts_the_student_does_not_reproduce(views):
    """Student views whose token bytes were altered: the texts they cannot reproduce are dropped with the
    message ByteView.encode gives, by every path of the batched byte check."""
    texts = ["Hello world", "Hello", "the other one", "xyz", "", "e", "Hello there"]
    teacher = views["byte_level"]
    table = cache_table(teacher, texts, None, np.random.default_rng(0))

    def altered(view, old: bytes, new: bytes, leading_only: bool = False):
        def alter(b: bytes) -> bytes:
            if leading_only:
                return new + b[len(old) :] if b.startswith(old) else b
            return b.replace(old, new)

        # no per-occurrence reading either: the altered bytes are all the view knows
        return dataclasses.replace(view, token_bytes=[alter(b) for b in view.token_bytes], flex_pieces={})

    cases = [
        altered(views["bytes"], b"e", b"E"),  # one byte per token, texts and tokens of the same length
        altered(views["sentencepiece"], b"e", b"E"),  # dummy prefix: lengths differ from the text's
        altered(views["sentencepiece"], b" ", b"X", leading_only=True),  # "XHello" for "Hello": refused
        altered(views["byte_level"], b"o", b"oo"),  # longer than the text
    ]
    for student in cases:
        for max_length in (None, 3):
            drop = DroppedDocs()
            align_table(
                table, teacher.is_special, student, AlignSettings(max_student_length=max_length), dropped=drop
            )
            assert drop.counts.get("student tokenizer cannot reproduce the text", 0) > 0
            check_align_table(table, teacher, student, AlignSettings(max_student_length=max_length))
