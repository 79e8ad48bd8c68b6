"""PNG plots of a training run from its ``metrics.csv``: ``alm-pipeline plot RUN_DIR``.

* ``RUN_DIR/plots/loss.png``: the training loss over steps — the ``loss`` column and every other column whose
  name contains ``loss`` (e.g. ``alm_loss``, ``sft_loss``), one line each;
* ``RUN_DIR/plots/bits_per_byte.png``: every column whose name contains ``bits_per_byte`` or ``bpb`` (e.g.
  ``eval_bits_per_byte``) over steps, with markers (evaluation rows are sparse: empty cells are skipped), plus
  the teacher's bits per byte as a dashed line when ``RUN_DIR/eval.json`` (``alm-pipeline evaluate --cache …
  --run-dir RUN_DIR``) has it. Not written when ``metrics.csv`` has no such column.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, the process-wide backend is left
alone). Files are written atomically.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["PlotError", "PlotResult", "plot_run", "read_metrics"]

METRICS_FILE = "metrics.csv"
PLOTS_DIR = "plots"
EVAL_FILE = "eval.json"


class PlotError(ValueError):
    """The run directory cannot be plotted; the message says why."""


@dataclass
class PlotResult:
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # plot name -> reason
    rows: int = 0

    def to_json(self) -> dict:
        return {"files": [str(f) for f in self.files], "skipped": self.skipped, "rows": self.rows}


def _number(value: str | None) -> float:
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except ValueError:
        return math.nan


def read_metrics(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Columns of a ``metrics.csv`` as float arrays (empty or non-numeric cells become NaN)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            names = [n for n in (reader.fieldnames or []) if n]
            rows = list(reader)
    except FileNotFoundError:
        raise PlotError(f"{path}: no such file") from None
    return {n: np.array([_number(r.get(n)) for r in rows], dtype=np.float64) for n in names}


def _teacher_bits_per_byte(run_dir: Path) -> float | None:
    try:
        data = json.loads((run_dir / EVAL_FILE).read_text(encoding="utf-8"))
        value = float(data["cache"]["bits_per_byte"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if math.isfinite(value) else None


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)


def _figure(title: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), layout="tight")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def plot_run(run_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None) -> PlotResult:
    """Write ``loss.png`` and ``bits_per_byte.png`` for ``run_dir`` (see module docstring) into
    ``output_dir`` (default ``run_dir/plots``). Raises :class:`PlotError` with a clear message when there is
    nothing to plot (no ``metrics.csv``, no ``step``/``loss`` column, no rows)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install matplotlib") from None
    run = Path(run_dir)
    if not run.is_dir():
        raise PlotError(f"{run}: no such run directory")
    metrics_file = run / METRICS_FILE
    if not metrics_file.is_file():
        raise PlotError(
            f"{run}: no {METRICS_FILE} here — is this a training run directory? (`alm-pipeline train` writes "
            f"{METRICS_FILE} into its output folder)"
        )
    cols = read_metrics(metrics_file)
    if "step" not in cols:
        raise PlotError(f"{metrics_file}: no 'step' column (columns: {', '.join(cols) or 'none'})")
    if "loss" not in cols:
        raise PlotError(f"{metrics_file}: no 'loss' column (columns: {', '.join(cols)})")
    steps = cols["step"]
    result = PlotResult(rows=int(len(steps)))
    if len(steps) == 0:
        raise PlotError(f"{metrics_file}: no rows yet (the run has not finished a step)")
    out = Path(output_dir) if output_dir is not None else run / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)

    loss_cols = ["loss"] + [c for c in cols if c != "loss" and "loss" in c.lower()]
    fig, ax = _figure(f"training loss — {run.name}", "loss")
    drawn = 0
    for name in loss_cols:
        ok = np.isfinite(cols[name]) & np.isfinite(steps)
        if ok.any():
            ax.plot(
                steps[ok], cols[name][ok], label=name, linewidth=1.2, marker="." if ok.sum() < 30 else None
            )
            drawn += 1
    if drawn == 0:
        result.skipped["loss"] = "no finite loss value"
    else:
        ax.legend(loc="best")
        path = out / "loss.png"
        _save(fig, path)
        result.files.append(path)

    bpb_cols = [c for c in cols if "bits_per_byte" in c.lower() or "bpb" in c.lower()]
    teacher = _teacher_bits_per_byte(run)
    fig, ax = _figure(f"bits per byte — {run.name}", "bits per byte")
    drawn = 0
    for name in bpb_cols:
        ok = np.isfinite(cols[name]) & np.isfinite(steps)
        if ok.any():
            ax.plot(steps[ok], cols[name][ok], label=name, linewidth=1.2, marker="o", markersize=3)
            drawn += 1
    if drawn == 0:
        result.skipped["bits_per_byte"] = (
            f"{METRICS_FILE} has no bits-per-byte column with values"
            if not bpb_cols
            else f"the bits-per-byte columns ({', '.join(bpb_cols)}) are empty"
        )
    else:
        if teacher is not None:
            ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label=f"teacher ({teacher:.4f})")
        ax.legend(loc="best")
        path = out / "bits_per_byte.png"
        _save(fig, path)
        result.files.append(path)
    return result
