"""``alm-pipeline train``: data plan and micro-batches, the pure-torch loop (self-distillation, learning,
packing, resume, checkpoints), and a few end-to-end runs under a real Ray Train (DDP equality, kill + resume,
FailureConfig restart with on-the-fly alignment)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from alm_pipeline.cache import store
from alm_pipeline.cache.aligned import ALIGNED_FORMAT_VERSION, ALIGNED_KIND, TOKENIZER_DIR, open_aligned_set
from alm_pipeline.cli.options import build_config
from alm_pipeline.pipeline.align import CoverageStats
from alm_pipeline.pipeline.align_stage import AlignSettings, align_table
from alm_pipeline.pipeline.byteview import load_byte_view
from alm_pipeline.pipeline.engine_hf import HFEngineConfig, HFTeacherEngine
from alm_pipeline.trainer.checkpoint import find_latest_checkpoint, list_checkpoints, read_trainer_state
from alm_pipeline.trainer.config import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    OptimConfig,
    StudentSpec,
    TrainConfig,
)
from alm_pipeline.trainer.data import AlignedRows, BatchPlan, build_micro_batch, plan_micro_batches
from alm_pipeline.trainer.driver import run_training, train_local
from alm_pipeline.trainer.errors import TrainingError
from alm_pipeline.trainer.forward import StudentForward, micro_batch_token_stats
from alm_pipeline.trainer.metrics import read_metrics_csv
from alm_pipeline.trainer.optim import lr_factor
from alm_pipeline.trainer.runtime import read_aligned_rows

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# building aligned sets without Ray: teacher scores (hf engine) -> cache rows -> align_table -> shards


def corpus_texts(n: int = 24, max_chars: int = 160) -> list[str]:
    """Short real documents: paragraphs of the bundled Shakespeare corpus."""
    texts: list[str] = []
    with open(REPO / "alm_pipeline" / "data" / "shakespeare.jsonl") as f:
        for line in f:
            for para in json.loads(line)["text"].split("\n\n"):
                para = para.strip()
                if len(para) >= 40:
                    texts.append(para[:max_chars])
                if len(texts) >= n:
                    return texts
    return texts


def cache_table(teacher_dir: Path, texts: list[str], max_length: int = 48) -> pa.Table:
    view = load_byte_view(teacher_dir)
    engine = HFTeacherEngine(
        HFEngineConfig(model=str(teacher_dir)), view.boundary_token_ids(), view.vocab_size
    )
    encs = [view.encode(t, max_length=max_length, doc_ref=str(i)) for i, t in enumerate(texts)]
    scores = engine.score([e.token_ids for e in encs])
    return pa.table(
        {
            "doc_id": [f"doc{i:04d}" for i in range(len(texts))],
            "text": [e.text for e in encs],
            "token_ids": pa.array([e.token_ids for e in encs], type=pa.list_(pa.int32())),
            "offsets": pa.array([e.offsets for e in encs], type=pa.list_(pa.int32())),
            "logprob": pa.array([s[0] for s in scores], type=pa.list_(pa.float32())),
            "boundary_logprob": pa.array([s[1] for s in scores], type=pa.list_(pa.float32())),
        }
    )


def write_aligned_set(
    root: Path, teacher_dir: Path, student: str, table: pa.Table, gamma: float = 0.1, shards: int = 2
) -> Path:
    teacher = load_byte_view(teacher_dir)
    view = load_byte_view(student)
    settings = AlignSettings(gamma=gamma)
    infos = []
    coverage = CoverageStats()
    per = math.ceil(table.num_rows / shards)
    for k in range(shards):
        cov = CoverageStats()
        part = align_table(table.slice(k * per, per), teacher.is_special, view, settings, cov)
        coverage.add(cov)
        stats = {"coverage": cov.as_dict(), "dropped": {}, "dropped_examples": []}
        tokens = sum(len(x) for x in part.column("input_ids").to_pylist())
        infos.append(store.write_shard(root, k, part, tokens, stats))
    if student == "bytes":
        from alm_pipeline.pipeline.byte_tokenizer import build_byte_tokenizer

        build_byte_tokenizer().save_pretrained(root / TOKENIZER_DIR)
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(student).save_pretrained(root / TOKENIZER_DIR)
    manifest = {
        "kind": ALIGNED_KIND,
        "format_version": ALIGNED_FORMAT_VERSION,
        "state": "complete",
        "cache": {"path": str(root / "no-cache"), "fingerprint": "test"},
        "student_tokenizer": {
            "name": student,
            **{k: v for k, v in view.describe().items() if k != "special_ids"},
        },
        "settings": {**settings.identity(), "min_coverage": settings.min_coverage},
        "coverage": {
            **coverage.as_dict(),
            "documents_kept": sum(i.rows for i in infos),
            "dropped": {},
            "dropped_examples": [],
        },
        "shards": [i.to_json() for i in infos],
    }
    store.atomic_write_json(root / store.MANIFEST, manifest)
    open_aligned_set(root)  # valid
    return root


@pytest.fixture(scope="module")
def teacher_table(gpt2_bl_model) -> pa.Table:
    return cache_table(gpt2_bl_model, corpus_texts(24))


@pytest.fixture(scope="module")
def self_aligned(tmp_path_factory, gpt2_bl_model, teacher_table) -> Path:
    """Student tokenizer = the teacher's own."""
    return write_aligned_set(
        tmp_path_factory.mktemp("aligned_self"), gpt2_bl_model, str(gpt2_bl_model), teacher_table
    )


