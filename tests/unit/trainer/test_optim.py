"""The learning-rate schedule (alm_pipeline.trainer.optim)."""

from __future__ import annotations

import pytest

from alm_pipeline.trainer.optim import lr_factor


def test_lr_schedule_warmup_then_linear_decay():
    f = [lr_factor(s, 2, 10) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert f[-1] == pytest.approx(1 / 8) and all(a > b for a, b in zip(f[2:], f[3:], strict=False))
    assert lr_factor(0, 0, 5) == 1.0
