"""The training config tree (alm_pipeline.trainer.config): validation messages, JSON round trip."""

from __future__ import annotations

import json

import pytest

from alm_pipeline.cli.options import build_config
from alm_pipeline.trainer.config import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    OptimConfig,
    StudentSpec,
    TrainConfig,
)
from tests.factories import train_config


def test_config_validation_messages(self_aligned, tmp_path):
    with pytest.raises(ValueError, match="exactly one data source"):
        build_config(TrainConfig, {"student": "x", "output": str(tmp_path)})
    with pytest.raises(ValueError, match="exactly one student"):
        build_config(TrainConfig, {"aligned": str(self_aligned), "output": str(tmp_path)})
    with pytest.raises(ValueError, match="--cache needs --student-tokenizer"):
        DataConfig(cache="c")
    with pytest.raises(ValueError, match="embedding-init"):
        StudentSpec(init_from="x", embedding_init="random")
    with pytest.raises(ValueError, match="--batch-size"):
        TrainConfig(
            data=DataConfig(aligned="a"),
            student=StudentSpec(student="x"),
            optim=OptimConfig(batch_size=1),
            distributed=DistributedConfig(num_workers=2),
        )
    with pytest.raises(ValueError, match="--resume and --overwrite"):
        CheckpointConfig(resume=True, overwrite=True)
    with pytest.raises(ValueError, match="--no-alm .* add --next-token-loss"):
        train_config(self_aligned, tmp_path, student="x", alm=False)
    sft = train_config(self_aligned, tmp_path, student="x", alm=False, next_token_loss=True)
    assert not sft.loss.alm and sft.loss.next_token_loss and not sft.gradmag


def test_config_tree_round_trips_through_json_and_zero_means_off(tmp_path):
    from alm_pipeline.pipeline.ray_utils import RayConfig

    cfg = train_config(
        tmp_path / "aligned",
        tmp_path / "run",
        init_from="m",
        num_layers=2,
        tau=5.0,
        debias=False,
        loss_combination="fixed",
        address="auto",
        keep_checkpoints=0,
        max_grad_norm=0,
        fail_at_step=2,
    )
    assert cfg.checkpoint.keep is None and cfg.optim.max_grad_norm is None  # 0 = keep all / no clipping
    assert cfg.combine.method == "fixed" and cfg.distributed.ray == RayConfig(address="auto")
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.distributed.ray, RayConfig)
    with pytest.raises(ValueError, match="unknown LossConfig setting"):
        TrainConfig.from_dict({**cfg.to_dict(), "loss": {"temperature": 1.0}})


def test_max_failures_default_restarts_runs_spread_over_workers_or_a_cluster(monkeypatch):
    from alm_pipeline.pipeline.ray_utils import RayConfig
    from alm_pipeline.trainer.config import MULTI_WORKER_FAILURES

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert DistributedConfig().max_failures == 0
    assert DistributedConfig(num_workers=2).max_failures == MULTI_WORKER_FAILURES > 0
    assert DistributedConfig(ray=RayConfig(address="auto")).max_failures == MULTI_WORKER_FAILURES
    assert DistributedConfig(num_workers=2, max_failures=0).max_failures == 0  # an explicit value stays
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert DistributedConfig().max_failures == MULTI_WORKER_FAILURES
    # resolved once: a config read back from its JSON keeps the number
    cfg = DistributedConfig(num_workers=2)
    assert DistributedConfig(**{**cfg.__dict__, "ray": cfg.ray}).max_failures == MULTI_WORKER_FAILURES


@pytest.mark.parametrize(
    ("use_gpu", "bf16", "resolved"),
    [(False, None, False), (True, None, True), (True, False, False), (False, True, True), (True, True, True)],
)
def test_bf16_defaults_to_on_with_gpus_and_an_explicit_choice_stays(use_gpu, bf16, resolved):
    """--bf16 unset: bfloat16 autocast with --use-gpu, fp32 on CPU; --bf16 / --no-bf16 as given. The worker
    reads the resolved value (TrainConfig.resolved(), which the driver applies first)."""
    from alm_pipeline.trainer.config import ComputeConfig

    config = TrainConfig(
        data=DataConfig(aligned="a"),
        student=StudentSpec(student="x"),
        compute=ComputeConfig(bf16=bf16),
        distributed=DistributedConfig(use_gpu=use_gpu),
    )
    assert config.compute.bf16 is bf16 and config.resolved().compute.bf16 is resolved
    assert build_config(TrainConfig, {"aligned": "a", "student": "x"}).compute.bf16 is None
    assert build_config(TrainConfig, {"aligned": "a", "student": "x", "bf16": False}).compute.bf16 is False
