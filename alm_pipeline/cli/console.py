"""Console output shared by every command: progress lines and fatal errors (exit code 2)."""

from __future__ import annotations

import typer


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def say(message: str) -> None:
    typer.echo(f"[alm-pipeline] {message}", err=True)
