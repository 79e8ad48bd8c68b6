"""``alm-pipeline train``: parse the options into a :class:`~alm_pipeline.trainer.train.TrainConfig` and call
:func:`~alm_pipeline.trainer.train.run_training`. Registered in ``alm_pipeline/cli/main.py`` as
``app.command("train")(train)``; ``python -m alm_pipeline.cli.train_cmd`` runs it on its own."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from alm_pipeline.cli.console import fail as _fail
from alm_pipeline.cli.console import say as _say

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def train(
    aligned: Annotated[
        Path | None,
        typer.Option(help="Aligned set directory (from `alm-pipeline align`); fixes the student tokenizer"),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            help="Teacher cache to align on the fly (instead of --aligned); needs --student-tokenizer"
        ),
    ] = None,
    student_tokenizer: Annotated[
        str | None, typer.Option(help="With --cache: the student tokenizer (folder, short name, or 'bytes')")
    ] = None,
    gamma: Annotated[
        float | None, typer.Option(help="With --cache: γ merging threshold (default 0.1, as in align)")
    ] = None,
    max_student_length: Annotated[
        int | None,
        typer.Option(help="With --cache: student tokens per document (default: whole cached text)"),
    ] = None,
    student: Annotated[
        str | None,
        typer.Option(
            help="Existing student model (folder, short name or hub name) that uses the student tokenizer"
        ),
    ] = None,
    init_from: Annotated[
        str | None,
        typer.Option(
            help="Tokenizer transfer: start from this model (usually the teacher) with new embeddings"
        ),
    ] = None,
    embedding_init: Annotated[
        str,
        typer.Option(help="Embedding initialisation for --init-from: fvt (mean of source-token embeddings)"),
    ] = "fvt",
    num_layers: Annotated[int | None, typer.Option(help="Keep only the first N transformer blocks")] = None,
    lora_rank: Annotated[
        int | None, typer.Option(help="Train LoRA adapters of this rank (default: full)")
    ] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: the rank)")] = None,
    output: Annotated[
        Path, typer.Option(help="Run directory: checkpoints/, final/, metrics.csv, tensorboard/")
    ] = Path("runs/exp"),
    steps: Annotated[int, typer.Option(help="Optimizer steps")] = 1000,
    batch_size: Annotated[
        int, typer.Option(help="Documents per optimizer step (global, over all workers)")
    ] = 32,
    micro_batch_tokens: Annotated[
        int,
        typer.Option(
            help="Padded tokens per forward pass per worker; the rest of the batch is gradient-accumulated"
        ),
    ] = 8192,
    packing: Annotated[
        bool,
        typer.Option(
            help="Pack several documents per row (attention never crosses documents); --no-packing: length buckets"
        ),
    ] = True,
    lr: Annotated[float, typer.Option(help="Peak learning rate")] = 1e-5,
    warmup_steps: Annotated[
        int | None,
        typer.Option(help="Linear warm-up steps, then linear decay to 0 (default: 10% of --steps)"),
    ] = None,
    weight_decay: Annotated[
        float, typer.Option(help="Weight decay (default 0: Adam without weight decay; > 0 uses AdamW)")
    ] = 0.0,
    adam_beta1: Annotated[float, typer.Option(help="Adam β1")] = 0.9,
    adam_beta2: Annotated[float, typer.Option(help="Adam β2")] = 0.95,
    max_grad_norm: Annotated[
        float, typer.Option(help="Clip the gradient norm to this (0: no clipping; the norm is always logged)")
    ] = 1.0,
    bf16: Annotated[
        bool, typer.Option(help="bfloat16 autocast (default fp32; loss statistics stay fp32)")
    ] = False,
    distance: Annotated[
        str,
        typer.Option(
            help="ALM distance: binary_kl (default), binary_ce, binary_tvd, binary_kl_tau_limit, abs_tau_limit"
        ),
    ] = "binary_kl",
    tau: Annotated[float, typer.Option(help="ALM temperature τ")] = 100.0,
    debias: Annotated[
        bool | None,
        typer.Option(
            "--debias/--no-debias", help="Outcome-chunk debiasing (default: as stored in the aligned set)"
        ),
    ] = None,
    next_token_loss: Annotated[
        bool, typer.Option(help="Add the student's next-token loss (hybrid distillation; default off)")
    ] = False,
    loss_combination: Annotated[
        str,
        typer.Option(help="With --next-token-loss: gradmag (default) or fixed (--alm-weight/--ntp-weight)"),
    ] = "gradmag",
    alm_weight: Annotated[float, typer.Option(help="Fixed weight of the ALM loss")] = 1.0,
    ntp_weight: Annotated[float, typer.Option(help="Fixed weight of the next-token loss")] = 1.0,
    num_workers: Annotated[int, typer.Option(help="Ray Train workers (data-parallel)")] = 1,
    use_gpu: Annotated[bool, typer.Option(help="One GPU per worker")] = False,
    strategy: Annotated[
        str, typer.Option(help="ddp (default) or fsdp (shard a student that does not fit one device)")
    ] = "ddp",
    cpus_per_worker: Annotated[
        float | None, typer.Option(help="Ray CPUs per worker (default: leave one CPU to Ray Data, at most 1)")
    ] = None,
    torch_threads: Annotated[
        int | None, typer.Option(help="torch threads per worker (default: cores/workers)")
    ] = None,
    checkpoint_every: Annotated[
        int, typer.Option(help="Save a checkpoint every N steps (and at the end)")
    ] = 500,
    keep_checkpoints: Annotated[int, typer.Option(help="Keep the N newest checkpoints (0: all)")] = 3,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint under --output")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Delete an earlier run's checkpoints and metrics in --output")
    ] = False,
    max_failures: Annotated[
        int,
        typer.Option(
            help="Restart failed workers from the latest checkpoint up to N times (Ray FailureConfig)"
        ),
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the data order")] = 0,
    log_every: Annotated[
        int, typer.Option(help="Console line every N steps when stderr is not a terminal")
    ] = 10,
    tensorboard: Annotated[bool, typer.Option(help="Write TensorBoard event files")] = True,
    wandb_project: Annotated[
        str | None, typer.Option(help="Also log to this W&B project (needs wandb)")
    ] = None,
    wandb_run_name: Annotated[str | None, typer.Option(help="W&B run name")] = None,
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in the backward")
    ] = False,
    recompute_logits: Annotated[
        bool | None,
        typer.Option(
            "--recompute-logits/--no-recompute-logits",
            help="Recompute the LM head's logits slice by slice in the backward (memory O(slice x vocab), one more "
            "LM-head matmul) instead of keeping the fp32 probabilities of a micro-batch (micro-batch tokens x "
            "vocab x 4 bytes). Default: recompute only when those would exceed --logits-memory-mib",
        ),
    ] = None,
    logits_memory_mib: Annotated[
        int, typer.Option(help="Budget for kept fp32 probabilities per micro-batch (see --recompute-logits)")
    ] = 2048,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray started for the run)",
        ),
    ] = None,
    num_cpus: Annotated[
        int | None, typer.Option(help="CPUs of the local Ray instance (default: all cores)")
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Ray worker logs")] = False,
) -> None:
    """Distil a student from cached teacher likelihoods with Ray Train (ALM loss; the teacher is never loaded).

    Defaults: binarised KL, τ = 100, debiasing and γ as stored in the aligned set, no next-token loss unless
    --next-token-loss, fp32 unless --bf16, Adam without weight decay, warm-up then linear decay. Writes
    checkpoints (Hugging Face folders + optimizer state) to OUTPUT/checkpoints, the final model to OUTPUT/final,
    and per-step metrics to OUTPUT/metrics.csv and OUTPUT/tensorboard.
    """
    from alm_pipeline.pipeline.ray_utils import RayConfig
    from alm_pipeline.trainer.checkpoint import CheckpointError
    from alm_pipeline.trainer.train import TrainConfig, TrainingError, run_training

    try:
        config = TrainConfig(
            aligned=str(aligned) if aligned else None,
            cache=str(cache) if cache else None,
            student_tokenizer=student_tokenizer,
            gamma=gamma,
            max_student_length=max_student_length,
            student=student,
            init_from=init_from,
            embedding_init=embedding_init,
            num_layers=num_layers,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            output=str(output),
            steps=steps,
            batch_size=batch_size,
            micro_batch_tokens=micro_batch_tokens,
            packing=packing,
            lr=lr,
            warmup_steps=warmup_steps,
            weight_decay=weight_decay,
            adam_beta1=adam_beta1,
            adam_beta2=adam_beta2,
            max_grad_norm=max_grad_norm if max_grad_norm > 0 else None,
            bf16=bf16,
            distance=distance,
            tau=tau,
            debias=debias,
            next_token_loss=next_token_loss,
            loss_combination=loss_combination,
            alm_weight=alm_weight,
            ntp_weight=ntp_weight,
            num_workers=num_workers,
            use_gpu=use_gpu,
            strategy=strategy,
            cpus_per_worker=cpus_per_worker,
            torch_threads=torch_threads,
            checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints if keep_checkpoints > 0 else None,
            resume=resume,
            overwrite=overwrite,
            max_failures=max_failures,
            seed=seed,
            log_every=log_every,
            tensorboard=tensorboard,
            wandb_project=wandb_project,
            wandb_run_name=wandb_run_name,
            gradient_checkpointing=gradient_checkpointing,
            checkpoint_slices=recompute_logits,
            logits_memory_mib=logits_memory_mib,
            ray=RayConfig(address=address, num_cpus=num_cpus, log_to_driver=verbose),
        )
    except ValueError as err:
        _fail(str(err))
    try:
        result = run_training(config, say=_say)
    except (TrainingError, CheckpointError, NotImplementedError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    loss = f"{result.final_loss:.6g}" if result.final_loss is not None else "n/a"
    _say(
        f"done: step {result.steps} (started at {result.start_step}), final loss {loss}, "
        f"{result.seconds:.1f}s -> {result.final_checkpoint}"
    )


def main() -> None:  # pragma: no cover
    typer.run(train)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
