"""``alm-pipeline evaluate`` and ``alm-pipeline plot``: thin typer commands over
:mod:`alm_pipeline.evaluation.run` and :mod:`alm_pipeline.evaluation.plots`.

Registered in :mod:`alm_pipeline.cli.main` with ``app.command("evaluate")(evaluate)`` and
``app.command("plot")(plot)``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated

import typer

from alm_pipeline.cli.console import fail as _fail
from alm_pipeline.cli.console import say as _say
from alm_pipeline.cli.options import config_command
from alm_pipeline.evaluation.run import EvalConfig

__all__ = ["evaluate", "plot"]


@config_command(
    EvalConfig,
    extras=[
        inspect.Parameter(
            "output_json",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[Path | None, typer.Option(help="Also write the JSON result to this file")],
            default=None,
        )
    ],
)
def evaluate(config: EvalConfig, output_json: Path | None) -> None:
    """Bits per byte of any causal LM on any text, the teacher's bits per byte from a cache, and chunk
    agreement between a student and a cache. Prints JSON.

    Bits per byte = Σ over every predicted token of -log2 p(token | previous tokens) / Σ of the UTF-8 bytes
    those tokens cover, pooled over the corpus. Each document gets the tokenizer's own special tokens; a
    document's first token is predicted only when a BOS precedes it (without a BOS, the first token and its
    bytes are left out of both sums). Documents longer than --max-length tokens are truncated and only the
    bytes of the kept tokens count. The cache's number uses the same convention (logprob at positions >= 1
    over the bytes covered by tokens >= 1), so it equals `evaluate --model TEACHER` on the cached texts.
    """
    from alm_pipeline.evaluation.models import EvalError
    from alm_pipeline.evaluation.run import run_evaluation, write_json
    from alm_pipeline.locking import OutputError

    try:
        result = run_evaluation(config, progress=_say)
    except (EvalError, OutputError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    if output_json:
        write_json(output_json, result)
        _say(f"wrote {output_json}")
    typer.echo(json.dumps(result, indent=2))


def plot(
    run_dir: Annotated[Path, typer.Argument(help="Training run directory (holding metrics.csv)")],
) -> None:
    """PNG plots of a training run, into RUN_DIR/plots: loss.png (loss, loss_alm, loss_ntp over steps, from
    metrics.csv), chunk_agreement.png (mean_abs_chunk_logprob_diff over steps, ALM runs) and bits_per_byte.png
    (the bits per byte that `evaluate --run-dir` wrote to eval.json in the run directory, its final/ folder or
    its checkpoints, at the evaluated checkpoint's step; the teacher's from the cache as a dashed line)."""
    from alm_pipeline.evaluation.plots import PlotError, plot_run

    try:
        result = plot_run(run_dir)
    except PlotError as err:
        _fail(str(err))
    for path in result.files:
        typer.echo(str(path))
    for name, reason in result.skipped.items():
        _say(f"skipped {name}.png: {reason}")
