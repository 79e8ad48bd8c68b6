"""Headline benchmark (issue 11): three students from one teacher cache ÷ three online ALM runs.

Two sides, paired and in alternating order (:mod:`harness`), each producing three trained students (one per
student tokenizer, default GPT-2, Mistral and Qwen3) with the same ALM loss, steps, batches and learning rate:

* **cached** — the product: ``build_teacher_cache`` once over the corpus (Ray, hf engine), ``build_aligned_sets``
  to the three student tokenizers in one pass (Ray), then ``train_local`` of each student (which also exports
  the final model; the online runs only save their last checkpoint, as ``train_local`` does too);
* **online** — what tokenkit's online mode does, built here from the package's pieces: per student run the
  teacher is loaded once, and at every optimizer step the step's documents are tokenized for the teacher, scored
  by the hf engine (same dtype, batch-token budget and thread count as the cache's engine), aligned to the
  student (``align_table``, same settings) and the student trains on those freshly computed rows (the trainer's
  own step, :class:`OnlineWorker`). Nothing of the teacher's output is cached between steps or students.

**Same documents per step, exactly.** The online run of student *i* trains on the documents the cached run of
student *i* trains on at each step: its trainer is set up from the aligned set of an untimed preparation run
(the same pipeline, run once before the timed rounds), which fixes the batch plan (document order per step), the
packing check and the pack length; the teacher values of that set are never used: every step replaces the
step's rows by the freshly scored and aligned ones. Both sides therefore do identical student work and the
loss curves agree (the script prints the largest relative difference: only the teacher's batching differs; 1.5e-7
measured). The corpus holds ``steps × batch_size`` documents (one epoch; ``--epochs`` for more).

Teacher and students are random-weight Llamas built from a config (timing does not depend on the weights): the
teacher has SmolLM2's tokenizer; each student its own tokenizer and a shape chosen so that the teacher has about
twice its forward parameters (printed). Forward parameters = every parameter except the input embedding (the LM
head counted), the ones a token's forward pass multiplies with.

Measured per side (median [min–max] over ``--reps`` rounds; the preparation run is the warm-up, ``--warmup``
adds untimed rounds of each side):

* **wall** — the side's wall time, model loads and Ray task start-up included (Ray itself is started once, in
  the preparation run, and stays up);
* **CPU** — CPU seconds (user + system). Cached: this process and every process under it (Ray's daemons and
  workers; workers that exit are counted through their parent's reaped-children times), so Ray's own
  background work counts against the cached side. Online: this process (it starts no other process);
* **FLOPs** (estimated, deterministic) — 2 · forward params · tokens for every teacher forward and
  6 · forward params · tokens (forward + backward) for student training; the cached side's teacher scores each
  document once, the online side's teacher scores each step's documents for every student.

What to expect from the FLOPs: with a teacher r× a student's forward parameters, equal teacher and student token
counts, k students and E epochs, cached ÷ online = (2r + 6kE) / (kE·(2r + 6)): 0.73 for r = 2, k = 3, E = 1,
tending to 6 / (2r + 6) = 0.6 as k or E grow; ≤ 0.6 at k = 3, E = 1 needs r ≥ 4.5. Wall time and CPU time add what
FLOPs leave out: the cached side's fixed costs (Ray tasks and actors starting, the teacher loaded in its actor,
tokenizers loaded in the align tasks, Parquet written and read), which small runs do not amortise.

    python benchmarks/bench_headline.py [--steps 8] [--batch-size 8] [--reps 3] [--epochs 1]
    python benchmarks/bench_headline.py --quick      # smoke test: 2 steps × 2 documents, 2 students, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa  # noqa: E402
from harness import Spread, print_table, run_paired, shard_bytes_for  # noqa: E402
from models import random_llama  # noqa: E402

from alm_pipeline.trainer.data import AlignedRows  # noqa: E402
from alm_pipeline.trainer.worker import Worker  # noqa: E402

# Llama shapes: (hidden size, MLP size, layers, attention heads)
TEACHER_SHAPE = (128, 384, 4, 4)
# per student tokenizer: a shape giving about half the teacher's forward parameters with that vocabulary
STUDENT_SHAPES = {
    "gpt2": (64, 192, 2, 2),
    "mistral": (96, 288, 2, 3),
    "qwen3": (24, 72, 1, 1),  # a 151k vocabulary: the LM head is nearly all of it
}
DEFAULT_STUDENTS = ("gpt2", "mistral", "qwen3")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------- models


def forward_params(model_dir: str | Path) -> int:
    """Parameters a token's forward pass multiplies with: all but the input embedding (a tied LM head counted)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return total if embedding is head else total - embedding.numel()


