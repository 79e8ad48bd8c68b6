"""Training checkpoints: a Hugging Face model folder plus the state needed to continue exactly.

Layout of one checkpoint (``<output>/checkpoints/checkpoint-000200/``)::

    config.json, model.safetensors, generation_config.json   the student (AutoModelForCausalLM.from_pretrained)
    tokenizer.json, tokenizer_config.json, ...                 its tokenizer (the aligned set's student tokenizer)
    student_info.json                                          how the student was built
    adapter_config.json, adapter_model.safetensors             LoRA runs only (base model + adapter)
    optimizer.pt                                               optimizer state (full, unsharded)
    scheduler.pt                                               learning-rate scheduler state
    trainer_state.json                                         step, data position, run settings; written LAST

A checkpoint counts only once ``trainer_state.json`` exists (it is written after everything else), so a run
killed while writing one resumes from the previous one. The model folder is a plain ``save_pretrained`` folder
(a merged one for LoRA in the final export), so vLLM can serve it as it is.

The run directory may be a local path or a URI (``s3://``, ``gs://``, ``file://``; :mod:`alm_pipeline.storage`):
the functions here take either and return local paths as :class:`~pathlib.Path` and everything else as
:class:`~alm_pipeline.storage.Location`. Checkpoints are always written to a local folder first; on object
storage :func:`publish_checkpoint` uploads one (``trainer_state.json`` last) and :func:`local_checkpoint` brings
one back to resume from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from alm_pipeline.cache.store import apply_umask, temporary_sibling
from alm_pipeline.storage import Location, location

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINTS_DIR",
    "FINAL_DIR",
    "TRAINER_STATE",
    "CheckpointError",
    "checkpoint_name",
    "checkpoint_step",
    "damaged_checkpoints",
    "export_final",
    "find_latest_checkpoint",
    "is_complete",
    "list_checkpoints",
    "load_training_state",
    "local_checkpoint",
    "publish_checkpoint",
    "read_trainer_state",
    "write_checkpoint",
]

CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
_TRAINING_ONLY = {OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE}
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the run that wants to continue from it."""


def identity_diffs(saved: dict, current: dict, recorded_only: bool = False) -> list[str]:
    """One ``"key: checkpoint X, this run Y"`` per setting of ``current`` that differs from the checkpoint's
    ``saved`` one (``recorded_only``: ignore settings the checkpoint did not record)."""
    return [
        f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}"
        for k, v in current.items()
        if (k in saved or not recorded_only) and saved.get(k) != v
    ]


def settings_differ(path: str | os.PathLike[str], diffs: list[str]) -> str:
    """The refusal to continue from the checkpoint ``path`` of a run with other settings (``diffs``)."""
    return (
        f"cannot continue from {path}: the run settings differ ({'; '.join(diffs)}); use the same settings, or "
        "start a new run (--overwrite or another --output)"
    )


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


PathOrUri = str | os.PathLike[str] | Location


def _public(loc: Location, given: PathOrUri | None = None, *parts: str) -> Path | Location:
    """What the functions here return for ``loc``: a ``Path`` when it is local (built from the caller's own
    ``given`` path when there is one, so relative paths stay relative), else the ``Location``."""
    if not loc.is_local:
        return loc
    if given is not None and not isinstance(given, Location):
        return Path(given).joinpath(*parts)
    return loc.local_path


def checkpoint_step(path: PathOrUri) -> int:
    return int(read_trainer_state(path)["step"])


def read_trainer_state(path: PathOrUri) -> dict:
    state_file = location(path) / TRAINER_STATE
    try:
        return json.loads(state_file.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a complete checkpoint (no {TRAINER_STATE})") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{state_file}: unreadable ({err})") from None


