"""Options generated from the config dataclasses (alm_pipeline.cli.options): the CLI builds what the Python API
builds; arguments, choices, repeated options and extra options."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Annotated, Literal

import pytest
import typer
from typer.testing import CliRunner

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
    # --concurrency MIN,MAX (an autoscaling pool) and the vLLM Ray executor, as the Python API takes them
    args = [
        "run",
        "--engine",
        "vllm",
        "--concurrency",
        "2,8",
        "--vllm-executor",
        "ray",
        "--dtype",
        "bfloat16",
    ]
    assert runner.invoke(tc_app, args).exit_code == 0
    assert got[-1] == TeacherCacheConfig(
        engine="vllm", concurrency="2,8", vllm_executor="ray", dtype="bfloat16"
    )
    assert (got[-1].min_concurrency, got[-1].max_concurrency, got[-1].num_gpus_per_actor) == (2, 8, 0.0)

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
