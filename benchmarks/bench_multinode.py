"""Teacher-cache throughput on a simulated multi-node Ray cluster: 1 vs 2 worker nodes.

A head node (1 CPU: the read/tokenize and write tasks) and worker nodes of 1 CPU each with a custom resource
standing in for a GPU (:mod:`tests.multinode.simcluster`); each scoring actor asks for that resource, so the
teacher replicas go one per worker node. Both sides run ``build_teacher_cache`` with the same settings
(``--concurrency 2``) on the same corpus into a fresh folder; the only difference is the number of live worker
nodes: with one, the stage starts the one replica that fits (and says so). Paired rounds in alternating order;
the node count changes between calls. Reported: tokens/s over the whole run and after the first written shard
(actors started), and the ratio 2 nodes ÷ 1 node per round.

On this 2-core machine the two "nodes" share two cores with the head and Ray's own processes, so the ratio
is bounded well below 2; on a cluster each node brings its own machine.

    python benchmarks/bench_multinode.py                 # SmolLM2's tokenizer, a small random Llama
    python benchmarks/bench_multinode.py --docs 64 --reps 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness import print_table, run_paired, shard_bytes_for  # noqa: E402
from models import random_llama  # noqa: E402

from alm_pipeline.assets import bundled_corpus_path, resolve_model  # noqa: E402
from alm_pipeline.pipeline.corpus import CorpusConfig  # noqa: E402
from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, build_teacher_cache  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=192)
    ap.add_argument("--shard-docs", type=int, default=12, help="about this many documents per shard")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import ray

    from tests.multinode.simcluster import ACCEL, SimCluster

    work = Path(tempfile.mkdtemp(prefix="bench-multinode-"))
    corpus = work / "corpus.jsonl"
    corpus.write_text("\n".join(Path(bundled_corpus_path()).read_text().splitlines()[: args.docs]) + "\n")
    model = random_llama(resolve_model("smollm2-135m"), work / "model", "small")
    cluster = SimCluster(workers=2)
    os.environ["RAY_ADDRESS"] = cluster.address
    ray.init(address=cluster.address)
    runs = {"n": 0}

    def run(nodes: int):
        def side() -> dict:
            while len(cluster.workers) > nodes:
                cluster.remove_worker(0)
            cluster.ensure_workers(nodes)
            runs["n"] += 1
            out = work / f"cache-{runs['n']}"
            summary = build_teacher_cache(
                TeacherCacheConfig(
                    teacher=model,
                    corpus=CorpusConfig(path=str(corpus)),
                    output=str(out),
                    max_length=args.max_length,
                    shard_size=shard_bytes_for(str(corpus), args.shard_docs),
                    batch_tokens=2048,
                    concurrency="2",
                    num_cpus_per_actor=0.5,
                    threads_per_actor=1,
                    actor_resources=(f"{ACCEL}=1",),
                )
            )
            shutil.rmtree(out, ignore_errors=True)
            return {
                "tokens_per_s": summary.tokens_per_second,
                "steady_tokens_per_s": summary.timings.get("steady_tokens_per_second", float("nan")),
                "tokens": summary.tokens,
            }

        return side

    try:
        result = run_paired({"1 node": run(1), "2 nodes": run(2)}, reps=args.reps)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    tokens = result.results["1 node"][0]["tokens"]
    rows = [
        [
            side,
            result.spread(side).format(".1f"),
            result.spread(side, "tokens_per_s").format(",.0f"),
            result.spread(side, "steady_tokens_per_s").format(",.0f"),
        ]
        for side in ("1 node", "2 nodes")
    ]
    rows.append(
        [
            "2 nodes ÷ 1 node",
            "",
            result.ratio("2 nodes", "1 node", "tokens_per_s").format(".2f"),
            result.ratio("2 nodes", "1 node", "steady_tokens_per_s").format(".2f"),
        ]
    )
    print_table(
        ["worker nodes", "wall s", "tokens/s (run)", "tokens/s (after shard 1)"],
        rows,
        title=f"teacher-cache on a simulated cluster: {args.docs} docs, {tokens} tokens, {args.reps} paired rounds "
        "(median [min–max])",
    )


if __name__ == "__main__":
    main()
