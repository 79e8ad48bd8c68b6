"""Align stage: cost relative to the student tokenizer's own ids-only call, and teacher tokens aligned per second
per core.

Builds a teacher cache of the bundled corpus once (a 1-layer random model with SmolLM2's real tokenizer: the
log-prob values do not change the alignment's cost), then, for each student tokenizer, paired and in
alternating order (:mod:`harness`: ``--warmup`` untimed calls of each side, then ``--reps`` timed rounds):

* **ids only** (the baseline): the tokenizer call the aligner itself makes, the backend's
  ``encode_batch_fast([text], add_special_tokens=False)[0].ids`` per text (no character offsets, ids copied
  to Python; one core: ``TOKENIZERS_PARALLELISM=false``);
* **align (in process)**: ``align_table`` on the same rows — that tokenization, exact byte offsets, chunk
  alignment, γ-merging, building the Arrow table (one core).

The ratio align ÷ ids only is computed per round, then its median and range are printed (goal ≤ 1.5). Then
**align stage (Ray)**: ``build_aligned_sets`` for all students in one pass (reads each shard once), on the
local Ray of this machine, wall time.

    python benchmarks/bench_align.py [--docs 256] [--reps 5] [--warmup 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa  # noqa: E402
from harness import print_table, run_paired, shard_bytes_for  # noqa: E402
from models import random_llama  # noqa: E402

from alm_pipeline.assets import bundled_corpus_path, is_installed, resolve_model  # noqa: E402
from alm_pipeline.cache import open_cache  # noqa: E402
from alm_pipeline.pipeline.align import CoverageStats  # noqa: E402
from alm_pipeline.pipeline.align_stage import (  # noqa: E402
    CACHE_COLUMNS,
    AlignConfig,
    AlignSettings,
    align_table,
    build_aligned_sets,
)
from alm_pipeline.pipeline.byteview import load_byte_view  # noqa: E402
from alm_pipeline.pipeline.corpus import CorpusConfig  # noqa: E402
from alm_pipeline.pipeline.ray_utils import RayConfig, ensure_ray  # noqa: E402
from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, build_teacher_cache  # noqa: E402

STUDENTS = ("bytes", "gpt2-tokenizer", "qwen3-tokenizer", "mistral-tokenizer")


def ids_only(tokenizer, texts: list[str]) -> None:
    """The aligner's tokenizer call (ids without character offsets, one text per call), on every text."""
    for text in texts:
        _ = tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5, help="timed rounds per student (and of the Ray stage)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each side before the rounds")
    ap.add_argument(
        "--students", default=",".join(STUDENTS), help="comma list (uninstalled ones are skipped)"
    )
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_align_"))
    ensure_ray(RayConfig())
    cache_dir = work / "cache"
    teacher = random_llama(resolve_model("smollm2-135m"), work / "teacher", "tiny")
    build_teacher_cache(
        TeacherCacheConfig(
            teacher=teacher,
            corpus=CorpusConfig(path=bundled_corpus_path(), limit=args.docs),
            output=str(cache_dir),
            max_length=args.max_length,
            shard_size=shard_bytes_for(bundled_corpus_path(), 128, args.docs),
            batch_tokens=16384,
            num_cpus_per_actor=1.5,
        )
    )
    cache = open_cache(cache_dir)
    table = pa.concat_tables(cache.iter_tables(columns=CACHE_COLUMNS))
    texts = table["text"].to_pylist()
    teacher_tokens = cache.summary()["tokens"]
    special = cache.special_token_mask()
    students = [s for s in args.students.split(",") if s == "bytes" or is_installed(s)]

    rows = []
    for student in students:
        view = load_byte_view(student if student == "bytes" else resolve_model(student))
        coverage = CoverageStats()

        def align(view=view, coverage=coverage) -> None:
            align_table(table, special, view, AlignSettings(), coverage)

        runs = run_paired(
            {"ids": lambda view=view: ids_only(view.tokenizer, texts), "align": align},
            reps=args.reps,
            warmup=args.warmup,
        )
        align_s = runs.spread("align")
        rows.append(
            [
                student,
                runs.spread("ids").format(".4f"),
                align_s.format(".4f"),
                runs.ratio("align", "ids").format(".2f"),
                f"{teacher_tokens / align_s.median:,.0f}",
                f"{coverage.coverage:.4f}",
            ]
        )

    def stage() -> None:
        out = work / "aligned"
        build_aligned_sets(
            AlignConfig(cache=str(cache_dir), student_tokenizers=tuple(students), output=str(out))
        )
        shutil.rmtree(out)

    stage_runs = run_paired({"stage": stage}, reps=args.reps, warmup=args.warmup)

    print(
        f"\n{len(texts)} documents, {teacher_tokens} teacher tokens (max length {args.max_length}), "
        f"{cache.summary()['shards']} shards; {args.warmup} untimed warm-up call(s) of each side, then "
        f"{args.reps} paired rounds in alternating order; median [min–max]"
    )
    print_table(
        ["student", "ids only s", "align s", "align / ids (per round)", "teacher tok/s/core", "coverage"],
        rows,
    )
    print(
        f"\nalign stage (Ray, {len(students)} students in one pass, {os.cpu_count()} CPUs): "
        f"{stage_runs.spread('stage').format('.2f')} s"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