# ------------------------------------------------------------------------------------------------ measuring


def cpu_seconds(with_descendants: bool) -> float:
    """User + system CPU seconds of this process (and, if asked, of every process under it), including the
    children each of them has reaped, so that a worker that exits between two readings still counts: the
    difference of two readings is the CPU the tree used in between."""
    import psutil

    me = psutil.Process()
    procs = [me] + (me.children(recursive=True) if with_descendants else [])
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def flops(
    teacher_params: int, teacher_tokens: int, student_params: dict[str, int], student_tokens: dict
) -> float:
    """2·N·tokens for the teacher's forward passes, 6·N·tokens for each student's training."""
    out = 2.0 * teacher_params * teacher_tokens
    for name, tokens in student_tokens.items():
        out += 6.0 * student_params[name] * tokens
    return out


# ------------------------------------------------------------------------------------------------ the setup


@dataclass
class Student:
    name: str  # gpt2 | mistral | qwen3 (a folder under the installed tokenizers)
    tokenizer: str  # tokenizer folder (the aligned set's student tokenizer)
    model: str  # the random student model (same tokenizer)
    params: int  # forward parameters


@dataclass
class Setup:
    work: Path
    corpus: Path
    texts: dict[str, str]  # doc id -> raw text, as in the corpus file
    teacher: str
    teacher_params: int
    students: list[Student]
    args: argparse.Namespace
    plan: dict[str, str] = field(default_factory=dict)  # student name -> aligned set of the preparation run


def make_corpus(path: Path, docs: int, doc_bytes: int) -> dict[str, str]:
    """``docs`` pieces of the bundled plays, cut at line ends to at most ``doc_bytes`` bytes, as JSON lines."""
    from alm_pipeline.assets import bundled_corpus_path, read_jsonl
    from alm_pipeline.pipeline.corpus import split_at_lines

    texts: dict[str, str] = {}
    for doc in read_jsonl(bundled_corpus_path()):
        for piece in split_at_lines(doc["text"], doc_bytes, min_bytes=doc_bytes // 2):
            texts[f"d{len(texts):06d}"] = piece
            if len(texts) == docs:
                break
        if len(texts) == docs:
            break
    if len(texts) < docs:
        raise SystemExit(f"the bundled corpus gives only {len(texts)} documents of ~{doc_bytes} bytes")
    path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts.items()))
    return texts


