"""``alm-pipeline evaluate`` and ``alm-pipeline plot`` (alm_pipeline.cli.evaluate_cmd): one model × metric table
for several models and text domains, eval.json + eval.csv, the bar chart, and every bad option refused before
any model loads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from alm_pipeline.cli.evaluate_cmd import evaluate, plot
from alm_pipeline.evaluation.table import ResultTable
from tests.factories import EVAL_TEXTS, png_size, reference_bits_per_byte, write_texts

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("evaluate")(evaluate)
    app.command("plot")(plot)
    return app


def _write_metrics(run: Path) -> None:
    """A metrics.csv with some of the trainer's columns (``metric_columns``)."""
    run.mkdir(parents=True, exist_ok=True)
    lines = ["step,loss,loss_alm,valid_chunks,lr,mean_abs_chunk_logprob_diff"]
    for step in range(1, 41):
        lines.append(f"{step},{2.0 / step:.5f},{1.5 / step:.5f},30,0.001,{1.0 / step:.5f}")
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_cli_evaluate_and_plot(gpt2_bl_model, tmp_path):
    app = _app()
    data = write_texts(tmp_path / "d.jsonl", EVAL_TEXTS)
    res = runner.invoke(
        app, ["evaluate", "--model", str(gpt2_bl_model), "--data", str(data), "--max-length", "48", "--json"]
    )
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    expected, _, _ = reference_bits_per_byte(gpt2_bl_model, EVAL_TEXTS, 48)
    (entry,) = result["models"].values()
    assert entry["bits_per_byte"]["d"]["bits_per_byte"] == pytest.approx(expected, rel=1e-6)
    assert entry["model"]["lm_head"] == "sliced" and "BOS" in result["convention"]
    assert np.isfinite(entry["bits_per_byte"]["d"]["bits_per_byte"])

    res = runner.invoke(app, ["evaluate", "--data", str(data)])
    assert res.exit_code == 2 and "needs a model" in res.stderr

    run = tmp_path / "run"
    _write_metrics(run)
    res = runner.invoke(app, ["plot", str(run)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["chunk_agreement.png", "loss.png"]
    assert "skipped bits_per_byte.png" in res.stderr and "skipped eval_table.png" in res.stderr
    res = runner.invoke(app, ["plot", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "no such run directory" in res.stderr


def test_several_models_and_domains_make_one_table(gpt2_bl_model, llama_sp_model, tmp_path):
    """Two models × three domains (two --data, one of them named, and a --domains folder): one table, each cell
    equal to the plain computation; eval.json and eval.csv in --run-dir; `plot` draws the grouped bars."""
    app = _app()
    prose, verse = EVAL_TEXTS[:3], EVAL_TEXTS[3:]
    write_texts(tmp_path / "prose.jsonl", prose)
    write_texts(tmp_path / "verse.jsonl", verse)
    folder = tmp_path / "domains"
    folder.mkdir()
    write_texts(folder / "all.jsonl", EVAL_TEXTS)
    out = tmp_path / "eval"
    args = ["evaluate", "--model", f"gpt2={gpt2_bl_model}", "--model", str(llama_sp_model)]
    args += ["--data", str(tmp_path / "prose.jsonl"), "--data", f"poems={tmp_path / 'verse.jsonl'}"]
    args += ["--domains", str(folder), "--max-length", "48", "--run-dir", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    result = json.loads((out / "eval.json").read_text())
    rows = ["gpt2", str(llama_sp_model)]
    columns = ["bits_per_byte/prose", "bits_per_byte/poems", "bits_per_byte/all"]
    assert list(result["models"]) == rows and result["table"]["columns"] == columns
    table = ResultTable.from_json(result["table"])
    for row, model_dir in zip(rows, [gpt2_bl_model, llama_sp_model], strict=True):
        for col, texts in zip(columns, [prose, verse, EVAL_TEXTS], strict=True):
            expected, nbytes, _ = reference_bits_per_byte(model_dir, texts, 48)
            assert table.value(row, col) == pytest.approx(expected, rel=1e-6)
            domain = col.split("/")[1]
            assert result["models"][row]["bits_per_byte"][domain]["bytes"] == nbytes
    # the printed table: a header and one line per model, every value shown
    lines = res.stdout.strip().splitlines()
    assert lines[0].split("|")[1].strip() == "model" and len(lines) == 2 + len(rows)
    assert f"{table.value('gpt2', columns[1]):.4f}" in lines[2]
    with open(out / "eval.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["model"] for r in csv_rows] == rows
    assert float(csv_rows[1]["bits_per_byte/all"]) == table.value(rows[1], "bits_per_byte/all")

    res = runner.invoke(app, ["plot", str(out)])
    assert res.exit_code == 0, res.output
    assert res.stdout.split() == [str(out / "plots" / "eval_table.png")]
    width, height = png_size(out / "plots" / "eval_table.png")
    assert width == 900 and height > 100


def test_agreement_columns_for_the_models_that_use_the_student_tokenizer(
    small_aligned, gpt2_bl_model, tokenizer_dirs, tmp_path
):
    """--aligned applies to the models whose tokenizer is the aligned set's student tokenizer; the others get a
    'skipped' entry and an empty cell; an aligned set that no model can use is refused before any model loads."""
    from tests import factories

    student = factories.make_model("llama", tokenizer_dirs["byte_level_small"], tmp_path / "student")
    app = _app()
    args = ["evaluate", "--model", f"student={student}", "--model", f"other={gpt2_bl_model}"]
    res = runner.invoke(app, [*args, "--aligned", f"small={small_aligned}", "--max-docs", "4", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    agreement = result["models"]["student"]["chunk_agreement"]["small"]
    assert agreement["docs"] == 4 and agreement["binarised_kl"] > 0
    assert "not its student tokenizer" in result["models"]["other"]["chunk_agreement"]["small"]["skipped"]
    table = ResultTable.from_json(result["table"])
    assert table.columns == ["mean_abs_chunk_diff/small", "binarised_kl/small"]
    assert table.value("student", "binarised_kl/small") == agreement["binarised_kl"]
    assert table.value("other", "binarised_kl/small") is None
    res = runner.invoke(app, ["evaluate", "--model", str(gpt2_bl_model), "--aligned", str(small_aligned)])
    assert res.exit_code == 2 and "no --model uses its student tokenizer" in res.output
    assert "loading" not in res.output


def _write_task(path: Path, n: int) -> Path:
    """A BIG-bench JSON task of ``n`` distinct examples with 2 to 4 choices, one of them right."""
    words = ["red", "green", "blue", "seven", "river", "quiet", "under", "lamp"]
    examples = []
    for i in range(n):
        k = 2 + i % 3
        choices = [f"{words[(i + j) % len(words)]} {j}" for j in range(k)]
        scores = {c: 1 if j == i % k else 0 for j, c in enumerate(choices)}
        examples.append(
            {"input": f"Question {i}: which one follows {words[i % len(words)]}?", "target_scores": scores}
        )
    path.write_text(json.dumps({"examples": examples}))
    return path


def test_multiple_choice_columns_equal_score_tasks(gpt2_bl_model, llama_sp_model, tmp_path):
    """--task adds an accuracy/TASK column per task: each model's value and JSON entry are score_tasks' result
    computed directly on the same subset; a `chance` row holds each task's chance level; `plot` draws them."""
    from alm_pipeline.evaluation.models import load_eval_model
    from alm_pipeline.evaluation.multiple_choice import load_bigbench_task, score_tasks
    from alm_pipeline.evaluation.plots import run_figures

    tasks = [_write_task(tmp_path / "colours.json", 9), _write_task(tmp_path / "few.json", 3)]
    out = tmp_path / "eval"
    args = ["evaluate", "--model", f"gpt2={gpt2_bl_model}", "--model", f"llama={llama_sp_model}"]
    args += ["--task", str(tasks[0]), "--task", str(tasks[1]), "--max-examples-per-task", "5"]
    args += ["--max-length", "48", "--run-dir", str(out)]
    res = runner.invoke(_app(), args)
    assert res.exit_code == 0, res.output
    result = json.loads((out / "eval.json").read_text())
    table = ResultTable.from_json(result["table"])
    assert table.columns == ["accuracy/colours", "accuracy/few"]
    assert list(table.rows) == ["gpt2", "llama", "chance"]
    loaded = [load_bigbench_task(t) for t in tasks]
    for row, model_dir in (("gpt2", gpt2_bl_model), ("llama", llama_sp_model)):
        direct = score_tasks(load_eval_model(str(model_dir)), loaded, max_examples=5, max_length=48)
        for name, mc in direct.items():
            assert table.value(row, f"accuracy/{name}") == mc.accuracy
            assert result["models"][row]["multiple_choice"][name] == {"max_length": 48, **mc.to_json()}
    assert result["models"]["gpt2"]["multiple_choice"]["colours"]["examples"] == 5  # the subset
    assert result["models"]["gpt2"]["multiple_choice"]["few"]["examples"] == 3  # all of them
    chance = {name: direct[name].chance for name in direct}
    assert chance["colours"] != chance["few"]  # 2 to 4 choices: a different chance per task
    assert {n: table.value("chance", f"accuracy/{n}") for n in chance} == chance
    assert {n: t["chance"] for n, t in result["multiple_choice"]["tasks"].items()} == chance
    assert any("chance" in note for note in table.notes) and "note:" in res.stdout

    figures, _, _ = run_figures(out)
    (ax,) = figures["eval_table"].axes
    assert ax.get_ylabel() == "accuracy" and [t.get_text() for t in ax.get_xticklabels()] == [
        "colours",
        "few",
    ]
    assert [c.get_label() for c in ax.containers] == ["gpt2", "llama", "chance"]
    heights = [p.get_height() for p in ax.containers[2].patches]
    assert heights == [chance["colours"], chance["few"]]


BAD_EVALUATE_OPTIONS = [
    (["--max-length", "1"], "--max-length must be an integer >= 2"),
    (["--batch-tokens", "0"], "--batch-tokens must be an integer >= 1"),
    (["--max-logit-elements", "0"], "--max-logit-elements must be an integer >= 1"),
    (["--max-docs", "0"], "--max-docs must be an integer >= 1"),
    (["--dtype", "float8"], "unknown --dtype 'float8'"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--text-field", ""], "--text-field must not be empty"),
    (["--data", "no-such.jsonl"], "--data no-such.jsonl: no such file or directory"),
    (["--data", "=x.jsonl"], "--data '=x.jsonl': expected SOURCE or NAME=SOURCE"),
    (["--data", "maths"], "--data maths: Asset 'text-domains' is not installed"),
    (["--domains", "EMPTY"], "--domains EMPTY: not a folder holding .jsonl files"),
    (["--model", "no/such/model"], "--model no/such/model: no such model folder"),
    (["--model", "MODEL"], "--model: two entries are named"),
    (["--cache", "no-cache"], "--cache no-cache: not a teacher cache"),
    (["--cache-texts"], "--cache-texts needs a teacher cache (--cache)"),
    (["--aligned", "no-aligned"], "--aligned no-aligned:"),
    (["--task", ""], "--task must not be empty"),
    (["--task", "no-such-task"], "--task no-such-task: no such task file, nor a task installed"),
    (["--task", "social_iqa"], "--task social_iqa: The BIG-bench task files are not installed"),
    (
        ["--task", "bigbench"],
        "--task bigbench (phrase_relatedness): The BIG-bench task files are not installed",
    ),
    (["--task", "bad_task.json"], "--task bad_task.json: bad_task.json: expected a JSON object"),
    (["--task", "ok.json", "--task", "./ok.json"], "--task: two tasks are named 'ok'"),
    (["--task", "ok.json", "--model", "chance=MODEL"], "the row name 'chance' is the tasks' chance level"),
    (["--max-examples-per-task", "-1"], "--max-examples-per-task must be an integer >= 0"),
]


@pytest.mark.parametrize(
    ("args", "message"), BAD_EVALUATE_OPTIONS, ids=[a[0] for a, _ in BAD_EVALUATE_OPTIONS]
)
def test_evaluate_options_are_checked_before_any_model_loads(
    gpt2_bl_model, tmp_path, monkeypatch, args, message
):
    """Each bad option is a one-line error naming it (exit 2), before any model loads or anything is written."""
    monkeypatch.setenv("ALM_PIPELINE_HOME", str(tmp_path / "empty-home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "bad_task.json").write_text("{}")
    _write_task(tmp_path / "ok.json", 2)
    args = [a.replace("MODEL", str(gpt2_bl_model)) for a in args]
    out = tmp_path / "never"
    res = runner.invoke(_app(), ["evaluate", "--model", str(gpt2_bl_model), "--run-dir", str(out), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert "loading" not in res.output and not out.exists()
