"""``alm-pipeline train --help`` documents the defaults; bad option combinations are usage errors."""

from __future__ import annotations

import pytest


def test_cli_help_documents_defaults():
    import typer
    from typer.testing import CliRunner

    from alm_pipeline.cli.train_cmd import train

    app = typer.Typer()
    app.command("train")(train)
    app.command("other")(lambda: None)
    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0
    text = " ".join(out.output.split())
    for needle in (
        "binarised KL",
        "τ = 5",
        "as stored in the aligned set",
        "--next-token-loss",
        "--bf16",
        "--resume",
    ):
        assert needle in text, needle
    bad = CliRunner().invoke(app, ["train", "--student", "x"])
    assert bad.exit_code == 2 and "exactly one data source" in " ".join(bad.output.split())
    bad = CliRunner().invoke(app, ["train", "--aligned", "a", "--student", "x", "--strategy", "zero3"])
    assert bad.exit_code == 2 and "zero3" in bad.output


# One row per option of `alm-pipeline train` (every field of TrainConfig's tree): arguments, with {aligned},
# {model}, {tok}, {file} and {missing} filled in, and a piece of the error. "+" rows add to the valid base command
# (--aligned {aligned} --init-from {model} --output OUT); the others replace its data and student arguments.
# Boolean flags (--packing, --bf16, --resume, ...) take no value: a value is click's usage error naming the flag.
BAD_TRAIN_OPTIONS = [
    # data
    (["--aligned", "{missing}", "--init-from", "{model}"], "--aligned {missing}: not an aligned set"),
    (["+", "--cache", "{missing}"], "give exactly one data source"),
    (["--cache", "{missing}", "--student-tokenizer", "bytes", "--init-from", "{model}"], "--cache {missing}"),
    (["--cache", "{missing}", "--init-from", "{model}"], "--cache needs --student-tokenizer"),
    (
        ["--cache", "{missing}", "--student-tokenizer", "{missing}", "--init-from", "{model}"],
        "--student-tokenizer {missing}: cannot load it",
    ),
    (["+", "--student-tokenizer", "bytes"], "alignment settings for --cache"),
    (
        ["--cache", "{missing}", "--student-tokenizer", "bytes", "--gamma", "1.5", "--init-from", "{model}"],
        "--gamma must be a number in [0, 1]",
    ),
    (
        [
            "--cache",
            "{missing}",
            "--student-tokenizer",
            "bytes",
            "--max-student-length",
            "0",
            "--init-from",
            "{model}",
        ],
        "--max-student-length must be an integer >= 1",
    ),
    (
        [
            "--cache",
            "{missing}",
            "--student-tokenizer",
            "bytes",
            "--loss-on",
            "most",
            "--init-from",
            "{model}",
        ],
        "unknown --loss-on 'most'",
    ),
    (
        [
            "--cache",
            "{missing}",
            "--student-tokenizer",
            "bytes",
            "--chat-template",
            "{missing}",
            "--init-from",
            "{model}",
        ],
        "--chat-template {missing}: no such file",
    ),  # fmt: skip
    (["+", "--loss-on", "all"], "alignment settings for --cache"),
    (["+", "--shuffle-window", "0"], "--shuffle-window must be an integer >= 1"),
    (["+", "--data-cache-mib", "0"], "--data-cache-mib must be an integer >= 1"),
    (["+", "--prefetch-steps", "0"], "--prefetch-steps must be an integer >= 1"),
    # student
    (["--aligned", "{aligned}", "--student", "{missing}"], "--student {missing}: cannot load its config"),
    (["--aligned", "{aligned}", "--init-from", "{tok}"], "--init-from {tok}: not a model folder"),
    (["+", "--student", "{model}"], "give exactly one student"),
    (["+", "--embedding-init", "random"], "unknown --embedding-init 'random'"),
    (["+", "--num-layers", "0"], "--num-layers must be an integer >= 1"),
    (["+", "--lora-rank", "0"], "--lora-rank must be an integer >= 1"),
    (["+", "--lora-alpha", "0"], "--lora-alpha must be a finite number > 0"),
    (["+", "--disable-dropout=yes"], "'--disable-dropout' does not take a value"),
    # output
    (["+", "--output", "{file}"], "{file}: exists and is not a folder"),
    (["+", "--output", " "], "--output must not be empty"),
    # optim
    (["+", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["+", "--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["+", "--seed", "-1"], "--seed must be an integer >= 0"),
    (["+", "--lr", "0"], "--lr must be a finite number > 0"),
    (["+", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["+", "--warmup-steps", "-1"], "--warmup-steps must be an integer >= 0"),
    (["+", "--weight-decay", "-0.1"], "--weight-decay must be a number >= 0"),
    (["+", "--adam-beta1", "1"], "--adam-beta1 must be < 1"),
    (["+", "--adam-beta2", "-0.5"], "--adam-beta2 must be a number in [0, 1]"),
    (["+", "--adam-eps", "0"], "--adam-eps must be a finite number > 0"),
    (["+", "--max-grad-norm", "-1"], "--max-grad-norm must be a finite number > 0"),
    (["+", "--max-nonfinite-steps", "0"], "--max-nonfinite-steps must be an integer >= 1"),
    # compute
    (["+", "--micro-batch-tokens", "0"], "--micro-batch-tokens must be an integer >= 1"),
    (["+", "--packing=no"], "'--packing' does not take a value"),
    (["+", "--bf16=yes"], "'--bf16' does not take a value"),
    (["+", "--verify=yes"], "'--verify' does not take a value"),
    (["+", "--gradient-checkpointing=1"], "'--gradient-checkpointing' does not take a value"),
    (["+", "--slice-size", "0"], "--slice-size must be an integer >= 1"),
    (["+", "--recompute-logits=1"], "'--recompute-logits' does not take a value"),
    (["+", "--logits-memory-mib", "0"], "--logits-memory-mib must be an integer >= 1"),
    # loss
    (["+", "--alm=0"], "'--alm' does not take a value"),
    (["+", "--no-alm"], "nothing to train: --no-alm turns the ALM loss off; add --next-token-loss"),
    (["+", "--distance", "l2"], "'--distance'"),
    (["+", "--tau", "0"], "--tau must be a finite number > 0"),
    (["+", "--debias=1"], "'--debias' does not take a value"),
    (["+", "--next-token-loss=1"], "'--next-token-loss' does not take a value"),
    # combine
    (["+", "--loss-combination", "sum"], "'--loss-combination'"),
    (["+", "--alm-weight", "-1"], "--alm-weight must be a number >= 0"),
    (["+", "--ntp-weight", "-1"], "--ntp-weight must be a number >= 0"),
    # distributed
    (["+", "--num-workers", "0"], "--num-workers must be an integer >= 1"),
    (["+", "--num-workers", "4", "--batch-size", "2"], "--batch-size (2) must be >= --num-workers (4)"),
    (["+", "--use-gpu"], "--use-gpu: this machine has no CUDA device"),
    (["+", "--strategy", "zero3"], "'--strategy'"),
    (["+", "--cpus-per-worker", "0"], "--cpus-per-worker must be a finite number > 0"),
    (["+", "--torch-threads", "0"], "--torch-threads must be an integer >= 1"),
    (["+", "--max-failures", "-2"], "--max-failures must be an integer >= -1"),
    (
        ["+", "--worker-resource", "accel"],
        "--worker-resource must be NAME=AMOUNT with AMOUNT > 0, got 'accel'",
    ),
    (["+", "--worker-resource", "GPU=1"], "--worker-resource 'GPU=1': CPUs and GPUs have their own options"),
    (["+", "--placement-timeout", "0"], "--placement-timeout must be a finite number > 0"),
    # ray
    (["+", "--address", "not an address"], "--address must be auto, HOST:PORT or ray://HOST:PORT"),
    (["+", "--num-cpus", "0"], "--num-cpus must be an integer >= 1"),
    (["+", "--object-store-memory", "1000"], "--object-store-memory must be an integer >= 78643200"),
    (["+", "--verbose=1"], "'--verbose' does not take a value"),
    # checkpoint
    (["+", "--checkpoint-every", "0"], "--checkpoint-every must be an integer >= 1"),
    (["+", "--keep-checkpoints", "-1"], "--keep-checkpoints must be an integer >= 0"),
    (["+", "--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    # logging
    (["+", "--log-every", "0"], "--log-every must be an integer >= 1"),
    (["+", "--tensorboard=1"], "'--tensorboard' does not take a value"),
    (["+", "--wandb-project", " "], "--wandb-project must not be empty"),
    (["+", "--wandb-run-name", "x"], "--wandb-run-name needs --wandb-project"),
    (["+", "--progress=1"], "'--progress' does not take a value"),
    # debug
    (["+", "--fail-at-step", "0"], "--fail-at-step must be an integer >= 1"),
    (["+", "--nan-grad-at-step", "0"], "--nan-grad-at-step must be an integer >= 1"),
    (["+", "--nan-grad-steps", "0"], "--nan-grad-steps must be an integer >= 1"),
]


def _train_app():
    import typer

    from alm_pipeline.cli.train_cmd import train

    app = typer.Typer()
    app.command("train")(train)
    app.command("other")(lambda: None)
    return app


def test_every_train_option_is_in_the_bad_option_table():
    from alm_pipeline.cli.options import config_options
    from alm_pipeline.trainer.config import TrainConfig

    named = {arg for args, _ in BAD_TRAIN_OPTIONS for arg in args if arg.startswith("--")}
    named = {arg.split("=")[0].removeprefix("--no-").removeprefix("--") for arg in named}
    options = {opt.name.replace("_", "-") for opt in config_options(TrainConfig)}
    assert options - named == set()


@pytest.mark.parametrize(("args", "message"), BAD_TRAIN_OPTIONS)
def test_bad_train_options_are_one_line_errors_before_ray_starts(
    tmp_path, self_aligned, gpt2_bl_model, tokenizer_dirs, args, message
):
    """Each bad value is an error naming the option (exit 2) before Ray starts and before the output folder is
    made. Values our configs check give one `error:` line; click refuses non-numbers, unknown choices and values
    given to flags itself (exit 2, its usage message naming the option)."""
    import ray
    from typer.testing import CliRunner

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    fill = {
        "{aligned}": str(self_aligned),
        "{model}": str(gpt2_bl_model),
        "{tok}": str(tokenizer_dirs["byte_level"]),
        "{file}": str(a_file),
        "{missing}": str(tmp_path / "missing"),
    }

    def filled(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    out = tmp_path / "never"
    base = ["--aligned", str(self_aligned), "--init-from", str(gpt2_bl_model), "--output", str(out)]
    argv = base + args[1:] if args[0] == "+" else [*args, "--output", str(out)]
    ray_before = ray.is_initialized()
    result = CliRunner().invoke(_train_app(), ["train", *[filled(a) for a in argv]])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # click wraps its messages
    assert filled(message) in text, result.output
    assert "Traceback" not in result.output
    if "'--" not in message:  # our own check: exactly one error line
        assert sum(line.startswith("error: ") for line in result.output.splitlines()) == 1, result.output
    assert not out.exists() and ray.is_initialized() == ray_before
