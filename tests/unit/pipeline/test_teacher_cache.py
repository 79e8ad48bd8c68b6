"""Teacher-cache settings (alm_pipeline.pipeline.teacher_cache) without Ray: the top-k approximation is part of
the cache identity."""

from __future__ import annotations

import json

import pytest

from alm_pipeline.pipeline.corpus import CorpusConfig
from alm_pipeline.pipeline.ray_utils import RayConfig
from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, TeacherCacheError, build_teacher_cache


def test_topk_cache_is_not_mixed_with_an_exact_one(tmp_path, gpt2_bl_model):
    """The approximation is part of the cache identity: an exact cache refuses a topk run and vice versa."""
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"id": "a", "text": "some text"}) + "\n")
    out = tmp_path / "cache"
    out.mkdir()
    base = {
        "teacher": str(gpt2_bl_model),
        "corpus": CorpusConfig(path=str(data), id_field="id"),
        "output": str(out),
        "engine": "vllm",
        "ray": RayConfig(num_cpus=2),
    }
    exact = TeacherCacheConfig(**base)
    topk = TeacherCacheConfig(**base, boundary_mode="topk", boundary_topk=8)
    assert topk.identity_settings()["boundary_mode"] == "topk:8"
    assert "boundary_mode" not in exact.identity_settings()
    # an existing exact manifest with the same corpus/teacher: the topk run is refused before scoring
    manifest = {
        "kind": "alm-teacher-cache",
        "format_version": 1,
        "state": "in_progress",
        "identity": {"settings": exact.identity_settings()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        TeacherCacheError, match=r"settings\.boundary_mode: cache has None, this run has 'topk:8'"
    ):
        build_teacher_cache(topk)
