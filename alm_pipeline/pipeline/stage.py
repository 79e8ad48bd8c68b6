"""One runner for the sharded stages (teacher cache, align): run the pending shards on Ray Data.

A stage writes a :class:`~alm_pipeline.cache.dataset.ShardedDataset` shard by shard. Each shard is a
deterministic function of its input and the settings, written atomically with a verified ``.done.json``
marker, so a stage is: find the pending shards (no marker, or a file whose size is not the marker's), map
them through the stage's Ray Data steps (one row ``{"shard": k, ...}`` in, carrying what that shard's task
needs and nothing more, one row per written shard out) under one progress bar, check that every shard is
now there (markers and sizes: no shard is re-read), and write the final manifest. This module holds the shard loop and the final check; the
stages hold their steps and their manifests (in the spirit of datatrove's executor and ``PipelineStep``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from alm_pipeline.cache import store
from alm_pipeline.cache.dataset import PathLike, ShardedDataset
from alm_pipeline.pipeline.byteview import TokenizerMismatchError
from alm_pipeline.pipeline.corpus import CorpusError
from alm_pipeline.pipeline.ray_utils import (
    PlacementWatch,
    RayConfig,
    configure_ray_data,
    describe_resources,
    ensure_ray,
    placeable,
)
from alm_pipeline.storage import StorageError

# errors whose message already names the document or file: shown as they are, not as Ray's wrapper
_OUR_ERRORS = (TokenizerMismatchError, CorpusError, store.CacheIntegrityError, StorageError)


class ShardAttemptError(RuntimeError):
    """A shard failed inside a Ray task or actor for a reason that was not the input's (a dead inference engine,
    a CUDA error, a storage error), after its retries. ``shard`` is the shard's index."""

    def __init__(self, shard: int, message: str):
        super().__init__(f"shard {shard}: {message}")
        self.shard = shard

    def __reduce__(self):  # Ray pickles exceptions across processes
        return (_shard_attempt_error, (self.shard, str(self)))


def _shard_attempt_error(shard: int, text: str) -> ShardAttemptError:
    err = ShardAttemptError(shard, "")
    err.args = (text,)
    return err


@dataclass
class ShardRun:
    """What :func:`run_shards` measured: wall time, time to the first finished shard, and the sums of the
    numeric columns of the rows the steps returned (e.g. ``tokens``, ``docs``)."""

    seconds: float
    first_shard_seconds: float
    totals: dict = field(default_factory=dict)
    steady_rate: float | None = None  # rate column per second after the first finished shard


def run_shards(
    shards: list[int] | list[dict],
    steps: Callable,
    *,
    desc: str,
    rate_column: str,
    rate_unit: str,
    ray_config: RayConfig,
    error: type[Exception],
    watch: PlacementWatch | None = None,
    say: Callable[[str], None] | None = None,
) -> ShardRun:
    """Map ``shards`` through ``steps`` (a function of a Ray Dataset of ``{"shard": k}`` rows, or of the given
    dicts, which hold ``"shard"`` and whatever else the shard's task needs; one block per shard; returning
    the Dataset whose rows report the finished shards) with a progress bar showing
    ``rate_column`` per second. An exception inside a step is raised as ``error`` with the message of the
    stage's own error that caused it (naming the document or file) rather than Ray's wrapper. A row with a
    non-empty ``"error"`` is a shard its step gave up on (the teacher-cache's scoring actor does, after its own
    bounded restarts): the run finishes the other shards, then raises ``error`` naming them. With ``watch``, a
    run whose workers can no longer be placed anywhere (their nodes were lost and none joined) waits
    ``watch.timeout`` seconds, saying so through ``say``, then raises ``error`` naming the missing resources."""
    import ray.data
    from tqdm import tqdm

    ensure_ray(ray_config)
    configure_ray_data()  # this run's settings, whatever the process set since Ray started
    rows = [k if isinstance(k, dict) else {"shard": k} for k in shards]
    ds = steps(ray.data.from_items(rows, override_num_blocks=len(rows)))
    bar = tqdm(total=len(shards), unit="shard", desc=desc, dynamic_ncols=True)
    totals: dict = {}
    t0 = time.time()
    first_done, first_count = None, 0
    failed: list[str] = []
    try:
        for row in _rows(ds, watch, say or (lambda message: None)):
            if row.get("error"):  # a shard its step gave up on (the others go on)
                failed.append(str(row["error"]))
                bar.update(1)
                continue
            for key, value in row.items():
                if key not in ("shard", "error"):
                    totals[key] = totals.get(key, 0) + value
            if first_done is None:
                first_done, first_count = time.time(), totals[rate_column]
            bar.set_postfix_str(f"{totals[rate_column] / max(time.time() - t0, 1e-9):,.0f} {rate_unit}/s")
            bar.update(1)
    except _Unplaceable as err:
        raise error(str(err)) from None
    except Exception as err:
        raise error(root_cause_message(err, error)) from err
    finally:
        bar.close()
    if failed:
        more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
        raise error(f"{len(failed)} shard(s) not written: " + "; ".join(failed[:3]) + more)
    end = time.time()
    steady = None
    if first_done is not None and end > first_done:
        # throughput once the workers are up: everything after the first finished shard
        steady = (totals[rate_column] - first_count) / (end - first_done)
    return ShardRun(
        seconds=end - t0, first_shard_seconds=(first_done or end) - t0, totals=totals, steady_rate=steady
    )


