"""The teacher-cache stage end to end under a real local Ray: values, offsets, bad input, resume, refusal."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from alm_pipeline.cache import open_cache, store
from alm_pipeline.cache.store import CacheIntegrityError
from alm_pipeline.cli.main import app
from alm_pipeline.pipeline.byteview import load_byte_view
from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, TeacherCacheError, build_teacher_cache
from tests.factories import (
    BAD_INPUT_DOCS,
    assert_same_cache_rows,
    cache_rows,
    reference_scores,
    shard_bytes,
    teacher_cache_config,
    write_jsonl,
)

pytestmark = pytest.mark.ray


def _config(model_dir, data, out, **kw) -> TeacherCacheConfig:
    defaults = {"max_length": 128, "shard_size": 3, "batch_tokens": 512}
    defaults.update(kw)
    return teacher_cache_config(model_dir, data, out, **defaults)


@pytest.mark.parametrize("model_fixture", ["llama_sp_model", "gpt2_bl_model"])
def test_cache_values_offsets_and_bad_input(request, ray_local, tmp_path, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    data = write_jsonl(tmp_path / "bad.jsonl", BAD_INPUT_DOCS)
    summary = build_teacher_cache(_config(model_dir, data, tmp_path / "cache"))
    view = load_byte_view(model_dir)
    rows = cache_rows(tmp_path / "cache")
    by_id = {r["doc_id"]: r for r in rows}
    assert [r["doc_id"] for r in rows] == [d["id"] for d in BAD_INPUT_DOCS if d["text"].strip()]
    assert summary.docs == len(rows) == 8
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["corpus"]["stats"]["skipped_empty"] == 2
    assert manifest["state"] == "complete" and manifest["totals"]["truncated_docs"] == 1
    for row in rows:
        ids = np.array(row["token_ids"], dtype=np.int32)
        offsets = np.array(row["offsets"])
        data_bytes = row["text"].encode("utf-8")
        starts = np.concatenate([[0], offsets[:-1]])
        # offsets cover the stored text exactly, in order
        assert offsets[-1] == len(data_bytes) and np.all(np.diff(offsets) >= 0)
        for tok, s, e in zip(ids, starts, offsets, strict=True):
            tb = view.token_bytes[tok]
            assert data_bytes[s:e] == tb or (s == 0 and tb == b" " + data_bytes[s:e])
        # special-token strings in text are never control tokens
        assert not view.is_special[ids[len(view.prefix_ids) :]].any()
        # values equal an independent plain forward
        ref_lp, ref_bl = reference_scores(model_dir, view, ids)
        np.testing.assert_allclose(np.array(row["logprob"][1:]), ref_lp[1:], atol=1e-5)
        np.testing.assert_allclose(np.array(row["boundary_logprob"]), ref_bl, atol=1e-5)
        assert np.isnan(row["logprob"][0])
    huge = by_id["huge"]
    assert huge["truncated"] and len(huge["token_ids"]) == 128
    assert next(d["text"] for d in BAD_INPUT_DOCS if d["id"] == "huge").startswith(huge["text"])
    assert by_id["nul"]["text"] == BAD_INPUT_DOCS[3]["text"]
    assert by_id["crlf"]["text"] == BAD_INPUT_DOCS[7]["text"]


def test_refusal_on_different_settings_and_overwrite(ray_local, tmp_path, gpt2_bl_model):
    data = write_jsonl(tmp_path / "c.jsonl", BAD_INPUT_DOCS[:4])
    build_teacher_cache(_config(gpt2_bl_model, data, tmp_path / "cache"))
    with pytest.raises(TeacherCacheError, match=r"settings\.max_length: cache has 128, this run has 64"):
        build_teacher_cache(_config(gpt2_bl_model, data, tmp_path / "cache", max_length=64))
    other = write_jsonl(tmp_path / "other.jsonl", BAD_INPUT_DOCS[4:6])
    with pytest.raises(
        TeacherCacheError, match=r"corpus\.path: cache has '.*c\.jsonl', this run has '.*other\.jsonl'"
    ):
        build_teacher_cache(_config(gpt2_bl_model, other, tmp_path / "cache"))
    summary = build_teacher_cache(
        _config(gpt2_bl_model, data, tmp_path / "cache", max_length=64, overwrite=True)
    )
    assert summary.shards_written == summary.shards_total
    assert open_cache(tmp_path / "cache").manifest["settings"]["max_length"] == 64
    # same command again: nothing is recomputed
    again = build_teacher_cache(_config(gpt2_bl_model, data, tmp_path / "cache", max_length=64))
    assert again.shards_reused == again.shards_total and again.shards_written == 0


def test_a_float32_cache_resumes_with_the_default_auto_dtype_on_cpu(ray_local, tmp_path, gpt2_bl_model):
    """A cache written with an explicit --dtype float32 (the default before --dtype auto) is resumed by a run with
    the defaults on this CPU cluster (auto resolves to float32, no GPU per actor), here with an autoscaling pool
    (--concurrency 1,2); the manifest records the resolved dtype and how the actors ran; bfloat16 is refused."""
    data = write_jsonl(tmp_path / "c.jsonl", BAD_INPUT_DOCS[:6])
    out = tmp_path / "cache"
    first = build_teacher_cache(_config(gpt2_bl_model, data, out, dtype="float32", num_gpus_per_actor=0))
    kept = store.shard_path(out, 0).local_path.read_bytes()
    store.marker_path(out, 1).local_path.unlink()  # one shard to redo
    again = build_teacher_cache(_config(gpt2_bl_model, data, out, concurrency="1,2"))
    assert again.shards_total == first.shards_total and again.shards_reused == first.shards_total - 1
    manifest = open_cache(out).manifest
    assert manifest["teacher"]["dtype"] == manifest["identity"]["settings"]["dtype"] == "float32"
    assert manifest["runtime"] == {"concurrency": "1,2", "num_gpus_per_actor": 0.0, "num_cpus_per_actor": 1.0}
    assert store.shard_path(out, 0).local_path.read_bytes() == kept  # reused, not rewritten
    with pytest.raises(
        TeacherCacheError, match=r"settings\.dtype: cache has 'float32', this run has 'bfloat16'"
    ):
        build_teacher_cache(_config(gpt2_bl_model, data, out, dtype="bfloat16"))


def test_relative_then_absolute_paths_resume_and_skipped_files_are_reported(
    ray_local, tmp_path, gpt2_bl_model, monkeypatch
):
    """The same corpus folder and teacher given relatively, then absolutely: the second run resumes the cache
    (before: refused as a different corpus and teacher). Files of the folder no reader handles are counted and
    named (before: skipped silently)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "docs.jsonl", BAD_INPUT_DOCS[:4])
    (corpus / "extra.csv").write_text("text\nnot read\n")
    (corpus / "README.txt").write_text("not read either")
    monkeypatch.chdir(tmp_path)
    teacher = os.path.relpath(gpt2_bl_model, tmp_path)
    said: list[str] = []
    first = build_teacher_cache(_config(teacher, "corpus", tmp_path / "cache"), progress=said.append)
    skipped = [m for m in said if m.startswith("skipped 2 file(s) of the corpus folder")]
    assert len(skipped) == 1 and "extra.csv" in skipped[0] and "README.txt" in skipped[0], said
    stats = open_cache(tmp_path / "cache").manifest["corpus"]["stats"]
    assert stats["skipped_files"] == 2
    again = build_teacher_cache(_config(gpt2_bl_model, corpus, tmp_path / "cache"))
    assert again.shards_reused == again.shards_total == first.shards_total and again.shards_written == 0


