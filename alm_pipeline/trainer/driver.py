"""Launching a training run: :func:`run_training` (Ray Train) and :func:`train_local` (this process).

The teacher is never loaded: its per-group log-likelihoods come from an aligned set (``data.aligned``; or a teacher
cache aligned on the fly, ``data.cache`` + ``data.student_tokenizer``).

* :func:`run_training` validates the configuration and the aligned set, starts/joins Ray, builds the index of the
  training documents (:mod:`~alm_pipeline.trainer.index`: 16 bytes per document, from small per-document
  columns; each worker then reads only the row groups holding its documents) and launches a ``TorchTrainer``
  with ``num_workers`` workers
  (DDP, or FSDP2 ``fully_shard`` with ``strategy="fsdp"``) running :func:`~alm_pipeline.trainer.worker.ray_train_loop`.
  Rank 0 sends one metrics row per optimizer step back through a Ray queue; the driver writes ``metrics.csv``,
  TensorBoard event files (and W&B) and shows progress with an ETA. At the end the latest checkpoint is published
  as ``<output>/final`` (a plain Hugging Face folder; LoRA merged).
* **Checkpoints** (every ``checkpoint.every`` steps and at the end): a Hugging Face folder (model + tokenizer) +
  optimizer + scheduler + ``trainer_state.json`` (step, data position), reported to Ray Train
  (``<output>/checkpoints/checkpoint-NNNNNN``). ``checkpoint.resume`` continues from the latest one, and Ray
  Train's ``FailureConfig(max_failures)`` restarts failed workers from it; since the data order is a function of
  the step, a resumed run repeats an uninterrupted run's loss curve.
* **One writer**: both hold an exclusive lock on ``output`` for the whole run (:mod:`alm_pipeline.locking`); the
  student model, the data source and every option are checked before the lock is taken and before Ray starts.
* :func:`train_local` runs the same worker loop in this process without Ray (one worker, or inside an existing
  ``torch.distributed`` process group): for notebooks, debugging and tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from alm_pipeline.locking import output_lock
from alm_pipeline.optional import check
from alm_pipeline.pipeline.ray_utils import parse_resources
from alm_pipeline.storage import Location, location
from alm_pipeline.trainer import checkpoint as ckpt_io
from alm_pipeline.trainer.config import TrainConfig
from alm_pipeline.trainer.errors import TrainingError
from alm_pipeline.trainer.runtime import LocalRuntime, training_index
from alm_pipeline.trainer.worker import FAIL_MARKER, Worker, ray_train_loop

logger = logging.getLogger(__name__)

__all__ = ["RUN_FILE", "TrainResult", "metric_columns", "run_training", "train_local"]

RUN_FILE = "run.json"


@dataclass
class TrainResult:
    """What :func:`run_training` / :func:`train_local` return."""

    output: Path | Location  # a Path for a local output, a Location for a URI (s3://, gs://)
    final_checkpoint: Path | Location | None  # <output>/final: Hugging Face folder (model + tokenizer)
    last_checkpoint: Path | Location | None  # <output>/checkpoints/checkpoint-NNNNNN (with optimizer state)
    steps: int  # optimizer steps completed in total
    start_step: int  # step the run started (resumed) from
    final_loss: float | None
    history: list[dict]  # the metric rows of this run (also in <output>/metrics.csv)
    seconds: float
    metrics_csv: Path | Location | None = None
    info: dict = field(default_factory=dict)


def metric_columns(config: TrainConfig) -> list[str]:
    """The columns of ``metrics.csv`` for this run's losses."""
    alm, ntp = config.loss.alm, config.loss.next_token_loss
    cols = ["step", "loss"]
    if alm:
        cols.append("loss_alm")
    if ntp:
        cols.append("loss_ntp")
    if alm and ntp:
        cols += ["weight_alm", "weight_ntp"]
    cols += [
        "valid_chunks",
        "docs",
        "student_tokens",
        "padding",
        "tokens_per_s",
        "lr",
        "grad_norm",
        "step_time_s",
        "epoch",
        "elapsed_s",
    ]
    if alm:
        cols.append("mean_abs_chunk_logprob_diff")
    cols.append("skipped_steps")
    if config.data.cache is not None:
        cols.append("skipped_docs")  # stream mode: documents of the plan untrainable after aligning
    return cols


