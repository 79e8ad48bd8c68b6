"""``alm-pipeline train`` end to end under a real Ray Train: DDP equality, kill + resume, FailureConfig restart
with on-the-fly alignment."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from alm_pipeline.locking import output_lock
from alm_pipeline.trainer.checkpoint import find_latest_checkpoint, list_checkpoints, read_trainer_state
from alm_pipeline.trainer.config import (
    DataConfig,
)
from alm_pipeline.trainer.driver import RAY_SNAPSHOT, run_training, train_local
from alm_pipeline.trainer.errors import TrainingError
from alm_pipeline.trainer.metrics import read_metrics_csv
from tests.factories import corpus_texts, losses, shard_bytes, train_config, write_aligned_set


@pytest.mark.ray
def test_ray_train_two_workers_match_one_worker(ray_local, small_aligned, gpt2_bl_model, tmp_path):
    """2 DDP workers under Ray Train give the 1-worker losses on the same global batches; checkpoints,
    metrics.csv, TensorBoard files and a final Hugging Face folder that loads and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"init_from": str(gpt2_bl_model), "steps": 4, "checkpoint_every": 2}
    one = train_local(train_config(small_aligned, tmp_path / "one", **kw))
    out = tmp_path / "two"
    two = run_training(train_config(small_aligned, out, num_workers=2, tensorboard=True, **kw))
    assert two.info["world_size"] == 2 and two.steps == 4
    np.testing.assert_allclose(losses(two.history), losses(one.history), rtol=1e-5)
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["step", "loss"] and {"valid_chunks", "tokens_per_s", "lr", "grad_norm"} <= set(
        header
    )
    assert [r["step"] for r in read_metrics_csv(out / "metrics.csv")] == [1, 2, 3, 4]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert (out / "checkpoints" / "checkpoint-000004" / "optimizer.pt").exists()
    model = AutoModelForCausalLM.from_pretrained(two.final_checkpoint)
    tok = AutoTokenizer.from_pretrained(two.final_checkpoint)
    gen = model.generate(**tok("The quick", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert gen.shape[1] > 3
    # a second run into the same folder is refused unless it resumes
    with pytest.raises(TrainingError, match="--resume"):
        run_training(train_config(small_aligned, out, num_workers=2, **kw))


@pytest.mark.ray
def test_ray_train_two_workers_match_one_worker_with_gradmag(
    ray_local, small_aligned, gpt2_bl_model, tmp_path
):
    """ALM + next-token loss with GradMag: 2 DDP workers give the 1-worker losses, weights and gradient norms, and
    the same parameters (one set of weights per step, from the per-loss gradients all-reduced over the workers)."""
    from safetensors.torch import load_file

    kw = {
        "init_from": str(gpt2_bl_model),
        "steps": 3,
        "checkpoint_every": 3,
        "next_token_loss": True,
        "adam_eps": 1e-6,  # see tests/unit/trainer/test_worker.py: no blown-up rounding noise in Adam's first step
    }
    one = train_local(train_config(small_aligned, tmp_path / "one", **kw))
    two = run_training(train_config(small_aligned, tmp_path / "two", num_workers=2, **kw))
    assert two.info["world_size"] == 2
    w = losses(one.history, "weight_ntp")
    assert np.all((w > 0) & (w < 1)), w
    for key in ("loss", "loss_alm", "loss_ntp", "weight_alm", "weight_ntp", "grad_norm"):
        np.testing.assert_allclose(losses(two.history, key), losses(one.history, key), rtol=2e-5, err_msg=key)
    (a,) = (tmp_path / "one" / "final").glob("*.safetensors")
    (b,) = (tmp_path / "two" / "final").glob("*.safetensors")
    ref = load_file(a)
    # equal up to rounding, which Adam amplifies in parameters whose exact gradient is 0 (GPT-2's key biases):
    # < 2 % of the learning rate 3e-3 after 3 steps
    for name, value in load_file(b).items():
        np.testing.assert_allclose(value.numpy(), ref[name].numpy(), rtol=0, atol=6e-5, err_msg=name)


@pytest.mark.ray
def test_cli_kill_then_resume_reaches_the_same_step_and_loss(
    ray_local, small_aligned, gpt2_bl_model, tmp_path
):
    """``alm-pipeline train`` killed (SIGKILL of its whole process group) mid-run, then ``--resume``: the run ends
    at the same step with the same loss curve as an uninterrupted run."""
    steps = 80
    kw = {"init_from": str(gpt2_bl_model), "steps": steps, "checkpoint_every": 5, "batch_size": 4}
    kw_cli = {"micro_batch_tokens": 100000}
    ref = train_local(train_config(small_aligned, tmp_path / "ref", **kw, **kw_cli))
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "alm_pipeline.cli.train_cmd",
        "--aligned", str(small_aligned), "--init-from", str(gpt2_bl_model), "--output", str(out),
        "--steps", str(steps), "--batch-size", "4", "--micro-batch-tokens", "100000", "--lr", "3e-3",
        "--warmup-steps", "1", "--checkpoint-every", "5", "--torch-threads", "1", "--no-tensorboard",
        "--log-every", "50",
        # join this session's Ray instead of starting one per command (the kill ends the driver's job only)
        "--address", ray_local.get_runtime_context().gcs_address,
    ]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        cmd, start_new_session=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    metrics = out / "metrics.csv"
    deadline = time.monotonic() + 300
    killed_after = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) > 12:  # header + 12 steps
                os.killpg(proc.pid, signal.SIGKILL)
                killed_after = len(read_metrics_csv(metrics))
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert killed_after is not None and killed_after < steps, log[-3000:]
    latest = find_latest_checkpoint(out)
    assert latest is not None and read_trainer_state(latest)["step"] >= 10, log[-3000:]
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "resuming from" in done.stderr
    curve = read_metrics_csv(metrics)
    assert [r["step"] for r in curve] == list(range(1, steps + 1))
    np.testing.assert_allclose([r["loss"] for r in curve], losses(ref.history), rtol=1e-5)
    assert read_trainer_state(find_latest_checkpoint(out))["step"] == steps
    assert (out / "final" / "model.safetensors").exists()