def test_corrupted_shard_and_wrong_version_are_refused(ray_local, tmp_path, gpt2_bl_model):
    data = write_jsonl(tmp_path / "c.jsonl", BAD_INPUT_DOCS[:5])
    build_teacher_cache(_config(gpt2_bl_model, data, tmp_path / "cache"))
    shard = tmp_path / "cache" / "shards" / store.shard_name(0)
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    open_cache(tmp_path / "cache")  # same size: the cheap open (markers and sizes) does not read the bytes
    with pytest.raises(CacheIntegrityError, match=f"{store.shard_name(0)}: checksum"):
        open_cache(tmp_path / "cache", checksums=True)
    manifest_file = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["format_version"] = 99
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(CacheIntegrityError, match="format version 99"):
        open_cache(tmp_path / "cache", verify=False)


def test_bad_document_error_names_file_and_line(ray_local, tmp_path, gpt2_bl_model):
    path = tmp_path / "broken.jsonl"
    path.write_bytes(b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "bad \xff byte"}\n')
    with pytest.raises(TeacherCacheError, match=r"broken\.jsonl:2: invalid UTF-8"):
        build_teacher_cache(_config(gpt2_bl_model, path, tmp_path / "cache"))


def test_a_bad_line_mid_file_is_named_and_written_shards_are_kept(ray_local, tmp_path, gpt2_bl_model):
    """The error of a shard that starts mid-file names the file's own line number; shards written before it
    stay (verified), and the run is resumable once the input is fixed... by --overwrite (the file changed)."""
    docs = [{"id": f"d{i}", "text": f"document number {i}"} for i in range(8)]
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    with open(path, "ab") as f:
        f.write(b'{"id": "bad", "text": "bad \xff byte"}\n')
    out = tmp_path / "cache"
    with pytest.raises(TeacherCacheError, match=r"c\.jsonl:9: invalid UTF-8"):
        build_teacher_cache(_config(gpt2_bl_model, path, out, shard_size=1))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["state"] == "in_progress" and manifest["num_shards"] == 9
    for marker in (out / "shards").glob("*.done.json"):  # whatever was written is complete and kept
        info = json.loads(marker.read_text())
        assert (out / info["file"]).stat().st_size == info["bytes"]


