"""The embedded default job: the whole pipeline on the bundled corpus with a real small teacher.

Stages (a second run reuses what the first produced: the cache and the aligned sets resume/verify instead of
recomputing, a finished training run with the same settings is kept, and so is the initial student):

1. ``teacher-cache``: SmolLM2-135M-Instruct over the first ``max_docs`` documents of the bundled Shakespeare
   corpus;
2. ``align``: that one cache onto every student tokenizer (``bytes`` and the GPT-2 tokenizer by default);
3. ``train``: a short tokenizer transfer — the teacher's weights with the ``train_student`` tokenizer and
   FVT-initialised embeddings, trained with ALM from the cache (the teacher is not loaded);
4. ``evaluate``: bits per byte on bundled held-out documents (plays that are not in the training corpus) of the
   teacher, the student before training (its FVT initialisation) and the student after;
5. ``chat``: the bundled conversations (``data/chat.jsonl``) cached with the teacher's chat template and aligned
   to every student tokenizer that has a chat template of its own (``bytes`` has one; the GPT-2 tokenizer has
   none and is skipped, saying so), the loss restricted to assistant turns; skipped when the teacher has no
   chat template;

and a final table with each artefact's path and its key numbers. ``seconds`` breaks the wall time down by stage.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alm_pipeline.configs import check_int, check_number, check_positive, option
from alm_pipeline.pipeline.ray_utils import RayConfig
from alm_pipeline.trainer.config import (
    CheckpointConfig,
    ComputeConfig,
    DataConfig,
    DistributedConfig,
    LoggingConfig,
    OptimConfig,
    StudentSpec,
    TrainConfig,
)


@dataclass(frozen=True)
class QuickstartConfig:
    """The quickstart's settings (``alm-pipeline quickstart`` options, generated from these fields)."""

    output: str = option("runs/quickstart", "Folder for every artefact of the run")
    teacher: str = option("smollm2-135m", "Teacher model (short name, path or hub name)")
    data: str | None = option(None, "Corpus (default: the bundled Shakespeare corpus)")
    max_docs: int = option(64, "Documents of the corpus to use")
    max_length: int = option(256, "Teacher tokens per document")
    students: tuple[str, ...] = option(
        ("bytes", "gpt2-tokenizer"), "Student tokenizers to align to (repeat for several)", cli="student"
    )
    gamma: float = option(0.1, "γ for chunk merging")
    # on a 2-core machine: 2 torch threads, CPU left for the other tasks
    num_cpus_per_actor: float = option(1.5, "CPUs of the teacher actor")
    train_student: str | None = option(
        None, "Which aligned student tokenizer to train (default: the first subword one, else bytes)"
    )
    train: bool = option(
        True, "Stages 3-4: train a student and compare bits per byte (--no-train: stop after align)"
    )
    steps: int = option(30, "Training steps (tokenizer transfer from the teacher, ALM loss)")
    batch_size: int = option(4, "Documents per training step")
    lr: float = option(5e-5, "Peak learning rate (10% warm-up, linear decay)")
    eval_docs: int = option(16, "Bundled held-out documents for bits per byte")
    eval_max_bytes: int = option(1024, "Held-out documents are cut at a line end to this many UTF-8 bytes")
    chat: bool = option(
        True,
        "Last stage: cache the bundled conversations with the teacher's chat template and align them to the "
        "students that have one (--no-chat: skip)",
    )
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.students:
            raise ValueError("quickstart needs at least one student tokenizer (--student)")
        if not self.output:
            raise ValueError("--output must not be empty")
        for name in ("max_docs", "steps", "batch_size", "eval_docs"):
            check_int("--" + name.replace("_", "-"), getattr(self, name))
        check_int("--max-length", self.max_length, minimum=2)
        check_int("--eval-max-bytes", self.eval_max_bytes, minimum=64)
        check_number("--gamma", self.gamma, 0, 1)
        check_positive("--num-cpus-per-actor", self.num_cpus_per_actor)
        check_positive("--lr", self.lr)
        if self.train_student is not None and self.train_student not in self.students:
            raise ValueError(
                f"--train-student {self.train_student!r} is not one of the student tokenizers "
                f"({', '.join(self.students)}): it must be aligned first"
            )


