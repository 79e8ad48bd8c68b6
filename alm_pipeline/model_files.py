"""Checking, before any work, that a model folder will load: its config and the headers of its weight files.

A teacher folder holding only a tokenizer, or a truncated ``model.safetensors``, used to fail only once a Ray
actor tried to load it, as an ``ActorDiedError`` deep in the log. :func:`check_model` reads what loading needs
first, cheaply (no weights are read): ``config.json`` through ``AutoConfig``, and every safetensors file's header,
which lists each tensor's byte range, against the file's size (a truncated or corrupt file fails here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["ModelFilesError", "check_model"]

# what AutoModelForCausalLM.from_pretrained reads, in the order it looks for them
_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_BIN = "pytorch_model.bin"
_TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


class ModelFilesError(ValueError):
    """A model cannot be loaded; the message names the folder or file and what is wrong."""


def check_model(path: str | os.PathLike[str], what: str = "model") -> None:
    """Raise :class:`ModelFilesError` (``what`` names the setting, e.g. ``--teacher``) unless ``path`` is a model
    whose config loads and, for a local folder, whose weight files are there with intact headers. A name that is
    not a local folder (a hub id) only needs its config to load."""
    from transformers import AutoConfig

    text = os.fspath(path)
    root = Path(text)
    if root.exists() and not root.is_dir():
        raise ModelFilesError(f"{what} {text}: is a file; give the model's folder")
    try:
        AutoConfig.from_pretrained(text)
    except Exception as err:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        if root.is_dir() and not (root / "config.json").exists():
            raise ModelFilesError(
                f"{what} {text}: not a model folder (no config.json; a folder with only a tokenizer cannot be "
                "loaded as a model)"
            ) from None
        raise ModelFilesError(f"{what} {text}: cannot load its config ({_first_line(err)})") from None
    if root.is_dir():
        for f in _weight_files(root, what):
            if f.name.endswith(".safetensors"):
                _check_safetensors(f, what)


def _weight_files(root: Path, what: str) -> list[Path]:
    for index_name in (_SAFETENSORS_INDEX, _TORCH_BIN_INDEX):
        index = root / index_name
        if index.exists():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise ModelFilesError(f"{what}: {index} is unreadable ({_first_line(err)})") from None
            files = [root / name for name in names]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelFilesError(
                    f"{what}: {index} lists weight files that are missing: {', '.join(missing)}"
                )
            return files
    for name in (_SAFETENSORS, _TORCH_BIN):
        if (root / name).is_file():
            return [root / name]
    raise ModelFilesError(
        f"{what} {root}: no weights ({_SAFETENSORS}, {_SAFETENSORS_INDEX}, {_TORCH_BIN} or {_TORCH_BIN_INDEX})"
    )


def _check_safetensors(path: Path, what: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError
        raise ModelFilesError(f"{what}: {path} is corrupt or truncated ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
