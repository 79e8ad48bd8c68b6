"""The ``align`` stage: one teacher cache → one aligned set per student tokenizer.

Each Ray task reads ONE cache shard once and, for every requested student tokenizer, tokenizes the cached
texts, aligns chunks (:mod:`alm_pipeline.pipeline.align`), γ-merges them and writes shard K of that
student's aligned set (atomic, with a ``.done.json`` marker, so a re-run resumes). The aligned set's
manifest records the cache fingerprint, the student tokenizer fingerprint, the settings and a coverage
report. :func:`stream_aligned` runs the same transform as a Ray Dataset without writing anything, for
training straight from a cache.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa

from alm_pipeline.cache import store
from alm_pipeline.cache.aligned import (
    ALIGNED_FORMAT_VERSION,
    ALIGNED_KIND,
    ALIGNED_SCHEMA,
    TOKENIZER_DIR,
)
from alm_pipeline.cache.reader import TeacherCache, open_cache
from alm_pipeline.pipeline.align import CoverageStats, align_batch, coverage_batch, merge_batch
from alm_pipeline.pipeline.byteview import ByteView, EncodedText, TokenizerMismatchError, load_byte_view
from alm_pipeline.pipeline.ray_utils import RayConfig, ensure_ray

CACHE_COLUMNS = ["doc_id", "text", "token_ids", "offsets", "logprob", "boundary_logprob"]


class AlignError(RuntimeError):
    """The align stage cannot proceed; the message says why."""


@dataclass(frozen=True)
class AlignSettings:
    gamma: float = field(
        default=0.1,
        metadata={"help": "γ: merge chunks until the teacher's boundary probability > γ (0 = no merging)"},
    )
    debias: bool = field(
        default=True, metadata={"help": "Outcome debiasing (add σ to chunk log-likelihoods)"}
    )
    max_student_length: int | None = field(
        default=None, metadata={"help": "Student tokens per document (default: cover the cached text)"}
    )
    min_coverage: float = field(
        default=0.8, metadata={"help": "Warn when chunks cover less of the text than this"}
    )

    def identity(self) -> dict:
        return {"gamma": self.gamma, "debias": self.debias, "max_student_length": self.max_student_length}


@dataclass(frozen=True)
class AlignConfig:
    cache: str = field(metadata={"help": "Teacher cache directory (from `alm-pipeline teacher-cache`)"})
    student_tokenizers: tuple[str, ...] = field(
        metadata={
            "help": "Student tokenizer: `bytes`, a tokenizer folder, or a short name (repeat for several)",
            "cli": "student_tokenizer",
        }
    )
    output: str = field(
        default="aligned", metadata={"help": "Parent folder; one aligned set per student tokenizer inside"}
    )
    settings: AlignSettings = field(default_factory=AlignSettings)
    overwrite: bool = field(
        default=False, metadata={"help": "Replace existing aligned sets made with other settings"}
    )
    ray: RayConfig = field(default_factory=RayConfig)


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
class _Dropped:
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
    dropped: _Dropped | None = None,
) -> pa.Table:
    """Align one table of cache rows to ``student``; returns rows in ``ALIGNED_SCHEMA`` (documents with no
    valid chunk, or whose text the student tokenizer cannot reproduce, are dropped and counted).

    The whole table is one batch: the cache's list columns are read as flat arrays with row pointers, the
    texts are tokenized (the only per-document Python work) and :func:`_encode_texts` turns the token ids
    into exact byte offsets for all documents at once, and :func:`align_batch` / :func:`merge_batch` align
    and merge all documents in one pass. The result is the same as :meth:`ByteView.encode`,
    :func:`align_document`, :func:`merge_and_debias` and :func:`coverage_stats` document by document.
    """
    coverage = coverage if coverage is not None else CoverageStats()
    dropped = dropped if dropped is not None else _Dropped()
    doc_ids = table["doc_id"].to_pylist()
    texts = table["text"].to_pylist()
    data = [text.encode("utf-8") for text in texts]
    t_ids, t_rows = _flat_list_column(table["token_ids"], np.int32)
    t_off, off_rows = _flat_list_column(table["offsets"], np.int32)
    logprob, lp_rows = _flat_list_column(table["logprob"], np.float32)
    sigma, sg_rows = _flat_list_column(table["boundary_logprob"], np.float32)
    for name, rows in (("offsets", off_rows), ("logprob", lp_rows), ("boundary_logprob", sg_rows)):
        if not np.array_equal(rows, t_rows):
            d = int(np.flatnonzero(np.diff(rows) != np.diff(t_rows))[0])
            raise ValueError(
                f"document {doc_ids[d]}: cache column {name!r} has {int(rows[d + 1] - rows[d])} entries but "
                f"token_ids has {int(t_rows[d + 1] - t_rows[d])}"
            )

    s_ids, s_off, s_rows, failed = _encode_texts(student, texts, data, settings.max_student_length, doc_ids)
    ok = np.ones(len(texts), dtype=bool)
    ok[list(failed)] = False
    docs = np.flatnonzero(ok)
    if len(failed):  # keep only the documents the student tokenizer could encode
        t_ids, _ = _take_rows(t_ids, t_rows, ok)
        t_off, _ = _take_rows(t_off, t_rows, ok)
        logprob, _ = _take_rows(logprob, t_rows, ok)
        sigma, t_rows = _take_rows(sigma, t_rows, ok)
        s_ids, _ = _take_rows(s_ids, s_rows, ok)
        s_off, s_rows = _take_rows(s_off, s_rows, ok)

    names = [doc_ids[d] for d in docs]
    alignment = align_batch(
        t_ids,
        t_off,
        teacher_is_special[t_ids],
        t_rows,
        s_ids,
        s_off,
        student.is_special[s_ids],
        s_rows,
        document_names=names,
    )
    merged = merge_batch(
        alignment, logprob, sigma, gamma=settings.gamma, debias=settings.debias, document_names=names
    )
    text_bytes = np.array([len(b) for b in data], dtype=np.int64)
    coverage.add(coverage_batch(alignment, merged, text_bytes[docs]))

    groups = merged.groups_per_document()
    kept = groups > 0
    events = [(int(d), "student tokenizer cannot reproduce the text", detail) for d, detail in failed.items()]
    events += [(int(d), "no valid chunk", "") for d in docs[~kept]]
    for d, reason, detail in sorted(events, key=lambda e: e[0]):
        dropped.add(reason, doc_ids[d], detail)

    kept_docs = docs[kept]
    input_ids, input_rows = _take_rows(s_ids, s_rows, kept) if not kept.all() else (s_ids, s_rows)
    group_rows = np.zeros(len(kept_docs) + 1, dtype=np.int64)
    np.cumsum(groups[kept], out=group_rows[1:])
    group_bytes = np.concatenate([[0], np.cumsum(merged.byte_end - merged.byte_start)])
    columns = {
        "doc_id": pa.array([doc_ids[d] for d in kept_docs], type=pa.string()),
        "input_ids": _list_array(input_ids, input_rows, pa.int32()),
        "chunk_start": _list_array(merged.chunk_start, group_rows, pa.int32()),
        "chunk_end": _list_array(merged.chunk_end, group_rows, pa.int32()),
        "teacher_chunk_logprob": _list_array(merged.teacher_chunk_logprob, group_rows, pa.float32()),
        "teacher_chunk_boundary_logprob": _list_array(
            merged.teacher_chunk_boundary_logprob, group_rows, pa.float32()
        ),
        "text_bytes": pa.array(text_bytes[kept_docs], type=pa.int32()),
        "covered_bytes": pa.array(
            group_bytes[group_rows[1:]] - group_bytes[group_rows[:-1]], type=pa.int32()
        ),
    }
    return pa.Table.from_arrays([columns[name] for name in ALIGNED_SCHEMA.names], schema=ALIGNED_SCHEMA)


def _flat_list_column(column: pa.ChunkedArray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (all values concatenated, as ``dtype``; row pointers int64, one per row + 1)."""
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if arr.null_count:
        raise ValueError(f"cache column of type {arr.type} has {arr.null_count} null rows")
    offsets = arr.offsets.to_numpy().astype(np.int64)  # respects a sliced table; relative to arr.values
    lo, hi = (int(offsets[0]), int(offsets[-1])) if len(offsets) else (0, 0)
    values = arr.values.slice(lo, hi - lo).to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=dtype), offsets - lo


