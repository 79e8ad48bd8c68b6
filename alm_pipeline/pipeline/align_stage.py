"""The ``align`` stage: one teacher cache → one aligned set per student tokenizer.

Cache and aligned sets may live on a local disk or at a URI (``s3://``, ``gs://``). Each Ray task receives
ONE cache shard's entry (not the manifest), reads that shard once and, for every student tokenizer that
still needs it, tokenizes the cached texts, aligns chunks (:mod:`alm_pipeline.pipeline.align`), γ-merges
them and writes shard K of that student's aligned set (atomic, with a ``.done.json`` marker, so a re-run
resumes). The aligned set's
manifest records the cache fingerprint, the student tokenizer fingerprint, the settings and a coverage
report. :func:`stream_aligned` runs the same transform as a Ray Dataset without writing anything, for
training straight from a cache.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from alm_pipeline.cache import store
from alm_pipeline.cache.aligned import (
    ALIGNED_FORMAT_VERSION,
    ALIGNED_ROW_GROUP_ROWS,
    ALIGNED_SCHEMA,
    TOKENIZER_DIR,
    AlignedSet,
)
from alm_pipeline.cache.arrow import list_array, list_parts, take_rows
from alm_pipeline.cache.dataset import OutputRefusedError
from alm_pipeline.cache.teacher import CHAT_COLUMNS, TeacherCache, open_cache
from alm_pipeline.configs import check_choice, check_file, check_int, check_number, option
from alm_pipeline.locking import output_lock
from alm_pipeline.pipeline.align import CoverageStats
from alm_pipeline.pipeline.align_batch import align_batch, coverage_batch, merge_batch
from alm_pipeline.pipeline.align_chat import LOSS_ON, ChatStats, encode_rows, is_conversation, loss_mask
from alm_pipeline.pipeline.byteview import ByteView, TokenizerMismatchError, load_byte_view
from alm_pipeline.pipeline.chat import ChatError, ChatTemplate, load_chat_template, no_template_message
from alm_pipeline.pipeline.ray_utils import RayConfig, ensure_ray, worker_options
from alm_pipeline.pipeline.stage import finished_shards, run_shards
from alm_pipeline.storage import Location, StorageError, location

CACHE_COLUMNS = ["doc_id", "text", "token_ids", "offsets", "logprob", "boundary_logprob"]


def cache_columns(cache: TeacherCache) -> list[str]:
    """The cache columns alignment reads: :data:`CACHE_COLUMNS`, and the conversation columns where it has them."""
    return CACHE_COLUMNS + (list(CHAT_COLUMNS) if cache.has_chat_columns else [])


class AlignError(RuntimeError):
    """The align stage cannot proceed; the message says why."""


@dataclass(frozen=True)
class AlignSettings:
    gamma: float = option(
        0.1, "γ: merge chunks until the teacher's boundary probability > γ (0 = no merging)"
    )
    debias: bool = option(True, "Outcome debiasing (add σ to chunk log-likelihoods)")
    max_student_length: int | None = option(
        None, "Student tokens per document (default: cover the cached text)"
    )
    min_coverage: float = option(0.8, "Warn when chunks cover less of the text than this")
    loss_on: str = option(
        "auto",
        "Which chunks of a conversation count in the loss: assistant (inside assistant messages, and the "
        "template tokens that end an assistant turn), all, or auto (assistant; plain texts always count whole)",
    )

    def __post_init__(self) -> None:
        check_number("--gamma", self.gamma, 0, 1)
        check_int("--max-student-length", self.max_student_length, allow_none=True)
        check_number("--min-coverage", self.min_coverage, 0, 1)
        check_choice("--loss-on", self.loss_on, LOSS_ON)

    @property
    def chat_loss_on(self) -> str:
        """What ``loss_on`` means for conversations: ``assistant`` or ``all``."""
        return "assistant" if self.loss_on == "auto" else self.loss_on

    def identity(self) -> dict:
        identity = {"gamma": self.gamma, "debias": self.debias, "max_student_length": self.max_student_length}
        if self.loss_on != "auto":  # only when set: sets aligned before the option keep their identity
            identity["loss_on"] = self.loss_on
        return identity


@dataclass(frozen=True)
class AlignConfig:
    cache: str = option(help="Teacher cache (a folder or URI, from `alm-pipeline teacher-cache`)")
    student_tokenizers: tuple[str, ...] = option(
        help="Student tokenizer: `bytes`, a tokenizer folder, or a short name (repeat for several)",
        cli="student_tokenizer",
    )
    output: str = option("aligned", "Parent folder or URI; one aligned set per student tokenizer inside")
    settings: AlignSettings = field(default_factory=AlignSettings)
    chat_template: str | None = option(
        None,
        "Jinja chat template file for student tokenizers that have none of their own (conversations only; "
        "`bytes` has a built-in one)",
    )
    overwrite: bool = option(False, "Replace existing aligned sets made with other settings")
    verify: bool = option(
        False, "Check every cache shard's SHA-256 first (parallel Ray tasks; reads the whole cache)"
    )
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        check_file("--chat-template", self.chat_template)


@dataclass
class AlignedSetSummary:
    name: str
    path: str
    docs: int
    dropped: dict
    coverage: float
    groups: int
    shards_written: int
    shards_reused: int
    low_coverage: bool

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ per document


@dataclass
class DroppedDocs:
    """Documents left out of an aligned set: counts per reason and the first 20 examples."""

    counts: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)

    def add(self, reason: str, doc_id: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(f"{doc_id}: {reason}" + (f" ({detail})" if detail else ""))


def align_table(
    table: pa.Table,
    teacher_is_special: np.ndarray,
    student: ByteView,
    settings: AlignSettings,
    coverage: CoverageStats | None = None,
    dropped: DroppedDocs | None = None,
    student_template: ChatTemplate | None = None,
    chat_stats: ChatStats | None = None,
) -> pa.Table:
    """Align one table of cache rows to ``student``; returns rows in ``ALIGNED_SCHEMA`` (documents with no
    valid chunk, or whose text the student tokenizer cannot reproduce, are dropped and counted).

    The whole table is one batch: the cache's list columns are read as flat arrays with row pointers, the
    texts are tokenized (the only per-document Python work) and :meth:`ByteView.encode_batch` turns the token
    ids into exact byte offsets for all documents at once, and :func:`align_batch` / :func:`merge_batch` align
    and merge all documents in one pass. The result is the same as :meth:`ByteView.encode`,
    :func:`~alm_pipeline.pipeline.align.align_document`, :func:`~alm_pipeline.pipeline.align.merge_and_debias`
    and :func:`~alm_pipeline.pipeline.align.coverage_stats` document by document.

    Rows holding a conversation are rendered with ``student_template`` and aligned in content coordinates
    (:mod:`alm_pipeline.pipeline.align_chat`; counted in ``chat_stats``).
    """
    coverage = coverage if coverage is not None else CoverageStats()
    dropped = dropped if dropped is not None else DroppedDocs()
    doc_ids = table["doc_id"].to_pylist()
    texts = table["text"].to_pylist()
    t_ids, t_rows = list_parts(table["token_ids"], np.int32)
    t_off, off_rows = list_parts(table["offsets"], np.int32)
    logprob, lp_rows = list_parts(table["logprob"], np.float32)
    sigma, sg_rows = list_parts(table["boundary_logprob"], np.float32)
    for name, rows in (("offsets", off_rows), ("logprob", lp_rows), ("boundary_logprob", sg_rows)):
        if not np.array_equal(rows, t_rows):
            d = int(np.flatnonzero(np.diff(rows) != np.diff(t_rows))[0])
            raise ValueError(
                f"document {doc_ids[d]}: cache column {name!r} has {int(rows[d + 1] - rows[d])} entries but "
                f"token_ids has {int(t_rows[d + 1] - t_rows[d])}"
            )

    chat_rows = is_conversation(table)
    loss_ranges: dict[int, np.ndarray] = {}
    if chat_rows.any():
        rows = encode_rows(
            table,
            chat_rows,
            t_ids,
            t_off,
            t_rows,
            teacher_is_special,
            student,
            student_template,
            settings.max_student_length,
            settings.chat_loss_on,
            chat_stats if chat_stats is not None else ChatStats(),
        )
        t_off, t_special = rows.t_off, rows.t_special
        s_ids, s_off, s_rows, s_special = rows.s_ids, rows.s_off, rows.s_rows, rows.s_special
        failed, text_bytes, loss_ranges = rows.failed, rows.text_bytes, rows.loss_ranges
    else:
        encoded = student.encode_batch(texts, settings.max_student_length, doc_ids)
        s_ids, s_off, s_rows, failed = encoded.token_ids, encoded.offsets, encoded.rows, encoded.failed
        t_special, s_special, text_bytes = (
            teacher_is_special[t_ids],
            student.is_special[s_ids],
            encoded.text_bytes,
        )
    ok = np.ones(len(texts), dtype=bool)
    ok[list(failed)] = False
    docs = np.flatnonzero(ok)
    if len(failed):  # keep only the documents the student tokenizer could encode
        t_ids, _ = take_rows(t_ids, t_rows, ok)
        t_off, _ = take_rows(t_off, t_rows, ok)
        t_special, _ = take_rows(t_special, t_rows, ok)
        logprob, _ = take_rows(logprob, t_rows, ok)
        sigma, t_rows = take_rows(sigma, t_rows, ok)
        s_ids, _ = take_rows(s_ids, s_rows, ok)
        s_special, _ = take_rows(s_special, s_rows, ok)
        s_off, s_rows = take_rows(s_off, s_rows, ok)

    names = [doc_ids[d] for d in docs]
    alignment = align_batch(
        t_ids, t_off, t_special, t_rows, s_ids, s_off, s_special, s_rows, document_names=names
    )
    if loss_ranges:  # conversations under --loss-on assistant: chunks outside assistant turns do not count
        position = {int(d): i for i, d in enumerate(docs)}
        ranges = {position[d]: r for d, r in loss_ranges.items() if d in position}
        keep = loss_mask(
            alignment.chunk_doc, alignment.byte_start, alignment.byte_end, alignment.is_special, ranges
        )
        alignment = replace(alignment, valid=alignment.valid & keep)
    merged = merge_batch(
        alignment, logprob, sigma, gamma=settings.gamma, debias=settings.debias, document_names=names
    )
    coverage.add(coverage_batch(alignment, merged, text_bytes[docs]))
    if chat_stats is not None and chat_rows.any():
        in_chat = chat_rows[docs][alignment.chunk_doc]
        chat_stats.paired_template_runs += int((alignment.is_special & in_chat).sum())
        counted = alignment.valid & in_chat
        chat_stats.covered_bytes += int((alignment.byte_end - alignment.byte_start)[counted].sum())

    groups = merged.groups_per_document()
    kept = groups > 0
    events = [(int(d), "student tokenizer cannot reproduce the text", detail) for d, detail in failed.items()]
    events += [(int(d), "no valid chunk", "") for d in docs[~kept]]
    for d, reason, detail in sorted(events, key=lambda e: e[0]):
        dropped.add(reason, doc_ids[d], detail)

    kept_docs = docs[kept]
    input_ids, input_rows = take_rows(s_ids, s_rows, kept) if not kept.all() else (s_ids, s_rows)
    group_rows = np.zeros(len(kept_docs) + 1, dtype=np.int64)
    np.cumsum(groups[kept], out=group_rows[1:])
    group_bytes = np.concatenate([[0], np.cumsum(merged.byte_end - merged.byte_start)])
    columns = {
        "doc_id": pa.array([doc_ids[d] for d in kept_docs], type=pa.string()),
        "input_ids": list_array(input_ids, input_rows, pa.int32()),
        "chunk_start": list_array(merged.chunk_start, group_rows, pa.int32()),
        "chunk_end": list_array(merged.chunk_end, group_rows, pa.int32()),
        "teacher_chunk_logprob": list_array(merged.teacher_chunk_logprob, group_rows, pa.float32()),
        "teacher_chunk_boundary_logprob": list_array(
            merged.teacher_chunk_boundary_logprob, group_rows, pa.float32()
        ),
        "text_bytes": pa.array(text_bytes[kept_docs], type=pa.int32()),
        "covered_bytes": pa.array(
            group_bytes[group_rows[1:]] - group_bytes[group_rows[:-1]], type=pa.int32()
        ),
        "num_tokens": pa.array(np.diff(input_rows), type=pa.int32()),
        "num_chunks": pa.array(np.diff(group_rows), type=pa.int32()),
    }
    return pa.Table.from_arrays([columns[name] for name in ALIGNED_SCHEMA.names], schema=ALIGNED_SCHEMA)


# ------------------------------------------------------------------------------------------ driver


@dataclass
class _SetOutput:
    """One aligned set being written: its student tokenizer, folder, identity and shards still to write."""

    student: str
    name: str
    view: ByteView
    root: Location
    identity: dict
    pending: list[int]
    template: ChatTemplate | None = None


def set_name(student: str) -> str:
    """Folder name of a student tokenizer's aligned set: 'bytes', a short name, or a path's last part."""
    name = Path(student.rstrip("/")).name if ("/" in student or Path(student).exists()) else student
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "student"


def build_aligned_sets(
    config: AlignConfig, progress: Callable[[str], None] | None = None
) -> list[AlignedSetSummary]:
    """Align ``config.cache`` to every student tokenizer in one pass over the cache."""
    say = progress or (lambda msg: None)
    if not config.student_tokenizers:
        raise AlignError("no student tokenizer given")
    try:
        cache = open_cache(config.cache, verify=True)
        out_root = location(config.output)
    except (store.CacheIntegrityError, StorageError, ValueError) as err:
        raise AlignError(str(err)) from None
    views = _load_students(config.student_tokenizers)
    templates = _student_templates(config.student_tokenizers, config.chat_template, cache.chat_docs > 0)
    names = [set_name(s) for s in config.student_tokenizers]
    if len(set(names)) != len(names):
        names = [f"{n}-{v.fingerprint[:8]}" for n, v in zip(names, views, strict=True)]
    if config.verify:
        say(f"verifying the checksums of {cache.num_shards} cache shards")
        try:
            cache.verify_checksums(config.ray)
        except store.CacheIntegrityError as err:
            raise AlignError(str(err)) from None
    with contextlib.ExitStack() as locks:  # one writer per aligned set, for the whole run
        for name in names:
            locks.enter_context(output_lock(out_root / name, "align"))
        return _build_sets(config, cache, views, templates, names, out_root, say)


def _build_sets(
    config: AlignConfig,
    cache: TeacherCache,
    views: list[ByteView],
    templates: list[ChatTemplate | None],
    names: list[str],
    out_root: Location,
    say: Callable[[str], None],
) -> list[AlignedSetSummary]:
    num_shards = cache.num_shards
    sets: list[_SetOutput] = []
    for student, name, view, template in zip(config.student_tokenizers, names, views, templates, strict=True):
        root = out_root / name
        identity = {
            "format_version": ALIGNED_FORMAT_VERSION,
            "cache_fingerprint": cache.fingerprint,
            "student_tokenizer_fingerprint": view.fingerprint,
            "settings": config.settings.identity(),
        }
        if cache.chat_docs and template is not None:  # how the student renders the conversations
            identity["chat_template"] = template.describe()["sha256"]
        try:
            AlignedSet.prepare_output(root, identity, config.overwrite)
        except (OutputRefusedError, StorageError) as err:
            raise AlignError(str(err)) from None
        _save_student_tokenizer(student, root / TOKENIZER_DIR)
        AlignedSet.write_manifest(root, _manifest(cache, config, student, view, identity, [], "in_progress"))
        pending = AlignedSet.pending_shards(root, num_shards)
        sets.append(_SetOutput(student, name, view, root, identity, pending, template))

    work = sorted({k for s in sets for k in s.pending})
    if work:
        say(f"aligning {len(work)} cache shards to {len(sets)} student tokenizer(s): {', '.join(names)}")
        _run_ray(config, cache, sets, work)

    summaries = []
    for s in sets:
        infos = finished_shards(AlignedSet, s.root, num_shards, AlignError)
        manifest = _manifest(cache, config, s.student, s.view, s.identity, infos, "complete")
        AlignedSet.write_manifest(s.root, manifest)
        cov = manifest["coverage"]
        low = cov["coverage"] < config.settings.min_coverage
        summaries.append(
            AlignedSetSummary(
                name=s.name,
                path=s.root.uri,
                docs=cov["documents_kept"],
                dropped=cov["dropped"],
                coverage=cov["coverage"],
                groups=cov["groups"],
                shards_written=len(s.pending),
                shards_reused=num_shards - len(s.pending),
                low_coverage=low,
            )
        )
    return summaries


def _load_students(students: tuple[str, ...]) -> list[ByteView]:
    from alm_pipeline.assets import resolve_model

    views = []
    for student in students:
        try:
            views.append(load_byte_view(student if student == "bytes" else resolve_model(student)))
        except TokenizerMismatchError as err:
            raise AlignError(f"student tokenizer {student!r}: {err}") from None
        except (OSError, ValueError) as err:
            raise AlignError(f"student tokenizer {student!r}: cannot load it ({err})") from None
    return views


def _student_templates(
    students: tuple[str, ...], override: str | None, required: bool
) -> list[ChatTemplate | None]:
    """Each student's chat template: its own, else the ``--chat-template`` file; refused up front when the cache
    holds conversations and a student has neither."""
    from alm_pipeline.assets import resolve_model

    templates = []
    for student in students:
        path = student if student == "bytes" else resolve_model(student)
        try:
            template = load_chat_template(path) or (load_chat_template(path, override) if override else None)
        except ChatError as err:
            raise AlignError(str(err)) from None
        if template is None and required:
            raise AlignError(no_template_message(student, "student"))
        templates.append(template)
    return templates


def _save_student_tokenizer(student: str, folder: Location) -> None:
    """Save the student tokenizer in Hugging Face format to ``folder`` (any backend): written to a local
    temporary folder, then each file stored; ``tokenizer_config.json`` goes last, so its presence means the
    folder is complete."""
    from transformers import AutoTokenizer

    from alm_pipeline.assets import resolve_model
    from alm_pipeline.pipeline.byte_tokenizer import build_byte_tokenizer

    if (folder / "tokenizer_config.json").exists():
        return
    tok = (
        build_byte_tokenizer()
        if student == "bytes"
        else AutoTokenizer.from_pretrained(resolve_model(student))
    )
    with tempfile.TemporaryDirectory(prefix="alm-tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == "tokenizer_config.json")
        for path in files:
            (folder / path.relative_to(tmp).as_posix()).write_bytes(path.read_bytes())


def _manifest(cache, config, student, view, identity, infos, state) -> dict:
    coverage = CoverageStats()
    dropped: dict[str, int] = {}
    examples: list[str] = []
    chat = ChatStats()
    for info in infos:
        coverage.add(CoverageStats(**info.stats["coverage"]))
        chat.add(info.stats.get("chat", {}))
        for reason, n in info.stats["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
        examples += info.stats["dropped_examples"][: max(0, 20 - len(examples))]
    report = {
        **coverage.as_dict(),
        "documents_kept": sum(i.rows for i in infos),
        "dropped": dropped,
        "dropped_examples": examples,
    }
    if chat.conversations:
        report["chat"] = {
            **chat.as_dict(),
            "loss_on": config.settings.chat_loss_on,
            "coverage": (chat.covered_bytes / chat.loss_bytes) if chat.loss_bytes else None,
        }
    return AlignedSet.new_manifest(
        state,
        identity,
        cache.num_shards,
        infos,
        cache={
            "path": cache.root.uri,
            "fingerprint": cache.fingerprint,
            "teacher": cache.manifest["teacher"]["name"],
            "teacher_tokenizer_fingerprint": cache.tokenizer_fingerprint,
            "max_teacher_length": cache.manifest["settings"]["max_length"],
        },
        student_tokenizer={
            "name": student,
            "folder": TOKENIZER_DIR,
            **{k: v for k, v in view.describe().items() if k != "special_ids"},
        },
        settings={
            **config.settings.identity(),
            "min_coverage": config.settings.min_coverage,
            "loss_on": config.settings.loss_on,
        },
        coverage=report,
    )


# ------------------------------------------------------------------------------------------ Ray


class _AlignCacheShard:
    """Ray task: read cache shard K once (from its entry in the row: the manifest is not read), write shard K
    of every aligned set the row names."""

    def __init__(
        self,
        cache_root: str,
        teacher_special: np.ndarray,
        sets: list[_SetOutput],
        settings: AlignSettings,
        columns: list[str] = CACHE_COLUMNS,
    ):
        self.cache_root, self.teacher_special, self.settings = cache_root, teacher_special, settings
        self.columns = columns
        # what a task needs of each set: its student, its folder and its chat template (not the driver's list of
        # pending shards)
        self.sets = [(s.view, s.root.uri, s.template) for s in sets]

    def __call__(self, row: dict) -> dict:
        k = int(row["shard"])
        table = TeacherCache.read_shard_entry(self.cache_root, _entry(row), columns=self.columns)
        written = 0
        for i in row["sets"]:
            view, root, template = self.sets[int(i)]
            coverage, dropped, chat = CoverageStats(), DroppedDocs(), ChatStats()
            aligned = align_table(
                table, self.teacher_special, view, self.settings, coverage, dropped, template, chat
            )
            stats = {
                "coverage": asdict(coverage),
                "dropped": dropped.counts,
                "dropped_examples": dropped.examples,
                "chat": chat.as_dict(),
            }
            AlignedSet.write_shard(root, k, aligned, stats=stats, row_group_size=ALIGNED_ROW_GROUP_ROWS)
            written += 1
        return {"shard": k, "written": written, "docs": table.num_rows}


def shard_rows(cache: TeacherCache, shards: list[int], sets: list[list[int]] | None = None) -> list[dict]:
    """One Ray Data row per cache shard: its index, its entry (file, bytes, rows, tokens, SHA-256) and the
    aligned sets it goes to. A task needs nothing else of the cache's manifest."""
    files, nrows, tokens, nbytes, digests = (cache.shard_index[name].to_pylist() for name in _ENTRY_FIELDS)
    rows = [
        {
            "shard": k,
            "file": files[k],
            "rows": nrows[k],
            "tokens": tokens[k],
            "bytes": nbytes[k],
            "sha256": digests[k],
        }
        for k in shards
    ]
    if sets is not None:
        for row, targets in zip(rows, sets, strict=True):
            row["sets"] = targets
    return rows


