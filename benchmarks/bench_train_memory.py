"""Per-worker peak memory while training from aligned sets of 1×, 4× and 16× the size (same model, same steps).

A synthetic aligned set for the ``bytes`` student tokenizer (random byte ids, a chunk every few tokens, random
teacher log-probs; ``--docs`` documents of ``--tokens`` tokens in 2 shards); the larger sets replicate its
shards with new document ids. Each size trains a tiny random GPT-2 (``train_local``: one worker, this machine)
for ``--steps`` steps in a fresh process, whose peak resident set size (``ru_maxrss``) is reported with the
index size and the data held in memory. Goal: flat (≤ +10 % from 1× to 16× beyond the index).

    python benchmarks/bench_train_memory.py [--docs 2000] [--tokens 200] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from harness import print_table  # noqa: E402

SCALES = (1, 4, 16)
SHARDS = 2


def _table(n_docs: int, tokens: int, seed: int, prefix: str):
    import numpy as np
    import pyarrow as pa

    from alm_pipeline.cache.aligned import ALIGNED_SCHEMA
    from alm_pipeline.cache.arrow import list_array

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 250, size=n_docs * tokens).astype(np.int32)
    rows = np.arange(n_docs + 1, dtype=np.int64) * tokens
    # chunks of 4 tokens, from token 1 on
    starts = np.arange(1, tokens - 3, 4, dtype=np.int32)
    per = len(starts)
    g_rows = np.arange(n_docs + 1, dtype=np.int64) * per
    cols = {
        "doc_id": pa.array([f"{prefix}{i:07d}" for i in range(n_docs)]),
        "input_ids": list_array(ids, rows, pa.int32()),
        "chunk_start": list_array(np.tile(starts, n_docs), g_rows, pa.int32()),
        "chunk_end": list_array(np.tile(starts + 3, n_docs), g_rows, pa.int32()),
        "teacher_chunk_logprob": list_array(
            -rng.random(n_docs * per).astype(np.float32) * 8, g_rows, pa.float32()
        ),
        "teacher_chunk_boundary_logprob": list_array(
            -rng.random(n_docs * per).astype(np.float32), g_rows, pa.float32()
        ),
        "text_bytes": pa.array(np.full(n_docs, tokens), pa.int32()),
        "covered_bytes": pa.array(np.full(n_docs, per * 4), pa.int32()),
        "num_tokens": pa.array(np.full(n_docs, tokens), pa.int32()),
        "num_chunks": pa.array(np.full(n_docs, per), pa.int32()),
    }
    return pa.Table.from_arrays([cols[n] for n in ALIGNED_SCHEMA.names], schema=ALIGNED_SCHEMA)


def write_set(root: Path, scale: int, docs: int, tokens: int) -> Path:
    """An aligned set of ``scale`` × (``docs`` documents in 2 shards): the base shards replicated, new ids."""
    import pyarrow as pa

    from alm_pipeline.cache.aligned import ALIGNED_ROW_GROUP_ROWS, AlignedSet
    from alm_pipeline.pipeline.align import CoverageStats
    from alm_pipeline.pipeline.align_stage import AlignSettings
    from alm_pipeline.pipeline.byte_tokenizer import build_byte_tokenizer
    from alm_pipeline.pipeline.byteview import load_byte_view

    base = [_table(docs // SHARDS, tokens, seed=k, prefix="") for k in range(SHARDS)]
    infos = []
    for k in range(SHARDS * scale):
        table = base[k % SHARDS]
        table = table.set_column(0, "doc_id", pa.array([f"s{k:04d}-{i:07d}" for i in range(table.num_rows)]))
        infos.append(
            AlignedSet.write_shard(root, k, table, stats={}, row_group_size=ALIGNED_ROW_GROUP_ROWS // 4)
        )
    build_byte_tokenizer().save_pretrained(root / "tokenizer")
    settings = AlignSettings()
    view = load_byte_view("bytes")
    manifest = AlignedSet.new_manifest(
        "complete",
        {"synthetic": scale},
        len(infos),
        infos,
        cache={"path": str(root / "no-cache"), "fingerprint": "synthetic"},
        student_tokenizer={
            "name": "bytes",
            **{k: v for k, v in view.describe().items() if k != "special_ids"},
        },
        settings={**settings.identity(), "min_coverage": settings.min_coverage},
        coverage={
            **CoverageStats().as_dict(),
            "documents_kept": sum(i.rows for i in infos),
            "dropped": {},
            "dropped_examples": [],
        },
    )
    AlignedSet.write_manifest(root, manifest)
    return root


def write_student(path: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from alm_pipeline.pipeline.byte_tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=64,
        n_layer=2,
        n_head=2,
        n_positions=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def child(aligned: str, student: str, output: str, steps: int) -> None:
    """One training run in this process; prints its peak RSS and data figures as JSON."""
    import resource

    from alm_pipeline.cli.options import build_config
    from alm_pipeline.trainer.config import TrainConfig
    from alm_pipeline.trainer.driver import train_local

    cfg = build_config(
        TrainConfig,
        {
            "aligned": aligned,
            "output": output,
            "student": student,
            "steps": steps,
            "batch_size": 16,
            "micro_batch_tokens": 4096,
            "checkpoint_every": steps,
            "progress": False,
            "tensorboard": False,
            "torch_threads": 1,
            "data_cache_mib": 16,
        },
    )
    res = train_local(cfg, say=lambda _m: None)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info = res.info
    print(
        json.dumps(
            {
                "peak_rss_mib": peak_kib / 1024,
                "documents": info.get("documents"),
                "index_mib": info.get("index_mib"),
                "final_loss": res.final_loss,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument(
        "--child", nargs=4, metavar=("ALIGNED", "STUDENT", "OUTPUT", "STEPS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.child:
        child(*args.child[:3], int(args.child[3]))
        return
    with tempfile.TemporaryDirectory(prefix="bench-train-memory-") as tmp:
        tmp = Path(tmp)
        student = write_student(tmp / "student")
        results = {}
        for scale in SCALES:
            aligned = write_set(tmp / f"aligned-{scale}x", scale, args.docs, args.tokens)
            on_disk = sum(f.stat().st_size for f in (aligned / "shards").glob("*.parquet"))
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(aligned),
                    str(student),
                    str(tmp / f"run-{scale}x"),
                    str(args.steps),
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                sys.exit(f"the {scale}x run failed:\n{out.stderr[-3000:]}")
            results[scale] = {**json.loads(out.stdout.strip().splitlines()[-1]), "disk_mib": on_disk / 2**20}
    base = results[SCALES[0]]["peak_rss_mib"]
    rows = [
        [
            f"{s}x",
            r["documents"],
            f"{r['disk_mib']:.1f}",
            f"{r['index_mib']:.2f}",
            f"{r['peak_rss_mib']:.0f}",
            f"{r['peak_rss_mib'] / base:.3f}",
        ]
        for s, r in results.items()
    ]
    print_table(
        ["set", "documents", "shards MiB", "index MiB", "peak RSS MiB", "RSS ÷ 1x"],
        rows,
        title=f"train_local, 1 worker, {args.steps} steps of 16 documents × {args.tokens} tokens (tiny GPT-2)",
    )


if __name__ == "__main__":
    main()
