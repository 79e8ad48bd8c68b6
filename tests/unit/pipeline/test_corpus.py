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
    ShardEntry,
    iter_documents,
    limit_plan,
    list_corpus,
    plan_shards,
    read_shard,
    split_at_lines,
)
from alm_pipeline.storage import StorageError


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


def test_a_gzipped_jsonl_corpus_reads_as_the_plain_one(tmp_path):
    import gzip

    records = [{"id": f"d{i}", "text": f"document number {i}"} for i in range(5)]
    plain = _jsonl(tmp_path / "c.jsonl", records)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    got = [(d.doc_id, d.text) for d in _docs(tmp_path / "c.jsonl.gz", id_field="id")[0]]
    assert got == [(r["id"], r["text"]) for r in records]


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


# ------------------------------------------------------------------------------------------ shard plans


def _plan(path, budget, **kw):
    config = CorpusConfig(path=str(path), **kw)
    return config, list(plan_shards(list_corpus(config), budget))


def _read_all(config, plan):
    return [(d.doc_id, d.text) for entry in plan for d in read_shard(entry, config, CorpusStats())]


def test_jsonl_byte_ranges_start_at_lines_and_read_back_the_corpus(tmp_path):
    records = [{"id": f"d{i}", "text": f"document {i} " + "é" * (i % 7)} for i in range(40)]
    path = _jsonl(tmp_path / "c.jsonl", records)
    data = path.read_bytes()
    expected = [(r["id"], r["text"]) for r in records]
    for budget in (1, 64, 300, 10**9):
        config, plan = _plan(path, budget, id_field="id")
        assert [e.index for e in plan] == list(range(len(plan)))
        assert plan[0].start == 0 and plan[-1].stop == len(data)
        assert all(a.stop == b.start for a, b in zip(plan, plan[1:], strict=False))
        assert all(e.start == 0 or data[e.start - 1 : e.start] == b"\n" for e in plan)
        assert _read_all(config, plan) == expected
    assert len(_plan(path, 1)[1]) == 40  # a budget below a line: one document per shard
    assert len(_plan(path, 10**9)[1]) == 1
    # a range that starts mid-line leaves that line to the range holding its first byte
    first_line = data.index(b"\n") + 1
    config, _ = _plan(path, 1, id_field="id")
    mid = ShardEntry(0, str(path), "jsonl", 3, first_line + 5, len(data), path.stat().st_mtime_ns)
    assert [d.doc_id for d in read_shard(mid, config, CorpusStats())] == ["d1"]


def test_parquet_row_groups_become_row_ranges(tmp_path):
    records = [{"id": f"d{i}", "text": f"text {i} " * 5} for i in range(50)]
    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=8)
    expected = [(r["id"], r["text"]) for r in records]
    for budget in (1, 400, 10**9):
        config, plan = _plan(path, budget, id_field="id")
        assert plan[0].start == 0 and plan[-1].stop == 50
        assert all(a.stop == b.start for a, b in zip(plan, plan[1:], strict=False))
        assert _read_all(config, plan) == expected
    assert len(_plan(path, 1)[1]) == 50 and len(_plan(path, 10**9)[1]) == 1
    assert 1 < len(_plan(path, 400)[1]) < 50


def test_an_error_in_a_mid_file_shard_names_the_exact_line(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": f"fine {i}"}) for i in range(9)] + ['{"text": "cut']
    path.write_text("\n".join(lines) + "\n")
    config, plan = _plan(path, 20)
    last = plan[-1]
    assert last.start > 0
    with pytest.raises(CorpusError, match=r"c\.jsonl:10: invalid JSON"):
        list(read_shard(last, config, CorpusStats()))
    # duplicate ids are caught within a shard, naming both lines
    path = _jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}] * 2 + [{"id": "b", "text": "y"}] * 2)
    config, plan = _plan(path, 40, id_field="id")
    assert plan[-1].start > 0
    with pytest.raises(
        CorpusError, match=r"d\.jsonl:4: duplicate document id 'b' \(first seen at .*d\.jsonl:3\)"
    ):
        list(read_shard(plan[-1], config, CorpusStats()))


