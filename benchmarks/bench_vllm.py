"""vLLM teacher engine vs hf teacher engine: tokens/s on the same model, corpus and machine.

Both engines score the same token sequences (the bundled corpus, tokenized by the teacher) in this
process, shard by shard (``--shard-size`` documents per ``score`` call, as the Ray actor does). Each vLLM
setting gets its own engine (started, warmed up on one shard, timed, closed); the hf baselines run between
them, so every ratio compares runs taken minutes apart on the same (shared) machine. Steady-state numbers:
engine start-up and compilation are reported separately, not counted in tokens/s.

vLLM settings measured (``--configs``, comma list):

* ``exact``           exact σ: pooling runner + our LM head (the default of ``--engine vllm``), eager
* ``exact-compiled``  the same with vLLM's compiled mode (``enforce_eager=False``: torch.compile on CPU)
* ``prompt-lp``       vLLM's own ``prompt_logprobs`` path (``boundary_mode=topk``, k=1): what ℓ alone costs
                      in vLLM; its σ is only a lower bound, shown for the cost of exactness
* ``*-bind2``          any of the above with VLLM_CPU_OMP_THREADS_BIND=0-<last> (vLLM's worker on all cores;
                      by default vLLM keeps one core for its scheduler process and computes on the others,
                      which is also where our LM head runs, ``--head-threads`` threads)

    python benchmarks/bench_vllm.py                       # SmolLM2-135M (scripts/setup.sh), 64 docs × ≤256 tok
    python benchmarks/bench_vllm.py --docs 16 --reps 1 --configs exact
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402


def _hf(model: str, view, threads: int, batch_tokens: int):
    from alm_pipeline.pipeline.engine_hf import HFEngineConfig, HFTeacherEngine

    return HFTeacherEngine(
        HFEngineConfig(model=model, max_batch_tokens=batch_tokens, num_threads=threads),
        view.boundary_token_ids(),
        view.vocab_size,
    )


def _vllm(model: str, view, name: str, max_length: int, threads: int):
    from alm_pipeline.pipeline.engine_vllm import VLLMEngineConfig, VLLMTeacherEngine

    base = name.removesuffix("-bind2")
    if name.endswith("-bind2"):
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{os.cpu_count() - 1}"
    else:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    kw = {"model": model, "max_model_len": max_length, "num_threads": threads}
    if base == "exact":
        kw["enforce_eager"] = True
    elif base == "exact-compiled":
        kw["enforce_eager"] = False
    elif base == "prompt-lp":
        kw.update(enforce_eager=True, boundary_mode="topk", boundary_topk=1)
    else:
        raise SystemExit(f"unknown config {name!r}")
    return VLLMTeacherEngine(VLLMEngineConfig(**kw), view.boundary_token_ids(), view.vocab_size)


def _timed(engine, shards, reps: int) -> tuple[list[float], list]:
    tokens = sum(len(s) for shard in shards for s in shard)
    rates, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = [r for shard in shards for r in engine.score(shard)]
        rates.append(tokens / (time.perf_counter() - t0))
    return rates, out


def _max_diff(got, ref) -> tuple[float, float]:
    lp = max(
        float(np.nanmax(np.abs(a[0] - b[0]))) if len(a[0]) > 1 else 0.0 for a, b in zip(got, ref, strict=True)
    )
    bl = max(float(np.max(np.abs(a[1] - b[1]))) for a, b in zip(got, ref, strict=True))
    return lp, bl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="short asset name or model folder")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=16, help="documents per score() call")
    ap.add_argument("--batch-tokens", type=int, default=2048, help="hf engine: padded tokens per forward")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="hf engine: torch threads (also 1)")
    ap.add_argument(
        "--head-threads",
        type=int,
        default=1,
        help="vllm exact mode: torch threads of our LM head (this process)",
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--configs", default="exact,exact-bind2,exact-compiled,exact-compiled-bind2,prompt-lp,prompt-lp-bind2"
    )
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()

    import torch

    from alm_pipeline.assets import bundled_corpus_path, resolve_model
    from alm_pipeline.pipeline.byteview import load_byte_view

    model = resolve_model(args.model)
    view = load_byte_view(model)
    lines = Path(bundled_corpus_path()).read_text().splitlines()[: args.docs]
    seqs = [view.encode(json.loads(x)["text"], max_length=args.max_length).token_ids for x in lines]
    shards = [seqs[i : i + args.shard_size] for i in range(0, len(seqs), args.shard_size)]
    tokens = sum(len(s) for s in seqs)
    print(
        f"model {model}: {len(seqs)} docs, {tokens} tokens, {len(shards)} shards; {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}",
        flush=True,
    )

    rows: list[dict] = []
    ref = None
    hf_rates: dict[int, list[float]] = {1: [], args.threads: []}

    def run_hf() -> None:
        nonlocal ref
        for threads in sorted(hf_rates):
            engine = _hf(model, view, threads, args.batch_tokens)
            engine.score(shards[0])  # warm-up
            rates, out = _timed(engine, shards, args.reps)
            hf_rates[threads] += rates
            ref = ref or out
            print(f"  hf, {threads} thread(s): {statistics.median(rates):,.0f} tok/s", flush=True)
        torch.set_num_threads(args.threads)

    run_hf()
    for name in args.configs.split(","):
        t0 = time.perf_counter()
        engine = _vllm(model, view, name, args.max_length, args.head_threads)
        start = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.score(shards[0])  # warm-up (and, compiled, any remaining compilation)
        warm = time.perf_counter() - t0
        rates, out = _timed(engine, shards, args.reps)
        engine.close()
        lp_diff, bl_diff = _max_diff(out, ref)
        rows.append(
            {
                "config": name,
                "start_s": start,
                "warmup_s": warm,
                "tok_s": statistics.median(rates),
                "max_dlogprob": lp_diff,
                "max_dboundary": bl_diff,
            }
        )
        rows[-1]["settings"] = engine.settings
        print(
            f"  vllm {name}: {rows[-1]['tok_s']:,.0f} tok/s (start {start:.0f}s) {engine.settings}",
            flush=True,
        )
        run_hf()  # baselines again, close in time to each vLLM measurement

    hf1 = statistics.median(hf_rates[1])
    hfn = statistics.median(hf_rates[args.threads])
    print(f"\nhf engine: {hf1:,.0f} tok/s with 1 thread, {hfn:,.0f} tok/s with {args.threads} (median)")
    print(
        f"{'vllm config':<24}{'start s':>9}{'warm-up s':>11}{'tok/s':>10}"
        f"{f'÷ hf({args.threads}t)':>12}{'÷ hf(1t)':>10}{'max|Δℓ|':>11}{'max|Δσ|':>11}"
    )
    for r in rows:
        print(
            f"{r['config']:<24}{r['start_s']:>9.1f}{r['warmup_s']:>11.1f}{r['tok_s']:>10,.0f}"
            f"{r['tok_s'] / hfn:>12.2f}{r['tok_s'] / hf1:>10.2f}{r['max_dlogprob']:>11.1e}{r['max_dboundary']:>11.1e}"
        )
    print("(σ of prompt-lp is a top-1 lower bound, so its Δσ is large by design)")
    if args.json:
        Path(args.json).write_text(json.dumps({"hf": hf_rates, "vllm": rows}, indent=2))


if __name__ == "__main__":
    main()
