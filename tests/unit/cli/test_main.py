"""The command line (alm_pipeline.cli.main): help shows the defaults, errors are clear, inspect refuses what is
not a cache, quickstart checks its settings before anything runs."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from alm_pipeline.cli.main import app
from alm_pipeline.locking import LOCK_FILE
from alm_pipeline.quickstart import QuickstartConfig
from tests.factories import lock_held_elsewhere, write_jsonl

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
    with pytest.raises(ValueError, match="--eval-max-bytes must be an integer >= 64"):
        QuickstartConfig(eval_max_bytes=10)
    with pytest.raises(ValueError, match="--steps must be an integer >= 1"):
        QuickstartConfig(steps=0)
    out = tmp_path / "never"
    result = runner.invoke(
        app, ["quickstart", "--output", str(out), "--student", "bytes", "--train-student", "gpt2-tokenizer"]
    )
    assert result.exit_code == 2 and "is not one of the student tokenizers" in result.output
    assert not out.exists()


BAD_QUICKSTART_OPTIONS = [
    (["--max-docs", "0"], "--max-docs must be an integer >= 1, got 0"),
    (["--max-length", "1"], "--max-length must be an integer >= 2, got 1"),
    (["--steps", "-3"], "--steps must be an integer >= 1, got -3"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--eval-docs", "0"], "--eval-docs must be an integer >= 1, got 0"),
    (["--eval-max-bytes", "10"], "--eval-max-bytes must be an integer >= 64, got 10"),
    (["--gamma", "1.5"], "--gamma must be a number in [0, 1], got 1.5"),
    (["--gamma", "nan"], "--gamma must be a number in [0, 1], got nan"),
    (["--num-cpus-per-actor", "0"], "--num-cpus-per-actor must be a finite number > 0, got 0.0"),
    (["--lr", "-1e-4"], "--lr must be a finite number > 0, got -0.0001"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--output", ""], "--output must not be empty"),
    (
        ["--train-student", "gpt2-tokenizer"],
        "--train-student 'gpt2-tokenizer' is not one of the student tokenizers",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_QUICKSTART_OPTIONS)
def test_quickstart_options_are_checked_before_anything_runs(tmp_path, args, message):
    """Each bad quickstart option is a one-line CLI error (exit 2) naming it, before Ray starts or any folder is
    made (before, --gamma 1.5, --lr -1e-4 and --num-cpus-per-actor 0 were accepted and failed later or not at all)."""
    import ray

    out = tmp_path / "never"
    ray_before = ray.is_initialized()
    base = ["quickstart", "--student", "bytes", "--output", str(out)]
    result = runner.invoke(app, [*base, *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists() and ray.is_initialized() == ray_before


BAD_TEACHER_CACHE_OPTIONS = [
    (["--max-length", "-5"], "--max-length must be an integer >= 2, got -5"),
    (["--max-length", "0"], "--max-length must be an integer >= 2, got 0"),
    (["--shard-size", "0"], "--shard-size must be an integer >= 1, got 0"),
    (["--concurrency", "0"], "--concurrency must be an integer >= 1 or MIN,MAX (integers >= 1), got '0'"),
    (["--concurrency", "4,2"], "--concurrency MIN,MAX needs MIN <= MAX, got '4,2'"),
    (["--vllm-executor", "slurm"], "unknown --vllm-executor 'slurm'"),
    (["--batch-tokens", "0"], "--batch-tokens must be an integer >= 1"),
    (["--engine", "jax"], "unknown --engine 'jax'"),
    (["--dtype", "int8"], "unknown --dtype 'int8'"),
    (["--boundary-mode", "approx"], "unknown --boundary-mode 'approx'"),
    (["--boundary-topk", "0"], "--boundary-topk must be an integer >= 1"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size must be an integer >= 1"),
    (["--num-gpus-per-actor", "-1"], "--num-gpus-per-actor must be a number >= 0"),
    (["--num-cpus-per-actor", "0"], "--num-cpus-per-actor must be a number >= 0.01"),
    (["--threads-per-actor", "0"], "--threads-per-actor must be an integer >= 1"),
    (["--actor-resource", "accel"], "--actor-resource must be NAME=AMOUNT with AMOUNT > 0, got 'accel'"),
    (["--actor-resource", "GPU=1"], "--actor-resource 'GPU=1': CPUs and GPUs have their own options"),
    (["--placement-timeout", "0"], "--placement-timeout must be a finite number > 0"),
    (["--vllm-gpu-memory-utilization", "1.5"], "--vllm-gpu-memory-utilization must be a number in [0.01, 1]"),
    (["--vllm-max-num-batched-tokens", "0"], "--vllm-max-num-batched-tokens must be an integer >= 1"),
    (["--max-docs", "0"], "--max-docs must be an integer >= 1"),
    (["--num-cpus", "0"], "--num-cpus must be an integer >= 1"),
    (["--chat-template", "/nope.jinja"], "--chat-template /nope.jinja: no such file"),
    (["--hold-writes", "s3://bucket/gate"], "--hold-writes must be a local path, got 's3://bucket/gate'"),
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
        (["--gamma", "1.5"], "--gamma must be a number in [0, 1]"),
        (["--num-cpus", "0"], "--num-cpus must be an integer >= 1"),
        (["--address", "nowhere"], "--address must be auto, HOST:PORT or ray://HOST:PORT"),
        (["--loss-on", "everything"], "unknown --loss-on 'everything'"),
        (["--chat-template", "/nope.jinja"], "--chat-template /nope.jinja: no such file"),
        ([], "no-cache: not a teacher cache (no manifest.json)"),
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


def _error_line(output: str) -> str:
    """The command's one error line (progress lines may precede it; a traceback must not)."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    return errors[0]


