"""Chunk agreement (alm_pipeline.evaluation.agreement): mean |C_S − C_T| and the chunk-level binarised KL of a
student against the teacher of an aligned set, checked against a plain torch/numpy computation on a tiny model
and a tiny aligned set."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alm_pipeline.evaluation.agreement import chunk_agreement
from alm_pipeline.evaluation.models import load_eval_model
from tests import factories


def _plain_agreement(model_dir, aligned_dir) -> tuple[float, float, float, int]:
    """(mean |C_S − C_T|, mean |(C_S+σ_S) − (C_T+σ_T)|, mean binarised KL, groups): the aligned set's Parquet
    shards read directly, one plain forward per document, fp32 log-softmax, σ over the tokens whose text starts
    with a space / newline / tab or that are special, KL(Bern(p) ‖ Bern(q)) of p = exp(C_T+σ_T), q = exp(C_S+σ_S)
    in float64."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    special = set(tok.all_special_ids)
    boundary = torch.tensor([i in special or p[0] in "ĠĊĉ" for i, p in enumerate(pieces)])
    abs_diff, abs_debiased, kl = [], [], []
    for shard in sorted((aligned_dir / "shards").glob("*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            ids = torch.tensor(row["input_ids"])
            with torch.no_grad():
                logp = model(ids[None]).logits[0].float().log_softmax(-1).double()
            ell = torch.zeros(len(ids), dtype=torch.float64)
            ell[1:] = logp[:-1].gather(1, ids[1:, None])[:, 0]
            sigma = torch.logsumexp(logp[:, boundary], dim=-1)
            for start, end, c_t, s_t in zip(
                row["chunk_start"],
                row["chunk_end"],
                row["teacher_chunk_logprob"],
                row["teacher_chunk_boundary_logprob"],
                strict=True,
            ):
                c_s = min(0.0, float(ell[start : end + 1].sum()))
                s_s = float(sigma[end])
                abs_diff.append(abs(c_s - c_t))
                abs_debiased.append(abs((c_s + s_s) - (c_t + s_t)))
                y_t, y_s = min(0.0, c_t + s_t), min(0.0, c_s + s_s)
                p, q = np.exp(y_t), np.exp(y_s)
                kl.append(p * (y_t - y_s) + (1 - p) * (np.log1p(-p) - np.log1p(-q)))
    return float(np.mean(abs_diff)), float(np.mean(abs_debiased)), float(np.mean(kl)), len(kl)


def test_agreement_matches_a_plain_computation(small_aligned, tokenizer_dirs, tmp_path):
    """Tokenizer transfer (a student with another tokenizer than the teacher's): both numbers equal a plain
    per-document computation; batching does not change them."""
    student_dir = factories.make_model("llama", tokenizer_dirs["byte_level_small"], tmp_path / "student")
    student = load_eval_model(str(student_dir), max_logit_elements=3000)
    result, info = chunk_agreement(student, str(small_aligned), batch_tokens=64)
    mean_abs, mean_abs_debiased, kl, groups = _plain_agreement(student_dir, small_aligned)
    assert result.groups == groups > result.docs > 0 and info["gamma"] == 0.1
    assert result.mean_abs_logprob_diff == pytest.approx(mean_abs, rel=1e-5)
    assert result.mean_abs_debiased_logprob_diff == pytest.approx(mean_abs_debiased, rel=1e-5)
    assert result.binarised_kl == pytest.approx(kl, rel=1e-4)  # ε = 1e-6 shift (module docstring)
    assert result.binarised_kl > 1e-5  # a random student disagrees (small at τ = 1: chunks are unlikely)
    one_doc_batches, _ = chunk_agreement(student, str(small_aligned), batch_tokens=1)
    assert one_doc_batches.binarised_kl == pytest.approx(result.binarised_kl, rel=1e-9)


def test_agreement_is_zero_for_the_teacher_itself(self_aligned, gpt2_bl_model):
    teacher = load_eval_model(str(gpt2_bl_model))
    result, _ = chunk_agreement(teacher, str(self_aligned))
    assert result.mean_abs_logprob_diff < 1e-4 and result.binarised_kl < 1e-6
    assert result.teacher_mean_chunk_logprob < -0.1
