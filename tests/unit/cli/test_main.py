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


BAD_TEACHER_CACHE_OPTIONS = [
    (["--max-length", "-5"], "--max-length must be an integer >= 2, got -5"),
    (["--max-length", "0"], "--max-length must be an integer >= 2, got 0"),
    (["--shard-size", "0"], "--shard-size must be an integer >= 1, got 0"),
    (["--concurrency", "0"], "--concurrency must be an integer >= 1, got 0"),
    (["--batch-tokens", "0"], "--batch-tokens must be an integer >= 1"),
    (["--engine", "jax"], "unknown --engine 'jax'"),
    (["--dtype", "int8"], "unknown --dtype 'int8'"),
    (["--boundary-mode", "approx"], "unknown --boundary-mode 'approx'"),
    (["--boundary-topk", "0"], "--boundary-topk must be an integer >= 1"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size must be an integer >= 1"),
    (["--num-gpus-per-actor", "-1"], "--num-gpus-per-actor must be a number >= 0"),
    (["--num-cpus-per-actor", "0"], "--num-cpus-per-actor must be a number >= 0.01"),
    (["--threads-per-actor", "0"], "--threads-per-actor must be an integer >= 1"),
    (["--vllm-gpu-memory-utilization", "1.5"], "--vllm-gpu-memory-utilization must be a number in [0.01, 1]"),
    (["--vllm-max-num-batched-tokens", "0"], "--vllm-max-num-batched-tokens must be an integer >= 1"),
    (["--max-docs", "0"], "--max-docs must be an integer >= 1"),
    (["--num-cpus", "0"], "--num-cpus must be an integer >= 1"),
]


@pytest.mark.parametrize(("args", "message"), BAD_TEACHER_CACHE_OPTIONS)
def test_teacher_cache_options_are_checked_before_anything_runs(tmp_path, args, message):
    """Each bad teacher-cache option is a one-line CLI error (exit 2) naming it, from the config itself — before
    the teacher is resolved, the corpus read or Ray started (the output folder is never created). Before, e.g.
    --max-length -5 silently dropped 5 tokens of every document and --shard-size 0 made one shard."""
    import ray

    out = tmp_path / "never"
    ray_before = ray.is_initialized()  # another test of the session may have started one
    result = runner.invoke(app, ["teacher-cache", "--teacher", "no-such-model", "--output", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists() and ray.is_initialized() == ray_before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-student-length", "0"], "--max-student-length must be an integer >= 1"),
        (["--min-coverage", "1.5"], "--min-coverage must be a number in [0, 1]"),
    ],
)
def test_align_options_are_checked_before_anything_runs(tmp_path, args, message):
    out = tmp_path / "never"
    result = runner.invoke(
        app,
        [
            "align",
            "--cache",
            str(tmp_path / "no-cache"),
            "--student-tokenizer",
            "bytes",
            "--output",
            str(out),
            *args,
        ],
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and not out.exists()
