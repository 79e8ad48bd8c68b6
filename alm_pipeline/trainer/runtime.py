"""Where a worker runs: a Ray Train worker (:class:`RayRuntime`) or this process (:class:`LocalRuntime`).

A runtime gives the worker loop its rank and device, the training rows, the checkpoints it may resume from, a
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

__all__ = ["LocalRuntime", "RayRuntime", "Runtime", "aligned_info", "read_aligned_rows"]


def read_aligned_rows(files: list[str | os.PathLike[str]]) -> AlignedRows:
    """The training rows of an aligned set's shard files, in canonical order."""
    import pyarrow.parquet as pq

    parts = []
    for f in files:
        try:
            parts.append(AlignedRows.from_table(pq.read_table(f, columns=TRAINER_COLUMNS)))
        except ValueError as err:
            raise TrainingError(f"{f}: {err}") from None
    return AlignedRows.concat(parts).canonical()


def aligned_info(config: TrainConfig) -> dict:
    """What the worker needs to know about the data source: tokenizer spec, debias default, shard files."""
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
            "files": [str(f) for f in aligned.shard_files()],
        }
    from alm_pipeline.assets import resolve_model
    from alm_pipeline.pipeline.align_stage import AlignSettings

    tok = data.student_tokenizer
    return {
        "tokenizer": tok if tok == "bytes" else resolve_model(tok),
        "debias": AlignSettings().debias,
        "gamma": data.gamma if data.gamma is not None else AlignSettings().gamma,
        "files": [],
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

    def rows(self) -> AlignedRows:
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

    def rows(self) -> AlignedRows:
        info = aligned_info(self.config)
        if not info["files"]:
            raise NotImplementedError(
                "train_local reads aligned sets only; align the cache first (alm-pipeline align) or use run_training"
            )
        return read_aligned_rows(info["files"])

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
    """A Ray Train worker: data through ``get_dataset_shard``, checkpoints through ``ray.train.report``."""

    def __init__(self, config: TrainConfig, queue, resume_from: str | None, rows_from_rank0: bool):
        super().__init__(config)
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.queue = queue
        self.resume_from = resume_from
        self.rows_from_rank0 = rows_from_rank0

    def device(self) -> torch.device:
        if self.config.distributed.use_gpu:
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cpu")

    def _read_shard(self) -> AlignedRows:
        import pyarrow as pa
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        parts = []
        for batch in shard.iter_batches(batch_size=4096, batch_format="pyarrow"):
            table = batch if isinstance(batch, pa.Table) else pa.Table.from_pydict(batch)
            parts.append(AlignedRows.from_table(table.select(TRAINER_COLUMNS)))
        return AlignedRows.concat(parts)

    def rows(self) -> AlignedRows:
        if not self.rows_from_rank0 or self.world_size == 1:
            return self._read_shard().canonical()
        holder: list[Any] = [self._read_shard().canonical() if self.rank == 0 else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

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
