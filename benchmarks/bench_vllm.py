"""vLLM teacher engine vs hf teacher engine: tokens/s on the same model, corpus, machine and thread count.

Both engines score the same token sequences (the bundled corpus, tokenized by the teacher) in this
process, shard by shard (``--shard-size`` documents per ``score`` call, as the Ray actor does). For each
thread count ``N`` of ``--threads`` and each vLLM setting of ``--configs``, the two sides compute on ``N``
threads each:

* **hf**: ``HFTeacherEngine`` with ``num_threads=N`` (torch intra-op threads);
* **vllm**: ``VLLMTeacherEngine`` whose CPU worker is bound to ``N`` cores
  (``VLLM_CPU_OMP_THREADS_BIND=0-<N-1>``; vLLM's scheduler process runs beside it, as in real use) and whose
  LM head (exact mode, this process) runs on ``N`` torch threads.

Both engines are started, then warmed up identically (``--warmup`` untimed calls of each on all shards,
compilation included), then timed in ``--reps`` paired rounds in alternating order (:mod:`harness`); the ratio
vllm ÷ hf is taken per round. Engine start-up is reported separately, not counted in tokens/s.

vLLM settings measured (``--configs``, comma list):

* ``exact``           exact σ: pooling runner + our LM head (the default of ``--engine vllm``), eager
* ``exact-compiled``  the same with vLLM's compiled mode (``enforce_eager=False``: torch.compile on CPU)
* ``prompt-lp``       vLLM's own ``prompt_logprobs`` path (``boundary_mode=topk``, k=1): what ℓ alone costs
                      in vLLM; its σ is only a lower bound, shown for the cost of exactness

    VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/bench_vllm.py    # SmolLM2-135M (scripts/setup.sh)
    VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/bench_vllm.py --docs 16 --reps 1 --configs exact --threads 1
    python benchmarks/bench_vllm.py --device cuda --dtype bfloat16 --configs exact-compiled --threads 16  # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from harness import print_table, run_paired  # noqa: E402

VLLM_CONFIGS = {
    "exact": {"enforce_eager": True},
    "exact-compiled": {"enforce_eager": False},
    "prompt-lp": {"enforce_eager": True, "boundary_mode": "topk", "boundary_topk": 1},
}


def _hf(model: str, view, threads: int, batch_tokens: int, device: str = "auto", dtype: str = "float32"):
    from alm_pipeline.pipeline.engine_hf import HFEngineConfig, HFTeacherEngine

    return HFTeacherEngine(
        HFEngineConfig(
            model=model, dtype=dtype, device=device, max_batch_tokens=batch_tokens, num_threads=threads
        ),
        view.boundary_token_ids(),
        view.vocab_size,
    )


def _vllm(model: str, view, name: str, max_length: int, threads: int, dtype: str = "float32"):
    """A vLLM engine whose worker computes on cores 0..threads-1 and whose LM head uses ``threads`` threads."""
    from alm_pipeline.pipeline.engine_vllm import VLLMEngineConfig, VLLMTeacherEngine

    if name not in VLLM_CONFIGS:
        raise SystemExit(f"unknown config {name!r}; known: {', '.join(VLLM_CONFIGS)}")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}" if threads > 1 else "0"
    config = VLLMEngineConfig(
        model=model, dtype=dtype, max_model_len=max_length, num_threads=threads, **VLLM_CONFIGS[name]
    )
    return VLLMTeacherEngine(config, view.boundary_token_ids(), view.vocab_size)


def _score_all(engine, shards) -> list:
    return [r for shard in shards for r in engine.score(shard)]


class _PeakCuda:
    """The largest ``torch.cuda.max_memory_allocated`` seen over the calls it wraps (0 without CUDA). It counts
    this process only: vLLM's engine core (its own process) and its KV cache are not in it."""

    def __init__(self):
        self.peak = 0

    def wrap(self, fn):
        import torch

        def call():
            if not torch.cuda.is_available():
                return fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            out = fn()
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
            return out

        return call


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
    ap.add_argument(
        "--threads", default=",".join(sorted({"1", str(os.cpu_count())})), help="comma list of thread counts"
    )
    ap.add_argument("--reps", type=int, default=3, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each engine before the rounds")
    ap.add_argument("--configs", default=",".join(VLLM_CONFIGS))
    ap.add_argument("--device", default="auto", help="hf engine: auto | cpu | cuda (vLLM uses its platform)")
    ap.add_argument(
        "--dtype", default="float32", help="weights of both engines: float32 | bfloat16 | float16"
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
    for threads in [int(t) for t in args.threads.split(",")]:
        for name in args.configs.split(","):
            hf = _hf(model, view, threads, args.batch_tokens, args.device, args.dtype)
            t0 = time.perf_counter()
            vllm = _vllm(model, view, name, args.max_length, threads, args.dtype)
            start = time.perf_counter() - t0
            peak = {"hf": _PeakCuda(), "vllm": _PeakCuda()}
            try:
                runs = run_paired(
                    {
                        "hf": peak["hf"].wrap(lambda hf=hf: _score_all(hf, shards)),
                        "vllm": peak["vllm"].wrap(lambda vllm=vllm: _score_all(vllm, shards)),
                    },
                    reps=args.reps,
                    warmup=args.warmup,
                )
            finally:
                vllm.close()
            lp_diff, bl_diff = _max_diff(runs.results["vllm"][-1], runs.results["hf"][-1])
            hf_s, vllm_s = runs.spread("hf"), runs.spread("vllm")
            rows.append(
                {
                    "config": name,
                    "threads": threads,
                    "start_s": start,
                    "hf_tok_s": tokens / hf_s.median,
                    "vllm_tok_s": tokens / vllm_s.median,
                    "hf_s": hf_s,
                    "vllm_s": vllm_s,
                    "speedup": runs.ratio("hf", "vllm"),  # time hf / time vllm = (tok/s vllm) / (tok/s hf)
                    "max_dlogprob": lp_diff,
                    "max_dboundary": bl_diff,
                    "settings": vllm.settings,
                    "dtype": args.dtype,
                    "hf_peak_cuda_bytes": peak["hf"].peak,  # this process; both engines' weights resident
                    "vllm_peak_cuda_bytes": peak["vllm"].peak,
                }
            )
            print(f"  {name}, {threads} thread(s): vllm ÷ hf {rows[-1]['speedup'].format('.2f')}", flush=True)

    print(
        f"\n{args.warmup} untimed warm-up call(s) of each engine, then {args.reps} paired rounds in alternating "
        "order; both sides on the same number of threads; median [min–max]"
    )
    print_table(
        [
            "vllm config",
            "threads",
            "vllm start s",
            "hf s",
            "vllm s",
            "hf tok/s",
            "vllm tok/s",
            "vllm ÷ hf",
            "max|Δℓ|",
            "max|Δσ|",
        ],
        [
            [
                r["config"],
                r["threads"],
                f"{r['start_s']:.1f}",
                r["hf_s"].format(".2f"),
                r["vllm_s"].format(".2f"),
                f"{r['hf_tok_s']:,.0f}",
                f"{r['vllm_tok_s']:,.0f}",
                r["speedup"].format(".2f"),
                f"{r['max_dlogprob']:.1e}",
                f"{r['max_dboundary']:.1e}",
            ]
            for r in rows
        ],
    )
    print(
        "(tok/s from the median time; vllm ÷ hf is the per-round tok/s ratio; σ of prompt-lp is a top-1 lower bound)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=vars))  # a Spread as its fields


if __name__ == "__main__":
    main()