_ENTRY_FIELDS = ("file", "rows", "tokens", "bytes", "sha256")


def _entry(row: dict) -> store.ShardInfo:
    """The shard entry a task's row carries."""
    return store.ShardInfo.from_json({"index": row["shard"], **{name: row[name] for name in _ENTRY_FIELDS}})


def _run_ray(config: AlignConfig, cache: TeacherCache, sets: list[_SetOutput], work: list[int]) -> None:
    fn = _AlignCacheShard(
        cache.root.uri, cache.special_token_mask(), sets, config.settings, cache_columns(cache)
    )
    pending = [set(s.pending) for s in sets]
    targets = [[i for i, p in enumerate(pending) if k in p] for k in work]
    options = worker_options()
    run_shards(
        shard_rows(cache, work, targets),
        lambda ds: ds.map(fn, num_cpus=1, **options),
        desc="align",
        rate_column="docs",
        rate_unit="docs",
        ray_config=config.ray,
        error=AlignError,
    )


def stream_aligned(
    cache_path: str, student_tokenizer: str, settings: AlignSettings | None = None, ray_config=None
):
    """Align a cache to one student tokenizer on the fly: a Ray Dataset of ``ALIGNED_SCHEMA`` rows (nothing
    is written). Returns ``(dataset, student_view, cache)``."""
    import ray.data

    settings = settings or AlignSettings()
    ensure_ray(ray_config or RayConfig())
    cache = open_cache(cache_path, verify=True)
    (view,) = _load_students((student_tokenizer,))
    (template,) = _student_templates((student_tokenizer,), None, cache.chat_docs > 0)
    special = cache.special_token_mask()
    root = cache.root.uri
    columns = cache_columns(cache)

    def transform(batch: pa.Table) -> pa.Table:
        tables = [
            align_table(
                TeacherCache.read_shard_entry(root, _entry(row), columns=columns),
                special,
                view,
                settings,
                student_template=template,
            )
            for row in batch.to_pylist()
        ]
        return pa.concat_tables(tables) if tables else ALIGNED_SCHEMA.empty_table()

    rows = shard_rows(cache, list(range(cache.num_shards)))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    ds = ds.map_batches(transform, batch_size=1, batch_format="pyarrow", num_cpus=0.5, **worker_options())
    return ds, view, cache