def test_corpus_on_s3_gives_the_same_cache_as_a_local_file(ray_local, tmp_path, gpt2_bl_model, s3_bucket):
    from alm_pipeline.storage import location

    data = write_jsonl(tmp_path / "c.jsonl", BAD_INPUT_DOCS[:6])
    location(f"{s3_bucket}/corpus.jsonl").write_bytes(data.read_bytes())
    build_teacher_cache(_config(gpt2_bl_model, data, tmp_path / "local", shard_size=200))
    summary = build_teacher_cache(
        _config(gpt2_bl_model, f"{s3_bucket}/corpus.jsonl", tmp_path / "s3", shard_size=200)
    )
    assert summary.shards_total > 1
    manifest = json.loads((tmp_path / "s3" / "manifest.json").read_text())
    assert manifest["corpus"]["path"] == f"{s3_bucket}/corpus.jsonl"
    got, expected = cache_rows(tmp_path / "s3"), cache_rows(tmp_path / "local")
    assert [(r["doc_id"], r["text"], r["token_ids"]) for r in got] == [
        (r["doc_id"], r["text"], r["token_ids"]) for r in expected
    ]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(np.array(a["logprob"]), np.array(b["logprob"]))
    missing = f"{s3_bucket}/nope.jsonl"
    with pytest.raises(TeacherCacheError, match=rf"{missing}: no such file"):
        build_teacher_cache(_config(gpt2_bl_model, missing, tmp_path / "missing"))
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*"))


def test_a_changed_corpus_file_is_refused_by_name_and_a_resume_reads_nothing(
    ray_local, tmp_path, gpt2_bl_model
):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", BAD_INPUT_DOCS[:3])
    b = write_jsonl(folder / "b.jsonl", BAD_INPUT_DOCS[4:6])
    out = tmp_path / "cache"
    first = build_teacher_cache(_config(gpt2_bl_model, folder, out))
    # same size and mtime, other bytes: the listing is unchanged, so a resume must not read the corpus at all
    # (reading it would fail on the broken JSON)
    stat = b.stat()
    b.write_bytes(b"{" * stat.st_size)
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = build_teacher_cache(_config(gpt2_bl_model, folder, out))
    assert again.shards_reused == again.shards_total == first.shards_total and again.shards_written == 0
    # a real change (size or mtime) is refused before any model loads, naming the file
    write_jsonl(b, BAD_INPUT_DOCS[4:7])
    with pytest.raises(TeacherCacheError, match=r"(?s)corpus\.listing_sha256.*b\.jsonl: changed \(size"):
        build_teacher_cache(_config(gpt2_bl_model, folder, out))