@dataclass
class QuickstartResult:
    cache: dict
    aligned: list[dict]
    seconds: dict
    training: dict | None = None  # {"student", "run", "final", "steps", "first_loss", "last_loss"}
    bits_per_byte: dict | None = None  # {"teacher": {...}, "student before": {...}, "student after": {...}}
    chat: dict | None = None  # {"cache", "conversations", "aligned": [{"student", "path", "coverage", ...}]}

    def lines(self) -> list[str]:
        c = self.cache
        out = [
            "",
            "== quickstart results ==",
            f"teacher cache   {c['path']}",
            f"                {c['docs']} docs, {c['tokens']} tokens, {c['bytes_per_token']} bytes/token on disk, "
            f"teacher bits/byte {c['bits_per_byte']}"
            # without a BOS the cache has no log-probability for a document's first token (see evaluate)
            + ("" if c["tokenizer"]["prefix_ids"] else " (first token of each document not scored)"),
        ]
        for a in self.aligned:
            out.append(f"aligned set     {a['path']}")
            out.append(
                f"                student {a['student_tokenizer']}: {a['docs']} docs, {a['groups']} chunks, "
                f"coverage {a['coverage']:.2%}, {a['mean_group_bytes']} bytes/chunk"
            )
        if self.training:
            t = self.training
            out.append(f"training run    {t['run']}")
            out.append(
                f"                student tokenizer {t['student']}: {t['steps']} steps, ALM loss "
                f"{t['first_loss']:.4g} → {t['last_loss']:.4g}; final model {t['final']}"
            )
        if self.bits_per_byte:
            some = next(iter(self.bits_per_byte.values()))
            out.append(
                f"bits per byte   on {some['docs']} held-out documents ({some['bytes']} bytes; The Tempest, "
                "Julius Caesar: not in the training corpus)"
            )
            for name, b in self.bits_per_byte.items():
                out.append(f"                {name:<15} {b['bits_per_byte']:.4f}   {b['model']}")
        if self.chat:
            c = self.chat
            out.append(f"chat cache      {c['cache']}")
            out.append(
                f"                {c['conversations']} conversations rendered with the teacher's chat template"
            )
            for a in c["aligned"]:
                out.append(f"chat aligned    {a['path']}")
                out.append(
                    f"                student {a['student']}: coverage {a['coverage']:.2%} of assistant content "
                    f"bytes, {a['paired_template_runs']}/{a['teacher_template_runs']} template runs paired"
                )
        out.append("time            " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        return out

    def to_json(self) -> dict:
        return asdict(self)


RESULT_FILE = "quickstart.json"


def _train_student(config: QuickstartConfig, aligned: list[dict]) -> dict | None:
    if not config.train:
        return None
    if config.train_student is not None:
        wanted = [a for a in aligned if a["student_spec"] == config.train_student]
        if not wanted:
            raise ValueError(f"train_student {config.train_student!r} was not aligned (not installed?)")
        return wanted[0]
    subword = [a for a in aligned if a["student_spec"] != "bytes"]
    return (subword or aligned)[0]


def _train_config(config: QuickstartConfig, aligned_set: str, run_dir: Path) -> TrainConfig:
    from alm_pipeline.assets import resolve_model

    return TrainConfig(
        data=DataConfig(aligned=aligned_set),
        student=StudentSpec(init_from=resolve_model(config.teacher)),
        output=str(run_dir),
        optim=OptimConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr),
        compute=ComputeConfig(micro_batch_tokens=2048),
        checkpoint=CheckpointConfig(every=config.steps, keep=1),
        logging=LoggingConfig(tensorboard=True),
        distributed=DistributedConfig(ray=config.ray),
    ).resolved()


def _initial_student(train_config: TrainConfig, dest: Path, say) -> Path:
    """The student before training: exactly what the run starts from (for a tokenizer transfer, the teacher's
    blocks with the student tokenizer and FVT-initialised embeddings)."""
    from alm_pipeline.trainer.student import load_student, save_student
    from alm_pipeline.trainer.worker import student_config

    if (dest / "config.json").exists():
        return dest
    say(f"saving the initial (FVT) student to {dest}")
    bundle = load_student(student_config(train_config))
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_student(bundle, tmp)
    tmp.replace(dest)
    return dest


# settings that change how a run is started or shown, not what it computes
_RUNTIME_SETTINGS = (
    ("checkpoint", "overwrite"),
    ("checkpoint", "resume"),
    ("distributed", "ray"),
    ("logging", "progress"),
)


def _result_settings(config: dict) -> dict:
    out = json.loads(json.dumps(config, default=str))
    for section, key in _RUNTIME_SETTINGS:
        out.get(section, {}).pop(key, None)
    return out


