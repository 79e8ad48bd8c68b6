"""The trainer's error type."""

from __future__ import annotations

__all__ = ["TrainingError"]


class TrainingError(RuntimeError):
    """Training could not start or failed; the message names the cause."""