@pytest.fixture(scope="module")
def small_aligned(tmp_path_factory, gpt2_bl_model, teacher_table, tokenizer_dirs) -> Path:
    """A different (smaller byte-level BPE) student tokenizer: tokenizer transfer."""
    return write_aligned_set(
        tmp_path_factory.mktemp("aligned_small"),
        gpt2_bl_model,
        str(tokenizer_dirs["byte_level_small"]),
        teacher_table,
    )


@pytest.fixture(scope="module")
def mixed_aligned(tmp_path_factory, gpt2_bl_model, tokenizer_dirs) -> Path:
    """Tokenizer transfer on documents of mixed lengths (two of three cut short): packed rows hold several."""
    texts = [t if i % 3 == 0 else t[:20] for i, t in enumerate(corpus_texts(24))]
    return write_aligned_set(
        tmp_path_factory.mktemp("aligned_mixed"),
        gpt2_bl_model,
        str(tokenizer_dirs["byte_level_small"]),
        cache_table(gpt2_bl_model, texts),
    )


def config(aligned: Path, output: Path, **kw) -> TrainConfig:
    """A small run's config; ``kw`` by option name (``alm-pipeline train --help``), as on the command line."""
    base = {
        "aligned": str(aligned),
        "output": str(output),
        "steps": 6,
        "batch_size": 6,
        "micro_batch_tokens": 128,
        "lr": 3e-3,
        "warmup_steps": 1,
        "checkpoint_every": 3,
        "progress": False,
        "tensorboard": False,
        "torch_threads": 1,
    }
    base.update(kw)
    return build_config(TrainConfig, base)


