"""Checkpoints, run directory and metrics on object storage (a real S3 server, SeaweedFS): listing, the
completeness check, pruning, the final export, resume/overwrite checks and metrics.csv at an ``s3://`` URI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alm_pipeline.storage import Location, location
from alm_pipeline.trainer import checkpoint as ckpt_io
from alm_pipeline.trainer.driver import _prepare_output, train_local
from alm_pipeline.trainer.errors import TrainingError
from alm_pipeline.trainer.metrics import MetricsLogger, read_metrics_csv
from tests.factories import train_config


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory, self_aligned, gpt2_bl_model) -> Path:
    """A real checkpoint (step 2) of a tiny run on the local disk."""
    out = tmp_path_factory.mktemp("ckpt-run")
    train_local(
        train_config(
            self_aligned, out, init_from=str(gpt2_bl_model), steps=2, checkpoint_every=2, batch_size=4
        )
    )
    return out / "checkpoints" / ckpt_io.checkpoint_name(2)


def _with_step(src: Path, dest: Path, step: int) -> Path:
    """A copy of the checkpoint ``src`` that says it is at ``step``."""
    shutil.copytree(src, dest)
    state = json.loads((dest / ckpt_io.TRAINER_STATE).read_text())
    (dest / ckpt_io.TRAINER_STATE).write_text(json.dumps({**state, "step": step}))
    return dest


def _names(loc: Location) -> set[str]:
    base = len(loc.path) + 1
    return {i.path[base:] for i in loc.list(recursive=True) if i.is_file}


def test_checkpoints_on_object_storage(local_checkpoint, s3_bucket, tmp_path, monkeypatch):
    """Published checkpoints are listed, checked for completeness, pruned, exported and downloaded at an
    ``s3://`` run directory; nothing named ``s3:`` appears on the local disk."""
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    run = f"{s3_bucket}/runs/r1"
    for step in (2, 4):
        src = _with_step(local_checkpoint, tmp_path / f"c{step}", step)
        ckpt_io.publish_checkpoint(src, f"{run}/checkpoints/{ckpt_io.checkpoint_name(step)}")
    # a checkpoint copied only in part: a file shorter than trainer_state.json recorded
    damaged = location(f"{run}/checkpoints/{ckpt_io.checkpoint_name(9)}")
    ckpt_io.publish_checkpoint(_with_step(local_checkpoint, tmp_path / "c9", 9), damaged)
    (damaged / "model.safetensors").write_bytes(b"\0" * 100)
    # a checkpoint cut short before its trainer_state.json: neither complete nor damaged
    location(f"{run}/checkpoints/{ckpt_io.checkpoint_name(11)}/config.json").write_bytes(b"{}")

    listed = ckpt_io.list_checkpoints(run)
    assert [(s, p.uri) for s, p in listed] == [
        (2, f"{run}/checkpoints/checkpoint-000002"),
        (4, f"{run}/checkpoints/checkpoint-000004"),
    ]
    assert [(p.name, problem.split(" has ")[0]) for p, problem in ckpt_io.damaged_checkpoints(run)] == [
        ("checkpoint-000009", "model.safetensors")
    ]
    latest = ckpt_io.find_latest_checkpoint(run)
    assert isinstance(latest, Location) and ckpt_io.checkpoint_step(latest) == 4
    assert ckpt_io.is_complete(latest) and not ckpt_io.is_complete(damaged)

    copy = ckpt_io.local_checkpoint(latest)  # what a resuming worker loads
    assert copy.is_dir() and ckpt_io.is_complete(copy) and ckpt_io.checkpoint_step(copy) == 4
    assert (copy / "optimizer.pt").read_bytes() == (local_checkpoint / "optimizer.pt").read_bytes()

    final = ckpt_io.export_final(latest, f"{run}/final")
    assert isinstance(final, Location) and final.uri == f"{run}/final"
    assert "config.json" in _names(final) and "model.safetensors" in _names(final)
    assert not _names(final) & {"optimizer.pt", "scheduler.pt", "rng_state.pt"}  # as a local export
    model = AutoModelForCausalLM.from_pretrained(ckpt_io.local_checkpoint(final))
    assert model.config.vocab_size > 0

    ckpt_io.prune_checkpoints(run, keep=1)
    assert [s for s, _ in ckpt_io.list_checkpoints(run)] == [4]
    assert not location(f"{run}/checkpoints/checkpoint-000002").exists()
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*"))