def _checkpoint_dirs(run_dir: PathOrUri) -> list[tuple[Location, Path | Location]]:
    """``(location, what to return)`` of every ``checkpoint-N`` folder under ``<run_dir>/checkpoints``."""
    root = location(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for info in root.list():
        entry = root.child(info)
        if info.type == pafs.FileType.Directory and _NAME.match(entry.name):
            found.append((entry, _public(entry, run_dir, CHECKPOINTS_DIR, entry.name)))
    return sorted(found, key=lambda e: e[0].name)


def list_checkpoints(run_dir: PathOrUri) -> list[tuple[int, Path | Location]]:
    """Complete checkpoints under ``<run_dir>/checkpoints`` as ``(step, path)``, oldest first."""
    found = []
    for entry, public in _checkpoint_dirs(run_dir):
        try:
            state = read_trainer_state(entry)
        except CheckpointError:
            continue
        if _files_problem(entry, state) is None:
            found.append((int(state["step"]), public))
    return sorted(found, key=lambda f: f[0])


def damaged_checkpoints(run_dir: PathOrUri) -> list[tuple[Path | Location, str]]:
    """Checkpoints under ``<run_dir>/checkpoints`` that have a ``trainer_state.json`` but fail the completeness
    check, as ``(path, what is wrong)``, oldest first. (A folder without ``trainer_state.json`` is a checkpoint
    whose writing was cut short, not a damaged one.)"""
    out = []
    for entry, public in _checkpoint_dirs(run_dir):
        if not (entry / TRAINER_STATE).exists():
            continue
        try:
            problem = _files_problem(entry, read_trainer_state(entry))
        except CheckpointError as err:
            problem = str(err)
        if problem is not None:
            out.append((public, problem))
    return out


def _file_sizes(root: Location) -> dict[str, int]:
    """Relative path -> size of every file under ``root`` (one listing, also on object stores)."""
    base = len(root.path.rstrip("/")) + 1
    return {i.path[base:]: int(i.size) for i in root.list(recursive=True) if i.type == pafs.FileType.File}


def _files_problem(root: Location, state: dict) -> str | None:
    """What makes the checkpoint at ``root`` incomplete (a listed file missing or of another size), or None."""
    if "step" not in state:
        return f"{TRAINER_STATE} records no step"
    listed = state.get("files") or {}
    sizes = _file_sizes(root) if listed else {}
    for name, size in listed.items():
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != size:
            return f"{name} has {sizes[name]} bytes, {TRAINER_STATE} recorded {size}"
    return None


def is_complete(path: PathOrUri) -> bool:
    """``trainer_state.json`` is there and every file it lists has its recorded size."""
    try:
        return _files_problem(location(path), read_trainer_state(path)) is None
    except CheckpointError:
        return False


def find_latest_checkpoint(run_dir: PathOrUri) -> Path | Location | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def _save_model_folder(bundle, path: Path, state_dict: dict | None, merge_lora: bool) -> None:
    """The student as a Hugging Face folder: :func:`save_student` (LoRA aware), or, with a gathered
    ``state_dict`` (FSDP), ``save_pretrained(state_dict=...)`` + tokenizer + student_info.json."""
    from alm_pipeline.trainer.student import save_student

    if state_dict is None:
        save_student(bundle, path, merge_lora=merge_lora)
        return
    path.mkdir(parents=True, exist_ok=True)
    bundle.model.save_pretrained(path, state_dict=state_dict)
    bundle.tokenizer.save_pretrained(path)
    (path / "student_info.json").write_text(json.dumps(bundle.info.to_dict(), indent=2) + "\n")


def write_checkpoint(
    path: str | os.PathLike[str],
    bundle,
    *,
    trainer_state: dict,
    optimizer_state: dict | None,
    scheduler_state: dict | None,
    model_state_dict: dict | None = None,
    rng_state: dict | None = None,
    merge_lora: bool = False,
) -> Path:
    """Write a checkpoint folder at ``path`` (created; must not hold another checkpoint)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / TRAINER_STATE).unlink(missing_ok=True)
    _save_model_folder(bundle, out, model_state_dict, merge_lora)
    if optimizer_state is not None:
        torch.save(optimizer_state, out / OPTIMIZER_FILE)
    if scheduler_state is not None:
        torch.save(scheduler_state, out / SCHEDULER_FILE)
    if rng_state is not None:
        torch.save(rng_state, out / RNG_FILE)
    apply_umask(out)  # safetensors writes its files 0600; outputs get the user's umask
    # sizes of everything else: a checkpoint copied (by Ray Train, to its storage) only in part is not complete
    files = {
        str(f.relative_to(out)): f.stat().st_size
        for f in sorted(out.rglob("*"))
        if f.is_file() and f.name != TRAINER_STATE and not f.name.startswith(".")
    }
    tmp = out / f".{TRAINER_STATE}.tmp"
    tmp.write_text(json.dumps({**trainer_state, "files": files}, indent=2, default=str) + "\n")
    os.replace(tmp, out / TRAINER_STATE)
    return out


def load_training_state(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """``{"trainer_state", "optimizer", "scheduler", "rng"}`` of a checkpoint (missing parts are ``None``)."""
    root = Path(path)
    state = read_trainer_state(root)

    def load(name: str):
        f = root / name
        if not f.exists():
            return None
        # tensors and plain data only: a checkpoint may come from someone else, and unpickling arbitrary
        # objects would run their code (torch's weights-only unpickler refuses every other global)
        try:
            return torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{f}: refused — it holds objects other than tensors and plain data, and loading them could run "
                f"code ({first}). Checkpoints written by alm-pipeline never do; do not resume from this one"
            ) from None

    return {
        "trainer_state": state,
        "optimizer": load(OPTIMIZER_FILE),
        "scheduler": load(SCHEDULER_FILE),
        "rng": load(RNG_FILE),
    }


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _export_local(src: Path, dest: Path) -> Path:
    """:func:`export_final` between local folders."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(dest)
    tmp.mkdir()  # the user's umask, as every output (mkdtemp would make it private)
    try:
        for entry in src.iterdir():
            if entry.name in _TRAINING_ONLY or entry.name.startswith("."):  # e.g. a lock file
                continue
            if entry.is_dir():
                shutil.copytree(
                    entry, tmp / entry.name, copy_function=lambda s, d: _link_or_copy(Path(s), Path(d))
                )
            else:
                _link_or_copy(entry, tmp / entry.name)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _model_files(root: Location) -> list[str]:
    """The files of a checkpoint's model folder (no optimizer/scheduler/RNG state, no hidden files)."""
    return sorted(
        rel
        for rel in _file_sizes(root)
        if rel.split("/")[0] not in _TRAINING_ONLY and not any(p.startswith(".") for p in rel.split("/"))
    )


def download_model_folder(checkpoint: PathOrUri, dest: str | os.PathLike[str]) -> Path:
    """Copy a checkpoint's model folder (without the training state) from any location to the local ``dest``."""
    src = location(checkpoint)
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    for rel in _model_files(src):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(src.join(rel).read_bytes())
    return out


def remove_tree(folder: Location) -> None:
    """Delete a folder and everything under it (nothing if it does not exist). An object store may still list
    a folder whose objects were just deleted; deleting it again is then not an error."""
    with contextlib.suppress(FileNotFoundError):
        folder.remove_tree()


def _upload_files(src: Path, names: list[str], dest: Location) -> None:
    for rel in names:
        dest.join(rel).write_bytes((src / rel).read_bytes())


def export_final(checkpoint: PathOrUri, dest: PathOrUri) -> Path | Location:
    """Publish a checkpoint's model folder (without optimizer/scheduler state) as ``dest``. Local to local:
    atomically (hard links where the filesystem allows, else copies). To object storage: the old ``dest`` is
    deleted, then each file is uploaded (one PUT each), ``config.json`` last. An existing ``dest`` is replaced."""
    src, target = location(checkpoint), location(dest)
    if src.is_local and target.is_local:
        return _export_local(Path(os.fspath(checkpoint)), Path(os.fspath(dest)))
    if target.is_local:
        with tempfile.TemporaryDirectory(prefix="alm-final-") as tmp:
            return _export_local(download_model_folder(src, Path(tmp) / "model"), Path(os.fspath(dest)))
    if src.is_local:
        return publish_folder(Path(os.fspath(checkpoint)), target)
    with tempfile.TemporaryDirectory(prefix="alm-final-") as tmp:
        return publish_folder(download_model_folder(src, Path(tmp) / "model"), target)


def publish_folder(src: str | os.PathLike[str], dest: PathOrUri) -> Path | Location:
    """A local model folder as ``dest`` (a URI, or a local path: then as :func:`export_final`), without the
    training state; on object storage ``config.json`` is uploaded last, so a folder with it is complete."""
    target = location(dest)
    if target.is_local:
        return _export_local(Path(src), Path(os.fspath(dest)))
    names = _model_files(location(Path(src)))
    remove_tree(target)
    _upload_files(Path(src), sorted(names, key=lambda n: (n == "config.json", n)), target)
    return target


def publish_checkpoint(src: str | os.PathLike[str], dest: PathOrUri) -> Location:
    """Upload the local checkpoint folder ``src`` to ``dest`` (replacing what is there), ``trainer_state.json``
    last: readers see it as complete only once every file it lists is there."""
    target = location(dest)
    names = sorted(_file_sizes(location(Path(src))))
    remove_tree(target)
    _upload_files(Path(src), sorted(names, key=lambda n: (n == TRAINER_STATE, n)), target)
    return target


def local_checkpoint(checkpoint: PathOrUri) -> Path:
    """A local folder holding the checkpoint, to resume from: itself when it is local, else a copy downloaded
    into a temporary folder of this process (deleted when the process exits; workers on one node download
    side by side without sharing a folder)."""
    import atexit

    from alm_pipeline.storage import local_copy

    loc = location(checkpoint)
    if loc.is_local:
        return loc.local_path if isinstance(checkpoint, Location) else Path(checkpoint)
    folder = tempfile.mkdtemp(prefix="alm-resume-")
    atexit.register(shutil.rmtree, folder, True)
    return local_copy(loc, folder)


def prune_checkpoints(run_dir: PathOrUri, keep: int | None) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (``None``: keep all)."""
    if keep is None or keep <= 0:
        return
    for _, path in list_checkpoints(run_dir)[:-keep]:
        if isinstance(path, Location):
            try:
                remove_tree(path)
            except OSError as err:
                logger.warning("could not delete the old checkpoint %s: %s", path, err)
        else:
            shutil.rmtree(path, ignore_errors=True)
