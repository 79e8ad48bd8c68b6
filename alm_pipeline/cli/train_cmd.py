"""``alm-pipeline train``: the options of :class:`~alm_pipeline.trainer.config.TrainConfig` (generated, see
:mod:`alm_pipeline.cli.options`) and a call of :func:`~alm_pipeline.trainer.driver.run_training`. Registered in
``alm_pipeline/cli/main.py`` as ``app.command("train")(train)``; ``python -m alm_pipeline.cli.train_cmd`` runs it on
its own."""

from __future__ import annotations

import os
import sys

import typer

from alm_pipeline.cli.console import fail, say
from alm_pipeline.cli.options import config_command
from alm_pipeline.trainer.config import TrainConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@config_command(TrainConfig)
def train(config: TrainConfig) -> None:
    """Distil a student from cached teacher likelihoods with Ray Train (ALM loss; the teacher is never loaded).

    Defaults: binarised KL, τ = 5, debiasing and γ as stored in the aligned set, no next-token loss unless
    --next-token-loss (then combined with ALM by GradMag; --no-alm --next-token-loss: next-token training
    alone, SFT), bf16 autocast with --use-gpu and fp32 without (--bf16/--no-bf16 to choose), Adam without
    weight decay, warm-up then linear decay. Writes checkpoints (Hugging Face folders + optimizer state) to
    OUTPUT/checkpoints, the final model to OUTPUT/final, and per-step metrics to OUTPUT/metrics.csv and
    OUTPUT/tensorboard.
    """
    from alm_pipeline.locking import OutputError
    from alm_pipeline.optional import MissingDependencyError
    from alm_pipeline.storage import StorageError
    from alm_pipeline.trainer.checkpoint import CheckpointError
    from alm_pipeline.trainer.driver import run_training
    from alm_pipeline.trainer.errors import TrainingError

    try:
        result = run_training(config, say=say)
    except (
        TrainingError,
        OutputError,
        CheckpointError,
        MissingDependencyError,
        StorageError,
        NotImplementedError,
        ValueError,
        FileNotFoundError,
    ) as err:
        fail(str(err))
    loss = f"{result.final_loss:.6g}" if result.final_loss is not None else "n/a"
    say(
        f"done: step {result.steps} (started at {result.start_step}), final loss {loss}, "
        f"{result.seconds:.1f}s -> {result.final_checkpoint}"
    )


def main() -> None:  # pragma: no cover
    typer.run(train)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
