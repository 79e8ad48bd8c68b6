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
            annotation=Annotated[
                str | None, typer.Option(help="Also write the JSON result to this file (path or URI)")
            ],
            default=None,
        ),
        inspect.Parameter(
            "as_json",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[
                bool, typer.Option("--json", help="Print the JSON result instead of the table")
            ],
            default=False,
        ),
    ],
)
def evaluate(config: EvalConfig, output_json: str | None, as_json: bool) -> None:
    """Bits per byte of causal LMs on text domains, the teacher's bits per byte from a cache, chunk agreement
    (mean |C_S - C_T|, binarised KL) between students and a cached teacher, and zero-shot accuracy on BIG-bench
    multiple-choice tasks (--task). Prints one table: a row per model (and a `chance` row with --task), a column
    per metric (bits_per_byte/DOMAIN, mean_abs_chunk_diff/ALIGNED, binarised_kl/ALIGNED, accuracy/TASK).

    Bits per byte = Σ over every predicted token of -log2 p(token | previous tokens) / Σ of the UTF-8 bytes
    those tokens cover, pooled over the corpus. Every byte of a document is predicted: its first token from the
    tokenizer's own BOS, else from its BOS or EOS token prepended; a tokenizer with neither leaves the first
    token out and reports its bytes (excluded_bytes). Documents longer than --max-length tokens are truncated
    (truncated_bytes). The cache's number reads the cached log-probabilities: for a teacher tokenizer without
    BOS it leaves each document's first token out (reported); `--model TEACHER --cache-texts` gives the
    teacher's number under the common convention.
    """
    from alm_pipeline.evaluation.models import EvalError
    from alm_pipeline.evaluation.run import run_evaluation, write_json
    from alm_pipeline.evaluation.table import ResultTable
    from alm_pipeline.locking import OutputError

    try:
        result = run_evaluation(config, progress=_say)
    except (EvalError, OutputError, ValueError, OSError) as err:
        _fail(str(err))
    if output_json:
        write_json(output_json, result)
        _say(f"wrote {output_json}")
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(ResultTable.from_json(result["table"]).to_text())


def plot(
    run_dir: Annotated[Path, typer.Argument(help="Training run directory (holding metrics.csv)")],
) -> None:
    """PNG plots of a training run or an evaluation folder, into RUN_DIR/plots: loss.png (loss, loss_alm,
    loss_ntp over steps, from metrics.csv), chunk_agreement.png (mean_abs_chunk_logprob_diff over steps, ALM
    runs), bits_per_byte.png (the bits per byte that `evaluate --run-dir` wrote to eval.json in the run
    directory, its final/ folder or its checkpoints, at the evaluated checkpoint's step; the teacher's from the
    cache as a dashed line) and eval_table.png (RUN_DIR/eval.json's model × metric table as grouped bars: a
    panel per metric, a bar per model). A folder with an eval.json and no metrics.csv gets eval_table.png."""
    from alm_pipeline.evaluation.plots import PlotError, plot_run

    try:
        result = plot_run(run_dir)
    except PlotError as err:
        _fail(str(err))
    for path in result.files:
        typer.echo(str(path))
    for name, reason in result.skipped.items():
        _say(f"skipped {name}.png: {reason}")