@pytest.mark.ray
def test_stream_from_cache_bytes_student_restarts_after_failure(ray_local, gpt2_bl_model, tmp_path):
    """``--cache`` + ``--student-tokenizer bytes`` + ``--init-from``: 2 workers, each aligning on the fly only the
    cache shards of its documents; a worker failure after step 3 is retried by Ray Train's FailureConfig from the
    step-2 checkpoint, and the curve equals an uninterrupted 1-worker run on the same data aligned ahead of time
    (the same blocks: cache shards of 8 documents, aligned shards of 8)."""
    from alm_pipeline.cache import open_cache
    from alm_pipeline.pipeline.corpus import CorpusConfig
    from alm_pipeline.pipeline.ray_utils import RayConfig
    from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, build_teacher_cache

    data = tmp_path / "corpus.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"d{i:03d}", "text": t}) + "\n" for i, t in enumerate(corpus_texts(16)))
    )
    build_teacher_cache(
        TeacherCacheConfig(
            teacher=str(gpt2_bl_model),
            corpus=CorpusConfig(path=str(data), id_field="id"),
            output=str(tmp_path / "cache"),
            max_length=48,
            shard_size=shard_bytes(data, 2),
            ray=RayConfig(num_cpus=2),
        )
    )
    table = pa.concat_tables(open_cache(tmp_path / "cache").iter_tables())
    aligned = write_aligned_set(tmp_path / "aligned", gpt2_bl_model, "bytes", table)
    kw = {
        "init_from": str(gpt2_bl_model),
        "steps": 5,
        "checkpoint_every": 2,
        "batch_size": 4,
        "shuffle_window": 6,
    }
    ref = train_local(train_config(aligned, tmp_path / "ref", **kw))
    cfg = train_config(aligned, tmp_path / "stream", **kw, fail_at_step=3, max_failures=1, num_workers=2)
    cfg = dataclasses.replace(
        cfg,
        data=DataConfig(cache=str(tmp_path / "cache"), student_tokenizer="bytes", shuffle_window=6),
        distributed=dataclasses.replace(cfg.distributed, ray=RayConfig()),
    )
    res = run_training(cfg)
    assert res.steps == 5 and (tmp_path / "stream" / ".injected_failure").exists()
    assert res.info["start_step"] == 2 and res.info["resumed_from"].endswith("checkpoint-000002")
    assert res.info["student"]["tokenizer"] == "bytes" and res.info["world_size"] == 2
    curve = read_metrics_csv(tmp_path / "stream" / "metrics.csv")
    assert [r["step"] for r in curve] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([r["loss"] for r in curve], losses(ref.history), rtol=1e-5)


