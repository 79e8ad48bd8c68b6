"""``alm-pipeline evaluate`` and ``alm-pipeline plot``: thin typer commands over
:mod:`alm_pipeline.evaluation.run` and :mod:`alm_pipeline.evaluation.plots`.

Registered in :mod:`alm_pipeline.cli.main` with ``app.command("evaluate")(evaluate)`` and
``app.command("plot")(plot)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from alm_pipeline.cli.console import fail as _fail
from alm_pipeline.cli.console import say as _say

__all__ = ["evaluate", "plot"]


def evaluate(
    model: Annotated[
        str | None,
        typer.Option(
            help="Model to evaluate: a model folder, a short name (smollm2-135m), or a training run directory "
            "(then its final/ folder, else its latest checkpoint-N folder with a config.json, else the only "
            "subfolder holding a config.json)"
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Texts for bits per byte: .jsonl/.json/.parquet file or folder, or `heldout` (the bundled "
            "held-out documents; the default when only --model is given)"
        ),
    ] = None,
    text_field: Annotated[str, typer.Option(help="Field holding the document text")] = "text",
    id_field: Annotated[
        str | None, typer.Option(help="Field holding a unique document id (default: hash of the text)")
    ] = None,
    max_docs: Annotated[
        int | None,
        typer.Option(help="Use only the first N documents of each source (data, cache, aligned set)"),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(help="Teacher cache: report the teacher's bits per byte read from it (no model needed)"),
    ] = None,
    cache_texts: Annotated[
        bool,
        typer.Option(
            "--cache-texts",
            help="Also evaluate --model on the cached texts (the bytes the teacher saw) and report the gap to "
            "the teacher",
        ),
    ] = False,
    aligned: Annotated[
        Path | None,
        typer.Option(
            help="Aligned set (from `alm-pipeline align`) whose student tokenizer is the model's: report "
            "chunk agreement, mean |C_S - C_T| and debiased mean |(C_S+σ_S) - (C_T+σ_T)|"
        ),
    ] = None,
    max_length: Annotated[
        int,
        typer.Option(help="Model tokens per document, special tokens included (longer ones are truncated)"),
    ] = 1024,
    batch_tokens: Annotated[int, typer.Option(help="Padded tokens per forward pass")] = 8192,
    dtype: Annotated[
        str, typer.Option(help="Model weights dtype: float32, bfloat16, float16 (log-softmax is always fp32)")
    ] = "float32",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    output_json: Annotated[Path | None, typer.Option(help="Also write the JSON result to this file")] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Also write the JSON result to RUN_DIR/eval.json")
    ] = None,
) -> None:
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
    from alm_pipeline.evaluation.run import EvalConfig, run_evaluation, write_json

    try:
        config = EvalConfig(
            model=model,
            data=data,
            text_field=text_field,
            id_field=id_field,
            max_docs=max_docs,
            cache=str(cache) if cache else None,
            cache_texts=cache_texts,
            aligned=str(aligned) if aligned else None,
            max_length=max_length,
            batch_tokens=batch_tokens,
            dtype=dtype,
            device=device,
            run_dir=str(run_dir) if run_dir else None,
        )
        result = run_evaluation(config, progress=_say)
    except (EvalError, ValueError, FileNotFoundError) as err:
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
