"""Evaluation: bits per byte against an independent plain computation, the cache's teacher bits per byte
against the teacher model, chunk agreement under self-distillation, plots and the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from alm_pipeline.cli.evaluate_cmd import evaluate, plot
from alm_pipeline.evaluation.agreement import chunk_agreement
from alm_pipeline.evaluation.bits_per_byte import cache_bits_per_byte, model_bits_per_byte
from alm_pipeline.evaluation.models import EvalError, load_eval_model, resolve_model_dir
from alm_pipeline.evaluation.plots import PlotError, plot_run
from alm_pipeline.evaluation.run import EvalConfig, run_evaluation
from tests import factories

# No special-token strings (the byte view encodes them as plain text, HF's tokenizer would not). The first
# characters are ASCII so that the reference's first-token byte count can come from char offsets.
TEXTS = [
    "Hello world, a first document.",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "Café naïve — 中文 👍🏽\ttab\r\nline",
    "x",
    "Short one.",
]
LONG = "The quick brown fox jumps over the lazy dog. " * 20  # ASCII: truncated at max_length
MAX_LENGTH = 48


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def reference_bits_per_byte(model_dir: Path, texts: list[str], max_length: int) -> tuple[float, int, int]:
    """Plain loop: HF tokenizer, one forward per document, fp32 log_softmax, gather; bytes from the text."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    has_bos = tok.bos_token_id is not None and tok("a")["input_ids"][0] == tok.bos_token_id
    nats, nbytes, ntokens = 0.0, 0, 0
    for text in texts:
        enc = tok(text, return_offsets_mapping=True)
        ids = enc["input_ids"][:max_length]
        spans = enc["offset_mapping"][:max_length]
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        nats -= float(logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).double().sum())
        end_char = spans[-1][1]  # last kept token's end (truncated texts are ASCII here)
        covered = len(text[:end_char].encode("utf-8"))
        if not has_bos:
            covered -= len(text[: spans[0][1]].encode("utf-8"))  # the unpredicted first token's bytes
        nbytes += covered
        ntokens += len(ids) - 1
    return nats / math.log(2) / nbytes, nbytes, ntokens