def _output(config: TrainConfig) -> Path | Location:
    """The run directory: a ``Path`` when local (as before), else its ``Location`` (``s3://...``)."""
    loc = location(config.output)
    return loc.local_path if loc.is_local else loc


def _remove_tree(folder: Path | Location) -> None:
    if isinstance(folder, Location):
        ckpt_io.remove_tree(folder)
    else:
        shutil.rmtree(folder, ignore_errors=True)


def _remove_file(file: Path | Location) -> None:
    if isinstance(file, Location):
        file.remove(missing_ok=True)
    else:
        file.unlink(missing_ok=True)


def _prepare_output(config: TrainConfig, say: Callable[[str], None]) -> Path | Location | None:
    """Check the run directory against resume/overwrite; returns the checkpoint to continue from (or None)."""
    out = _output(config)
    if isinstance(
        out, Location
    ):  # a missing bucket or unreachable endpoint: said now, not at the first checkpoint
        try:
            out.mkdir()
        except OSError as err:
            raise TrainingError(f"--output {err}") from None
    if config.checkpoint.overwrite:
        for name in (ckpt_io.CHECKPOINTS_DIR, ckpt_io.FINAL_DIR, "tensorboard"):
            _remove_tree(out / name)
        for name in ("metrics.csv", RUN_FILE, FAIL_MARKER):
            _remove_file(out / name)
    ckpts = ckpt_io.list_checkpoints(out)
    damaged = ckpt_io.damaged_checkpoints(out)
    named = "; ".join(f"{path.name}: {problem}" for path, problem in damaged)
    if config.checkpoint.resume:
        if not ckpts and damaged:
            raise TrainingError(
                f"--resume: no checkpoint under {out / ckpt_io.CHECKPOINTS_DIR} passes its completeness check "
                f"({named}); they are damaged or were copied only in part. Nothing was changed: restore them, or "
                "start over with --overwrite (which deletes them)"
            )
        if not ckpts:
            say(f"--resume: {out} holds no checkpoint yet; starting from step 0")
            _remove_tree(out / ckpt_io.CHECKPOINTS_DIR)
            return None
        step, latest = ckpts[-1]
        if damaged:
            say(f"--resume: skipping checkpoints that fail their completeness check ({named})")
        theirs = ckpt_io.read_trainer_state(latest).get("data_identity", {})
        diffs = ckpt_io.identity_diffs(theirs, config.data_identity(), recorded_only=True)
        if diffs:
            raise TrainingError(ckpt_io.settings_differ(latest, diffs))
        _forget_missing_checkpoints(out, latest, step, say)
        return latest
    if ckpts or damaged:
        what = f"latest: step {ckpts[-1][0]}" if ckpts else f"all failing their completeness check: {named}"
        raise TrainingError(
            f"{out} already holds checkpoints of a run ({what}); pass --resume to continue it, "
            "--overwrite to start over, or choose another --output"
        )
    # leftovers without a complete checkpoint (a run killed before its first one): Ray Train would restore its
    # bookkeeping from them
    _remove_tree(out / ckpt_io.CHECKPOINTS_DIR)
    _remove_file(out / FAIL_MARKER)
    return None


