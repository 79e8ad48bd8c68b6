"""Experiment: tokenizer transfer of SmolLM2-135M-Instruct with four training arms, scored on what ALM preserves.

Issue "Faithfulness" asks whether ALM keeps more of the teacher than plain next-token training (SFT) at equal
compute, especially away from the training domain. Every arm starts from the same student — the teacher's
transformer blocks with the student tokenizer (default: GPT-2's) and FVT-initialised embeddings — and trains on
the same aligned set with the same steps, batches, learning-rate schedule and data order (per seed):

* ``alm``          ALM, binarised KL, τ = 5, debiased (outcome chunks), γ = 0.1
* ``alm_nodebias`` the same without debiasing
* ``sft``          next-token loss only (FVT init + next-token prediction; ALM and σ are not computed)
* ``alm_sft``      ALM (as ``alm``) + next-token loss, combined with GradMag (weights once per optimizer step)
* ``alm_tau100``   ALM as ``alm`` but τ = 100 (the trainer's old default), for the choice of the default τ

Data: a mixed training corpus — Shakespeare (the bundled corpus), GSM-symbolic maths word problems and Python
code (HumanEval prompts + solutions) — cut at line ends into documents of at most ``--doc-bytes`` bytes; the
held-out parts (the bundled held-out plays, held-out problems, held-out HumanEval items) are never trained on and
are cut to at most ``--heldout-bytes`` bytes so that no model truncates them.

Metrics, for the teacher, the student at initialisation and every arm × seed:
* bits per byte on each held-out domain (``alm-pipeline evaluate``'s convention: every byte predicted);
* teacher agreement on the held-out text: mean |C_S − C_T| of chunk log-likelihoods and the chunk-level
  binarised KL, from an aligned set of the held-out text (the teacher's side comes from its cache);
* multiple-choice accuracy on BIG-bench tasks (zero-shot, log-likelihood of each choice's bytes);
each also as "gap closed": the fraction of the init-to-teacher distance an arm recovers.

Phases (every phase reuses what an earlier run produced in ``--workdir``, so an interrupted run continues):

    python benchmarks/experiment_transfer.py prepare   # corpus, teacher caches, aligned sets (CPU + local Ray)
    python benchmarks/experiment_transfer.py run       # train every arm × seed, evaluate (GPU if --device cuda)
    python benchmarks/experiment_transfer.py report    # the table (also printed at the end of `run`)

``run`` never loads Ray (training in this process through ``train_local``), so it also runs on a machine that
has torch and transformers but no Ray: ``prepare`` here, ``run`` on a GPU machine, given the work folder.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Arm:
    name: str
    description: str
    alm: bool
    next_token_loss: bool
    debias: bool
    tau: float = 5.0


ARMS = {
    a.name: a
    for a in (
        Arm("alm", "ALM τ=5, debiased", alm=True, next_token_loss=False, debias=True),
        Arm("alm_nodebias", "ALM τ=5, no debiasing", alm=True, next_token_loss=False, debias=False),
        Arm("sft", "SFT (next-token only)", alm=False, next_token_loss=True, debias=False),
        Arm("alm_sft", "ALM τ=5 + SFT, GradMag", alm=True, next_token_loss=True, debias=True),
        Arm("alm_tau100", "ALM τ=100, debiased", alm=True, next_token_loss=False, debias=True, tau=100.0),
    )
}
DEFAULT_ARMS = ("alm", "alm_nodebias", "sft", "alm_sft", "alm_tau100")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------- prepare


def _cut_documents(docs, max_bytes: int, limit: int | None, prefix: str) -> list[dict]:
    """Every document cut at line ends into pieces of at most ``max_bytes`` bytes; ``limit`` evenly spaced ones."""
    from alm_pipeline.pipeline.corpus import split_at_lines

    pieces = []
    for doc in docs:
        for k, piece in enumerate(split_at_lines(doc["text"], max_bytes, min_bytes=32)):
            pieces.append({"id": f"{prefix}/{doc['id']}.{k}", "text": piece})
    if limit is not None and limit < len(pieces):
        step = len(pieces) / limit
        pieces = [pieces[int(i * step)] for i in range(limit)]
    return pieces


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    tmp.replace(path)


def domain_sources(names: list[str]) -> dict[str, tuple[str, str]]:
    """``{domain: (train jsonl, held-out jsonl)}`` of the text domains (``scripts/setup.sh`` installs them)."""
    from alm_pipeline.assets import domain_path

    return {n: (domain_path(n, "train"), domain_path(n, "heldout")) for n in names}


def prepare(args) -> None:
    from alm_pipeline.assets import read_jsonl, resolve_model
    from alm_pipeline.pipeline.align_stage import AlignConfig, AlignSettings, build_aligned_sets
    from alm_pipeline.pipeline.corpus import CorpusConfig
    from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, build_teacher_cache

    work = Path(args.workdir).absolute()
    corpus = work / "corpus"
    wanted = args.domains.split(",")
    sources = domain_sources(wanted)
    train: list[dict] = []
    counts = {}
    for name in wanted:
        train_path, heldout_path = sources[name]
        pieces = _cut_documents(read_jsonl(train_path), args.doc_bytes, args.train_docs_per_domain, name)
        held = _cut_documents(read_jsonl(heldout_path), args.heldout_bytes, args.heldout_docs, name)
        train += pieces
        _write_jsonl(corpus / f"heldout-{name}.jsonl", held)
        counts[name] = {
            "train_docs": len(pieces),
            "train_bytes": sum(len(p["text"].encode()) for p in pieces),
            "heldout_docs": len(held),
            "heldout_bytes": sum(len(p["text"].encode()) for p in held),
        }
        say(f"{name}: {counts[name]}")
    _write_jsonl(corpus / "train.jsonl", train)
    heldout_all = [d for name in wanted for d in read_jsonl(corpus / f"heldout-{name}.jsonl")]
    _write_jsonl(corpus / "heldout.jsonl", heldout_all)

    teacher = resolve_model(args.teacher)
    for part in ("train", "heldout"):
        say(f"teacher cache of the {part} corpus")
        build_teacher_cache(
            TeacherCacheConfig(
                teacher=teacher,
                corpus=CorpusConfig(path=str(corpus / f"{part}.jsonl")),
                output=str(work / f"cache-{part}"),
                max_length=args.teacher_max_length,
                shard_size=1 << 20,  # bytes of corpus per shard
                num_cpus_per_actor=args.cpus_per_actor,
            ),
            progress=say,
        )
        say(f"align the {part} cache to {args.student}")
        summaries = build_aligned_sets(
            AlignConfig(
                cache=str(work / f"cache-{part}"),
                student_tokenizers=(args.student,),
                output=str(work / f"aligned-{part}"),
                settings=AlignSettings(gamma=args.gamma),
            ),
            progress=say,
        )
        counts[f"aligned_{part}"] = Path(summaries[0].path).name
    copy_tasks(work)
    write_json(work / "prepared.json", {"settings": vars(args), "domains": counts})
    say(f"prepared {work}")


def copy_tasks(work: Path) -> None:
    """The installed BIG-bench multiple-choice tasks, copied into the work folder (so `run` needs no assets)."""
    from alm_pipeline.assets import BIGBENCH, bigbench_task_file

    (work / "tasks").mkdir(parents=True, exist_ok=True)
    for task in BIGBENCH.tasks:
        shutil.copyfile(bigbench_task_file(task), work / "tasks" / f"{task}.json")


# -------------------------------------------------------------------------------------------------------- run


def aligned_path(work: Path, part: str) -> Path:
    info = read_json(work / "prepared.json")
    return work / f"aligned-{part}" / info["domains"][f"aligned_{part}"]


def arm_config(arm: Arm, seed: int, args, work: Path, teacher: str):
    from alm_pipeline.trainer.config import (
        CheckpointConfig,
        ComputeConfig,
        DataConfig,
        DistributedConfig,
        LoggingConfig,
        LossConfig,
        OptimConfig,
        StudentSpec,
        TrainConfig,
    )

    return TrainConfig(
        data=DataConfig(aligned=str(aligned_path(work, "train"))),
        student=StudentSpec(init_from=teacher),
        output=str(work / "runs" / f"{arm.name}-s{seed}"),
        optim=OptimConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed),
        compute=ComputeConfig(micro_batch_tokens=args.micro_batch_tokens, bf16=args.bf16),
        loss=LossConfig(alm=arm.alm, next_token_loss=arm.next_token_loss, debias=arm.debias, tau=arm.tau),
        checkpoint=CheckpointConfig(every=args.steps, keep=1, overwrite=True),
        logging=LoggingConfig(tensorboard=False, progress=False, log_every=max(1, args.steps // 5)),
        distributed=DistributedConfig(use_gpu=args.device.startswith("cuda")),
    )


class Evaluator:
    """Scores one model on every metric of the experiment; results cached in ``work/scores/<key>.json``."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.domains = args.domains.split(",")

    def __call__(self, key: str, model_dir: str, *, agreement: bool) -> dict:
        from alm_pipeline.assets import read_jsonl
        from alm_pipeline.evaluation.agreement import chunk_agreement
        from alm_pipeline.evaluation.bits_per_byte import model_bits_per_byte
        from alm_pipeline.evaluation.models import load_eval_model

        path = self.work / "scores" / f"{key}.json"
        if path.exists():
            return read_json(path)
        t0 = time.time()
        model = load_eval_model(model_dir, device=self.args.device)
        out: dict = {"model": str(model_dir), "bits_per_byte": {}}
        for name in self.domains:
            texts = [(d["id"], d["text"]) for d in read_jsonl(self.work / "corpus" / f"heldout-{name}.jsonl")]
            bpb = model_bits_per_byte(
                model, texts, max_length=self.args.heldout_bytes + 8, batch_tokens=self.args.eval_batch_tokens
            )
            if bpb.truncated_docs:
                raise SystemExit(f"{key}: {bpb.truncated_docs} held-out {name} documents were truncated")
            out["bits_per_byte"][name] = bpb.to_json()
        if agreement:
            ag, _ = chunk_agreement(
                model, str(aligned_path(self.work, "heldout")), batch_tokens=self.args.eval_batch_tokens
            )
            out["agreement"] = ag.to_json()
        out["multiple_choice"] = self._multiple_choice(model)
        out["seconds"] = round(time.time() - t0, 1)
        del model
        gc.collect()
        write_json(path, out)
        return out

    def _multiple_choice(self, model) -> dict:
        tasks_dir = self.work / "tasks"
        if not tasks_dir.is_dir():
            return {}
        from alm_pipeline.evaluation.multiple_choice import load_bigbench_task, score_tasks

        tasks = [load_bigbench_task(p) for p in sorted(tasks_dir.glob("*.json"))]
        results = score_tasks(
            model, tasks, max_examples=self.args.mc_examples, batch_tokens=self.args.eval_batch_tokens
        )
        return {name: r.to_json() for name, r in results.items()}


