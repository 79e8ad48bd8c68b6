"""Training step cost: cached ALM vs plain next-token training vs online ALM (teacher forward every step).

One real student (SmolLM2-135M by default, optionally cut to its first N blocks) and one fixed batch of real
text (the bundled Shakespeare corpus, ``--batch-size`` documents of ``--seq-len`` tokens). Self-distillation
set-up: the teacher is the same model with the same tokenizer, so the online variant runs exactly the models
the cached one was prepared with. Timing (:mod:`harness`): all modes share one process; ``--warmup`` untimed
optimizer steps of every mode, then ``--steps`` rounds, each running one optimizer step — forward + backward +
Adam step — of every mode, in alternating order (forward, then reversed); each mode's median and min–max step
time are reported, and its ratio to ``ntp_hf`` is taken per round:

* ``ntp_hf``        — plain next-token training: ``model(input_ids, labels=...)`` (transformers' own loss)
* ``ntp``           — next-token loss through the trainer's path (body + fused fp32 LM-head statistics), ℓ and σ
  computed (what an SFT run cost before σ was skipped)
* ``sft``           — next-token loss alone as the trainer runs it now (``--no-alm --next-token-loss``): ℓ only
* ``alm``           — cached ALM, the trainer's default at this size (fused statistics, fp32 probabilities kept
  for the backward: they fit ``--logits-memory-mib``)
* ``alm_recompute`` — cached ALM recomputing the LM head's logits in the backward (what the trainer does when the
  probabilities would not fit; memory O(slice × vocab))
* ``alm_ref``       — cached ALM through ``loss.student_token_stats`` (autograd, checkpointed slices): the
  reference implementation the fused one is tested against
* ``alm_online``    — online ALM: the teacher's forward (no grad) + its ℓ_T/σ_T + group sums on every step, then
  the ``alm`` student step (the chunk alignment itself is precomputed for both ALM variants)
* ``hybrid_fixed``  — ALM + next-token loss with fixed weights: one backward of the sum per micro-batch
* ``hybrid_gradmag`` — ALM + next-token loss with GradMag as the trainer runs it (``gradmag.GradMagStep``: one
  backward per loss and micro-batch into separate gradients, one set of weights per optimizer step)
* ``hybrid_gradmag_mb`` — the trainer's former GradMag: weights per micro-batch (``gradmag_combine``: two
  backward passes to the last block, then one backward of the weighted sum)

The three ``hybrid_*`` modes cut the batch into ``--micro-batches`` micro-batches (the others run it in one).

Peak memory, measured for each mode in its own fresh process: on CUDA ``torch.cuda.max_memory_allocated``; on
CPU the peak resident set size sampled every 5 ms during one step after a warm-up step (process RSS, so it includes the weights, the optimizer state and the teacher copy).

    python benchmarks/bench_train.py [--num-layers N] [--batch-size 4] [--seq-len 256] [--steps 3]
    python benchmarks/bench_train.py --device cuda --bf16 --modes ntp_hf,alm   # what benchmarks/gpu_check.sh runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from harness import Runs, print_table, run_paired  # noqa: E402

MODES = ["ntp_hf", "ntp", "sft", "alm", "alm_recompute", "alm_ref", "alm_online"]
HYBRID = ["hybrid_fixed", "hybrid_gradmag", "hybrid_gradmag_mb"]


# --------------------------------------------------------------------------------------------------------- data


def prepare(args, out: Path) -> Path:
    """Teacher cache rows for ``batch_size`` documents (hf engine), aligned to the student tokenizer (= the
    teacher's), with the teacher group spans the online variant needs."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alm_pipeline.assets import bundled_corpus_path, resolve_model
    from alm_pipeline.pipeline.align import align_document, merge_and_debias
    from alm_pipeline.pipeline.byteview import load_byte_view
    from alm_pipeline.pipeline.engine_hf import HFEngineConfig, HFTeacherEngine

    model = resolve_model(args.model)
    view = load_byte_view(model)
    texts = []
    with open(bundled_corpus_path()) as f:
        for line in f:
            text = json.loads(line)["text"]
            if len(text) >= 8 * args.seq_len:  # long enough for seq_len tokens
                texts.append(text[: 8 * args.seq_len])
            if len(texts) >= args.batch_size:
                break
    if len(texts) < args.batch_size:
        raise SystemExit(f"the bundled corpus has only {len(texts)} documents long enough")
    encs = [view.encode(t, max_length=args.seq_len, doc_ref=str(i)) for i, t in enumerate(texts)]
    engine = HFTeacherEngine(HFEngineConfig(model=model), view.boundary_token_ids(), view.vocab_size)
    scores = engine.score([e.token_ids for e in encs])
    cols: dict[str, list] = {k: [] for k in ("doc_id", "input_ids", "chunk_start", "chunk_end")}
    cols.update({k: [] for k in ("teacher_chunk_logprob", "teacher_chunk_boundary_logprob")})
    cols.update({k: [] for k in ("teacher_ids", "teacher_start", "teacher_end")})
    for i, (enc, (lp, bl)) in enumerate(zip(encs, scores, strict=True)):
        special = view.is_special[enc.token_ids]
        al = align_document(enc.token_ids, enc.offsets, special, enc.token_ids, enc.offsets, special)
        merged = merge_and_debias(al, lp, bl, gamma=0.1, debias=True)
        cols["doc_id"].append(f"doc{i}")
        cols["input_ids"].append(enc.token_ids)
        cols["teacher_ids"].append(enc.token_ids)
        for k in ("chunk_start", "chunk_end", "teacher_start", "teacher_end"):
            cols[k].append(getattr(merged, k))
        cols["teacher_chunk_logprob"].append(merged.teacher_chunk_logprob)
        cols["teacher_chunk_boundary_logprob"].append(merged.teacher_chunk_boundary_logprob)
    types = {"doc_id": pa.string()}
    for k in cols:
        if k != "doc_id":
            vt = pa.float32() if "logprob" in k else pa.int32()
            types[k] = pa.list_(vt)
            cols[k] = [np.asarray(v) for v in cols[k]]
    table = pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()})
    path = out / "batch.parquet"
    pq.write_table(table, path)
    return path


