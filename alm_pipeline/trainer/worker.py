"""The per-worker training loop: setup, one optimizer step, checkpoints (the same loop under Ray Train and in this
process; :mod:`alm_pipeline.trainer.runtime` says which).

Every worker holds the index of the training documents (16 bytes per document, :mod:`.index`), never the
documents themselves. The global batch of step ``s`` is a deterministic function of ``(seed, s)`` over the index
(:class:`~alm_pipeline.trainer.data.BatchPlan`, shuffled block-wise); worker ``r`` takes slice ``r`` of it, reads
those documents' row groups ahead of time in a thread (:mod:`.reader`), packs its documents into micro-batches under a token budget (or length-buckets
them) and accumulates gradients over them. The ALM loss of a micro-batch is ``Σ d / (groups of the whole global
batch)`` — the count is known to every worker from the index, so no collective is needed before the backward
(a teacher cache aligned on the fly: one small all-reduce of the step's totals) —
times the world size (DDP averages gradients), so the gradient is exactly that of the mean over the global batch
whatever the number of workers or micro-batches. Workers with fewer micro-batches run empty ones so that all make
the same number of passes. Two losses are combined with fixed weights (one backward of the weighted sum) or
with GradMag over the global batch (:class:`~alm_pipeline.trainer.gradmag.GradMagStep`: per-loss gradients
accumulated apart, all-reduced, weighted once per step). With the ALM loss off (SFT) the student's σ is not
computed.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from alm_pipeline.trainer import checkpoint as ckpt_io
from alm_pipeline.trainer.config import TrainConfig
from alm_pipeline.trainer.data import (
    AlignedRows,
    BatchPlan,
    build_micro_batch,
    dummy_micro_batch,
    plan_micro_batches,
)
from alm_pipeline.trainer.errors import TrainingError
from alm_pipeline.trainer.forward import StudentForward, disable_dropout, micro_batch_token_stats
from alm_pipeline.trainer.gradmag import GradMagStep, fixed_combine
from alm_pipeline.trainer.index import TrainIndex
from alm_pipeline.trainer.loss import alm_loss, next_token_loss
from alm_pipeline.trainer.optim import build_optimizer, build_scheduler, set_schedule
from alm_pipeline.trainer.reader import Prefetcher
from alm_pipeline.trainer.runtime import RayRuntime, Runtime, aligned_info, block_reader

if TYPE_CHECKING:
    from alm_pipeline.trainer.student import StudentConfig

logger = logging.getLogger(__name__)

__all__ = ["FAIL_MARKER", "Worker", "ray_train_loop", "student_config", "training_plan"]

FAIL_MARKER = ".injected_failure"


def student_config(config: TrainConfig, tokenizer: str | None = None) -> StudentConfig:
    """The student a run starts from (before any step), as a :class:`StudentConfig`: ``load_student`` of it
    gives exactly the initial model (``tokenizer``: the student tokenizer spec, default: the data source's)."""
    from alm_pipeline.trainer.student import StudentConfig

    spec = config.student
    shape = {
        "dtype": "float32",
        "num_layers": spec.num_layers,
        "lora_rank": spec.lora_rank,
        "lora_alpha": spec.lora_alpha,
    }
    if spec.student is not None:
        return StudentConfig(model=spec.student, **shape)
    return StudentConfig(
        init_from=spec.init_from, tokenizer=tokenizer or aligned_info(config)["tokenizer"], **shape
    )


def training_plan(config: TrainConfig, index: TrainIndex) -> BatchPlan:
    """The run's step → global batch plan over the index (block-wise shuffle, ``--shuffle-window``)."""
    return BatchPlan(
        index.num_docs,
        config.optim.batch_size,
        config.optim.seed,
        blocks=index.block,
        window=config.data.shuffle_window,
    )


def _same_tokenizer(a, b) -> bool:
    """Two byte views tokenize identically: same token bytes, special flags and added prefix/suffix tokens."""
    return (
        a.vocab_size == b.vocab_size
        and list(a.token_bytes) == list(b.token_bytes)
        and np.array_equal(a.is_special, b.is_special)
        and list(a.prefix_ids) == list(b.prefix_ids)
        and list(a.suffix_ids) == list(b.suffix_ids)
    )


class Worker:
    """One worker's training loop (:meth:`run`)."""

    def __init__(self, config: TrainConfig, runtime: Runtime):
        self.config = config
        self.rt = runtime
        self.skipped_steps = (
            0  # optimizer steps skipped for a non-finite gradient or loss, over the whole run
        )
        self.nonfinite_in_a_row = 0

    # ------------------------------------------------------------------ setup
    def _load_student(self, resume: Path | None):
        from alm_pipeline.trainer.student import StudentConfig, StudentInfo, load_student

        cfg = self.config
        if resume is not None:
            bundle = load_student(StudentConfig(model=str(resume), dtype="float32"))
            info_file = resume / "student_info.json"
            if info_file.exists():  # keep how the student was originally built (FVT counts, source, ...)
                with contextlib.suppress(TypeError, ValueError):
                    bundle.info = StudentInfo(**json.loads(info_file.read_text()))
            return bundle
        sc = student_config(cfg, self.info["tokenizer"])
        return load_student(sc)

    def _pick_resume(self) -> tuple[Path | None, dict | None]:
        best: tuple[int, Path] | None = None
        for cand in self.rt.resume_candidates():
            if not ckpt_io.is_complete(cand):
                continue
            step = ckpt_io.checkpoint_step(cand)
            if best is None or step > best[0]:
                best = (step, cand)
        if best is None:
            return None, None
        state = ckpt_io.read_trainer_state(best[1])
        mine = self.config.data_identity()
        theirs = state.get("data_identity", {})
        diffs = ckpt_io.identity_diffs(theirs, mine)
        if state.get("num_docs") is not None and state["num_docs"] != self.index.num_docs:
            diffs.append(f"usable documents: checkpoint {state['num_docs']}, this run {self.index.num_docs}")
        elif state.get("index_digest") not in (None, self.index.digest):
            diffs.append(
                "training documents: not the ones the checkpoint was trained on (another aligned set?)"
            )
        if diffs:
            raise ckpt_io.CheckpointError(ckpt_io.settings_differ(best[1], diffs))
        return best[1], state

    def setup(self) -> None:
        cfg = self.config
        rt = self.rt
        with contextlib.suppress(
            Exception
        ):  # "Loading weights" / "Writing model shards" bars of every worker
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        threads = cfg.distributed.torch_threads or max(
            1, (os.cpu_count() or 1) // max(1, cfg.distributed.num_workers)
        )
        torch.set_num_threads(threads)
        torch.manual_seed(cfg.optim.seed)
        self.device = rt.device()
        self.info = aligned_info(cfg)
        timings: dict[str, float] = {}
        t = time.monotonic()
        timings["before_setup"] = round(t - self.t_start, 2)

        index = rt.index()
        timings["index"] = round(time.monotonic() - t, 2)
        if index.num_docs == 0:
            raise TrainingError(
                f"the training data has no usable document ({index.documents_read} read; dropped: "
                f"{index.dropped}); check the aligned set's coverage"
            )
        self.index = index
        self.reader = block_reader(cfg, index)
        self.plan = training_plan(cfg, index)
        # packed rows hold up to the longest document (stream mode: the longest of the worker's step)
        self.pack_length = int(index.length.max()) if index.sizes_known else None
        t = time.monotonic()
        self.sample = self.reader.sample(2)
        timings["sample"] = round(time.monotonic() - t, 2)
        if self.sample.num_docs == 0:
            raise TrainingError(
                f"the training data has no usable document ({index.documents_read} read, none trainable after "
                "aligning them); check the student tokenizer and the cache"
            )

        self.resume_path, self.resume_state = self._pick_resume()
        t = time.monotonic()
        bundle = self._load_student(self.resume_path)
        timings["load_student"] = round(time.monotonic() - t, 2)
        from alm_pipeline.pipeline.byteview import load_byte_view

        expected = load_byte_view(self.info["tokenizer"])
        if not _same_tokenizer(bundle.view, expected):
            raise TrainingError(
                f"the student's tokenizer ({bundle.info.tokenizer}) is not the aligned set's student tokenizer "
                f"({self.info['tokenizer']}): the chunk indices would point at other tokens. Use the student the set "
                "was aligned for, or --init-from for a tokenizer transfer"
            )
        self.vocab_size = bundle.view.vocab_size
        self._check_vocab(self.sample)
        self.bundle = bundle
        model = bundle.model
        if cfg.student.disable_dropout:
            disable_dropout(model)
        if cfg.compute.gradient_checkpointing:
            hf = model.get_base_model() if hasattr(model, "get_base_model") else model
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model.to(self.device)
        self.pad_id = next((i for i in (bundle.view.pad_id, bundle.view.eos_id) if i is not None), 0)
        self.recompute_logits = cfg.compute.recompute(bundle.view.vocab_size)
        wrapper = StudentForward(
            model,
            bundle.view.boundary_mask,
            cfg.compute.slice_size,
            self.recompute_logits,
            boundary_logprobs=cfg.loss.alm,  # σ only for the ALM loss
        ).to(self.device)
        self.wrapper = wrapper
        sample = torch.as_tensor(self.sample.input_ids(0)[:64], dtype=torch.long, device=self.device)[None]
        wrapper.self_check(sample, tol=1e-3 if not cfg.compute.bf16 else 5e-2)
        self.packing = cfg.compute.packing and self._packing_works()

        self.alm_cfg = cfg.loss.alm_config(self.info["debias"])
        self.fixed_weights = {"alm": cfg.combine.alm_weight, "ntp": cfg.combine.ntp_weight}
        self.model = self._wrap(wrapper)
        self.gradmag: GradMagStep | None = None
        if cfg.gradmag:
            from alm_pipeline.trainer.model_surgery import last_layer_parameters

            self.gradmag = GradMagStep(
                ["alm", "ntp"],
                [p for p in self.model.parameters() if p.requires_grad],
                last_layer_parameters(model),
            )
        self.optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad], cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.start_step = 0
        if self.resume_path is not None:
            self._load_training_state(self.resume_path)
        timings["setup_total"] = round(time.monotonic() - self.t_start, 2)
        if rt.rank == 0:
            rt.emit(
                "info",
                {
                    "documents": index.num_docs,
                    "documents_read": index.documents_read,
                    "dropped": index.dropped,
                    "groups": int(index.chunks.sum()) if index.sizes_known else None,
                    "student_tokens": int(index.length.sum()) if index.sizes_known else None,
                    "blocks": index.num_blocks,
                    "index_mib": round(index.nbytes / 2**20, 1),
                    "student": bundle.info.to_dict(),
                    "packing": self.packing,
                    "world_size": rt.world_size,
                    "device": str(self.device),
                    "start_step": self.start_step,
                    "resumed_from": str(self.resume_path) if self.resume_path else None,
                    "debias": self.alm_cfg.debias,
                    "warmup_steps": cfg.optim.warmup,
                    "recompute_logits": self.recompute_logits,
                    "setup_s": timings,
                },
            )

    def _packing_works(self) -> bool:
        """Packed rows (position ids restarting per document) must give each document the logits it gets alone;
        otherwise this model's attention crosses documents and we fall back to length bucketing."""
        sample = self.sample
        docs = [0, 1] if sample.num_docs >= 2 else [0, 0]
        a, b = (torch.as_tensor(sample.input_ids(d)[:32], dtype=torch.long) for d in docs)
        packed = torch.cat([a, b])[None].to(self.device)
        pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None].to(self.device)

        def per_position(*args, **kwargs) -> torch.Tensor:  # σ, or ℓ when σ is not computed (SFT)
            lp, sigma = self.wrapper(*args, **kwargs)
            return (lp if sigma is None else sigma)[0]

        with torch.no_grad():
            self.wrapper.eval()
            try:
                mask = torch.ones_like(packed, dtype=torch.bool)
                got = per_position(packed, mask, position_ids=pos)
                ref = torch.cat(
                    [
                        per_position(a[None].to(self.device), mask[:, : len(a)]),
                        per_position(b[None].to(self.device), mask[:, : len(b)]),
                    ]
                )
            finally:
                self.wrapper.train()
        keep = torch.ones_like(got, dtype=torch.bool)
        keep[len(a)] = False  # ℓ of b's first token: predicted from a's last one in the packed row
        diff = float((got - ref)[keep].abs().max())
        ok = diff <= (1e-3 if not self.config.compute.bf16 else 5e-2)
        if not ok and self.rt.rank == 0:
            logger.warning(
                "packing disabled: %s does not keep attention inside packed documents (max diff %.2e); "
                "using length bucketing",
                type(self.wrapper.hf_model()).__name__,
                diff,
            )
        return ok

    def _wrap(self, wrapper: StudentForward) -> nn.Module:
        cfg = self.config
        if self.rt.world_size == 1 or not self.rt.distributed:
            return wrapper
        if cfg.distributed.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(
                wrapper, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        from torch.distributed.fsdp import fully_shard

        from alm_pipeline.trainer.model_surgery import transformer_layers

        for layer in transformer_layers(wrapper.model):
            fully_shard(layer)
        fully_shard(wrapper)
        return wrapper

    def _load_training_state(self, path: Path) -> None:
        state = ckpt_io.load_training_state(path)
        if state["optimizer"] is not None:
            if self.config.distributed.strategy == "fsdp" and self.rt.world_size > 1:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(
                    self.model,
                    self.optimizer,
                    optim_state_dict=state["optimizer"],
                    options=StateDictOptions(full_state_dict=True),
                )
            else:
                self.optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
            set_schedule(self.optimizer, self.scheduler, self.config.optim)
        if state["rng"] is not None:
            with contextlib.suppress(Exception):
                torch.set_rng_state(state["rng"]["torch"])
        self.start_step = int(state["trainer_state"]["step"])
        self.skipped_steps = int(state["trainer_state"].get("skipped_steps", 0))

    # ------------------------------------------------------------------ one optimizer step
    def _sync(self, last: bool):
        model = self.model
        if hasattr(model, "no_sync") and not last:
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _fixed_weights(self, names) -> dict[str, float]:
        """One loss: weight 1 (whatever the fixed weights); two: ``--alm-weight`` / ``--ntp-weight``."""
        names = list(names)
        return {names[0]: 1.0} if len(names) == 1 else {n: self.fixed_weights[n] for n in names}

    def _average_over_workers(self, tensor: torch.Tensor) -> torch.Tensor:
        """As DDP reduces gradients (the losses are scaled by the world size): the mean over the workers."""
        if self.rt.distributed and self.rt.world_size > 1:
            dist.all_reduce(tensor)
            tensor /= self.rt.world_size
        return tensor

    def _check_vocab(self, rows: AlignedRows) -> None:
        if int(rows.ids.max(initial=0)) >= self.vocab_size:
            raise TrainingError("the aligned set holds token ids outside the student vocabulary")

    def _fetch(self, step: int) -> tuple[np.ndarray, AlignedRows, int]:
        """(global batch, this worker's documents of it, documents skipped as untrainable): in the prefetch
        thread, which alone touches the plan and the reader once training runs."""
        batch = self.plan.global_batch(step)
        before = self.reader.skipped
        rows = self.reader.rows(self.plan.worker_slices(batch, self.rt.world_size)[self.rt.rank])
        return batch, rows, self.reader.skipped - before

    def _step_layout(self, batch: np.ndarray, rows: AlignedRows, skipped: int) -> tuple[list, int, dict]:
        """This worker's micro-batch layouts, the number of passes every worker makes, and the global batch's
        totals (from the index; stream mode, where sizes are known only after aligning: one all-reduce)."""
        rt, index = self.rt, self.index
        plan_kw = {
            "max_tokens": self.config.compute.micro_batch_tokens,
            "packing": self.packing,
            "pack_length": self.pack_length,
        }
        if index.sizes_known:
            slices = self.plan.worker_slices(batch, rt.world_size)
            layouts_all = [plan_micro_batches(index.length[s], **plan_kw) for s in slices]
            lengths = index.length[batch].astype(np.int64)
            totals = {
                "groups": int(index.chunks[batch].sum()),
                "predicted": int((lengths - 1).sum()),
                "tokens": int(lengths.sum()),
                "docs": len(batch),
                "skipped": 0,
            }
            return layouts_all[rt.rank], max(len(lay) for lay in layouts_all), totals
        mine = plan_micro_batches(rows.lengths, **plan_kw)
        lengths = rows.lengths.astype(np.int64)
        local = [
            int(rows.num_groups.sum()),
            int((lengths - 1).sum()),
            int(lengths.sum()),
            rows.num_docs,
            skipped,
        ]
        counts = torch.tensor(local, dtype=torch.int64)
        passes = torch.tensor([len(mine)], dtype=torch.int64)
        if rt.distributed and rt.world_size > 1:
            # on NCCL the tensors must live on the device
            counts, passes = counts.to(self.device), passes.to(self.device)
            dist.all_reduce(counts)
            dist.all_reduce(passes, op=dist.ReduceOp.MAX)
        totals = dict(
            zip(("groups", "predicted", "tokens", "docs", "skipped"), counts.cpu().tolist(), strict=True)
        )
        return mine, int(passes.item()), totals

    def _step(self, step: int) -> dict:
        cfg, rt = self.config, self.rt
        t0 = time.perf_counter()
        batch, rows, skipped = self.prefetch.get(step)
        self._check_vocab(rows)
        layouts, n_micro, totals = self._step_layout(batch, rows, skipped)
        self.skipped_docs += totals["skipped"]
        mine = np.arange(rows.num_docs)
        micro = [build_micro_batch(rows, mine, lay, self.pad_id) for lay in layouts]
        micro += [dummy_micro_batch(self.pad_id) for _ in range(n_micro - len(micro))]
        n_groups, n_pred, n_tokens = totals["groups"], totals["predicted"], totals["tokens"]
        scale = float(rt.world_size)
        # [Σ distances, Σ nll, Σ ALM loss, Σ next-token loss, padded tokens, Σ |ΔC|·groups], accumulated on the
        # device: no host synchronisation per micro-batch
        sums = torch.zeros(6, dtype=torch.float64, device=self.device)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.compute.bf16)
        weights: dict[str, float] = {}
        for k, mb in enumerate(micro):
            mb = mb.to(self.device)
            # GradMag reduces its per-loss gradients itself, after the last micro-batch
            with self._sync(k == n_micro - 1 and self.gradmag is None):
                with amp:
                    lp, sigma = self.model(
                        mb.input_ids,
                        mb.attention_mask,
                        attention_mask=None if mb.packed else mb.attention_mask.long(),
                        position_ids=mb.position_ids if mb.packed else None,
                    )
                stats = micro_batch_token_stats(lp.float(), None if sigma is None else sigma.float(), mb)
                losses: dict[str, torch.Tensor] = {}
                if cfg.loss.alm:
                    out = alm_loss(stats, mb.groups, self.alm_cfg, num_groups_global=n_groups)
                    losses["alm"] = out.loss * scale
                    sums[0] += out.loss_sum.double()
                    sums[2] += losses["alm"].detach().double() / scale
                    sums[5] += out.mean_abs_logprob_diff.double() * out.num_groups
                if cfg.loss.next_token_loss:
                    nt = next_token_loss(stats, num_tokens_global=n_pred)
                    losses["ntp"] = nt.loss * scale
                    sums[1] += nt.loss_sum.double()
                    sums[3] += losses["ntp"].detach().double() / scale
                if self.gradmag is not None:
                    self.gradmag.backward(losses)
                else:
                    weights = self._fixed_weights(losses)
                    fixed_combine(losses, weights).loss.backward()
            sums[4] += mb.padded_tokens if mb.num_docs else 0
        if self.gradmag is not None:  # the weights of the global batch; .grad = Σ w·∇L
            weights, _ = self.gradmag.finish(self._average_over_workers)
        if rt.distributed and rt.world_size > 1:
            dist.all_reduce(sums)
        sums = sums.cpu()
        # the global batch's loss: Σ w_i·L_i over the global per-loss losses
        loss = weights.get("alm", 0.0) * float(sums[2]) + weights.get("ntp", 0.0) * float(sums[3])
        self._debug_poison_gradient(step)
        if cfg.optim.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_params(), cfg.optim.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_params(), float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        lr = float(self.optimizer.param_groups[0]["lr"])
        # The gradients are already reduced over the workers (DDP in backward, GradMag in finish, FSDP's norm is
        # global) and the loss is all-reduced, so every worker takes the same decision. A non-finite step is not
        # applied: the weights and the optimizer state stay as they are; the scheduler and the step counter still
        # advance, so the batch plan and the schedule stay functions of (seed, step).
        finite = math.isfinite(float(grad_norm)) and math.isfinite(loss)
        if finite:
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            limit = cfg.optim.max_nonfinite_steps
            what = f"gradient norm {float(grad_norm)}, loss {loss}"
            if self.nonfinite_in_a_row >= limit:
                raise TrainingError(
                    f"{self.nonfinite_in_a_row} optimizer steps in a row (up to step {step + 1}) had a "
                    f"non-finite gradient or loss ({what}); stopping (--max-nonfinite-steps {limit}). The "
                    "skipped steps did not change the weights; lower the learning rate or check the data"
                )
            if rt.rank == 0:
                rt.emit(
                    "info",
                    {
                        "message": f"warning: step {step + 1} skipped: non-finite gradient or loss ({what}); "
                        f"{self.nonfinite_in_a_row} in a row (stop at {limit})"
                    },
                )
        dt = time.perf_counter() - t0
        row: dict[str, Any] = {"step": step + 1, "loss": loss}
        if cfg.loss.alm:
            row["loss_alm"] = float(sums[0]) / max(n_groups, 1)
        if cfg.loss.next_token_loss:
            row["loss_ntp"] = float(sums[1]) / max(n_pred, 1)
        if cfg.loss.alm and cfg.loss.next_token_loss:
            row["weight_alm"] = weights["alm"]
            row["weight_ntp"] = weights["ntp"]
        padded = float(sums[4])
        row.update(
            {
                "valid_chunks": n_groups,
                "docs": totals["docs"],
                "student_tokens": n_tokens,
                "padding": 0.0 if padded == 0 else max(0.0, 1.0 - n_tokens / padded),
                "tokens_per_s": n_tokens / dt if dt > 0 else 0.0,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "step_time_s": dt,
                "epoch": self.plan.epoch(step + 1),
                "elapsed_s": time.monotonic() - self.t_start,
            }
        )
        if cfg.loss.alm:
            row["mean_abs_chunk_logprob_diff"] = float(sums[5]) / max(n_groups, 1)
        row["skipped_steps"] = self.skipped_steps
        if not self.index.sizes_known:
            row["skipped_docs"] = self.skipped_docs
        return row

    def _debug_poison_gradient(self, step: int) -> None:
        """Test hook (``debug.nan_grad_at_step``): a NaN in one gradient, on every worker, after the backward."""
        first, count = self.config.debug.nan_grad_at_step, self.config.debug.nan_grad_steps
        if first is None or not (first <= step + 1 < first + count):
            return
        param = self.trainable_params()[0]
        with torch.no_grad():
            param.grad.mul_(float("nan"))  # elementwise: also a sharded (DTensor) gradient

    def trainable_params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]

    # ------------------------------------------------------------------ checkpoints
    def _save(self, step: int, row: dict) -> None:
        cfg = self.config
        model_sd = None
        if cfg.distributed.strategy == "fsdp" and self.rt.world_size > 1:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(self.model, options=opts)
            model_sd = {k.removeprefix("model."): v for k, v in full.items()}
            optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        else:
            optim_sd = self.optimizer.state_dict() if self.rt.rank == 0 else None
        state = {
            "step": step,
            "steps": cfg.optim.steps,
            "data_position": self.plan.position(step),
            "epoch": self.plan.epoch(step),
            "num_docs": self.index.num_docs,
            "index_digest": self.index.digest,
            "world_size": self.rt.world_size,
            "data_identity": cfg.data_identity(),
            "loss": row.get("loss"),
            "lr": row.get("lr"),
            "skipped_steps": self.skipped_steps,
            # the rows of the last steps: a resumed run writes those its killed predecessor had not logged yet
            "recent_metrics": list(self.recent_rows),
            "time": time.time(),
            "torch": torch.__version__,
        }

        def write(path: Path) -> None:
            ckpt_io.write_checkpoint(
                path,
                self.bundle,
                trainer_state=state,
                optimizer_state=optim_sd,
                scheduler_state=self.scheduler.state_dict(),
                model_state_dict=model_sd,
                rng_state={"torch": torch.get_rng_state()},
            )

        self.rt.save(step, row, write)

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict:
        self.t_start = time.monotonic()
        self.setup()
        cfg = self.config
        self.recent_rows: collections.deque[dict] = collections.deque(
            maxlen=max(2 * cfg.checkpoint.every, 64)
        )
        if self.start_step >= cfg.optim.steps and self.rt.rank == 0:
            self.rt.emit(
                "info",
                {
                    "message": f"nothing to do: the checkpoint is at step {self.start_step} >= {cfg.optim.steps}"
                },
            )
        self.skipped_docs = 0
        self.prefetch = Prefetcher(
            self._fetch, range(self.start_step, cfg.optim.steps), cfg.data.prefetch_steps
        )
        try:
            self._loop()
        finally:
            self.prefetch.close()
            self.reader.close()
        return {"start_step": self.start_step, "last_row": self.last_row}

    def _loop(self) -> None:
        cfg = self.config
        self.last_row = None
        for step in range(self.start_step, cfg.optim.steps):
            row = self._step(step)
            self.last_row = row
            self.recent_rows.append(row)
            if self.rt.rank == 0:
                self.rt.emit("row", row)
            done = step + 1
            if done % cfg.checkpoint.every == 0 or done == cfg.optim.steps:
                self._save(done, row)
            if cfg.debug.fail_at_step is not None and done == cfg.debug.fail_at_step:
                from alm_pipeline.storage import location

                marker = location(cfg.output) / FAIL_MARKER  # a local path or a URI
                self.rt.barrier()
                if not marker.exists():
                    if self.rt.rank == 0:
                        marker.write_bytes(f"injected failure after step {done}\n".encode())
                    raise RuntimeError(f"injected failure after step {done} (fail_at_step)")


def ray_train_loop(loop_config: dict) -> None:
    """Entry point of every Ray Train worker."""
    config = TrainConfig.from_dict(loop_config["config"])
    runtime = RayRuntime(
        config,
        loop_config.get("queue"),
        loop_config.get("resume_from"),
        loop_config["index"],
    )
    Worker(config, runtime).run()
