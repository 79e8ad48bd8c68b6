"""Helpers for the config dataclasses of every stage (teacher cache, align, train, evaluate, quickstart).

A config field carries its default and its help text once, through :func:`option`; the command line is generated
from those fields (:mod:`alm_pipeline.cli.options`), so the Python API and the CLI accept the same settings.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

__all__ = ["check_choice", "check_int", "check_number", "check_positive", "option"]


def option(default: Any = dataclasses.MISSING, help: str = "", cli: str | None = None, **kw: Any) -> Any:  # noqa: A002
    """A dataclass field with its help text, and its CLI option name when that differs from the field name
    (``kw``: other :func:`dataclasses.field` arguments, e.g. ``default_factory``)."""
    metadata: dict[str, Any] = {"help": help}
    if cli is not None:
        metadata["cli"] = cli
    return dataclasses.field(default=default, metadata=metadata, **kw)


def check_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming the setting unless ``value`` is an integer ``>= minimum`` (or None, if
    allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_number(
    name: str, value: Any, low: float, high: float | None = None, allow_none: bool = False
) -> None:
    """Raise ``ValueError`` naming the setting unless ``value`` is a finite number in ``[low, high]`` (``high``
    None: no upper bound), or None if allowed."""
    if value is None and allow_none:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (high is not None and value > high):
        bound = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")


def check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming the setting unless ``value`` is a finite number ``> 0`` (or None, if
    allowed)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_file(name: str, value: str | None) -> None:
    """Raise ``ValueError`` naming the setting when ``value`` is given and is not an existing local file."""
    if value is not None and not os.path.isfile(os.path.expanduser(str(value))):
        raise ValueError(f"{name} {value}: no such file")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the setting unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
