"""The ``alm-pipeline`` command line: a thin layer that parses options into config objects and calls the
library (``alm_pipeline.pipeline`` / ``alm_pipeline.cache``)."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from alm_pipeline.cli.console import fail, say
from alm_pipeline.cli.options import config_command
from alm_pipeline.pipeline.align_stage import AlignConfig
from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig
from alm_pipeline.quickstart import QuickstartConfig

app = typer.Typer(
    name="alm-pipeline",
    help="Cross-tokenizer distillation with Approximate Likelihood Matching, around a precomputed teacher cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.callback()
def global_options(
    s3_endpoint: Annotated[
        str | None,
        typer.Option(
            "--s3-endpoint",
            help="S3 endpoint URL for s3:// paths (an S3-compatible store, e.g. http://127.0.0.1:8333); default: "
            "$AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, else AWS. Credentials come from the AWS environment.",
        ),
    ] = None,
) -> None:
    """Cross-tokenizer distillation with Approximate Likelihood Matching, around a precomputed teacher cache.

    Every path option takes a local path or a file://, s3:// or gs:// URI."""
    from alm_pipeline.storage import StorageError, set_s3_endpoint

    try:
        set_s3_endpoint(s3_endpoint)
    except StorageError as err:
        fail(str(err))


@app.command("teacher-cache")
@config_command(TeacherCacheConfig)
def teacher_cache(config: TeacherCacheConfig) -> None:
    """Run the teacher over a corpus once and store per-token log-probs and boundary log-probs.

    Writes Parquet shards + manifest.json. Re-running the same command resumes an interrupted run.
    """
    from alm_pipeline.locking import OutputError
    from alm_pipeline.pipeline.teacher_cache import TeacherCacheError, build_teacher_cache
    from alm_pipeline.storage import StorageError

    try:
        summary = build_teacher_cache(config, progress=say)
    except (TeacherCacheError, OutputError, StorageError, ValueError, FileNotFoundError) as err:
        fail(str(err))
    say(
        f"done: {summary.docs} documents, {summary.tokens} tokens in {summary.shards_total} shards "
        f"({summary.shards_reused} reused) in {summary.seconds:.1f}s -> {summary.output}"
    )
    if summary.shards_rescored:
        say(
            f"{summary.shards_rescored} scoring attempt(s) repeated (a lost node's scored shards rebuilt, a "
            "restarted scoring actor or a failed attempt); the cache is complete"
        )


@app.command()
@config_command(AlignConfig)
def align(config: AlignConfig) -> None:
    """Map a teacher cache onto student tokenizers' chunk boundaries (one read of the cache for all of them)."""
    from alm_pipeline.cache import store
    from alm_pipeline.locking import OutputError
    from alm_pipeline.pipeline.align_stage import AlignError, build_aligned_sets, coverage_report_lines
    from alm_pipeline.storage import StorageError, location

    try:
        summaries = build_aligned_sets(config, progress=say)
    except (AlignError, OutputError, StorageError, ValueError) as err:
        fail(str(err))
    for summary in summaries:
        manifest = store.read_json(location(summary.path) / store.MANIFEST)
        for line in coverage_report_lines(summary, manifest):
            typer.secho(line, fg=typer.colors.YELLOW if "WARNING" in line else None, err=True)
        say(f"-> {summary.path}")


@app.command()
def inspect(
    path: Annotated[
        str | None, typer.Argument(help="A teacher cache or aligned set (folder or URI)", show_default=False)
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer",
            help="Instead of a cache: check a tokenizer (folder, installed asset name, or bytes) - how it is "
            "classified, whether it is accepted as teacher and student, which sample texts it cannot "
            "reproduce. Exit status 0 fine, 1 usable with limits, 2 refused",
            show_default=False,
        ),
    ] = None,
    texts: Annotated[
        list[str] | None,
        typer.Option("--text", help="With --tokenizer: a sample text of your own to try (repeatable)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Also read every shard and check its SHA-256 and schema (parallel Ray tasks). Without it, "
            "only each shard's presence and size are checked",
        ),
    ] = False,
) -> None:
    """Summarise a teacher cache (teacher, tokenizer, documents, tokens, size, bits per byte) or an aligned
    set (student tokenizer, coverage report); or, with --tokenizer, check a tokenizer before any GPU work."""
    if (path is None) == (tokenizer is None):
        fail("give a cache or aligned set to inspect, or --tokenizer T (one of the two)")
    if tokenizer is not None:
        _inspect_tokenizer(tokenizer, texts or [], as_json)
        return
    if texts:
        fail("--text goes with --tokenizer")
    from alm_pipeline.cache import open_cache
    from alm_pipeline.cache.aligned import ALIGNED_KIND, open_aligned_set
    from alm_pipeline.cache.store import MANIFEST, CacheIntegrityError, read_json
    from alm_pipeline.storage import StorageError, location

    try:
        root = location(path)
        try:
            kind = read_json(root / MANIFEST).get("kind")
        except FileNotFoundError:
            kind = None
        opener = open_aligned_set if kind == ALIGNED_KIND else open_cache
        summary = opener(root, verify=True, require_complete=False, checksums=verify).summary()
    except (CacheIntegrityError, StorageError, ValueError) as err:
        fail(str(err))
    if verify:
        summary["checksums"] = "verified"
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_table(summary)


def _inspect_tokenizer(name: str, texts: list[str], as_json: bool) -> None:
    from alm_pipeline.pipeline.tokenizer_check import check_tokenizer

    report = check_tokenizer(name, texts)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        for line in report.lines():
            typer.echo(line)
    raise typer.Exit(code=report.exit_code)


@app.command()
@config_command(QuickstartConfig)
def quickstart(config: QuickstartConfig) -> None:
    """The whole pipeline on its embedded defaults: (1) teacher cache of the bundled corpus with SmolLM2-135M,
    (2) alignment to two student tokenizers in one pass, (3) a short tokenizer-transfer training run from the
    cache (the teacher's weights, FVT embeddings for the student tokenizer, ALM loss), (4) bits per byte on bundled
    held-out plays of the teacher and of the student before and after training. A second run reuses what the
    first produced (cache, aligned sets, initial student, finished training run). Results: OUTPUT/quickstart.json."""
    from alm_pipeline.quickstart import run_quickstart

    try:
        result = run_quickstart(config, progress=say)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        fail(str(err))
    for line in result.lines():
        typer.echo(line)


def _print_table(summary: dict, indent: str = "") -> None:
    width = max((len(k) for k in summary), default=0)
    for key, value in summary.items():
        if isinstance(value, dict):
            typer.echo(f"{indent}{key}:")
            _print_table(value, indent + "  ")
        else:
            typer.echo(f"{indent}{key.ljust(width)}  {value}")


def _register_subcommands() -> None:
    from alm_pipeline.cli.evaluate_cmd import evaluate, plot
    from alm_pipeline.cli.train_cmd import train

    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("plot")(plot)


_register_subcommands()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
