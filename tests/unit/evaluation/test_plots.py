"""Plots (alm_pipeline.evaluation.plots) of a run from a metrics.csv without evaluations, and of an evaluation
folder's model × metric table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alm_pipeline.evaluation.plots import PlotError, plot_run, run_figures
from alm_pipeline.evaluation.table import ResultTable
from tests.factories import png_size


def test_plot_without_evaluations(tmp_path):
    # metrics.csv of a next-token-only run and no eval.json: only the loss plot, and the reasons
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.csv").write_text("step,loss,loss_ntp\n1,2.5,2.5\n2,2.0,2.0\n")
    result = plot_run(bare)
    assert [p.name for p in result.files] == ["loss.png"] and result.rows == 2
    assert set(result.skipped) == {"chunk_agreement", "bits_per_byte", "eval_table"}
    assert png_size(result.files[0]) == (900, 540)
    with pytest.raises(PlotError, match="no metrics.csv"):
        plot_run(tmp_path)
    (tmp_path / "metrics.csv").write_text("step,loss\n")
    with pytest.raises(PlotError, match="no rows yet"):
        plot_run(tmp_path)


def test_eval_table_plot(tmp_path):
    """An evaluation folder (eval.json, no metrics.csv): one panel per metric family, a group of bars per column
    of the family, one bar per model at the table's value (no bar where a model has none)."""
    table = ResultTable()
    for model, offset in (("teacher", 0.0), ("student", 0.5)):
        table.add(model, "bits_per_byte/plays", 1.5 + offset)
        table.add(model, "bits_per_byte/maths", 1.0 + offset)
    table.add("student", "binarised_kl/bytes", 0.02)
    (tmp_path / "eval.json").write_text(json.dumps({"table": table.to_json()}))
    figures, skipped, rows = run_figures(tmp_path)
    assert list(figures) == ["eval_table"] and not skipped and rows == 0
    bpb_ax, kl_ax = figures["eval_table"].axes
    assert [t.get_text() for t in bpb_ax.get_xticklabels()] == ["plays", "maths"]
    heights = [[p.get_height() for p in c.patches] for c in bpb_ax.containers]
    np.testing.assert_array_equal(heights, [[1.5, 1.0], [2.0, 1.5]])
    assert [c.get_label() for c in bpb_ax.containers] == ["teacher", "student"]
    (kl,) = kl_ax.containers  # only the student has a value there
    assert kl.get_label() == "student" and [p.get_height() for p in kl.patches] == [0.02]
    result = plot_run(tmp_path)
    assert [p.name for p in result.files] == ["eval_table.png"]
