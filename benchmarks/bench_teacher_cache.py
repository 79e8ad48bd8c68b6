"""Teacher-cache stage: pipeline throughput vs the bare engine, and bytes per token on disk.

For each model, paired and in alternating order (:mod:`harness`, ``--reps`` rounds), on the same documents,
shards and batches, with the same torch threads:

* **bare**: the hf engine in this process scores the tokenized shards one after another (no Ray);
* **pipeline**: ``build_teacher_cache`` (Ray Data: tokenize tasks → scoring actor → write tasks) into a
  fresh directory, on an already started local Ray.

Warm-up is the same on both sides: none. Each side is timed from cold, model load included — the bare engine
is built inside its timed call as the pipeline's scoring actor builds its own — and each is reported (a) over
its whole run and (b) in steady state, after its first shard is done (scored, for bare; written, for the
pipeline). The ratios pipeline ÷ bare are taken per round. Then a table of on-disk bytes per token split by
column.

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
from harness import planned_shard_docs, print_table, run_paired, shard_bytes_for  # noqa: E402
from models import random_llama  # noqa: E402

from alm_pipeline.assets import bundled_corpus_path, resolve_model  # noqa: E402
from alm_pipeline.pipeline.byteview import ByteView, load_byte_view  # noqa: E402
from alm_pipeline.pipeline.corpus import CorpusConfig  # noqa: E402
from alm_pipeline.pipeline.engine_hf import HFEngineConfig, HFTeacherEngine  # noqa: E402
from alm_pipeline.pipeline.ray_utils import RayConfig, ensure_ray  # noqa: E402
from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, build_teacher_cache  # noqa: E402


def bare_run(
    model: str, view: ByteView, shards: list[list[np.ndarray]], batch_tokens: int, threads: int
) -> dict:
    """Build the engine (load the model) and score every shard; rates over the whole run and after shard 1."""
    t0 = time.perf_counter()
    engine = HFTeacherEngine(
        HFEngineConfig(model=model, max_batch_tokens=batch_tokens, num_threads=threads),
        view.boundary_token_ids(),
        view.vocab_size,
    )
    tokens, first_tokens, first_done = 0, 0, None
    for shard in shards:
        engine.score(shard)
        tokens += sum(len(s) for s in shard)
        if first_done is None:
            first_done, first_tokens = time.perf_counter(), tokens
    end = time.perf_counter()
    steady = (tokens - first_tokens) / (end - first_done) if end > first_done else float("nan")
    return {
        "tokens": tokens,
        "tok_s": tokens / (end - t0),
        "steady_tok_s": steady,
        "first_s": first_done - t0,
    }


def pipeline_run(config: TeacherCacheConfig) -> dict:
    """``build_teacher_cache`` into a fresh folder (the last run's cache is kept for the size table)."""
    shutil.rmtree(config.output, ignore_errors=True)
    summary = build_teacher_cache(config)
    t = summary.timings
    result = {
        "tokens": summary.tokens,
        "tok_s": summary.tokens / t["ray_pipeline"],
        "steady_tok_s": t.get("steady_tokens_per_second", float("nan")),
        "first_s": t["first_shard"],
        "actor_tok_s": summary.tokens / t["actor_busy"],
        "stage_s": t["stage_corpus"],
        "ray_s": t["ray_pipeline"],
    }
    return result


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
    ap.add_argument("--shard-docs", type=int, default=4, help="about this many documents per shard")
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
    shard_size = shard_bytes_for(str(corpus), args.shard_docs)
    threads = max(1, round(args.actor_cpus))  # the scoring actor's torch threads (see engine_hf)

    rows = []
    size_tables: dict[str, tuple[dict[str, int], int]] = {}
    for name in args.models.split(","):
        model = (
            random_llama(resolve_model("smollm2-135m"), work / "small", "small")
            if name == "small"
            else resolve_model(name)
        )
        view = load_byte_view(model)
        texts = [json.loads(line)["text"] for line in lines]
        seqs = [view.encode(t, max_length=args.max_length).token_ids for t in texts]
        shards, start = [], 0
        for n in planned_shard_docs(str(corpus), shard_size):  # the stage's own cuts, for both sides
            shards.append(seqs[start : start + n])
            start += n
        config = TeacherCacheConfig(
            teacher=model,
            corpus=CorpusConfig(path=str(corpus)),
            output=str(work / f"cache_{name}"),
            max_length=args.max_length,
            shard_size=shard_size,
            batch_tokens=args.batch_tokens,
            num_cpus_per_actor=args.actor_cpus,
        )
        runs = run_paired(
            {
                "bare": lambda model=model, view=view, shards=shards: bare_run(
                    model, view, shards, args.batch_tokens, threads
                ),
                "pipeline": lambda config=config: pipeline_run(config),
            },
            reps=args.reps,
        )
        bare, pipe = runs.results["bare"], runs.results["pipeline"]
        assert all(r["tokens"] == pipe[0]["tokens"] for r in bare + pipe), "both sides score the same tokens"
        rows.append(
            [
                name,
                pipe[0]["tokens"],
                runs.spread("bare", "tok_s").format(".0f"),
                runs.spread("pipeline", "tok_s").format(".0f"),
                runs.ratio("pipeline", "bare", metric="tok_s").format(".2f"),
                runs.spread("bare", "steady_tok_s").format(".0f"),
                runs.spread("pipeline", "steady_tok_s").format(".0f"),
                runs.ratio("pipeline", "bare", metric="steady_tok_s").format(".2f"),
                runs.spread("pipeline", "actor_tok_s").format(".0f"),
                runs.spread("bare", "first_s").format(".1f"),
                runs.spread("pipeline", "first_s").format(".1f"),
            ]
        )

        out = Path(config.output)  # the last pipeline run's cache
        size_tables[f"{name}, {len(shards)} shards of ~{args.shard_docs} docs"] = (
            column_bytes(out),
            pipe[-1]["tokens"],
        )
        size_tables[f"{name}, same rows in 1 shard"] = repacked_bytes(out, work / f"repacked_{name}")

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
                shard_size=big.stat().st_size + 1,
                num_cpus_per_actor=args.actor_cpus,
            )
        )
        size_tables[f"small, 1 shard of {args.size_docs} docs"] = (column_bytes(out), s.tokens)

    for title, (sizes, tokens) in size_tables.items():
        table = [[col, f"{size / tokens:.2f}"] for col, size in sorted(sizes.items(), key=lambda kv: -kv[1])]
        table.append(["TOTAL", f"{sum(sizes.values()) / tokens:.2f}"])
        print_table(
            ["column", "bytes/token"], table, title=f"on-disk bytes per token: {title} ({tokens} tokens)"
        )

    print(
        f"\nlocal Ray start: {ray_start:.1f}s (not counted below); {threads} torch thread(s) on both sides; "
        f"no warm-up on either side (model load and first shard timed on both); {args.reps} paired rounds in "
        "alternating order; median [min–max]"
    )
    print_table(
        [
            "model",
            "tokens",
            "bare tok/s",
            "pipe tok/s",
            "pipe/bare",
            "bare steady tok/s",
            "pipe steady tok/s",
            "steady pipe/bare",
            "pipe in-actor tok/s",
            "bare 1st shard s",
            "pipe 1st shard s",
        ],
        rows,
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
