"""Align stage: cost relative to the student tokenizer itself, and teacher tokens aligned per second per core.

Builds a teacher cache of the bundled corpus once (a 1-layer random model with SmolLM2's real tokenizer: the
log-prob values do not change the alignment's cost), then, for each student tokenizer, side by side:

* **tokenize**: the student tokenizer's own time to tokenize the cached texts (Rust ``encode``, one core);
* **ids only**: the tokenizer call ``align_table`` makes, ``encode_batch_fast([text])[0].ids`` per text (no
  character offsets, ids copied to Python; one core: ``TOKENIZERS_PARALLELISM=false``), a like-with-like
  baseline for the ratio ``align/ids``;
* **align (in process)**: ``align_table`` on the same rows — student tokenization with exact byte offsets,
  chunk alignment, γ-merging, building the Arrow table (one core);
* **align stage (Ray)**: ``build_aligned_sets`` for all students in one pass (reads each shard once), on the
  local Ray of this machine, wall time.

    python benchmarks/bench_align.py [--docs 256] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa  # noqa: E402
from alm_pipeline.cache.reader import open_cache  # noqa: E402

from alm_pipeline.assets import bundled_corpus_path, is_installed, resolve_model  # noqa: E402
from alm_pipeline.pipeline.align import CoverageStats  # noqa: E402
from alm_pipeline.pipeline.align_stage import (  # noqa: E402
    CACHE_COLUMNS,
    AlignConfig,
    AlignSettings,
    align_table,
    build_aligned_sets,
    teacher_special_mask,
)
from alm_pipeline.pipeline.byteview import load_byte_view  # noqa: E402
from alm_pipeline.pipeline.corpus import CorpusConfig  # noqa: E402
from alm_pipeline.pipeline.ray_utils import RayConfig, ensure_ray  # noqa: E402
from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, build_teacher_cache  # noqa: E402


def tiny_teacher(out: Path) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_align_"))
    ensure_ray(RayConfig())
    cache_dir = work / "cache"
    build_teacher_cache(
        TeacherCacheConfig(
            teacher=tiny_teacher(work / "teacher"),
            corpus=CorpusConfig(path=bundled_corpus_path(), limit=args.docs),
            output=str(cache_dir),
            max_length=args.max_length,
            shard_size=128,
            batch_tokens=16384,
            num_cpus_per_actor=1.5,
        )
    )
    cache = open_cache(cache_dir)
    table = pa.concat_tables(cache.iter_tables(columns=CACHE_COLUMNS))
    texts = table["text"].to_pylist()
    teacher_tokens = cache.summary()["tokens"]
    special = teacher_special_mask(cache)
    students = ["bytes"] + [
        s for s in ("gpt2-tokenizer", "qwen3-tokenizer", "mistral-tokenizer") if is_installed(s)
    ]

    rows = []
    for student in students:
        view = load_byte_view(student if student == "bytes" else resolve_model(student))
        for rep in range(args.reps):
            t0 = time.perf_counter()
            for text in texts:
                view.tokenizer.encode(text, add_special_tokens=False)
            tok_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for text in texts:
                _ = view.tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids
            ids_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            coverage = CoverageStats()
            align_table(table, special, view, AlignSettings(), coverage)
            align_s = time.perf_counter() - t0
            rows.append((student, rep, tok_s, ids_s, align_s, coverage.coverage))

    stage = []
    for rep in range(args.reps):
        out = work / f"aligned_{rep}"
        t0 = time.perf_counter()
        build_aligned_sets(
            AlignConfig(cache=str(cache_dir), student_tokenizers=tuple(students), output=str(out))
        )
        stage.append(time.perf_counter() - t0)
        shutil.rmtree(out)

    print(
        f"\n{len(texts)} documents, {teacher_tokens} teacher tokens (max length {args.max_length}), {cache.summary()['shards']} shards"
    )
    print(
        f"{'student':<20}{'rep':>4}{'tokenize s':>12}{'ids only s':>12}{'align s':>10}{'align/tokenize':>16}"
        f"{'align/ids':>11}{'teacher tok/s/core':>20}{'coverage':>10}"
    )
    for student, rep, tok_s, ids_s, align_s, cov in rows:
        print(
            f"{student:<20}{rep:>4}{tok_s:>12.3f}{ids_s:>12.3f}{align_s:>10.3f}{align_s / tok_s:>16.2f}"
            f"{align_s / ids_s:>11.2f}{teacher_tokens / align_s:>20,.0f}{cov:>10.4f}"
        )
    tok_total = sum(r[2] for r in rows) / args.reps
    print(
        f"\nalign stage (Ray, {len(students)} students in one pass, 2 CPUs): "
        + ", ".join(f"{s:.2f}s" for s in stage)
        + "; stage ÷ summed one-core tokenize time of all students: "
        + ", ".join(f"{s / tok_total:.2f}" for s in stage)
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
