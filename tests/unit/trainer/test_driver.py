"""The training loop in this process (alm_pipeline.trainer.driver.train_local): self-distillation, learning,
packing."""

from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pytest

from alm_pipeline.cache.aligned import open_aligned_set
from alm_pipeline.trainer.checkpoint import (
    checkpoint_name,
    find_latest_checkpoint,
    list_checkpoints,
    read_trainer_state,
)
from alm_pipeline.trainer.data import plan_micro_batches
from alm_pipeline.trainer.driver import train_local
from alm_pipeline.trainer.errors import TrainingError
from alm_pipeline.trainer.metrics import read_metrics_csv
from alm_pipeline.trainer.runtime import read_aligned_rows, training_index
from alm_pipeline.trainer.worker import training_plan
from tests.factories import losses, train_config


def test_self_distillation_loss_is_zero_at_step_zero(self_aligned, gpt2_bl_model, tmp_path):
    """Student = teacher weights with the teacher's own tokenizer: the chunk likelihoods agree."""
    res = train_local(
        train_config(self_aligned, tmp_path / "run", student=str(gpt2_bl_model), steps=1, lr=1e-5)
    )
    first = res.history[0]
    assert first["step"] == 1 and first["valid_chunks"] > 20
    assert first["loss"] < 1e-6 and first["mean_abs_chunk_logprob_diff"] < 1e-4


