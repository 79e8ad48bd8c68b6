"""GradMag and fixed loss combination (alm_pipeline.trainer.gradmag), against hand-computed weights."""

from __future__ import annotations

import math

import pytest
import torch

from alm_pipeline.trainer.gradmag import (
    GradMagStep,
    LossCombinationConfig,
    combine_losses,
    fixed_combine,
    gradmag_combine,
    gradmag_weights,
)


def test_gradmag_weights_inverse_to_gradient_norms():
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    other = torch.nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    x = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)  # ‖x‖ = 5
    y = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # ‖y‖ = 1
    losses = {
        "a": (theta * x).sum() + 100.0 * other.sum(),  # other params must not influence the weights
        "b": 0.5 * (theta * y).sum() ** 2 + other.sum() ** 3,  # grad on theta: (θ·y) y = 0.5 y → ‖·‖ = 0.5
    }
    w, norms = gradmag_weights(losses, [theta])
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    inv = torch.tensor([1 / 5.0, 1 / 0.5])
    torch.testing.assert_close(w, inv / inv.sum())
    comb = gradmag_combine(losses, [theta])
    assert theta.grad is None  # the weight computation accumulated nothing
    comb.loss.backward()
    # each loss contributes a unit-norm direction on theta, scaled by 1/Σ w
    expect = (x / 5.0 + 0.5 * y / 0.5) / inv.sum()
    torch.testing.assert_close(theta.grad, expect)
    assert float(comb.weights["a"]) == pytest.approx(float(w[0]))


def test_gradmag_equal_norms_equal_weights_and_zero_norm_guard():
    theta = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    u = torch.randn(4, 4, dtype=torch.float64)
    r = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64)).Q
    v = (r @ u.reshape(-1)).reshape(4, 4)  # same norm, different direction
    losses = {"a": (theta * u).sum(), "b": (theta * v).sum() * 1.0 + 7.0}
    w, _ = gradmag_weights(losses, [theta])
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5]))
    # a loss without gradient on the chosen params (e.g. an empty ALM batch) gets weight 0
    losses["c"] = theta.sum() * 0.0
    losses["d"] = torch.tensor(2.0)
    w, norms = gradmag_weights(losses, [theta])
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert torch.isfinite(combine_losses(losses, LossCombinationConfig(), [theta]).loss)
    # nothing has a gradient: equal weights, no NaN
    w, _ = gradmag_weights({"c": theta.sum() * 0.0, "d": torch.tensor(1.0)}, [theta])
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5]))


def test_fixed_combination():
    a = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(3.0, requires_grad=True)
    out = fixed_combine({"alm": a * 1.0, "sft": b * 1.0}, {"sft": 0.5})
    assert out.loss.item() == 2.0 + 1.5 and float(out.weights["alm"]) == 1.0
    out = combine_losses({"alm": a * 1.0}, LossCombinationConfig(method="fixed", weights={"alm": 3.0}))
    assert out.loss.item() == 6.0
    with pytest.raises(ValueError, match="unknown loss"):
        fixed_combine({"alm": a}, {"sft": 1.0})
    with pytest.raises(ValueError, match="params"):
        combine_losses({"alm": a, "sft": b}, LossCombinationConfig())


# ------------------------------------------------------------------------ GradMagStep: one set of weights per step


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(5, 7)
        self.last = torch.nn.Linear(7, 3)
        self.unused = torch.nn.Linear(2, 2)  # trainable, but in no loss: its .grad must stay None

    def forward(self, x):
        return self.last(torch.tanh(self.first(x)))


def _two_layer_model(seed: int = 0) -> _TwoLayers:
    torch.manual_seed(seed)
    return _TwoLayers().double()


def _losses(model, x, y, n_total):
    """Two losses of a slice of the batch, normalised by the whole batch (as the trainer's micro-batches)."""
    out = model(x)
    return {
        "a": ((out - y) ** 2).sum() / n_total,
        "b": (out.logsumexp(-1) - out[:, 0]).sum() / n_total,
    }


@pytest.mark.parametrize("slices", [1, 3])
def test_gradmag_step_weights_the_global_batch_once(slices):
    """Over several micro-batches, GradMagStep leaves in .grad exactly ∇(w̃_a·L_a + w̃_b·L_b) of the whole batch,
    the weights from the whole batch's last-layer gradient norms (as gradmag_weights on the full-batch losses)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    ref_model, model = _two_layer_model(), _two_layer_model()
    full = _losses(ref_model, x, y, 12)
    w_ref, norms_ref = gradmag_weights(full, ref_model.last.parameters())
    assert abs(float(w_ref[0]) - 0.5) > 0.05  # unequal weights: the case under test

    step = GradMagStep(["a", "b"], model.parameters(), model.last.parameters())
    for part in torch.arange(12).chunk(slices):
        step.backward(_losses(model, x[part], y[part], 12))
        assert all(p.grad is None for p in model.parameters())  # kept apart until finish
    weights, norms = step.finish()
    # (the norms are fp32 sums on both sides, in another order)
    assert weights == pytest.approx(dict(zip("ab", w_ref.tolist(), strict=True)), rel=1e-6)
    assert norms == pytest.approx(dict(zip("ab", norms_ref.tolist(), strict=True)), rel=1e-6)
    (weights["a"] * full["a"] + weights["b"] * full["b"]).backward()  # the gradient, with those weights
    for p_ref, p in zip(ref_model.parameters(), model.parameters(), strict=True):
        if p_ref.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-12, atol=1e-15)
    assert model.unused.weight.grad is None

    # the next step starts from nothing; `reduce` sees each loss's flat gradients once (here: doubles them, as
    # two workers with the same batch would) and the weights, a ratio of norms, stay the same
    seen = []

    def reduce(flat):
        seen.append(flat.numel())
        return flat * 2

    step.backward(_losses(model, x, y, 12))
    again, _ = step.finish(reduce)
    n_params = sum(p.numel() for p in model.parameters())
    assert seen == [n_params, n_params]
    assert again == pytest.approx(weights, rel=1e-12)


def test_gradmag_step_non_finite_gradient_stays_non_finite():
    """A NaN in one loss's gradient must reach .grad (the trainer then skips the step), whatever its weight."""
    model = _two_layer_model()
    step = GradMagStep(["a", "b"], model.parameters(), model.last.parameters())
    x = torch.randn(4, 5, dtype=torch.float64)
    losses = _losses(model, x, torch.zeros(4, 3, dtype=torch.float64), 4)
    losses["b"] = losses["b"] * float("nan")
    step.backward(losses)
    weights, norms = step.finish()
    assert weights == {"a": 1.0, "b": 0.0} and not math.isfinite(norms["b"])
    assert not torch.isfinite(model.first.weight.grad).all()
    with pytest.raises(ValueError, match="last-layer parameters"):
        GradMagStep(["a", "b"], model.first.parameters(), model.last.parameters())
