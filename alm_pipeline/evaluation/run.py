"""``alm-pipeline evaluate`` as a function: :class:`EvalConfig` says what to compute, :func:`run_evaluation`
computes it for every model — bits per byte on every text domain, on a teacher cache's texts, chunk agreement
with every aligned set whose student tokenizer the model uses — as one JSON-ready dict holding one model ×
metric table (:class:`~alm_pipeline.evaluation.table.ResultTable`), and zero-shot accuracy on multiple-choice
tasks (:mod:`.multiple_choice`), and writes ``RUN_DIR/eval.json`` and
``RUN_DIR/eval.csv`` when asked (:data:`EVAL_FILE`, read back by :mod:`.plots`).

Every input is checked before any model loads: option values in :class:`EvalConfig`, then (:func:`plan`) the
model folders, the text sources, the multiple-choice tasks (read and checked), the cache and the aligned sets, and which models each aligned set applies to.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alm_pipeline.configs import check_choice, check_int, option
from alm_pipeline.evaluation.agreement import chunk_agreement, same_tokenizer
from alm_pipeline.evaluation.bits_per_byte import (
    BITS_PER_BYTE_CONVENTION,
    HELDOUT,
    cache_bits_per_byte,
    iter_cache_texts,
    iter_data_texts,
    model_bits_per_byte,
)
from alm_pipeline.evaluation.models import EvalError, load_eval_model, resolve_model_dir
from alm_pipeline.evaluation.multiple_choice import (
    MULTIPLE_CHOICE_CONVENTION,
    MCTask,
    load_bigbench_task,
    score_tasks,
)
from alm_pipeline.evaluation.table import CSV_FILE, ResultTable, column
from alm_pipeline.modeling import DTYPES
from alm_pipeline.storage import StorageError, is_uri, local_copy, location

__all__ = [
    "ALL_BIGBENCH",
    "CHANCE_ROW",
    "CSV_FILE",
    "EVAL_FILE",
    "TEACHER_ROW",
    "EvalConfig",
    "EvalPlan",
    "plan",
    "run_evaluation",
    "write_json",
]

EVAL_FILE = "eval.json"
TEACHER_ROW = "teacher (cache)"  # the table row of the teacher's bits per byte read from --cache
CHANCE_ROW = "chance"  # the table row of each multiple-choice task's chance accuracy
ALL_BIGBENCH = "bigbench"  # --task bigbench: every BIG-bench task the set-up step installs
CACHE_TEXTS = "cache_texts"  # the bits-per-byte group of the cached texts
BPB, ABS_DIFF, KL = "bits_per_byte", "mean_abs_chunk_diff", "binarised_kl"  # metric families
ACCURACY = "accuracy"  # multiple-choice accuracy (argmax of the summed log-likelihood), one column per task
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_SUFFIXES = (".jsonl.gz", ".jsonl", ".json", ".parquet")


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str | os.PathLike):
        return (os.fspath(value),)
    return tuple(os.fspath(v) for v in value)


@dataclass(frozen=True)
class EvalConfig:
    """What :func:`run_evaluation` computes; at least a model or a cache must be given.

    * ``model`` (repeatable, ``NAME=MODEL`` names the row): each model's bits per byte on every text domain
      (``data`` and ``domains``; the bundled held-out plays when neither is given and there is no ``cache``,
      ``aligned`` or ``tasks``), on the cached texts (``cache_texts``), its chunk agreement with every
      ``aligned`` set whose student tokenizer it uses, and its zero-shot accuracy on every multiple-choice ``tasks`` entry.
    * ``cache``: the teacher's bits per byte read from the cache (no model needed), the ``teacher (cache)`` row.
    * ``run_dir``: also write ``run_dir/eval.json`` and ``run_dir/eval.csv``.
    """

    model: tuple[str, ...] = option(
        (),
        "Model to evaluate, repeat for several (one table row each; NAME=MODEL names the row): a model folder, "
        "a short name (smollm2-135m), or a training run directory (then its final/ folder, else its latest "
        "complete checkpoint, else the only subfolder holding a config.json)",
    )
    data: tuple[str, ...] = option(
        (),
        "Texts for bits per byte, one domain per option, repeatable (NAME=SOURCE names it): a "
        ".jsonl/.json/.parquet file or folder (one corpus), or a text domain's held-out split: plays (the "
        "bundled held-out plays; also `heldout`), maths, code (installed by scripts/setup.sh). Default with "
        "only --model (no --cache, --aligned or --task): plays",
    )
    domains: str | None = option(
        None,
        "A folder of .jsonl files, one text domain per file, named after it (e.g. .models/domains/heldout)",
    )
    text_field: str = option("text", "Field holding the document text")
    id_field: str | None = option(None, "Field holding a unique document id (default: hash of the text)")
    max_docs: int | None = option(
        None, "Use only the first N documents of each source (domain, cache, aligned set)"
    )
    cache: str | None = option(
        None, "Teacher cache: report the teacher's bits per byte read from it (no model needed)"
    )
    cache_texts: bool = option(
        False,
        "Also evaluate every --model on the cached texts (the bytes the teacher saw) and report the gap "
        "to the teacher",
    )
    aligned: tuple[str, ...] = option(
        (),
        "Aligned set (from `alm-pipeline align`), repeatable (NAME=PATH names its columns): chunk agreement "
        "of every --model whose tokenizer is its student tokenizer with the cached teacher: mean |C_S - C_T|, "
        "debiased mean |(C_S+σ_S) - (C_T+σ_T)|, binarised KL at τ=1",
    )
    tasks: tuple[str, ...] = option(
        (),
        "Multiple-choice task, repeatable: a BIG-bench task.json file, the name of a task installed by "
        "scripts/setup.sh (phrase_relatedness, similarities_abstraction, social_iqa, winowhy), or `bigbench` "
        "for all of these. Zero-shot accuracy per task, with a `chance` row",
        cli="task",
    )
    max_examples_per_task: int | None = option(
        100, "Score at most N examples of each --task (BIG-bench's own subset, seed 42; 0: all)"
    )
    max_length: int = option(
        1024, "Model tokens per document, special tokens included (longer ones are truncated)"
    )
    batch_tokens: int = option(8192, "Padded tokens per forward pass")
    max_logit_elements: int = option(
        1 << 25, "fp32 logits alive at once (positions per LM-head slice = this / vocabulary size)"
    )
    dtype: str = option(
        "float32", "Model weights dtype: float32, bfloat16, float16 (log-softmax is always fp32)"
    )
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    run_dir: str | None = option(None, "Also write the result to RUN_DIR/eval.json and RUN_DIR/eval.csv")

    def __post_init__(self) -> None:
        for name in ("model", "data", "aligned", "tasks"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        try:
            check_int("--max-length", self.max_length, minimum=2)
            check_int("--batch-tokens", self.batch_tokens)
            check_int("--max-logit-elements", self.max_logit_elements)
            check_int("--max-docs", self.max_docs, allow_none=True)
            check_int("--max-examples-per-task", self.max_examples_per_task, minimum=0, allow_none=True)
            check_choice("--dtype", self.dtype, tuple(DTYPES))
        except ValueError as err:
            raise EvalError(str(err)) from None
        if not _DEVICE.match(self.device):
            raise EvalError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not self.text_field:
            raise EvalError("--text-field must not be empty")
        for opt, values in (("--model", self.model), ("--data", self.data), ("--aligned", self.aligned)):
            for value in values:
                name, source = _split_named(value)
                if not source or (name is not None and not name):
                    raise EvalError(f"{opt} {value!r}: expected SOURCE or NAME=SOURCE")
        if self.cache_texts and not self.cache:
            raise EvalError("--cache-texts needs a teacher cache (--cache)")
        for task in self.tasks:
            if not task.strip():
                raise EvalError("--task must not be empty")
        if (self.cache_texts or self.aligned or self.data or self.domains or self.tasks) and not self.model:
            what = next(
                o
                for o, v in (
                    ("--data", self.data),
                    ("--domains", self.domains),
                    ("--aligned", self.aligned),
                    ("--cache-texts", self.cache_texts),
                    ("--task", self.tasks),
                )
                if v
            )
            raise EvalError(f"{what} needs a model to evaluate (--model)")
        if not (self.model or self.cache):
            raise EvalError("nothing to evaluate: give a model (--model) and/or a teacher cache (--cache)")


def _split_named(value: str) -> tuple[str | None, str]:
    """``"NAME=SOURCE"`` → ``(NAME, SOURCE)``; a value whose part before ``=`` is not a plain name (it holds a
    ``/``, say) is a source without a name."""
    name, sep, source = value.partition("=")
    if sep and _NAME.match(name):
        return name, source
    if sep and not name:
        return "", source
    return None, value


def _stem(path: str) -> str:
    base = Path(path.rstrip("/")).name
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def _unique(option_name: str, items: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, given in items:
        if name in out:
            raise EvalError(
                f"{option_name}: two entries are named {name!r} ({out[name]} and {given}); name them with "
                f"{option_name} NAME=..."
            )
        out[name] = given
    return out


@dataclass(frozen=True)
class EvalPlan:
    """What :func:`run_evaluation` will do, every input checked (:func:`plan`)."""

    models: dict[str, tuple[str, str]]  # row name → (model folder, how it was chosen)
    domains: dict[str, tuple[str, str]]  # domain name → (source as given, path)
    aligned: dict[str, str]  # aligned-set name → path
    applies: dict[str, dict[str, str | None]]  # aligned name → {model name: None (applies) or why not}
    tasks: dict[str, MCTask] = dataclasses.field(default_factory=dict)  # task name → its examples (all)


def _domain_source(source: str, option_name: str) -> str:
    from alm_pipeline.assets import TEXT_DOMAINS, AssetNotInstalledError, domain_path

    if source == HELDOUT or (source in TEXT_DOMAINS and not Path(source).exists()):
        try:
            return domain_path("plays" if source == HELDOUT else source, "heldout")
        except AssetNotInstalledError as err:
            raise EvalError(f"{option_name} {source}: {err}") from None
    if is_uri(source) and not location(source).is_local:  # object storage: a local copy to read
        try:
            return str(local_copy(source))
        except (StorageError, FileNotFoundError) as err:
            raise EvalError(f"{option_name} {source}: {err}") from None
    if not Path(source).expanduser().exists():
        raise EvalError(
            f"{option_name} {source}: no such file or directory (nor a text domain: plays, maths, code)"
        )
    return str(Path(source).expanduser())


def _load_tasks(specs: tuple[str, ...]) -> dict[str, MCTask]:
    """The multiple-choice tasks of ``--task`` by name (``bigbench`` expanded), each file read and checked."""
    from alm_pipeline.assets import BIGBENCH

    expanded: dict[str, str] = {}  # task spec → the --task value it comes from
    for given in specs:
        if given == ALL_BIGBENCH and not Path(given).exists():
            for name in BIGBENCH.tasks:
                expanded.setdefault(name, given)
        else:
            expanded.setdefault(given, given)
    tasks: dict[str, MCTask] = {}
    for spec, given in expanded.items():
        where = f"--task {given}" if spec == given else f"--task {given} ({spec})"
        if is_uri(spec) and not location(spec).is_local:
            try:
                spec = str(local_copy(spec))
            except (StorageError, FileNotFoundError) as err:
                raise EvalError(f"{where}: {err}") from None
        if spec not in BIGBENCH.tasks and not Path(spec).expanduser().is_file():
            raise EvalError(
                f"{where}: no such task file, nor a task installed by the set-up step "
                f"({', '.join(BIGBENCH.tasks)}), nor `{ALL_BIGBENCH}` for all of them"
            )
        try:
            task = load_bigbench_task(spec)
        except EvalError as err:
            raise EvalError(f"{where}: {err}") from None
        if task.name in tasks:
            raise EvalError(
                f"--task: two tasks are named {task.name!r} ({tasks[task.name].source} and {task.source})"
            )
        tasks[task.name] = task
    return tasks


def plan(config: EvalConfig) -> EvalPlan:
    """Check every input of ``config`` without loading a model (tokenizers are loaded to match aligned sets)."""
    models: dict[str, tuple[str, str]] = {}
    named = []
    for value in config.model:
        name, spec = _split_named(value)
        named.append((name or spec, spec))
    for name, spec in _unique("--model", named).items():
        try:
            models[name] = resolve_model_dir(spec)
        except EvalError as err:
            raise EvalError(f"--model {spec}: {err}") from None
        hub_like = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
        if models[name][1].startswith("as given") and not hub_like:
            raise EvalError(f"--model {spec}: no such model folder (nor a Hugging Face Hub id ORG/NAME)")
    if config.cache and TEACHER_ROW in models:
        raise EvalError(f"--model: the row name {TEACHER_ROW!r} is the cache's teacher; choose another")
    if config.tasks and CHANCE_ROW in models:
        raise EvalError(f"--model: the row name {CHANCE_ROW!r} is the tasks' chance level; choose another")

    sources: list[tuple[str, str]] = []
    for value in config.data:
        name, source = _split_named(value)
        default = "plays" if source == HELDOUT else _stem(source)
        sources.append((name or default, source))
    if config.domains:
        folder = Path(config.domains).expanduser()
        if is_uri(config.domains) and not location(config.domains).is_local:
            try:
                folder = local_copy(config.domains)
            except (StorageError, FileNotFoundError) as err:
                raise EvalError(f"--domains {config.domains}: {err}") from None
        files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
        if not files:
            raise EvalError(
                f"--domains {config.domains}: not a folder holding .jsonl files (one per text domain)"
            )
        sources += [(_stem(f.name), str(f)) for f in files]
    if not sources and config.model and not (config.cache or config.aligned or config.tasks):
        sources = [("plays", HELDOUT)]
    domains = {
        name: (source, _domain_source(source, "--data"))
        for name, source in _unique("--data", sources).items()
    }

    if config.cache and not _is_file(location(config.cache) / "manifest.json"):
        raise EvalError(f"--cache {config.cache}: not a teacher cache (no manifest.json)")
    named = []
    for value in config.aligned:
        name, path = _split_named(value)
        named.append((name or _stem(path), path))
    aligned = _unique("--aligned", named)
    applies = _match_aligned_sets(aligned, models)
    tasks = _load_tasks(config.tasks)
    return EvalPlan(models=models, domains=domains, aligned=aligned, applies=applies, tasks=tasks)


def _match_aligned_sets(
    aligned: dict[str, str], models: dict[str, tuple[str, str]]
) -> dict[str, dict[str, str | None]]:
    """For every aligned set, which models use its student tokenizer (None) and why the others do not."""
    if not aligned:
        return {}
    from alm_pipeline.cache.aligned import open_aligned_set
    from alm_pipeline.cache.store import CacheIntegrityError
    from alm_pipeline.pipeline.byteview import TokenizerMismatchError, load_byte_view

    views = {}
    for name, (path, _) in models.items():
        try:
            views[name] = load_byte_view(path)
        except (OSError, ValueError, TokenizerMismatchError) as err:
            raise EvalError(f"--model {path}: cannot load its tokenizer ({err})") from None
    out: dict[str, dict[str, str | None]] = {}
    for set_name, path in aligned.items():
        try:
            aligned_set = open_aligned_set(path, verify=False)
            set_view = load_byte_view(aligned_set.tokenizer_dir)
        except (CacheIntegrityError, ValueError, OSError) as err:
            raise EvalError(f"--aligned {path}: {err}") from None
        out[set_name] = {m: same_tokenizer(view, set_view) for m, view in views.items()}
        if all(reason is not None for reason in out[set_name].values()):
            student = aligned_set.manifest["student_tokenizer"]["name"]
            raise EvalError(f"--aligned {path}: no --model uses its student tokenizer ({student})")
    return out


def _is_file(loc) -> bool:
    try:
        return loc.is_file()
    except StorageError as err:
        raise EvalError(str(err)) from None


def write_json(path: str | os.PathLike[str], obj: Any) -> str:
    """Write ``obj`` as indented JSON, atomically, to a local path or an object-storage URI; returns where."""
    out = location(path)
    out.write_bytes((json.dumps(obj, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    return out.uri


def run_evaluation(config: EvalConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Everything ``config`` asks for, as one JSON-ready dict (see :class:`EvalConfig`)::

        {"convention": ...,
         "domains": {domain: {"source", "path"}},
         "models": {row: {"model": {...},
                          "bits_per_byte": {domain: {"path", "max_length", <BitsPerByte>}},
                          "cache_texts": {"max_length", <BitsPerByte>, "gap_to_teacher"},
                          "chunk_agreement": {aligned: {"aligned": {...}, <ChunkAgreement>} or {"skipped": why}},
                          "multiple_choice": {task: {"max_length", <MCResult>}}}},
         "multiple_choice": {"convention", "max_examples", "tasks": {task: {"source", "examples", "chance"}}},
         "cache": {"path", "teacher", ..., <BitsPerByte>},
         "table": <ResultTable.to_json()>, "seconds": ...}

    Models are loaded one at a time. With ``run_dir`` the dict is also written to ``run_dir/eval.json`` and the
    table to ``run_dir/eval.csv``, under a lock on ``run_dir`` held for the whole evaluation
    (:mod:`alm_pipeline.locking`: one writer per folder).
    """
    if config.run_dir:
        from alm_pipeline.locking import output_lock

        plan(config)  # every option and input checked before the lock creates the folder
        with output_lock(config.run_dir, "evaluate"):
            result = run_evaluation(dataclasses.replace(config, run_dir=None), progress)
            out = write_json(location(config.run_dir) / EVAL_FILE, result)
            ResultTable.from_json(result["table"]).write_csv(location(config.run_dir) / CSV_FILE)
        (progress or (lambda msg: None))(f"wrote {out} and {CSV_FILE}")
        return result
    say = progress or (lambda msg: None)
    t0 = time.time()
    todo = plan(config)
    table = ResultTable()
    result: dict[str, Any] = {
        "convention": BITS_PER_BYTE_CONVENTION,
        "domains": {name: {"source": src, "path": path} for name, (src, path) in todo.domains.items()},
        "models": {},
    }
    max_examples = config.max_examples_per_task or None  # 0 or None: every example
    subsets = {name: task.subset(max_examples) for name, task in todo.tasks.items()}
    if subsets:
        result["multiple_choice"] = {
            "convention": MULTIPLE_CHOICE_CONVENTION,
            "max_examples": max_examples,
            "tasks": {
                name: {"source": task.source, "examples": len(task.examples), "chance": task.chance}
                for name, task in subsets.items()
            },
        }

    teacher_bpb = None
    if config.cache:
        say(f"teacher bits per byte from {config.cache}")
        teacher_bpb, info = cache_bits_per_byte(config.cache, config.max_docs)
        result["cache"] = {**info, **teacher_bpb.to_json()}
        table.add(TEACHER_ROW, column(BPB, CACHE_TEXTS), teacher_bpb.bits_per_byte)
        if teacher_bpb.excluded_bytes:
            table.notes.append(
                f"{TEACHER_ROW}: the cache has no log-probability for each document's first token (the teacher "
                f"tokenizer adds no BOS), so {teacher_bpb.excluded_bytes} of {teacher_bpb.document_bytes} bytes "
                "are left out; evaluate the teacher with --model --cache-texts for the comparable number"
            )

    for row, (path, chosen_as) in todo.models.items():
        table.add_row(row)
        say(f"loading {row} ({path})")
        model = load_eval_model(
            path, dtype=config.dtype, device=config.device, max_logit_elements=config.max_logit_elements
        )
        model.source = chosen_as  # how the folder was found from what the user gave
        entry: dict[str, Any] = {"model": model.describe(), "bits_per_byte": {}}
        max_length = config.max_length
        if model.max_positions is not None and max_length > model.max_positions:
            say(
                f"{row}: max_length {max_length} is above the model's {model.max_positions} positions: using those"
            )
            max_length = model.max_positions
        scoring = {"max_length": max_length, "batch_tokens": config.batch_tokens, "progress": say}
        for domain, (_, domain_path) in todo.domains.items():
            say(f"{row}: bits per byte on {domain}")
            texts = iter_data_texts(domain_path, config.text_field, config.id_field, config.max_docs)
            bpb = model_bits_per_byte(model, texts, **scoring)
            entry["bits_per_byte"][domain] = {"path": domain_path, "max_length": max_length, **bpb.to_json()}
            table.add(row, column(BPB, domain), bpb.bits_per_byte)
        if config.cache_texts and teacher_bpb is not None:
            say(f"{row}: bits per byte on the cached texts")
            bpb = model_bits_per_byte(model, iter_cache_texts(config.cache, config.max_docs), **scoring)
            same_bytes = bpb.bytes == teacher_bpb.bytes
            entry["cache_texts"] = {
                "max_length": max_length,
                **bpb.to_json(),
                # only meaningful on the same bytes (not when the cache leaves first tokens out)
                "gap_to_teacher": bpb.bits_per_byte - teacher_bpb.bits_per_byte if same_bytes else None,
            }
            table.add(row, column(BPB, CACHE_TEXTS), bpb.bits_per_byte)
        if todo.aligned:
            entry["chunk_agreement"] = {}
        for set_name, set_path in todo.aligned.items():
            reason = todo.applies[set_name][row]
            if reason is not None:
                entry["chunk_agreement"][set_name] = {"skipped": f"not its student tokenizer: {reason}"}
                continue
            say(f"{row}: chunk agreement with {set_name}")
            agreement, info = chunk_agreement(
                model, set_path, batch_tokens=config.batch_tokens, max_docs=config.max_docs, progress=say
            )
            entry["chunk_agreement"][set_name] = {"aligned": info, **agreement.to_json()}
            table.add(row, column(ABS_DIFF, set_name), agreement.mean_abs_logprob_diff)
            table.add(row, column(KL, set_name), agreement.binarised_kl)
        if todo.tasks:
            entry["multiple_choice"] = {}
            scores = score_tasks(
                model,
                list(todo.tasks.values()),
                max_examples=max_examples,
                max_length=max_length,
                batch_tokens=config.batch_tokens,
                progress=say,
            )
            for name, mc in scores.items():
                entry["multiple_choice"][name] = {"max_length": max_length, **mc.to_json()}
                table.add(row, column(ACCURACY, name), mc.accuracy)
        result["models"][row] = entry
        del model
        gc.collect()

    for name, task in subsets.items():
        table.add(CHANCE_ROW, column(ACCURACY, name), task.chance)
    if subsets:
        table.notes.append(
            f"{ACCURACY}/TASK: zero-shot multiple-choice accuracy on at most {max_examples or 'all'} examples per "
            f"task; the {CHANCE_ROW!r} row is the expected accuracy of a uniformly random choice"
        )
    result["table"] = table.to_json()
    result["seconds"] = round(time.time() - t0, 3)
    return result