def test_tiny_student_learns_and_checkpoint_is_plain_transformers(small_aligned, gpt2_bl_model, tmp_path):
    """Tokenizer transfer (FVT) to another tokenizer: a few dozen steps lower the loss; the checkpoint is a
    Hugging Face folder that loads with plain transformers and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    cfg = train_config(
        small_aligned,
        out,
        init_from=str(gpt2_bl_model),
        steps=30,
        lr=5e-3,
        checkpoint_every=10,
        warmup_steps=2,
        tensorboard=True,
    )
    res = train_local(cfg)
    alm = losses(res.history)
    assert len(alm) == 30 and np.all(np.isfinite(alm))
    assert alm[-5:].mean() < 0.6 * alm[:3].mean(), alm
    assert [r["step"] for r in read_metrics_csv(out / "metrics.csv")] == list(range(1, 31))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert [s for s, _ in list_checkpoints(out)] == [10, 20, 30]
    final = res.final_checkpoint
    assert final == out / "final" and not (final / "optimizer.pt").exists()
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    prompt = tok("To be, or not", return_tensors="pt")
    gen = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == prompt["input_ids"].shape[1] + 5
    state = read_trainer_state(find_latest_checkpoint(out))
    assert state["step"] == 30 and state["data_position"]["epoch"] >= 1


def test_packing_equals_bucketing_and_micro_batching(mixed_aligned, gpt2_bl_model, tmp_path):
    """The loss of a step does not depend on how the global batch is cut into micro-batches or packed (the
    packed run's rows hold several documents)."""
    rows, _ = read_aligned_rows(open_aligned_set(mixed_aligned).shard_files()).select_trainable(
        need_groups=True
    )
    cfg = train_config(mixed_aligned, tmp_path / "x", init_from=str(gpt2_bl_model))
    plan = training_plan(cfg, training_index(cfg))  # as the worker plans
    assert plan.num_docs == rows.num_docs
    packed_rows = [
        row
        for step in range(3)
        for mb in plan_micro_batches(
            rows.lengths[plan.global_batch(step)],
            max_tokens=96,
            packing=True,
            pack_length=int(rows.lengths.max()),  # the worker packs up to the longest document
        )
        for row in mb
    ]
    assert any(len(row) >= 2 for row in packed_rows)
    runs = {}
    for name, kw in {
        "packed": {"packing": True, "micro_batch_tokens": 96},
        "bucketed": {"packing": False, "micro_batch_tokens": 96},
        "one_pass": {"packing": False, "micro_batch_tokens": 100000},
    }.items():
        res = train_local(
            train_config(mixed_aligned, tmp_path / name, init_from=str(gpt2_bl_model), steps=3, **kw)
        )
        runs[name] = losses(res.history)
        assert res.info["packing"] == (name == "packed")
    np.testing.assert_allclose(runs["packed"], runs["one_pass"], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(runs["bucketed"], runs["one_pass"], rtol=2e-5, atol=1e-7)


def _checkpoint_weights(run_dir) -> dict[int, dict]:
    from safetensors.torch import load_file

    out = {}
    for step, path in list_checkpoints(run_dir):
        (weights,) = sorted(path.glob("*.safetensors"))
        out[step] = load_file(weights)
    return out


def test_non_finite_gradient_steps_are_skipped_counted_and_stop_the_run(
    small_aligned, gpt2_bl_model, tmp_path
):
    """A step whose gradient is NaN (injected after the backward, debug.nan_grad_at_step) is not applied: the
    weights stay as they were, the schedule and the data plan go on, ``skipped_steps`` counts it, the console
    warns; ``max_nonfinite_steps`` such steps in a row stop the run with a TrainingError."""
    import pytest
    import torch

    from alm_pipeline.trainer.errors import TrainingError

    kw = {
        "init_from": str(gpt2_bl_model),
        "steps": 5,
        "checkpoint_every": 1,
        "keep_checkpoints": 0,
        "max_nonfinite_steps": 3,
    }
    clean = train_local(train_config(small_aligned, tmp_path / "clean", **kw))
    said: list[str] = []
    res = train_local(
        train_config(small_aligned, tmp_path / "skip", nan_grad_at_step=3, nan_grad_steps=2, **kw),
        say=said.append,
    )
    rows = read_metrics_csv(tmp_path / "skip" / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2]
    assert [r["skipped_steps"] for r in clean.history] == [0] * 5
    assert not np.isfinite(rows[2]["grad_norm"]) and not np.isfinite(rows[3]["grad_norm"])
    assert np.isfinite(rows[4]["grad_norm"])
    # the same batches and schedule as the clean run; identical up to the first skipped step's loss
    np.testing.assert_allclose(losses(rows, "lr"), losses(clean.history, "lr"), rtol=1e-12)
    assert [r["student_tokens"] for r in rows] == [r["student_tokens"] for r in clean.history]
    np.testing.assert_allclose(losses(res.history)[:3], losses(clean.history)[:3], rtol=1e-6)
    assert any("step 3 skipped" in m for m in said) and any("step 4 skipped" in m for m in said), said
    weights = _checkpoint_weights(tmp_path / "skip")
    for name, w2 in weights[2].items():
        assert torch.equal(weights[3][name], w2) and torch.equal(weights[4][name], w2), name
    assert any(not torch.equal(weights[5][n], w) for n, w in weights[4].items())
    assert any(
        not torch.equal(weights[3][n], w) for n, w in _checkpoint_weights(tmp_path / "clean")[3].items()
    )

    # the count is part of the checkpoint: a run resumed after the skipped steps goes on counting from there
    assert read_trainer_state(tmp_path / "skip" / "checkpoints" / checkpoint_name(4))["skipped_steps"] == 2
    shutil.rmtree(tmp_path / "skip" / "checkpoints" / checkpoint_name(5))
    shutil.rmtree(tmp_path / "skip" / "final")
    resumed = train_local(
        train_config(
            small_aligned, tmp_path / "skip", nan_grad_at_step=3, nan_grad_steps=2, resume=True, **kw
        )
    )
    assert resumed.start_step == 4
    assert [r["skipped_steps"] for r in resumed.history] == [2]

    with pytest.raises(TrainingError, match=r"3 optimizer steps in a row \(up to step 4\) had a non-finite"):
        train_local(
            train_config(small_aligned, tmp_path / "stop", nan_grad_at_step=2, nan_grad_steps=3, **kw)
        )
    stopped = read_metrics_csv(tmp_path / "stop" / "metrics.csv")
    assert [r["skipped_steps"] for r in stopped] == [0, 1, 2]


def _train_cli(args: list[str]):
    import typer
    from typer.testing import CliRunner

    from alm_pipeline.cli.train_cmd import train

    app = typer.Typer()
    app.command("train")(train)
    app.command("other")(lambda: None)
    return CliRunner().invoke(app, ["train", *args])


def test_resume_refuses_when_every_checkpoint_is_damaged(small_aligned, gpt2_bl_model, tmp_path):
    """Every checkpoint fails its completeness check (a recorded file size differs): --resume is refused, naming
    them, and nothing is deleted; a fresh run into the folder is refused too. With one intact checkpoint left, the
    run resumes from it and names the damaged one. Before: '--resume: ... holds no checkpoint yet; starting from
    step 0', and the run trained over them (a fresh run deleted them silently)."""
    import ray

    out = tmp_path / "run"
    kw = {"init_from": str(gpt2_bl_model), "steps": 4, "checkpoint_every": 2, "keep_checkpoints": 0}
    train_local(train_config(small_aligned, out, **kw))
    ckpts = [path for _, path in list_checkpoints(out)]
    assert [p.name for p in ckpts] == ["checkpoint-000002", "checkpoint-000004"]
    weights = [p / "model.safetensors" for p in ckpts]
    intact = weights[0].read_bytes()
    for f in weights:
        with f.open("ab") as fh:
            fh.write(b"\0")
    size = weights[0].stat().st_size

    with pytest.raises(TrainingError) as refused:
        train_local(train_config(small_aligned, out, resume=True, **kw))
    message = str(refused.value)
    assert "--resume: no checkpoint under" in message
    assert (
        f"checkpoint-000002: model.safetensors has {size} bytes, trainer_state.json recorded {size - 1}"
        in message
    )
    assert "checkpoint-000004: model.safetensors has" in message
    assert all(f.stat().st_size == size for f in weights)  # nothing deleted or changed

    ray_before = ray.is_initialized()
    base = ["--aligned", str(small_aligned), "--init-from", str(gpt2_bl_model), "--output", str(out)]
    base += ["--steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "0"]
    for extra, expected in ((["--resume"], "no checkpoint under"), ([], "already holds checkpoints")):
        result = _train_cli(base + extra)
        assert result.exit_code == 2 and expected in result.output, result.output
        assert "checkpoint-000004: model.safetensors has" in " ".join(result.output.split())
    assert ray.is_initialized() == ray_before and all(f.stat().st_size == size for f in weights)

    weights[0].write_bytes(intact)  # checkpoint 2 intact again: resumed from, checkpoint 4 named as skipped
    said: list[str] = []
    resumed = train_local(train_config(small_aligned, out, resume=True, **kw), say=said.append)
    assert resumed.start_step == 2 and resumed.steps == 4
    assert any(
        "skipping checkpoints that fail their completeness check (checkpoint-000004" in m for m in said
    )


def test_checkpoints_and_the_final_model_get_the_users_umask(small_aligned, gpt2_bl_model, tmp_path):
    """Outputs get the user's umask (before: checkpoint and final folders were 0700, made with mkdtemp)."""
    old = os.umask(0o022)
    try:
        res = train_local(
            train_config(small_aligned, tmp_path / "run", init_from=str(gpt2_bl_model), steps=2)
        )
    finally:
        os.umask(old)
    ckpt = res.last_checkpoint
    for path, mode in (
        (ckpt, 0o755),
        (ckpt / "model.safetensors", 0o644),
        (res.final_checkpoint, 0o755),
        (res.final_checkpoint / "config.json", 0o644),
    ):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
