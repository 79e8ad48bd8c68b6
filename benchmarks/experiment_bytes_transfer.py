"""Experiment: SmolLM2-135M → ``bytes`` tokenizer transfer from one teacher cache, four training arms.

The paper's use case 1 (reference §11.2) at a scale that fits a 2-core CPU. Every arm starts from the same
student — SmolLM2-135M's transformer blocks with the 256-byte tokenizer and FVT-initialised (untied) byte
embeddings — and trains on the same aligned set with the same steps, batches, seed and learning-rate schedule:

* ``alm``          ALM, debiased, γ = 0.1 (as stored in the aligned set), binarised KL, τ = 100
* ``alm_nodebias`` ALM without outcome debiasing (same chunks)
* ``sft``          next-token loss only (the paper's "SFT" baseline: FVT init + next-token prediction)
* ``alm_sft``      ALM + next-token loss, combined with GradMag
* ``alm_tau5``     (only with ``--arms``) ALM as ``alm`` but τ = 5 (the paper's Table 7 found τ ≈ 5 better)

The teacher (SmolLM2-135M-Instruct, installed by ``scripts/setup.sh``) runs once, for the cache; training
never loads it. Afterwards every model — teacher, student at initialisation, each arm — is scored on held-out
text (The Tempest and Julius Caesar, plays that are not in the training corpus), in bits per byte under
``alm-pipeline evaluate``'s convention, and the table reports the fraction of the student-to-teacher gap each
arm closes: ``(bpb_init − bpb_arm) / (bpb_init − bpb_teacher)``.

Data: the bundled Shakespeare corpus cut at line boundaries into documents of at most ``--doc-bytes`` UTF-8
bytes (the first ``--docs`` of them, taken evenly over the corpus); held-out documents cut the same way to at
most ``--heldout-bytes`` bytes, so that no model truncates them (every model scores exactly the same bytes).

Every stage reuses what an earlier run of the script produced in ``--workdir`` (cache, aligned set, finished
arms, scores), so an interrupted experiment continues where it stopped.

    .venv/bin/python benchmarks/experiment_bytes_transfer.py                       # defaults: see --help
    .venv/bin/python benchmarks/experiment_bytes_transfer.py --steps 20 --docs 200 # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from alm_pipeline.assets import bundled_corpus_path, bundled_heldout_path, read_jsonl, resolve_model  # noqa: E402
from alm_pipeline.pipeline.corpus import split_at_lines  # noqa: E402


@dataclass(frozen=True)
class Arm:
    name: str
    description: str
    alm: bool
    next_token_loss: bool
    debias: bool | None  # None: as stored in the aligned set (debiased)
    tau: float = 100.0


ARMS = (
    Arm("alm", "ALM, debiased, γ=0.1", alm=True, next_token_loss=False, debias=None),
    Arm("alm_nodebias", "ALM, no debiasing", alm=True, next_token_loss=False, debias=False),
    Arm("sft", "SFT only (next-token)", alm=False, next_token_loss=True, debias=None),
    Arm("alm_sft", "ALM + SFT, GradMag", alm=True, next_token_loss=True, debias=None),
)
# not run by default (--arms ...,alm_tau5): the paper's Table 7 found τ ≈ 5 better than its default τ = 100
EXTRA_ARMS = (
    Arm("alm_tau5", "ALM, debiased, γ=0.1, τ=5", alm=True, next_token_loss=False, debias=None, tau=5.0),
)


# --------------------------------------------------------------------------------------------------------- data


def write_documents(source: str, out: Path, max_bytes: int, limit: int) -> int:
    """Cut every document of ``source`` into pieces, take ``limit`` evenly spaced ones, write them as jsonl."""
    pieces = []
    for doc in read_jsonl(source):
        for k, piece in enumerate(split_at_lines(doc["text"], max_bytes, min_bytes=64)):
            pieces.append({"id": f"{doc['id']}.{k}", "text": piece})
    if limit < len(pieces):
        step = len(pieces) / limit
        pieces = [pieces[int(i * step)] for i in range(limit)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for p in pieces:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return len(pieces)


# ------------------------------------------------------------------------------------------------------ stages


def build_cache_and_aligned(args, work: Path, say) -> tuple[Path, Path]:
    from alm_pipeline.pipeline.align_stage import AlignConfig, AlignSettings, build_aligned_sets
    from alm_pipeline.pipeline.corpus import CorpusConfig
    from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, build_teacher_cache

    cache = work / "cache"
    build_teacher_cache(
        TeacherCacheConfig(
            teacher=args.teacher,
            corpus=CorpusConfig(path=str(work / "train.jsonl")),
            output=str(cache),
            max_length=args.teacher_max_length,
            shard_size=1 << 20,  # bytes of corpus per shard
            num_cpus_per_actor=1.5,
        ),
        progress=say,
    )
    summaries = build_aligned_sets(
        AlignConfig(
            cache=str(cache),
            student_tokenizers=("bytes",),
            output=str(work / "aligned"),
            settings=AlignSettings(gamma=args.gamma),
        ),
        progress=say,
    )
    return cache, Path(summaries[0].path)


def arm_config(arm: Arm, args, aligned: Path, work: Path):
    from alm_pipeline.trainer.config import (
        CheckpointConfig,
        ComputeConfig,
        DataConfig,
        LoggingConfig,
        LossConfig,
        OptimConfig,
        StudentSpec,
        TrainConfig,
    )

    return TrainConfig(
        data=DataConfig(aligned=str(aligned)),
        student=StudentSpec(init_from=resolve_model(args.teacher), num_layers=args.num_layers),
        output=str(work / "arms" / arm.name),
        optim=OptimConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
        compute=ComputeConfig(micro_batch_tokens=args.micro_batch_tokens),
        loss=LossConfig(alm=arm.alm, next_token_loss=arm.next_token_loss, debias=arm.debias, tau=arm.tau),
        checkpoint=CheckpointConfig(every=args.steps, keep=1, overwrite=True),
        logging=LoggingConfig(tensorboard=False, progress=False, log_every=max(1, args.steps // 10)),
    )


def save_initial_student(args, aligned: Path, work: Path, say) -> Path:
    """The model every arm starts from (``student_config`` of the arms' shared settings), saved for scoring."""
    from alm_pipeline.trainer.student import load_student, save_student
    from alm_pipeline.trainer.worker import student_config

    out = work / "student-init"
    if (out / "config.json").exists():
        return out
    say("building the initial student (FVT byte embeddings) ...")
    save_student(load_student(student_config(arm_config(ARMS[0], args, aligned, work))), out)
    return out


def train_arm(arm: Arm, args, aligned: Path, work: Path, say) -> dict:
    from alm_pipeline.trainer.driver import run_training

    config = arm_config(arm, args, aligned, work)
    done = Path(config.output) / "arm.json"
    if done.exists():
        return json.loads(done.read_text())
    say(f"training arm {arm.name}: {arm.description}")
    result = run_training(config, say=say)
    first, last = result.history[0], result.history[-1]
    info = {
        "arm": arm.name,
        "description": arm.description,
        "final": str(result.final_checkpoint),
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "first_loss": float(first["loss"]),
        "last_loss": float(last["loss"]),
        "last_alm_loss": last.get("loss_alm"),
        "last_ntp_loss": last.get("loss_ntp"),
    }
    done.write_text(json.dumps(info, indent=2) + "\n")
    return info


def score(model_dir: str, heldout: Path, args, work: Path, key: str, say) -> dict:
    from alm_pipeline.evaluation.bits_per_byte import iter_data_texts, model_bits_per_byte
    from alm_pipeline.evaluation.models import load_eval_model

    path = work / "scores" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    say(f"held-out bits per byte: {key}")
    model = load_eval_model(model_dir)
    bpb = model_bits_per_byte(
        model, iter_data_texts(str(heldout)), max_length=args.heldout_bytes + 8, batch_tokens=4096
    )
    if bpb.truncated_docs:
        raise SystemExit(f"{key}: {bpb.truncated_docs} held-out documents were truncated; raise max_length")
    out = bpb.to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------------------------------- table


def table(rows: list[dict], teacher_bpb: float, init_bpb: float) -> list[str]:
    gap = init_bpb - teacher_bpb
    lines = [
        "| model | held-out bits/byte | gap closed | train loss first → last | train time |",
        "| --- | --- | --- | --- | --- |",
        f"| teacher SmolLM2-135M-Instruct (own tokenizer) | {teacher_bpb:.4f} | — | — | — |",
        f"| student at init (FVT bytes) | {init_bpb:.4f} | 0 % | — | — |",
    ]
    for r in rows:
        closed = (init_bpb - r["bpb"]) / gap if gap > 0 else float("nan")
        lines.append(
            f"| {r['arm']}: {r['description']} | {r['bpb']:.4f} | {closed:.1%} | "
            f"{r['first_loss']:.4g} → {r['last_loss']:.4g} | {r['seconds']:.0f} s |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/experiment-bytes")
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--docs", type=int, default=2000, help="training documents (cut from the bundled corpus)")
    ap.add_argument("--doc-bytes", type=int, default=256, help="maximum UTF-8 bytes per training document")
    ap.add_argument("--teacher-max-length", type=int, default=256)
    ap.add_argument("--heldout-docs", type=int, default=40)
    ap.add_argument("--heldout-bytes", type=int, default=1024)
    ap.add_argument("--gamma", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8, help="documents per optimizer step")
    ap.add_argument("--micro-batch-tokens", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument(
        "--num-layers", type=int, default=None, help="keep only the first N blocks (default: all)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default=",".join(a.name for a in ARMS))
    args = ap.parse_args()

    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("workdir", "arms")}
    settings_file = work / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != settings:
        raise SystemExit(
            f"{work} holds an experiment with other settings ({settings_file}); use another --workdir"
        )
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    seconds: dict[str, float] = {}
    t = time.time()
    n_train = write_documents(bundled_corpus_path(), work / "train.jsonl", args.doc_bytes, args.docs)
    n_held = write_documents(
        bundled_heldout_path(), work / "heldout.jsonl", args.heldout_bytes, args.heldout_docs
    )
    say(f"{n_train} training documents (≤ {args.doc_bytes} bytes), {n_held} held-out documents")
    _, aligned = build_cache_and_aligned(args, work, say)
    init = save_initial_student(args, aligned, work, say)
    seconds["cache + align + init"] = time.time() - t

    heldout = work / "heldout.jsonl"
    teacher = score(resolve_model(args.teacher), heldout, args, work, "teacher", say)
    initial = score(str(init), heldout, args, work, "init", say)
    rows = []
    wanted = args.arms.split(",")
    unknown = set(wanted) - {a.name for a in ARMS + EXTRA_ARMS}
    if unknown:
        raise SystemExit(f"unknown arm(s) {sorted(unknown)}; known: {[a.name for a in ARMS + EXTRA_ARMS]}")
    for arm in ARMS + EXTRA_ARMS:
        if arm.name not in wanted:
            continue
        t = time.time()
        info = train_arm(arm, args, aligned, work, say)
        info["bpb"] = score(info["final"], heldout, args, work, arm.name, say)["bits_per_byte"]
        seconds[arm.name] = time.time() - t
        rows.append(info)

    lines = [
        f"SmolLM2-135M → bytes: {n_train} training documents ≤ {args.doc_bytes} bytes, {args.steps} steps × "
        f"{args.batch_size} documents, lr {args.lr:g} (10 % warm-up, linear decay), full fine-tuning"
        + (f" of the first {args.num_layers} blocks" if args.num_layers else "")
        + f"; held-out: {n_held} documents, {teacher['bytes']} bytes",
        "",
        *table(rows, teacher["bits_per_byte"], initial["bits_per_byte"]),
    ]
    print("\n".join(lines))
    (work / "results.md").write_text("\n".join(lines) + "\n")
    (work / "results.json").write_text(
        json.dumps(
            {"settings": settings, "teacher": teacher, "init": initial, "arms": rows, "seconds": seconds},
            indent=2,
        )
        + "\n"
    )
    say("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