# Ray Train's record of a run's checkpoints (ray.train.v2 CHECKPOINT_MANAGER_SNAPSHOT_FILENAME), restored by a
# TorchTrainer started on the same storage folder
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def _snapshot_names(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["checkpoint_dir_name"]} if isinstance(node.get("checkpoint_dir_name"), str) else set()
        return found.union(*(_snapshot_names(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_snapshot_names(v) for v in node))
    return set()


def _forget_missing_checkpoints(
    out: Path | Location, latest: Path | Location, step: int, say: Callable[[str], None]
) -> None:
    """Ray Train restores its record of the run's checkpoints and fails when one it names is gone (deleted by
    hand): drop that record, so the run resumes from ``latest`` (the newest checkpoint that exists), and say so."""
    snapshot = location(out) / ckpt_io.CHECKPOINTS_DIR / RAY_SNAPSHOT
    if not snapshot.exists():
        return
    try:
        names = _snapshot_names(json.loads(snapshot.read_bytes()))
    except (OSError, ValueError):
        names = None
    missing = None if names is None else sorted(n for n in names if not (snapshot.parent / n).is_dir())
    if missing == []:
        return
    snapshot.remove()
    gone = "unreadable" if missing is None else f"naming {', '.join(missing)}, which no longer exist"
    say(
        f"Ray Train's record of the run's checkpoints was {gone}; resuming from {latest.name} (step {step}), the "
        "newest checkpoint that exists"
    )


def _check_models(config: TrainConfig) -> None:
    """The student (or the model of a tokenizer transfer) loads: config and weight files, before Ray starts."""
    from alm_pipeline.assets import resolve_model
    from alm_pipeline.model_files import ModelFilesError, check_model

    for option, name in (("--student", config.student.student), ("--init-from", config.student.init_from)):
        if name is None:
            continue
        try:
            check_model(resolve_model(name), option)
        except (ModelFilesError, FileNotFoundError) as err:
            raise TrainingError(str(err)) from None


def _check_source(config: TrainConfig) -> dict:
    from alm_pipeline.cache.store import CacheIntegrityError

    if config.data.aligned is not None:
        from alm_pipeline.cache.aligned import open_aligned_set

        try:
            aligned = open_aligned_set(config.data.aligned, verify=True)
            if config.data.verify:
                aligned.verify_checksums(config.distributed.ray)
        except (CacheIntegrityError, FileNotFoundError, ValueError) as err:
            raise TrainingError(f"--aligned {err}") from None
        try:
            aligned.check_cache()
        except CacheIntegrityError as err:
            # training never reads the teacher cache: a moved or deleted one is fine, a changed one is not
            if "fingerprint" in str(err):
                raise TrainingError(str(err)) from None
        except (FileNotFoundError, OSError, KeyError, ValueError):
            pass
        return {"kind": "aligned", "summary": aligned.summary()}
    # on-the-fly alignment: the student tokenizer loads and the cache opens (its shards are verified later)
    from alm_pipeline.assets import resolve_model
    from alm_pipeline.cache.teacher import open_cache
    from alm_pipeline.pipeline.byteview import TokenizerMismatchError, load_byte_view

    tok = config.data.student_tokenizer
    try:
        load_byte_view(tok if tok == "bytes" else resolve_model(tok))
    except (TokenizerMismatchError, OSError, ValueError) as err:
        raise TrainingError(f"--student-tokenizer {tok}: cannot load it ({err})") from None
    try:
        cache = open_cache(config.data.cache, verify=True)
        if config.data.verify:
            cache.verify_checksums(config.distributed.ray)
    except (CacheIntegrityError, FileNotFoundError, ValueError) as err:
        raise TrainingError(f"--cache {err}") from None
    return {"kind": "stream"}


def _cpus_per_worker(config: TrainConfig) -> float:
    if config.distributed.cpus_per_worker is not None:
        return config.distributed.cpus_per_worker
    from alm_pipeline.pipeline.ray_utils import cluster_cpus

    total = cluster_cpus()
    # leave one CPU to the metrics queue and Ray's own actors (with every CPU taken, fit() can wait forever)
    return float(max(0.1, min(1.0, (total - 1.0) / config.distributed.num_workers)))


def _export_final(last: Path | Location, dest: Path | Location) -> Path | Location:
    """``<output>/final`` from the latest checkpoint (LoRA merged). On object storage it is built in a local
    temporary folder (from a download of the checkpoint's model files) and uploaded."""
    if not (last / "adapter_config.json").exists():
        return ckpt_io.export_final(last, dest)
    from alm_pipeline.trainer.student import StudentConfig, load_student, save_student

    if isinstance(last, Path) and isinstance(dest, Path):
        tmp = dest.with_name(f".{dest.name}.merging")
        shutil.rmtree(tmp, ignore_errors=True)
        bundle = load_student(StudentConfig(model=str(last)))
        save_student(bundle, tmp, merge_lora=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return dest
    with tempfile.TemporaryDirectory(prefix="alm-final-") as tmp:
        source = (
            last if isinstance(last, Path) else ckpt_io.download_model_folder(last, Path(tmp) / "checkpoint")
        )
        bundle = load_student(StudentConfig(model=str(source)))
        save_student(bundle, Path(tmp) / "final", merge_lora=True)
        return ckpt_io.publish_folder(Path(tmp) / "final", dest)


class _MetricsSink:
    """Receives rank 0's messages (metrics rows, setup info) and writes them."""

    def __init__(
        self,
        config: TrainConfig,
        resume_step: int,
        say: Callable[[str], None],
        backfill: list[dict] | None = None,
    ):
        from alm_pipeline.trainer.metrics import MetricsLogger

        log = config.logging
        wandb = None
        if log.wandb:
            wandb = {"project": log.wandb_project, "name": log.wandb_run_name, "config": config.to_dict()}
        self.say = say
        self.info: dict = {}
        self.every = config.checkpoint.every
        self.steps = config.optim.steps
        self.logger = MetricsLogger(
            config.output,
            metric_columns(config),
            total_steps=config.optim.steps,
            resume_step=resume_step,
            backfill=backfill,
            tensorboard=log.tensorboard,
            wandb=wandb,
            console=log.progress,
            log_every=log.log_every,
        )

    def __call__(self, kind: str, payload: dict) -> None:
        if kind == "row":
            self.logger.log(payload)
            step = int(payload["step"])
            if step % self.every == 0 or step >= self.steps:  # a checkpoint is being written: publish with it
                self.logger.sync()
        elif kind == "info":
            self.info.update(payload)
            if "message" in payload:
                self.say(payload["message"])
            elif "documents" in payload:
                st = payload["student"]
                sizes = (
                    f"{payload['student_tokens']} student tokens, {payload['groups']} chunks, "
                    if payload.get("student_tokens") is not None
                    else "aligned on the fly, "
                )
                self.say(
                    f"{payload['documents']} documents ({sizes}{payload['blocks']} blocks, index "
                    f"{payload['index_mib']} MiB); student "
                    f"{st.get('mode')} {st.get('source')} ({st.get('trainable_parameters', 0) / 1e6:.1f}M trainable); "
                    f"{payload['world_size']} worker(s) on {payload['device']}; "
                    f"{'packed' if payload['packing'] else 'length-bucketed'} micro-batches"
                    + (f"; resuming at step {payload['start_step']}" if payload.get("resumed_from") else "")
                )

    def close(self) -> None:
        self.logger.close()


def _recent_metrics(checkpoint: Path | Location | None) -> list[dict]:
    if checkpoint is None:
        return []
    return list(ckpt_io.read_trainer_state(checkpoint).get("recent_metrics") or [])


def _default_say(message: str) -> None:
    import sys

    print(f"[alm-pipeline] {message}", file=sys.stderr, flush=True)


def _finish(config: TrainConfig, driver: _MetricsSink, start_step: int, t0: float) -> TrainResult:
    out = _output(config)
    # Ray Train prunes only the checkpoints it knows of (not those of a run resumed without its record)
    ckpt_io.prune_checkpoints(out, config.checkpoint.keep)
    last = ckpt_io.find_latest_checkpoint(out)
    final = _export_final(last, out / ckpt_io.FINAL_DIR) if last is not None else None
    rows = driver.logger.rows
    result = TrainResult(
        output=out,
        final_checkpoint=final,
        last_checkpoint=last,
        steps=ckpt_io.checkpoint_step(last) if last is not None else 0,
        start_step=start_step,
        final_loss=float(rows[-1]["loss"]) if rows else None,
        history=rows,
        seconds=time.monotonic() - t0,
        metrics_csv=driver.logger.target,
        info=driver.info,
    )
    run = {
        "config": config.to_dict(),
        "steps": result.steps,
        "start_step": start_step,
        "final_loss": result.final_loss,
        "final_checkpoint": str(final) if final else None,
        "last_checkpoint": str(last) if last else None,
        "seconds": round(result.seconds, 2),
        "info": driver.info,
    }
    location(out).join(RUN_FILE).write_bytes((json.dumps(run, indent=2, default=str) + "\n").encode())
    return result


def _check_extras(config: TrainConfig) -> None:
    if config.logging.wandb:
        check("wandb", "W&B logging (--wandb-project)")


def train_local(config: TrainConfig, say: Callable[[str], None] | None = None) -> TrainResult:
    """Run the training loop in this process, without Ray (rank/world size from an initialised
    ``torch.distributed`` group if there is one; then every rank must call this)."""
    config = config.resolved()
    _check_extras(config)
    say = say or _default_say
    t0 = time.monotonic()
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    with output_lock(config.output, "train") if rank == 0 else contextlib.nullcontext():
        return _train_here(config, say, t0, distributed, rank)


def _train_here(
    config: TrainConfig, say: Callable[[str], None], t0: float, distributed: bool, rank: int
) -> TrainResult:
    """train_local's work (rank 0 under the output's lock)."""
    resume_from = _prepare_output(config, say) if rank == 0 else None
    if distributed:
        holder = [str(resume_from) if resume_from else None]
        dist.broadcast_object_list(holder, src=0)
        resume_from = holder[0]  # a path or URI
    resume_step = ckpt_io.checkpoint_step(resume_from) if resume_from else 0
    driver = _MetricsSink(config, resume_step, say, _recent_metrics(resume_from)) if rank == 0 else None
    worker = Worker(config, LocalRuntime(config, driver, str(resume_from) if resume_from else None))
    try:
        summary = worker.run()
    finally:
        if driver is not None:
            driver.close()
    if rank != 0:
        return TrainResult(
            _output(config), None, None, config.optim.steps, summary["start_step"], None, [], 0.0
        )
    return _finish(config, driver, summary["start_step"], t0)


def run_training(config: TrainConfig, say: Callable[[str], None] | None = None) -> TrainResult:
    """Train with Ray Train (see the module docstring). Raises :class:`TrainingError` with the cause, and
    :class:`~alm_pipeline.locking.OutputError` when the output is being written by another run or cannot be
    written. Every input is checked before Ray starts."""
    config = config.resolved()
    _check_extras(config)
    say = say or _default_say
    t0 = time.monotonic()
    _check_models(config)
    source = _check_source(config)
    if config.distributed.use_gpu and not _cluster_address(config):
        import torch

        if not torch.cuda.is_available():
            raise TrainingError(
                "--use-gpu: this machine has no CUDA device (and no --address of a cluster was given)"
            )
    with output_lock(config.output, "train"):
        return _fit(config, source, say, t0)


def _cluster_address(config: TrainConfig) -> str | None:
    return config.distributed.ray.address or os.environ.get("RAY_ADDRESS") or None


def _fit(config: TrainConfig, source: dict, say: Callable[[str], None], t0: float) -> TrainResult:
    """run_training's work, under the output's lock."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    from alm_pipeline.pipeline.ray_utils import ensure_ray

    resume_from = _prepare_output(config, say)
    resume_step = ckpt_io.checkpoint_step(resume_from) if resume_from else 0
    ensure_ray(config.distributed.ray)
    cpus = _cpus_per_worker(config)
    resources: dict[str, float] = {"CPU": cpus}
    workers = config.distributed.num_workers
    if config.distributed.use_gpu:
        resources["GPU"] = 1.0
    resources.update(parse_resources("--worker-resource", config.distributed.worker_resources))
    # Ray would wait forever for workers that cannot be placed: say so instead (on a cluster, an autoscaler may
    # still add nodes, so only warn there)
    have = ray.cluster_resources()
    for name, per_worker in resources.items():
        if have.get(name, 0.0) + 1e-9 < per_worker * workers:
            message = (
                f"{workers} workers need {per_worker * workers:g} {name} but the Ray cluster "
                f"has {have.get(name, 0.0):g}; use fewer --num-workers"
                + (" or a smaller --cpus-per-worker" if name == "CPU" else "")
            )
            if not _cluster_address(config):
                raise TrainingError(message)
            say(
                f"warning: {message} (waiting up to --placement-timeout "
                f"{config.distributed.placement_timeout:g} s for the cluster to grow)"
            )
    # the index (16 bytes per document) goes to the workers through the object store; each worker reads only
    # the row groups (stream mode: the cache shards) that hold its documents
    index = training_index(config)
    if index.num_docs == 0:
        raise TrainingError(
            f"the training data has no usable document ({index.documents_read} read; dropped: {index.dropped}); "
            "check the aligned set's coverage"
        )
    index_ref = ray.put(index)
    # on the driver's node: the metrics path must outlive the loss of any worker node
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": _on_this_node()})
    driver = _MetricsSink(config, resume_step, say, _recent_metrics(resume_from))
    if resume_from is not None:
        say(f"resuming from {resume_from} (step {resume_step})")
    stop = threading.Event()

    def pump() -> None:
        while True:
            try:
                kind, payload = queue.get(block=True, timeout=0.25)
            except Empty:
                if stop.is_set():
                    return
                continue
            except Exception:  # noqa: BLE001 - the queue actor is gone (shutdown)
                return
            try:
                driver(kind, payload)
            except Exception as err:  # noqa: BLE001 - a logging problem must not kill the run
                logger.warning("could not log %s: %s", kind, err)

    thread = threading.Thread(target=pump, name="alm-train-metrics", daemon=True)
    thread.start()
    os.environ[WORKER_GROUP_START_TIMEOUT] = str(config.distributed.placement_timeout)
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={
            "config": config.to_dict(),
            "queue": queue,
            "resume_from": str(resume_from) if resume_from else None,
            "index": index_ref,
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=config.distributed.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=ckpt_io.CHECKPOINTS_DIR,
            storage_path=config.output,
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
            # a worker group that cannot be placed within --placement-timeout (Ray Train's start timeout, set
            # below) ends the run instead of waiting forever
            failure_config=FailureConfig(
                max_failures=config.distributed.max_failures, controller_failure_limit=0
            ),
        ),
    )
    error: BaseException | None = None
    try:
        result = trainer.fit()
        error = getattr(result, "error", None)
    except Exception as err:  # noqa: BLE001 - re-raised below with the root cause
        error = err
    finally:
        stop.set()
        thread.join(timeout=30)
        driver.close()
        with contextlib.suppress(Exception):
            ray.kill(queue.actor)
    if error is not None:
        if _startup_timed_out(error):
            raise TrainingError(
                f"training failed: the Ray cluster could not place {workers} worker(s) needing "
                + ", ".join(f"{name}={amount:g}" for name, amount in resources.items())
                + f" each within --placement-timeout {config.distributed.placement_timeout:g} s (the cluster has "
                + ", ".join(f"{name}={ray.available_resources().get(name, 0.0):g}" for name in resources)
                + " free); checkpoints so far are kept, --resume continues"
            ) from error
        raise TrainingError(f"training failed: {_root_cause(error)}") from error
    return _finish(config, driver, resume_step if resume_from else 0, t0)


WORKER_GROUP_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # read by Ray Train's controller


def _on_this_node():
    """A scheduling strategy that pins an actor to the driver's node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def _startup_timed_out(err: BaseException) -> bool:
    """Whether Ray Train gave up placing the worker group (``WorkerGroupStartupTimeoutError`` in the chain)."""
    seen: BaseException | None = err
    for _ in range(20):
        if seen is None:
            return False
        if type(seen).__name__ == "WorkerGroupStartupTimeoutError":
            return True
        seen = getattr(seen, "controller_failure", None) or seen.__cause__ or getattr(seen, "cause", None)
    return False


def _root_cause(err: BaseException) -> str:
    seen = set()
    while True:
        nxt = err.__cause__ or getattr(err, "cause", None)
        if nxt is None or id(nxt) in seen or not isinstance(nxt, BaseException):
            break
        seen.add(id(nxt))
        err = nxt
    text = str(err).strip()
    # Ray wraps worker errors in long tracebacks: keep the last line that names the error
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tail = lines[-1] if lines else type(err).__name__
    return tail if len(tail) < 2000 else tail[:2000]
