"""ALM loss (alm_pipeline.trainer.loss), and GradMag (alm_pipeline.trainer.gradmag) on a tiny Llama's ALM
and SFT losses.

References are independent plain-Python loops over positions / documents / groups (``math`` on floats);
comparisons run in float64. The model tests use a tiny random-weight Llama built from a config.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alm_pipeline.trainer.gradmag import (
    LossCombinationConfig,
    combine_losses,
)
from alm_pipeline.trainer.loss import (
    DISTANCES,
    ALMGroups,
    ALMLossConfig,
    alm_distance,
    alm_loss,
    log1mexp,
    next_token_loss,
    student_chunk_stats,
    student_token_stats,
)

V = 13  # student vocabulary (the model's head has 3 extra padded rows)
V_PADDED = V + 3
H = 8
LENGTHS = [9, 6, 4, 7]  # unpadded lengths; batch padded to 9
T = max(LENGTHS)
BOUNDARY = np.zeros(V, dtype=bool)
BOUNDARY[[0, 3, 4, 10]] = True
# per document: inclusive (start, end) student index ranges of its groups; document 2 has none
GROUPS = [
    [(0, 2), (3, 3), (4, 7), (8, 8)],
    [(1, 1), (2, 5)],
    [],
    [(0, 0), (1, 3), (4, 6)],
]


def _batch(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (len(LENGTHS), T), generator=g)
    attention_mask = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        attention_mask[i, :n] = 1
        input_ids[i, n:] = 0
    hidden = torch.randn(len(LENGTHS), T, H, generator=g, dtype=dtype)
    weight = (torch.randn(V_PADDED, H, generator=g, dtype=dtype) * 1.5).requires_grad_()
    hidden.requires_grad_()
    return input_ids, attention_mask, hidden, weight


def _documents(seed=1):
    rng = np.random.default_rng(seed)
    docs = []
    for i, groups in enumerate(GROUPS):
        docs.append(
            {
                "doc_id": f"d{i}",
                "chunk_start": [s for s, _ in groups],
                "chunk_end": [e for _, e in groups],
                "teacher_chunk_logprob": (-rng.gamma(2.0, 2.0, len(groups))).tolist(),
                "teacher_chunk_boundary_logprob": (-rng.gamma(1.0, 0.7, len(groups))).tolist(),
            }
        )
    return docs


def _groups64(docs) -> ALMGroups:
    g = ALMGroups.from_documents(docs, seq_lens=LENGTHS)
    # keep the teacher numbers in float64 for exact comparisons
    c = np.concatenate([np.asarray(d["teacher_chunk_logprob"], dtype=np.float64) for d in docs])
    s = np.concatenate([np.asarray(d["teacher_chunk_boundary_logprob"], dtype=np.float64) for d in docs])
    return ALMGroups(g.batch_index, g.start, g.end, torch.from_numpy(c), torch.from_numpy(s))


# ------------------------------------------------------------------------------------------------ references


def _ref_token_stats(logits: list, input_ids: list, length: int) -> tuple[list[float], list[float]]:
    """ℓ[v] (0 at v = 0) and σ[v] for one unpadded document, with explicit loops."""
    ell = [0.0] * length
    sigma = [0.0] * length
    for v in range(length):
        row = [float(x) for x in logits[v][:V]]
        m = max(row)
        lse = m + math.log(sum(math.exp(x - m) for x in row))
        lse_b = m + math.log(sum(math.exp(x - m) for x, b in zip(row, BOUNDARY, strict=True) if b))
        sigma[v] = min(lse_b - lse, 0.0)
        if v + 1 < length:
            ell[v + 1] = min(row[int(input_ids[v + 1])] - lse, 0.0)
    return ell, sigma


def _ref_distance(yt: float, ys: float, distance: str, tau: float, eps: float) -> float:
    if distance == "abs_tau_limit":
        return 2.0 / tau * abs(yt - ys)
    a, b = yt / tau - eps, ys / tau - eps
    if distance == "binary_kl_tau_limit":
        return a - b + a * math.log(b / a)
    p, q = math.exp(a), math.exp(b)
    if distance == "binary_tvd":
        return abs(p - q) + abs((1 - p) - (1 - q))
    if distance == "binary_ce":
        return -(p * math.log(q) + (1 - p) * math.log(1 - q))
    assert distance == "binary_kl"
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def _ref_loss(logits, input_ids, docs, cfg: ALMLossConfig, n_global: int | None = None):
    dists = []
    for i, doc in enumerate(docs):
        ell, sigma = _ref_token_stats(logits[i], input_ids[i], LENGTHS[i])
        for k in range(len(doc["chunk_start"])):
            s, e = doc["chunk_start"][k], doc["chunk_end"][k]
            c_s = 0.0
            for v in range(s, e + 1):
                if v >= 1:
                    c_s += ell[v]
            yt = doc["teacher_chunk_logprob"][k]
            ys = c_s
            if cfg.debias:
                yt += doc["teacher_chunk_boundary_logprob"][k]
                ys += sigma[e]
            dists.append(_ref_distance(yt, ys, cfg.distance, cfg.tau, cfg.eps))
    n = len(dists) if n_global is None else n_global
    return dists, sum(dists) / max(n, 1)


# ------------------------------------------------------------------------------------------------ token stats


def test_token_stats_match_python_loop():
    input_ids, am, hidden, weight = _batch()
    logits = hidden @ weight.T
    stats = student_token_stats(input_ids, BOUNDARY, logits=logits, attention_mask=am, slice_size=5)
    assert stats.token_logprob.dtype == torch.float64
    for i, n in enumerate(LENGTHS):
        ell, sigma = _ref_token_stats(logits[i].tolist(), input_ids[i].tolist(), n)
        np.testing.assert_allclose(stats.token_logprob[i, :n].detach().numpy(), ell, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(
            stats.boundary_logprob[i, :n].detach().numpy(), sigma, rtol=1e-12, atol=1e-12
        )
        assert (stats.token_logprob[i, n:] == 0).all() and (stats.boundary_logprob[i, n:] == 0).all()
        assert stats.token_mask[i].tolist() == [0 < v < n for v in range(T)]
        assert stats.position_mask[i].tolist() == [v < n for v in range(T)]
    assert (stats.token_logprob <= 0).all() and (stats.boundary_logprob <= 0).all()


@pytest.mark.parametrize("slice_size", [1, 4, 7, 1000])
@pytest.mark.parametrize("checkpoint_slices", [True, False])
def test_sliced_hidden_path_equals_full_logits_path(slice_size, checkpoint_slices):
    input_ids, am, hidden, weight = _batch()
    bias = torch.randn(V_PADDED, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(5)
    up_l = torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64)
    up_s = torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64)

    def run(**kw):
        st = student_token_stats(input_ids, BOUNDARY, attention_mask=am, logit_softcap=4.0, **kw)
        obj = (st.token_logprob * up_l).sum() + (st.boundary_logprob * up_s).sum()
        grads = torch.autograd.grad(obj, [hidden, weight, bias])
        return st, grads

    full, g_full = run(logits=F.linear(hidden, weight, bias), slice_size=10_000, checkpoint_slices=False)
    sliced, g_sliced = run(
        hidden_states=hidden,
        lm_head_weight=weight,
        lm_head_bias=bias,
        slice_size=slice_size,
        checkpoint_slices=checkpoint_slices,
    )
    torch.testing.assert_close(sliced.token_logprob, full.token_logprob, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sliced.boundary_logprob, full.boundary_logprob, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_sliced, g_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # padded vocabulary rows (>= V) take no part in the softmax
    assert (g_sliced[1][V:] == 0).all() and (g_sliced[2][V:] == 0).all()


@pytest.mark.parametrize("checkpoint_slices", [True, False])
def test_sliced_path_never_keeps_vocabulary_sized_activations(checkpoint_slices):
    """With checkpointing, autograd saves no [n, V] logits tensor for the backward pass (it recomputes one
    slice at a time); without it, the per-slice logits are kept (the check below would see them)."""
    vocab = 2000
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 16, H, generator=g, requires_grad=True)
    weight = torch.randn(vocab, H, generator=g, requires_grad=True)
    ids = torch.randint(0, vocab, (2, 16), generator=g)
    boundary = np.zeros(vocab, dtype=bool)
    boundary[::3] = True
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        st = student_token_stats(
            ids,
            boundary,
            hidden_states=hidden,
            lm_head_weight=weight,
            slice_size=4,
            checkpoint_slices=checkpoint_slices,
        )
        obj = st.token_logprob.sum() + st.boundary_logprob.sum()
    vocab_sized = [s for s in saved if len(s) == 2 and s[0] <= 4 and s[1] >= vocab // 3]
    assert bool(vocab_sized) is not checkpoint_slices
    obj.backward()
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_bf16_head_gives_fp32_stats():
    input_ids, am, hidden, weight = _batch(dtype=torch.float32)
    st16 = student_token_stats(
        input_ids,
        BOUNDARY,
        hidden_states=hidden.bfloat16(),
        lm_head_weight=weight.bfloat16(),
        attention_mask=am,
    )
    st32 = student_token_stats(
        input_ids, BOUNDARY, hidden_states=hidden, lm_head_weight=weight, attention_mask=am
    )
    assert st16.token_logprob.dtype == torch.float32 and st16.boundary_logprob.dtype == torch.float32
    torch.testing.assert_close(st16.token_logprob, st32.token_logprob, rtol=0.05, atol=0.15)


def test_token_stats_input_errors():
    input_ids, am, hidden, weight = _batch()
    with pytest.raises(ValueError, match="exactly one"):
        student_token_stats(input_ids, BOUNDARY)
    with pytest.raises(ValueError, match="no token"):
        student_token_stats(input_ids, np.zeros(V, dtype=bool), hidden_states=hidden, lm_head_weight=weight)
    with pytest.raises(ValueError, match="lm_head_weight"):
        student_token_stats(input_ids, BOUNDARY, hidden_states=hidden)
    bad = input_ids.clone()
    bad[0, 3] = V  # a padded-vocabulary id inside a real document
    with pytest.raises(ValueError, match="outside the student vocabulary"):
        student_token_stats(bad, BOUNDARY, hidden_states=hidden, lm_head_weight=weight, attention_mask=am)


# ------------------------------------------------------------------------------------------------ chunks + loss


def test_chunk_sums_are_segment_sums():
    input_ids, am, hidden, weight = _batch()
    stats = student_token_stats(
        input_ids, BOUNDARY, hidden_states=hidden, lm_head_weight=weight, attention_mask=am
    )
    groups = _groups64(_documents())
    ch = student_chunk_stats(stats, groups)
    k = 0
    for i, gl in enumerate(GROUPS):
        for s, e in gl:
            expect = sum(float(stats.token_logprob[i, v].detach()) for v in range(max(s, 1), e + 1))
            assert float(ch.logprob[k].detach()) == pytest.approx(expect, rel=1e-12, abs=1e-12)
            assert float(ch.boundary_logprob[k].detach()) == float(stats.boundary_logprob[i, e].detach())
            k += 1
    assert k == groups.num_groups == 9


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("tau", [100.0, 3.0])
def test_loss_matches_python_loop(distance, debias, tau):
    input_ids, am, hidden, weight = _batch()
    docs = _documents()
    cfg = ALMLossConfig(distance=distance, tau=tau, debias=debias)
    stats = student_token_stats(
        input_ids, BOUNDARY, hidden_states=hidden, lm_head_weight=weight, attention_mask=am, slice_size=6
    )
    groups = _groups64(docs)
    logits = (hidden @ weight.T).tolist()
    ids = input_ids.tolist()

    out = alm_loss(stats, groups, cfg)
    ref_d, ref_loss = _ref_loss(logits, ids, docs, cfg)
    np.testing.assert_allclose(out.distances.numpy(), ref_d, rtol=1e-9, atol=1e-15)
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-15)
    assert out.num_groups == out.num_groups_global == 9 and not out.empty
    assert out.loss.item() > 0

    # global normalisation: the micro-batch's sum over the global group count
    out_g = alm_loss(stats, groups, cfg, num_groups_global=torch.tensor(40))
    assert out_g.loss.item() == pytest.approx(_ref_loss(logits, ids, docs, cfg, n_global=40)[1], rel=1e-7)
    assert out_g.num_groups_global == 40
    assert float(out_g.loss_sum) == pytest.approx(sum(ref_d), rel=1e-9)
    out.loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_loss_float32_inputs_from_documents():
    """The production dtypes: fp32 stats, fp32 teacher numbers from ALMGroups.from_documents."""
    input_ids, am, hidden, weight = _batch(dtype=torch.float32)
    docs = _documents()
    stats = student_token_stats(
        input_ids, BOUNDARY, hidden_states=hidden, lm_head_weight=weight, attention_mask=am
    )
    groups = ALMGroups.from_documents(docs, seq_lens=LENGTHS)
    assert groups.teacher_logprob.dtype == torch.float32 and groups.start.dtype == torch.int64
    out = alm_loss(stats, groups, ALMLossConfig(tau=5.0))
    assert out.loss.dtype == torch.float32
    logits = (hidden.double() @ weight.double().T).tolist()
    ref = _ref_loss(logits, input_ids.tolist(), docs, ALMLossConfig(tau=5.0))[1]
    assert out.loss.item() == pytest.approx(ref, rel=1e-4)
    # mean |C_S − C_T| metric
    ch = student_chunk_stats(stats, groups)
    expect = (ch.logprob - groups.teacher_logprob.double()).abs().mean()
    assert float(out.mean_abs_logprob_diff) == pytest.approx(expect.item(), rel=1e-6)


def test_binary_ce_has_the_gradients_of_binary_kl():
    input_ids, am, hidden, weight = _batch()
    groups = _groups64(_documents())
    grads = {}
    for dist in ("binary_kl", "binary_ce"):
        stats = student_token_stats(
            input_ids, BOUNDARY, hidden_states=hidden, lm_head_weight=weight, attention_mask=am
        )
        loss = alm_loss(stats, groups, ALMLossConfig(distance=dist, tau=2.0)).loss
        grads[dist] = torch.autograd.grad(loss, [hidden, weight])
    for a, b in zip(grads["binary_kl"], grads["binary_ce"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


def test_tau_limits_approximate_large_tau():
    g = torch.Generator().manual_seed(3)
    yt = -torch.rand(50, generator=g, dtype=torch.float64) * 30 - 0.01
    ys = -torch.rand(50, generator=g, dtype=torch.float64) * 30 - 0.01
    tau = 1e5
    for finite, limit in (("binary_kl", "binary_kl_tau_limit"), ("binary_tvd", "abs_tau_limit")):
        d_fin = alm_distance(yt, ys, ALMLossConfig(distance=finite, tau=tau, eps=1e-12))
        d_lim = alm_distance(yt, ys, ALMLossConfig(distance=limit, tau=tau, eps=1e-12))
        torch.testing.assert_close(d_fin, d_lim, rtol=2e-3, atol=0)


def test_distances_nonnegative_and_zero_only_at_equality():
    g = torch.Generator().manual_seed(4)
    yt = torch.cat([torch.zeros(1), -torch.rand(200, generator=g) * 200]).double()
    ys = torch.cat([torch.zeros(1), -torch.rand(200, generator=g) * 200]).double()
    for dist in DISTANCES:
        if dist == "binary_ce":
            continue
        cfg = ALMLossConfig(distance=dist, tau=5.0)
        d = alm_distance(yt, ys, cfg)
        assert torch.isfinite(d).all() and (d >= 0).all() and (d[1:] > 0).all(), dist
        assert (alm_distance(yt, yt, cfg) == 0).all(), dist


def test_log1mexp_is_stable():
    xs = [-1e-12, -1e-6, -0.3, -math.log(2), -0.7, -5.0, -40.0, -800.0]
    x = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    y = log1mexp(x)
    for xi, yi in zip(xs, y.tolist(), strict=True):
        assert yi == pytest.approx(math.log(-math.expm1(xi)), rel=1e-12, abs=1e-16)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    x32 = torch.tensor([-1e-6, -1e-3, -20.0, -200.0], requires_grad=True)
    y32 = log1mexp(x32)
    assert torch.isfinite(y32).all()
    y32.sum().backward()
    assert torch.isfinite(x32.grad).all()


PEAKED_LOGPROBS = [-300.0, -200.0, -103.5, -88.5, -50.0, -5.0, -1.0, -0.5, -1e-3, -1e-6, -1e-8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log1mexp_and_distances_finite_from_peaked_to_certain(dtype):
    """σ and chunk log-likelihoods from −300 (peaked students, issue 13) to −1e-8 (near-certain): log1mexp and
    every ALM distance stay finite with finite gradients, in fp32 and fp64; log1mexp matches the fp64 formula."""
    x = torch.tensor(PEAKED_LOGPROBS, dtype=dtype, requires_grad=True)
    y = log1mexp(x)
    ref = [math.log(-math.expm1(v)) for v in torch.tensor(PEAKED_LOGPROBS, dtype=dtype).double().tolist()]
    torch.testing.assert_close(y.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    y.sum().backward()
    assert torch.isfinite(x.grad).all(), x.grad
    # d/dx log(1 − eˣ) = −1/(e^{−x} − 1)
    ref_grad = [-1.0 / math.expm1(-v) for v in torch.tensor(PEAKED_LOGPROBS, dtype=dtype).double().tolist()]
    torch.testing.assert_close(
        x.grad.double(), torch.tensor(ref_grad, dtype=torch.float64), rtol=1e-5, atol=1e-30
    )
    n = len(PEAKED_LOGPROBS)
    y_s0 = torch.tensor(PEAKED_LOGPROBS, dtype=dtype)
    y_t = torch.tensor(PEAKED_LOGPROBS[::-1], dtype=dtype)
    for dist in DISTANCES:
        for tau in (1.0, 5.0, 100.0):
            cfg = ALMLossConfig(
                distance=dist, tau=tau, compute_dtype="float32" if dtype == torch.float32 else "float64"
            )
            y_s = y_s0.clone().requires_grad_()
            d = alm_distance(torch.cat([y_t, y_s0]), torch.cat([y_s, y_s0.flip(0)]), cfg)
            assert d.shape == (2 * n,) and torch.isfinite(d).all() and (d >= 0).all(), (dist, tau, d)
            d.sum().backward()
            assert torch.isfinite(y_s.grad).all(), (dist, tau, y_s.grad)


def test_zero_groups_give_zero_loss_that_backprops():
    input_ids, am, hidden, weight = _batch()
    stats = student_token_stats(
        input_ids, BOUNDARY, hidden_states=hidden, lm_head_weight=weight, attention_mask=am
    )
    empty = ALMGroups.from_documents([_documents()[2]] * 4, seq_lens=LENGTHS)
    for n_global in (None, 0, 17):
        out = alm_loss(stats, empty, num_groups_global=n_global)
        assert out.empty and out.num_groups == 0
        assert out.loss.item() == 0.0 and torch.isfinite(out.loss)
        assert out.loss.grad_fn is not None
        assert float(out.mean_abs_logprob_diff) == 0.0
    out.loss.backward()
    assert weight.grad is not None and (weight.grad == 0).all()
    assert hidden.grad is not None and (hidden.grad == 0).all()


def test_all_padding_batch_stays_connected():
    input_ids, _, hidden, weight = _batch()
    am = torch.zeros_like(input_ids)
    stats = student_token_stats(
        input_ids, BOUNDARY, hidden_states=hidden, lm_head_weight=weight, attention_mask=am
    )
    sft = next_token_loss(stats)
    alm = alm_loss(stats, ALMGroups.from_documents([{k: [] for k in _documents()[2] if k != "doc_id"}] * 4))
    total = sft.loss + alm.loss
    assert total.item() == 0.0 and total.grad_fn is not None
    total.backward()
    assert (weight.grad == 0).all()


def test_inconsistent_global_count_is_refused():
    input_ids, am, hidden, weight = _batch()
    stats = student_token_stats(
        input_ids, BOUNDARY, hidden_states=hidden, lm_head_weight=weight, attention_mask=am
    )
    with pytest.raises(ValueError, match="smaller"):
        alm_loss(stats, _groups64(_documents()), num_groups_global=3)


def test_groups_from_documents_validation():
    docs = _documents()
    g = ALMGroups.from_documents(docs, seq_lens=LENGTHS)
    assert g.batch_index.tolist() == [0, 0, 0, 0, 1, 1, 3, 3, 3]
    assert g.start.tolist() == [s for gl in GROUPS for s, _ in gl]
    assert g.end.tolist() == [e for gl in GROUPS for _, e in gl]
    bad = [dict(d) for d in docs]
    bad[1] = dict(bad[1], chunk_end=[1, 6])
    with pytest.raises(ValueError, match=r"document 1 \(doc_id 'd1'\).*outside"):
        ALMGroups.from_documents(bad, seq_lens=LENGTHS)
    bad[1] = dict(docs[1], chunk_start=[2, 2], chunk_end=[1, 5])
    with pytest.raises(ValueError, match="chunk_start <= chunk_end"):
        ALMGroups.from_documents(bad)
    bad[1] = dict(docs[1], teacher_chunk_logprob=[-1.0, float("nan")])
    with pytest.raises(ValueError, match="non-finite"):
        ALMGroups.from_documents(bad)
    bad[1] = dict(docs[1], teacher_chunk_boundary_logprob=[-1.0, 0.5])
    with pytest.raises(ValueError, match="positive"):
        ALMGroups.from_documents(bad)
    bad[1] = {k: v for k, v in docs[1].items() if k != "teacher_chunk_logprob"}
    with pytest.raises(ValueError, match="missing"):
        ALMGroups.from_documents(bad)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown ALM distance"):
        ALMLossConfig(distance="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tau"):
        ALMLossConfig(tau=0.0)
    with pytest.raises(ValueError, match="eps"):
        ALMLossConfig(eps=0.0)
    assert ALMLossConfig().distance == "binary_kl" and ALMLossConfig().tau == 5.0


# ------------------------------------------------------------------------------------------------ SFT


def test_next_token_loss_matches_cross_entropy():
    input_ids, am, hidden, weight = _batch()
    stats = student_token_stats(
        input_ids, BOUNDARY, hidden_states=hidden, lm_head_weight=weight, attention_mask=am
    )
    out = next_token_loss(stats)
    logits = (hidden @ weight[:V].T)[:, :-1]
    labels = input_ids[:, 1:].masked_fill(am[:, 1:] == 0, -100)
    ref = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert int(out.num_tokens) == sum(n - 1 for n in LENGTHS)
    lm = torch.zeros_like(am)
    lm[:, 3:] = 1
    part = next_token_loss(stats, loss_mask=lm, num_tokens_global=100)
    ref_sum = F.cross_entropy(
        logits.reshape(-1, V), labels.masked_fill(lm[:, 1:] == 0, -100).reshape(-1), reduction="sum"
    )
    assert part.loss.item() == pytest.approx(ref_sum.item() / 100, rel=1e-12)


# ------------------------------------------------------------------------------------------------ tiny Llama


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=300,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def _llama_batch():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 300, (3, 12), generator=g)
    am = torch.ones_like(ids)
    am[1, 9:] = 0
    am[2, 5:] = 0
    boundary = np.zeros(300, dtype=bool)
    boundary[::7] = True
    groups = ALMGroups.from_documents(
        [
            {
                "chunk_start": [0, 2, 5, 6],
                "chunk_end": [1, 4, 5, 11],
                "teacher_chunk_logprob": [0.0] * 4,
                "teacher_chunk_boundary_logprob": [0.0] * 4,
            },
            {
                "chunk_start": [1, 3],
                "chunk_end": [2, 8],
                "teacher_chunk_logprob": [0.0] * 2,
                "teacher_chunk_boundary_logprob": [0.0] * 2,
            },
            {
                "chunk_start": [0],
                "chunk_end": [4],
                "teacher_chunk_logprob": [0.0],
                "teacher_chunk_boundary_logprob": [0.0],
            },
        ],
        seq_lens=[12, 9, 5],
    )
    return ids, am, boundary, groups


def _llama_stats(model, ids, am, boundary, slice_size=8):
    h = model.model(input_ids=ids, attention_mask=am).last_hidden_state
    return student_token_stats(
        ids,
        boundary,
        hidden_states=h,
        lm_head_weight=model.lm_head.weight,
        attention_mask=am,
        slice_size=slice_size,
    )


@pytest.mark.parametrize("distance", ["binary_kl", "binary_tvd", "binary_kl_tau_limit", "abs_tau_limit"])
def test_loss_is_exactly_zero_when_student_matches_teacher(tiny_llama, distance):
    ids, am, boundary, groups = _llama_batch()
    tiny_llama.zero_grad(set_to_none=True)
    stats = _llama_stats(tiny_llama, ids, am, boundary)
    ch = student_chunk_stats(stats, groups)
    matched = ALMGroups(
        groups.batch_index,
        groups.start,
        groups.end,
        ch.logprob.detach().clone(),
        ch.boundary_logprob.detach().clone(),
    )
    for debias in (True, False):
        out = alm_loss(stats, matched, ALMLossConfig(distance=distance, tau=5.0, debias=debias))
        assert out.loss.item() == 0.0 and float(out.mean_abs_logprob_diff) == 0.0
        out.loss.backward(retain_graph=True)
    # the minimum is stationary (binary KL: −p + (1−p)·q/(1−q) = 0 only up to rounding at q = p)
    for p in tiny_llama.parameters():
        assert p.grad is None or float(p.grad.abs().max()) <= 1e-7


def test_gradient_reaches_only_the_student(tiny_llama):
    ids, am, boundary, groups = _llama_batch()
    student = tiny_llama
    student.zero_grad(set_to_none=True)
    # a "teacher" whose numbers are computed with grad enabled: the loss must still not reach it
    teacher = torch.nn.Linear(64, 300)
    h_t = torch.randn(3, 12, 64)
    t_stats = student_token_stats(
        ids, boundary, hidden_states=h_t, lm_head_weight=teacher.weight, attention_mask=am
    )
    t_ch = student_chunk_stats(t_stats, groups, dtype=torch.float32)
    assert t_ch.logprob.requires_grad
    tgroups = ALMGroups(groups.batch_index, groups.start, groups.end, t_ch.logprob, t_ch.boundary_logprob)
    out = alm_loss(_llama_stats(student, ids, am, boundary), tgroups, ALMLossConfig(tau=5.0))
    assert out.loss.item() > 0
    out.loss.backward()
    assert teacher.weight.grad is None and teacher.bias.grad is None
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert student.lm_head.weight.grad.abs().sum() > 0
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ GradMag on the tiny Llama


def test_gradmag_on_tiny_llama_alm_plus_sft(tiny_llama):
    ids, am, boundary, groups = _llama_batch()
    model = tiny_llama
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(2)
    tgroups = ALMGroups(
        groups.batch_index,
        groups.start,
        groups.end,
        -torch.rand(groups.num_groups, generator=g) * 20,
        -torch.rand(groups.num_groups, generator=g),
    )
    stats = _llama_stats(model, ids, am, boundary, slice_size=5)
    losses = {
        "alm": alm_loss(stats, tgroups, ALMLossConfig(tau=5.0)).loss,
        "sft": next_token_loss(stats).loss,
    }
    last = [p for p in model.model.layers[-1].parameters() if p.requires_grad]
    norms = []
    for loss in losses.values():
        grads = torch.autograd.grad(loss, last, retain_graph=True)
        norms.append(math.sqrt(sum(float(gr.pow(2).sum()) for gr in grads)))
    comb = combine_losses(losses, LossCombinationConfig(method="gradmag"), last)
    inv = [1 / n for n in norms]
    for name, wi in zip(losses, inv, strict=True):
        assert float(comb.weights[name]) == pytest.approx(wi / sum(inv), rel=1e-5)
    assert all(p.grad is None for p in model.parameters())
    comb.loss.backward()  # the graph (with its checkpointed LM-head slices) survives the extra passes
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
