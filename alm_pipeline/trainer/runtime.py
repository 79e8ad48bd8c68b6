"""Where a worker runs: a Ray Train worker (:class:`RayRuntime`) or this process (:class:`LocalRuntime`).

A runtime gives the worker loop its rank and device, the index of the training documents, the checkpoints it may resume from, a
channel to the driver (rank 0 only) and the way to save a checkpoint; everything else is the same loop
(:class:`alm_pipeline.trainer.worker.Worker`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from alm_pipeline.cache.aligned import TRAINER_COLUMNS
from alm_pipeline.cache.store import temporary_sibling
from alm_pipeline.storage import location
from alm_pipeline.trainer import checkpoint as ckpt_io
from alm_pipeline.trainer.config import TrainConfig
from alm_pipeline.trainer.data import AlignedRows
from alm_pipeline.trainer.errors import TrainingError
from alm_pipeline.trainer.index import TrainIndex, index_aligned_set, index_cache
from alm_pipeline.trainer.reader import BlockReader, CacheBlockReader

__all__ = [
    "LocalRuntime",
    "RayRuntime",
    "Runtime",
    "aligned_info",
    "block_reader",
    "read_aligned_rows",
    "training_index",
]


def read_aligned_rows(files: list[str | os.PathLike[str]]) -> AlignedRows:
    """All training rows of an aligned set's shard files, in index order (shard, row). For tests and small
    tools only: training never holds the whole set."""
    import pyarrow.parquet as pq

    parts = []
    for f in files:
        try:
            parts.append(AlignedRows.from_table(pq.read_table(f, columns=TRAINER_COLUMNS)))
        except ValueError as err:
            raise TrainingError(f"{f}: {err}") from None
    return AlignedRows.concat(parts)


def _shard_uris(dataset) -> tuple[list[str], list[str], list[int]]:
    """(URIs, sha256s, rows) of a sharded dataset's shards (its root a local path or any storage URI)."""
    from alm_pipeline.storage import location

    root = location(dataset.root)
    index = dataset.shard_index  # columnar: no per-shard stats objects (seconds at 10^5 shards)
    files = index.column("file").to_pylist()
    return (
        [(root / f).uri for f in files],
        index.column("sha256").to_pylist(),
        index.column("rows").to_pylist(),
    )


def training_index(config: TrainConfig) -> TrainIndex:
    """The index of the run's training documents (built by the driver; see :mod:`alm_pipeline.trainer.index`)."""
    data = config.data
    need_groups = config.loss.alm and not config.loss.next_token_loss
    if data.aligned is not None:
        from alm_pipeline.cache.aligned import open_aligned_set

        files, sums, _ = _shard_uris(open_aligned_set(data.aligned, verify=False))
        return index_aligned_set(files, need_groups, checksums=sums)
    from alm_pipeline.cache.teacher import open_cache

    files, sums, rows = _shard_uris(open_cache(data.cache, verify=False))
    return index_cache(files, rows, checksums=sums)


def cache_aligner(config: TrainConfig):
    """Stream mode: the function that aligns a table of cache rows to the run's student tokenizer."""
    from alm_pipeline.assets import resolve_model
    from alm_pipeline.cache.teacher import open_cache
    from alm_pipeline.pipeline.align_stage import AlignError, AlignSettings, _student_templates, align_table
    from alm_pipeline.pipeline.byteview import load_byte_view

    data = config.data
    kwargs: dict[str, Any] = {}
    if data.gamma is not None:
        kwargs["gamma"] = data.gamma
    if data.max_student_length is not None:
        kwargs["max_student_length"] = data.max_student_length
    if data.loss_on is not None:
        kwargs["loss_on"] = data.loss_on
    settings = AlignSettings(**kwargs)
    cache = open_cache(data.cache, verify=False)
    special = cache.special_token_mask()
    tok = data.student_tokenizer
    view = load_byte_view(tok if tok == "bytes" else resolve_model(tok))
    try:
        (template,) = _student_templates((tok,), data.chat_template, cache.chat_docs > 0)
    except AlignError as err:
        raise TrainingError(str(err)) from None
    return lambda table: align_table(table, special, view, settings, student_template=template)


def block_reader(config: TrainConfig, index: TrainIndex) -> BlockReader:
    """The reader of a worker's documents: row groups of the aligned set, or cache shards aligned on the fly."""
    cache_bytes = config.data.data_cache_mib * 2**20
    if index.kind == "aligned":
        return BlockReader(index, cache_bytes=cache_bytes)
    need_groups = config.loss.alm and not config.loss.next_token_loss
    return CacheBlockReader(index, cache_aligner(config), need_groups, cache_bytes=cache_bytes)


def aligned_info(config: TrainConfig) -> dict:
    """What the worker needs to know about the data source: tokenizer spec, debias default, γ."""
    data = config.data
    if data.aligned is not None:
        from alm_pipeline.cache.aligned import open_aligned_set

        aligned = open_aligned_set(data.aligned, verify=False)
        st = aligned.manifest.get("student_tokenizer", {})
        tok = (
            "bytes" if st.get("name") == "bytes" or st.get("kind") == "bytes" else str(aligned.tokenizer_dir)
        )
        return {
            "tokenizer": tok,
            "debias": aligned.debias,
            "gamma": aligned.gamma,
        }
    from alm_pipeline.assets import resolve_model
    from alm_pipeline.pipeline.align_stage import AlignSettings

    tok = data.student_tokenizer
    return {
        "tokenizer": tok if tok == "bytes" else resolve_model(tok),
        "debias": AlignSettings().debias,
        "gamma": data.gamma if data.gamma is not None else AlignSettings().gamma,
    }