def coverage_report_lines(summary: AlignedSetSummary, manifest: dict) -> list[str]:
    cov = manifest["coverage"]
    lines = [
        f"{summary.name}: {summary.docs} documents, {cov['groups']} chunks after merging "
        f"({cov['valid_chunks']} minimal), coverage {cov['coverage']:.2%} of text bytes",
        f"  per chunk: {cov['mean_chunk_bytes']:.2f} bytes, {cov['mean_chunk_teacher_tokens']:.2f} teacher tokens, "
        f"{cov['mean_chunk_student_tokens']:.2f} student tokens; {cov['mean_group_bytes']:.2f} bytes per merged chunk",
    ]
    chat = cov.get("chat")
    if chat:
        share = f"{chat['coverage']:.2%}" if chat["coverage"] is not None else "n/a"
        paired = chat["paired_template_runs"]
        lines.append(
            f"  conversations: {chat['conversations']}, coverage {share} of the {chat['loss_bytes']} content bytes "
            f"the loss sees (--loss-on {chat['loss_on']}; {chat['content_bytes']} content bytes in all); template "
            f"runs paired {paired}, left out {chat['teacher_template_runs'] - paired} of the teacher's and "
            f"{chat['student_template_runs'] - paired} of the student's"
        )
    if cov["dropped"]:
        lines.append(f"  dropped documents: {json.dumps(cov['dropped'])}")
    if summary.low_coverage:
        lines.append(
            f"  WARNING: coverage {cov['coverage']:.2%} is below {manifest['settings']['min_coverage']:.0%}: "
            "the student tokenizer and the cached texts disagree on many bytes (see dropped_examples in "
            f"{summary.path}/manifest.json)"
        )
    return lines
