"""Helpers for the config dataclasses of every stage (teacher cache, align, train, evaluate, quickstart).

A config field carries its default and its help text once, through :func:`option`; the command line is generated
from those fields (:mod:`alm_pipeline.cli.options`), so the Python API and the CLI accept the same settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["option"]


def option(default: Any = dataclasses.MISSING, help: str = "", cli: str | None = None, **kw: Any) -> Any:  # noqa: A002
    """A dataclass field with its help text, and its CLI option name when that differs from the field name
    (``kw``: other :func:`dataclasses.field` arguments, e.g. ``default_factory``)."""
    metadata: dict[str, Any] = {"help": help}
    if cli is not None:
        metadata["cli"] = cli
    return dataclasses.field(default=default, metadata=metadata, **kw)
