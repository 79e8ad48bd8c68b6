"""The per-worker training step (alm_pipeline.trainer.worker), in this process: GradMag weighs the losses of the
global batch once per optimizer step; next-token training alone (SFT) computes no σ."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from alm_pipeline.cache.aligned import open_aligned_set
from alm_pipeline.trainer.data import build_micro_batch, plan_micro_batches
from alm_pipeline.trainer.driver import train_local
from alm_pipeline.trainer.forward import disable_dropout
from alm_pipeline.trainer.loss import alm_loss, next_token_loss, student_token_stats
from alm_pipeline.trainer.model_surgery import last_layer_parameters
from alm_pipeline.trainer.runtime import LocalRuntime, aligned_info, read_aligned_rows, training_index
from alm_pipeline.trainer.student import load_student
from alm_pipeline.trainer.worker import Worker, student_config, training_plan
from tests.factories import losses, train_config

STEPS = 3


def _rows_and_plan(cfg):
    """The run's trainable documents in index order, and its batch plan (as the worker builds it)."""
    need_groups = cfg.loss.alm and not cfg.loss.next_token_loss
    rows, _ = read_aligned_rows(open_aligned_set(cfg.data.aligned).shard_files()).select_trainable(
        need_groups=need_groups
    )
    plan = training_plan(cfg, training_index(cfg))
    assert plan.num_docs == rows.num_docs
    return rows, plan


def _step_weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (weights,) = sorted((run_dir / "checkpoints" / f"checkpoint-{step:06d}").glob("*.safetensors"))
    return load_file(weights)


def _fresh_student(cfg):
    """The run's initial student, built again (``load_student(student_config(cfg))`` is the worker's own start),
    without dropout (as the worker runs it by default)."""
    bundle = load_student(student_config(cfg, aligned_info(cfg)["tokenizer"]))
    disable_dropout(bundle.model)
    bundle.model.train()
    return bundle


def test_gradmag_weights_do_not_depend_on_micro_batching(small_aligned, gpt2_bl_model, tmp_path):
    """ALM + next-token loss with GradMag: cutting every global batch into several micro-batches gives the same
    per-step weights, losses, gradient norm and parameters as one pass over it (the weights are those of the
    global batch, computed once per optimizer step)."""
    kw = {
        "init_from": str(gpt2_bl_model),
        "steps": STEPS,
        "next_token_loss": True,
        "checkpoint_every": 1,
        "keep_checkpoints": 0,
        # Adam's first step is lr·g/(|g| + ε): with the default ε = 1e-8 it blows the rounding noise of gradients
        # that are exactly 0 in theory (GPT-2's key biases) up to visible updates, whatever the micro-batching
        "adam_eps": 1e-6,
    }
    rows, plan = _rows_and_plan(train_config(small_aligned, tmp_path / "x", **kw))
    pack = {"packing": True, "pack_length": int(rows.lengths.max())}  # as the worker packs
    for step in range(STEPS):
        lengths = rows.lengths[plan.global_batch(step)]
        # the case under test: several micro-batches per step, against one
        assert len(plan_micro_batches(lengths, max_tokens=96, **pack)) >= 3
        assert len(plan_micro_batches(lengths, max_tokens=10**6, **pack)) == 1
    many = train_local(train_config(small_aligned, tmp_path / "many", micro_batch_tokens=96, **kw))
    one = train_local(train_config(small_aligned, tmp_path / "one", micro_batch_tokens=10**6, **kw))
    w = losses(one.history, "weight_alm")
    assert np.all((w > 0) & (w < 1)), w  # both losses have a gradient
    np.testing.assert_allclose(losses(many.history, "weight_alm") + losses(many.history, "weight_ntp"), 1.0)
    for key in ("weight_alm", "weight_ntp", "loss", "loss_alm", "loss_ntp", "grad_norm"):
        np.testing.assert_allclose(
            losses(many.history, key), losses(one.history, key), rtol=2e-5, err_msg=key
        )
    # the same updates up to rounding, which Adam amplifies step after step (< 2 % of the learning rate 3e-3)
    for step, atol in ((1, 1e-5), (STEPS, 6e-5)):
        a, b = _step_weights(tmp_path / "many", step), _step_weights(tmp_path / "one", step)
        for name, value in a.items():
            torch.testing.assert_close(value, b[name], rtol=0, atol=atol, msg=f"step {step}: {name}")


