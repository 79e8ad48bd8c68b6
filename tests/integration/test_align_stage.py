"""The align stage end to end under a real local Ray: one cache → several aligned sets, resume, refusal."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from alm_pipeline.cache.aligned import ALIGNED_SCHEMA, open_aligned_set
from alm_pipeline.cache.store import CacheIntegrityError
from alm_pipeline.cache.teacher import CHAT_COLUMNS, open_cache
from alm_pipeline.locking import OutputLockedError
from alm_pipeline.pipeline.align_stage import (
    AlignConfig,
    AlignError,
    AlignSettings,
    build_aligned_sets,
    stream_aligned,
)
from alm_pipeline.pipeline.teacher_cache import build_teacher_cache
from alm_pipeline.storage import location
from tests.factories import (
    BAD_INPUT_DOCS,
    lock_held_elsewhere,
    shard_bytes,
    teacher_cache_config,
    write_jsonl,
)

pytestmark = pytest.mark.ray

DOCS = [d for d in BAD_INPUT_DOCS if d["id"] != "huge"] + [
    {"id": f"prose{i}", "text": f"To be, or not to be ({i}), that is the question:\nWhether 'tis nobler."}
    for i in range(6)
]


@pytest.fixture(scope="module")
def cache_dir(ray_local, tmp_path_factory, llama_sp_model):
    root = tmp_path_factory.mktemp("align_stage")
    data = write_jsonl(root / "corpus.jsonl", DOCS)
    build_teacher_cache(
        teacher_cache_config(
            llama_sp_model, data, root / "cache", max_length=64, shard_size=shard_bytes(data, 2)
        )
    )
    return root / "cache"


def _align(cache_dir, out, students, **settings):
    return build_aligned_sets(
        AlignConfig(
            cache=str(cache_dir),
            student_tokenizers=tuple(students),
            output=str(out),
            settings=AlignSettings(**settings),
        )
    )


def _rows(path):
    rows = []
    for table in open_aligned_set(path).iter_tables():
        rows += table.to_pylist()
    return rows


def test_three_students_in_one_pass_equal_three_separate_runs(cache_dir, tmp_path, tokenizer_dirs):
    students = ["bytes", str(tokenizer_dirs["byte_level"]), str(tokenizer_dirs["char"])]
    together = _align(cache_dir, tmp_path / "together", students)
    assert [s.name for s in together] == ["bytes", "tok_byte_level", "tok_char"]
    for student, summary in zip(students, together, strict=True):
        alone = _align(cache_dir, tmp_path / f"alone_{summary.name}", [student])[0]
        assert _rows(summary.path) == _rows(alone.path)
        assert summary.docs == alone.docs and summary.dropped == alone.dropped
    by_name = {s.name: s for s in together}
    # the char tokenizer cannot write emoji / CJK: those documents are dropped and counted, not fatal
    assert by_name["tok_char"].dropped.get("student tokenizer cannot reproduce the text", 0) >= 2
    assert by_name["bytes"].dropped == {}
    assert by_name["bytes"].coverage > 0.99  # SentencePiece teacher and bytes student both have a BOS


def test_aligned_rows_are_consistent_with_the_cache(cache_dir, tmp_path):
    (summary,) = _align(cache_dir, tmp_path / "out", ["bytes"], gamma=0.0)
    aligned = open_aligned_set(summary.path)
    assert pq.read_schema(aligned.shard_files()[0]).names == ALIGNED_SCHEMA.names
    cache_rows = {r["doc_id"]: r for t in open_cache(cache_dir).iter_tables() for r in t.to_pylist()}
    for row in _rows(summary.path):
        cached = cache_rows[row["doc_id"]]
        text = cached["text"].encode()
        ids = row["input_ids"]
        assert ids[0] == 257 and bytes(ids[1:]) == text  # bytes student: <bos> + the text's bytes
        start, end = np.array(row["chunk_start"]), np.array(row["chunk_end"])
        assert np.all(start <= end) and np.all(start[1:] == end[:-1] + 1)  # contiguous groups
        # with a bytes student and no merging every byte-covering teacher token ends a chunk; a zero-byte
        # token (the SentencePiece dummy-prefix piece) belongs to the chunk of the token after it
        offsets = np.array(cached["offsets"])
        widths = np.diff(np.concatenate([[0], offsets]))
        expected_lp, expected_sigma, pending = [], [], 0.0
        for u in range(1, len(offsets)):
            pending += cached["logprob"][u]
            if widths[u] > 0:
                expected_lp.append(min(pending, 0.0))
                expected_sigma.append(cached["boundary_logprob"][u])
                pending = 0.0
        np.testing.assert_allclose(row["teacher_chunk_logprob"], expected_lp, atol=1e-5)
        np.testing.assert_allclose(row["teacher_chunk_boundary_logprob"], expected_sigma, atol=1e-6)


def test_resume_and_refusal(cache_dir, tmp_path):
    first = _align(cache_dir, tmp_path / "out", ["bytes"])[0]
    again = _align(cache_dir, tmp_path / "out", ["bytes"])[0]
    assert again.shards_written == 0 and again.shards_reused == first.shards_written
    with pytest.raises(AlignError, match=r"settings\.gamma: set has 0\.1, this run has 0\.5"):
        _align(cache_dir, tmp_path / "out", ["bytes"], gamma=0.5)
    with pytest.raises(ValueError, match=r"--gamma must be a number in \[0, 1\]"):
        _align(cache_dir, tmp_path / "other", ["bytes"], gamma=2.0)


def test_an_aligned_set_another_process_writes_is_refused(cache_dir, tmp_path, tokenizer_dirs):
    """One writer per aligned set: while another process holds one of the sets, the run is refused at once naming
    it, and writes none of its sets; another student's set in the same folder is not in the way."""
    out = tmp_path / "out"
    with lock_held_elsewhere(out / "bytes", "align") as holder:
        with pytest.raises(OutputLockedError, match=f"alm-pipeline align \\(pid {holder.pid} "):
            _align(cache_dir, out, [str(tokenizer_dirs["char"]), "bytes"])
        assert sorted(p.name for p in out.iterdir()) == ["bytes", "tok_char"]
        assert not (out / "tok_char" / "manifest.json").exists()
        (summary,) = _align(cache_dir, out, [str(tokenizer_dirs["char"])])
        assert summary.shards_written == len(open_cache(cache_dir).shards)


