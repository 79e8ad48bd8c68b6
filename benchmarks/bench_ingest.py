"""Teacher-cache ingestion: driver time until the first shard can be scored, for a corpus of 1x and 10x the size.

A synthetic jsonl corpus (``--mb`` MB, then ``--scale`` times that) and a tiny random Llama teacher with the GPT-2
tokenizer. Two measurements per size, in alternating order (:mod:`harness`):

* **driver**: ``build_teacher_cache`` in a fresh process, timed from the call until the driver hands the shards
  to Ray Data (its "scoring N shards" message; the run is stopped there): listing, teacher check, tokenizer,
  identity check and the shard plan. With ``--compare DIR`` (another checkout, e.g. the main branch before
  streaming ingestion) the same is measured with that checkout's code, whose driver stages the whole corpus.
* **first shard** (``--first-shard``): the ``teacher-cache`` command in a fresh process (local Ray started by
  it) until the first shard's marker is written (``--shard-size 256 KiB``), then killed.

Goal: flat from 1x to 10x.

    python benchmarks/bench_ingest.py                       # 20 MB and 200 MB
    python benchmarks/bench_ingest.py --mb 5 --compare /work/main --first-shard
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from harness import print_table, run_paired  # noqa: E402
from models import random_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# run in a fresh process with the checkout to measure on PYTHONPATH; prints the driver's seconds
DRIVER = """
import sys, time
import torch, transformers  # imported before the clock starts: the driver work is what is timed
from alm_pipeline.pipeline.corpus import CorpusConfig
from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, build_teacher_cache

class Stop(Exception):
    pass

def say(msg):
    if msg.startswith("scoring"):
        raise Stop(msg)

config = TeacherCacheConfig(teacher=sys.argv[1], corpus=CorpusConfig(path=sys.argv[2]), output=sys.argv[3])
t0 = time.perf_counter()
try:
    build_teacher_cache(config, progress=say)
except Stop:
    print(time.perf_counter() - t0)
"""


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> Path:
    """Synthetic jsonl: documents of 200-4000 bytes of words, unique texts."""
    rng = random.Random(seed)
    words = [
        w
        for w in [
            "the",
            "of",
            "and",
            "to",
            "in",
            "a",
            "is",
            "that",
            "for",
            "it",
            "as",
            "was",
            "with",
            "be",
            "by",
            "on",
            "not",
            "he",
            "this",
            "are",
            "or",
        ]
    ]
    target = int(megabytes * 1e6)
    size = 0
    with open(path, "w") as f:
        i = 0
        while size < target:
            n = rng.randint(40, 800)
            text = f"doc {i}: " + " ".join(rng.choice(words) for _ in range(n))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            size += len(line)
            i += 1
    return path


def driver_seconds(checkout: Path, teacher: str, corpus: Path, work: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=work))
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, teacher, str(corpus), str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"driver run failed ({checkout}):\n{proc.stderr[-2000:]}")
    return {"s": float(proc.stdout.strip().splitlines()[-1])}


def first_shard_seconds(teacher: str, corpus: Path, work: Path, timeout: float = 600) -> dict:
    out = Path(tempfile.mkdtemp(dir=work))
    cmd = [
        sys.executable,
        "-m",
        "alm_pipeline.cli.main",
        "teacher-cache",
        "--teacher",
        teacher,
        "--data",
        str(corpus),
        "--output",
        str(out),
        "--shard-size",
        str(256 * 1024),
        "--num-cpus",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    try:
        while not list((out / "shards").glob("*.done.json")):
            if proc.poll() is not None:
                raise RuntimeError(f"teacher-cache ended (rc {proc.returncode}) before writing a shard")
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError("no shard written in time")
            time.sleep(0.05)
        return {"s": time.perf_counter() - t0}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=20.0, help="size of the 1x corpus (MB)")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--compare", type=Path, help="another checkout to measure the same way (e.g. main)")
    parser.add_argument("--first-shard", action="store_true", help="also time the CLI to its first shard")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        work = Path(tmp)
        tokenizer = os.path.join(os.environ.get("ALM_PIPELINE_HOME", REPO / ".models"), "tokenizers", "gpt2")
        teacher = random_llama(tokenizer, work / "teacher", "tiny")
        sizes = {"1x": args.mb, f"{args.scale}x": args.mb * args.scale}
        corpora = {name: write_corpus(work / f"corpus-{name}.jsonl", mb) for name, mb in sizes.items()}
        sides = {}
        for name, corpus in corpora.items():
            sides[f"driver {name}"] = lambda c=corpus: driver_seconds(REPO, teacher, c, work)
            if args.compare:
                sides[f"compare {name}"] = lambda c=corpus: driver_seconds(args.compare, teacher, c, work)
            if args.first_shard:
                sides[f"first shard {name}"] = lambda c=corpus: first_shard_seconds(teacher, c, work)
        runs = run_paired(sides, reps=args.reps)
        big = f"{args.scale}x"
        rows = []
        kinds = (
            ["driver"] + (["compare"] if args.compare else []) + (["first shard"] if args.first_shard else [])
        )
        for kind in kinds:
            rows.append(
                [
                    kind if kind != "compare" else f"driver, {args.compare}",
                    runs.spread(f"{kind} 1x", metric="s").format(".2f"),
                    runs.spread(f"{kind} {big}", metric="s").format(".2f"),
                    runs.ratio(f"{kind} {big}", f"{kind} 1x", metric="s").format(".2f"),
                ]
            )
        print_table(
            [
                "seconds until the first shard",
                f"1x ({args.mb:g} MB)",
                f"{big} ({args.mb * args.scale:g} MB)",
                f"{big} / 1x",
            ],
            rows,
            title=f"teacher-cache ingestion, {args.reps} round(s), median [min-max]",
        )


if __name__ == "__main__":
    main()
