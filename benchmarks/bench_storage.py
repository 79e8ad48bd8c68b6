"""The chain on object storage vs on the local disk: teacher-cache → align → train with every path on ``s3://``
(a real S3 server on this machine, SeaweedFS) ÷ the same with every path on a local folder.

Both sides do the same work in one process with one local Ray (started after the S3 variables are set, so the
workers reach the bucket): the bundled corpus (its first ``--docs`` documents) is cached by a seeded random Llama
teacher with the GPT-2 tokenizer (``--size``), aligned to the teacher's own tokenizer and a ``bytes`` student
tokenizer, and a student initialised from the teacher trains ``--steps`` steps on the GPT-2 set with one Ray Train
worker. The local side reads its corpus from a local file and writes under a fresh local folder; the S3 side reads
the corpus from the bucket and writes under a fresh prefix. Sides alternate (``harness.run_paired``); each stage's
seconds are reported with the ratio S3 ÷ local per round (median [min–max]). Goal (issue 11): total <= 1.3x.

Note: the S3 server runs on the same 2 cores as the pipeline, so its CPU time counts against the S3 side here;
on a cluster the store is elsewhere and the network is the cost instead.

    python benchmarks/bench_storage.py                 # 256 documents, 3 rounds
    python benchmarks/bench_storage.py --docs 64 --reps 1 --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness import print_table, run_paired  # noqa: E402
from models import random_llama  # noqa: E402

STAGES = ("teacher_cache", "align", "train")


def _corpus(path: Path, docs: int) -> Path:
    from alm_pipeline.assets import bundled_corpus_path

    lines = Path(bundled_corpus_path()).read_text().splitlines()[:docs]
    path.write_text("\n".join(lines) + "\n")
    return path


def _chain(root: str, corpus: str, teacher: str, args, counter: list[int]) -> dict:
    """teacher-cache → align (two students) → train under ``root``; seconds per stage."""
    from alm_pipeline.cli.options import build_config
    from alm_pipeline.pipeline.align_stage import AlignConfig, build_aligned_sets
    from alm_pipeline.pipeline.corpus import CorpusConfig
    from alm_pipeline.pipeline.ray_utils import RayConfig
    from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, build_teacher_cache
    from alm_pipeline.trainer.config import TrainConfig
    from alm_pipeline.trainer.driver import run_training

    counter[0] += 1
    out = f"{root}/round{counter[0]}"
    ray = RayConfig(num_cpus=2)
    times = {}
    t0 = time.perf_counter()
    build_teacher_cache(
        TeacherCacheConfig(
            teacher=teacher,
            corpus=CorpusConfig(path=corpus),
            output=f"{out}/cache",
            max_length=args.max_length,
            shard_size=args.shard_bytes,
            batch_tokens=4096,
            ray=ray,
        )
    )
    times["teacher_cache"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_aligned_sets(
        AlignConfig(
            cache=f"{out}/cache",
            student_tokenizers=(teacher, "bytes"),
            output=f"{out}/aligned",
            ray=ray,
        )
    )
    times["align"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    config = build_config(
        TrainConfig,
        {
            "aligned": f"{out}/aligned/{Path(teacher).name}",
            "init_from": teacher,
            "output": f"{out}/run",
            "steps": args.steps,
            "batch_size": 8,
            "micro_batch_tokens": 1024,
            "checkpoint_every": args.steps,
            "progress": False,
            "tensorboard": False,
            "torch_threads": 1,
        },
    )
    run_training(config)
    times["train"] = time.perf_counter() - t0
    times["total"] = sum(times.values())
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=256, help="documents of the bundled corpus")
    ap.add_argument("--shard-bytes", type=int, default=64 * 1024, help="teacher-cache --shard-size")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", default="small", help="teacher size (benchmarks/models.py LLAMA_SIZES)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import ray

    from alm_pipeline.assets import resolve_model
    from alm_pipeline.pipeline.ray_utils import RayConfig, ensure_ray
    from alm_pipeline.storage import location
    from tests.s3server import in_env, start_s3_server

    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    teacher = random_llama(resolve_model("gpt2-tokenizer"), work / "teacher", args.size)
    corpus = _corpus(work / "corpus.jsonl", args.docs)
    server = start_s3_server(work / "seaweedfs")
    try:
        bucket = server.make_bucket("bench")
        with in_env(server):
            location(f"{bucket}/corpus.jsonl").write_bytes(corpus.read_bytes())
            ensure_ray(RayConfig(num_cpus=2))  # after the S3 variables: the workers inherit them
            local_rounds, s3_rounds = [0], [0]
            runs = run_paired(
                {
                    "local": lambda: _chain(str(work / "local"), str(corpus), teacher, args, local_rounds),
                    "s3": lambda: _chain(f"{bucket}/out", f"{bucket}/corpus.jsonl", teacher, args, s3_rounds),
                },
                reps=args.reps,
            )
            ray.shutdown()
    finally:
        server.stop()
    rows = []
    for stage in (*STAGES, "total"):
        rows.append(
            [
                stage,
                runs.spread("local", stage).format(".1f"),
                runs.spread("s3", stage).format(".1f"),
                runs.ratio("s3", "local", stage).format(".2f"),
            ]
        )
    print_table(
        ["stage", "local s", "s3 s", "s3 ÷ local"],
        rows,
        title=f"{args.docs} docs, teacher {args.size}, {args.steps} train steps, {args.reps} rounds (median [min–max])",
    )


if __name__ == "__main__":
    main()