class _Unplaceable(RuntimeError):
    """The watched workers could not be placed for the watch's timeout."""


_DONE = object()


def _rows(ds, watch: PlacementWatch | None, say: Callable[[str], None]):
    """``ds.iter_rows()``; with ``watch``, read in a thread while this one checks, every ``watch.period``
    seconds, that the cluster can still place a worker, and raises :class:`_Unplaceable` after ``watch.timeout``
    seconds without one. The reading thread is then stopped the way Ctrl-C would stop it (an exception raised
    in it while it waits for Ray Data's next row): Ray Data's iterator shuts its executor down on the way out,
    releasing the actors it was waiting for, so nothing keeps running after the stage has failed."""
    if watch is None:
        yield from ds.iter_rows()
        return
    import queue
    import threading

    rows: queue.Queue = queue.Queue(maxsize=64)

    def read() -> None:
        try:
            for row in ds.iter_rows():
                rows.put(row)
            rows.put(_DONE)
        except BaseException as err:  # noqa: BLE001 - handed to the consuming thread
            with contextlib.suppress(queue.Full):
                rows.put_nowait(err)

    reader = threading.Thread(target=read, name="alm-stage-rows", daemon=True)
    reader.start()
    lost_since: float | None = None
    while True:
        try:
            item = rows.get(timeout=watch.period)
        except queue.Empty:
            if placeable(watch.need) > 0:
                lost_since = None
                continue
            now = time.monotonic()
            if lost_since is None:
                lost_since = now
                say(
                    f"no node of the Ray cluster can hold a {watch.what} now (needs "
                    f"{describe_resources(watch.need)}): waiting up to {watch.timeout:g} s for one to join"
                )
            elif now - lost_since >= watch.timeout:
                _stop(reader)
                raise _Unplaceable(watch.message(now - lost_since)) from None
            continue
        if item is _DONE:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


class _Stopped(BaseException):
    """Raised inside the reading thread of :func:`_rows` to end it."""


def _stop(reader, timeout: float = 30.0) -> None:
    """End ``reader`` (a thread iterating a Ray Dataset) by raising :class:`_Stopped` in it, and wait for it."""
    import ctypes

    if reader.ident is not None and reader.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(reader.ident), ctypes.py_object(_Stopped))
        reader.join(timeout)


def finished_shards(
    dataset: type[ShardedDataset], root: PathLike, num_shards: int, error: type[Exception]
) -> list[store.ShardInfo]:
    """Every shard of ``root`` after a run (markers and sizes); raises ``error`` naming a shard that is not
    there."""
    try:
        return dataset.finished_shards(root, num_shards)
    except store.CacheIntegrityError as err:
        raise error(f"{err} after the run") from None


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and its causes, outermost first. Ray wraps a task's exception in a ``RayTaskError`` that is
    also an instance of the original class (its message: the remote traceback) and keeps the original in
    ``.cause``; so the deepest match of a class is the original exception with its own message."""
    chain: list[BaseException] = []
    seen: BaseException | None = err
    while seen is not None and len(chain) < 50:
        chain.append(seen)
        seen = getattr(seen, "cause", None) or seen.__cause__ or seen.__context__
    return chain


def root_cause_message(err: BaseException, stage_error: type[Exception]) -> str:
    """The message of the deepest of our own errors (or ``stage_error``) in ``err``'s chain of causes."""
    ours = [e for e in _chain(err) if isinstance(e, (*_OUR_ERRORS, ShardAttemptError, stage_error))]
    if ours:
        return str(ours[-1])
    return f"{type(err).__name__}: {err}"