def test_low_coverage_is_flagged(cache_dir, tmp_path):
    (summary,) = _align(cache_dir, tmp_path / "out", ["bytes"], max_student_length=6)
    assert summary.low_coverage and summary.coverage < 0.5
    manifest = json.loads((tmp_path / "out" / "bytes" / "manifest.json").read_text())
    assert manifest["coverage"]["coverage"] == summary.coverage


def test_set_is_refused_when_its_cache_changed(cache_dir, tmp_path):
    import shutil

    copy = tmp_path / "cache_copy"
    shutil.copytree(cache_dir, copy)
    (summary,) = _align(copy, tmp_path / "out", ["bytes"])
    open_aligned_set(summary.path).check_cache()  # unchanged: fine
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["identity"]["settings"]["max_length"] = 999  # as if the cache had been rebuilt
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheIntegrityError, match="re-run `alm-pipeline align`"):
        open_aligned_set(summary.path).check_cache()
    manifest["format_version"] = 7
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AlignError, match="format version 7"):
        _align(copy, tmp_path / "out2", ["bytes"])


def test_saved_bytes_tokenizer_and_streaming_match(cache_dir, tmp_path):
    (summary,) = _align(cache_dir, tmp_path / "out", ["bytes"])
    tok = AutoTokenizer.from_pretrained(str(open_aligned_set(summary.path).tokenizer_dir))
    assert tok("Hé wörld\n")["input_ids"] == [257, *"Hé wörld\n".encode()]
    ds, view, _ = stream_aligned(str(cache_dir), "bytes")
    streamed = sorted(ds.take_all(), key=lambda r: r["doc_id"])
    stored = sorted(_rows(summary.path), key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in streamed] == [r["doc_id"] for r in stored]
    for a, b in zip(streamed, stored, strict=True):
        assert list(a["input_ids"]) == b["input_ids"] and list(a["chunk_end"]) == b["chunk_end"]
        np.testing.assert_array_equal(
            a["teacher_chunk_logprob"], np.array(b["teacher_chunk_logprob"], np.float32)
        )


