"""The command line (alm_pipeline.cli.main): help shows the defaults, errors are clear, inspect refuses what is
not a cache, quickstart checks its settings before anything runs."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from alm_pipeline.cli.main import app
from alm_pipeline.quickstart import QuickstartConfig

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


def test_quickstart_settings_are_checked_before_anything_runs(tmp_path):

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
