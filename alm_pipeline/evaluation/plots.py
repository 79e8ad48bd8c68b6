"""PNG plots of a training run, from what the run really writes: ``alm-pipeline plot RUN_DIR``.

* ``loss.png``: the training loss over optimizer steps, from ``RUN_DIR/metrics.csv``
  (:mod:`alm_pipeline.trainer.metrics`): ``loss`` and, when the run has them, its parts ``loss_alm`` and
  ``loss_ntp`` (every column whose name starts with ``loss``), one line each;
* ``chunk_agreement.png``: ``mean_abs_chunk_logprob_diff`` over steps (ALM runs): the training batches' mean
  ``|C_S − C_T|`` in nats per chunk. Not written when ``metrics.csv`` has no value in that column;
* ``bits_per_byte.png``: the bits per byte that ``alm-pipeline evaluate --run-dir DIR`` wrote to
  ``DIR/eval.json``, for every ``eval.json`` of the run (in ``RUN_DIR``, its ``final/`` folder and its complete
  checkpoints), each placed at the training step of the model it evaluated (the ``trainer_state.json`` of
  that model's folder, else of the folder holding the ``eval.json``). One line per text source (the ``--data``
  corpus; the teacher cache's texts with ``--cache-texts``), and the teacher's bits per byte read from the
  cache (``--cache``) as a dashed line. Not written when no ``eval.json`` holds a student's bits per byte;
* ``eval_table.png``: the model × metric table of ``RUN_DIR/eval.json`` (``alm-pipeline evaluate --run-dir
  RUN_DIR``, any number of ``--model``): one panel per metric family (bits per byte, chunk agreement, ...), a
  group of bars per domain / aligned set / task, one bar per model. Not written when ``RUN_DIR`` has no
  ``eval.json`` with a table. A folder holding only an ``eval.json`` (no ``metrics.csv``) gets just this plot.

:func:`run_figures` builds the figures (matplotlib's object API, no pyplot, no display, the process-wide
backend is left alone); :func:`plot_run` writes them, atomically.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alm_pipeline.evaluation.run import CACHE_TEXTS, EVAL_FILE
from alm_pipeline.evaluation.table import ResultTable, split_column
from alm_pipeline.trainer.checkpoint import FINAL_DIR, CheckpointError, checkpoint_step, list_checkpoints
from alm_pipeline.trainer.metrics import METRICS_FILE, read_metrics_csv

__all__ = ["PLOTS_DIR", "PlotError", "PlotResult", "plot_run", "run_figures"]

PLOTS_DIR = "plots"
CHUNK_DIFF_COLUMN = "mean_abs_chunk_logprob_diff"
TABLE_PLOT = "eval_table"


class PlotError(ValueError):
    """The run directory cannot be plotted; the message says why."""


@dataclass
class PlotResult:
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # plot name -> reason
    rows: int = 0

    def to_json(self) -> dict:
        return {"files": [str(f) for f in self.files], "skipped": self.skipped, "rows": self.rows}


@dataclass(frozen=True)
class _EvalPoint:
    step: int
    series: str  # the texts the student was evaluated on
    bits_per_byte: float


# ----------------------------------------------------------------------------------------------------------
# reading the run
# ----------------------------------------------------------------------------------------------------------


def _metrics_columns(run: Path) -> dict[str, np.ndarray]:
    """``metrics.csv`` as float columns (empty cells are NaN), with at least one row, ``step`` and ``loss``."""
    metrics_file = run / METRICS_FILE
    if not metrics_file.is_file():
        raise PlotError(
            f"{run}: no {METRICS_FILE} here — is this a training run directory? (`alm-pipeline train` writes "
            f"{METRICS_FILE} into its output folder)"
        )
    try:
        rows = read_metrics_csv(metrics_file)
    except ValueError as err:
        raise PlotError(f"{metrics_file}: not a metrics file ({err})") from None
    if not rows:
        raise PlotError(f"{metrics_file}: no rows yet (the run has not finished a step)")
    names = [n for n in rows[0] if n]
    for required in ("step", "loss"):
        if required not in names:
            raise PlotError(f"{metrics_file}: no '{required}' column (columns: {', '.join(names)})")
    return {n: np.array([r.get(n, math.nan) for r in rows], dtype=np.float64) for n in names}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _step_of(model_path: Any, eval_dir: Path) -> int | None:
    """The training step of the model an ``eval.json`` evaluated (None when it is not a run's checkpoint)."""
    for folder in ([Path(model_path)] if isinstance(model_path, str) else []) + [eval_dir]:
        try:
            return checkpoint_step(folder)
        except (CheckpointError, KeyError, TypeError, ValueError):
            continue
    return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _eval_results(run: Path) -> tuple[list[_EvalPoint], dict[str, float]]:
    """Students' bits per byte at their training steps, and the teachers' (cache path → bits per byte), from
    every ``eval.json`` of the run."""
    folders = [run, run / FINAL_DIR] + [path for _, path in list_checkpoints(run)]
    points: dict[tuple[int, str], _EvalPoint] = {}
    teachers: dict[str, float] = {}
    for folder in folders:
        result = _read_json(folder / EVAL_FILE)
        if result is None:
            continue
        cache = result.get("cache") or {}
        teacher = _number(cache.get("bits_per_byte"))
        if teacher is not None:
            teachers[str(cache.get("path"))] = teacher
        for entry in (result.get("models") or {}).values():
            step = _step_of((entry.get("model") or {}).get("path"), folder)
            if step is None:
                continue
            parts = [(f"student on {d}", part) for d, part in (entry.get("bits_per_byte") or {}).items()]
            parts.append((f"student on the texts of {cache.get('path')}", entry.get(CACHE_TEXTS) or {}))
            for series, part in parts:
                value = _number(part.get("bits_per_byte"))
                if value is not None:
                    points[(step, series)] = _EvalPoint(step, series, value)
    return sorted(points.values(), key=lambda p: (p.series, p.step)), teachers


def _eval_table(folder: Path) -> ResultTable | None:
    """The model × metric table of ``folder/eval.json`` (None when there is none or it has no value)."""
    result = _read_json(folder / EVAL_FILE)
    if not result or not isinstance(result.get("table"), dict):
        return None
    table = ResultTable.from_json(result["table"])
    has_value = any(v is not None for row in table.rows.values() for v in row.values())
    return table if has_value else None


# ----------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------


def _figure(title: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), layout="tight")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _curves_figure(cols: dict[str, np.ndarray], names: list[str], title: str, ylabel: str):
    """One line per column over ``step`` (finite values only), or None when no column has a value."""
    steps = cols["step"]
    fig, ax = _figure(title, ylabel)
    drawn = 0
    for name in names:
        ok = np.isfinite(cols[name]) & np.isfinite(steps)
        if ok.any():
            ax.plot(
                steps[ok], cols[name][ok], label=name, linewidth=1.2, marker="." if ok.sum() < 30 else None
            )
            drawn += 1
    if not drawn:
        return None
    ax.legend(loc="best")
    return fig


