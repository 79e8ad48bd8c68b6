"""Per-step training metrics: ``metrics.csv``, TensorBoard event files, W&B (optional) and console progress.

One :class:`MetricsLogger` per run lives in the driver process (rank 0 of the workers sends it one row per
optimizer step). Rows are written as they arrive and flushed, so a killed run keeps every step it finished.
When a run continues from a checkpoint at step ``s`` (``--resume``, or Ray Train restarting failed workers),
rows after ``s`` are dropped from ``metrics.csv`` and TensorBoard is told to purge them, so every file holds
one curve without duplicated or stale steps.

A run directory on object storage (``s3://...``): the files are written to a local spool folder (a temporary
folder; what the run directory already holds is downloaded there first) and uploaded by :meth:`MetricsLogger.sync`
(the driver calls it after each checkpoint) and at :meth:`MetricsLogger.close`, so the bucket holds every step up
to the last checkpoint while the run goes on, and all of them at the end.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alm_pipeline.storage import Location, location

logger = logging.getLogger(__name__)

__all__ = ["METRICS_FILE", "TENSORBOARD_DIR", "MetricsLogger", "format_duration", "read_metrics_csv"]

METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return str(value)
        return f"{value:.8g}"
    return str(value)


def read_metrics_csv(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """The rows of a ``metrics.csv`` with numeric values (empty cells become NaN)."""
    out: list[dict[str, float]] = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out.append({k: float(v) if v not in ("", None) else math.nan for k, v in row.items()})
    return out


def _tensorboard_writer(logdir: Path, purge_step: int | None):
    from alm_pipeline.optional import MissingDependencyError, require

    try:  # small, no TensorFlow; a core dependency (and pulled in by ray[train])
        tensorboardx = require("tensorboardX", "TensorBoard event files (--tensorboard)")
    except MissingDependencyError as err:
        logger.warning("%s; writing metrics.csv only", err)
        return None
    return tensorboardx.SummaryWriter(logdir=str(logdir), purge_step=purge_step)


class _Console:
    """A progress bar on a terminal, one line every ``every`` steps (or 30 s) otherwise; always with ETA."""

    def __init__(self, total: int, start: int, every: int, stream=None, bar: bool | None = None):
        self.total = total
        self.start = start
        self.every = max(1, every)
        self.stream = stream or sys.stderr
        self.bar = None
        use_bar = bar if bar is not None else (hasattr(self.stream, "isatty") and self.stream.isatty())
        if use_bar:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=self.stream)
            except ImportError:  # pragma: no cover
                self.bar = None
        self.t0 = time.monotonic()
        self.last_print = 0.0
        self.last_step = start

    def update(self, row: dict) -> None:
        step = int(row["step"])
        done = step - self.start
        elapsed = time.monotonic() - self.t0
        rate = elapsed / done if done > 0 else math.nan
        eta = rate * (self.total - step)
        summary = f"loss {row['loss']:.5g}"
        if "loss_alm" in row and "loss_ntp" in row:
            summary += f" (alm {row['loss_alm']:.4g}, ntp {row['loss_ntp']:.4g})"
        summary += (
            f" | chunks {int(row['valid_chunks'])} | {row['tokens_per_s']:.0f} tok/s | lr {row['lr']:.3g}"
            f" | gnorm {row['grad_norm']:.3g}"
        )
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(summary, refresh=False)
            self.bar.refresh()
        else:
            now = time.monotonic()
            if (
                step == self.total
                or step % self.every == 0
                or step == self.start + 1
                or now - self.last_print > 30
            ):
                print(
                    f"[train] step {step}/{self.total} {summary} | {format_duration(elapsed)} elapsed, "
                    f"eta {format_duration(eta)}",
                    file=self.stream,
                    flush=True,
                )
                self.last_print = now
        self.last_step = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLogger:
    """Writes metric rows (dicts with at least ``step`` and ``loss``) to the run directory.

    Args:
        run_dir: the run's output directory (a local path or a URI); ``metrics.csv`` and ``tensorboard/`` go
            there.
        columns: the CSV columns, in order (``step`` first); extra keys in a row are ignored by the CSV (but
            still sent to TensorBoard / W&B), missing ones are left empty.
        total_steps: for the progress display.
        resume_step: the run continues after this step (rows with a larger step are dropped from the files);
            ``None`` or 0 for a fresh run (an existing ``metrics.csv`` is replaced).
        backfill: rows up to ``resume_step`` kept in the checkpoint, written where ``metrics.csv`` lacks them (a
            killed run can have checkpointed steps whose rows never reached the file).
        tensorboard: write TensorBoard event files.
        wandb: a W&B run config ``{"project": ..., "name": ..., "config": {...}}`` or ``None``.
        console: show progress on stderr (``log_every`` sets the line interval when stderr is not a terminal).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        columns: Sequence[str],
        *,
        total_steps: int,
        resume_step: int | None = None,
        backfill: Sequence[dict] | None = None,
        tensorboard: bool = True,
        wandb: dict | None = None,
        console: bool = True,
        log_every: int = 10,
        progress_bar: bool | None = None,
    ):
        if not columns or columns[0] != "step" or "loss" not in columns:
            raise ValueError("metrics columns must start with 'step' and include 'loss'")
        target = location(run_dir)
        # on object storage: a local spool folder, uploaded by sync()
        self.remote: Location | None = None if target.is_local else target
        if self.remote is None:
            self.run_dir = Path(run_dir)
        else:
            self.run_dir = Path(tempfile.mkdtemp(prefix="alm-metrics-"))
            self._download(resume_step or 0, bool(wandb))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.columns = list(columns)
        self.path = self.run_dir / METRICS_FILE  # the file written (in the spool folder for a URI)
        self.target: Path | Location = self.path if self.remote is None else self.remote / METRICS_FILE
        self.total_steps = total_steps
        self.last_step = resume_step or 0
        self._rows: list[dict] = []
        missing = self._open_csv(resume_step or 0, backfill or [])
        self._tb = (
            _tensorboard_writer(self.run_dir / TENSORBOARD_DIR, (resume_step or 0) + 1)
            if tensorboard
            else None
        )
        if self._tb is not None:
            for row in missing:
                self._tb_write(row)
        self._wandb = self._init_wandb(wandb) if wandb else None
        self._console = (
            _Console(total_steps, resume_step or 0, log_every, bar=progress_bar) if console else None
        )
        self.callbacks: list[Callable[[dict], None]] = []

    # ------------------------------------------------------------------ files
    def _download(self, resume_step: int, wandb: bool) -> None:
        """Bring what the remote run directory holds into the spool folder (a resumed run keeps its rows and
        TensorBoard events; W&B its run id)."""
        wanted = []
        if resume_step > 0:
            wanted += [METRICS_FILE, TENSORBOARD_DIR]
        if wandb:
            wanted.append(WANDB_ID_FILE)
        for name in wanted:
            src = self.remote / name
            base = len(src.path.rstrip("/")) + 1
            for info in src.list(recursive=True) if src.is_dir() else []:
                if info.is_file:
                    dest = self.run_dir / name / info.path[base:]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(src.child(info).read_bytes())
            if src.is_file():
                (self.run_dir / name).write_bytes(src.read_bytes())

    def sync(self) -> None:
        """Upload the spool folder's files to a remote run directory (nothing for a local one): metrics.csv,
        TensorBoard event files, the W&B run id. A failed upload is logged; the next sync retries."""
        if self.remote is None:
            return
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        self._upload()

    def _upload(self) -> None:
        names = [METRICS_FILE, WANDB_ID_FILE]
        tb = self.run_dir / TENSORBOARD_DIR
        if tb.is_dir():
            names += sorted(p.relative_to(self.run_dir).as_posix() for p in tb.rglob("*") if p.is_file())
        try:
            for name in names:
                if (self.run_dir / name).is_file():
                    self.remote.join(name).write_bytes((self.run_dir / name).read_bytes())
        except OSError as err:
            logger.warning("could not upload the metrics to %s: %s", self.remote, err)

    def _open_csv(self, keep_until: int, backfill: Sequence[dict] = ()) -> list[dict]:
        """Rewrite metrics.csv with its rows up to ``keep_until`` (plus backfilled ones); returns the rows that
        were backfilled."""
        kept: list[dict] = []
        if keep_until > 0 and self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                for row in reader:
                    try:
                        if int(float(row["step"])) <= keep_until:
                            kept.append(row)
                    except (KeyError, TypeError, ValueError):
                        continue
        have = {int(float(r["step"])) for r in kept}
        missing = [
            r
            for r in sorted(backfill, key=lambda r: r["step"])
            if int(r["step"]) <= keep_until and int(r["step"]) not in have
        ]
        kept = sorted(
            kept + [{k: _fmt(v) for k, v in r.items()} for r in missing], key=lambda r: int(float(r["step"]))
        )
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in kept:
            writer.writerow({k: row.get(k, "") for k in self.columns})
        tmp = self.path.with_suffix(".csv.tmp")
        tmp.write_text(buf.getvalue())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", newline="")  # noqa: SIM115 - kept open for the run
        self._csv = csv.DictWriter(
            self._file, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n"
        )
        return missing

    def _tb_write(self, row: dict) -> None:
        step = int(row["step"])
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(f"train/{k}", float(v), global_step=step)
        self._tb.flush()

    def _init_wandb(self, spec: dict):
        from alm_pipeline.optional import require

        wandb = require("wandb", "W&B logging (--wandb-project)")
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        return wandb.init(
            project=spec.get("project"),
            name=spec.get("name"),
            config=spec.get("config"),
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
        )

    # ------------------------------------------------------------------ rows
    def log(self, row: dict) -> None:
        step = int(row["step"])
        if step <= self.last_step:
            # a restart from an earlier checkpoint replays steps: drop what it will rewrite
            self.rewind(step - 1)
        self._csv.writerow({k: _fmt(row.get(k, "")) for k in self.columns})
        self._file.flush()
        scalars = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            self._tb_write(row)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._console is not None:
            self._console.update(row)
        self._rows.append(dict(row))
        self.last_step = step
        for cb in self.callbacks:
            cb(row)

    def rewind(self, keep_until: int) -> None:
        """Forget rows after step ``keep_until`` (a restart from the checkpoint at that step)."""
        self._file.close()
        self._open_csv(keep_until)
        self._rows = [r for r in self._rows if int(r["step"]) <= keep_until]
        if self._tb is not None:
            self._tb.close()
            self._tb = _tensorboard_writer(self.run_dir / TENSORBOARD_DIR, keep_until + 1)
        self.last_step = keep_until

    @property
    def rows(self) -> list[dict]:
        return list(self._rows)

    def close(self) -> None:
        if self._console is not None:
            self._console.close()
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self.remote is not None and self.run_dir.exists():
            self._upload()
            shutil.rmtree(self.run_dir, ignore_errors=True)