def test_resume_and_overwrite_checks_on_object_storage(
    local_checkpoint, s3_bucket, self_aligned, gpt2_bl_model, tmp_path
):
    """The run-directory checks of ``train`` (refuse, --resume, --overwrite) on an ``s3://`` output."""
    run = f"{s3_bucket}/runs/r2"
    ckpt_io.publish_checkpoint(local_checkpoint, f"{run}/checkpoints/{ckpt_io.checkpoint_name(2)}")
    location(f"{run}/metrics.csv").write_bytes(b"step,loss\n1,2.0\n")
    location(f"{run}/final/config.json").write_bytes(b"{}")
    said: list[str] = []
    kw = {"init_from": str(gpt2_bl_model), "steps": 4, "checkpoint_every": 2, "batch_size": 4}

    config = train_config(self_aligned, run, **kw).resolved()
    assert config.output == run  # the URI unchanged (it used to become the local folder ./s3:/...)
    with pytest.raises(TrainingError, match=rf"{run} already holds checkpoints of a run \(latest: step 2\)"):
        _prepare_output(config, said.append)
    resume_from = _prepare_output(train_config(self_aligned, run, resume=True, **kw).resolved(), said.append)
    assert isinstance(resume_from, Location) and resume_from.uri == f"{run}/checkpoints/checkpoint-000002"
    with pytest.raises(TrainingError, match="settings differ.*batch_size"):
        _prepare_output(
            train_config(self_aligned, run, resume=True, **{**kw, "batch_size": 6}).resolved(), said.append
        )

    assert (
        _prepare_output(train_config(self_aligned, run, overwrite=True, **kw).resolved(), said.append) is None
    )
    assert _names(location(run)) == set()
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*"))


def test_an_output_in_a_missing_bucket_is_refused_before_training(s3_bucket, self_aligned, gpt2_bl_model):
    run = "s3://no-such-bucket-for-train/runs/r1"
    config = train_config(self_aligned, run, init_from=str(gpt2_bl_model)).resolved()
    with pytest.raises(
        TrainingError, match=rf"--output {run}: cannot create the folder.*no-such-bucket-for-train"
    ):
        _prepare_output(config, print)


def test_metrics_on_object_storage_are_uploaded_at_sync_and_close(s3_bucket, tmp_path):
    """metrics.csv and TensorBoard events of an ``s3://`` run directory: spooled locally, uploaded by sync()
    and close(); a resumed run continues the remote file (rows after its checkpoint dropped)."""
    run = location(f"{s3_bucket}/runs/r3")
    cols = ["step", "loss", "lr"]
    log = MetricsLogger(run.uri, cols, total_steps=4, tensorboard=True, console=False)
    spool = log.run_dir
    assert spool.is_dir() and log.target.uri == f"{run.uri}/metrics.csv"
    for s in (1, 2):
        log.log({"step": s, "loss": 1.0 / s, "lr": 0.1})
    log.sync()
    log.log({"step": 3, "loss": 0.25, "lr": 0.1})
    assert (run / "metrics.csv").read_text().splitlines()[1:] == ["1,1,0.1", "2,0.5,0.1"]  # synced: 1, 2
    log.close()
    assert [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()] == [
        "step",
        "1",
        "2",
        "3",
    ]
    events = {n for n in _names(run) if n.startswith("tensorboard/events.out.tfevents.")}
    assert events
    assert not spool.exists()

    # resumed from a checkpoint at step 2: row 3 is dropped, then the run logs 3 and 4 again
    log = MetricsLogger(run.uri, cols, total_steps=4, resume_step=2, tensorboard=True, console=False)
    for s in (3, 4):
        log.log({"step": s, "loss": 0.1 * s, "lr": 0.1})
    log.close()
    local = tmp_path / "metrics.csv"
    local.write_bytes((run / "metrics.csv").read_bytes())
    rows = read_metrics_csv(local)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, pytest.approx(0.3)), (4, 0.4)]
    assert events <= {n for n in _names(run) if n.startswith("tensorboard/")}  # the first run's events kept


def test_a_lora_run_exports_a_merged_final_to_object_storage(
    s3_bucket, self_aligned, gpt2_bl_model, tmp_path
):
    """A LoRA checkpoint on the bucket: final/ at the URI is the merged model (no adapter files), loadable."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from alm_pipeline.trainer.driver import _export_final

    local = tmp_path / "lora-run"
    kw = {"init_from": str(gpt2_bl_model), "steps": 1, "checkpoint_every": 1, "batch_size": 4, "lora_rank": 2}
    train_local(train_config(self_aligned, local, **kw))
    run = location(f"{s3_bucket}/runs/lora")
    checkpoint = ckpt_io.publish_checkpoint(local / "checkpoints" / ckpt_io.checkpoint_name(1), run / "ckpt")
    assert "adapter_config.json" in _names(checkpoint)  # the case this test is about
    final = _export_final(checkpoint, run / "final")
    assert final.uri == f"{run.uri}/final"
    names = _names(final)
    assert "model.safetensors" in names and not any(n.startswith("adapter_") for n in names)
    merged = AutoModelForCausalLM.from_pretrained(ckpt_io.local_checkpoint(final))
    reference = AutoModelForCausalLM.from_pretrained(local / "final")  # the local run's merged export
    for (name, a), (_, b) in zip(merged.state_dict().items(), reference.state_dict().items(), strict=True):
        assert a.equal(b), name