def _bits_per_byte_figure(points: list[_EvalPoint], teachers: dict[str, float], title: str):
    if not points:
        return None
    fig, ax = _figure(title, "bits per byte")
    for series in dict.fromkeys(p.series for p in points):
        mine = [p for p in points if p.series == series]
        ax.plot(
            [p.step for p in mine],
            [p.bits_per_byte for p in mine],
            label=series,
            linewidth=1.2,
            marker="o",
            markersize=4,
        )
    for cache, value in teachers.items():
        ax.axhline(
            value, color="black", linestyle="--", linewidth=1, label=f"teacher on {cache} ({value:.4f})"
        )
    ax.legend(loc="best", fontsize="small")
    return fig


def _table_figure(table: ResultTable, title: str):
    """A grouped bar chart per metric family: x = the family's groups, one bar per model (same colour in every
    panel; no bar where the model has no value)."""
    from matplotlib.figure import Figure

    families: dict[str, list[str]] = {}
    for col in table.columns:
        family, _ = split_column(col)
        families.setdefault(family, []).append(col)
    models = list(table.rows)
    fig = Figure(figsize=(7.5, 1.0 + 3.2 * len(families)), layout="tight")
    axes = fig.subplots(len(families), 1, squeeze=False)[:, 0]
    width = 0.8 / max(len(models), 1)
    for ax, (family, cols) in zip(axes, families.items(), strict=True):
        x = np.arange(len(cols))
        for k, model in enumerate(models):
            values = [table.value(model, c) for c in cols]
            if all(v is None for v in values):
                continue  # the model has nothing in this panel: no legend entry either
            heights = np.array([np.nan if v is None else v for v in values])
            offset = (k - (len(models) - 1) / 2) * width
            ax.bar(x + offset, heights, width, label=model, color=f"C{k % 10}")  # one colour per model
        ax.set_xlim(-0.5, len(cols) - 0.5)
        ax.set_xticks(x, [split_column(c)[1] or family for c in cols])
        ax.set_ylabel(family)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[0].set_title(title)
    return fig