def build_setup(args, work: Path) -> Setup:
    from alm_pipeline.assets import resolve_model

    corpus = work / "corpus.jsonl"
    texts = make_corpus(corpus, args.steps * args.batch_size // args.epochs, args.doc_bytes)
    teacher = random_llama(resolve_model("smollm2-135m"), work / "teacher", TEACHER_SHAPE)
    tokenizers = Path(resolve_model("smollm2-135m")).parent / "tokenizers"
    students = []
    for name in args.students:
        tok = str(tokenizers / name)
        model = random_llama(tok, work / f"student-{name}", STUDENT_SHAPES[name])
        students.append(Student(name, tok, str(model), forward_params(model)))
    return Setup(work, corpus, texts, str(teacher), forward_params(teacher), students, args)


def train_options(setup: Setup, student: Student, aligned: str, output: Path) -> dict:
    a = setup.args
    return {
        "aligned": aligned,
        "output": str(output),
        "student": student.model,
        "steps": a.steps,
        "batch_size": a.batch_size,
        "micro_batch_tokens": a.micro_batch_tokens,
        "lr": 1e-3,
        "warmup_steps": 1,
        "checkpoint_every": a.steps,
        "progress": False,
        "tensorboard": False,
        "torch_threads": a.threads,
    }


def train_config(setup: Setup, student: Student, aligned: str, output: Path):
    from alm_pipeline.cli.options import build_config
    from alm_pipeline.trainer.config import TrainConfig

    return build_config(TrainConfig, train_options(setup, student, aligned, output))


# ------------------------------------------------------------------------------------------------ cached side


def run_cached(setup: Setup, out: Path) -> dict:
    """teacher-cache once → align to every student in one pass → train each student (train_local)."""
    from alm_pipeline.pipeline.align_stage import AlignConfig, AlignSettings, build_aligned_sets
    from alm_pipeline.pipeline.corpus import CorpusConfig
    from alm_pipeline.pipeline.ray_utils import RayConfig
    from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, build_teacher_cache
    from alm_pipeline.trainer.driver import train_local

    a = setup.args
    ray = RayConfig(num_cpus=a.ray_cpus)
    cpu0, t0 = cpu_seconds(True), time.perf_counter()
    summary = build_teacher_cache(
        TeacherCacheConfig(
            teacher=setup.teacher,
            corpus=CorpusConfig(path=str(setup.corpus), id_field="id"),
            output=str(out / "cache"),
            max_length=a.max_length,
            shard_size=shard_bytes_for(str(setup.corpus), a.shard_docs),
            batch_tokens=a.batch_tokens,
            num_cpus_per_actor=a.threads,
            ray=ray,
        )
    )
    t1 = time.perf_counter()
    sets = build_aligned_sets(
        AlignConfig(
            cache=str(out / "cache"),
            student_tokenizers=tuple(s.tokenizer for s in setup.students),
            output=str(out / "aligned"),
            settings=AlignSettings(gamma=a.gamma),
            ray=ray,
        )
    )
    t2 = time.perf_counter()
    losses, tokens = {}, {}
    for student, aligned in zip(setup.students, sets, strict=True):
        result = train_local(
            train_config(setup, student, aligned.path, out / f"train-{student.name}"), say=lambda m: None
        )
        losses[student.name] = [float(r["loss"]) for r in result.history]
        tokens[student.name] = sum(int(r["student_tokens"]) for r in result.history)
    t3 = time.perf_counter()
    return {
        "cpu_s": cpu_seconds(True) - cpu0,
        "teacher_s": t1 - t0,
        "align_s": t2 - t1,
        "train_s": t3 - t2,
        "teacher_tokens": summary.tokens,
        "student_tokens": tokens,
        "flops": flops(
            setup.teacher_params, summary.tokens, {s.name: s.params for s in setup.students}, tokens
        ),
        "losses": losses,
        "aligned": {s.name: a.path for s, a in zip(setup.students, sets, strict=True)},
    }


# ------------------------------------------------------------------------------------------------ online side


class OnlineTeacher:
    """The teacher of an online run: scores documents and aligns them to the student, per step."""

    def __init__(self, teacher: str, student_tokenizer: str, texts: dict[str, str], args):
        from alm_pipeline.pipeline.align_stage import AlignSettings
        from alm_pipeline.pipeline.byteview import load_byte_view
        from alm_pipeline.pipeline.engine_hf import HFEngineConfig, HFTeacherEngine

        self.view = load_byte_view(teacher)
        self.student = load_byte_view(student_tokenizer)
        self.engine = HFTeacherEngine(
            HFEngineConfig(
                model=teacher, dtype="float32", max_batch_tokens=args.batch_tokens, num_threads=args.threads
            ),
            self.view.boundary_token_ids(),
            self.view.vocab_size,
        )
        self.texts, self.max_length = texts, args.max_length
        self.settings = AlignSettings(gamma=args.gamma)
        self.tokens = 0  # teacher tokens scored

    def rows(self, doc_ids: list[str]) -> AlignedRows:
        """The aligned training rows of ``doc_ids`` (in that order), from a fresh teacher forward."""
        from alm_pipeline.pipeline.align_stage import align_table

        encs = [
            self.view.encode(self.view.normalize_text(self.texts[d]), max_length=self.max_length, doc_ref=d)
            for d in doc_ids
        ]
        scores = self.engine.score([e.token_ids for e in encs])
        self.tokens += sum(len(e.token_ids) for e in encs)
        table = pa.table(
            {
                "doc_id": pa.array(doc_ids, pa.string()),
                "text": [e.text for e in encs],
                "token_ids": pa.array([e.token_ids for e in encs], type=pa.list_(pa.int32())),
                "offsets": pa.array([e.offsets for e in encs], type=pa.list_(pa.int32())),
                "logprob": pa.array([s[0] for s in scores], type=pa.list_(pa.float32())),
                "boundary_logprob": pa.array([s[1] for s in scores], type=pa.list_(pa.float32())),
            }
        )
        rows = AlignedRows.from_table(align_table(table, self.view.is_special, self.student, self.settings))
        if rows.num_docs != len(doc_ids):
            raise RuntimeError(
                f"online alignment kept {rows.num_docs} of the step's {len(doc_ids)} documents"
            )
        return rows


class OnlineWorker(Worker):
    """The trainer's worker loop, with every step's rows recomputed by the teacher (see the module docstring).

    The trainer's reader still picks the step's documents (and reads their cached rows, which are dropped); the
    rows trained on are the teacher's fresh ones, in the same order. The step's totals (chunk counts for the
    loss normalisation) come from the trainer's index, so the fresh rows' chunk counts are written into it
    (one worker: its slice is the whole batch)."""

    def __init__(self, config, runtime, teacher: OnlineTeacher):
        super().__init__(config, runtime)
        self.teacher = teacher

    def _fetch(self, step: int):
        batch, rows, skipped = super()._fetch(step)
        fresh = self.teacher.rows([str(d) for d in rows.doc_ids])
        (mine,) = self.plan.worker_slices(batch, 1)
        self.index.chunks[mine] = fresh.num_groups
        return batch, fresh, skipped


def train_online(config, teacher: OnlineTeacher) -> list[dict]:
    """One online run: the trainer's loop in this process (``LocalRuntime``), every step's rows from ``teacher``;
    returns the metric rows of the steps."""
    from alm_pipeline.trainer.runtime import LocalRuntime

    history: list[dict] = []

    def sink(kind: str, row: dict) -> None:
        if kind == "row":
            history.append(row)

    OnlineWorker(config, LocalRuntime(config, sink, None), teacher).run()
    return history


def run_online(setup: Setup, out: Path) -> dict:
    """Per student: load the teacher, then score + align + train at every step."""
    cpu0 = cpu_seconds(False)
    losses, tokens, teacher_tokens = {}, {}, 0
    for student in setup.students:
        config = train_config(setup, student, setup.plan[student.name], out / f"online-{student.name}")
        teacher = OnlineTeacher(setup.teacher, student.tokenizer, setup.texts, setup.args)
        history = train_online(config.resolved(), teacher)
        losses[student.name] = [float(r["loss"]) for r in history]
        tokens[student.name] = sum(int(r["student_tokens"]) for r in history)
        teacher_tokens += teacher.tokens
        del teacher
    return {
        "cpu_s": cpu_seconds(False) - cpu0,
        "teacher_tokens": teacher_tokens,
        "student_tokens": tokens,
        "flops": flops(
            setup.teacher_params, teacher_tokens, {s.name: s.params for s in setup.students}, tokens
        ),
        "losses": losses,
    }


# ------------------------------------------------------------------------------------------------------ main


def fresh_dir(root: Path, counter: list[int]) -> Path:
    counter[0] += 1
    path = root / f"run-{counter[0]:03d}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def max_relative_difference(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    """Largest |a − b| / |b| over every student's loss curve (the curves must have the same steps)."""
    worst = 0.0
    for name, curve in b.items():
        for x, y in zip(a[name], curve, strict=True):
            worst = max(worst, abs(x - y) / max(abs(y), 1e-12))
    return worst


def benchmark(args, work: Path) -> dict:
    say(f"building the corpus and the models in {work}")
    setup = build_setup(args, work)
    counter = [0]
    say(
        "preparation run of the cached pipeline (starts Ray; its aligned sets fix the online runs' batch plans)"
    )
    prep = run_cached(setup, work / "prep")
    setup.plan = prep["aligned"]

    def cached() -> dict:
        out = fresh_dir(work, counter)
        try:
            return run_cached(setup, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def online() -> dict:
        out = fresh_dir(work, counter)
        try:
            return run_online(setup, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    say(f"{args.warmup} warm-up + {args.reps} timed rounds, alternating")
    runs = run_paired({"cached": cached, "online": online}, reps=args.reps, warmup=args.warmup)
    loss_diff = max(
        max_relative_difference(o["losses"], c["losses"])
        for o, c in zip(runs.results["online"], runs.results["cached"], strict=True)
    )
    return {"setup": setup, "runs": runs, "loss_diff": loss_diff, "prep": prep}


def report(args, result: dict) -> None:
    setup, runs = result["setup"], result["runs"]
    c0, o0 = runs.results["cached"][0], runs.results["online"][0]
    k = len(setup.students)
    rows = []
    for name, spec in (("wall time (s)", None), ("CPU time (s)", "cpu_s")):
        rows.append(
            [
                name,
                runs.spread("cached", spec).format(".1f"),
                runs.spread("online", spec).format(".1f"),
                runs.ratio("cached", "online", spec).format(".2f"),
            ]
        )
    rows.append(
        ["FLOPs (estimated)", f"{c0['flops']:.3g}", f"{o0['flops']:.3g}", f"{c0['flops'] / o0['flops']:.2f}"]
    )
    rows.append(
        [
            "teacher tokens scored",
            c0["teacher_tokens"],
            o0["teacher_tokens"],
            f"{c0['teacher_tokens'] / o0['teacher_tokens']:.2f}",
        ]
    )
    print_table(
        ["metric", f"cached (1 cache, {k} students)", f"online ({k} runs)", "cached ÷ online"],
        rows,
        title=f"{len(setup.students)} students × {args.steps} steps × {args.batch_size} documents, "
        f"{args.reps} rounds (median [min–max])",
    )
    phases = [
        [k, Spread.of([r[k] for r in runs.results["cached"]]).format(".1f")]
        for k in ("teacher_s", "align_s", "train_s")
    ]
    print_table(["cached phase", "wall (s)"], phases, title="Cached side by phase")
    sizes = [
        [
            "teacher (SmolLM2 tokenizer)",
            f"{setup.teacher_params:,}",
            "",
            f"{statistics.mean(len(t) for t in setup.texts.values()):.0f} chars/doc",
        ]
    ]
    for s in setup.students:
        sizes.append(
            [
                f"student {s.name}",
                f"{s.params:,}",
                f"{setup.teacher_params / s.params:.2f}",
                f"{c0['student_tokens'][s.name]:,} tokens trained",
            ]
        )
    print_table(["model", "forward params", "teacher ÷ student", "data"], sizes, title="Models")
    print(f"\nlargest relative loss difference online vs cached, any step: {result['loss_diff']:.2e}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--students", default=",".join(DEFAULT_STUDENTS), help="comma-separated: gpt2,mistral,qwen3"
    )
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1, help="documents = steps × batch size ÷ epochs")
    ap.add_argument("--doc-bytes", type=int, default=600)
    ap.add_argument("--max-length", type=int, default=256, help="teacher tokens per document")
    ap.add_argument("--shard-docs", type=int, default=32, help="about this many documents per cache shard")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="teacher padded tokens per forward pass")
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--gamma", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the teacher and the trainer")
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--warmup", type=int, default=0, help="untimed rounds per side (the preparation run already warms up)"
    )
    ap.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    ap.add_argument("--json", default=None, help="also write the measurements here")
    ap.add_argument(
        "--quick", action="store_true", help="smoke test: 2 steps × 2 docs, gpt2 + mistral, 1 round"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.reps, args.warmup = 2, 2, 1, 0
        args.doc_bytes, args.max_length = 200, 64
        if args.students == ",".join(DEFAULT_STUDENTS):
            args.students = "gpt2,mistral"
    args.students = [s for s in args.students.split(",") if s]
    unknown = sorted(set(args.students) - set(STUDENT_SHAPES))
    if unknown:
        ap.error(f"unknown student(s) {unknown}; known: {sorted(STUDENT_SHAPES)}")
    if (args.steps * args.batch_size) % args.epochs:
        ap.error("--epochs must divide steps × batch size")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-headline-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = benchmark(args, work)
        report(args, result)
        if args.json:
            runs = result["runs"]
            Path(args.json).write_text(
                json.dumps(
                    {
                        "settings": {k: v for k, v in vars(args).items()},
                        "seconds": runs.seconds,
                        "results": runs.results,
                    },
                    indent=2,
                    default=str,
                )
            )
        return result
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