# -------------------------------------------------------------------------------------------------- one mode


class _PeakRSS:
    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def build_steps(args, modes: list[str], data: Path) -> tuple[dict, dict]:
    """One optimizer-step closure per mode, all on the same student (and one teacher copy for ``alm_online``)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from alm_pipeline.assets import resolve_model
    from alm_pipeline.trainer.data import AlignedRows, build_micro_batch
    from alm_pipeline.trainer.forward import StudentForward, disable_dropout, micro_batch_token_stats
    from alm_pipeline.trainer.gradmag import GradMagStep, gradmag_combine
    from alm_pipeline.trainer.loss import (
        ALMGroups,
        ALMLossConfig,
        alm_loss,
        next_token_loss,
        student_token_stats,
    )
    from alm_pipeline.trainer.model_surgery import last_layer_parameters
    from alm_pipeline.trainer.student import StudentConfig, load_student, transformer_layers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    table = pq.read_table(data)
    rows = AlignedRows.from_table(table)
    if rows.num_docs == 0 or int(rows.lengths.min()) < args.seq_len:
        raise SystemExit("the prepared batch is empty or has short documents")
    mb = build_micro_batch(rows, np.arange(rows.num_docs), [[i] for i in range(rows.num_docs)]).to(device)
    bundle = load_student(
        StudentConfig(model=resolve_model(args.model), dtype="float32", num_layers=args.num_layers)
    )
    model = bundle.model.to(device)
    disable_dropout(model)
    model.train()

    def wrapper_for(recompute: bool, fused: bool, sigma: bool = True):
        return StudentForward(
            model,
            bundle.view.boundary_mask,
            slice_size=args.slice_size,
            checkpoint_slices=recompute,
            fused=fused,
            boundary_logprobs=sigma,
        ).to(device)

    wrappers = {
        "ntp": wrapper_for(False, True),
        "sft": wrapper_for(False, True, sigma=False),
        "alm": wrapper_for(False, True),
        "alm_online": wrapper_for(False, True),
        "alm_recompute": wrapper_for(True, True),
        "alm_ref": wrapper_for(True, False),
    }
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-6, betas=(0.9, 0.95))
    cfg = ALMLossConfig()
    n_groups = mb.num_groups
    n_pred = int((rows.lengths - 1).sum())
    parts = np.array_split(np.arange(rows.num_docs), args.micro_batches)
    micro = [
        build_micro_batch(rows, np.arange(rows.num_docs), [[int(i)] for i in p]).to(device) for p in parts
    ]
    trainable = [p for p in model.parameters() if p.requires_grad]
    last = last_layer_parameters(model)
    per_step = GradMagStep(["alm", "ntp"], trainable, last)

    def hybrid_step(mode: str) -> float:
        """ALM + next-token loss over the micro-batches, combined as ``mode`` says; the loss is not weighted."""
        total = 0.0
        for part in micro:
            lp, sigma = wrappers["alm"](
                part.input_ids, part.attention_mask, attention_mask=part.attention_mask.long()
            )
            stats = micro_batch_token_stats(lp, sigma, part)
            losses = {
                "alm": alm_loss(stats, part.groups, cfg, num_groups_global=n_groups).loss,
                "ntp": next_token_loss(stats, num_tokens_global=n_pred).loss,
            }
            if mode == "hybrid_fixed":
                (losses["alm"] + losses["ntp"]).backward()
            elif mode == "hybrid_gradmag_mb":
                gradmag_combine(losses, last).loss.backward()
            else:
                per_step.backward(losses)
            total += float(losses["alm"].detach() + losses["ntp"].detach())
        if mode == "hybrid_gradmag":
            per_step.finish()
        return total

    teacher = None
    if "alm_online" in modes:
        teacher_bundle = load_student(
            StudentConfig(model=resolve_model(args.model), dtype="float32", num_layers=args.num_layers)
        )
        teacher = teacher_bundle.model.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        t_ids = [np.asarray(x, dtype=np.int64) for x in table.column("teacher_ids").to_pylist()]
        width = max(len(x) for x in t_ids)
        teacher_ids = torch.zeros(len(t_ids), width, dtype=torch.long)
        teacher_mask = torch.zeros(len(t_ids), width, dtype=torch.bool)
        for i, x in enumerate(t_ids):
            teacher_ids[i, : len(x)] = torch.as_tensor(x)
            teacher_mask[i, : len(x)] = True
        teacher_ids, teacher_mask = teacher_ids.to(device), teacher_mask.to(device)
        ts = np.concatenate([np.asarray(x) for x in table.column("teacher_start").to_pylist()])
        te = np.concatenate([np.asarray(x) for x in table.column("teacher_end").to_pylist()])
        t_start = torch.as_tensor(ts, dtype=torch.long, device=device)
        t_end = torch.as_tensor(te, dtype=torch.long, device=device)
        t_boundary = torch.as_tensor(teacher_bundle.view.boundary_mask, device=device)

    def teacher_groups() -> ALMGroups:
        """Online: the teacher's forward and its group log-likelihoods for this batch."""
        with torch.no_grad():
            body = getattr(teacher, teacher.base_model_prefix)
            hidden = body(input_ids=teacher_ids, attention_mask=teacher_mask.long(), use_cache=False)[0]
            stats = student_token_stats(
                teacher_ids,
                t_boundary,
                hidden_states=hidden,
                lm_head_weight=teacher.get_output_embeddings().weight,
                attention_mask=teacher_mask,
                slice_size=args.slice_size,
                checkpoint_slices=False,
            )
            prefix = torch.nn.functional.pad(torch.cumsum(stats.token_logprob.double(), 1), (1, 0))
            b = mb.groups.batch_index
            c_t = (prefix[b, t_end + 1] - prefix[b, t_start]).clamp(max=0.0)
            sigma = stats.boundary_logprob[b, t_end]
        g = mb.groups
        return ALMGroups(g.batch_index, g.start, g.end, c_t.float(), sigma.float())

    def make_step(mode: str):
        def step() -> float:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(
                device.type, dtype=torch.bfloat16, enabled=args.bf16
            ):  # as the trainer's --bf16
                loss = forward_loss()
            if mode not in HYBRID:
                loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return float(loss.detach())

        def forward_loss() -> torch.Tensor:
            if mode in HYBRID:
                loss = torch.tensor(hybrid_step(mode))
            elif mode == "ntp_hf":
                labels = mb.input_ids.masked_fill(~mb.attention_mask, -100)
                loss = model(
                    input_ids=mb.input_ids, attention_mask=mb.attention_mask.long(), labels=labels
                ).loss
            else:
                wrapper = wrappers[mode]
                lp, sigma = wrapper(mb.input_ids, mb.attention_mask, attention_mask=mb.attention_mask.long())
                stats = micro_batch_token_stats(lp, sigma, mb)
                if mode in ("ntp", "sft"):
                    loss = next_token_loss(stats).loss
                else:
                    groups = teacher_groups() if mode == "alm_online" else mb.groups
                    loss = alm_loss(stats, groups, cfg, num_groups_global=n_groups).loss
            return loss

        return step

    meta = {
        "tokens": int(mb.num_tokens),
        "groups": int(n_groups),
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": bundle.view.vocab_size,
        "layers": len(transformer_layers(model)),
    }
    return {m: make_step(m) for m in modes}, meta