def test_logged_gradmag_weights_equal_an_independent_computation(small_aligned, gpt2_bl_model, tmp_path):
    """weight_alm / weight_ntp of step 1 (a micro-batched run) = 1/‖∇_last block L_i‖ normalised, with ∇ of each
    full-batch loss taken by plain autograd through the model's own logits on a fresh copy of the student."""
    cfg = train_config(
        small_aligned,
        tmp_path / "run",
        init_from=str(gpt2_bl_model),
        steps=1,
        next_token_loss=True,
        micro_batch_tokens=96,
    )
    row = train_local(cfg).history[0]

    student = _fresh_student(cfg)
    model = student.model
    rows, plan = _rows_and_plan(cfg)
    batch = plan.global_batch(0)
    mb = build_micro_batch(rows, batch, [[i] for i in range(len(batch))], pad_id=0)  # one document per row
    assert not mb.packed
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask.long()).logits.float()
    stats = student_token_stats(
        mb.input_ids, student.view.boundary_mask, logits=logits, attention_mask=mb.attention_mask
    )
    full = {
        "alm": alm_loss(stats, mb.groups, cfg.loss.alm_config(aligned_info(cfg)["debias"])).loss,
        "ntp": next_token_loss(stats).loss,
    }
    assert full["alm"].item() == pytest.approx(row["loss_alm"], rel=1e-5)  # the same model and batch
    assert full["ntp"].item() == pytest.approx(row["loss_ntp"], rel=1e-5)
    last = last_layer_parameters(model)
    norms = {}
    for name, loss in full.items():
        grads = torch.autograd.grad(loss, last, retain_graph=True)
        norms[name] = float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)))
    inv = {name: 1.0 / n for name, n in norms.items()}
    for name in ("alm", "ntp"):
        assert row[f"weight_{name}"] == pytest.approx(inv[name] / sum(inv.values()), rel=1e-4), name
    assert row["loss"] == pytest.approx(
        row["weight_alm"] * row["loss_alm"] + row["weight_ntp"] * row["loss_ntp"], rel=1e-6
    )


def test_sft_run_is_the_mean_next_token_nll_and_computes_no_sigma(small_aligned, gpt2_bl_model, tmp_path):
    """--no-alm --next-token-loss: the loss of step 1 is the student's mean next-token NLL over the tokens of the
    global batch (from the model's own logits), and the worker's forward computes no σ."""
    cfg = train_config(
        small_aligned,
        tmp_path / "run",
        init_from=str(gpt2_bl_model),
        steps=2,
        alm=False,
        next_token_loss=True,
    )
    res = train_local(cfg)
    first = res.history[0]
    assert not {"loss_alm", "weight_alm", "mean_abs_chunk_logprob_diff"} & set(first)

    model = _fresh_student(cfg).model
    rows, plan = _rows_and_plan(cfg)
    nll, count = 0.0, 0
    with torch.no_grad():
        for doc in plan.global_batch(0):
            ids = torch.as_tensor(rows.input_ids(int(doc)), dtype=torch.long)
            logits = model(input_ids=ids[None]).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
            count += len(ids) - 1
    assert count > 100
    assert first["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert first["loss_ntp"] == pytest.approx(nll / count, rel=1e-5)
    assert res.history[1]["loss"] < first["loss"]

    # the worker's forward returns no σ (and the packing check passed on ℓ alone)
    worker = Worker(cfg, LocalRuntime(cfg.resolved(), None, None))
    worker.t_start = time.monotonic()
    worker.setup()
    assert worker.packing
    mb = build_micro_batch(worker.sample, np.arange(2), [[0, 1]], worker.pad_id)
    lp, sigma = worker.model(mb.input_ids, mb.attention_mask, position_ids=mb.position_ids)
    assert sigma is None and lp.shape == mb.input_ids.shape
