"""GradMag and fixed loss combination (alm_pipeline.trainer.gradmag), against hand-computed weights."""

from __future__ import annotations

import pytest
import torch

from alm_pipeline.trainer.gradmag import (
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
