"""Chat data through the whole chain, on the bundled ``data/chat.jsonl`` (16 conversations, 2 plain rows) and the
real chat templates available offline: ``teacher-cache`` renders with the teacher's template (SmolLM2's ChatML),
``align`` renders the same messages with each student's (Qwen3's own, a Mistral-style file, the bytes template),
and training streamed from the cache equals training on the aligned set."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from alm_pipeline.assets import asset_path, is_installed
from alm_pipeline.cache.aligned import open_aligned_set
from alm_pipeline.cache.teacher import open_cache
from alm_pipeline.cli.main import app
from alm_pipeline.pipeline.chat import messages_from_json
from alm_pipeline.trainer.config import DataConfig
from alm_pipeline.trainer.driver import train_local
from alm_pipeline.trainer.metrics import read_metrics_csv
from tests.factories import MISTRAL_TEMPLATE, losses, make_model, train_config, write_jsonl

pytestmark = pytest.mark.ray

CHAT_CORPUS = Path(__file__).resolve().parents[2] / "alm_pipeline" / "data" / "chat.jsonl"


def _need(*names: str) -> None:
    for name in names:
        if not is_installed(name):
            pytest.skip(f"{name} is not installed here (scripts/setup.sh installs it)")


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def chat_cache(ray_local, tmp_path_factory):
    _need("smollm2-135m")
    root = tmp_path_factory.mktemp("chat_chain")
    teacher = make_model("llama", asset_path("smollm2-135m"), root / "teacher")
    _cli("teacher-cache", "--teacher", str(teacher), "--data", str(CHAT_CORPUS), "--id-field", "id",
         "--output", str(root / "cache"), "--max-length", "64", "--batch-tokens", "512")  # fmt: skip
    return teacher, root / "cache"


def test_the_cache_stores_the_teachers_rendering_and_each_contents_span(chat_cache):
    from transformers import AutoTokenizer

    teacher, cache_dir = chat_cache
    cache = open_cache(cache_dir)
    assert cache.has_chat_columns and cache.chat_docs == 16
    assert cache.manifest["chat_template"]["sha256"]
    tok = AutoTokenizer.from_pretrained(str(teacher))
    rows = [r for t in cache.iter_tables() for r in t.to_pylist()]
    assert len(rows) == 18
    truncated = 0
    for row in rows:
        if row["messages"] is None:  # plain rows: no chat columns
            assert row["doc_id"].startswith("plain") and row["content_spans"] is None
            continue
        messages = messages_from_json(row["messages"])
        rendered = tok.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], tokenize=False
        )
        assert rendered.startswith(row["text"]), row["doc_id"]
        truncated += rendered != row["text"]
        data = row["text"].encode("utf-8")
        spans = np.asarray(row["content_spans"]).reshape(-1, 2)
        for m, (a, b) in zip(messages, spans, strict=True):
            assert data[a:b] == m.content.encode("utf-8")[: b - a], row["doc_id"]
        # per token: the message it belongs to, -1 for the template's own tokens (ChatML's headers)
        owners = np.asarray(row["token_message"])
        assert len(owners) == len(row["token_ids"]) and (owners == -1).any() and (owners >= 0).any()
        assert tok.decode(row["token_ids"]) == row["text"], row["doc_id"]
    assert truncated >= 1  # the longest conversations are cut at --max-length 64: the truncated case occurs


def test_align_renders_with_each_students_template_and_reports_the_pairing(chat_cache, tmp_path):
    _need("qwen3-tokenizer", "mistral-tokenizer")
    _, cache_dir = chat_cache
    (tmp_path / "mistral.jinja").write_text(MISTRAL_TEMPLATE)
    out = tmp_path / "aligned"
    output = _cli("align", "--cache", str(cache_dir), "--student-tokenizer", "bytes", "--student-tokenizer",
         "qwen3-tokenizer", "--student-tokenizer", "mistral-tokenizer", "--chat-template",
         str(tmp_path / "mistral.jinja"), "--output", str(out))  # fmt: skip
    for name in ("bytes", "qwen3-tokenizer", "mistral-tokenizer"):
        manifest = json.loads((out / name / "manifest.json").read_text())
        chat = manifest["coverage"]["chat"]
        assert chat["conversations"] == 16 and chat["loss_on"] == "assistant", name
        # every point between two messages holds a template run on both sides; all of them pair up
        assert chat["paired_template_runs"] == chat["teacher_template_runs"] > 16, name
        assert 0 < chat["loss_bytes"] < chat["content_bytes"], name  # only assistant content counts
        assert chat["coverage"] >= (0.99 if name == "bytes" else 0.95), (name, chat)
        assert sum(s.rows for s in open_aligned_set(out / name).shards) == 18, name
    # the command's report says it too, per student
    assert output.count("conversations: 16, coverage") == 3 and "left out 0 of the teacher's" in output

    # --loss-on all: every message's content counts, and the choice is part of the aligned set's settings
    _cli("align", "--cache", str(cache_dir), "--student-tokenizer", "bytes", "--loss-on", "all", "--output",
         str(tmp_path / "all"))  # fmt: skip
    every = json.loads((tmp_path / "all" / "bytes" / "manifest.json").read_text())
    assistant = json.loads((out / "bytes" / "manifest.json").read_text())
    assert every["coverage"]["chat"]["loss_bytes"] == every["coverage"]["chat"]["content_bytes"]
    assert every["settings"]["loss_on"] == "all" and assistant["settings"]["loss_on"] == "auto"


def test_a_student_without_a_template_is_refused_before_any_work(chat_cache, tmp_path):
    _need("gpt2-tokenizer")
    _, cache_dir = chat_cache
    result = CliRunner().invoke(
        app,
        [
            "align",
            "--cache",
            str(cache_dir),
            "--student-tokenizer",
            "gpt2-tokenizer",
            "--output",
            str(tmp_path),
        ],
    )
    assert result.exit_code != 0
    assert "gpt2-tokenizer" in result.output and "no chat template" in result.output
    assert "--chat-template" in result.output
    assert not (tmp_path / "gpt2-tokenizer").exists()


def test_a_teacher_without_a_template_is_refused_naming_the_first_conversation(
    ray_local, gpt2_bl_model, tmp_path
):
    data = write_jsonl(
        tmp_path / "c.jsonl",
        [{"id": "p", "text": "plain"}, {"id": "talk", "messages": [{"role": "user", "content": "hi"}]}],
    )
    result = CliRunner().invoke(
        app,
        ["teacher-cache", "--teacher", str(gpt2_bl_model), "--data", str(data), "--id-field", "id", "--output",
         str(tmp_path / "cache")],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "talk" in result.output and "no chat template" in result.output, result.output


def test_training_streamed_from_the_chat_cache_equals_training_on_the_aligned_set(chat_cache, tmp_path):
    teacher, cache_dir = chat_cache
    _cli("align", "--cache", str(cache_dir), "--student-tokenizer", "bytes", "--output", str(tmp_path / "a"))
    kw = {"init_from": str(teacher), "steps": 3, "checkpoint_every": 3, "batch_size": 4, "shuffle_window": 4}
    ref = train_local(train_config(tmp_path / "a" / "bytes", tmp_path / "ref", **kw))
    cfg = train_config(tmp_path / "a" / "bytes", tmp_path / "stream", **kw)
    cfg = dataclasses.replace(
        cfg, data=DataConfig(cache=str(cache_dir), student_tokenizer="bytes", shuffle_window=4)
    )
    train_local(cfg)
    curve = read_metrics_csv(tmp_path / "stream" / "metrics.csv")
    assert [r["step"] for r in curve] == [1, 2, 3]
    assert np.isfinite(losses(ref.history)).all()
    np.testing.assert_allclose([r["loss"] for r in curve], losses(ref.history), rtol=1e-5)


def test_the_quickstart_chat_stage_aligns_the_students_that_have_a_template(chat_cache, tmp_path):
    _need("gpt2-tokenizer")
    teacher, _ = chat_cache
    out = tmp_path / "qs"
    output = _cli("quickstart", "--output", str(out), "--teacher", str(teacher), "--max-docs", "4",
                  "--max-length", "64", "--student", "bytes", "--student", "gpt2-tokenizer", "--no-train")  # fmt: skip
    assert "student tokenizer 'gpt2-tokenizer' has no chat template: not aligned" in output
    chat = json.loads((out / "quickstart.json").read_text())["chat"]
    assert chat["conversations"] == 16 and [a["student"] for a in chat["aligned"]] == ["bytes"]
    assert chat["aligned"][0]["coverage"] >= 0.99 and "chat aligned" in output
    assert (out / "chat" / "aligned" / "bytes" / "manifest.json").exists()
