"""Teacher-cache stage: pipeline throughput vs the bare engine, and bytes per token on disk.

For each model, side by side in one run (repeated ``--reps`` times, alternating), on the same documents,
shards and batches:

* **bare**: the hf engine in this process scores the tokenized shards one after another (no Ray);
* **pipeline**: ``build_teacher_cache`` (Ray Data: tokenize tasks → scoring actor → write tasks) into a
  fresh directory, on an already started local Ray.

It prints a table of tokens/s and the ratio pipeline ÷ bare, (a) over the whole Ray phase, actor start
included, and (b) in steady state (after the first shard is written), plus where the time goes, and a
table of on-disk bytes per token split by column.

    python benchmarks/bench_teacher_cache.py                # SmolLM2-135M (after scripts/setup.sh) + a small model
    python benchmarks/bench_teacher_cache.py --docs 16 --reps 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from alm_pipeline.assets import bundled_corpus_path, resolve_model  # noqa: E402
from alm_pipeline.pipeline.byteview import load_byte_view  # noqa: E402
from alm_pipeline.pipeline.corpus import CorpusConfig  # noqa: E402
from alm_pipeline.pipeline.engine_hf import HFEngineConfig, HFTeacherEngine  # noqa: E402
from alm_pipeline.pipeline.ray_utils import RayConfig, ensure_ray  # noqa: E402
from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, build_teacher_cache  # noqa: E402


def small_model(tokenizer_dir: str, out: Path) -> str:
    """A random Llama (hidden 256, 4 layers) with the real tokenizer: cheap forward, real vocabulary."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


def bare_run(model: str, shards: list[list[np.ndarray]], batch_tokens: int, threads: int) -> float:
    engine = HFTeacherEngine(
        HFEngineConfig(model=model, max_batch_tokens=batch_tokens, num_threads=threads),
        BOUNDARY[model],
        VOCAB[model],
    )
    tokens = sum(len(s) for shard in shards for s in shard)
    t0 = time.perf_counter()
    for shard in shards:
        engine.score(shard)
    return tokens / (time.perf_counter() - t0)


BOUNDARY: dict[str, np.ndarray] = {}
VOCAB: dict[str, int] = {}