def run_figures(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str], int]:
    """The figures of a run (see the module docstring) by plot name, the reasons of the plots left out, and
    the number of metrics rows. Raises :class:`PlotError` when there is nothing to plot (no ``metrics.csv``
    and no ``eval.json`` table, no ``step``/``loss`` column, no rows)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install matplotlib") from None
    run = Path(run_dir)
    if not run.is_dir():
        raise PlotError(f"{run}: no such run directory")
    figures: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    table = _eval_table(run)
    if table is not None:
        figures[TABLE_PLOT] = _table_figure(table, f"evaluation — {run.name}")
    if table is not None and not (run / METRICS_FILE).is_file():
        return figures, skipped, 0  # an evaluation folder, not a training run
    cols = _metrics_columns(run)
    if table is None:
        skipped[TABLE_PLOT] = (
            f"no {EVAL_FILE} with a table in {run} (`alm-pipeline evaluate --run-dir {run}`)"
        )
    loss_cols = [c for c in cols if c.startswith("loss")]
    figures["loss"] = _curves_figure(cols, loss_cols, f"training loss — {run.name}", "loss")
    if figures["loss"] is None:
        skipped["loss"] = "no finite loss value"
    if CHUNK_DIFF_COLUMN in cols:
        figures["chunk_agreement"] = _curves_figure(
            cols, [CHUNK_DIFF_COLUMN], f"chunk agreement (training batches) — {run.name}", "nats per chunk"
        )
    if figures.get("chunk_agreement") is None:
        skipped["chunk_agreement"] = f"{METRICS_FILE} has no {CHUNK_DIFF_COLUMN} value (not an ALM run)"
    points, teachers = _eval_results(run)
    figures["bits_per_byte"] = _bits_per_byte_figure(points, teachers, f"bits per byte — {run.name}")
    if figures["bits_per_byte"] is None:
        skipped["bits_per_byte"] = (
            f"no {EVAL_FILE} with a student's bits per byte in the run, its {FINAL_DIR}/ or its checkpoints "
            f"(`alm-pipeline evaluate --model CHECKPOINT --data ... --run-dir CHECKPOINT` writes one)"
        )
    return {k: v for k, v in figures.items() if v is not None}, skipped, len(cols["step"])


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)


def plot_run(run_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None) -> PlotResult:
    """Write the run's figures (:func:`run_figures`) as ``<name>.png`` into ``output_dir`` (default
    ``run_dir/plots``)."""
    figures, skipped, rows = run_figures(run_dir)
    out = Path(output_dir) if output_dir is not None else Path(run_dir) / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    result = PlotResult(skipped=skipped, rows=rows)
    for name, fig in figures.items():
        path = out / f"{name}.png"
        _save(fig, path)
        result.files.append(path)
    return result
