"""Plots of a run (alm_pipeline.evaluation.plots) from a metrics.csv without evaluations."""

from __future__ import annotations

import pytest

from alm_pipeline.evaluation.plots import PlotError, plot_run
from tests.factories import png_size


def test_plot_without_evaluations(tmp_path):
    # metrics.csv of a next-token-only run and no eval.json: only the loss plot, and the reasons
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.csv").write_text("step,loss,loss_ntp\n1,2.5,2.5\n2,2.0,2.0\n")
    result = plot_run(bare)
    assert [p.name for p in result.files] == ["loss.png"] and result.rows == 2
    assert set(result.skipped) == {"chunk_agreement", "bits_per_byte"}
    assert png_size(result.files[0]) == (900, 540)
    with pytest.raises(PlotError, match="no metrics.csv"):
        plot_run(tmp_path)
    (tmp_path / "metrics.csv").write_text("step,loss\n")
    with pytest.raises(PlotError, match="no rows yet"):
        plot_run(tmp_path)
