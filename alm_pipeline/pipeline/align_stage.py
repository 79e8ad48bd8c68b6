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
from alm_pipeline.pipeline.align import CoverageStats, align_document, coverage_stats, merge_and_debias
from alm_pipeline.pipeline.byteview import ByteView, TokenizerMismatchError, load_byte_view
from alm_pipeline.pipeline.ray_utils import RayConfig, ensure_ray

CACHE_COLUMNS = ["doc_id", "text", "token_ids", "offsets", "logprob", "boundary_logprob"]


class AlignError(RuntimeError):
    """The align stage cannot proceed; the message says why."""


@dataclass(frozen=True)
class AlignSettings:
    gamma: float = 0.1  # merge chunks until the teacher's boundary probability exceeds γ (0: no merging)
    debias: bool = True  # the trainer adds σ to both chunk log-likelihoods (outcome debiasing)
    max_student_length: int | None = None  # student tokens per document (None: cover the cached text)
    min_coverage: float = 0.8  # warn when chunks cover less of the text than this

    def identity(self) -> dict:
        return {"gamma": self.gamma, "debias": self.debias, "max_student_length": self.max_student_length}


@dataclass(frozen=True)
class AlignConfig:
    cache: str
    student_tokenizers: tuple[str, ...]
    output: str  # parent folder: one aligned set per student tokenizer inside it
    settings: AlignSettings = field(default_factory=AlignSettings)
    overwrite: bool = False
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
    valid chunk, or whose text the student tokenizer cannot reproduce, are dropped and counted)."""
    coverage = coverage if coverage is not None else CoverageStats()
    dropped = dropped if dropped is not None else _Dropped()
    cols = {
        name: table[name].to_pylist() if name in ("doc_id", "text") else table[name] for name in CACHE_COLUMNS
    }
    out: dict[str, list] = {name: [] for name in ALIGNED_SCHEMA.names}
    for i, (doc_id, text) in enumerate(zip(cols["doc_id"], cols["text"], strict=True)):
        t_ids = _row(cols["token_ids"], i, np.int32)
        t_off = _row(cols["offsets"], i, np.int32)
        text_bytes = len(text.encode("utf-8"))
        try:
            enc = student.encode(text, max_length=settings.max_student_length, doc_ref=doc_id)
        except TokenizerMismatchError as err:
            dropped.add("student tokenizer cannot reproduce the text", doc_id, str(err)[:200])
            continue
        alignment = align_document(
            t_ids,
            t_off,
            teacher_is_special[t_ids],
            enc.token_ids,
            enc.offsets,
            student.is_special[enc.token_ids],
        )
        merged = merge_and_debias(
            alignment,
            _row(cols["logprob"], i, np.float32),
            _row(cols["boundary_logprob"], i, np.float32),
            gamma=settings.gamma,
            debias=settings.debias,
        )
        coverage.add(coverage_stats(alignment, merged, text_bytes))
        if merged.num_groups == 0:
            dropped.add("no valid chunk", doc_id)
            continue
        out["doc_id"].append(doc_id)
        out["input_ids"].append(enc.token_ids)
        out["chunk_start"].append(merged.chunk_start)
        out["chunk_end"].append(merged.chunk_end)
        out["teacher_chunk_logprob"].append(merged.teacher_chunk_logprob)
        out["teacher_chunk_boundary_logprob"].append(merged.teacher_chunk_boundary_logprob)
        out["text_bytes"].append(text_bytes)
        out["covered_bytes"].append(int((merged.byte_end - merged.byte_start).sum()))
    arrays = []
    for f in ALIGNED_SCHEMA:
        if pa.types.is_list(f.type):
            arrays.append(_ragged(out[f.name], f.type.value_type))
        else:
            arrays.append(pa.array(out[f.name], type=f.type))
    return pa.Table.from_arrays(arrays, schema=ALIGNED_SCHEMA)


def _row(column: pa.ChunkedArray, i: int, dtype) -> np.ndarray:
    return np.asarray(column[i].values.to_numpy(zero_copy_only=False), dtype=dtype)


def _ragged(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    dtype = value_type.to_pandas_dtype()
    values = np.concatenate([np.asarray(a, dtype=dtype) for a in arrays]) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


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
