"""Distributed runtime without Ray: two gloo processes (DDP with GradMag, FSDP2) match one process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from alm_pipeline.trainer.driver import train_local
from tests.factories import losses, train_config


def _distributed_worker(rank: int, world: int, port: int, root: str, teacher: str, queue) -> None:
    """One process of a 2-process gloo group running the same in-process loop (no Ray)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        base = {"init_from": teacher, "steps": 3, "checkpoint_every": 3, "next_token_loss": True}
        runs = {
            # GradMag's per-loss gradients are summed over workers: with one micro-batch per worker the
            # weights (and so the losses) equal those of a single process running the whole batch
            "ddp_gradmag": {"micro_batch_tokens": 100000},
            "fsdp_fixed": {"strategy": "fsdp", "loss_combination": "fixed", "ntp_weight": 0.01},
        }
        for name, kw in runs.items():
            res = train_local(train_config(Path(root) / "aligned", Path(root) / name, **{**base, **kw}))
            out[name] = [r["loss"] for r in res.history]
        if rank == 0:
            queue.put(out)
    except BaseException as err:  # noqa: BLE001 - reported to the test
        queue.put({"error": repr(err)})
        raise
    finally:
        dist.destroy_process_group()


def test_ddp_gradmag_and_fsdp_in_two_processes_match_one_process(small_aligned, gpt2_bl_model, tmp_path):
    """Two gloo processes (no Ray): DDP with GradMag, and FSDP2 (fully_shard) with fixed weights, give the
    single-process losses; the FSDP checkpoint is a complete Hugging Face folder."""
    import socket

    import torch.multiprocessing as mp

    os.symlink(small_aligned, tmp_path / "aligned")
    base = {"init_from": str(gpt2_bl_model), "steps": 3, "checkpoint_every": 3, "next_token_loss": True}
    ref_gradmag = train_local(
        train_config(small_aligned, tmp_path / "ref1", **base, micro_batch_tokens=100000)
    )
    ref_fixed = train_local(
        train_config(small_aligned, tmp_path / "ref2", **base, loss_combination="fixed", ntp_weight=0.01)
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_distributed_worker, args=(r, 2, port, str(tmp_path), str(gpt2_bl_model), queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        out = queue.get(timeout=600)
    finally:
        for p in procs:
            p.join(timeout=60)
    assert "error" not in out, out
    np.testing.assert_allclose(out["ddp_gradmag"], losses(ref_gradmag.history), rtol=1e-5)
    np.testing.assert_allclose(out["fsdp_fixed"], losses(ref_fixed.history), rtol=1e-5)
    from transformers import AutoModelForCausalLM

    fsdp_model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp_fixed" / "final")
    ref_model = AutoModelForCausalLM.from_pretrained(ref_fixed.final_checkpoint)
    x = torch.arange(1, 30)[None]
    with torch.no_grad():
        assert (fsdp_model(x).logits - ref_model(x).logits).abs().max() < 1e-2
