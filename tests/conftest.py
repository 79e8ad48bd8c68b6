"""Shared fixtures: tiny real tokenizers and models (session-scoped, built once), and one local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests import factories  # noqa: E402

TOKENIZER_KINDS = ["byte_level", "byte_level_small", "sentencepiece", "char"]


@pytest.fixture(scope="session")
def assets_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("assets")


@pytest.fixture(scope="session")
def tokenizer_dirs(assets_dir) -> dict[str, Path]:
    """One saved Hugging Face tokenizer directory per kind (plus the built-in ``bytes``)."""
    return {kind: factories.make_tokenizer(kind, assets_dir / f"tok_{kind}") for kind in TOKENIZER_KINDS}


@pytest.fixture(scope="session")
def llama_sp_model(assets_dir, tokenizer_dirs) -> Path:
    """Tiny Llama with a SentencePiece-style tokenizer (BOS, dummy prefix, byte fallback)."""
    return factories.make_model("llama", tokenizer_dirs["sentencepiece"], assets_dir / "llama_sp")


@pytest.fixture(scope="session")
def gpt2_bl_model(assets_dir, tokenizer_dirs) -> Path:
    """Tiny GPT-2 with a byte-level BPE tokenizer (no BOS)."""
    return factories.make_model("gpt2", tokenizer_dirs["byte_level"], assets_dir / "gpt2_bl")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (2 logical CPUs, small object store)."""
    import ray

    from alm_pipeline.pipeline.ray_utils import RayConfig, ensure_ray

    ensure_ray(RayConfig(num_cpus=2, object_store_memory=512 * 1024**2))
    yield ray
    ray.shutdown()
