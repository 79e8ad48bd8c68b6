"""Corpus readers and validation: every bad document is an error naming file and line, or a counted skip."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alm_pipeline.pipeline.corpus import (
    CorpusConfig,
    CorpusError,
    CorpusStats,
    iter_documents,
    split_at_lines,
)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _docs(path, **kw):
    stats = CorpusStats()
    return list(iter_documents(CorpusConfig(path=str(path), **kw), stats)), stats


def test_jsonl_parquet_and_saved_dataset_agree(tmp_path):
    import datasets

    records = [{"id": f"d{i}", "text": f"document number {i}"} for i in range(5)]
    jsonl = _jsonl(tmp_path / "c.jsonl", records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    results = [
        [(d.doc_id, d.text) for d in _docs(p, id_field="id")[0]]
        for p in (jsonl, tmp_path / "c.parquet", tmp_path / "saved")
    ]
    assert results[0] == results[1] == results[2] == [(r["id"], r["text"]) for r in records]


def test_empty_and_whitespace_documents_are_skipped_and_counted(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"text": ""}, {"text": " \n\t "}, {"text": "b"}])
    docs, stats = _docs(path)
    assert [d.text for d in docs] == ["a", "b"]
    assert stats.skipped_empty == 2 and stats.used == 2 and stats.read == 4
    assert any("c.jsonl:2" in s for s in stats.skipped_examples)


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff\xfe byte"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: invalid UTF-8"):
        _docs(path)


def test_lone_surrogate_names_file_and_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "half \\ud800 pair"}\n')
    with pytest.raises(CorpusError, match=r"s\.jsonl:2: text is not valid Unicode"):
        _docs(path)


def test_missing_and_non_string_text_field(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(CorpusError, match=r"m\.jsonl:2: missing text field 'text'"):
        _docs(path)
    path = _jsonl(tmp_path / "n.jsonl", [{"text": 12}])
    with pytest.raises(CorpusError, match=r"n\.jsonl:1: text field 'text' is int"):
        _docs(path)


def test_duplicate_ids_are_an_error(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl", [{"id": "x", "text": "a"}, {"id": "y", "text": "b"}, {"id": "x", "text": "c"}]
    )
    with pytest.raises(
        CorpusError, match=r"d\.jsonl:3: duplicate document id 'x' \(first seen at .*d\.jsonl:1\)"
    ):
        _docs(path, id_field="id")


def test_duplicate_texts_without_ids_keep_the_first(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "same"}, {"text": "other"}, {"text": "same"}])
    docs, stats = _docs(path)
    assert [d.text for d in docs] == ["same", "other"]
    assert stats.skipped_duplicate_text == 1


def test_invalid_json_and_limit(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(CorpusError, match=r"j\.jsonl:2: invalid JSON"):
        _docs(path)
    path = _jsonl(tmp_path / "l.jsonl", [{"text": f"t{i}"} for i in range(10)])
    docs, _ = _docs(path, limit=3)
    assert [d.text for d in docs] == ["t0", "t1", "t2"]


def test_missing_path_is_clear(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        _docs(tmp_path / "nope.jsonl")


def test_a_folder_corpus_counts_and_names_the_files_it_skips(tmp_path):
    """Before: .csv/.txt files in a corpus folder were skipped without a word."""
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    _jsonl(folder / "a.jsonl", [{"text": "one"}])
    _jsonl(folder / "sub" / "b.jsonl", [{"text": "two"}])
    (folder / "table.csv").write_text("text\nthree\n")
    (folder / "sub" / "notes.txt").write_text("four")
    docs, stats = _docs(folder)
    assert [d.text for d in docs] == ["one", "two"]
    assert stats.skipped_files == 2
    assert sorted(stats.skipped_file_examples) == sorted(
        [str(folder / "table.csv"), str(folder / "sub/notes.txt")]
    )
    assert stats.to_json()["skipped_files"] == 2
    only_other = tmp_path / "other"
    only_other.mkdir()
    (only_other / "table.csv").write_text("x")
    with pytest.raises(
        CorpusError, match=r"no .jsonl/.json/.parquet files found in the directory \(it holds table.csv\)"
    ):
        _docs(only_other)


def test_a_local_corpus_is_identified_by_its_absolute_path(tmp_path, monkeypatch):
    """The same file given relatively and absolutely is the same corpus (before: a cache refused to resume)."""
    _jsonl(tmp_path / "c.jsonl", [{"text": "one"}])
    monkeypatch.chdir(tmp_path)
    assert CorpusConfig(path="c.jsonl").describe() == CorpusConfig(path=str(tmp_path / "c.jsonl")).describe()
    assert CorpusConfig(path="user/hub-dataset").describe()["path"] == "user/hub-dataset"


def test_split_at_lines_keeps_whole_lines_within_the_byte_budget():
    text = "To be, or not to be:\nthat is the question.\n\nWhether 'tis nobler — in the mind\n" + "é" * 30
    for budget in (8, 25, 40, 200):
        pieces = split_at_lines(text, budget)
        assert all(len(p.encode("utf-8")) <= budget for p in pieces)
        # nothing lost but the newlines between pieces; every piece is valid UTF-8 text
        assert "".join(pieces).replace("\n", "") == text.replace("\n", "")
        # a line that fits the budget is never cut
        kept = {line for p in pieces for line in p.split("\n")}
        assert all(line in kept for line in text.split("\n") if len(line.encode("utf-8")) <= budget)
    assert split_at_lines(text, 200) == [text]
    assert split_at_lines("short\n\nlonger line here", 100, min_bytes=8) == ["short\n\nlonger line here"]
    assert split_at_lines("tiny\n" + "x" * 20, 12, min_bytes=6) == ["xxxxxxxxxxxx", "xxxxxxxx"]
    with pytest.raises(ValueError, match="max_bytes"):
        split_at_lines(text, 3)