def _train(train_config: TrainConfig, say) -> dict:
    """Run the training (or reuse a finished run with the same settings); returns its ``run.json``."""
    from alm_pipeline.trainer.driver import RUN_FILE, run_training

    run_dir = Path(train_config.output)
    done = run_dir / RUN_FILE
    if done.exists():
        previous = json.loads(done.read_text())
        same = _result_settings(previous.get("config", {})) == _result_settings(train_config.to_dict())
        if same and previous.get("steps") == train_config.optim.steps and previous.get("final_checkpoint"):
            say(f"training run {run_dir} already finished with these settings: reused")
            return previous
    overwrite = dataclasses.replace(train_config.checkpoint, overwrite=True)
    result = run_training(dataclasses.replace(train_config, checkpoint=overwrite), say=say)
    return json.loads((result.output / RUN_FILE).read_text())


def _first_last_loss(run_dir: Path) -> tuple[float, float]:
    import csv

    with (run_dir / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss")]
    return float(rows[0]["loss"]), float(rows[-1]["loss"])


def heldout_texts(config: QuickstartConfig) -> list[tuple[str, str]]:
    """The evaluation texts: the first ``eval_docs`` bundled held-out documents, each cut at a line end to at
    most ``eval_max_bytes`` bytes, so that every model scores exactly the same bytes (no tokenizer truncates)."""
    from alm_pipeline.evaluation.bits_per_byte import HELDOUT, iter_data_texts
    from alm_pipeline.pipeline.corpus import split_at_lines

    return [
        (ref, split_at_lines(text, config.eval_max_bytes)[0])
        for ref, text in iter_data_texts(HELDOUT, max_docs=config.eval_docs)
    ]


def _bits_per_byte(models: dict[str, str], config: QuickstartConfig, say) -> dict:
    from alm_pipeline.evaluation.bits_per_byte import model_bits_per_byte
    from alm_pipeline.evaluation.models import load_eval_model

    texts = heldout_texts(config)
    out = {}
    for name, path in models.items():
        say(f"held-out bits per byte: {name} ({path})")
        model = load_eval_model(path)
        # at most one token per byte, plus BOS/EOS: nothing is truncated
        bpb = model_bits_per_byte(model, texts, max_length=config.eval_max_bytes + 8, batch_tokens=4096)
        out[name] = {"model": str(path), **bpb.to_json()}
        del model
    return out


def run_quickstart(
    config: QuickstartConfig, progress: Callable[[str], None] | None = None
) -> QuickstartResult:
    """Run the stages (see the module docstring) under a lock on ``config.output`` (each stage also locks its own
    folder inside): a second quickstart into the same folder is refused at once."""
    from alm_pipeline.locking import output_lock

    with output_lock(Path(config.output).absolute(), "quickstart"):
        return _run(config, progress)


def _run(config: QuickstartConfig, progress: Callable[[str], None] | None) -> QuickstartResult:
    from alm_pipeline.assets import is_installed, resolve_model
    from alm_pipeline.cache import open_cache
    from alm_pipeline.cache.aligned import open_aligned_set
    from alm_pipeline.pipeline.align_stage import AlignConfig, AlignSettings, build_aligned_sets
    from alm_pipeline.pipeline.corpus import CorpusConfig
    from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, build_teacher_cache

    say = progress or (lambda msg: None)
    out = Path(config.output).absolute()
    seconds: dict[str, float] = {}
    stages = (4 if config.train else 2) + (1 if config.chat else 0)

    t = time.time()
    say(f"[1/{stages}] teacher cache: {config.teacher} over {config.max_docs} documents")
    build_teacher_cache(
        TeacherCacheConfig(
            teacher=config.teacher,
            corpus=CorpusConfig(path=config.data, limit=config.max_docs),  # None: the bundled corpus
            output=str(out / "cache"),
            max_length=config.max_length,
            shard_size=28 * 1024,  # bytes: about 16 documents of the bundled corpus per shard
            num_cpus_per_actor=config.num_cpus_per_actor,
            ray=config.ray,
        ),
        progress=say,
    )
    seconds["teacher-cache"] = time.time() - t

    students = []
    for s in config.students:
        if s != "bytes" and not Path(s).exists() and s.endswith("-tokenizer") and not is_installed(s):
            say(f"skipping student tokenizer {s!r}: not installed (scripts/setup.sh installs it; needs npm)")
            continue
        students.append(s)
    t = time.time()
    say(f"[2/{stages}] align to {', '.join(students)}")
    summaries = build_aligned_sets(
        AlignConfig(
            cache=str(out / "cache"),
            student_tokenizers=tuple(students),
            output=str(out / "aligned"),
            settings=AlignSettings(gamma=config.gamma),
            ray=config.ray,
        ),
        progress=say,
    )
    seconds["align"] = time.time() - t
    aligned = [
        {**open_aligned_set(s.path).summary(), "student_spec": spec}
        for s, spec in zip(summaries, students, strict=True)
    ]
    result = QuickstartResult(cache=open_cache(out / "cache").summary(), aligned=aligned, seconds=seconds)

    chosen = _train_student(config, aligned)
    if chosen is not None:
        t = time.time()
        name = chosen["student_spec"]
        run_dir = out / "train" / Path(chosen["path"]).name
        say(
            f"[3/{stages}] train: tokenizer transfer {config.teacher} → {name}, {config.steps} steps (ALM from the cache)"
        )
        train_config = _train_config(config, chosen["path"], run_dir)
        init = _initial_student(train_config, out / "student-init" / Path(chosen["path"]).name, say)
        run = _train(train_config, say)
        first, last = _first_last_loss(run_dir)
        result.training = {
            "student": name,
            "run": str(run_dir),
            "final": run["final_checkpoint"],
            "steps": run["steps"],
            "first_loss": first,
            "last_loss": last,
        }
        seconds["train"] = time.time() - t

        t = time.time()
        say(f"[4/{stages}] evaluate: bits per byte on {config.eval_docs} held-out documents")
        result.bits_per_byte = _bits_per_byte(
            {
                "teacher": resolve_model(config.teacher),
                "student before": str(init),
                "student after": run["final_checkpoint"],
            },
            config,
            say,
        )
        seconds["evaluate"] = time.time() - t
    if config.chat:
        t = time.time()
        say(f"[{stages}/{stages}] chat: the bundled conversations, rendered per model")
        result.chat = _chat_stage(config, out, students, say)
        if result.chat is not None:
            seconds["chat"] = time.time() - t
    (out / RESULT_FILE).write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    return result


def _chat_stage(config: QuickstartConfig, out: Path, students: list[str], say) -> dict | None:
    """Cache the bundled conversations with the teacher's chat template, align them to each student that has a
    chat template; None (said) when the teacher has none."""
    from alm_pipeline.assets import bundled_chat_path, resolve_model
    from alm_pipeline.cache import open_cache
    from alm_pipeline.pipeline.align_stage import AlignConfig, AlignSettings, build_aligned_sets
    from alm_pipeline.pipeline.chat import load_chat_template
    from alm_pipeline.pipeline.corpus import CorpusConfig
    from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, build_teacher_cache

    if load_chat_template(resolve_model(config.teacher)) is None:
        say(f"chat stage skipped: the teacher {config.teacher!r} has no chat template")
        return None
    with_template = []
    for s in students:
        if load_chat_template(s if s == "bytes" else resolve_model(s)) is None:
            say(
                f"chat stage: student tokenizer {s!r} has no chat template: not aligned (align --chat-template FILE)"
            )
        else:
            with_template.append(s)
    build_teacher_cache(
        TeacherCacheConfig(
            teacher=config.teacher,
            corpus=CorpusConfig(path=bundled_chat_path(), id_field="id"),
            output=str(out / "chat" / "cache"),
            max_length=config.max_length,
            num_cpus_per_actor=config.num_cpus_per_actor,
            ray=config.ray,
        ),
        progress=say,
    )
    cache = open_cache(out / "chat" / "cache")
    aligned = []
    if with_template:
        summaries = build_aligned_sets(
            AlignConfig(
                cache=str(out / "chat" / "cache"),
                student_tokenizers=tuple(with_template),
                output=str(out / "chat" / "aligned"),
                settings=AlignSettings(gamma=config.gamma),
                ray=config.ray,
            ),
            progress=say,
        )
        for summary, spec in zip(summaries, with_template, strict=True):
            report = json.loads((Path(summary.path) / "manifest.json").read_text())["coverage"]["chat"]
            aligned.append({"student": spec, "path": summary.path, **report})
    return {"cache": str(out / "chat" / "cache"), "conversations": cache.chat_docs, "aligned": aligned}
