"""Cost of the student statistics (ℓ_S, σ_S) through the LM head, forward + backward, on one slice-able batch.

Sides, measured in paired alternating rounds (``benchmarks/harness.py``):

* ``ce``        — plain cross-entropy through the same head in fp32 slices (the cost floor: one softmax);
* ``fused``     — :func:`alm_pipeline.trainer.token_stats.fused_token_stats`, what the trainer runs;
* ``reference`` — :func:`~alm_pipeline.trainer.token_stats.student_token_stats` (autograd, checkpointed);
* ``fused@REV`` — with ``--against REV``: the fused path of another git revision (its ``token_stats.py`` loaded
  from ``git show``), e.g. to check that a change kept the cost.

    python benchmarks/bench_token_stats.py --rows 1024 --vocab 49152 --hidden 576 --reps 5 --against HEAD~1
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import print_table, run_paired

from alm_pipeline.trainer.token_stats import fused_token_stats, student_token_stats

REPO = Path(__file__).resolve().parents[1]


def load_revision(rev: str):
    """The ``token_stats`` module of git revision ``rev`` (loaded from a temporary file)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:alm_pipeline/trainer/token_stats.py"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "token_stats_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("token_stats_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024, help="positions (batch × length)")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--boundary-fraction", type=float, default=0.4, help="share of tokens in B")
    parser.add_argument("--slice-size", type=int, default=256)
    parser.add_argument("--keep-probs", action="store_true", help="keep probabilities (no recompute)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--against", default=None, help="also time the fused path of this git revision")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, args.rows, args.hidden, generator=gen)
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * 0.05).requires_grad_()
    ids = torch.randint(0, args.vocab, (1, args.rows), generator=gen)
    boundary = torch.rand(args.vocab, generator=gen) < args.boundary_fraction
    mask = torch.ones(1, args.rows, dtype=torch.bool)

    def stats_side(fn, **kw):
        def run():
            h = hidden.clone().requires_grad_()
            stats = fn(
                ids,
                boundary,
                hidden_states=h,
                lm_head_weight=weight,
                attention_mask=mask,
                slice_size=args.slice_size,
                **kw,
            )
            (stats.token_logprob.sum() + stats.boundary_logprob.sum()).backward()
            weight.grad = None

        return run

    targets = torch.roll(ids[0], -1)  # every position predicts the next id (the last one wraps: same work)

    def cross_entropy():
        h = hidden.clone().requires_grad_()
        loss = 0.0
        for lo in range(0, args.rows, args.slice_size):
            logits = F.linear(h[0, lo : lo + args.slice_size], weight).float()
            loss = loss + F.cross_entropy(logits, targets[lo : lo + args.slice_size], reduction="sum")
        loss.backward()
        weight.grad = None

    sides = {
        "ce": cross_entropy,
        "fused": stats_side(fused_token_stats, keep_probs=args.keep_probs),
        "reference": stats_side(student_token_stats, checkpoint_slices=not args.keep_probs),
    }
    if args.against:
        old = load_revision(args.against)
        sides[f"fused@{args.against}"] = stats_side(old.fused_token_stats, keep_probs=args.keep_probs)
    runs = run_paired(sides, reps=args.reps, warmup=args.warmup)
    print_table(
        ["side", "forward+backward s", "÷ ce (per round)", "÷ fused (per round)"],
        [
            [
                name,
                runs.spread(name).format(),
                runs.ratio(name, "ce").format(),
                runs.ratio(name, "fused").format(),
            ]
            for name in sides
        ],
        title=(
            f"{args.rows} positions, vocab {args.vocab}, hidden {args.hidden}, {args.boundary_fraction:.0%} boundary "
            f"tokens, slices of {args.slice_size}, keep_probs={args.keep_probs}, {args.threads} threads; "
            f"{args.warmup} warm-up call(s) per side, {args.reps} paired rounds; median [min–max]"
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