def test_duplicate_ids_across_shards_need_the_global_check(ray_local, tmp_path, gpt2_bl_model):
    docs = [{"id": "x", "text": "first"}, {"id": "y", "text": "second"}, {"id": "x", "text": "third"}]
    data = write_jsonl(tmp_path / "c.jsonl", docs)
    summary = build_teacher_cache(_config(gpt2_bl_model, data, tmp_path / "plain", shard_size=1))
    assert summary.shards_total == 3 and summary.docs == 3  # per-shard checks only
    with pytest.raises(
        TeacherCacheError,
        match=r"(?s)same document id occurs more than once.*'x': 2 times, in .*c\.jsonl \(bytes 0-",
    ):
        build_teacher_cache(
            _config(gpt2_bl_model, data, tmp_path / "checked", shard_size=1, check_duplicate_ids=True)
        )
    unique = write_jsonl(tmp_path / "u.jsonl", docs[:2])
    ok = build_teacher_cache(
        _config(gpt2_bl_model, unique, tmp_path / "unique", shard_size=1, check_duplicate_ids=True)
    )
    assert ok.docs == 2


def test_max_docs_reads_only_the_documents_it_needs(ray_local, tmp_path, gpt2_bl_model):
    from alm_pipeline.pipeline.corpus import CorpusConfig

    data = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": f"document {i}"} for i in range(6)])
    with open(data, "ab") as f:
        f.write(b"not json at all\n")
    config = _config(gpt2_bl_model, data, tmp_path / "cache", shard_size=40)
    config = dataclasses.replace(config, corpus=CorpusConfig(path=str(data), id_field="id", limit=4))
    summary = build_teacher_cache(config)
    assert [r["doc_id"] for r in cache_rows(tmp_path / "cache")] == ["d0", "d1", "d2", "d3"]
    assert summary.docs == 4


def test_a_teacher_whose_tokenizer_emits_unknown_tokens_is_refused_before_scoring(
    ray_local, tmp_path, tokenizer_dirs, assets_dir
):
    """A teacher tokenizer without byte fallback turns characters outside its vocabulary into <unk>: refused up
    front naming the reason, nothing written. Before: the run failed at the first such document, after scoring."""
    from tests import factories

    model = factories.make_model("gpt2", tokenizer_dirs["char"], assets_dir / "gpt2_char")
    data = write_jsonl(
        tmp_path / "c.jsonl", [{"id": "ok", "text": "fine"}, {"id": "omega", "text": "Ω here"}]
    )
    with pytest.raises(TeacherCacheError, match=r"turns characters outside its vocabulary into '<unk>'"):
        build_teacher_cache(_config(model, data, tmp_path / "cache"))
    assert not (tmp_path / "cache" / "manifest.json").exists()


