"""The student forward (alm_pipeline.trainer.forward): fused token statistics, logits, packed attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alm_pipeline.cache.aligned import open_aligned_set
from alm_pipeline.pipeline.byteview import load_byte_view
from alm_pipeline.trainer.data import build_micro_batch, plan_micro_batches
from alm_pipeline.trainer.forward import StudentForward, micro_batch_token_stats
from alm_pipeline.trainer.runtime import read_aligned_rows


def _stats_and_grads(fn, kw, ids, boundary, mask, softcap, tensors, objective):
    """``fn``'s token statistics of fresh leaf copies of ``tensors`` (hidden, LM-head weight, bias) and the
    gradients of ``objective(stats)`` with respect to them."""
    hidden, weight, bias = (t.clone().requires_grad_() for t in tensors)
    st = fn(
        ids,
        boundary,
        hidden_states=hidden,
        lm_head_weight=weight,
        lm_head_bias=bias,
        attention_mask=mask,
        logit_softcap=softcap,
        slice_size=4,
        **kw,
    )
    objective(st).backward()
    return st, hidden.grad, weight.grad, bias.grad


@pytest.mark.parametrize("keep_probs", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_token_stats_equal_reference_values_and_gradients(keep_probs, softcap):
    """The trainer's fused LM-head statistics = loss.student_token_stats, forward and backward (padding, padded
    vocabulary rows, LM-head bias, soft-capping, several slices)."""
    from alm_pipeline.trainer.loss import student_token_stats
    from alm_pipeline.trainer.token_stats import fused_token_stats

    gen = torch.Generator().manual_seed(0)
    bsz, seq, hid, vocab = 3, 11, 16, 37
    ids = torch.randint(0, vocab, (bsz, seq), generator=gen)
    mask = torch.ones(bsz, seq, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 3:] = False
    boundary = torch.rand(vocab, generator=gen) < 0.4
    hidden0 = torch.randn(bsz, seq, hid, generator=gen, dtype=torch.float64)
    weight0 = torch.randn(vocab + 5, hid, generator=gen, dtype=torch.float64)  # 5 padded vocabulary rows
    bias0 = torch.randn(vocab + 5, generator=gen, dtype=torch.float64)
    w_lp = torch.randn(bsz, seq, generator=gen, dtype=torch.float64)
    w_sig = torch.randn(bsz, seq, generator=gen, dtype=torch.float64)
    results = [
        _stats_and_grads(
            fn,
            kw,
            ids,
            boundary,
            mask,
            softcap,
            (hidden0, weight0, bias0),
            lambda st: (st.token_logprob * w_lp).sum() + (st.boundary_logprob * w_sig).sum(),
        )
        for fn, kw in ((student_token_stats, {}), (fused_token_stats, {"keep_probs": keep_probs}))
    ]
    (ref, *ref_grads), (got, *got_grads) = results
    assert torch.equal(ref.token_mask, got.token_mask) and torch.equal(ref.position_mask, got.position_mask)
    torch.testing.assert_close(got.token_logprob.double(), ref.token_logprob.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        got.boundary_logprob.double(), ref.boundary_logprob.double(), atol=1e-5, rtol=1e-5
    )
    for g_ref, g_got in zip(ref_grads, got_grads, strict=True):
        torch.testing.assert_close(g_got.double(), g_ref.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("keep_probs", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_token_logprobs_without_sigma_equal_reference(keep_probs, softcap):
    """``boundary_logprobs=False`` (next-token training alone): no σ, and ℓ with its gradients as the reference
    (padding, padded vocabulary rows, bias, soft-capping, several slices)."""
    from alm_pipeline.trainer.loss import student_token_stats
    from alm_pipeline.trainer.token_stats import fused_token_stats

    gen = torch.Generator().manual_seed(1)
    bsz, seq, hid, vocab = 3, 11, 16, 37
    ids = torch.randint(0, vocab, (bsz, seq), generator=gen)
    mask = torch.ones(bsz, seq, dtype=torch.bool)
    mask[1, 5:] = False
    boundary = torch.rand(vocab, generator=gen) < 0.4
    tensors = (
        torch.randn(bsz, seq, hid, generator=gen, dtype=torch.float64),
        torch.randn(vocab + 5, hid, generator=gen, dtype=torch.float64),
        torch.randn(vocab + 5, generator=gen, dtype=torch.float64),
    )
    w_lp = torch.randn(bsz, seq, generator=gen, dtype=torch.float64)
    results = [
        _stats_and_grads(
            fn, kw, ids, boundary, mask, softcap, tensors, lambda st: (st.token_logprob * w_lp).sum()
        )
        for fn, kw in (
            (student_token_stats, {}),
            (fused_token_stats, {"keep_probs": keep_probs, "boundary_logprobs": False}),
        )
    ]
    (ref, *ref_grads), (got, *got_grads) = results
    assert got.boundary_logprob is None and ref.boundary_logprob is not None
    assert torch.equal(ref.token_mask, got.token_mask)
    torch.testing.assert_close(got.token_logprob.double(), ref.token_logprob.double(), atol=1e-5, rtol=1e-5)
    for g_ref, g_got in zip(ref_grads, got_grads, strict=True):
        torch.testing.assert_close(g_got.double(), g_ref.double(), atol=1e-4, rtol=1e-4)


def test_student_forward_matches_model_logits(self_aligned, gpt2_bl_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpt2_bl_model)
    view = load_byte_view(gpt2_bl_model)
    fwd = StudentForward(model, view.boundary_mask, slice_size=7)
    rows = read_aligned_rows(open_aligned_set(self_aligned).shard_files())
    ids = torch.as_tensor(rows.input_ids(0), dtype=torch.long)[None]
    assert fwd.self_check(ids) < 1e-4


def test_packed_rows_keep_attention_inside_each_document(self_aligned, gpt2_bl_model):
    """Rows packed with several documents (position ids restarting, no padding mask, as the worker runs them)
    give every document the log-probs and boundary log-probs it gets when run alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpt2_bl_model).eval()
    fwd = StudentForward(model, load_byte_view(gpt2_bl_model).boundary_mask, slice_size=16)
    rows = read_aligned_rows(open_aligned_set(self_aligned).shard_files())
    docs = np.arange(8)
    width = 3 * int(rows.lengths[docs].max())
    (layout,) = plan_micro_batches(rows.lengths[docs], max_tokens=10**6, packing=True, pack_length=width)
    assert max(len(row) for row in layout) >= 3  # the case under test: several documents per row
    mb = build_micro_batch(rows, docs, layout)
    assert mb.packed
    with torch.no_grad():
        lp, sigma = fwd(mb.input_ids, mb.attention_mask, position_ids=mb.position_ids)
        stats = micro_batch_token_stats(lp, sigma, mb)
        # the same rows under plain causal attention (documents see their predecessors in the row): must differ
        crossed, _ = fwd(mb.input_ids, mb.attention_mask, attention_mask=mb.attention_mask.long())
    later_docs = 0
    for r, row in enumerate(layout):
        col = 0
        for k, p in enumerate(row):
            n = int(rows.lengths[docs[p]])
            ids = torch.as_tensor(rows.input_ids(int(docs[p])), dtype=torch.long)[None]
            with torch.no_grad():
                alone_lp, alone_sigma = fwd(ids, torch.ones_like(ids, dtype=torch.bool))
            assert not stats.token_mask[r, col] and stats.token_mask[r, col + 1 : col + n].all()
            torch.testing.assert_close(
                stats.token_logprob[r, col + 1 : col + n], alone_lp[0, 1:], atol=1e-4, rtol=1e-4
            )
            torch.testing.assert_close(sigma[r, col : col + n], alone_sigma[0], atol=1e-4, rtol=1e-4)
            if k > 0:
                later_docs += 1
                assert (crossed[r, col + 1 : col + n] - alone_lp[0, 1:]).abs().max() > 1e-3
            col += n
    assert later_docs >= 2