def losses(rows: list[dict], key: str = "loss") -> np.ndarray:
    return np.array([r[key] for r in rows], dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# data plan and micro-batches


def test_batch_plan_is_deterministic_and_covers_epochs():
    plan = BatchPlan(num_docs=10, batch_size=4, seed=3)
    again = BatchPlan(num_docs=10, batch_size=4, seed=3)
    seen = np.concatenate([plan.global_batch(s) for s in range(5)])  # 20 positions = 2 epochs
    assert all(np.array_equal(plan.global_batch(s), again.global_batch(s)) for s in range(5))
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # a new permutation per epoch
    assert plan.position(3) == {"epoch": 1, "index_in_epoch": 2, "seed": 3}
    # worker slices partition the global batch whatever the number of workers
    b = plan.global_batch(2)
    for w in (1, 2, 3):
        assert np.array_equal(np.concatenate(BatchPlan.worker_slices(b, w)), b)
    assert not np.array_equal(BatchPlan(10, 4, seed=4).global_batch(0), plan.global_batch(0))


def _chunks(lengths: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    starts = [np.array([1, 3], dtype=np.int32) if n > 3 else np.array([1], dtype=np.int32) for n in lengths]
    ends = [np.minimum(s + 1, n - 1).astype(np.int32) for s, n in zip(starts, lengths, strict=True)]
    return starts, ends


def _rows(lengths: list[int]) -> AlignedRows:
    ids = [np.arange(n, dtype=np.int32) + 10 * i for i, n in enumerate(lengths)]
    starts, ends = _chunks(lengths)
    table = pa.table(
        {
            "doc_id": [f"d{i}" for i in range(len(lengths))],
            "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
            "chunk_start": pa.array(starts, type=pa.list_(pa.int32())),
            "chunk_end": pa.array(ends, type=pa.list_(pa.int32())),
            "teacher_chunk_logprob": pa.array(
                [-np.ones(len(s), np.float32) for s in starts], type=pa.list_(pa.float32())
            ),
            "teacher_chunk_boundary_logprob": pa.array(
                [-0.5 * np.ones(len(s), np.float32) for s in starts], type=pa.list_(pa.float32())
            ),
        }
    )
    return AlignedRows.from_table(table)


def test_micro_batches_pack_without_crossing_and_respect_budget():
    lengths = [9, 3, 5, 2, 7, 4]
    rows = _rows(lengths)
    starts, ends = _chunks(lengths)
    docs = np.arange(6)
    packed = plan_micro_batches(rows.lengths, max_tokens=20, packing=True)
    flat = sorted(p for mb in packed for row in mb for p in row)
    assert flat == list(range(6))  # every document exactly once
    assert any(len(row) >= 2 for mb in packed for row in mb)  # rows really hold several documents
    for mb_layout in packed:
        mb = build_micro_batch(rows, docs, mb_layout)
        assert mb.padded_tokens <= 20 or len(mb_layout) == 1
        # every document's tokens, positions restarting at 0, groups shifted to the packed columns
        expected_groups = []
        for r, row in enumerate(mb_layout):
            col = 0
            for p in row:
                n = int(rows.lengths[p])
                assert mb.input_ids[r, col : col + n].tolist() == rows.input_ids(p).tolist()
                assert mb.position_ids[r, col : col + n].tolist() == list(range(n))
                assert bool(mb.doc_start[r, col]) and not mb.doc_start[r, col + 1 : col + n].any()
                expected_groups += [(r, col + a, col + b) for a, b in zip(starts[p], ends[p], strict=True)]
                col += n
            assert not mb.attention_mask[r, col:].any()
        g = mb.groups
        got = zip(g.batch_index.tolist(), g.start.tolist(), g.end.tolist(), strict=True)
        assert sorted(got) == sorted(expected_groups)
    # packing needs fewer padded tokens than one document per row
    bucketed = plan_micro_batches(rows.lengths, max_tokens=20, packing=False)
    pad = lambda plan: sum(build_micro_batch(rows, docs, mb).padded_tokens for mb in plan)  # noqa: E731
    assert pad(packed) < pad(bucketed)
    assert all(len(row) == 1 for mb in bucketed for row in mb)


def test_aligned_rows_validation_names_the_document():
    rows = _rows([5, 4])
    table = pa.table(
        {
            "doc_id": ["ok", "bad"],
            "input_ids": pa.array([rows.input_ids(0), rows.input_ids(1)], type=pa.list_(pa.int32())),
            "chunk_start": pa.array([[1], [2]], type=pa.list_(pa.int32())),
            "chunk_end": pa.array([[2], [4]], type=pa.list_(pa.int32())),  # 4 >= length 4
            "teacher_chunk_logprob": pa.array([[-1.0], [-1.0]], type=pa.list_(pa.float32())),
            "teacher_chunk_boundary_logprob": pa.array([[-1.0], [-1.0]], type=pa.list_(pa.float32())),
        }
    )
    with pytest.raises(ValueError, match=r"document 'bad'.*ends after the document"):
        AlignedRows.from_table(table)
    # canonical order does not depend on the input order
    a = _rows([5, 4, 6])
    b = a.take(np.array([2, 0, 1]))
    assert a.canonical().doc_ids.tolist() == b.canonical().doc_ids.tolist() == ["d0", "d1", "d2"]


def test_lr_schedule_warmup_then_linear_decay():
    f = [lr_factor(s, 2, 10) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert f[-1] == pytest.approx(1 / 8) and all(a > b for a, b in zip(f[2:], f[3:], strict=False))
    assert lr_factor(0, 0, 5) == 1.0


def test_config_validation_messages(self_aligned, tmp_path):
    with pytest.raises(ValueError, match="exactly one data source"):
        build_config(TrainConfig, {"student": "x", "output": str(tmp_path)})
    with pytest.raises(ValueError, match="exactly one student"):
        build_config(TrainConfig, {"aligned": str(self_aligned), "output": str(tmp_path)})
    with pytest.raises(ValueError, match="--cache needs --student-tokenizer"):
        DataConfig(cache="c")
    with pytest.raises(ValueError, match="embedding-init"):
        StudentSpec(init_from="x", embedding_init="random")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(
            data=DataConfig(aligned="a"),
            student=StudentSpec(student="x"),
            optim=OptimConfig(batch_size=1),
            distributed=DistributedConfig(num_workers=2),
        )
    with pytest.raises(ValueError, match="--resume and --overwrite"):
        CheckpointConfig(resume=True, overwrite=True)


def test_config_tree_round_trips_through_json_and_zero_means_off(tmp_path):
    from alm_pipeline.pipeline.ray_utils import RayConfig

    cfg = config(
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


def test_metrics_logger_rewinds_and_backfills(tmp_path):
    from alm_pipeline.trainer.metrics import MetricsLogger

    cols = ["step", "loss", "lr"]
    log = MetricsLogger(tmp_path, cols, total_steps=5, tensorboard=True, console=False)
    for s in range(1, 5):
        log.log({"step": s, "loss": 1.0 / s, "lr": 0.1})
    log.log({"step": 3, "loss": 0.5, "lr": 0.1})  # a restart from the step-2 checkpoint replays step 3
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics_csv(tmp_path / "metrics.csv")] == [
        (1, 1.0),
        (2, 0.5),
        (3, 0.5),
    ]
    # a resumed run (checkpoint at step 5) whose predecessor logged only up to step 3: rows 4, 5 come back
    # from the checkpoint, rows after 5 are dropped
    backfill = [{"step": s, "loss": 0.1 * s, "lr": 0.1} for s in (2, 3, 4, 5)]
    log = MetricsLogger(
        tmp_path, cols, total_steps=8, resume_step=5, backfill=backfill, tensorboard=False, console=False
    )
    log.log({"step": 6, "loss": 0.06, "lr": 0.1})
    log.close()
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[3]["loss"] == pytest.approx(0.4)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_cli_help_documents_defaults():
    import typer
    from typer.testing import CliRunner

    from alm_pipeline.cli.train_cmd import train

    app = typer.Typer()
    app.command("train")(train)
    app.command("other")(lambda: None)
    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0
    text = " ".join(out.output.split())
    for needle in (
        "binarised KL",
        "τ = 100",
        "as stored in the aligned set",
        "--next-token-loss",
        "--bf16",
        "--resume",
    ):
        assert needle in text, needle
    bad = CliRunner().invoke(app, ["train", "--student", "x"])
    assert bad.exit_code == 2 and "exactly one data source" in " ".join(bad.output.split())
    bad = CliRunner().invoke(app, ["train", "--aligned", "a", "--student", "x", "--strategy", "zero3"])
    assert bad.exit_code == 2 and "zero3" in bad.output


# ----------------------------------------------------------------------------------------------------------
# the training loop in this process


def test_self_distillation_loss_is_zero_at_step_zero(self_aligned, gpt2_bl_model, tmp_path):
    """Student = teacher weights with the teacher's own tokenizer: the chunk likelihoods agree."""
    res = train_local(config(self_aligned, tmp_path / "run", student=str(gpt2_bl_model), steps=1, lr=1e-5))
    first = res.history[0]
    assert first["step"] == 1 and first["valid_chunks"] > 20
    assert first["loss"] < 1e-6 and first["mean_abs_chunk_logprob_diff"] < 1e-4


@pytest.mark.parametrize("keep_probs", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_token_stats_equal_reference_values_and_gradients(keep_probs, softcap):
    """The trainer's fused LM-head statistics = loss.student_token_stats, forward and backward (padding, padded
    vocabulary rows, LM-head bias, soft-capping, several slices)."""
    from alm_pipeline.trainer.loss import student_token_stats
    from alm_pipeline.trainer.token_stats import fused_token_stats

    gen = torch.Generator().manual_seed(0)
    bsz, seq, hid, vocab = 3, 11, 16, 37
    ids = torch.randint(0, vocab, (bsz, seq), generator=gen)
    mask = torch.ones(bsz, seq, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 3:] = False
    boundary = torch.rand(vocab, generator=gen) < 0.4
    hidden0 = torch.randn(bsz, seq, hid, generator=gen, dtype=torch.float64)
    weight0 = torch.randn(vocab + 5, hid, generator=gen, dtype=torch.float64)  # 5 padded vocabulary rows
    bias0 = torch.randn(vocab + 5, generator=gen, dtype=torch.float64)
    w_lp = torch.randn(bsz, seq, generator=gen, dtype=torch.float64)
    w_sig = torch.randn(bsz, seq, generator=gen, dtype=torch.float64)
    results = []
    for fn, kw in ((student_token_stats, {}), (fused_token_stats, {"keep_probs": keep_probs})):
        hidden, weight, bias = (t.clone().requires_grad_() for t in (hidden0, weight0, bias0))
        st = fn(
            ids,
            boundary,
            hidden_states=hidden,
            lm_head_weight=weight,
            lm_head_bias=bias,
            attention_mask=mask,
            logit_softcap=softcap,
            slice_size=4,
            **kw,
        )
        ((st.token_logprob * w_lp).sum() + (st.boundary_logprob * w_sig).sum()).backward()
        results.append((st, hidden.grad, weight.grad, bias.grad))
    (ref, *ref_grads), (got, *got_grads) = results
    assert torch.equal(ref.token_mask, got.token_mask) and torch.equal(ref.position_mask, got.position_mask)
    torch.testing.assert_close(got.token_logprob.double(), ref.token_logprob.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        got.boundary_logprob.double(), ref.boundary_logprob.double(), atol=1e-5, rtol=1e-5
    )
    for g_ref, g_got in zip(ref_grads, got_grads, strict=True):
        torch.testing.assert_close(g_got.double(), g_ref.double(), atol=1e-4, rtol=1e-4)


def test_student_forward_matches_model_logits(self_aligned, gpt2_bl_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpt2_bl_model)
    view = load_byte_view(gpt2_bl_model)
    fwd = StudentForward(model, view.boundary_mask, slice_size=7)
    rows = read_aligned_rows(open_aligned_set(self_aligned).shard_files())
    ids = torch.as_tensor(rows.input_ids(0), dtype=torch.long)[None]
    assert fwd.self_check(ids) < 1e-4


def test_tiny_student_learns_and_checkpoint_is_plain_transformers(small_aligned, gpt2_bl_model, tmp_path):
    """Tokenizer transfer (FVT) to another tokenizer: a few dozen steps lower the loss; the checkpoint is a
    Hugging Face folder that loads with plain transformers and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    cfg = config(
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


def test_packed_rows_keep_attention_inside_each_document(self_aligned, gpt2_bl_model):
    """Rows packed with several documents (position ids restarting, no padding mask, as the worker runs them)
    give every document the log-probs and boundary log-probs it gets when run alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpt2_bl_model).eval()
    fwd = StudentForward(model, load_byte_view(gpt2_bl_model).boundary_mask, slice_size=16)
    rows = read_aligned_rows(open_aligned_set(self_aligned).shard_files())
    docs = np.arange(8)
    width = 3 * int(rows.lengths[docs].max())
    (layout,) = plan_micro_batches(rows.lengths[docs], max_tokens=10**6, packing=True, pack_length=width)
    assert max(len(row) for row in layout) >= 3  # the case under test: several documents per row
    mb = build_micro_batch(rows, docs, layout)
    assert mb.packed
    with torch.no_grad():
        lp, sigma = fwd(mb.input_ids, mb.attention_mask, position_ids=mb.position_ids)
        stats = micro_batch_token_stats(lp, sigma, mb)
        # the same rows under plain causal attention (documents see their predecessors in the row): must differ
        crossed, _ = fwd(mb.input_ids, mb.attention_mask, attention_mask=mb.attention_mask.long())
    later_docs = 0
    for r, row in enumerate(layout):
        col = 0
        for k, p in enumerate(row):
            n = int(rows.lengths[docs[p]])
            ids = torch.as_tensor(rows.input_ids(int(docs[p])), dtype=torch.long)[None]
            with torch.no_grad():
                alone_lp, alone_sigma = fwd(ids, torch.ones_like(ids, dtype=torch.bool))
            assert not stats.token_mask[r, col] and stats.token_mask[r, col + 1 : col + n].all()
            torch.testing.assert_close(
                stats.token_logprob[r, col + 1 : col + n], alone_lp[0, 1:], atol=1e-4, rtol=1e-4
            )
            torch.testing.assert_close(sigma[r, col : col + n], alone_sigma[0], atol=1e-4, rtol=1e-4)
            if k > 0:
                later_docs += 1
                assert (crossed[r, col + 1 : col + n] - alone_lp[0, 1:]).abs().max() > 1e-3
            col += n
    assert later_docs >= 2


def test_packing_equals_bucketing_and_micro_batching(mixed_aligned, gpt2_bl_model, tmp_path):
    """The loss of a step does not depend on how the global batch is cut into micro-batches or packed (the
    packed run's rows hold several documents)."""
    rows, _ = read_aligned_rows(open_aligned_set(mixed_aligned).shard_files()).select_trainable(
        need_groups=True
    )
    plan = BatchPlan(rows.num_docs, batch_size=6, seed=0)  # config()'s batch size and seed
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
        res = train_local(config(mixed_aligned, tmp_path / name, init_from=str(gpt2_bl_model), steps=3, **kw))
        runs[name] = losses(res.history)
        assert res.info["packing"] == (name == "packed")
    np.testing.assert_allclose(runs["packed"], runs["one_pass"], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(runs["bucketed"], runs["one_pass"], rtol=2e-5, atol=1e-7)


def test_resume_gives_the_same_curve_and_refuses_mismatches(small_aligned, gpt2_bl_model, tmp_path):
    kw = {"init_from": str(gpt2_bl_model), "steps": 6, "checkpoint_every": 3}
    full = train_local(config(small_aligned, tmp_path / "full", **kw))
    # the same run, interrupted right after step 4 (its last checkpoint is step 3), then resumed
    with pytest.raises(RuntimeError, match="injected failure after step 4"):
        train_local(config(small_aligned, tmp_path / "part", fail_at_step=4, **kw))
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train_local(config(small_aligned, tmp_path / "part", **kw))
    resumed = train_local(config(small_aligned, tmp_path / "part", resume=True, fail_at_step=4, **kw))
    assert resumed.start_step == 3 and resumed.steps == 6
    assert [r["step"] for r in resumed.history] == [4, 5, 6]
    np.testing.assert_allclose(losses(resumed.history), losses(full.history)[3:], rtol=1e-6, atol=1e-9)
    curve = read_metrics_csv(tmp_path / "part" / "metrics.csv")  # one curve, steps 4.. rewritten once
    assert [r["step"] for r in curve] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in curve], losses(full.history), rtol=1e-6, atol=1e-9)
    # a checkpoint copied only in part (a file shorter than recorded) is never resumed from
    import shutil

    latest = find_latest_checkpoint(tmp_path / "part")
    broken = latest.with_name("checkpoint-000099")
    shutil.copytree(latest, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert find_latest_checkpoint(tmp_path / "part") == latest
    with pytest.raises(Exception, match="settings differ.*batch_size"):
        train_local(
            config(small_aligned, tmp_path / "part", resume=True, **{**kw, "steps": 8, "batch_size": 4})
        )


# ----------------------------------------------------------------------------------------------------------
# Ray Train end to end


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
            res = train_local(config(Path(root) / "aligned", Path(root) / name, **{**base, **kw}))
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
    ref_gradmag = train_local(config(small_aligned, tmp_path / "ref1", **base, micro_batch_tokens=100000))
    ref_fixed = train_local(
        config(small_aligned, tmp_path / "ref2", **base, loss_combination="fixed", ntp_weight=0.01)
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


# ----------------------------------------------------------------------------------------------------------
# Ray Train end to end


@pytest.mark.ray
def test_ray_train_two_workers_match_one_worker(ray_local, small_aligned, gpt2_bl_model, tmp_path):
    """2 DDP workers under Ray Train give the 1-worker losses on the same global batches; checkpoints,
    metrics.csv, TensorBoard files and a final Hugging Face folder that loads and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"init_from": str(gpt2_bl_model), "steps": 4, "checkpoint_every": 2}
    one = train_local(config(small_aligned, tmp_path / "one", **kw))
    out = tmp_path / "two"
    two = run_training(config(small_aligned, out, num_workers=2, tensorboard=True, **kw))
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
        run_training(config(small_aligned, out, num_workers=2, **kw))


@pytest.mark.ray
def test_cli_kill_then_resume_reaches_the_same_step_and_loss(
    ray_local, small_aligned, gpt2_bl_model, tmp_path
):
    """``alm-pipeline train`` killed (SIGKILL of its whole process group) mid-run, then ``--resume``: the run ends
    at the same step with the same loss curve as an uninterrupted run."""
    steps = 80
    kw = {"init_from": str(gpt2_bl_model), "steps": steps, "checkpoint_every": 5, "batch_size": 4}
    kw_cli = {"micro_batch_tokens": 100000}
    ref = train_local(config(small_aligned, tmp_path / "ref", **kw, **kw_cli))
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
    """``--cache`` + ``--student-tokenizer bytes`` + ``--init-from``: aligned on the fly through Ray Data; a worker
    failure after step 3 is retried by Ray Train's FailureConfig from the step-2 checkpoint, and the curve equals
    an uninterrupted run on the same data aligned ahead of time."""
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
            shard_size=8,
            ray=RayConfig(num_cpus=2),
        )
    )
    table = pa.concat_tables(open_cache(tmp_path / "cache").iter_tables())
    aligned = write_aligned_set(tmp_path / "aligned", gpt2_bl_model, "bytes", table)
    kw = {"init_from": str(gpt2_bl_model), "steps": 5, "checkpoint_every": 2, "batch_size": 4}
    ref = train_local(config(aligned, tmp_path / "ref", **kw))
    cfg = config(aligned, tmp_path / "stream", **kw, fail_at_step=3, max_failures=1)
    cfg = dataclasses.replace(
        cfg,
        data=DataConfig(cache=str(tmp_path / "cache"), student_tokenizer="bytes"),
        distributed=dataclasses.replace(cfg.distributed, ray=RayConfig()),
    )
    res = run_training(cfg)
    assert res.steps == 5 and (tmp_path / "stream" / ".injected_failure").exists()
    assert res.info["start_step"] == 2 and res.info["resumed_from"].endswith("checkpoint-000002")
    assert res.info["student"]["tokenizer"] == "bytes"
    curve = read_metrics_csv(tmp_path / "stream" / "metrics.csv")
    assert [r["step"] for r in curve] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([r["loss"] for r in curve], losses(ref.history), rtol=1e-5)