def _take_rows(values: np.ndarray, rows: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows ``keep`` (bool per row) of a flat ragged array: (values, row pointers)."""
    lengths = np.diff(rows)
    new_rows = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(lengths[keep], out=new_rows[1:])
    return values[np.repeat(keep, lengths)], new_rows


def _list_array(values: np.ndarray, rows: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(
        pa.array(rows.astype(np.int32)), pa.array(np.asarray(values, dtype=value_type.to_pandas_dtype()))
    )


def _encode_texts(
    student: ByteView, texts: list[str], data: list[bytes], max_length: int | None, doc_ids: list
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
    """:meth:`ByteView.encode` of many texts at once: (token ids int32, byte end offsets int32, row pointers
    int64 (one per text + 1), {text index: error message} for the texts the tokenizer cannot reproduce; their
    rows hold no meaningful tokens).

    The tokenizer runs once per text (``encode_batch_fast`` of one text: the ids without the character
    offsets ``encode`` computes, which are not needed here; one core); everything else - the byte check
    (the tokens' bytes must concatenate to the text, or to a dummy-prefix space plus the text), the offsets,
    the prefix / suffix special tokens and truncation to ``max_length`` - is done on flat arrays for all
    texts. A text whose check fails is passed to :meth:`ByteView.encode` itself, which raises the error
    reported for it (or, should the two ever disagree, gives the encoding used).
    """
    num_docs = len(texts)
    prefix = np.asarray(student.prefix_ids, dtype=np.int32)
    suffix = np.asarray(student.suffix_ids, dtype=np.int32)
    n_pre, n_suf = len(prefix), len(suffix)
    sources, source_data = texts, data
    if max_length is not None:  # the pre-cut of ByteView.encode, for the same texts
        limit_bytes = (max_length + 8) * max(student.max_token_bytes, 4) * 2
        long = [i for i, b in enumerate(data) if len(b) > limit_bytes]
        if long:
            sources, source_data = list(texts), list(data)
            for i in long:
                sources[i] = data[i][:limit_bytes].decode("utf-8", errors="ignore")
                source_data[i] = sources[i].encode("utf-8")

    tok = student.tokenizer
    fast = getattr(tok, "encode_batch_fast", None)
    if fast is not None:
        id_lists = [fast([source], add_special_tokens=False)[0].ids for source in sources]
    else:  # pragma: no cover - tokenizers without encode_batch_fast
        id_lists = [tok.encode(source, add_special_tokens=False).ids for source in sources]
    n_body = np.fromiter(map(len, id_lists), dtype=np.int64, count=num_docs)
    body_rows = np.zeros(num_docs + 1, dtype=np.int64)
    np.cumsum(n_body, out=body_rows[1:])
    ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64, count=int(body_rows[-1]))
    lengths = student.token_lengths[ids]

    # The byte check, all texts at once.
    if len(ids) and int(lengths.max()) <= 1:  # one byte per token at most (a byte-level student)
        joined = student._flat_bytes[student._flat_starts[ids[lengths > 0]]]
    else:
        joined = student._joined_bytes(ids, lengths)
    text_arr = np.frombuffer(b"".join(source_data), dtype=np.uint8)
    text_len = np.fromiter(map(len, source_data), dtype=np.int64, count=num_docs)
    text_rows = np.zeros(num_docs + 1, dtype=np.int64)
    np.cumsum(text_len, out=text_rows[1:])
    cum = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cum[1:])
    joined_len = cum[body_rows[1:]] - cum[body_rows[:-1]]
    if np.array_equal(joined_len, text_len):
        dummy = np.zeros(num_docs, dtype=bool)
        differ = np.flatnonzero(joined != text_arr)
        bad = np.zeros(num_docs, dtype=bool)
        bad[np.searchsorted(text_rows, differ, side="right") - 1] = True
    else:
        # a text matches exactly, or (dummy prefix) its tokens' bytes are a space followed by the text
        dummy = joined_len == text_len + 1
        dummy[dummy] = joined[cum[body_rows[:-1][dummy]]] == 0x20
        same = joined_len == text_len
        joined_mask = np.repeat(same | dummy, joined_len)
        joined_mask[cum[body_rows[:-1][dummy]]] = False  # the dummy space is not compared
        text_mask = np.repeat(same | dummy, text_len)
        compared_rows = np.zeros(num_docs + 1, dtype=np.int64)
        np.cumsum(np.where(same | dummy, text_len, 0), out=compared_rows[1:])
        differ = np.flatnonzero(joined[joined_mask] != text_arr[text_mask])
        bad = ~(same | dummy)
        bad[np.searchsorted(compared_rows, differ, side="right") - 1] = True
        dummy &= ~bad
        if dummy.any():
            lengths = lengths.copy()
            lengths[body_rows[:-1][dummy]] -= 1  # the dummy-prefix space is carried by the first token
            np.cumsum(lengths, out=cum[1:])
    body_ends = cum[1:] - np.repeat(cum[body_rows[:-1]], n_body)  # document-local byte end offsets
    text_end = cum[body_rows[1:]] - cum[body_rows[:-1]]

    # prefix + body + suffix per text
    n_tokens = n_pre + n_body + n_suf
    rows = np.zeros(num_docs + 1, dtype=np.int64)
    np.cumsum(n_tokens, out=rows[1:])
    if n_pre or n_suf:
        out_ids = np.empty(int(rows[-1]), dtype=np.int32)
        offsets = np.empty(int(rows[-1]), dtype=np.int64)
        body = np.ones(int(rows[-1]), dtype=bool)
        pre_pos = (rows[:-1, None] + np.arange(n_pre)).ravel()
        suf_pos = (rows[1:, None] - n_suf + np.arange(n_suf)).ravel()
        body[pre_pos] = False
        body[suf_pos] = False
        out_ids[body] = ids
        offsets[body] = body_ends
        out_ids[pre_pos] = np.tile(prefix, num_docs)
        offsets[pre_pos] = 0
        out_ids[suf_pos] = np.tile(suffix, num_docs)
        offsets[suf_pos] = np.repeat(text_end, n_suf)
    else:
        out_ids, offsets = ids.astype(np.int32), body_ends
    offsets = offsets.astype(np.int32)

    if max_length is not None:
        # keep the first max_length tokens, backing off until the kept tokens end on a character boundary
        over = np.flatnonzero((n_tokens > max_length) & ~bad)
        if len(over):
            keep = np.full(len(over), max_length, dtype=np.int64)
            active = np.arange(len(over))
            while len(active):
                active = active[keep[active] > 0]
                o = offsets[rows[over[active]] + keep[active] - 1].astype(np.int64)
                inside = (o > 0) & (o < text_len[over[active]])
                at = text_rows[over[active][inside]] + o[inside]
                split = np.zeros(len(active), dtype=bool)
                split[inside] = (text_arr[at] & 0xC0) == 0x80
                active = active[split]
                keep[active] -= 1
            new_tokens = n_tokens.copy()
            new_tokens[over] = keep
            position = np.arange(int(rows[-1])) - np.repeat(rows[:-1], n_tokens)
            mask = position < np.repeat(new_tokens, n_tokens)
            out_ids, offsets = out_ids[mask], offsets[mask]
            n_tokens = new_tokens
            rows = np.zeros(num_docs + 1, dtype=np.int64)
            np.cumsum(n_tokens, out=rows[1:])

    failed: dict[int, str] = {}
    replaced: dict[int, EncodedText] = {}
    for i in np.flatnonzero(bad).tolist():
        try:
            replaced[i] = student.encode(texts[i], max_length=max_length, doc_ref=doc_ids[i])
        except TokenizerMismatchError as err:
            failed[i] = str(err)[:200]
    if replaced:  # pragma: no cover - the batched check and ByteView.encode agree
        split_ids = np.split(out_ids, rows[1:-1])
        split_off = np.split(offsets, rows[1:-1])
        for i, enc in replaced.items():
            split_ids[i], split_off[i] = enc.token_ids, enc.offsets
        out_ids, offsets = np.concatenate(split_ids), np.concatenate(split_off)
        np.cumsum([len(a) for a in split_ids], out=rows[1:])
    return out_ids, offsets, rows, failed


def teacher_special_mask(cache: TeacherCache) -> np.ndarray:
    tok = cache.manifest["tokenizer"]
    mask = np.zeros(int(tok["vocab_size"]), dtype=bool)
    mask[np.asarray(tok["special_ids"], dtype=np.int64)] = True
    return mask


# ------------------------------------------------------------------------------------------ driver


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
    if not 0.0 <= config.settings.gamma <= 1.0:
        raise AlignError(f"gamma must be in [0, 1], got {config.settings.gamma}")
    try:
        cache = open_cache(config.cache, verify=True)
    except (store.CacheIntegrityError, ValueError) as err:
        raise AlignError(str(err)) from None
    views = _load_students(config.student_tokenizers)
    names = [set_name(s) for s in config.student_tokenizers]
    if len(set(names)) != len(names):
        names = [f"{n}-{v.fingerprint[:8]}" for n, v in zip(names, views, strict=True)]
    out_root = Path(config.output).absolute()
    num_shards = len(cache.shards)
    sets = []
    for student, name, view in zip(config.student_tokenizers, names, views, strict=True):
        root = out_root / name
        identity = {
            "format_version": ALIGNED_FORMAT_VERSION,
            "cache_fingerprint": cache.fingerprint,
            "student_tokenizer_fingerprint": view.fingerprint,
            "settings": config.settings.identity(),
        }
        _check_existing(root, identity, config.overwrite)
        _save_student_tokenizer(student, root / TOKENIZER_DIR)
        manifest = _manifest(cache, config, student, view, identity, [], state="in_progress")
        store.atomic_write_json(root / store.MANIFEST, manifest)
        pending = [k for k in range(num_shards) if store.verified_shard(root, k) is None]
        sets.append(
            {
                "student": student,
                "name": name,
                "view": view,
                "root": root,
                "identity": identity,
                "pending": pending,
            }
        )

    work = sorted({k for s in sets for k in s["pending"]})
    if work:
        say(f"aligning {len(work)} cache shards to {len(sets)} student tokenizer(s): {', '.join(names)}")
        _run_ray(config, cache, sets, work)

    summaries = []
    for s in sets:
        infos = []
        for k in range(num_shards):
            info = store.verified_shard(s["root"], k)
            if info is None:
                raise AlignError(
                    f"{store.shard_path(s['root'], k)}: shard missing or unverified after the run"
                )
            infos.append(info)
        manifest = _manifest(cache, config, s["student"], s["view"], s["identity"], infos, state="complete")
        store.atomic_write_json(s["root"] / store.MANIFEST, manifest)
        cov = manifest["coverage"]
        low = cov["coverage"] < config.settings.min_coverage
        summaries.append(
            AlignedSetSummary(
                name=s["name"],
                path=str(s["root"]),
                docs=cov["documents_kept"],
                dropped=cov["dropped"],
                coverage=cov["coverage"],
                groups=cov["groups"],
                shards_written=len(s["pending"]),
                shards_reused=num_shards - len(s["pending"]),
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


def _save_student_tokenizer(student: str, folder: Path) -> None:
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
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _check_existing(root: Path, identity: dict, overwrite: bool) -> None:
    manifest_file = root / store.MANIFEST
    if not manifest_file.exists():
        return
    existing = store.read_json(manifest_file)
    if existing.get("kind") != ALIGNED_KIND:
        raise AlignError(f"{root}: exists and is not an aligned set (kind={existing.get('kind')!r})")
    old = existing.get("identity", {})
    diffs = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
    if not diffs:
        return
    if not overwrite:
        lines = "\n".join(f"  {k}: set has {old.get(k)!r}, this run has {identity.get(k)!r}" for k in diffs)
        raise AlignError(
            f"{root}: an aligned set made from another cache, tokenizer or settings is already there:\n{lines}\n"
            "Use another --output, or --overwrite to replace it."
        )
    shutil.rmtree(root)


def _manifest(cache, config, student, view, identity, infos, state) -> dict:
    from alm_pipeline import __version__

    coverage = CoverageStats()
    dropped: dict[str, int] = {}
    examples: list[str] = []
    for info in infos:
        coverage.add(CoverageStats(**info.stats["coverage"]))
        for reason, n in info.stats["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
        examples += info.stats["dropped_examples"][: max(0, 20 - len(examples))]
    report = {
        **coverage.as_dict(),
        "documents_kept": sum(i.rows for i in infos),
        "dropped": dropped,
        "dropped_examples": examples,
    }
    return {
        "kind": ALIGNED_KIND,
        "format_version": ALIGNED_FORMAT_VERSION,
        "state": state,
        "identity": identity,
        "cache": {
            "path": str(cache.root),
            "fingerprint": cache.fingerprint,
            "teacher": cache.manifest["teacher"]["name"],
            "teacher_tokenizer_fingerprint": cache.tokenizer_fingerprint,
            "max_teacher_length": cache.manifest["settings"]["max_length"],
        },
        "student_tokenizer": {
            "name": student,
            "folder": TOKENIZER_DIR,
            **{k: v for k, v in view.describe().items() if k != "special_ids"},
        },
        "settings": {**config.settings.identity(), "min_coverage": config.settings.min_coverage},
        "coverage": report,
        "num_shards": len(cache.shards),
        "shards": [i.to_json() for i in infos],
        "created_with": f"alm-pipeline {__version__}",
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------ Ray


class _AlignCacheShard:
    """Ray task: read cache shard K once, write shard K of every aligned set that still needs it."""

    def __init__(
        self, cache_root: str, teacher_special: np.ndarray, sets: list[dict], settings: AlignSettings
    ):
        self.cache_root, self.teacher_special, self.settings = cache_root, teacher_special, settings
        self.sets = [{"root": str(s["root"]), "view": s["view"], "pending": set(s["pending"])} for s in sets]

    def __call__(self, row: dict) -> dict:
        k = int(row["shard"])
        cache = open_cache(self.cache_root, verify=False)
        table = cache.read_shard(k, columns=CACHE_COLUMNS)
        written = 0
        for s in self.sets:
            if k not in s["pending"]:
                continue
            coverage, dropped = CoverageStats(), _Dropped()
            aligned = align_table(table, self.teacher_special, s["view"], self.settings, coverage, dropped)
            tokens = int(pa.compute.sum(pa.compute.list_value_length(aligned["input_ids"])).as_py() or 0)
            stats = {
                "coverage": asdict(coverage),
                "dropped": dropped.counts,
                "dropped_examples": dropped.examples,
            }
            store.write_shard(Path(s["root"]), k, aligned, tokens=tokens, stats=stats)
            written += 1
        return {"shard": k, "written": written, "docs": table.num_rows}


def _run_ray(config: AlignConfig, cache: TeacherCache, sets: list[dict], work: list[int]) -> None:
    import ray.data
    from tqdm import tqdm

    from alm_pipeline.pipeline.teacher_cache import _root_cause_message

    ensure_ray(config.ray)
    fn = _AlignCacheShard(str(cache.root), teacher_special_mask(cache), sets, config.settings)
    ds = ray.data.from_items([{"shard": k} for k in work], override_num_blocks=len(work))
    ds = ds.map(fn, num_cpus=1)
    bar = tqdm(total=len(work), unit="shard", desc="align", dynamic_ncols=True)
    t0, docs = time.time(), 0
    try:
        for row in ds.iter_rows():
            docs += int(row["docs"])
            bar.set_postfix_str(f"{docs / max(time.time() - t0, 1e-9):,.0f} docs/s")
            bar.update(1)
    except Exception as err:
        raise AlignError(_root_cause_message(err)) from err
    finally:
        bar.close()


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
    special = teacher_special_mask(cache)
    root = str(cache.root)

    def transform(batch: pa.Table) -> pa.Table:
        shard_cache = open_cache(root, verify=False)
        tables = [
            align_table(shard_cache.read_shard(int(k), columns=CACHE_COLUMNS), special, view, settings)
            for k in batch["shard"].to_pylist()
        ]
        return pa.concat_tables(tables) if tables else ALIGNED_SCHEMA.empty_table()

    shards = list(range(len(cache.shards)))
    ds = ray.data.from_items([{"shard": k} for k in shards], override_num_blocks=max(1, len(shards)))
    ds = ds.map_batches(transform, batch_size=1, batch_format="pyarrow", num_cpus=0.5)
    return ds, view, cache


def coverage_report_lines(summary: AlignedSetSummary, manifest: dict) -> list[str]:
    cov = manifest["coverage"]
    lines = [
        f"{summary.name}: {summary.docs} documents, {cov['groups']} chunks after merging "
        f"({cov['valid_chunks']} minimal), coverage {cov['coverage']:.2%} of text bytes",
        f"  per chunk: {cov['mean_chunk_bytes']:.2f} bytes, {cov['mean_chunk_teacher_tokens']:.2f} teacher tokens, "
        f"{cov['mean_chunk_student_tokens']:.2f} student tokens; {cov['mean_group_bytes']:.2f} bytes per merged chunk",
    ]
    if cov["dropped"]:
        lines.append(f"  dropped documents: {json.dumps(cov['dropped'])}")
    if summary.low_coverage:
        lines.append(
            f"  WARNING: coverage {cov['coverage']:.2%} is below {manifest['settings']['min_coverage']:.0%}: "
            "the student tokenizer and the cached texts disagree on many bytes (see dropped_examples in "
            f"{summary.path}/manifest.json)"
        )
    return lines
