"""``alm-pipeline train --help`` documents the defaults; bad option combinations are usage errors."""

from __future__ import annotations


def test_cli_help_documents_defaults():
    import typer
    from typer.testing import CliRunner

    from alm_pipeline.cli.train_cmd import train

    app = typer.Typer()
    app.command("train")(train)
    app.command("other")(lambda: None)
    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0
    text = " ".join(out.output.split())
    for needle in (
        "binarised KL",
        "τ = 100",
        "as stored in the aligned set",
        "--next-token-loss",
        "--bf16",
        "--resume",
    ):
        assert needle in text, needle
    bad = CliRunner().invoke(app, ["train", "--student", "x"])
    assert bad.exit_code == 2 and "exactly one data source" in " ".join(bad.output.split())
    bad = CliRunner().invoke(app, ["train", "--aligned", "a", "--student", "x", "--strategy", "zero3"])
    assert bad.exit_code == 2 and "zero3" in bad.output
