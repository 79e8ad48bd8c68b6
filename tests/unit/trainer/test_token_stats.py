"""Student token statistics on peaked distributions (issue 13, defect 1): the boundary log-probability σ from −1
down to −300 — through the range where fp32 ``exp`` underflows (σ < ≈ −88: subnormal / 0 probabilities, σ <
≈ −103: exactly 0) — must stay finite with finite, correct gradients, on both the reference and the fused path.
Both are checked against an independent fp64 computation (``torch.logsumexp`` over the boundary ids)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alm_pipeline.trainer.token_stats import fused_token_stats, student_token_stats

# target σ per position: ordinary, around the fp32 exp limits (−87.3 smallest normal, −103.3 smallest subnormal)
SIGMAS = [-1.0, -5.0, -20.0, -50.0, -80.0, -87.0, -88.0, -89.0, -92.0, -95.0, -100.0, -102.0]
SIGMAS += [-103.0, -104.0, -105.0, -110.0, -130.0, -150.0, -200.0, -250.0, -300.0]
VOCAB = 16
BOUNDARY = torch.tensor([i % 3 == 0 for i in range(VOCAB)])  # 6 boundary tokens: 0, 3, 6, 9, 12, 15
PEAK = 1  # a non-boundary token that takes almost all the mass


def _peaked_head(seed: int = 0):
    """A tiny LM head (``hidden = VOCAB`` dims, weight ≈ identity, with a bias) and one sequence of hidden states
    whose logits put the boundary tokens near 0 and the PEAK token far above them, so that position t has
    σ ≈ SIGMAS[t]. The tokens to predict include boundary tokens (ℓ ≈ σ, as peaked) and the peak itself."""
    gen = torch.Generator().manual_seed(seed)
    seq = len(SIGMAS)
    logits = torch.randn(seq, VOCAB, generator=gen)
    logits[:, ~BOUNDARY] -= 2.0
    for t, s in enumerate(SIGMAS):
        # σ = lse_B − lse: the peak logit that makes lse = lse_B − σ, given the mass R of all other tokens
        row = logits[t].double()
        lse_b = torch.logsumexp(row[BOUNDARY], 0).item()
        rest = torch.logsumexp(torch.cat([row[:PEAK], row[PEAK + 1 :]]), 0).item()
        logits[t, PEAK] = lse_b - s + math.log1p(-math.exp(rest - lse_b + s))
    weight = torch.eye(VOCAB) + 0.01 * torch.randn(VOCAB, VOCAB, generator=gen)
    bias = 0.1 * torch.randn(VOCAB, generator=gen)
    # hidden such that weight @ h + bias = logits (then rounded to fp32: the reference uses the same fp32 inputs)
    hidden = torch.linalg.solve(weight.double(), (logits - bias).double().T).T.float()
    ids = torch.randint(0, VOCAB, (1, seq), generator=gen)
    ids[0, 1::3] = 0  # a boundary token: ℓ as small as σ
    ids[0, 2::3] = PEAK
    return ids, hidden[None], weight, bias


def _fp64_reference(ids, hidden, weight, bias, w_lp, w_sig):
    """Values and gradients from plain fp64 autograd on the full logits (independent of token_stats)."""
    h, w, b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    z = F.linear(h[0], w, b)  # [T, V]
    lse = torch.logsumexp(z, -1)
    sigma = torch.logsumexp(z[:, BOUNDARY.nonzero().squeeze(-1)], -1) - lse
    lp = torch.zeros(ids.shape[1], dtype=torch.float64)
    lp[1:] = z[:-1].gather(1, ids[0, 1:, None])[:, 0] - lse[:-1]
    ((lp * w_lp[0]).sum() + (sigma * w_sig[0]).sum()).backward()
    return lp.detach(), sigma.detach(), h.grad, w.grad, b.grad


def test_the_head_is_as_peaked_as_intended():
    ids, hidden, weight, bias = _peaked_head()
    w = torch.zeros(1, ids.shape[1], dtype=torch.float64)
    _, sigma, *_ = _fp64_reference(ids, hidden, weight, bias, w, w)
    torch.testing.assert_close(sigma, torch.tensor(SIGMAS, dtype=torch.float64), atol=0.05, rtol=0)


@pytest.mark.parametrize(
    ("path", "kw"),
    [
        ("reference", {"checkpoint_slices": True}),
        ("reference", {"checkpoint_slices": False}),
        ("fused", {"keep_probs": False}),
        ("fused", {"keep_probs": True}),
    ],
)
@pytest.mark.parametrize("slice_size", [4, 1024])
def test_peaked_distributions_values_and_gradients_match_fp64(path, kw, slice_size):
    ids, hidden0, weight0, bias0 = _peaked_head()
    gen = torch.Generator().manual_seed(1)
    w_lp = torch.randn(ids.shape, generator=gen, dtype=torch.float64)
    w_sig = torch.randn(ids.shape, generator=gen, dtype=torch.float64)
    ref_lp, ref_sigma, *ref_grads = _fp64_reference(ids, hidden0, weight0, bias0, w_lp, w_sig)

    fn = student_token_stats if path == "reference" else fused_token_stats
    hidden, weight, bias = (t.clone().requires_grad_() for t in (hidden0, weight0, bias0))
    st = fn(
        ids,
        BOUNDARY,
        hidden_states=hidden,
        lm_head_weight=weight,
        lm_head_bias=bias,
        slice_size=slice_size,
        **kw,
    )
    assert st.boundary_logprob.dtype == torch.float32
    assert torch.isfinite(st.boundary_logprob).all(), st.boundary_logprob
    assert torch.isfinite(st.token_logprob).all(), st.token_logprob
    # fp32 logits of magnitude ~300 carry ~3e-5 absolute rounding
    torch.testing.assert_close(st.boundary_logprob[0].double(), ref_sigma, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(st.token_logprob[0].double(), ref_lp, atol=2e-4, rtol=1e-5)

    ((st.token_logprob.double() * w_lp).sum() + (st.boundary_logprob.double() * w_sig).sum()).backward()
    for name, got, ref in zip(
        ("hidden", "weight", "bias"), (hidden.grad, weight.grad, bias.grad), ref_grads, strict=True
    ):
        assert torch.isfinite(got).all(), (name, got)
        torch.testing.assert_close(got.double(), ref, atol=5e-4, rtol=1e-3, msg=name)


def test_fused_under_bf16_autocast_stays_finite():
    """The trainer runs the LM head under bf16 autocast: logits are coarser, but σ and every gradient stay
    finite on the same peaked rows."""
    ids, hidden0, weight0, bias0 = _peaked_head()
    hidden, weight, bias = (t.clone().requires_grad_() for t in (hidden0, weight0, bias0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        st = fused_token_stats(
            ids, BOUNDARY, hidden_states=hidden, lm_head_weight=weight, lm_head_bias=bias, slice_size=5
        )
    assert torch.isfinite(st.boundary_logprob).all() and torch.isfinite(st.token_logprob).all()
    (st.boundary_logprob.sum() + st.token_logprob.sum()).backward()
    for g in (hidden.grad, weight.grad, bias.grad):
        assert torch.isfinite(g).all()


def test_fused_equals_reference_on_peaked_rows_with_softcap():
    """With soft-capping (logits in ±c) both paths agree; a large cap keeps the rows peaked."""
    ids, hidden0, weight0, bias0 = _peaked_head()
    results = []
    for fn, kw in ((student_token_stats, {}), (fused_token_stats, {"keep_probs": True})):
        hidden, weight, bias = (t.clone().requires_grad_() for t in (hidden0, weight0, bias0))
        st = fn(
            ids,
            BOUNDARY,
            hidden_states=hidden,
            lm_head_weight=weight,
            lm_head_bias=bias,
            logit_softcap=600.0,
            slice_size=7,
            **kw,
        )
        (st.boundary_logprob.sum() - 0.5 * st.token_logprob.sum()).backward()
        results.append((st.boundary_logprob, st.token_logprob, hidden.grad, weight.grad, bias.grad))
    assert torch.isfinite(results[1][0]).all() and results[1][0].min() < -150
    for got, ref in zip(results[1], results[0], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, atol=5e-4, rtol=1e-3)


@pytest.mark.parametrize("keep_probs", [False, True])
def test_fused_gradients_where_fp32_probabilities_are_subnormal(keep_probs):
    """σ in [−102, −1] only: σ itself was still finite there before the fix, but p(B) is subnormal for σ < −87,
    and the old backward's ``p / p(B)`` = ``p · exp(−σ)`` gave ``0 · ∞`` = NaN gradients."""
    ids, hidden0, weight0, bias0 = _peaked_head()
    n = SIGMAS.index(-102.0) + 1
    ids, hidden0 = ids[:, :n], hidden0[:, :n]
    w_sig = torch.ones(ids.shape, dtype=torch.float64)
    w_lp = torch.zeros(ids.shape, dtype=torch.float64)
    *_, ref_h, ref_w, ref_b = _fp64_reference(ids, hidden0, weight0, bias0, w_lp, w_sig)
    hidden, weight, bias = (t.clone().requires_grad_() for t in (hidden0, weight0, bias0))
    st = fused_token_stats(
        ids, BOUNDARY, hidden_states=hidden, lm_head_weight=weight, lm_head_bias=bias, keep_probs=keep_probs
    )
    assert torch.isfinite(st.boundary_logprob).all()
    st.boundary_logprob.sum().backward()
    for name, got, ref in zip(
        ("hidden", "weight", "bias"),
        (hidden.grad, weight.grad, bias.grad),
        (ref_h, ref_w, ref_b),
        strict=True,
    ):
        assert torch.isfinite(got).all(), (name, got)
        torch.testing.assert_close(got.double(), ref, atol=5e-4, rtol=1e-3, msg=name)