@pytest.mark.slow
def test_resume_after_kill_gives_identical_cache(ray_local, tmp_path, assets_dir, tokenizer_dirs):
    """kill -9 the CLI mid-run, re-run the same command: same rows, same values as an uninterrupted run."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # a slower teacher so that a run takes several seconds and can be killed between shards
    model_dir = assets_dir / "llama_slow"
    if not model_dir.exists():
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dirs["byte_level"]))
        torch.manual_seed(1)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=2048,
        )
        LlamaForCausalLM(cfg).save_pretrained(str(model_dir))
        tok.save_pretrained(str(model_dir))
    docs = [
        {"id": f"doc{i:02d}", "text": f"Document {i}: " + "several words of text here. " * 60}
        for i in range(16)
    ]
    data = write_jsonl(tmp_path / "c.jsonl", docs)
    kw = {"max_length": 384, "shard_size": 3000}  # two ~1.7 kB documents per shard
    build_teacher_cache(_config(model_dir, data, tmp_path / "reference", **kw))
    expected = cache_rows(tmp_path / "reference")

    out = tmp_path / "resumed"
    cmd = [
        sys.executable,
        "-m",
        "alm_pipeline.cli.main",
        "teacher-cache",
        "--teacher",
        str(model_dir),
        "--data",
        str(data),
        "--id-field",
        "id",
        "--output",
        str(out),
        "--max-length",
        "384",
        "--shard-size",
        "3000",
        "--batch-tokens",
        "512",
        "--num-cpus",
        "2",
    ]
    proc = subprocess.Popen(
        cmd,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "shards").glob("*.done.json")):
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "shards").glob("*.done.json")))
    assert 1 <= done_before < 8, done_before
    assert json.loads((out / "manifest.json").read_text())["state"] == "in_progress"

    summary = build_teacher_cache(_config(model_dir, data, out, **kw))
    assert summary.shards_reused >= done_before and summary.shards_total == 8
    got = cache_rows(out)
    assert [r["doc_id"] for r in got] == [r["doc_id"] for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert a["token_ids"] == b["token_ids"] and a["offsets"] == b["offsets"] and a["text"] == b["text"]
        np.testing.assert_array_equal(np.array(a["logprob"]), np.array(b["logprob"]))
        np.testing.assert_array_equal(np.array(a["boundary_logprob"]), np.array(b["boundary_logprob"]))
    assert not (out / "_staging").exists()
    # parquet files are readable by plain pyarrow with the documented columns
    table = pq.read_table(out / "shards" / store.shard_name(0))
    assert table.column_names == [
        "doc_id",
        "text",
        "token_ids",
        "offsets",
        "logprob",
        "boundary_logprob",
        "truncated",
        "messages",  # the chat columns: null for plain texts
        "content_spans",
        "token_message",
    ]


def test_a_failing_scoring_actor_is_retried_on_a_fresh_one_then_named(ray_local, tmp_path, gpt2_bl_model):
    """An exception in the scoring actor (standing in for a dead engine or a CUDA error) on shard 1: the actor
    is restarted (a fresh engine) and scores the shard again, and the cache equals one without the fault;
    failing every attempt, the other shards are written and the run fails naming the shard and its error, and
    a re-run scores only that one. Orphaned temporary files of a killed writer are removed on resume."""
    docs = [{"id": f"d{i}", "text": f"document number {i} of the corpus"} for i in range(6)]
    data = write_jsonl(tmp_path / "c.jsonl", docs)
    size = shard_bytes(data, 3)
    clean = build_teacher_cache(_config(gpt2_bl_model, data, tmp_path / "clean", shard_size=size))
    assert clean.shards_total == 3

    out = tmp_path / "retried"
    summary = build_teacher_cache(
        _config(gpt2_bl_model, data, out, shard_size=size, fail_shard=1, fail_times=1)
    )
    assert (out / ".injected_failures" / "shard-1").read_text() == "1"  # the fault did happen
    assert summary.docs == clean.docs and not (out / ".attempts").exists()
    assert clean.shards_rescored == 0 and summary.shards_rescored == 1
    assert_same_cache_rows(cache_rows(out), cache_rows(tmp_path / "clean"))

    out = tmp_path / "given_up"
    with pytest.raises(
        TeacherCacheError,
        match=r"1 shard\(s\) not written: shard 1: failed 2 time\(s\), giving up: RuntimeError: injected failure 2 of 5",
    ):
        build_teacher_cache(
            _config(gpt2_bl_model, data, out, shard_size=size, fail_shard=1, fail_times=5, shard_attempts=2)
        )
    written = sorted(p.name for p in (out / "shards").glob("*.done.json"))
    assert written == ["shard-00000000.done.json", "shard-00000002.done.json"]  # the others went on
    orphan = out / "shards" / ".shard-00000001.parquet.4242.deadbeef.tmp"
    orphan.write_bytes(b"partial")
    resumed = build_teacher_cache(_config(gpt2_bl_model, data, out, shard_size=size))
    assert resumed.shards_reused == len(written) and resumed.shards_written == 3 - len(written)
    assert not orphan.exists()
    assert_same_cache_rows(cache_rows(out), cache_rows(tmp_path / "clean"))


def test_a_scoring_actor_that_dies_without_a_word_counts_as_a_failed_attempt(
    ray_local, tmp_path, gpt2_bl_model
):
    """The actor's process ends on shard 1 with no exception (a segfault, the OOM killer): the attempt is counted
    all the same, so a fresh actor scores the shard again; an actor that dies on every attempt makes the run
    stop naming the shard instead of retrying it forever."""
    docs = [{"id": f"d{i}", "text": f"document number {i} of the corpus"} for i in range(6)]
    data = write_jsonl(tmp_path / "c.jsonl", docs)
    size = shard_bytes(data, 3)
    clean = build_teacher_cache(_config(gpt2_bl_model, data, tmp_path / "clean", shard_size=size))

    out = tmp_path / "crashed_once"  # through the CLI, which reports the repeated attempt
    result = CliRunner().invoke(
        app,
        ["teacher-cache", "--teacher", str(gpt2_bl_model), "--data", str(data), "--id-field", "id"]
        + ["--output", str(out), "--max-length", "128", "--shard-size", str(size), "--batch-tokens", "512"]
        + ["--fail-shard", "1", "--fail-times", "1", "--fail-crash"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (out / ".injected_failures" / "shard-1").read_text() == "1"  # the process did die
    assert "1 scoring attempt(s) repeated" in result.output and f"{clean.docs} documents" in result.output
    assert_same_cache_rows(cache_rows(out), cache_rows(tmp_path / "clean"))

    out = tmp_path / "crashes_always"
    with pytest.raises(
        TeacherCacheError,
        match=r"1 shard\(s\) not written: shard 1: failed 2 time\(s\), giving up: the scoring actor died on it "
        r"without a word",
    ):
        build_teacher_cache(
            _config(
                gpt2_bl_model,
                data,
                out,
                shard_size=size,
                fail_shard=1,
                fail_times=9,
                fail_crash=True,
                shard_attempts=2,
            )
        )
    assert (out / ".injected_failures" / "shard-1").read_text() == "2"
    assert sorted(p.name for p in (out / "shards").glob("*.done.json")) == [
        "shard-00000000.done.json",
        "shard-00000002.done.json",
    ]


def test_concurrency_larger_than_the_cluster_starts_with_what_fits(ray_local, tmp_path, gpt2_bl_model):
    """Three replicas of 0.75 CPU on a 2-CPU local Ray: the run starts with the two that fit and says so; a replica
    that no node can hold (a resource the cluster lacks) is refused before anything runs."""
    data = write_jsonl(
        tmp_path / "c.jsonl", [{"id": f"d{i}", "text": f"document {i} " * 5} for i in range(6)]
    )
    said: list[str] = []
    summary = build_teacher_cache(
        _config(
            gpt2_bl_model,
            data,
            tmp_path / "cache",
            concurrency=3,
            num_cpus_per_actor=0.75,
            shard_size=shard_bytes(data, 3),
        ),
        progress=said.append,
    )
    assert summary.shards_written == 3
    assert any("--concurrency 3: the Ray cluster can place 2 teacher replica(s) now" in m for m in said), said
    assert any("starting with 2" in m and "growing" not in m for m in said), said
    with pytest.raises(
        TeacherCacheError,
        match=r"no node of the local Ray instance can hold a teacher replica \(needs CPU=1, accel=1\)",
    ):
        build_teacher_cache(_config(gpt2_bl_model, data, tmp_path / "other", actor_resources=("accel=1",)))
    assert not (tmp_path / "other" / "shards").exists() or not any((tmp_path / "other" / "shards").iterdir())


def test_a_shard_longer_than_ray_datas_no_progress_guard_is_not_cut_off(ray_local, tmp_path, gpt2_bl_model):
    """Ray Data ends an execution in which no block moves for execution_no_progress_timeout_s (30 min by default);
    one shard can take longer on a CPU (its actor starting, then scoring, with nothing else moving). The stages
    turn that guard off for their runs: here it is set to 1 s, far below the actor's start-up, and the run
    completes. (With the guard left on, this run fails with Ray Data's ExecutionTimeoutError.)"""
    import ray.data

    data = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": "one shard, scored slowly " * 8}])
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_no_progress_timeout_s
    ctx.execution_no_progress_timeout_s = 1.0
    try:
        summary = build_teacher_cache(_config(gpt2_bl_model, data, tmp_path / "cache"))
    finally:
        ctx.execution_no_progress_timeout_s = before
    assert summary.shards_written == 1 and summary.docs == 1