def test_duplicates_across_shards_are_left_to_the_global_check(tmp_path):
    """Per-shard checks only: the same id (or text) in two shards passes here (teacher-cache
    --check-duplicate-ids finds it)."""
    path = _jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "same"}, {"id": "a", "text": "same"}])
    config, plan = _plan(path, 1, id_field="id")
    assert len(plan) == 2 and [d for d, _ in _read_all(config, plan)] == ["a", "a"]
    config, plan = _plan(path, 1)
    assert len(_read_all(config, plan)) == 2


def test_max_docs_plans_only_the_prefix_it_needs(tmp_path):
    """--max-docs N reads the shards that hold the first N usable documents and nothing after them: a broken
    line further on is never read."""
    lines = [json.dumps({"text": "  "})] + [json.dumps({"text": f"doc {i}"}) for i in range(10)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n" + '{"text": broken\n')
    config, _ = _plan(path, 1, limit=4)
    plan = limit_plan(plan_shards(list_corpus(config), 30), config, 4)
    texts = [t for _, t in _read_all(config, plan)]
    assert texts == ["doc 0", "doc 1", "doc 2", "doc 3"]
    assert [e.index for e in plan] == list(range(len(plan))) and plan[-1].stop < path.stat().st_size - 20
    whole = limit_plan(plan_shards(list_corpus(config), 10**9), config, 3)
    assert len(whole) == 1 and whole[0].limit == 3
    assert [t for _, t in _read_all(config, whole)] == ["doc 0", "doc 1", "doc 2"]


def test_the_listing_fingerprint_follows_size_and_mtime_and_names_the_changed_file(tmp_path):
    import os

    folder = tmp_path / "corpus"
    folder.mkdir()
    _jsonl(folder / "a.jsonl", [{"text": "one"}])
    b = _jsonl(folder / "b.jsonl", [{"text": "two"}])
    config = CorpusConfig(path=str(folder))
    before = list_corpus(config)
    assert list_corpus(config).fingerprint == before.fingerprint
    stat = b.stat()
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = list_corpus(config)
    assert after.fingerprint != before.fingerprint
    assert [c.split(":")[0] for c in after.changes_since(before)] == [str(b)]
    # a shard planned before the change refuses to read the changed file
    entry = list(plan_shards(before, 10**9))[1]
    with pytest.raises(CorpusError, match=r"b\.jsonl: corpus file changed since the run was planned"):
        list(read_shard(entry, config, CorpusStats()))


def test_unknown_schemes_and_unreachable_endpoints_name_the_uri(monkeypatch):
    from alm_pipeline import storage

    with pytest.raises(ValueError, match=r"--data: hdfs://nn/c\.jsonl: unsupported URI scheme"):
        CorpusConfig(path="hdfs://nn/c.jsonl")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    storage._filesystem.cache_clear()
    try:
        with pytest.raises(StorageError, match=r"s3://bucket/c\.jsonl: cannot .*127\.0\.0\.1:9"):
            list_corpus(CorpusConfig(path="s3://bucket/c.jsonl"))
    finally:
        storage._filesystem.cache_clear()


def test_a_corpus_on_s3_is_listed_planned_and_read_in_slices(s3_bucket, tmp_path):
    from alm_pipeline.storage import location

    records = [{"id": f"d{i}", "text": f"document {i}"} for i in range(12)]
    local = _jsonl(tmp_path / "c.jsonl", records)
    location(f"{s3_bucket}/corpus/c.jsonl").write_bytes(local.read_bytes())
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet", row_group_size=4)
    location(f"{s3_bucket}/corpus/sub/c.parquet").write_bytes((tmp_path / "c.parquet").read_bytes())
    config, plan = _plan(f"{s3_bucket}/corpus", 60, id_field="id")
    assert {e.file for e in plan} == {f"{s3_bucket}/corpus/c.jsonl", f"{s3_bucket}/corpus/sub/c.parquet"}
    assert len(plan) > 2
    expected = [(r["id"], r["text"]) for r in records]
    assert _read_all(config, plan) == expected + expected
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*"))
