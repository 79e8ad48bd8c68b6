"""``alm-pipeline evaluate`` and ``alm-pipeline plot`` (alm_pipeline.cli.evaluate_cmd)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from alm_pipeline.cli.evaluate_cmd import evaluate, plot
from tests.factories import EVAL_TEXTS, reference_bits_per_byte, write_texts


def _write_metrics(run: Path) -> None:
    """A metrics.csv with some of the trainer's columns (``metric_columns``)."""
    run.mkdir(parents=True, exist_ok=True)
    lines = ["step,loss,loss_alm,valid_chunks,lr,mean_abs_chunk_logprob_diff"]
    for step in range(1, 41):
        lines.append(f"{step},{2.0 / step:.5f},{1.5 / step:.5f},30,0.001,{1.0 / step:.5f}")
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_cli_evaluate_and_plot(gpt2_bl_model, tmp_path):
    app = typer.Typer()
    app.command("evaluate")(evaluate)
    app.command("plot")(plot)
    runner = CliRunner()
    data = write_texts(tmp_path / "d.jsonl", EVAL_TEXTS)
    res = runner.invoke(
        app, ["evaluate", "--model", str(gpt2_bl_model), "--data", str(data), "--max-length", "48"]
    )
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    expected, _, _ = reference_bits_per_byte(gpt2_bl_model, EVAL_TEXTS, 48)
    assert result["data"]["bits_per_byte"] == pytest.approx(expected, rel=1e-6)
    assert result["model"]["lm_head"] == "sliced" and "BOS" in result["convention"]

    res = runner.invoke(app, ["evaluate", "--data", str(data)])
    assert res.exit_code == 2 and "needs a model" in res.stderr

    run = tmp_path / "run"
    _write_metrics(run)
    res = runner.invoke(app, ["plot", str(run)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["chunk_agreement.png", "loss.png"]
    assert "skipped bits_per_byte.png" in res.stderr
    res = runner.invoke(app, ["plot", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "no such run directory" in res.stderr
    assert np.isfinite(result["data"]["bits_per_byte"])