@pytest.mark.parametrize("model_fixture", ["llama_sp_model", "gpt2_bl_model"])
def test_bits_per_byte_matches_a_plain_computation(request, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    texts = [*TEXTS, LONG]
    # tiny budgets: several batches, many LM-head slices, several windows
    model = load_eval_model(str(model_dir), max_logit_elements=3000)
    assert model.lm_head == "sliced" and model.slice_size < 10
    bpb = model_bits_per_byte(model, texts, max_length=MAX_LENGTH, batch_tokens=100, window_docs=4)
    expected, nbytes, ntokens = reference_bits_per_byte(model_dir, texts, MAX_LENGTH)
    assert bpb.bits_per_byte == pytest.approx(expected, rel=1e-6)
    assert (bpb.bytes, bpb.predicted_tokens) == (nbytes, ntokens)
    assert bpb.docs == len(texts) and bpb.truncated_docs == 1
    full_bytes = sum(len(t.encode()) for t in TEXTS)
    if model_fixture == "llama_sp_model":  # BOS: every byte of the untruncated documents counts
        assert model.view.prefix_ids and nbytes > full_bytes
    else:  # no BOS: the first token of each document and its bytes are left out
        assert not model.view.prefix_ids and ntokens < nbytes
    # batching does not change the number
    one_by_one = model_bits_per_byte(model, texts, max_length=MAX_LENGTH, batch_tokens=1)
    assert one_by_one.bits_per_byte == pytest.approx(bpb.bits_per_byte, rel=1e-6)


def test_in_memory_model_and_full_logits_fallback(llama_sp_model):
    from alm_pipeline.evaluation.models import EvalModel
    from alm_pipeline.pipeline.byteview import load_byte_view

    expected, _, _ = reference_bits_per_byte(llama_sp_model, TEXTS, MAX_LENGTH)
    view = load_byte_view(llama_sp_model)
    model = AutoModelForCausalLM.from_pretrained(str(llama_sp_model), dtype=torch.float32).train()
    wrapped = EvalModel(model, view)
    assert wrapped.lm_head == "sliced"
    bpb = model_bits_per_byte(wrapped, TEXTS, max_length=MAX_LENGTH)
    assert bpb.bits_per_byte == pytest.approx(expected, rel=1e-6)
    assert model.training  # scoring switched to eval mode and back
    # a logit scale that Llama's forward does not apply: the sliced path disagrees with the model's own
    # logits, so the model's full logits are used, and the number stays right
    model.config.logit_scale = 2.0
    fallback = EvalModel(model, view)
    assert fallback.lm_head == "full_logits"
    bpb = model_bits_per_byte(fallback, TEXTS, max_length=MAX_LENGTH)
    assert bpb.bits_per_byte == pytest.approx(expected, rel=1e-6)


def test_config_and_input_errors(llama_sp_model, gpt2_bl_model, tmp_path):
    with pytest.raises(EvalError, match="nothing to evaluate"):
        EvalConfig()
    with pytest.raises(EvalError, match="needs a model"):
        EvalConfig(data="x.jsonl")
    with pytest.raises(EvalError, match=r"cache_texts \(--cache-texts\) needs a teacher cache"):
        EvalConfig(model="m", cache_texts=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(EvalError, match=r"bad.jsonl:2: missing text field"):
        run_evaluation(EvalConfig(model=str(llama_sp_model), data=str(bad)))
    single = _write_jsonl(tmp_path / "single.jsonl", ["x"])
    model = load_eval_model(str(llama_sp_model))
    assert model_bits_per_byte(model, ["x"]).bytes == 1  # BOS: the single token is predicted
    with pytest.raises(EvalError, match="no predicted byte"):
        run_evaluation(EvalConfig(model=str(gpt2_bl_model), data=str(single)))


def test_model_dir_resolution(tmp_path):
    run = tmp_path / "run"
    for name in (
        "checkpoints/checkpoint-000010",
        "checkpoints/checkpoint-000020",
        "checkpoints/checkpoint-000030",
    ):
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")
    for step in (10, 20):
        (run / "checkpoints" / f"checkpoint-{step:06d}" / "trainer_state.json").write_text(
            f'{{"step": {step}}}'
        )
    path, how = resolve_model_dir(run)
    assert path.endswith("checkpoint-000020") and "step 20" in how  # 30 is incomplete
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    assert resolve_model_dir(run)[0] == str(run / "final")
    assert resolve_model_dir(run / "final")[1] == "model folder"
    other = tmp_path / "other"
    (other / "a").mkdir(parents=True)
    (other / "a" / "config.json").write_text("{}")
    assert resolve_model_dir(other)[0] == str(other / "a")
    (other / "b" / "inner").mkdir(parents=True)
    (other / "b" / "inner" / "config.json").write_text("{}")
    with pytest.raises(EvalError, match="several model folders"):
        resolve_model_dir(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="no model here"):
        resolve_model_dir(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------------------
# cache and aligned set (Ray)


CACHE_TEXTS = [*TEXTS, LONG, "Another line of verse,\nand yet another one.", "Emoji 👩‍💻 end"]


@pytest.fixture(scope="module")
def teacher_cache(ray_local, tmp_path_factory, llama_sp_model):
    from alm_pipeline.pipeline.align_stage import AlignConfig, AlignSettings, build_aligned_sets
    from alm_pipeline.pipeline.corpus import CorpusConfig
    from alm_pipeline.pipeline.ray_utils import RayConfig
    from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, build_teacher_cache

    root = tmp_path_factory.mktemp("evaluate")
    data = _write_jsonl(root / "corpus.jsonl", CACHE_TEXTS)
    build_teacher_cache(
        TeacherCacheConfig(
            teacher=str(llama_sp_model),
            corpus=CorpusConfig(path=str(data)),
            output=str(root / "cache"),
            max_length=MAX_LENGTH,
            shard_size=3,
            batch_tokens=128,
            ray=RayConfig(num_cpus=2),
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
    texts = _write_jsonl(tmp_path / "cached.jsonl", [r["text"] for r in rows])

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
    assert abs(result["data"]["bits_per_byte"] - teacher.bits_per_byte) < 1e-5
    assert result["data"]["bytes"] == teacher.bytes
    assert result["data"]["predicted_tokens"] == teacher.predicted_tokens
    assert abs(result["cache"]["bits_per_byte"] - teacher.bits_per_byte) < 1e-12
    assert abs(result["cache_texts"]["gap_to_teacher"]) < 1e-5
    # max_docs limits every source the same way
    first, _ = cache_bits_per_byte(str(cache_dir), max_docs=4)
    assert first.docs == 4 and first.bytes < teacher.bytes


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
    assert result["model"]["path"] == str(run / "final")
    assert result["chunk_agreement"]["mean_abs_logprob_diff"] < 1e-4
    assert "data" not in result  # --aligned alone: no bits per byte on the default held-out set


# ----------------------------------------------------------------------------------------------------------
# plots and CLI


def _write_metrics(run: Path) -> None:
    """A metrics.csv with some of the trainer's columns (``metric_columns``)."""
    run.mkdir(parents=True, exist_ok=True)
    lines = ["step,loss,loss_alm,valid_chunks,lr,mean_abs_chunk_logprob_diff"]
    for step in range(1, 41):
        lines.append(f"{step},{2.0 / step:.5f},{1.5 / step:.5f},30,0.001,{1.0 / step:.5f}")
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")


def train_tiny_run(aligned: Path, student: Path, output: Path, steps: int):
    """A real training run (the trainer, in this process): a checkpoint after every step, all kept. The one
    place in this file that builds a TrainConfig."""
    from alm_pipeline.trainer.config import (
        CheckpointConfig,
        ComputeConfig,
        DataConfig,
        DistributedConfig,
        LoggingConfig,
        OptimConfig,
        StudentSpec,
        TrainConfig,
    )
    from alm_pipeline.trainer.driver import train_local

    config = TrainConfig(
        data=DataConfig(aligned=str(aligned)),
        student=StudentSpec(student=str(student)),
        output=str(output),
        optim=OptimConfig(steps=steps, batch_size=4, lr=3e-3, warmup_steps=1),
        compute=ComputeConfig(micro_batch_tokens=128),
        checkpoint=CheckpointConfig(every=1, keep=None),
        logging=LoggingConfig(progress=False, tensorboard=False),
        distributed=DistributedConfig(torch_threads=1),
    )
    return train_local(config)


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file, from its IHDR chunk (after checking the signature)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


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
        student_bpb.append(result["cache_texts"]["bits_per_byte"])
    teacher_bpb = result["cache"]["bits_per_byte"]

    figures, skipped, n_rows = run_figures(run)
    assert set(figures) == {"loss", "chunk_agreement", "bits_per_byte"} and not skipped and n_rows == 3
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
        assert _png_size(run / "plots" / name) == (900, 540)  # 7.5 x 4.5 inches at 120 dpi


def test_plot_without_evaluations(tmp_path):
    # metrics.csv of a next-token-only run and no eval.json: only the loss plot, and the reasons
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.csv").write_text("step,loss,loss_ntp\n1,2.5,2.5\n2,2.0,2.0\n")
    result = plot_run(bare)
    assert [p.name for p in result.files] == ["loss.png"] and result.rows == 2
    assert set(result.skipped) == {"chunk_agreement", "bits_per_byte"}
    assert _png_size(result.files[0]) == (900, 540)
    with pytest.raises(PlotError, match="no metrics.csv"):
        plot_run(tmp_path)
    (tmp_path / "metrics.csv").write_text("step,loss\n")
    with pytest.raises(PlotError, match="no rows yet"):
        plot_run(tmp_path)


def test_cli_evaluate_and_plot(gpt2_bl_model, tmp_path):
    app = typer.Typer()
    app.command("evaluate")(evaluate)
    app.command("plot")(plot)
    runner = CliRunner()
    data = _write_jsonl(tmp_path / "d.jsonl", TEXTS)
    res = runner.invoke(
        app, ["evaluate", "--model", str(gpt2_bl_model), "--data", str(data), "--max-length", "48"]
    )
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    expected, _, _ = reference_bits_per_byte(gpt2_bl_model, TEXTS, 48)
    assert result["data"]["bits_per_byte"] == pytest.approx(expected, rel=1e-6)
    assert result["model"]["lm_head"] == "sliced" and "BOS" in result["convention"]

    res = runner.invoke(app, ["evaluate", "--data", str(data)])
    assert res.exit_code == 2 and "needs a model" in res.stderr

    run = tmp_path / "run"
    _write_metrics(run)
    res = runner.invoke(app, ["plot", str(run)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["chunk_agreement.png", "loss.png"]
    assert "skipped bits_per_byte.png" in res.stderr
    res = runner.invoke(app, ["plot", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "no such run directory" in res.stderr
    assert np.isfinite(result["data"]["bits_per_byte"])