class Runtime:
    """This process (rank/world from an initialised ``torch.distributed`` group, else a single worker); the
    subclasses say where the rows come from and how checkpoints are saved."""

    rank: int = 0
    world_size: int = 1

    def __init__(self, config: TrainConfig):
        self.config = config
        self.distributed = dist.is_available() and dist.is_initialized()
        if self.distributed:
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def device(self) -> torch.device:
        if self.config.distributed.use_gpu:
            if not torch.cuda.is_available():
                raise TrainingError("--use-gpu was given but this worker sees no CUDA device")
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def index(self) -> TrainIndex:
        """The index of the training documents (see :func:`training_index`)."""
        raise NotImplementedError

    def resume_candidates(self) -> list[Path]:
        return []

    def emit(self, kind: str, payload: dict) -> None:  # rank 0 only
        raise NotImplementedError

    def save(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None:
        raise NotImplementedError

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


class LocalRuntime(Runtime):
    """This process (rank/world from an initialised ``torch.distributed`` group, else a single worker)."""

    def __init__(
        self, config: TrainConfig, sink: Callable[[str, dict], None] | None, resume_from: str | None
    ):
        super().__init__(config)
        self.sink = sink
        self.resume_from = resume_from

    def index(self) -> TrainIndex:
        # in a torch.distributed group every rank builds the same index from the same files (small columns)
        return training_index(self.config)

    def resume_candidates(self) -> list[Path]:
        return [ckpt_io.local_checkpoint(self.resume_from)] if self.resume_from else []

    def emit(self, kind: str, payload: dict) -> None:
        if self.sink is not None:
            self.sink(kind, payload)

    def save(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None:
        output = location(self.config.output)
        if not output.is_local:  # written to a local temporary folder, then uploaded
            if self.rank == 0:
                with tempfile.TemporaryDirectory(prefix="alm-ckpt-") as tmp:
                    write(Path(tmp))
                    ckpt_io.publish_checkpoint(
                        tmp, output / ckpt_io.CHECKPOINTS_DIR / ckpt_io.checkpoint_name(step)
                    )
                ckpt_io.prune_checkpoints(output, self.config.checkpoint.keep)
            self.barrier()
            return
        root = Path(self.config.output) / ckpt_io.CHECKPOINTS_DIR
        final = root / ckpt_io.checkpoint_name(step)
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            tmp = temporary_sibling(final)
            tmp.mkdir()  # the user's umask (mkdtemp would make the checkpoint folder private)
            try:
                write(tmp)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            ckpt_io.prune_checkpoints(self.config.output, self.config.checkpoint.keep)
        self.barrier()


class RayRuntime(Runtime):
    """A Ray Train worker: the driver's index through the object store (each worker reads its own documents),
    checkpoints through ``ray.train.report``."""

    def __init__(self, config: TrainConfig, queue, resume_from: str | None, index_ref):
        super().__init__(config)
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.queue = queue
        self.resume_from = resume_from
        self.index_ref = index_ref

    def device(self) -> torch.device:
        if self.config.distributed.use_gpu:
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cpu")

    def index(self) -> TrainIndex:
        import ray

        return ray.get(self.index_ref)

    def resume_candidates(self) -> list[Path]:
        import ray.train

        out = []
        ckpt = ray.train.get_checkpoint()
        remote_path = None
        if ckpt is not None:
            if getattr(ckpt.filesystem, "type_name", "local") == "local":
                out.append(Path(ckpt.path))  # the checkpoint folder itself
            else:  # cloud storage: download it
                remote_path = str(ckpt.path).rstrip("/")
                out.append(Path(ckpt.to_directory(tempfile.mkdtemp(prefix="alm-resume-"))))
        if self.resume_from and location(self.resume_from).path.rstrip("/") != remote_path:
            out.append(ckpt_io.local_checkpoint(self.resume_from))  # a local copy when it is a URI
        # a restart after a lost node: Ray Train knows a checkpoint only once its controller has collected every
        # worker's report of that step (it polls every few seconds), so a node lost just after a checkpoint was
        # written leaves Ray's record behind. The output is this run's alone (it holds the output lock; an
        # earlier run's checkpoints were either resumed from or removed), so its newest complete checkpoint is
        # this run's latest state
        newest = ckpt_io.list_checkpoints(self.config.output)
        known = max((ckpt_io.checkpoint_step(c) for c in out if ckpt_io.is_complete(c)), default=0)
        if newest and newest[-1][0] > known:
            out.append(ckpt_io.local_checkpoint(newest[-1][1]))
        return out

    def emit(self, kind: str, payload: dict) -> None:
        if self.queue is not None:
            self.queue.put((kind, payload))

    def save(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None:
        import ray.train
        from ray.train import Checkpoint

        clean = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
        if self.rank == 0:
            tmp = Path(tempfile.mkdtemp(prefix="alm-ckpt-"))
            try:
                write(tmp)
                ray.train.report(
                    clean,
                    checkpoint=Checkpoint.from_directory(str(tmp)),
                    checkpoint_dir_name=ckpt_io.checkpoint_name(step),
                )
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            ray.train.report(clean, checkpoint=None)
