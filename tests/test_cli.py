"""The command line: help shows the defaults, errors are clear, inspect and quickstart work end to end."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alm_pipeline.cli.main import app

runner = CliRunner()


def test_help_lists_commands_and_defaults():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("teacher-cache", "align", "inspect", "quickstart"):
        assert command in result.output
    result = runner.invoke(app, ["teacher-cache", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "smollm2-135m" in result.output and "1024" in result.output


def test_bad_corpus_error_names_file_and_line(tmp_path, gpt2_bl_model):
    data = tmp_path / "c.jsonl"
    data.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    result = runner.invoke(
        app,
        [
            "teacher-cache",
            "--teacher",
            str(gpt2_bl_model),
            "--data",
            str(data),
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2
    assert "c.jsonl:2: missing text field 'text'" in result.output


def test_inspect_refuses_a_non_cache(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "not a teacher cache" in result.output


@pytest.mark.ray
def test_quickstart_reduced_end_to_end(ray_local, tmp_path, llama_sp_model, tokenizer_dirs):
    out = tmp_path / "qs"
    args = [
        "quickstart",
        "--output",
        str(out),
        "--teacher",
        str(llama_sp_model),
        "--max-docs",
        "12",
        "--max-length",
        "48",
        "--student",
        "bytes",
        "--student",
        str(tokenizer_dirs["byte_level"]),
        "--train-student",
        str(tokenizer_dirs["byte_level"]),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--eval-docs",
        "3",
        "--eval-max-bytes",
        "200",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "teacher bits/byte" in result.output
    assert (out / "cache" / "manifest.json").exists()
    for name in ("bytes", "tok_byte_level"):
        manifest = json.loads((out / "aligned" / name / "manifest.json").read_text())
        assert manifest["state"] == "complete" and manifest["coverage"]["documents_kept"] == 12
        assert (out / "aligned" / name / "tokenizer" / "tokenizer.json").exists()
    inspected = runner.invoke(app, ["inspect", str(out / "cache"), "--json"])
    summary = json.loads(inspected.output)
    assert summary["docs"] == 12 and summary["state"] == "complete" and summary["bits_per_byte"] > 0
    inspected = runner.invoke(app, ["inspect", str(out / "aligned" / "bytes")])
    assert inspected.exit_code == 0 and "coverage" in inspected.output
    # stages 3-4: a tokenizer-transfer run and bits per byte before / after, all recorded
    result_file = json.loads((out / "quickstart.json").read_text())
    training = result_file["training"]
    assert training["steps"] == 3 and training["student"] == str(tokenizer_dirs["byte_level"])
    final = out / "train" / "tok_byte_level" / "final"
    assert training["final"] == str(final) and (final / "config.json").exists()
    assert (final / "tokenizer.json").exists() and (out / "train" / "tok_byte_level" / "metrics.csv").exists()
    bpb = result_file["bits_per_byte"]
    assert set(bpb) == {"teacher", "student before", "student after"}
    for entry in bpb.values():
        assert entry["docs"] == 3 and entry["bits_per_byte"] > 0
    # the student before training is the FVT initialisation, the one after has moved
    assert bpb["student before"]["model"] == str(out / "student-init" / "tok_byte_level")
    assert bpb["student after"]["bits_per_byte"] != bpb["student before"]["bits_per_byte"]
    assert "student after" in result.output and set(result_file["seconds"]) == {
        "teacher-cache",
        "align",
        "train",
        "evaluate",
    }
    # a second run reuses everything (cache, aligned sets, the finished training run)
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "resuming: 1/1 shards" in again.output
    assert "already finished with these settings: reused" in again.output


def test_quickstart_settings_are_checked_before_anything_runs(tmp_path):
    from alm_pipeline.quickstart import QuickstartConfig

    with pytest.raises(ValueError, match="'gpt2-tokenizer' is not one of the student tokenizers .*bytes"):
        QuickstartConfig(students=("bytes",), train_student="gpt2-tokenizer")
    with pytest.raises(ValueError, match="eval_max_bytes must be >= 64"):
        QuickstartConfig(eval_max_bytes=10)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        QuickstartConfig(steps=0)
    out = tmp_path / "never"
    result = runner.invoke(
        app, ["quickstart", "--output", str(out), "--student", "bytes", "--train-student", "gpt2-tokenizer"]
    )
    assert result.exit_code == 2 and "is not one of the student tokenizers" in result.output
    assert not out.exists()
