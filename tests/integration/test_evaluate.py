"""Evaluation under a real local Ray: the cache's teacher bits per byte against the teacher on the cached
texts, chunk agreement of self-distillation, and the plots of a real training run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
from transformers import AutoTokenizer
from typer.testing import CliRunner

from alm_pipeline.cli.evaluate_cmd import evaluate, plot
from alm_pipeline.evaluation.agreement import chunk_agreement
from alm_pipeline.evaluation.bits_per_byte import cache_bits_per_byte
from alm_pipeline.evaluation.models import EvalError, load_eval_model
from alm_pipeline.evaluation.run import EvalConfig, run_evaluation
from tests import factories
from tests.factories import (
    EVAL_LONG_TEXT,
    EVAL_TEXTS,
    png_size,
    shard_bytes,
    teacher_cache_config,
    write_texts,
)

MAX_LENGTH = 48


CACHE_TEXTS = [*EVAL_TEXTS, EVAL_LONG_TEXT, "Another line of verse,\nand yet another one.", "Emoji 👩‍💻 end"]


@pytest.fixture(scope="module")
def teacher_cache(ray_local, tmp_path_factory, llama_sp_model):
    from alm_pipeline.pipeline.align_stage import AlignConfig, AlignSettings, build_aligned_sets
    from alm_pipeline.pipeline.ray_utils import RayConfig
    from alm_pipeline.pipeline.teacher_cache import build_teacher_cache

    root = tmp_path_factory.mktemp("evaluate")
    data = write_texts(root / "corpus.jsonl", CACHE_TEXTS)
    build_teacher_cache(
        teacher_cache_config(
            llama_sp_model,
            data,
            root / "cache",
            id_field=None,
            max_length=MAX_LENGTH,
            shard_size=shard_bytes(data, 3),
            batch_tokens=128,
        )
    )
    # self-distillation: the cache aligned to the teacher's own tokenizer
    (summary,) = build_aligned_sets(
        AlignConfig(
            cache=str(root / "cache"),
            student_tokenizers=(str(llama_sp_model),),
            output=str(root / "aligned"),
            settings=AlignSettings(gamma=0.1),
            ray=RayConfig(num_cpus=2),
        )
    )
    return root / "cache", Path(summary.path)


@pytest.mark.ray
def test_cache_bits_per_byte_equals_the_teacher_on_the_cached_texts(teacher_cache, llama_sp_model, tmp_path):
    from alm_pipeline.cache import open_cache

    cache_dir, _ = teacher_cache
    cache = open_cache(cache_dir)
    rows = [r for t in cache.iter_tables(columns=["text", "truncated"]) for r in t.to_pylist()]
    assert len(cache.shards) == 3 and sum(r["truncated"] for r in rows) == 1
    texts = write_texts(tmp_path / "cached.jsonl", [r["text"] for r in rows])

    teacher, _ = cache_bits_per_byte(str(cache_dir))
    assert teacher.docs == len(CACHE_TEXTS) and teacher.truncated_docs == 1
    assert teacher.bits_per_byte == pytest.approx(cache.summary()["bits_per_byte"], abs=1e-5)
    result = run_evaluation(
        EvalConfig(
            model=str(llama_sp_model),
            data=str(texts),
            cache=str(cache_dir),
            cache_texts=True,
            max_length=MAX_LENGTH,
            batch_tokens=64,
        )
    )
    entry = result["models"][str(llama_sp_model)]
    assert abs(entry["bits_per_byte"]["cached"]["bits_per_byte"] - teacher.bits_per_byte) < 1e-5
    assert entry["bits_per_byte"]["cached"]["bytes"] == teacher.bytes
    assert entry["bits_per_byte"]["cached"]["predicted_tokens"] == teacher.predicted_tokens
    assert abs(result["cache"]["bits_per_byte"] - teacher.bits_per_byte) < 1e-12
    assert abs(entry["cache_texts"]["gap_to_teacher"]) < 1e-5
    # a BOS teacher: the cache scores every byte of the texts it stores
    assert teacher.excluded_bytes == 0 and teacher.bytes == teacher.document_bytes
    assert teacher.document_bytes == sum(len(r["text"].encode()) for r in rows)
    table = result["table"]
    assert table["columns"] == ["bits_per_byte/cache_texts", "bits_per_byte/cached"]
    assert [r["model"] for r in table["rows"]] == ["teacher (cache)", str(llama_sp_model)] and not table[
        "notes"
    ]
    # max_docs limits every source the same way
    first, _ = cache_bits_per_byte(str(cache_dir), max_docs=4)
    assert first.docs == 4 and first.bytes < teacher.bytes


@pytest.mark.ray
def test_cache_of_a_teacher_without_bos_reports_its_excluded_bytes(ray_local, gpt2_bl_model, tmp_path):
    """GPT-2 style teacher (a BOS token it does not add): the cache has no log-probability for each document's
    first token, so its bits per byte leave those bytes out and say so; the teacher evaluated as a model on the
    cached texts scores every byte (from its BOS token), and no gap is claimed between the two."""
    from alm_pipeline.pipeline.teacher_cache import build_teacher_cache

    texts = CACHE_TEXTS[:4]
    data = write_texts(tmp_path / "corpus.jsonl", texts)
    build_teacher_cache(
        teacher_cache_config(gpt2_bl_model, data, tmp_path / "cache", id_field=None, max_length=512)
    )
    result = run_evaluation(
        EvalConfig(model=f"teacher={gpt2_bl_model}", cache=str(tmp_path / "cache"), cache_texts=True)
    )
    cache, model = result["cache"], result["models"]["teacher"]["cache_texts"]
    document_bytes = sum(len(t.encode()) for t in texts)
    tok = AutoTokenizer.from_pretrained(str(gpt2_bl_model))
    first = [tok(t, return_offsets_mapping=True)["offset_mapping"][0][1] for t in texts]
    first_token_bytes = [len(t[:end].encode()) for t, end in zip(texts, first, strict=True)]
    assert cache["document_bytes"] == model["document_bytes"] == document_bytes
    assert cache["excluded_bytes"] == sum(first_token_bytes) and cache["context"].startswith("none")
    assert model["excluded_bytes"] == 0 and model["bytes"] == document_bytes
    assert model["context"].startswith("BOS '<|endoftext|>', prepended") and model["gap_to_teacher"] is None
    (note,) = result["table"]["notes"]
    assert f"{cache['excluded_bytes']} of {document_bytes} bytes are left out" in note


@pytest.mark.ray
def test_chunk_agreement_is_zero_for_self_distillation(
    teacher_cache, llama_sp_model, tokenizer_dirs, tmp_path
):
    _, aligned_dir = teacher_cache
    teacher = load_eval_model(str(llama_sp_model), max_logit_elements=5000)
    same, info = chunk_agreement(teacher, str(aligned_dir), batch_tokens=64)
    assert same.docs == len(CACHE_TEXTS) and same.groups > len(CACHE_TEXTS)
    assert info["gamma"] == 0.1
    assert same.mean_abs_logprob_diff < 1e-4 and same.mean_abs_debiased_logprob_diff < 1e-4
    assert same.binarised_kl < 1e-6
    assert same.teacher_mean_chunk_logprob < -0.1

    # same tokenizer, other weights: a real disagreement
    other_dir = factories.make_model("llama", tokenizer_dirs["sentencepiece"], tmp_path / "other", seed=1)
    other, _ = chunk_agreement(load_eval_model(str(other_dir)), str(aligned_dir))
    assert other.groups == same.groups and other.mean_abs_logprob_diff > 0.1
    assert other.mean_abs_logprob_diff >= abs(other.mean_logprob_diff)

    # a model with another tokenizer is refused
    gpt2 = factories.make_model("gpt2", tokenizer_dirs["byte_level"], tmp_path / "gpt2")
    with pytest.raises(EvalError, match="does not use the student tokenizer"):
        chunk_agreement(load_eval_model(str(gpt2)), str(aligned_dir))

    # a run directory holding the teacher as its final model, through the CLI, JSON to a file and eval.json
    run = tmp_path / "run"
    shutil.copytree(llama_sp_model, run / "final")
    app = typer.Typer()
    app.command("evaluate")(evaluate)
    app.command("plot")(plot)
    out = tmp_path / "result.json"
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--model",
            str(run),
            "--aligned",
            str(aligned_dir),
            "--output-json",
            str(out),
            "--run-dir",
            str(run),
        ],
    )
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result == json.loads((run / "eval.json").read_text())
    (entry,) = result["models"].values()
    assert entry["model"]["path"] == str(run / "final")
    assert entry["chunk_agreement"][aligned_dir.name]["mean_abs_logprob_diff"] < 1e-4
    assert not entry["bits_per_byte"]  # --aligned alone: no bits per byte on the default held-out set
    assert (run / "eval.csv").read_text().splitlines()[0] == (
        f"model,mean_abs_chunk_diff/{aligned_dir.name},binarised_kl/{aligned_dir.name}"
    )


def train_tiny_run(aligned: Path, student: Path, output: Path, steps: int):
    """A real training run (the trainer, in this process): a checkpoint after every step, all kept."""
    from alm_pipeline.trainer.driver import train_local

    config = factories.train_config(
        aligned,
        output,
        student=str(student),
        steps=steps,
        batch_size=4,
        checkpoint_every=1,
        keep_checkpoints=0,
    )
    return train_local(config)


@pytest.mark.ray
def test_plots_of_a_real_training_run(teacher_cache, llama_sp_model, tmp_path):
    """Train 3 steps, evaluate every checkpoint against the teacher cache (eval.json in each checkpoint), plot:
    the loss curves come from the real metrics.csv, bits per byte from the eval.json files at the checkpoints'
    steps, the teacher's as a dashed line."""
    from alm_pipeline.evaluation.plots import run_figures
    from alm_pipeline.trainer.checkpoint import list_checkpoints
    from alm_pipeline.trainer.metrics import read_metrics_csv

    cache_dir, aligned_dir = teacher_cache
    run = tmp_path / "run"
    train_tiny_run(aligned_dir, llama_sp_model, run, steps=3)
    rows = read_metrics_csv(run / "metrics.csv")
    checkpoints = list_checkpoints(run)
    assert [step for step, _ in checkpoints] == [1, 2, 3]
    student_bpb = []
    for _, ckpt in checkpoints:
        result = run_evaluation(
            EvalConfig(
                model=str(ckpt),
                cache=str(cache_dir),
                cache_texts=True,
                max_length=MAX_LENGTH,
                max_docs=4,
                run_dir=str(ckpt),
            )
        )
        student_bpb.append(result["models"][str(ckpt)]["cache_texts"]["bits_per_byte"])
    teacher_bpb = result["cache"]["bits_per_byte"]

    figures, skipped, n_rows = run_figures(run)
    assert set(figures) == {"loss", "chunk_agreement", "bits_per_byte"} and n_rows == 3
    assert list(skipped) == ["eval_table"]  # the evaluations are in the checkpoints, not in the run folder
    steps = [r["step"] for r in rows]
    (ax,) = figures["loss"].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"loss", "loss_alm"}
    for name, line in lines.items():
        np.testing.assert_array_equal(line.get_xdata(), steps)
        np.testing.assert_array_equal(line.get_ydata(), [r[name] for r in rows])
    (ax,) = figures["chunk_agreement"].axes
    (line,) = ax.get_lines()
    np.testing.assert_array_equal(line.get_ydata(), [r["mean_abs_chunk_logprob_diff"] for r in rows])
    (ax,) = figures["bits_per_byte"].axes
    student, teacher = ax.get_lines()
    assert student.get_label() == f"student on the texts of {cache_dir}"
    np.testing.assert_array_equal(student.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(student.get_ydata(), student_bpb, rtol=0, atol=0)
    assert teacher.get_linestyle() == "--" and teacher.get_label().startswith(f"teacher on {cache_dir}")
    np.testing.assert_allclose(teacher.get_ydata(), [teacher_bpb, teacher_bpb], rtol=0, atol=0)

    app = typer.Typer()
    app.command("evaluate")(evaluate)
    app.command("plot")(plot)
    res = CliRunner().invoke(app, ["plot", str(run)])
    assert res.exit_code == 0, res.output
    names = ["loss.png", "chunk_agreement.png", "bits_per_byte.png"]
    assert res.stdout.split() == [str(run / "plots" / name) for name in names]
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(names)
    for name in names:
        assert png_size(run / "plots" / name) == (900, 540)  # 7.5 x 4.5 inches at 120 dpi
