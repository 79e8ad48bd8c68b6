"""Compact teacher caches (``--logprob-dtype``): bytes per token at float32 / float16 / bfloat16, and the change
in the ALM loss that storing ℓ and σ at 16 bits causes.

The teacher is the real SmolLM2-135M (fp32, the HF engine of ``teacher-cache``) scoring ``--docs`` documents of
the bundled corpus (up to ``--max-length`` tokens). Its rows are written as one cache shard at each dtype
(zstd Parquet, exactly as ``teacher-cache`` writes them): **bytes/token** is the shard's size over its teacher
tokens. Each shard is read back (fp32, as ``align`` gets it), aligned to the teacher's own tokenizer (γ = 0.1,
debiasing on) and the **ALM loss** (binary KL, τ = 5; :mod:`alm_pipeline.trainer.loss`) of the same batch is
computed for two students, the same for every dtype:

* ``smollm2`` — the teacher model itself: its float32 loss is ~0, so the 16-bit loss is the floor rounding adds;
* ``random`` — a tiny random Llama on the same tokenizer (a student far from the teacher).

The table gives the loss at each dtype and its difference to float32, plus the largest change of a teacher
chunk log-likelihood C_T (or, when a rounded σ moved a γ-merged chunk's end, how many documents' chunks moved).

Each dtype is also written with ``--derive-text`` (no ``text``/``offsets`` columns; checked to read back
exactly), and reading + aligning the bfloat16 shard is timed both ways (paired rounds).

    python benchmarks/bench_cache_dtype.py [--docs 48] [--max-length 256] [--reps 7]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from harness import print_table, run_paired  # noqa: E402

from alm_pipeline.assets import bundled_corpus_path, resolve_model  # noqa: E402
from alm_pipeline.cache.teacher import CACHE_SCHEMA, LOGPROB_DTYPES, TeacherCache  # noqa: E402
from alm_pipeline.cache.token_bytes import write_token_bytes  # noqa: E402
from alm_pipeline.pipeline.align_stage import AlignSettings, align_table  # noqa: E402
from alm_pipeline.pipeline.byteview import load_byte_view  # noqa: E402
from alm_pipeline.pipeline.engine_hf import HFEngineConfig, HFTeacherEngine  # noqa: E402
from alm_pipeline.trainer.loss import ALMGroups, ALMLossConfig, alm_loss, student_token_stats  # noqa: E402


def teacher_rows(teacher: str, docs: int, max_length: int) -> pa.Table:
    view = load_byte_view(teacher)
    texts = []
    with open(bundled_corpus_path()) as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == docs:
                break
    engine = HFTeacherEngine(HFEngineConfig(model=teacher), view.boundary_token_ids(), view.vocab_size)
    encs = [view.encode(t, max_length=max_length, doc_ref=str(i)) for i, t in enumerate(texts)]
    scores = engine.score([e.token_ids for e in encs])
    return pa.Table.from_pydict(
        {
            "doc_id": [f"doc{i:04d}" for i in range(len(encs))],
            "text": [e.text for e in encs],
            "token_ids": [list(map(int, e.token_ids)) for e in encs],
            "offsets": [list(map(int, e.offsets)) for e in encs],
            "logprob": [s[0].tolist() for s in scores],
            "boundary_logprob": [s[1].tolist() for s in scores],
            "truncated": [False] * len(encs),
        },
        schema=CACHE_SCHEMA,
    )


def tiny_student(tokenizer_dir: str) -> torch.nn.Module:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def student_stats(model: torch.nn.Module, aligned: pa.Table, boundary_mask: np.ndarray):
    """Per-token student ℓ and σ for the aligned batch (right-padded), computed once per student."""
    ids = aligned["input_ids"].to_pylist()
    width = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        return student_token_stats(input_ids, boundary_mask, logits=logits, attention_mask=mask)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--reps", type=int, default=7, help="rounds of the read + align timing")
    args = parser.parse_args()
    teacher = resolve_model(args.teacher)
    table = teacher_rows(teacher, args.docs, args.max_length)
    view = load_byte_view(teacher)
    settings = AlignSettings(gamma=0.1, debias=True)
    config = ALMLossConfig()

    with tempfile.TemporaryDirectory(prefix="bench-dtype-") as tmp:
        aligned_at, sizes, compact_sizes = {}, {}, {}
        for dtype in LOGPROB_DTYPES:
            info = TeacherCache.write_shard(Path(tmp) / dtype, 0, table, stats={}, logprob_dtype=dtype)
            sizes[dtype] = info.bytes / info.tokens
            back = TeacherCache.read_shard_entry(Path(tmp) / dtype, info)
            aligned_at[dtype] = align_table(back, view.is_special, view, settings)
            # --derive-text: the same rows without text and offsets (derived again when read)
            compact_root = Path(tmp) / f"{dtype}-compact"
            write_token_bytes(compact_root, view.token_bytes)
            compact = TeacherCache.write_shard(
                compact_root, 0, table, stats={}, logprob_dtype=dtype, derive_text=True
            )
            compact_sizes[dtype] = compact.bytes / compact.tokens
            again = TeacherCache.read_shard_entry(compact_root, compact)
            assert again.drop_columns(["logprob"]).equals(back.drop_columns(["logprob"])), (
                "reads back exactly"
            )
            lp = [t["logprob"].combine_chunks().values.to_numpy(zero_copy_only=False) for t in (again, back)]
            assert np.array_equal(*lp, equal_nan=True), "reads back exactly"
        tokens = info.tokens

        def read_align(root: Path, entry) -> None:
            align_table(TeacherCache.read_shard_entry(root, entry), view.is_special, view, settings)

        runs = run_paired(
            {
                "stored": lambda: read_align(Path(tmp) / "bfloat16", info),
                "derived": lambda: read_align(Path(tmp) / "bfloat16-compact", compact),
            },
            reps=args.reps,
            warmup=1,
        )

    boundary = np.zeros(view.vocab_size, dtype=bool)
    boundary[view.boundary_token_ids()] = True
    from transformers import AutoModelForCausalLM

    students = {
        "smollm2": AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval(),
        "random": tiny_student(teacher),
    }
    reference = aligned_at["float32"]
    c_ref = reference["teacher_chunk_logprob"].combine_chunks().values.to_numpy()
    losses = {}
    for name, model in students.items():
        stats = student_stats(model, reference, boundary)
        for dtype in LOGPROB_DTYPES:
            aligned = aligned_at[dtype]
            # the student's tokens are the same; γ-merging reads σ, so a rounded σ at the threshold may move a
            # merged chunk's end (counted in the table)
            assert aligned["input_ids"].equals(reference["input_ids"])
            groups = ALMGroups.from_documents(
                aligned.select(
                    ["chunk_start", "chunk_end", "teacher_chunk_logprob", "teacher_chunk_boundary_logprob"]
                ).to_pylist()
            )
            losses[name, dtype] = float(alm_loss(stats, groups, config).loss)

    rows = []
    for dtype in LOGPROB_DTYPES:
        c = aligned_at[dtype]["teacher_chunk_logprob"].combine_chunks().values.to_numpy()
        same = aligned_at[dtype]["chunk_end"].to_pylist() == reference["chunk_end"].to_pylist()
        moved = sum(
            a != b
            for a, b in zip(
                aligned_at[dtype]["chunk_end"].to_pylist(), reference["chunk_end"].to_pylist(), strict=True
            )
        )
        delta = f"{np.abs(c - c_ref).max():.2e}" if same else f"({moved} docs' chunks moved)"
        row = [dtype, f"{sizes[dtype]:.2f}", f"{compact_sizes[dtype]:.2f}", delta]
        for name in students:
            loss, ref = losses[name, dtype], losses[name, "float32"]
            row += [
                f"{loss:.6g}",
                f"{loss - ref:+.2e}" + (f" ({(loss - ref) / ref:+.2%})" if ref > 1e-3 else ""),
            ]
        rows.append(row)
    columns = ["logprob dtype", "bytes/token", "bytes/token, --derive-text", "max |ΔC_T|"]
    for name in students:
        columns += [f"ALM loss, {name}", f"Δ vs float32, {name}"]
    print_table(
        columns,
        rows,
        title=f"{args.docs} documents, {tokens} teacher tokens ({args.teacher}, max length {args.max_length}); "
        f"python {sys.version.split()[0]}, torch {torch.__version__}",
    )
    print_table(
        ["read + align one bfloat16 shard", "seconds", "÷ stored"],
        [
            ["text and offsets stored", runs.spread("stored").format(".3f"), "1"],
            [
                "--derive-text",
                runs.spread("derived").format(".3f"),
                runs.ratio("derived", "stored").format(".2f"),
            ],
        ],
        title=f"paired, alternating order, {args.reps} rounds after 1 warm-up; median [min-max]",
    )


if __name__ == "__main__":
    main()