@pytest.mark.ray
def test_a_second_train_into_one_output_is_refused_while_the_first_finishes_intact(
    ray_local, small_aligned, gpt2_bl_model, tmp_path
):
    """Two real ``alm-pipeline train`` processes with different --lr into one --output: the second is refused at
    once (exit 2) naming the first, which finishes with its own model, checkpoints and metrics. Before: both ran
    and exited 0, and only one run's results remained."""
    out = tmp_path / "run"

    def command(lr: str) -> list[str]:
        return [
            sys.executable, "-m", "alm_pipeline.cli.main", "train",
            "--aligned", str(small_aligned), "--init-from", str(gpt2_bl_model), "--output", str(out),
            "--steps", "12", "--batch-size", "4", "--lr", lr, "--warmup-steps", "1", "--checkpoint-every", "4",
            "--keep-checkpoints", "0", "--torch-threads", "1", "--no-tensorboard", "--log-every", "50",
            "--address", ray_local.get_runtime_context().gcs_address,
        ]  # fmt: skip

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(
        command("3e-3"), env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 180
        while output_lock(out, "train").holder().get("pid") != first.pid:
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        second = subprocess.run(command("1e-2"), env=env, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second one tried: nothing was tested"
        log = first.communicate(timeout=400)[0].decode(errors="replace")
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert f"{out} is being written by another run: alm-pipeline train (pid {first.pid} " in errors[0]
    assert first.returncode == 0, log[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["optim"]["lr"] == 3e-3 and run["steps"] == 12
    assert [r["step"] for r in read_metrics_csv(out / "metrics.csv")] == list(range(1, 13))
    assert [s for s, _ in list_checkpoints(out)] == [4, 8, 12]
    assert (out / "final" / "model.safetensors").exists()
    assert output_lock(out, "train").holder() == {}  # released


@pytest.mark.ray
def test_resume_after_the_newest_checkpoint_was_deleted_by_hand(
    ray_local, small_aligned, gpt2_bl_model, tmp_path
):
    """Ray Train's record of the run still names a checkpoint deleted by hand: --resume continues from the newest
    checkpoint that exists and says which (before: the run failed inside Ray Train)."""
    out = tmp_path / "run"
    kw = {"init_from": str(gpt2_bl_model), "steps": 6, "checkpoint_every": 2, "keep_checkpoints": 0}
    run_training(train_config(small_aligned, out, **kw))
    snapshot = out / "checkpoints" / RAY_SNAPSHOT
    assert "checkpoint-000006" in snapshot.read_text()  # the case this test is about
    shutil.rmtree(out / "checkpoints" / "checkpoint-000006")
    said: list[str] = []
    resumed = run_training(train_config(small_aligned, out, resume=True, **kw), say=said.append)
    assert resumed.start_step == 4 and resumed.steps == 6
    expected = "naming checkpoint-000006, which no longer exist; resuming from checkpoint-000004 (step 4)"
    assert any(expected in m for m in said), said
    assert [s for s, _ in list_checkpoints(out)] == [2, 4, 6]
    assert [r["step"] for r in read_metrics_csv(out / "metrics.csv")] == list(range(1, 7))
