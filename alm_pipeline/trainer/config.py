"""The configuration of a training run (``alm-pipeline train``): one tree of typed dataclasses.

Every field carries its default and its help text (``metadata={"help": ...}``) once; the CLI is generated from
this tree (:mod:`alm_pipeline.cli.options`: one flat option per field, e.g. ``--lr``, ``--tau``,
``--num-workers``; ``metadata={"cli": ...}`` where the option name differs from the field name). Each section
validates itself in ``__post_init__``; :class:`TrainConfig` checks the rules that span sections.
:meth:`TrainConfig.to_dict` / :meth:`TrainConfig.from_dict` round-trip the tree through JSON (``run.json``, the
Ray Train loop config).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from alm_pipeline.configs import check_choice, check_file, check_int, check_number, check_positive, option
from alm_pipeline.pipeline.align_chat import LOSS_ON
from alm_pipeline.pipeline.ray_utils import RayConfig, parse_resources
from alm_pipeline.storage import is_uri
from alm_pipeline.trainer.loss import DISTANCES, ALMLossConfig, Distance

__all__ = [
    "CheckpointConfig",
    "CombineConfig",
    "ComputeConfig",
    "DataConfig",
    "DebugConfig",
    "DistributedConfig",
    "LoggingConfig",
    "LossConfig",
    "OptimConfig",
    "StudentSpec",
    "TrainConfig",
    "from_dict",
]

T = TypeVar("T")


def _flag(field_name: str) -> str:
    """The command-line option of a field whose option name is the field name: ``batch_size`` → ``--batch-size``."""
    return "--" + field_name.replace("_", "-")


def _absolute(p: str | None) -> str | None:
    if p is None or p == "bytes" or not os.path.exists(p):
        return p
    return str(Path(p).resolve())


@dataclass(frozen=True)
class DataConfig:
    """Where the training documents come from: exactly one of an aligned set, or a teacher cache aligned on the
    fly."""

    aligned: str | None = option(
        None, "Aligned set directory (from `alm-pipeline align`); fixes the student tokenizer"
    )
    cache: str | None = option(
        None, "Teacher cache to align on the fly (instead of --aligned); needs --student-tokenizer"
    )
    student_tokenizer: str | None = option(
        None, "With --cache: the student tokenizer (folder, short name, or 'bytes')"
    )
    gamma: float | None = option(None, "With --cache: γ merging threshold (default 0.1, as in align)")
    max_student_length: int | None = option(
        None, "With --cache: student tokens per document (default: whole cached text)"
    )
    chat_template: str | None = option(
        None,
        "With --cache: Jinja chat template file for a student tokenizer that has none (conversations only; a "
        "local file that every node can read)",
    )
    loss_on: str | None = option(
        None,
        "With --cache: which chunks of a conversation count: assistant, all or auto (default, as in align)",
    )
    shuffle_window: int = option(
        16384,
        "Documents per shuffle window: each epoch permutes the row groups (with --cache: the cache shards), then "
        "shuffles documents within consecutive windows of this many (1: no shuffle inside row groups); larger "
        "mixes more; keep it >= --num-workers x 512 (documents per row group) so that each worker reads only a "
        "part of the row groups",
    )
    data_cache_mib: int = option(
        512, "Per worker: MiB of decoded row groups kept in memory (least recently used dropped first)"
    )
    prefetch_steps: int = option(2, "Per worker: steps of documents read ahead by a background thread")
    verify: bool = option(
        False,
        "Check every shard's SHA-256 of the aligned set (or cache) before training (parallel Ray tasks; reads "
        "the whole set); without it, shards are checked by marker and size, and each worker checks the "
        "row groups it reads",
    )

    def __post_init__(self) -> None:
        if (self.aligned is None) == (self.cache is None):
            raise ValueError(
                "give exactly one data source: --aligned DIR, or --cache DIR with --student-tokenizer"
            )
        if self.cache is not None and not self.student_tokenizer:
            raise ValueError("--cache needs --student-tokenizer (a tokenizer folder, or 'bytes')")
        if self.aligned is not None and (
            self.student_tokenizer
            or self.gamma is not None
            or self.max_student_length
            or self.chat_template
            or self.loss_on is not None
        ):
            raise ValueError(
                "--student-tokenizer / --gamma / --max-student-length / --chat-template / --loss-on are alignment "
                "settings for --cache; an aligned set already fixes them"
            )
        check_number("--gamma", self.gamma, 0, 1, allow_none=True)
        if self.loss_on is not None:
            check_choice("--loss-on", self.loss_on, LOSS_ON)
        check_file("--chat-template", self.chat_template)
        check_int("--max-student-length", self.max_student_length, allow_none=True)
        check_int("--shuffle-window", self.shuffle_window)
        check_int("--data-cache-mib", self.data_cache_mib)
        check_int("--prefetch-steps", self.prefetch_steps)


@dataclass(frozen=True)
class StudentSpec:
    """Which student to train: exactly one of an existing model or a tokenizer transfer. The trainer turns it
    into a :class:`~alm_pipeline.trainer.student.StudentConfig` (with the data's student tokenizer, fp32) via
    :func:`alm_pipeline.trainer.worker.student_config`."""

    student: str | None = option(
        None, "Existing student model (folder, short name or hub name) that uses the student tokenizer"
    )
    init_from: str | None = option(
        None, "Tokenizer transfer: start from this model (usually the teacher) with new embeddings"
    )
    embedding_init: str = option(
        "fvt", "Embedding initialisation for --init-from: fvt (mean of source-token embeddings)"
    )
    num_layers: int | None = option(None, "Keep only the first N transformer blocks")
    lora_rank: int | None = option(None, "Train LoRA adapters of this rank (default: full)")
    lora_alpha: float | None = option(None, "LoRA alpha (default: the rank)")
    disable_dropout: bool = option(True, "Set every dropout probability of the student to 0")

    def __post_init__(self) -> None:
        if (self.student is None) == (self.init_from is None):
            raise ValueError(
                "give exactly one student: --student PATH (an existing model with the student tokenizer) or "
                "--init-from PATH (tokenizer transfer from that model)"
            )
        check_choice("--embedding-init", self.embedding_init, ("fvt",))
        check_int("--num-layers", self.num_layers, allow_none=True)
        check_int("--lora-rank", self.lora_rank, allow_none=True)
        check_positive("--lora-alpha", self.lora_alpha, allow_none=True)


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation (defaults after the paper, reference §11.1): Adam without weight decay (AdamW when
    ``weight_decay > 0``), linear warm-up then linear decay, gradient clipping."""

    steps: int = option(1000, "Optimizer steps")
    batch_size: int = option(32, "Documents per optimizer step (global, over all workers)")
    seed: int = option(0, "Seed of the data order")
    lr: float = option(1e-5, "Peak learning rate")
    warmup_steps: int | None = option(
        None, "Linear warm-up steps, then linear decay to 0 (default: 10% of --steps)"
    )
    weight_decay: float = option(0.0, "Weight decay (default 0: Adam without weight decay; > 0 uses AdamW)")
    adam_beta1: float = option(0.9, "Adam β1")
    adam_beta2: float = option(0.95, "Adam β2")
    adam_eps: float = option(1e-8, "Adam ε")
    max_grad_norm: float | None = option(
        1.0, "Clip the gradient norm to this (0: no clipping; the norm is always logged)"
    )
    max_nonfinite_steps: int = option(
        3,
        "An optimizer step whose gradient (or loss) is not finite is skipped (weights and optimizer state "
        "unchanged; counted in the skipped_steps column); stop with an error after this many in a row",
    )

    def __post_init__(self) -> None:
        if self.max_grad_norm == 0:  # 0 = no clipping, as None
            object.__setattr__(self, "max_grad_norm", None)
        for name in ("steps", "batch_size", "max_nonfinite_steps"):
            check_int(_flag(name), getattr(self, name))
        check_int("--seed", self.seed, minimum=0)
        check_int("--warmup-steps", self.warmup_steps, minimum=0, allow_none=True)
        check_positive("--lr", self.lr)
        check_positive("--adam-eps", self.adam_eps)
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            check_number(_flag(name), v, 0, 1)
            if v == 1:
                raise ValueError(f"{_flag(name)} must be < 1, got {v!r}")
        check_number("--weight-decay", self.weight_decay, 0)
        check_positive("--max-grad-norm", self.max_grad_norm, allow_none=True)

    @property
    def warmup(self) -> int:
        """Warm-up steps actually used (default 10 % of ``steps``, never more than ``steps``)."""
        return (
            int(round(0.1 * self.steps)) if self.warmup_steps is None else min(self.warmup_steps, self.steps)
        )


@dataclass(frozen=True)
class ComputeConfig:
    """How each worker runs its forward/backward passes: micro-batches, precision and memory trade-offs."""

    micro_batch_tokens: int = option(
        8192, "Padded tokens per forward pass per worker; the rest of the batch is gradient-accumulated"
    )
    packing: bool = option(
        True,
        "Pack several documents per row (attention never crosses documents); --no-packing: length buckets",
    )
    bf16: bool | None = option(
        None, "bfloat16 autocast (default: on with --use-gpu, else fp32; loss statistics stay fp32)"
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward")
    slice_size: int = option(1024, "Positions per LM-head slice of the student statistics")
    recompute_logits: bool | None = option(
        None,
        "Recompute the LM head's logits slice by slice in the backward (memory O(slice x vocab), one more "
        "LM-head matmul) instead of keeping the fp32 probabilities of a micro-batch (micro-batch tokens x "
        "vocab x 4 bytes). Default: recompute only when those would exceed --logits-memory-mib",
    )
    logits_memory_mib: int = option(
        2048, "Budget for kept fp32 probabilities per micro-batch (see --recompute-logits)"
    )

    def __post_init__(self) -> None:
        for name in ("micro_batch_tokens", "logits_memory_mib", "slice_size"):
            check_int(_flag(name), getattr(self, name))

    def recompute(self, vocab_size: int) -> bool:
        """Whether the LM head's logits are recomputed in the backward for a student of this vocabulary."""
        if self.recompute_logits is not None:
            return self.recompute_logits
        return self.micro_batch_tokens * vocab_size * 4 > self.logits_memory_mib * 2**20


@dataclass(frozen=True)
class LossConfig:
    """The objective (reference §5, §6, §9): ALM (default), ALM + the student's next-token loss
    (``--next-token-loss``), or the next-token loss alone (SFT: ``--no-alm --next-token-loss``; the student's σ
    and the chunk statistics are then not computed)."""

    alm: bool = option(
        True, "The ALM loss; --no-alm --next-token-loss: next-token training alone (SFT, σ not computed)"
    )
    distance: Distance = option(
        "binary_kl",
        "ALM distance: binary_kl (default), binary_ce, binary_tvd, binary_kl_tau_limit, abs_tau_limit",
    )
    tau: float = option(
        5.0,
        "ALM temperature τ (default 5: the paper's ablation and our experiments; the paper's runs used 100)",
    )
    debias: bool | None = option(None, "Outcome-chunk debiasing (default: as stored in the aligned set)")
    next_token_loss: bool = option(
        False, "Add the student's next-token loss (hybrid distillation; default off)"
    )

    def __post_init__(self) -> None:
        check_positive("--tau", self.tau)
        check_choice("--distance", self.distance, tuple(DISTANCES))
        if not self.alm and not self.next_token_loss:
            raise ValueError(
                "nothing to train: --no-alm turns the ALM loss off; add --next-token-loss for next-token "
                "training alone (SFT)"
            )

    def alm_config(self, aligned_debias: bool) -> ALMLossConfig:
        return ALMLossConfig(
            distance=self.distance,
            tau=self.tau,
            debias=aligned_debias if self.debias is None else self.debias,
        )


@dataclass(frozen=True)
class CombineConfig:
    """How the ALM and next-token losses are combined when both are on (:mod:`alm_pipeline.trainer.gradmag`)."""

    method: Literal["gradmag", "fixed"] = option(
        "gradmag",
        "With --next-token-loss: gradmag (default) or fixed (--alm-weight/--ntp-weight)",
        cli="loss_combination",
    )
    alm_weight: float = option(1.0, "Fixed weight of the ALM loss")
    ntp_weight: float = option(1.0, "Fixed weight of the next-token loss")

    def __post_init__(self) -> None:
        check_choice("--loss-combination", self.method, ("gradmag", "fixed"))
        check_number("--alm-weight", self.alm_weight, 0)
        check_number("--ntp-weight", self.ntp_weight, 0)


MULTI_WORKER_FAILURES = 3  # default --max-failures of a run with several workers (or on a cluster)


@dataclass(frozen=True)
class DistributedConfig:
    """Ray Train workers and the Ray instance."""

    num_workers: int = option(1, "Ray Train workers (data-parallel)")
    use_gpu: bool = option(False, "One GPU per worker")
    strategy: Literal["ddp", "fsdp"] = option(
        "ddp", "ddp (default) or fsdp (shard a student that does not fit one device)"
    )
    cpus_per_worker: float | None = option(
        None, "Ray CPUs per worker (default: leave one CPU to Ray, at most 1)"
    )
    worker_resources: tuple[str, ...] = option(
        (),
        "Custom Ray resource a worker needs, NAME=AMOUNT (repeatable), e.g. a label resource of the GPU nodes",
        cli="worker_resource",
    )
    torch_threads: int | None = option(None, "torch threads per worker (default: cores/workers)")
    max_failures: int | None = option(
        None,
        "Restart the workers from the latest checkpoint up to N times after a failure or a lost node (Ray "
        f"FailureConfig; -1: no limit; default: {MULTI_WORKER_FAILURES} with several workers or a cluster "
        "--address, else 0)",
    )
    placement_timeout: float = option(
        600.0,
        "Seconds to wait for the cluster to place the workers (at the start, and after a lost node) before the "
        "run fails naming the missing resources",
    )
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        check_int("--num-workers", self.num_workers)
        check_positive("--placement-timeout", self.placement_timeout)
        check_int("--torch-threads", self.torch_threads, allow_none=True)
        check_choice("--strategy", self.strategy, ("ddp", "fsdp"))
        check_positive("--cpus-per-worker", self.cpus_per_worker, allow_none=True)
        parse_resources("--worker-resource", self.worker_resources)
        check_int("--max-failures", self.max_failures, minimum=-1, allow_none=True)
        if self.max_failures is None:  # a run spread over machines should outlive one of them
            spread = self.num_workers > 1 or bool(self.ray.address or os.environ.get("RAY_ADDRESS"))
            object.__setattr__(self, "max_failures", MULTI_WORKER_FAILURES if spread else 0)


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints under ``<output>/checkpoints`` and what to do with an earlier run in ``output``."""

    every: int = option(500, "Save a checkpoint every N steps (and at the end)", cli="checkpoint_every")
    keep: int | None = option(3, "Keep the N newest checkpoints (0: all)", cli="keep_checkpoints")
    resume: bool = option(False, "Continue from the latest checkpoint under --output")
    overwrite: bool = option(False, "Delete an earlier run's checkpoints and metrics in --output")

    def __post_init__(self) -> None:
        check_int("--checkpoint-every", self.every)
        check_int("--keep-checkpoints", self.keep, minimum=0, allow_none=True)
        if self.keep == 0:  # 0 = keep all, as None
            object.__setattr__(self, "keep", None)
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")


@dataclass(frozen=True)
class LoggingConfig:
    """Metrics: ``metrics.csv`` always; TensorBoard, W&B and the console progress line on request."""

    log_every: int = option(10, "Console line every N steps when stderr is not a terminal")
    tensorboard: bool = option(True, "Write TensorBoard event files")
    wandb_project: str | None = option(None, "Also log to this W&B project (needs wandb)")
    wandb_run_name: str | None = option(None, "W&B run name")
    progress: bool = option(
        True, "Show progress (a bar with an ETA on a terminal, else a line every --log-every)"
    )

    def __post_init__(self) -> None:
        check_int("--log-every", self.log_every)
        if self.wandb_project is not None and not self.wandb_project.strip():
            raise ValueError("--wandb-project must not be empty")
        if self.wandb_run_name is not None and self.wandb_project is None:
            raise ValueError("--wandb-run-name needs --wandb-project")

    @property
    def wandb(self) -> bool:
        return self.wandb_project is not None


@dataclass(frozen=True)
class DebugConfig:
    """Test hooks."""

    fail_at_step: int | None = option(
        None, "Testing: raise once, right after this step (first attempt only; Ray restarts it)"
    )
    nan_grad_at_step: int | None = option(
        None, "Testing: make the gradient of this optimizer step (1-based) NaN, after its backward passes"
    )
    nan_grad_steps: int = option(1, "Testing: with --nan-grad-at-step, poison this many steps in a row")

    def __post_init__(self) -> None:
        check_int("--fail-at-step", self.fail_at_step, allow_none=True)
        check_int("--nan-grad-at-step", self.nan_grad_at_step, allow_none=True)
        check_int("--nan-grad-steps", self.nan_grad_steps)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs (``alm-pipeline train`` fills it from its options)."""

    data: DataConfig
    student: StudentSpec
    output: str = option("runs/exp", "Run directory: checkpoints/, final/, metrics.csv, tensorboard/")
    optim: OptimConfig = field(default_factory=OptimConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    combine: CombineConfig = field(default_factory=CombineConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        dist_cfg = self.distributed
        if not str(self.output).strip():
            raise ValueError("--output must not be empty")
        if self.optim.batch_size < dist_cfg.num_workers:
            raise ValueError(
                f"--batch-size ({self.optim.batch_size}) must be >= --num-workers ({dist_cfg.num_workers})"
            )
        if dist_cfg.strategy == "fsdp" and self.student.lora_rank is not None:
            raise ValueError("FSDP with LoRA is not supported; LoRA students train with DDP (--strategy ddp)")
        if dist_cfg.strategy == "fsdp" and self.gradmag and dist_cfg.num_workers > 1:
            raise ValueError(
                "GradMag with FSDP is not supported; use --loss-combination fixed with --strategy fsdp"
            )

    @property
    def gradmag(self) -> bool:
        """Both losses are on and combined with GradMag."""
        return self.loss.alm and self.loss.next_token_loss and self.combine.method == "gradmag"

    def resolved(self) -> TrainConfig:
        """Local paths made absolute (Ray Train needs an absolute storage path; workers may run elsewhere), and
        ``--bf16`` decided when not given (on with ``--use-gpu``, off on CPU)."""
        bf16 = self.compute.bf16 if self.compute.bf16 is not None else self.distributed.use_gpu
        return dataclasses.replace(
            self,
            compute=dataclasses.replace(self.compute, bf16=bf16),
            data=dataclasses.replace(
                self.data,
                aligned=_absolute(self.data.aligned),
                cache=_absolute(self.data.cache),
                student_tokenizer=_absolute(self.data.student_tokenizer),
                chat_template=_absolute(self.data.chat_template),
            ),
            student=dataclasses.replace(
                self.student,
                student=_absolute(self.student.student),
                init_from=_absolute(self.student.init_from),
            ),
            output=self.output if is_uri(self.output) else str(Path(self.output).resolve()),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return from_dict(cls, d)

    def data_identity(self) -> dict:
        """Settings that fix the data order and the objective: a resumed run must use the same ones."""
        return {
            "batch_size": self.optim.batch_size,
            "seed": self.optim.seed,
            "shuffle_window": self.data.shuffle_window,
            "alm": self.loss.alm,
            "next_token_loss": self.loss.next_token_loss,
            "distance": self.loss.distance,
            "tau": self.loss.tau,
            "debias": self.loss.debias,
        }


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass in ``annotation`` (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def from_dict(cls: type[T], data: dict) -> T:
    """Build the dataclass ``cls`` from ``data`` (as :func:`dataclasses.asdict` or JSON gives it): nested
    dataclass fields from nested dicts, tuple fields from lists; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} setting(s): {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        annotation = hints[name]
        sub = _dataclass_in(annotation)
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value)
        elif isinstance(value, list) and typing.get_origin(annotation) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