def _upload(folder, uri: str) -> str:
    """Copy a local folder to ``uri`` file by file (through alm_pipeline.storage)."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        location(uri).join(path.relative_to(folder).as_posix()).write_bytes(path.read_bytes())
    return uri


def test_align_from_s3_to_s3_reads_the_same_rows_as_local(cache_dir, tmp_path, s3_bucket, monkeypatch):
    """Cache and output on s3:// (Ray was started before the S3 variables were set: the tasks get them through
    their runtime environment); the aligned set read back from its URI equals a local run's, the student
    tokenizer is stored at the URI, a second run resumes, and nothing named ``s3:`` lands on the local disk."""
    monkeypatch.chdir(tmp_path)
    cache_uri = _upload(cache_dir, f"{s3_bucket}/cache")
    (local,) = _align(cache_dir, tmp_path / "local", ["bytes"])
    (remote,) = _align(cache_uri, f"{s3_bucket}/aligned", ["bytes"])
    assert remote.path == f"{s3_bucket}/aligned/bytes" and remote.shards_written == local.shards_written
    assert _rows(remote.path) == _rows(local.path)
    aligned = open_aligned_set(remote.path)
    assert aligned.manifest["cache"]["path"] == cache_uri
    assert location(remote.path).join("tokenizer", "tokenizer_config.json").exists()
    assert (aligned.tokenizer_dir / "tokenizer_config.json").is_file()  # a local copy for from_pretrained
    aligned.check_cache()  # the cache it names, by URI, is unchanged
    (again,) = _align(cache_uri, f"{s3_bucket}/aligned", ["bytes"])
    assert again.shards_written == 0 and again.shards_reused == remote.shards_written
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*"))


def test_checksum_pass_finds_a_same_size_corruption_that_opening_does_not_read(cache_dir, tmp_path):
    """Opening checks presence and sizes only (no shard is read); ``verify_checksums`` (parallel Ray tasks, also
    what ``inspect --verify`` and ``align --verify`` run) reads every shard and names the corrupted one."""
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    cache = open_cache(copy)
    cache.verify_checksums(shards_per_task=2)  # intact
    victim = cache.shard_location(1).local_path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    cache = open_cache(copy)  # same size: opening does not notice
    with pytest.raises(CacheIntegrityError, match=r"shard-00000001.parquet: checksum does not match"):
        cache.verify_checksums(shards_per_task=2)
    with pytest.raises(AlignError, match=r"shard-00000001.parquet: checksum does not match"):
        build_aligned_sets(
            AlignConfig(
                cache=str(copy), student_tokenizers=("bytes",), output=str(tmp_path / "o"), verify=True
            )
        )
    assert not (tmp_path / "o").exists()  # refused before any output was written


def test_inspect_reads_a_cache_on_s3_and_verifies_it(cache_dir, tmp_path, s3_bucket, monkeypatch):
    from typer.testing import CliRunner

    from alm_pipeline.cli.main import app

    monkeypatch.chdir(tmp_path)
    uri = _upload(cache_dir, f"{s3_bucket}/cache")
    result = CliRunner().invoke(app, ["inspect", uri, "--json", "--verify"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["path"] == uri and summary["checksums"] == "verified"
    assert summary["shards"] == open_cache(cache_dir).num_shards
    location(uri).join("shards", "shard-00000000.parquet").remove()
    result = CliRunner().invoke(app, ["inspect", uri])
    assert result.exit_code == 2 and f"{uri}/shards/shard-00000000.parquet: shard listed" in result.output
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*"))


def test_a_compact_cache_reads_and_aligns_exactly_as_the_full_one(
    cache_dir, tmp_path, llama_sp_model, tokenizer_dirs
):
    """teacher-cache --derive-text: no text/offsets stored (a smaller cache), the same rows read back, the same
    aligned sets; resuming it with the other setting is refused."""
    from alm_pipeline.cache.token_bytes import TOKEN_BYTES_FILE
    from alm_pipeline.pipeline.teacher_cache import TeacherCacheError

    data = cache_dir.parent / "corpus.jsonl"
    full = open_cache(cache_dir)
    settings = {"max_length": 64, "shard_size": shard_bytes(data, 2)}
    build_teacher_cache(
        teacher_cache_config(llama_sp_model, data, tmp_path / "compact", derive_text=True, **settings)
    )
    compact = open_cache(tmp_path / "compact")
    assert compact.manifest["text"] == "derived" and (tmp_path / "compact" / TOKEN_BYTES_FILE).is_file()
    assert "text" not in pq.read_schema(compact.shard_files()[0]).names
    assert compact.summary()["bytes_on_disk"] < full.summary()["bytes_on_disk"]
    for got, want in zip(compact.iter_tables(), full.iter_tables(), strict=True):
        # the full cache also has the chat columns (null: no conversations); a compact one cannot hold any
        extra = [name for name in want.column_names if name not in got.column_names]
        assert extra == list(CHAT_COLUMNS) and all(want[name].null_count == len(want) for name in extra)
        want = want.drop_columns(extra)
        assert got.drop_columns(["logprob"]).equals(want.drop_columns(["logprob"]))
        np.testing.assert_array_equal(
            got["logprob"].combine_chunks().values, want["logprob"].combine_chunks().values
        )
    open_cache(tmp_path / "compact", checksums=True)  # the verify pass checks the compact schema
    students = ["bytes", str(tokenizer_dirs["byte_level"])]
    for a, b in zip(
        _align(cache_dir, tmp_path / "a_full", students),
        _align(tmp_path / "compact", tmp_path / "a_compact", students),
        strict=True,
    ):
        assert _rows(a.path) == _rows(b.path) and a.docs == b.docs > 0
    with pytest.raises(TeacherCacheError, match="text"):
        build_teacher_cache(teacher_cache_config(llama_sp_model, data, tmp_path / "compact", **settings))