def save_initial_student(args, work: Path, teacher: str) -> Path:
    """The model every arm starts from, saved for scoring (all arms share the student construction)."""
    from alm_pipeline.trainer.student import load_student, save_student
    from alm_pipeline.trainer.worker import student_config

    out = work / "student-init"
    if (out / "config.json").exists():
        return out
    say("building the initial student (FVT embeddings) ...")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_student(load_student(student_config(arm_config(ARMS["alm"], 0, args, work, teacher))), tmp)
    tmp.replace(out)
    return out


def train_arm(arm: Arm, seed: int, args, work: Path, teacher: str) -> dict:
    import csv

    from alm_pipeline.trainer.driver import train_local

    config = arm_config(arm, seed, args, work, teacher)
    run_dir = Path(config.output)
    done = run_dir / "arm.json"
    if done.exists():
        return read_json(done)
    say(f"training {arm.name} seed {seed}: {arm.description}")
    t0 = time.time()
    result = train_local(config, say=lambda m: None)
    with (run_dir / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss")]
    keep = ("step", "loss", "loss_alm", "loss_ntp", "weight_alm", "weight_ntp", "grad_norm")
    info = {
        "arm": arm.name,
        "seed": seed,
        "description": arm.description,
        "final": str(result.final_checkpoint),
        "steps": result.steps,
        "seconds": round(time.time() - t0, 1),
        "curve": [{k: r[k] for k in keep if r.get(k) not in (None, "")} for r in rows],
    }
    write_json(done, info)
    return info


def run(args) -> None:
    work = Path(args.workdir).absolute()
    teacher = args.teacher_path or __import__("alm_pipeline.assets").assets.resolve_model(args.teacher)
    evaluate = Evaluator(args, work)
    t_start = time.time()
    mirror = Path(args.mirror) if args.mirror else None

    def publish() -> None:
        if mirror is not None:
            lines, data = build_report(work, args)
            mirror.mkdir(parents=True, exist_ok=True)
            write_json(mirror / "experiment.json", data)
            (mirror / "experiment.md").write_text("\n".join(lines) + "\n")

    init = save_initial_student(args, work, teacher)
    evaluate("teacher", teacher, agreement=False)
    evaluate("init", str(init), agreement=True)
    publish()
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; known: {sorted(ARMS)}")
    # every seed of the core arms first; the τ = 100 comparison arm after them (a time budget cuts it first)
    order = [(a, s) for s in args.seeds for a in arms if a != "alm_tau100"]
    order += [("alm_tau100", s) for s in args.seeds if "alm_tau100" in arms]
    durations: list[float] = []
    for name, seed in order:
        key = f"{name}-s{seed}"
        if (work / "scores" / f"{key}.json").exists():
            continue
        elapsed = time.time() - t_start
        need = statistics.median(durations) if durations else 0.0
        if args.budget_s and elapsed + need > args.budget_s:
            say(f"time budget: stopping before {key} ({elapsed:.0f} s used, ~{need:.0f} s per arm)")
            break
        t0 = time.time()
        info = train_arm(ARMS[name], seed, args, work, teacher)
        evaluate(key, info["final"], agreement=True)
        if not args.keep_models:  # the weights only: arm.json (settings, loss curve) stays
            run_dir = Path(info["final"]).parent
            for sub in ("final", "checkpoints"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
        durations.append(time.time() - t0)
        say(f"{key} done in {durations[-1]:.0f} s")
        publish()
    publish()
    lines, _ = build_report(work, args)
    print("\n".join(lines))


# ----------------------------------------------------------------------------------------------------- report


def _metrics(score: dict) -> dict[str, float]:
    """The flat metrics of one score file (higher-is-better noted in :data:`HIGHER_IS_BETTER`)."""
    out = {f"bpb/{d}": v["bits_per_byte"] for d, v in score.get("bits_per_byte", {}).items()}
    ag = score.get("agreement")
    if ag:
        out["agree/|ΔC|"] = ag["mean_abs_logprob_diff"]
        if "binarised_kl" in ag:
            out["agree/bKL"] = ag["binarised_kl"]
    mc = score.get("multiple_choice", {})
    for task, r in mc.items():
        out[f"mc/{task}"] = r["accuracy"]
    if mc:
        out["mc/mean"] = statistics.fmean(r["accuracy"] for r in mc.values())
    return out


def higher_is_better(metric: str) -> bool:
    return metric.startswith("mc/")


def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    spread = (max(values) - min(values)) / 2
    return f"{mean:.4f} ± {spread:.4f}"


def _fmt_pct(values: list[float]) -> str:
    if not values:
        return "—"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f} %"
    return f"{mean:.1f} ± {100 * (max(values) - min(values)) / 2:.1f} %"


def build_report(work: Path, args) -> tuple[list[str], dict]:
    scores = {p.stem: read_json(p) for p in sorted((work / "scores").glob("*.json"))}
    if "teacher" not in scores or "init" not in scores:
        return ["(no scores yet)"], {"scores": scores}
    teacher, init = _metrics(scores["teacher"]), _metrics(scores["init"])
    teacher.setdefault("agree/|ΔC|", 0.0)
    if "agree/bKL" in init:
        teacher.setdefault("agree/bKL", 0.0)
    metrics = list(init)
    by_arm: dict[str, list[dict[str, float]]] = {}
    for key, s in scores.items():
        if key in ("teacher", "init"):
            continue
        by_arm.setdefault(key.rsplit("-s", 1)[0], []).append(_metrics(s))
    arms = [a for a in ARMS if a in by_arm]
    header = "| model | " + " | ".join(metrics) + " |"
    lines = [header, "|" + " --- |" * (len(metrics) + 1)]
    lines.append("| teacher | " + " | ".join(f"{teacher.get(m, float('nan')):.4f}" for m in metrics) + " |")
    lines.append("| init (FVT) | " + " | ".join(f"{init[m]:.4f}" for m in metrics) + " |")
    for a in arms:
        runs = by_arm[a]
        lines.append(
            f"| {a} ({len(runs)} seeds) | "
            + " | ".join(_fmt([r[m] for r in runs if m in r]) for m in metrics)
            + " |"
        )
    # multiple-choice accuracies on ~100 questions (standard error ≈ 0.05) are too noisy for a ratio of differences
    gap_metrics = [m for m in metrics if not m.startswith("mc/")]
    lines += ["", "Gap closed = (init − arm) / (init − teacher) (100 % = the teacher's value):", ""]
    lines += ["| model | " + " | ".join(gap_metrics) + " |", "|" + " --- |" * (len(gap_metrics) + 1)]
    gaps: dict[str, dict[str, list[float]]] = {}
    for a in arms:
        cells = []
        for m in gap_metrics:
            denom = init[m] - teacher.get(m, float("nan"))
            vals = []
            for r in by_arm[a]:
                if m in r and denom and math.isfinite(denom):
                    vals.append((init[m] - r[m]) / denom)
            gaps.setdefault(a, {})[m] = vals
            cells.append(_fmt_pct(vals))
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    runs = {p.parent.name: read_json(p) for p in sorted((work / "runs").glob("*/arm.json"))}
    data = {
        "teacher": teacher,
        "init": init,
        "arms": by_arm,
        "gap_closed": gaps,
        "scores": scores,
        "runs": runs,
    }
    return lines, data


def report(args) -> None:
    lines, _ = build_report(Path(args.workdir).absolute(), args)
    print("\n".join(lines))


# ------------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=("prepare", "run", "report"))
    ap.add_argument("--workdir", default="runs/experiment-transfer")
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument(
        "--teacher-path", default=None, help="run: the teacher's model folder (default: --teacher)"
    )
    ap.add_argument("--student", default="gpt2-tokenizer", help="student tokenizer (prepare)")
    ap.add_argument("--domains", default="plays,maths,code")
    ap.add_argument("--train-docs-per-domain", type=int, default=600)
    ap.add_argument("--doc-bytes", type=int, default=1024)
    ap.add_argument("--heldout-docs", type=int, default=60, help="per domain")
    ap.add_argument("--heldout-bytes", type=int, default=1024)
    ap.add_argument("--teacher-max-length", type=int, default=1024)
    ap.add_argument("--cpus-per-actor", type=float, default=1.5)
    ap.add_argument("--gamma", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--micro-batch-tokens", type=int, default=8192)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-batch-tokens", type=int, default=16384)
    ap.add_argument("--mc-examples", type=int, default=100, help="examples per multiple-choice task")
    ap.add_argument("--budget-s", type=float, default=0, help="run: start no arm past this many seconds")
    ap.add_argument("--keep-models", action="store_true", help="run: keep every arm's final model")
    ap.add_argument("--mirror", default=None, help="run: copy the report here after every arm")
    args = ap.parse_args()
    {"prepare": prepare, "run": run, "report": report}[args.phase](args)


if __name__ == "__main__":
    main()
