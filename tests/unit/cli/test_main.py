"""The command line: help shows the defaults, errors are clear, inspect and quickstart work end to end."""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Annotated, Literal

import pytest
import typer
from typer.testing import CliRunner

from alm_pipeline.cli.main import app
from alm_pipeline.cli.options import build_config, config_command, config_options
from alm_pipeline.pipeline.align_stage import AlignConfig, AlignSettings
from alm_pipeline.pipeline.corpus import CorpusConfig
from alm_pipeline.pipeline.ray_utils import RayConfig
from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig
from alm_pipeline.quickstart import QuickstartConfig
from alm_pipeline.trainer.config import (
    CheckpointConfig,
    CombineConfig,
    DataConfig,
    LossConfig,
    StudentSpec,
    TrainConfig,
)

runner = CliRunner()


def test_help_lists_commands_and_defaults():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("teacher-cache", "align", "inspect", "quickstart"):
        assert command in result.output
    result = runner.invoke(app, ["teacher-cache", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "smollm2-135m" in result.output and "1024" in result.output


def _capturing_app(cls) -> tuple[typer.Typer, list]:
    captured: list = []
    app_ = typer.Typer()
    app_.command("run")(config_command(cls)(lambda config: captured.append(config)))
    app_.command("other")(lambda: None)
    return app_, captured


def test_generated_options_build_what_the_python_api_builds():
    # every field of every command's config is an option with a help text
    for cls in (TrainConfig, TeacherCacheConfig, AlignConfig, QuickstartConfig):
        assert all(opt.help for opt in config_options(cls)), cls
    tc_app, got = _capturing_app(TeacherCacheConfig)
    assert runner.invoke(tc_app, ["run"]).exit_code == 0
    assert got[-1] == TeacherCacheConfig()  # the CLI's defaults are the dataclasses'
    args = ["run", "--teacher", "t", "--data", "c.jsonl", "--max-docs", "5", "--tensor-parallel-size", "2"]
    result = runner.invoke(tc_app, [*args, "--verbose", "--vllm-enforce-eager", "--num-cpus", "3"])
    assert result.exit_code == 0, result.output
    assert got[-1] == TeacherCacheConfig(
        teacher="t",
        corpus=CorpusConfig(path="c.jsonl", limit=5),
        tensor_parallel_size=2,
        vllm_enforce_eager=True,
        ray=RayConfig(num_cpus=3, log_to_driver=True),
    )
    # derived in the config, so the API and the CLI agree: a replica holds its tensor-parallel GPUs
    assert got[-1].num_gpus_per_actor == TeacherCacheConfig(tensor_parallel_size=2).num_gpus_per_actor == 2.0
    assert CorpusConfig().path.endswith("shakespeare.jsonl")

    align_app, got = _capturing_app(AlignConfig)
    args = [
        "run",
        "--cache",
        "c",
        "--student-tokenizer",
        "bytes",
        "--student-tokenizer",
        "gpt2",
        "--no-debias",
    ]
    assert runner.invoke(align_app, args).exit_code == 0
    assert got[-1] == AlignConfig(
        cache="c", student_tokenizers=("bytes", "gpt2"), settings=AlignSettings(debias=False)
    )
    assert (
        runner.invoke(align_app, ["run", "--student-tokenizer", "bytes"]).exit_code == 2
    )  # --cache required

    train_app, got = _capturing_app(TrainConfig)
    args = ["run", "--aligned", "a", "--init-from", "m", "--loss-combination", "fixed", "--next-token-loss"]
    result = runner.invoke(train_app, [*args, "--no-debias", "--tau", "5", "--keep-checkpoints", "0"])
    assert result.exit_code == 0, result.output
    assert got[-1] == TrainConfig(
        data=DataConfig(aligned="a"),
        student=StudentSpec(init_from="m"),
        loss=LossConfig(next_token_loss=True, debias=False, tau=5.0),
        combine=CombineConfig(method="fixed"),
        checkpoint=CheckpointConfig(keep=0),
    )
    assert got[-1].checkpoint.keep is None  # 0 = keep all
    bad = runner.invoke(train_app, ["run", "--aligned", "a", "--init-from", "m", "--distance", "l2"])
    assert bad.exit_code == 2 and "l2" in bad.output
    with pytest.raises(ValueError, match="unknown TrainConfig option"):
        build_config(TrainConfig, {"aligned": "a", "student": "x", "learning_rate": 1.0})


@dataclasses.dataclass(frozen=True)
class _Toy:
    run_dir: str = dataclasses.field(metadata={"help": "A folder", "argument": True})
    mode: Literal["a", "b"] = dataclasses.field(default="a", metadata={"help": "The mode"})
    names: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "Names", "cli": "name"})


def test_config_command_arguments_choices_repeats_and_extra_options():
    got = []
    extra = inspect.Parameter(
        "output_json",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[str | None, typer.Option(help="Also write JSON here")],
        default=None,
    )
    toy_app = typer.Typer()
    toy_app.command("run")(
        config_command(_Toy, extras=[extra])(lambda config, output_json: got.append((config, output_json)))
    )
    toy_app.command("other")(lambda: None)
    result = runner.invoke(
        toy_app, ["run", "d", "--mode", "b", "--name", "x", "--name", "y", "--output-json", "o"]
    )
    assert result.exit_code == 0, result.output
    assert got == [(_Toy(run_dir="d", mode="b", names=("x", "y")), "o")]
    assert runner.invoke(toy_app, ["run", "d", "--mode", "c"]).exit_code == 2
    assert runner.invoke(toy_app, ["run"]).exit_code == 2  # the argument is required


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
