"""The headline benchmark (benchmarks/bench_headline.py): the online baseline trains on exactly what the cached run
trains on, but from a fresh teacher forward each step; CPU accounting over a process tree; parameter counts.
The smallest whole run (it starts Ray) is in tests/integration/test_bench_headline.py."""

from __future__ import annotations

import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from alm_pipeline.trainer.driver import train_local
from tests import factories


@pytest.fixture(scope="module")
def bench():
    return factories.load_benchmark("bench_headline")


ENGINE = Namespace(batch_tokens=8192, threads=1, max_length=48, gamma=0.1)  # as factories.teacher_cache_table


@pytest.fixture(scope="module")
def student_model(tmp_path_factory, tokenizer_dirs) -> Path:
    return factories.make_model(
        "llama", tokenizer_dirs["byte_level_small"], tmp_path_factory.mktemp("student")
    )


def _online(bench, teacher: Path, tokenizer: Path, config) -> tuple[list[float], int]:
    texts = {
        f"doc{i:04d}": t for i, t in enumerate(factories.corpus_texts(24))
    }  # the ids of teacher_cache_table
    online = bench.OnlineTeacher(str(teacher), str(tokenizer), texts, ENGINE)
    rows = bench.train_online(config.resolved(), online)
    return [r["loss"] for r in rows], online.tokens


def test_online_run_trains_on_fresh_teacher_rows_of_the_same_documents(
    bench, tmp_path, small_aligned, gpt2_bl_model, student_model, tokenizer_dirs
):
    kw = {"student": str(student_model), "steps": 3, "batch_size": 4, "checkpoint_every": 3}
    cached = train_local(factories.train_config(small_aligned, tmp_path / "cached", **kw), say=lambda m: None)
    cached_losses = [r["loss"] for r in cached.history]

    config = factories.train_config(small_aligned, tmp_path / "online", **kw)
    losses, tokens = _online(bench, gpt2_bl_model, tokenizer_dirs["byte_level_small"], config)
    assert losses == pytest.approx(cached_losses, rel=1e-5)
    assert 12 * 2 <= tokens <= 12 * ENGINE.max_length  # 3 steps × 4 documents scored by the teacher
    assert (tmp_path / "online" / "checkpoints").is_dir()

    # another teacher: the steps really train on the rows the online teacher computes, not the aligned set's
    other = factories.make_model("gpt2", tokenizer_dirs["byte_level"], tmp_path / "other_teacher", seed=1)
    config = factories.train_config(small_aligned, tmp_path / "online_other", **kw)
    other_losses, _ = _online(bench, other, tokenizer_dirs["byte_level_small"], config)
    assert abs(other_losses[0] - cached_losses[0]) > 1e-3 * abs(cached_losses[0])


_BURN = """
import sys, time
t = time.process_time()
while time.process_time() - t < 0.5:
    pass
print("burnt", flush=True)
if sys.argv[1] == "stay":
    sys.stdin.read()
"""


def test_cpu_seconds_counts_live_and_exited_children(bench):
    before_all, before_me = bench.cpu_seconds(True), bench.cpu_seconds(False)
    live = subprocess.Popen(
        [sys.executable, "-c", _BURN, "stay"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert live.stdout.readline().strip() == "burnt"
        assert bench.cpu_seconds(True) - before_all >= 0.45  # a running descendant
        assert bench.cpu_seconds(False) - before_me < 0.45  # not this process's own time
    finally:
        live.stdin.close()
        live.wait(timeout=30)
    before = bench.cpu_seconds(True)
    subprocess.run([sys.executable, "-c", _BURN, "exit"], check=True, capture_output=True)
    assert bench.cpu_seconds(True) - before >= 0.45  # exited and reaped: counted through its parent


def test_forward_params_leave_out_the_input_embedding(bench, gpt2_bl_model, student_model):
    from transformers import AutoModelForCausalLM

    for path in (gpt2_bl_model, student_model):
        model = AutoModelForCausalLM.from_pretrained(str(path))
        total = sum(p.numel() for p in model.parameters())
        embedding = model.get_input_embeddings().weight
        tied = embedding is model.get_output_embeddings().weight
        expected = total if tied else total - embedding.numel()
        assert bench.forward_params(path) == expected
    assert bench.flops(10, 3, {"a": 2, "b": 1}, {"a": 5, "b": 7}) == 2 * 10 * 3 + 6 * 2 * 5 + 6 * 1 * 7