def column_bytes(cache_dir: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for f in sorted((cache_dir / "shards").glob("*.parquet")):
        meta = pq.ParquetFile(f).metadata
        for rg in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(rg).column(c)
                name = col.path_in_schema.split(".")[0]
                sizes[name] = sizes.get(name, 0) + col.total_compressed_size
        sizes["(file overhead)"] = sizes.get("(file overhead)", 0) + f.stat().st_size
    sizes["(file overhead)"] -= sum(v for k, v in sizes.items() if k != "(file overhead)")
    return sizes


def repacked_bytes(cache_dir: Path, out: Path) -> tuple[dict[str, int], int]:
    """Column sizes if the same rows had been written as one shard (shard size changes only the overhead)."""
    import pyarrow as pa

    from alm_pipeline.cache import store

    table = pa.concat_tables(pq.read_table(f) for f in sorted((cache_dir / "shards").glob("*.parquet")))
    tokens = int(pa.compute.sum(pa.compute.list_value_length(table["token_ids"])).as_py())
    store.write_shard(out, 0, table, tokens=tokens, stats={})
    return column_bytes(out), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument(
        "--actor-cpus", type=float, default=1.5, help="CPUs of the scoring actor (threads: rounded)"
    )
    ap.add_argument("--size-docs", type=int, default=256, help="documents in one shard for the size table")
    ap.add_argument(
        "--models", default="smollm2-135m,small", help="comma list: smollm2-135m, small, or paths"
    )
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_tc_"))
    corpus = work / "corpus.jsonl"
    lines = Path(bundled_corpus_path()).read_text().splitlines()[: args.docs]
    corpus.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    ensure_ray(RayConfig())
    ray_start = time.perf_counter() - t0

    rows = []
    size_tables: dict[str, tuple[dict[str, int], int]] = {}
    for name in args.models.split(","):
        model = (
            small_model(resolve_model("smollm2-135m"), work / "small")
            if name == "small"
            else resolve_model(name)
        )
        view = load_byte_view(model)
        BOUNDARY[model], VOCAB[model] = view.boundary_token_ids(), view.vocab_size
        texts = [json.loads(line)["text"] for line in lines]
        seqs = [view.encode(t, max_length=args.max_length).token_ids for t in texts]
        shards = [seqs[i : i + args.shard_size] for i in range(0, len(seqs), args.shard_size)]
        for rep in range(args.reps):
            threads = max(1, round(args.actor_cpus))
            bare = bare_run(model, shards, args.batch_tokens, threads)
            out = work / f"cache_{name}_{rep}"
            summary = build_teacher_cache(
                TeacherCacheConfig(
                    teacher=model,
                    corpus=CorpusConfig(path=str(corpus)),
                    output=str(out),
                    max_length=args.max_length,
                    shard_size=args.shard_size,
                    batch_tokens=args.batch_tokens,
                    num_cpus_per_actor=args.actor_cpus,
                )
            )
            t = summary.timings
            whole = summary.tokens / t["ray_pipeline"]
            steady = t.get("steady_tokens_per_second", float("nan"))
            rows.append(
                {
                    "model": name,
                    "rep": rep,
                    "tokens": summary.tokens,
                    "bare_tok_s": bare,
                    "pipe_tok_s": whole,
                    "steady_tok_s": steady,
                    "ratio_whole": whole / bare,
                    "ratio_steady": steady / bare,
                    "actor_tok_s": summary.tokens / t["actor_busy"],
                    "stage_s": t["stage_corpus"],
                    "first_shard_s": t["first_shard"],
                    "ray_s": t["ray_pipeline"],
                }
            )
            if rep == args.reps - 1:
                size_tables[f"{name}, {len(shards)} shards of {args.shard_size} docs"] = (
                    column_bytes(out),
                    summary.tokens,
                )
                size_tables[f"{name}, same rows in 1 shard"] = repacked_bytes(out, work / f"repacked_{name}")
            shutil.rmtree(out)

    if "small" in args.models.split(","):
        # bigger shards, as in real runs (the default shard is 256 documents)
        big = work / "corpus_big.jsonl"
        big.write_text(
            "\n".join(Path(bundled_corpus_path()).read_text().splitlines()[: args.size_docs]) + "\n"
        )
        out = work / "cache_size"
        s = build_teacher_cache(
            TeacherCacheConfig(
                teacher=str(work / "small"),
                corpus=CorpusConfig(path=str(big)),
                output=str(out),
                max_length=args.max_length,
                shard_size=args.size_docs,
                num_cpus_per_actor=args.actor_cpus,
            )
        )
        size_tables[f"small, 1 shard of {args.size_docs} docs"] = (column_bytes(out), s.tokens)

    for title, (sizes, tokens) in size_tables.items():
        print(f"\n== on-disk bytes per token: {title} ({tokens} tokens)")
        for col, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
            print(f"  {col:<18} {size / tokens:7.2f}")
        print(f"  {'TOTAL':<18} {sum(sizes.values()) / tokens:7.2f}")

    print(f"\nlocal Ray start: {ray_start:.1f}s (not counted below)")
    header = (
        f"{'model':<14}{'rep':>4}{'tokens':>8}{'bare tok/s':>12}{'pipe tok/s':>12}{'steady tok/s':>14}"
        f"{'pipe/bare':>11}{'steady/bare':>13}{'in-actor/bare':>15}{'stage s':>9}{'1st shard s':>13}{'ray s':>8}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['model']:<14}{r['rep']:>4}{r['tokens']:>8}{r['bare_tok_s']:>12.1f}{r['pipe_tok_s']:>12.1f}"
            f"{r['steady_tok_s']:>14.1f}{r['ratio_whole']:>11.3f}{r['ratio_steady']:>13.3f}"
            f"{r['actor_tok_s'] / r['bare_tok_s']:>15.3f}{r['stage_s']:>9.2f}"
            f"{r['first_shard_s']:>13.2f}{r['ray_s']:>8.2f}"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