def run_timing(args, modes: list[str], data: Path) -> dict:
    """Paired rounds in alternating order on one process: every mode sees the same machine conditions."""
    steps, meta = build_steps(args, modes, data)
    runs = run_paired(steps, reps=args.steps, warmup=args.warmup)
    return {"meta": meta, "times": runs.seconds}


def run_memory(args, mode: str, data: Path) -> dict:
    """Peak memory of one mode in a fresh process (one warm-up step, then one measured step)."""
    import torch

    steps, _ = build_steps(args, [mode], data)
    steps[mode]()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with _PeakRSS() as rss:
        steps[mode]()
    return {"peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else rss.peak}


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--num-layers", type=int, default=None, help="keep only the first N blocks (default: all)"
    )
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (each runs every mode once)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--slice-size", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast around each step, as train --bf16")
    ap.add_argument("--modes", default=",".join(MODES), help=f"any of {','.join(MODES + HYBRID)}")
    ap.add_argument(
        "--micro-batches",
        type=int,
        default=2,
        help="micro-batches of the hybrid_* modes (documents split evenly)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_data", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._worker:
        modes = [m for m in args.modes.split(",") if m]
        if args._worker == "timing":
            out = run_timing(args, modes, args._data)
        else:
            out = run_memory(args, args._worker.removeprefix("mem:"), args._data)
        print("RESULT " + json.dumps(out), flush=True)
        return

    modes = [m for m in args.modes.split(",") if m]

    def worker(kind: str, data: Path) -> dict:
        cmd = [sys.executable, __file__, "--_worker", kind, "--_data", str(data)]
        for flag in (
            "model",
            "batch_size",
            "seq_len",
            "steps",
            "warmup",
            "threads",
            "slice_size",
            "device",
            "modes",
            "micro_batches",
        ):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        if args.num_layers:
            cmd += ["--num-layers", str(args.num_layers)]
        if args.bf16:
            cmd.append("--bf16")
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"benchmark worker {kind} failed")
        return json.loads(line[len("RESULT ") :])

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        t0 = time.perf_counter()
        data = prepare(args, Path(tmp))
        print(f"prepared the batch in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        load_before = os.getloadavg()[0]
        timing = worker("timing", data)
        load_after = os.getloadavg()[0]
        runs = Runs(seconds=timing["times"])
        results = {}
        for mode in modes:
            results[mode] = {"step": runs.spread(mode), "times": timing["times"][mode], **timing["meta"]}
            results[mode].update(worker(f"mem:{mode}", data))
            r = results[mode]
            print(
                f"  {mode:11s} step {r['step'].format()} s, peak {r['peak_bytes'] / 2**20:.0f} MiB",
                file=sys.stderr,
            )

    meta = timing["meta"]
    print(
        f"\nstudent {args.model} ({meta['layers']} blocks, {meta['params'] / 1e6:.1f}M params, vocab "
        f"{meta['vocab']}), batch {args.batch_size} x {args.seq_len} tokens ({meta['tokens']} tokens, "
        f"{meta['groups']} chunks), device {args.device}{' bf16 autocast' if args.bf16 else ''}, {args.threads} threads; {args.warmup} untimed warm-up "
        f"step(s) of every mode, then {args.steps} rounds in alternating order; median [min–max] (1-min load "
        f"average {load_before:.1f} before, {load_after:.1f} after)"
    )
    base = "ntp_hf" if "ntp_hf" in results else None
    print_table(
        ["mode", "step s", "tokens/s (median)", "× ntp_hf (per round)", "peak memory MiB"],
        [
            [
                mode,
                r["step"].format(),
                f"{meta['tokens'] / r['step'].median:.0f}",
                runs.ratio(mode, base).format() if base else "-",
                f"{r['peak_bytes'] / 2**20:.0f}",
            ]
            for mode, r in results.items()
        ],
    )
    for mode, other, what in (
        ("sft", "ntp", "next-token step computing σ too"),
        ("hybrid_gradmag", "hybrid_gradmag_mb", "GradMag weighted per micro-batch (former)"),
        ("hybrid_gradmag", "hybrid_fixed", "fixed weights"),
    ):
        if mode in results and other in results:
            print(f"{mode} / {what}: {runs.ratio(mode, other).format()}")
    if "alm" in results:
        for other, what in (
            ("ntp_hf", "plain next-token step"),
            ("ntp", "next-token via the trainer's path"),
            ("alm_online", "online ALM step"),
        ):
            if other in results:
                print(f"cached ALM / {what}: {runs.ratio('alm', other).format()}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                indent=2,
                default=vars,
            )
        )


if __name__ == "__main__":
    main()
