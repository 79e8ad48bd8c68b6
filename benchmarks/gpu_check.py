"""The prepared GPU check: one table of what only a GPU can tell, from the existing benchmarks run with GPU arguments.

(a) ``bench_vllm.py``: hf engine vs vLLM engine (exact σ, compiled) on the same GPU, model (SmolLM2-135M) and
    documents, in bfloat16 and in float32: max |Δℓ| and max |Δσ| (goals 1e-3 in bf16, 1e-4 in fp32) and the
    tokens/s ratio vLLM ÷ hf (goal ≥ 2, bf16);
(b) ``bench_train.py --bf16``: the cached ALM train step ÷ the plain next-token step (transformers' own loss),
    bfloat16 autocast (goal ≤ 1.10);
(c) the peak GPU memory of each (``torch.cuda.max_memory_allocated`` of the measuring process: for the engines,
    both engines' weights are resident in it, and vLLM's engine core and KV cache, in their own process, are not).

Each benchmark runs in its own process; the table goes to stdout and, when ``$OUT`` is set, to ``$OUT/gpu_check.md``.

    python benchmarks/gpu_check.py --device cuda          # what benchmarks/gpu_check.sh runs (a GPU machine)
    python benchmarks/gpu_check.py --device cpu --tiny    # dry run on a CPU: every step, tiny sizes
    python benchmarks/gpu_check.py --device cpu --tiny --skip-vllm   # without vLLM (the test runs this)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (full run on a GPU, --tiny dry run)
ENGINE_ARGS = {
    False: ["--docs", "256", "--max-length", "512", "--shard-size", "64", "--batch-tokens", "16384"]
    + ["--reps", "3", "--warmup", "1", "--configs", "exact-compiled"],
    True: ["--docs", "4", "--max-length", "64", "--shard-size", "4", "--batch-tokens", "512"]
    + ["--reps", "1", "--warmup", "0", "--configs", "exact"],
}
TRAIN_ARGS = {
    False: ["--batch-size", "8", "--seq-len", "512", "--steps", "5", "--warmup", "2"],
    True: ["--num-layers", "1", "--batch-size", "2", "--seq-len", "32", "--steps", "1", "--warmup", "0"],
}
GOALS = {"bfloat16": 1e-3, "float32": 1e-4}


def _run(script: str, args: list[str], json_path: Path, timeout: float) -> tuple[object | None, str]:
    """Run ``benchmarks/<script>`` with ``args`` and ``--json json_path``; (its JSON, "") or (None, why not)."""
    cmd = [sys.executable, str(HERE / script), *args, "--json", str(json_path)]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    except subprocess.TimeoutExpired:
        return None, f"{script}: timed out after {timeout:.0f} s"
    print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    if done.returncode != 0 or not json_path.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        print(done.stderr[-3000:], file=sys.stderr)
        return None, f"{script} failed (exit {done.returncode}): {tail[0][:160]}"
    return json.loads(json_path.read_text()), ""


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def engine_rows(args, tmp: Path) -> list[list[str]]:
    if args.skip_vllm:
        return [["(a) hf vs vLLM engine", "skipped (--skip-vllm)", "", "-"]]
    rows: list[list[str]] = []
    common = [
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--model",
        args.model,
        *ENGINE_ARGS[args.tiny],
    ]
    for dtype in ("bfloat16", "float32"):
        got, why = _run(
            "bench_vllm.py", [*common, "--dtype", dtype], tmp / f"vllm-{dtype}.json", args.timeout
        )
        if got is None:
            rows.append([f"(a) hf vs vLLM, {dtype}", why, "", "NO"])
            continue
        r = got[0]
        goal = GOALS[dtype]
        speedup = r["speedup"]["median"]
        rows += [
            [
                f"(a) max abs Δℓ, {dtype}",
                f"{r['max_dlogprob']:.1e}",
                f"≤ {goal:.0e}",
                _verdict(r["max_dlogprob"] <= goal),
            ],
            [
                f"(a) max abs Δσ, {dtype}",
                f"{r['max_dboundary']:.1e}",
                f"≤ {goal:.0e}",
                _verdict(r["max_dboundary"] <= goal),
            ],
            [
                f"(a) tokens/s vLLM ÷ hf, {dtype}",
                f"{speedup:.2f} ({r['vllm_tok_s']:,.0f} / {r['hf_tok_s']:,.0f})",
                "≥ 2" if dtype == "bfloat16" else "",
                _verdict(speedup >= 2) if dtype == "bfloat16" else "-",
            ],
            [
                f"(c) peak GPU memory hf / vLLM engine, {dtype}",
                f"{_mib(r['hf_peak_cuda_bytes'])} / {_mib(r['vllm_peak_cuda_bytes'])}",
                "",
                "-",
            ],
        ]
    return rows


def train_rows(args, tmp: Path) -> list[list[str]]:
    common = ["--device", args.device, "--bf16", "--modes", "ntp_hf,alm", "--threads", str(args.threads)]
    common += ["--model", args.model]
    got, why = _run("bench_train.py", [*common, *TRAIN_ARGS[args.tiny]], tmp / "train.json", args.timeout)
    if got is None:
        return [["(b) cached ALM step ÷ next-token step, bf16", why, "≤ 1.10", "NO"]]
    res = got["results"]
    # per-round ratio, as bench_train reports it: rounds ran both modes back to back
    ratios = sorted(a / b for a, b in zip(res["alm"]["times"], res["ntp_hf"]["times"], strict=True))
    ratio = ratios[len(ratios) // 2]
    return [
        [
            "(b) cached ALM step ÷ next-token step, bf16",
            f"{ratio:.3f} ({res['alm']['step']['median'] * 1e3:.0f} / {res['ntp_hf']['step']['median'] * 1e3:.0f} ms)",
            "≤ 1.10",
            _verdict(ratio <= 1.10),
        ],
        [
            "(c) peak memory next-token / ALM step, bf16",
            f"{_mib(res['ntp_hf']['peak_bytes'])} / {_mib(res['alm']['peak_bytes'])}",
            "",
            "-",
        ],
    ]


def table(rows: list[list[str]], header: str) -> str:
    lines = [header, "", "| check | measured | goal | met |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run)")
    ap.add_argument(
        "--tiny", action="store_true", help="tiny sizes: checks that every step runs, not the numbers"
    )
    ap.add_argument("--skip-vllm", action="store_true", help="leave out (a) (no vLLM here)")
    ap.add_argument(
        "--model",
        default=None,
        help="default: smollm2-135m; --tiny: a random 1-block Llama with its tokenizer",
    )
    ap.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--timeout", type=float, default=300, help="seconds per benchmark process")
    args = ap.parse_args()

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        if (
            args.model is None and args.tiny
        ):  # a cheap forward with the real tokenizer: the dry run stays short
            from models import random_llama

            from alm_pipeline.assets import resolve_model

            args.model = random_llama(resolve_model("smollm2-135m"), Path(tmp) / "tiny-llama", "tiny")
        args.model = args.model or "smollm2-135m"
        rows = engine_rows(args, Path(tmp)) + train_rows(args, Path(tmp))
    import torch

    device = (
        torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else args.device
    )
    header = (
        f"GPU check on {device}{' (--tiny dry run: sizes too small for the numbers to mean anything)' if args.tiny else ''}"
        f", torch {torch.__version__}, {time.perf_counter() - t0:.0f} s"
    )
    text = table(rows, header)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.md").write_text(text)


if __name__ == "__main__":
    main()
