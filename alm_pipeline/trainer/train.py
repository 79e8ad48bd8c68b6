"""Distil a student from cached teacher likelihoods with Ray Train (``alm-pipeline train``).

The teacher is never loaded: its per-group log-likelihoods come from an aligned set (``--aligned``; or a teacher
cache aligned on the fly, ``--cache`` + ``--student-tokenizer``).

How a run works
---------------
* **Driver** (:func:`run_training`): validates the configuration and the aligned set, starts/joins Ray, reads the
  aligned set through Ray Data (``read_parquet`` of its shards) and launches a ``TorchTrainer`` with
  ``num_workers`` workers (DDP, or FSDP2 ``fully_shard`` with ``strategy="fsdp"``). Rank 0 sends one metrics
  row per optimizer step back through a Ray queue; the driver writes ``metrics.csv``, TensorBoard event files
  (and W&B) and shows progress with an ETA. At the end the latest checkpoint is published as
  ``<output>/final`` (a plain Hugging Face folder; LoRA merged).
* **Workers** (:class:`_Worker`): every worker reads the whole (small) aligned set through
  ``ray.train.get_dataset_shard`` (not split: Ray's equal split may drop rows) and holds it as flat numpy arrays
  in a canonical order. The global batch of step ``s`` is a deterministic function of ``(seed, s)``
  (:class:`~alm_pipeline.trainer.data.BatchPlan`); worker ``r`` takes slice ``r`` of it, packs its documents into
  micro-batches under a token budget (or length-buckets them) and accumulates gradients over them. The ALM
  loss of a micro-batch is ``Σ d / (groups of the whole global batch)`` — the count is known to every worker
  from the plan, so no collective is needed before the backward — times the world size (DDP averages
  gradients), so the gradient is exactly that of the mean over the global batch whatever the number of
  workers or micro-batches. Workers with fewer micro-batches run empty ones so that all make the same number of
  passes.
* **Checkpoints** (every ``checkpoint_every`` steps and at the end): a Hugging Face folder (model + tokenizer) +
  optimizer + scheduler + ``trainer_state.json`` (step, data position), reported to Ray Train
  (``<output>/checkpoints/checkpoint-NNNNNN``). ``resume=True`` continues from the latest one, and Ray Train's
  ``FailureConfig(max_failures)`` restarts failed workers from it; since the data order is a function of the step,
  a resumed run repeats an uninterrupted run's loss curve.

* **Student statistics**: :class:`StudentForward` runs the model body once and the LM head in slices with a fused
  fp32 softmax (:func:`~alm_pipeline.trainer.token_stats.fused_token_stats`, tested equal to
  :func:`~alm_pipeline.trainer.token_stats.student_token_stats`
  in values and gradients); the probabilities are kept for the backward when a micro-batch's fit
  ``logits_memory_mib``, else the logits are recomputed slice by slice (memory ``O(slice × vocab)``).

:func:`train_local` runs the same worker loop in this process without Ray (one worker, or inside an existing
``torch.distributed`` process group): for notebooks, debugging and tests.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from alm_pipeline.cache.aligned import TRAINER_COLUMNS
from alm_pipeline.pipeline.ray_utils import RayConfig
from alm_pipeline.trainer import checkpoint as ckpt_io
from alm_pipeline.trainer.data import (
    AlignedRows,
    BatchPlan,
    MicroBatch,
    build_micro_batch,
    dummy_micro_batch,
    plan_micro_batches,
)
from alm_pipeline.trainer.loss import (
    DISTANCES,
    ALMLossConfig,
    StudentTokenStats,
    alm_loss,
    next_token_loss,
    student_token_stats,
)
from alm_pipeline.trainer.token_stats import fused_token_stats

if TYPE_CHECKING:
    from alm_pipeline.trainer.student import StudentConfig

logger = logging.getLogger(__name__)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "lr_factor",
    "run_training",
    "student_config",
    "train_local",
]

RUN_FILE = "run.json"
_FAIL_MARKER = ".injected_failure"


class TrainingError(RuntimeError):
    """Training could not start or failed; the message names the cause."""


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs (the CLI fills it from ``alm-pipeline train`` options).

    Data (exactly one source):
        aligned: an aligned set directory (``alm-pipeline align``); the student tokenizer is the set's.
        cache, student_tokenizer: a teacher cache and a student tokenizer (folder or ``"bytes"``): aligned on the
            fly (streaming; needs ``alm_pipeline.pipeline.align_stage.stream_aligned``).
        gamma, max_student_length: alignment settings for ``cache`` (default: the align stage's).

    Student (exactly one of):
        student: an existing causal LM (folder, asset name or hub name) used with its own tokenizer, which must
            be the aligned set's student tokenizer.
        init_from: tokenizer transfer: the model (usually the teacher) whose blocks the student starts from; its
            embeddings are rebuilt for the student tokenizer with ``embedding_init`` (``"fvt"``).
        num_layers: keep only the first N transformer blocks. lora_rank / lora_alpha: train LoRA adapters.

    Optimisation (defaults after the paper, reference §11.1):
        steps, batch_size (documents per optimizer step, over all workers), micro_batch_tokens (padded tokens per
        forward pass per worker; more documents are gradient-accumulated), packing (several documents per row,
        attention kept inside each document; falls back to length bucketing when the model cannot), lr,
        warmup_steps (linear warm-up, default 10 % of ``steps``, then linear decay to 0), Adam without weight decay
        (``weight_decay > 0`` switches to AdamW), betas (0.9, 0.95), eps 1e-8, gradient clipping at
        ``max_grad_norm`` (None: off; the norm is always logged), bf16 (autocast; weights and the loss
        statistics stay fp32).

    Loss (reference §5, §6, §9):
        distance (binary_kl), tau (100), debias (None: as stored in the aligned set), next_token_loss (off),
        loss_combination (``gradmag``: weights ∝ 1/‖∇ last block‖; ``fixed``: ``alm_weight``, ``ntp_weight``),
        alm (on; turn off only for a next-token-only baseline).

    Distribution: num_workers, use_gpu, strategy (``ddp`` | ``fsdp``), cpus_per_worker (default: what leaves one
    CPU of the cluster to Ray Data, at most 1), torch_threads, ray (address / local instance).

    Checkpoints: output (run directory), checkpoint_every, keep_checkpoints (None: all), resume, overwrite,
    max_failures (Ray Train ``FailureConfig``).

    Logging: log_every (console line interval when not on a terminal), tensorboard, wandb_project /
    wandb_run_name (W&B when installed and asked for), progress.
    """

    # data
    aligned: str | None = None
    cache: str | None = None
    student_tokenizer: str | None = None
    gamma: float | None = None
    max_student_length: int | None = None
    # student
    student: str | None = None
    init_from: str | None = None
    embedding_init: str = "fvt"
    num_layers: int | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    # optimisation
    output: str = "runs/exp"
    steps: int = 1000
    batch_size: int = 32
    micro_batch_tokens: int = 8192
    packing: bool = True
    lr: float = 1e-5
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    # loss
    alm: bool = True
    distance: str = "binary_kl"
    tau: float = 100.0
    debias: bool | None = None
    next_token_loss: bool = False
    loss_combination: str = "gradmag"
    alm_weight: float = 1.0
    ntp_weight: float = 1.0
    # distribution
    num_workers: int = 1
    use_gpu: bool = False
    strategy: str = "ddp"
    cpus_per_worker: float | None = None
    torch_threads: int | None = None
    ray: RayConfig = field(default_factory=RayConfig)
    # checkpoints
    checkpoint_every: int = 500
    keep_checkpoints: int | None = 3
    resume: bool = False
    overwrite: bool = False
    max_failures: int = 0
    # logging
    log_every: int = 10
    tensorboard: bool = True
    wandb_project: str | None = None
    wandb_run_name: str | None = None
    progress: bool = True
    # misc
    seed: int = 0
    disable_dropout: bool = True
    slice_size: int = 1024
    # recompute the LM head's logits in the backward (CLI --recompute-logits): None = only when keeping a
    # micro-batch's fp32 probabilities (micro_batch_tokens x vocab x 4 bytes) would exceed logits_memory_mib
    checkpoint_slices: bool | None = None
    logits_memory_mib: int = 2048
    gradient_checkpointing: bool = False
    fail_at_step: int | None = None  # testing: raise once, right after this step (first attempt only)

    def __post_init__(self) -> None:
        def positive_int(name: str, value, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

        if (self.aligned is None) == (self.cache is None):
            raise ValueError(
                "give exactly one data source: --aligned DIR, or --cache DIR with --student-tokenizer"
            )
        if self.cache is not None and not self.student_tokenizer:
            raise ValueError("--cache needs --student-tokenizer (a tokenizer folder, or 'bytes')")
        if self.aligned is not None and (
            self.student_tokenizer or self.gamma is not None or self.max_student_length
        ):
            raise ValueError(
                "--student-tokenizer / --gamma / --max-student-length are alignment settings for --cache; an aligned "
                "set already fixes them"
            )
        if (self.student is None) == (self.init_from is None):
            raise ValueError(
                "give exactly one student: --student PATH (an existing model with the student tokenizer) or "
                "--init-from PATH (tokenizer transfer from that model)"
            )
        if self.embedding_init != "fvt":
            raise ValueError(f"unknown --embedding-init {self.embedding_init!r}; supported: fvt")
        for name in (
            "steps",
            "batch_size",
            "micro_batch_tokens",
            "num_workers",
            "checkpoint_every",
            "log_every",
            "logits_memory_mib",
        ):
            positive_int(name, getattr(self, name))
        for name in ("num_layers", "lora_rank", "torch_threads", "fail_at_step"):
            positive_int(name, getattr(self, name), allow_none=True)
        if self.keep_checkpoints is not None:
            positive_int("keep_checkpoints", self.keep_checkpoints)
        if self.batch_size < self.num_workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be >= num_workers ({self.num_workers})")
        if self.warmup_steps is not None and (
            not isinstance(self.warmup_steps, int) or self.warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        for name in ("lr", "adam_eps", "tau"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("Adam betas must be in [0, 1)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0):
            raise ValueError(
                f"max_grad_norm must be > 0 (or None to disable clipping), got {self.max_grad_norm!r}"
            )
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown distance {self.distance!r}; choose one of {', '.join(DISTANCES)}")
        if not self.alm and not self.next_token_loss:
            raise ValueError("nothing to train: enable the ALM loss and/or the next-token loss")
        if self.loss_combination not in ("gradmag", "fixed"):
            raise ValueError(f"unknown loss combination {self.loss_combination!r}; choose gradmag or fixed")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"unknown strategy {self.strategy!r}; choose ddp or fsdp")
        if self.strategy == "fsdp" and self.lora_rank is not None:
            raise ValueError("FSDP with LoRA is not supported; LoRA students train with DDP (--strategy ddp)")
        if (
            self.strategy == "fsdp"
            and self.next_token_loss
            and self.alm
            and self.loss_combination == "gradmag"
            and self.num_workers > 1
        ):
            raise ValueError(
                "GradMag with FSDP is not supported; use --loss-combination fixed with --strategy fsdp"
            )
        if self.cpus_per_worker is not None and not (self.cpus_per_worker > 0):
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if self.slice_size < 1:
            raise ValueError("slice_size must be >= 1")

    # -------------------------------------------------------------- helpers
    @property
    def warmup(self) -> int:
        return (
            int(round(0.1 * self.steps)) if self.warmup_steps is None else min(self.warmup_steps, self.steps)
        )

    @property
    def wandb(self) -> bool:
        return self.wandb_project is not None

    def resolved(self) -> TrainConfig:
        """Local paths made absolute (Ray Train needs an absolute storage path; workers may run elsewhere)."""

        def absolute(p: str | None) -> str | None:
            if p is None or p == "bytes" or not os.path.exists(p):
                return p
            return str(Path(p).resolve())

        return dataclasses.replace(
            self,
            aligned=absolute(self.aligned),
            cache=absolute(self.cache),
            student_tokenizer=absolute(self.student_tokenizer),
            student=absolute(self.student),
            init_from=absolute(self.init_from),
            output=str(Path(self.output).resolve()),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        if isinstance(d.get("ray"), dict):
            d["ray"] = RayConfig(**d["ray"])
        return cls(**d)

    def alm_config(self, aligned_debias: bool) -> ALMLossConfig:
        return ALMLossConfig(
            distance=self.distance,
            tau=self.tau,
            debias=aligned_debias if self.debias is None else self.debias,
        )

    def data_identity(self) -> dict:
        """Settings that fix the data order and the objective: a resumed run must use the same ones."""
        return {
            "batch_size": self.batch_size,
            "seed": self.seed,
            "alm": self.alm,
            "next_token_loss": self.next_token_loss,
            "distance": self.distance,
            "tau": self.tau,
            "debias": self.debias,
        }


@dataclass
class TrainResult:
    """What :func:`run_training` / :func:`train_local` return."""

    output: Path
    final_checkpoint: Path | None  # <output>/final: Hugging Face folder (model + tokenizer)
    last_checkpoint: Path | None  # <output>/checkpoints/checkpoint-NNNNNN (with optimizer state)
    steps: int  # optimizer steps completed in total
    start_step: int  # step the run started (resumed) from
    final_loss: float | None
    history: list[dict]  # the metric rows of this run (also in <output>/metrics.csv)
    seconds: float
    metrics_csv: Path | None = None
    info: dict = field(default_factory=dict)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based): linear warm-up over ``warmup`` steps
    (``(s+1)/warmup``, so the first step already learns), then linear decay, reaching ``1/(total−warmup)`` at
    the last step (never a wasted step at 0)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    return max(0.0, (total - step) / (total - warmup))


def metric_columns(config: TrainConfig) -> list[str]:
    cols = ["step", "loss"]
    if config.alm:
        cols.append("loss_alm")
    if config.next_token_loss:
        cols.append("loss_ntp")
    if config.alm and config.next_token_loss:
        cols += ["weight_alm", "weight_ntp"]
    cols += [
        "valid_chunks",
        "docs",
        "student_tokens",
        "padding",
        "tokens_per_s",
        "lr",
        "grad_norm",
        "step_time_s",
        "epoch",
        "elapsed_s",
    ]
    if config.alm:
        cols.append("mean_abs_chunk_logprob_diff")
    return cols


# ----------------------------------------------------------------------------------------------------------
# The student forward pass as one module (so DDP / FSDP see a single forward)


def _head_weight_and_bias(hf_model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = hf_model.get_output_embeddings()
    if head is None:
        raise TrainingError(f"{type(hf_model).__name__} has no output embeddings (LM head)")
    # peft keeps trainable copies of embeddings in a ModulesToSaveWrapper: use the active copy
    modules = getattr(head, "modules_to_save", None)
    if modules is not None and not getattr(head, "disable_adapters", False):
        adapter = getattr(head, "active_adapter", None)
        adapter = adapter[0] if isinstance(adapter, list | tuple) else adapter
        if adapter in modules:
            head = modules[adapter]
    if hasattr(head, "lora_A"):
        raise TrainingError(
            "LoRA on the LM head is not supported (the loss reads the head's weight directly)"
        )
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TrainingError(f"cannot read the LM head weight of {type(hf_model).__name__}")
    return weight, getattr(head, "bias", None)


class StudentForward(nn.Module):
    """``(input_ids, ...) → (ℓ_S, σ_S)`` per position, memory-bounded (see :func:`student_token_stats`).

    Runs the model body once (no ``[B, T, V]`` logits tensor), then the LM head + fp32 log-softmax statistics in
    slices of positions. Applies the config's ``logit_scale`` / ``final_logit_softcapping``; :meth:`self_check`
    refuses models whose logits are something else.
    """

    def __init__(
        self,
        model: nn.Module,
        boundary_mask: np.ndarray,
        slice_size: int = 1024,
        checkpoint_slices: bool = True,
        fused: bool = True,
    ):
        super().__init__()
        self.model = model
        self.register_buffer(
            "boundary_mask", torch.as_tensor(np.asarray(boundary_mask, dtype=bool)), persistent=False
        )
        self.slice_size = slice_size
        self.checkpoint_slices = checkpoint_slices
        self.fused = fused

    def hf_model(self) -> nn.Module:
        m = self.model
        return m.get_base_model() if hasattr(m, "peft_config") and hasattr(m, "get_base_model") else m

    def forward(
        self,
        input_ids: torch.Tensor,
        stats_mask: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hf = self.hf_model()
        body = getattr(hf, hf.base_model_prefix)
        out = body(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        weight, bias = _head_weight_and_bias(hf)
        scale = getattr(hf.config, "logit_scale", None)
        if isinstance(scale, int | float) and not isinstance(scale, bool) and scale != 1:
            weight = weight * scale
            bias = bias * scale if bias is not None else None
        softcap = getattr(hf.config, "final_logit_softcapping", None)
        kwargs = {
            "hidden_states": hidden,
            "lm_head_weight": weight,
            "lm_head_bias": bias,
            "attention_mask": stats_mask,
            "logit_softcap": softcap if softcap else None,
            "slice_size": self.slice_size,
        }
        if self.fused:
            stats = fused_token_stats(
                input_ids, self.boundary_mask, keep_probs=not self.checkpoint_slices, **kwargs
            )
        else:
            stats = student_token_stats(
                input_ids, self.boundary_mask, checkpoint_slices=self.checkpoint_slices, **kwargs
            )
        # fresh tensors, not views (FSDP2 hooks the outputs; in-place ops on a view would bypass them)
        return stats.token_logprob.clone(), stats.boundary_logprob.clone()

    @torch.no_grad()
    def self_check(self, input_ids: torch.Tensor, tol: float = 1e-3) -> float:
        """Max |Δ log p| between this path and the model's own logits on ``input_ids`` [1, T]; raises if > tol."""
        hf = self.hf_model()
        was_training = hf.training
        hf.eval()
        try:
            logits = self.model(input_ids=input_ids, use_cache=False).logits.float()[0]
            vocab = self.boundary_mask.shape[0]
            ref = logits[:-1, :vocab].log_softmax(-1).gather(-1, input_ids[0, 1:, None])[:, 0]
            mask = torch.ones_like(input_ids, dtype=torch.bool)
            lp, _ = self(input_ids, mask)
            diff = float((lp[0, 1:] - ref).abs().max()) if input_ids.shape[1] > 1 else 0.0
        finally:
            hf.train(was_training)
        if not diff <= tol:
            raise TrainingError(
                f"the student's log-probs computed from hidden states + LM head differ from its own logits by "
                f"{diff:.2e}: this model applies logit post-processing the trainer does not know"
            )
        return diff


def _token_stats(lp: torch.Tensor, sigma: torch.Tensor, mb: MicroBatch) -> StudentTokenStats:
    """Per-token statistics of a micro-batch; the first token of every document has no log-prob (in a packed row
    the previous position belongs to another document)."""
    mask = mb.attention_mask
    token_mask = torch.zeros_like(mask)
    token_mask[:, 1:] = mask[:, :-1] & mask[:, 1:]
    token_mask &= ~mb.doc_start
    lp = torch.where(token_mask, lp, torch.zeros_like(lp))
    return StudentTokenStats(
        token_logprob=lp, boundary_logprob=sigma, token_mask=token_mask, position_mask=mask
    )


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "attn_dropout_p", "dropout_p"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    configs = [getattr(model, "config", None)]
    for cfg in configs:
        if cfg is None:
            continue
        for key, value in list(cfg.to_dict().items()):
            if isinstance(value, float) and ("dropout" in key or key.endswith("_pdrop")):
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(cfg, key, 0.0)


def _rows_digest(rows: AlignedRows) -> str:
    """A fingerprint of the training documents (ids, token counts, group counts, a sample of tokens)."""
    import hashlib

    h = hashlib.sha256()
    h.update("\x00".join(map(str, rows.doc_ids.tolist())).encode())
    for arr in (rows.ids_offsets, rows.grp_offsets, rows.ids[:: max(1, len(rows.ids) // 65536)]):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:32]


def _same_tokenizer(a, b) -> bool:
    """Two byte views tokenize identically: same token bytes, special flags and added prefix/suffix tokens."""
    return (
        a.vocab_size == b.vocab_size
        and list(a.token_bytes) == list(b.token_bytes)
        and np.array_equal(a.is_special, b.is_special)
        and list(a.prefix_ids) == list(b.prefix_ids)
        and list(a.suffix_ids) == list(b.suffix_ids)
    )


# ----------------------------------------------------------------------------------------------------------
# Runtimes: Ray Train workers, or this process


def read_aligned_rows(files: list[str | os.PathLike[str]]) -> AlignedRows:
    import pyarrow.parquet as pq

    parts = []
    for f in files:
        try:
            parts.append(AlignedRows.from_table(pq.read_table(f, columns=TRAINER_COLUMNS)))
        except ValueError as err:
            raise TrainingError(f"{f}: {err}") from None
    return AlignedRows.concat(parts).canonical()


def _aligned_info(config: TrainConfig) -> dict:
    """What the worker needs to know about the data source: tokenizer spec, debias default, shard files."""
    if config.aligned is not None:
        from alm_pipeline.cache.aligned import open_aligned_set

        aligned = open_aligned_set(config.aligned, verify=False)
        st = aligned.manifest.get("student_tokenizer", {})
        tok = (
            "bytes" if st.get("name") == "bytes" or st.get("kind") == "bytes" else str(aligned.tokenizer_dir)
        )
        return {
            "tokenizer": tok,
            "debias": aligned.debias,
            "gamma": aligned.gamma,
            "files": [str(f) for f in aligned.shard_files()],
        }
    from alm_pipeline.assets import resolve_model
    from alm_pipeline.pipeline.align_stage import AlignSettings

    tok = config.student_tokenizer
    return {
        "tokenizer": tok if tok == "bytes" else resolve_model(tok),
        "debias": AlignSettings().debias,
        "gamma": config.gamma if config.gamma is not None else AlignSettings().gamma,
        "files": [],
    }


def student_config(config: TrainConfig, tokenizer: str | None = None) -> StudentConfig:
    """The student a run starts from (before any step), as a :class:`StudentConfig`: ``load_student`` of it
    gives exactly the initial model (``tokenizer``: the student tokenizer spec, default: the data source's)."""
    from alm_pipeline.trainer.student import StudentConfig

    if config.student is not None:
        return StudentConfig(
            model=config.student,
            dtype="float32",
            num_layers=config.num_layers,
            lora_rank=config.lora_rank,
            lora_alpha=config.lora_alpha,
        )
    return StudentConfig(
        init_from=config.init_from,
        tokenizer=tokenizer or _aligned_info(config)["tokenizer"],
        dtype="float32",
        num_layers=config.num_layers,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
    )


class _Runtime:
    rank: int = 0
    world_size: int = 1

    def __init__(self, config: TrainConfig):
        self.config = config
        self.distributed = dist.is_available() and dist.is_initialized()
        if self.distributed:
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def device(self) -> torch.device:
        if self.config.use_gpu:
            if not torch.cuda.is_available():
                raise TrainingError("--use-gpu was given but this worker sees no CUDA device")
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def rows(self) -> AlignedRows:
        raise NotImplementedError

    def resume_candidates(self) -> list[Path]:
        return []

    def emit(self, kind: str, payload: dict) -> None:  # rank 0 only
        raise NotImplementedError

    def save(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None:
        raise NotImplementedError

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


class _LocalRuntime(_Runtime):
    """This process (rank/world from an initialised ``torch.distributed`` group, else a single worker)."""

    def __init__(
        self, config: TrainConfig, sink: Callable[[str, dict], None] | None, resume_from: str | None
    ):
        super().__init__(config)
        self.sink = sink
        self.resume_from = resume_from

    def rows(self) -> AlignedRows:
        info = _aligned_info(self.config)
        if not info["files"]:
            raise NotImplementedError(
                "train_local reads aligned sets only; align the cache first (alm-pipeline align) or use run_training"
            )
        return read_aligned_rows(info["files"])

    def resume_candidates(self) -> list[Path]:
        return [Path(self.resume_from)] if self.resume_from else []

    def emit(self, kind: str, payload: dict) -> None:
        if self.sink is not None:
            self.sink(kind, payload)

    def save(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None:
        root = Path(self.config.output) / ckpt_io.CHECKPOINTS_DIR
        final = root / ckpt_io.checkpoint_name(step)
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
            try:
                write(tmp)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            ckpt_io.prune_checkpoints(self.config.output, self.config.keep_checkpoints)
        self.barrier()


class _RayRuntime(_Runtime):
    """A Ray Train worker: data through ``get_dataset_shard``, checkpoints through ``ray.train.report``."""

    def __init__(self, config: TrainConfig, queue, resume_from: str | None, rows_from_rank0: bool):
        super().__init__(config)
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.queue = queue
        self.resume_from = resume_from
        self.rows_from_rank0 = rows_from_rank0

    def device(self) -> torch.device:
        if self.config.use_gpu:
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cpu")

    def _read_shard(self) -> AlignedRows:
        import pyarrow as pa
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        parts = []
        for batch in shard.iter_batches(batch_size=4096, batch_format="pyarrow"):
            table = batch if isinstance(batch, pa.Table) else pa.Table.from_pydict(batch)
            parts.append(AlignedRows.from_table(table.select(TRAINER_COLUMNS)))
        return AlignedRows.concat(parts)

    def rows(self) -> AlignedRows:
        if not self.rows_from_rank0 or self.world_size == 1:
            return self._read_shard().canonical()
        holder: list[Any] = [self._read_shard().canonical() if self.rank == 0 else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def resume_candidates(self) -> list[Path]:
        import ray.train

        out = []
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            if getattr(ckpt.filesystem, "type_name", "local") == "local":
                out.append(Path(ckpt.path))  # the checkpoint folder itself
            else:  # cloud storage: download it
                out.append(Path(ckpt.to_directory(tempfile.mkdtemp(prefix="alm-resume-"))))
        if self.resume_from:
            out.append(Path(self.resume_from))
        return out

    def emit(self, kind: str, payload: dict) -> None:
        if self.queue is not None:
            self.queue.put((kind, payload))

    def save(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None:
        import ray.train
        from ray.train import Checkpoint

        clean = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
        if self.rank == 0:
            tmp = Path(tempfile.mkdtemp(prefix="alm-ckpt-"))
            try:
                write(tmp)
                ray.train.report(
                    clean,
                    checkpoint=Checkpoint.from_directory(str(tmp)),
                    checkpoint_dir_name=ckpt_io.checkpoint_name(step),
                )
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            ray.train.report(clean, checkpoint=None)


# ----------------------------------------------------------------------------------------------------------
# The worker loop


class _Worker:
    def __init__(self, config: TrainConfig, runtime: _Runtime):
        self.config = config
        self.rt = runtime

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
        diffs = [
            f"{k}: checkpoint {theirs.get(k)!r}, this run {v!r}"
            for k, v in mine.items()
            if theirs.get(k) != v
        ]
        if state.get("num_docs") is not None and state["num_docs"] != self.rows.num_docs:
            diffs.append(f"usable documents: checkpoint {state['num_docs']}, this run {self.rows.num_docs}")
        elif state.get("rows_digest") not in (None, self.rows_digest):
            diffs.append(
                "training documents: not the ones the checkpoint was trained on (another aligned set?)"
            )
        if diffs:
            raise ckpt_io.CheckpointError(
                f"cannot continue from {best[1]}: the run settings differ ({'; '.join(diffs)}); use the same "
                "settings, or start a new run (--overwrite or another --output)"
            )
        return best[1], state

    def setup(self) -> None:
        cfg = self.config
        rt = self.rt
        with contextlib.suppress(
            Exception
        ):  # "Loading weights" / "Writing model shards" bars of every worker
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // max(1, cfg.num_workers))
        torch.set_num_threads(threads)
        torch.manual_seed(cfg.seed)
        self.device = rt.device()
        self.info = _aligned_info(cfg)
        timings: dict[str, float] = {}
        t = time.monotonic()
        timings["before_setup"] = round(t - self.t_start, 2)

        rows = rt.rows()
        timings["read_rows"] = round(time.monotonic() - t, 2)
        total_docs = rows.num_docs
        rows, dropped = rows.select_trainable(need_groups=cfg.alm and not cfg.next_token_loss)
        if rows.num_docs == 0:
            raise TrainingError(
                f"the training data has no usable document ({total_docs} read; dropped: {dropped}); check the "
                "aligned set's coverage"
            )
        self.rows = rows
        self.rows_digest = _rows_digest(rows)
        self.plan = BatchPlan(rows.num_docs, cfg.batch_size, cfg.seed)
        self.pack_length = int(rows.lengths.max())

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
        if int(rows.ids.max(initial=0)) >= bundle.view.vocab_size:
            raise TrainingError("the aligned set holds token ids outside the student vocabulary")
        self.bundle = bundle
        model = bundle.model
        if cfg.disable_dropout:
            _disable_dropout(model)
        if cfg.gradient_checkpointing:
            hf = model.get_base_model() if hasattr(model, "get_base_model") else model
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model.to(self.device)
        self.pad_id = next((i for i in (bundle.view.pad_id, bundle.view.eos_id) if i is not None), 0)
        recompute = cfg.checkpoint_slices
        if recompute is None:
            recompute = cfg.micro_batch_tokens * bundle.view.vocab_size * 4 > cfg.logits_memory_mib * 2**20
        self.recompute_logits = recompute
        wrapper = StudentForward(model, bundle.view.boundary_mask, cfg.slice_size, recompute).to(self.device)
        self.wrapper = wrapper
        sample = torch.as_tensor(rows.input_ids(0)[:64], dtype=torch.long, device=self.device)[None]
        wrapper.self_check(sample, tol=1e-3 if not cfg.bf16 else 5e-2)
        self.packing = cfg.packing and self._packing_works()

        self.alm_cfg = cfg.alm_config(self.info["debias"])
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if cfg.alm and cfg.next_token_loss and cfg.loss_combination == "gradmag":
            from alm_pipeline.trainer.student import last_layer_parameters

            self.gradmag_params = last_layer_parameters(model)
        else:
            self.gradmag_params = None

        self.model = self._wrap(wrapper)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if cfg.weight_decay > 0 else torch.optim.Adam
        self.optimizer = opt_cls(
            params,
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        warmup, total = cfg.warmup, cfg.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, total)
        )
        self.start_step = 0
        if self.resume_path is not None:
            self._load_training_state(self.resume_path)
        timings["setup_total"] = round(time.monotonic() - self.t_start, 2)
        if rt.rank == 0:
            rt.emit(
                "info",
                {
                    "documents": rows.num_docs,
                    "documents_read": total_docs,
                    "dropped": dropped,
                    "groups": int(rows.num_groups.sum()),
                    "student_tokens": int(rows.lengths.sum()),
                    "rows_mib": round(rows.nbytes / 2**20, 1),
                    "student": bundle.info.to_dict(),
                    "packing": self.packing,
                    "world_size": rt.world_size,
                    "device": str(self.device),
                    "start_step": self.start_step,
                    "resumed_from": str(self.resume_path) if self.resume_path else None,
                    "debias": self.alm_cfg.debias,
                    "warmup_steps": warmup,
                    "recompute_logits": self.recompute_logits,
                    "setup_s": timings,
                },
            )

    def _packing_works(self) -> bool:
        """Packed rows (position ids restarting per document) must give each document the logits it gets alone;
        otherwise this model's attention crosses documents and we fall back to length bucketing."""
        lengths = self.rows.lengths
        docs = [int(i) for i in np.argsort(lengths)[:2]] if self.rows.num_docs >= 2 else [0, 0]
        a, b = (torch.as_tensor(self.rows.input_ids(d)[:32], dtype=torch.long) for d in docs)
        packed = torch.cat([a, b])[None].to(self.device)
        pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None].to(self.device)
        with torch.no_grad():
            self.wrapper.eval()
            try:
                mask = torch.ones_like(packed, dtype=torch.bool)
                _, sig_packed = self.wrapper(packed, mask, position_ids=pos)
                _, sig_a = self.wrapper(a[None].to(self.device), mask[:, : len(a)])
                _, sig_b = self.wrapper(b[None].to(self.device), mask[:, : len(b)])
            finally:
                self.wrapper.train()
        ref = torch.cat([sig_a[0], sig_b[0]])
        diff = float((sig_packed[0] - ref).abs().max())
        ok = diff <= (1e-3 if not self.config.bf16 else 5e-2)
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
        if cfg.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(
                wrapper, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        from torch.distributed.fsdp import fully_shard

        from alm_pipeline.trainer.student import transformer_layers

        for layer in transformer_layers(wrapper.model):
            fully_shard(layer)
        fully_shard(wrapper)
        return wrapper

    def _load_training_state(self, path: Path) -> None:
        state = ckpt_io.load_training_state(path)
        if state["optimizer"] is not None:
            if self.config.strategy == "fsdp" and self.rt.world_size > 1:
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
            # a changed step count changes the schedule: rebuild the lambda with the current one
            warmup, total = self.config.warmup, self.config.steps
            self.scheduler.lr_lambdas = [lambda s: lr_factor(s, warmup, total)]
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
                group["lr"] = base * lr_factor(self.scheduler.last_epoch, warmup, total)
        if state["rng"] is not None:
            with contextlib.suppress(Exception):
                torch.set_rng_state(state["rng"]["torch"])
        self.start_step = int(state["trainer_state"]["step"])

    # ------------------------------------------------------------------ one optimizer step
    def _sync(self, last: bool):
        model = self.model
        if hasattr(model, "no_sync") and not last:
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _combine(self, losses: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        if len(losses) == 1:
            ((name, loss),) = losses.items()
            return loss, {name: 1.0}
        if cfg.loss_combination == "fixed":
            weights = {"alm": cfg.alm_weight, "ntp": cfg.ntp_weight}
            total = sum(weights[n] * losses[n] for n in losses)
            return total, {n: weights[n] for n in losses}
        # GradMag: per-loss gradients on the last block, summed over workers so every worker uses the same weights
        params = self.gradmag_params
        names = list(losses)
        flats = []
        for n in names:
            loss = losses[n]
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                flats.append(
                    torch.cat(
                        [
                            (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                            for g, p in zip(grads, params, strict=True)
                        ]
                    )
                )
            else:
                flats.append(torch.zeros(sum(p.numel() for p in params), device=loss.device))
        stacked = torch.stack(flats)
        if self.rt.distributed and self.rt.world_size > 1:
            dist.all_reduce(stacked)
        norms = stacked.pow(2).sum(1).sqrt()
        usable = torch.isfinite(norms) & (norms > 1e-12)
        inv = torch.where(
            usable, 1.0 / torch.where(usable, norms, torch.ones_like(norms)), torch.zeros_like(norms)
        )
        tot = inv.sum()
        w = torch.where(
            tot > 0,
            inv / torch.where(tot > 0, tot, torch.ones_like(tot)),
            torch.full_like(inv, 1 / len(names)),
        )
        total = sum(w[i].to(losses[n].dtype) * losses[n] for i, n in enumerate(names))
        return total, {n: float(w[i]) for i, n in enumerate(names)}

    def _step(self, step: int) -> dict:
        cfg, rt, rows = self.config, self.rt, self.rows
        t0 = time.perf_counter()
        batch = self.plan.global_batch(step)
        slices = np.array_split(batch, rt.world_size)
        plan_kw = {
            "max_tokens": cfg.micro_batch_tokens,
            "packing": self.packing,
            "pack_length": self.pack_length,
        }
        layouts_all = [plan_micro_batches(rows.lengths[s], **plan_kw) for s in slices]
        n_micro = max(len(lay) for lay in layouts_all)
        mine = slices[rt.rank]
        micro = [build_micro_batch(rows, mine, lay, self.pad_id) for lay in layouts_all[rt.rank]]
        micro += [dummy_micro_batch(self.pad_id) for _ in range(n_micro - len(micro))]
        n_groups = int(rows.num_groups[batch].sum())
        n_pred = int((rows.lengths[batch] - 1).sum())
        n_tokens = int(rows.lengths[batch].sum())
        scale = float(rt.world_size)
        # [Σ distances, Σ nll, Σ total loss, padded tokens, Σ weight_alm, Σ weight_ntp, Σ |ΔC|·groups]
        # accumulated on the device: no host synchronisation per micro-batch
        sums = torch.zeros(7, dtype=torch.float64, device=self.device)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
        for k, mb in enumerate(micro):
            mb = mb.to(self.device)
            with self._sync(k == n_micro - 1):
                with amp:
                    lp, sigma = self.model(
                        mb.input_ids,
                        mb.attention_mask,
                        attention_mask=None if mb.packed else mb.attention_mask.long(),
                        position_ids=mb.position_ids if mb.packed else None,
                    )
                stats = _token_stats(lp.float(), sigma.float(), mb)
                losses: dict[str, torch.Tensor] = {}
                if cfg.alm:
                    out = alm_loss(stats, mb.groups, self.alm_cfg, num_groups_global=n_groups)
                    losses["alm"] = out.loss * scale
                    sums[0] += out.loss_sum.double()
                    sums[6] += out.mean_abs_logprob_diff.double() * out.num_groups
                if cfg.next_token_loss:
                    nt = next_token_loss(stats, num_tokens_global=n_pred)
                    losses["ntp"] = nt.loss * scale
                    sums[1] += nt.loss_sum.double()
                total, weights = self._combine(losses)
                total.backward()
            sums[2] += total.detach().double() / scale
            sums[3] += mb.padded_tokens if mb.num_docs else 0
            sums[4] += weights.get("alm", 0.0)
            sums[5] += weights.get("ntp", 0.0)
        if rt.distributed and rt.world_size > 1:
            dist.all_reduce(sums)
        sums = sums.cpu()
        if cfg.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_params(), cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_params(), float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        passes = n_micro * rt.world_size
        row: dict[str, Any] = {"step": step + 1, "loss": float(sums[2])}
        if cfg.alm:
            row["loss_alm"] = float(sums[0]) / max(n_groups, 1)
        if cfg.next_token_loss:
            row["loss_ntp"] = float(sums[1]) / max(n_pred, 1)
        if cfg.alm and cfg.next_token_loss:
            row["weight_alm"] = float(sums[4]) / passes
            row["weight_ntp"] = float(sums[5]) / passes
        padded = float(sums[3])
        row.update(
            {
                "valid_chunks": n_groups,
                "docs": len(batch),
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
        if cfg.alm:
            row["mean_abs_chunk_logprob_diff"] = float(sums[6]) / max(n_groups, 1)
        if not math.isfinite(row["loss"]):
            raise TrainingError(f"the loss is not finite at step {step + 1} ({row})")
        return row

    def trainable_params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]

    # ------------------------------------------------------------------ checkpoints
    def _save(self, step: int, row: dict) -> None:
        cfg = self.config
        model_sd = None
        if cfg.strategy == "fsdp" and self.rt.world_size > 1:
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
            "steps": cfg.steps,
            "data_position": self.plan.position(step),
            "epoch": self.plan.epoch(step),
            "num_docs": self.rows.num_docs,
            "rows_digest": self.rows_digest,
            "world_size": self.rt.world_size,
            "data_identity": cfg.data_identity(),
            "loss": row.get("loss"),
            "lr": row.get("lr"),
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
        last_row: dict | None = None
        self.recent_rows: collections.deque[dict] = collections.deque(
            maxlen=max(2 * cfg.checkpoint_every, 64)
        )
        if self.start_step >= cfg.steps and self.rt.rank == 0:
            self.rt.emit(
                "info",
                {"message": f"nothing to do: the checkpoint is at step {self.start_step} >= {cfg.steps}"},
            )
        for step in range(self.start_step, cfg.steps):
            row = self._step(step)
            last_row = row
            self.recent_rows.append(row)
            if self.rt.rank == 0:
                self.rt.emit("row", row)
            done = step + 1
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                self._save(done, row)
            if cfg.fail_at_step is not None and done == cfg.fail_at_step:
                marker = Path(cfg.output) / _FAIL_MARKER
                self.rt.barrier()
                if not marker.exists():
                    if self.rt.rank == 0:
                        marker.write_text(f"injected failure after step {done}\n")
                    raise RuntimeError(f"injected failure after step {done} (fail_at_step)")
        return {"start_step": self.start_step, "last_row": last_row}


def _ray_train_loop(loop_config: dict) -> None:
    """Entry point of every Ray Train worker."""
    config = TrainConfig.from_dict(loop_config["config"])
    runtime = _RayRuntime(
        config,
        loop_config.get("queue"),
        loop_config.get("resume_from"),
        loop_config.get("rows_from_rank0", False),
    )
    _Worker(config, runtime).run()


# ----------------------------------------------------------------------------------------------------------
# Driver


def _prepare_output(config: TrainConfig) -> Path | None:
    """Check the run directory against resume/overwrite; returns the checkpoint to continue from (or None)."""
    out = Path(config.output)
    ckpts = ckpt_io.list_checkpoints(out)
    if config.overwrite:
        for name in (ckpt_io.CHECKPOINTS_DIR, ckpt_io.FINAL_DIR, "tensorboard"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("metrics.csv", RUN_FILE, _FAIL_MARKER):
            (out / name).unlink(missing_ok=True)
        ckpts = []
    if config.resume:
        if not ckpts:
            logger.warning("--resume: %s holds no checkpoint yet; starting from step 0", out)
            shutil.rmtree(out / ckpt_io.CHECKPOINTS_DIR, ignore_errors=True)
            return None
        latest = ckpts[-1][1]
        theirs = ckpt_io.read_trainer_state(latest).get("data_identity", {})
        diffs = [
            f"{k}: checkpoint {theirs.get(k)!r}, this run {v!r}"
            for k, v in config.data_identity().items()
            if k in theirs and theirs[k] != v
        ]
        if diffs:
            raise TrainingError(
                f"cannot continue from {latest}: the run settings differ ({'; '.join(diffs)}); use the same "
                "settings, or start a new run (--overwrite or another --output)"
            )
        return latest
    if ckpts:
        raise TrainingError(
            f"{out} already holds checkpoints of a run (latest: step {ckpts[-1][0]}); pass --resume to continue it, "
            "--overwrite to start over, or choose another --output"
        )
    # leftovers without a complete checkpoint (a run killed before its first one): Ray Train would restore its
    # bookkeeping from them
    shutil.rmtree(out / ckpt_io.CHECKPOINTS_DIR, ignore_errors=True)
    (out / _FAIL_MARKER).unlink(missing_ok=True)
    return None


def _check_source(config: TrainConfig) -> dict:
    if config.aligned is not None:
        from alm_pipeline.cache.aligned import open_aligned_set
        from alm_pipeline.cache.store import CacheIntegrityError

        try:
            aligned = open_aligned_set(config.aligned, verify=True)
        except (CacheIntegrityError, FileNotFoundError) as err:
            raise TrainingError(str(err)) from None
        try:
            aligned.check_cache()
        except CacheIntegrityError as err:
            # training never reads the teacher cache: a moved or deleted one is fine, a changed one is not
            if "fingerprint" in str(err):
                raise TrainingError(str(err)) from None
        except (FileNotFoundError, OSError, KeyError, ValueError):
            pass
        return {
            "kind": "aligned",
            "files": [str(f) for f in aligned.shard_files()],
            "summary": aligned.summary(),
        }
    return {"kind": "stream"}


def _stream_dataset(config: TrainConfig):
    try:
        from alm_pipeline.pipeline.align_stage import AlignSettings, stream_aligned
    except ImportError as err:
        raise NotImplementedError(
            "training from a teacher cache with on-the-fly alignment (--cache + --student-tokenizer) needs "
            "alm_pipeline.pipeline.align_stage.stream_aligned, which this installation lacks; run "
            "`alm-pipeline align` first and pass --aligned"
        ) from err
    kwargs: dict[str, Any] = {}
    if config.gamma is not None:
        kwargs["gamma"] = config.gamma
    if config.max_student_length is not None:
        kwargs["max_student_length"] = config.max_student_length
    dataset, _view, _cache = stream_aligned(
        config.cache, config.student_tokenizer, AlignSettings(**kwargs), config.ray
    )
    return dataset.select_columns(list(TRAINER_COLUMNS))


def _cpus_per_worker(config: TrainConfig) -> float:
    if config.cpus_per_worker is not None:
        return config.cpus_per_worker
    from alm_pipeline.pipeline.ray_utils import cluster_cpus

    total = cluster_cpus()
    # leave one CPU to Ray Data's read tasks (with every CPU taken by workers, fit() waits forever on 2 cores)
    return float(max(0.1, min(1.0, (total - 1.0) / config.num_workers)))


def _export_final(last: Path, dest: Path) -> Path:
    if (last / "adapter_config.json").exists():
        from alm_pipeline.trainer.student import StudentConfig, load_student, save_student

        tmp = dest.with_name(f".{dest.name}.merging")
        shutil.rmtree(tmp, ignore_errors=True)
        bundle = load_student(StudentConfig(model=str(last)))
        save_student(bundle, tmp, merge_lora=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return dest
    return ckpt_io.export_final(last, dest)


class _Driver:
    """Receives rank 0's messages (metrics rows, setup info) and writes them."""

    def __init__(
        self,
        config: TrainConfig,
        resume_step: int,
        say: Callable[[str], None],
        backfill: list[dict] | None = None,
    ):
        from alm_pipeline.trainer.metrics import MetricsLogger

        wandb = None
        if config.wandb:
            wandb = {
                "project": config.wandb_project,
                "name": config.wandb_run_name,
                "config": config.to_dict(),
            }
        self.say = say
        self.info: dict = {}
        self.logger = MetricsLogger(
            config.output,
            metric_columns(config),
            total_steps=config.steps,
            resume_step=resume_step,
            backfill=backfill,
            tensorboard=config.tensorboard,
            wandb=wandb,
            console=config.progress,
            log_every=config.log_every,
        )

    def __call__(self, kind: str, payload: dict) -> None:
        if kind == "row":
            self.logger.log(payload)
        elif kind == "info":
            self.info.update(payload)
            if "message" in payload:
                self.say(payload["message"])
            elif "documents" in payload:
                st = payload["student"]
                self.say(
                    f"{payload['documents']} documents ({payload['student_tokens']} student tokens, "
                    f"{payload['groups']} chunks, {payload['rows_mib']} MiB per worker); student "
                    f"{st.get('mode')} {st.get('source')} ({st.get('trainable_parameters', 0) / 1e6:.1f}M trainable); "
                    f"{payload['world_size']} worker(s) on {payload['device']}; "
                    f"{'packed' if payload['packing'] else 'length-bucketed'} micro-batches"
                    + (f"; resuming at step {payload['start_step']}" if payload.get("resumed_from") else "")
                )

    def close(self) -> None:
        self.logger.close()


def _recent_metrics(checkpoint: Path | None) -> list[dict]:
    if checkpoint is None:
        return []
    return list(ckpt_io.read_trainer_state(checkpoint).get("recent_metrics") or [])


def _default_say(message: str) -> None:
    import sys

    print(f"[alm-pipeline] {message}", file=sys.stderr, flush=True)


def _finish(config: TrainConfig, driver: _Driver, start_step: int, t0: float) -> TrainResult:
    out = Path(config.output)
    last = ckpt_io.find_latest_checkpoint(out)
    final = _export_final(last, out / ckpt_io.FINAL_DIR) if last is not None else None
    rows = driver.logger.rows
    result = TrainResult(
        output=out,
        final_checkpoint=final,
        last_checkpoint=last,
        steps=ckpt_io.checkpoint_step(last) if last is not None else 0,
        start_step=start_step,
        final_loss=float(rows[-1]["loss"]) if rows else None,
        history=rows,
        seconds=time.monotonic() - t0,
        metrics_csv=driver.logger.path,
        info=driver.info,
    )
    run = {
        "config": config.to_dict(),
        "steps": result.steps,
        "start_step": start_step,
        "final_loss": result.final_loss,
        "final_checkpoint": str(final) if final else None,
        "last_checkpoint": str(last) if last else None,
        "seconds": round(result.seconds, 2),
        "info": driver.info,
    }
    (out / RUN_FILE).write_text(json.dumps(run, indent=2, default=str) + "\n")
    return result


def _check_extras(config: TrainConfig) -> None:
    import importlib.util

    if config.wandb and importlib.util.find_spec("wandb") is None:
        raise TrainingError(
            "W&B logging was asked for (--wandb-project) but `wandb` is not installed: pip install wandb"
        )


def train_local(config: TrainConfig, say: Callable[[str], None] | None = None) -> TrainResult:
    """Run the training loop in this process, without Ray (rank/world size from an initialised
    ``torch.distributed`` group if there is one; then every rank must call this)."""
    config = config.resolved()
    _check_extras(config)
    say = say or _default_say
    t0 = time.monotonic()
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    resume_from = _prepare_output(config) if rank == 0 else None
    if distributed:
        holder = [str(resume_from) if resume_from else None]
        dist.broadcast_object_list(holder, src=0)
        resume_from = Path(holder[0]) if holder[0] else None
    resume_step = ckpt_io.checkpoint_step(resume_from) if resume_from else 0
    driver = _Driver(config, resume_step, say, _recent_metrics(resume_from)) if rank == 0 else None
    worker = _Worker(config, _LocalRuntime(config, driver, str(resume_from) if resume_from else None))
    try:
        summary = worker.run()
    finally:
        if driver is not None:
            driver.close()
    if rank != 0:
        return TrainResult(
            Path(config.output), None, None, config.steps, summary["start_step"], None, [], 0.0
        )
    return _finish(config, driver, summary["start_step"], t0)


def run_training(config: TrainConfig, say: Callable[[str], None] | None = None) -> TrainResult:
    """Train with Ray Train (see the module docstring). Raises :class:`TrainingError` with the cause."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    from alm_pipeline.pipeline.ray_utils import ensure_ray

    config = config.resolved()
    _check_extras(config)
    say = say or _default_say
    t0 = time.monotonic()
    source = _check_source(config)
    Path(config.output).mkdir(parents=True, exist_ok=True)
    resume_from = _prepare_output(config)
    resume_step = ckpt_io.checkpoint_step(resume_from) if resume_from else 0
    ensure_ray(config.ray)
    cpus = _cpus_per_worker(config)
    resources: dict[str, float] = {"CPU": cpus}
    if config.use_gpu:
        resources["GPU"] = 1.0
    # Ray would wait forever for workers that cannot be placed: say so instead (on a cluster, an autoscaler may
    # still add nodes, so only warn there)
    have = ray.cluster_resources()
    for name, per_worker in resources.items():
        if have.get(name, 0.0) + 1e-9 < per_worker * config.num_workers:
            message = (
                f"{config.num_workers} workers need {per_worker * config.num_workers:g} {name} but the Ray cluster "
                f"has {have.get(name, 0.0):g}; use fewer --num-workers"
                + (" or a smaller --cpus-per-worker" if name == "CPU" else "")
            )
            if not (config.ray.address or os.environ.get("RAY_ADDRESS")):
                raise TrainingError(message)
            say(f"warning: {message} (waiting for the cluster to grow)")
    if source["kind"] == "aligned":
        # materialised once here (small: ~4 bytes per student token), so that the workers' iterators read
        # blocks from the object store instead of each starting its own read tasks
        dataset = ray.data.read_parquet(source["files"]).select_columns(list(TRAINER_COLUMNS)).materialize()
    else:
        dataset = _stream_dataset(config)
    queue = Queue(actor_options={"num_cpus": 0})
    driver = _Driver(config, resume_step, say, _recent_metrics(resume_from))
    if resume_from is not None:
        say(f"resuming from {resume_from} (step {resume_step})")
    stop = threading.Event()

    def pump() -> None:
        while True:
            try:
                kind, payload = queue.get(block=True, timeout=0.25)
            except Empty:
                if stop.is_set():
                    return
                continue
            except Exception:  # noqa: BLE001 - the queue actor is gone (shutdown)
                return
            try:
                driver(kind, payload)
            except Exception as err:  # noqa: BLE001 - a logging problem must not kill the run
                logger.warning("could not log %s: %s", kind, err)

    thread = threading.Thread(target=pump, name="alm-train-metrics", daemon=True)
    thread.start()
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={
            "config": config.to_dict(),
            "queue": queue,
            "resume_from": str(resume_from) if resume_from else None,
            "rows_from_rank0": source["kind"] == "stream",
        },
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=ckpt_io.CHECKPOINTS_DIR,
            storage_path=config.output,
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    error: BaseException | None = None
    try:
        result = trainer.fit()
        error = getattr(result, "error", None)
    except Exception as err:  # noqa: BLE001 - re-raised below with the root cause
        error = err
    finally:
        stop.set()
        thread.join(timeout=30)
        driver.close()
        with contextlib.suppress(Exception):
            ray.kill(queue.actor)
    if error is not None:
        raise TrainingError(f"training failed: {_root_cause(error)}") from error
    return _finish(config, driver, resume_step if resume_from else 0, t0)


def _root_cause(err: BaseException) -> str:
    seen = set()
    while True:
        nxt = err.__cause__ or getattr(err, "cause", None)
        if nxt is None or id(nxt) in seen or not isinstance(nxt, BaseException):
            break
        seen.add(id(nxt))
        err = nxt
    text = str(err).strip()
    # Ray wraps worker errors in long tracebacks: keep the last line that names the error
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tail = lines[-1] if lines else type(err).__name__
    return tail if len(tail) < 2000 else tail[:2000]