def test_teacher_that_cannot_load_is_refused_before_any_work(tmp_path, gpt2_bl_model, tokenizer_dirs):
    """A teacher folder with only a tokenizer, or with a truncated model.safetensors, is a one-line error naming it
    before the corpus is staged or Ray starts (before: an ActorDiedError after staging, in 130-230 log lines)."""
    import ray

    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "a document"}])
    truncated = tmp_path / "truncated"
    shutil.copytree(gpt2_bl_model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    ray_before = ray.is_initialized()
    for teacher, message in (
        (tokenizer_dirs["byte_level"], "not a model folder (no config.json"),
        (truncated, "model.safetensors is corrupt or truncated"),
    ):
        out = tmp_path / f"out-{teacher.name}"
        result = runner.invoke(
            app, ["teacher-cache", "--teacher", str(teacher), "--data", str(data), "--output", str(out)]
        )
        assert result.exit_code == 2, result.output
        assert message in _error_line(result.output) and str(teacher) in result.output
        assert not out.exists() and ray.is_initialized() == ray_before


def _held_output_commands(tmp_path, gpt2_bl_model) -> dict[str, list[str]]:
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "a document"}])
    return {
        "teacher-cache": ["teacher-cache", "--teacher", str(gpt2_bl_model), "--data", str(data), "--output"],
        "quickstart": ["quickstart", "--student", "bytes", "--output"],
        "evaluate": ["evaluate", "--model", str(gpt2_bl_model), "--run-dir"],
    }


@pytest.mark.parametrize("command", ["teacher-cache", "quickstart", "evaluate"])
def test_an_output_another_process_writes_is_refused_at_once(tmp_path, gpt2_bl_model, command):
    """While another process holds the output (here a real one holding its lock), the command is refused at once
    with a one-line error naming the holder, and writes nothing there (align: tests/integration/
    test_align_stage.py; train: tests/unit/cli/test_train_cmd.py and, with two real runs, tests/integration/
    test_train.py)."""
    import ray

    out = tmp_path / "out"
    args = _held_output_commands(tmp_path, gpt2_bl_model)[command]
    ray_before = ray.is_initialized()
    with lock_held_elsewhere(out, "quickstart") as holder:
        before = sorted(p.name for p in out.iterdir())
        result = runner.invoke(app, [*args, str(out)])
        after = sorted(p.name for p in out.iterdir())
    assert result.exit_code == 2, result.output
    line = _error_line(result.output)
    assert f"{out} is being written by another run: alm-pipeline quickstart (pid {holder.pid}" in line
    assert after == before == [LOCK_FILE] and ray.is_initialized() == ray_before


def test_an_output_that_is_a_file_is_a_one_line_error(tmp_path, gpt2_bl_model):
    """Before: a raw Python traceback (exit 1) once the command first wrote there."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for command, args in _held_output_commands(tmp_path, gpt2_bl_model).items():
        result = runner.invoke(app, [*args, str(a_file)])
        assert result.exit_code == 2, (command, result.output)
        assert f"{a_file}: exists and is not a folder" in _error_line(result.output)
        assert a_file.read_text() == "not a folder"


def _read_only_dir_supported(tmp_path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    script = f"mount -t tmpfs -o ro tmpfs {probe} && touch {probe}/x"
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True)
    return done.returncode != 0 and "Read-only file system" in done.stderr


def test_an_output_on_a_read_only_filesystem_is_a_one_line_error(tmp_path, gpt2_bl_model):
    """A real read-only filesystem (a tmpfs mounted read-only in a private mount namespace): one error line, exit 2
    (before: a traceback from the corpus staging, exit 1)."""
    if shutil.which("unshare") is None or not _read_only_dir_supported(tmp_path):
        pytest.skip("needs `unshare -m` and mount (root in a container)")
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "a document"}])
    ro = tmp_path / "ro"
    ro.mkdir()
    cli = [sys.executable, "-m", "alm_pipeline.cli.main", "teacher-cache", "--teacher", str(gpt2_bl_model)]
    cli += ["--data", str(data), "--output", str(ro / "cache")]
    script = f"mount -t tmpfs -o ro tmpfs {ro} && exec {shlex.join(cli)}"
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"{ro / 'cache'}: cannot write the output here (Read-only file system)" in _error_line(done.stderr)


def test_inspect_tokenizer_reports_the_classification_and_the_texts_it_cannot_reproduce(tokenizer_dirs):
    """`inspect --tokenizer`: exit 0 for a tokenizer that reproduces every sample; 1 with the failing sample named
    (a text of the user's own with a character outside the char tokenizer's vocabulary); JSON carries the same."""
    ok = runner.invoke(app, ["inspect", "--tokenizer", str(tokenizer_dirs["sentencepiece"])])
    assert ok.exit_code == 0, ok.output
    assert "SentencePiece, legacy" in ok.output and "teacher    yes" in ok.output
    assert "samples    14/14 reproduced byte for byte" in ok.output
    limited = runner.invoke(
        app, ["inspect", "--tokenizer", str(tokenizer_dirs["char"]), "--text", "snow \u2603", "--json"]
    )
    assert limited.exit_code == 1, limited.output
    report = json.loads(limited.output)
    failed = {s["name"] for s in report["samples"] if not s["ok"]}
    assert "--text 1" in failed and "plain" not in failed, failed
    assert report["as_teacher"].startswith("no: characters outside its vocabulary become '<unk>'")


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect"], "give a cache or aligned set to inspect, or --tokenizer T"),
        (
            ["inspect", "somewhere", "--tokenizer", "bytes"],
            "give a cache or aligned set to inspect, or --tokenizer T",
        ),
        (["inspect", "somewhere", "--text", "x"], "--text goes with --tokenizer"),
    ],
)
def test_inspect_needs_either_a_cache_or_a_tokenizer(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_inspect_tokenizer_refuses_a_missing_folder_with_exit_2(tmp_path):
    result = runner.invoke(app, ["inspect", "--tokenizer", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "nowhere: no such file or folder" in result.output
