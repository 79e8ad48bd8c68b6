"""The benchmarks' shared harness (benchmarks/harness.py): order, warm-up, paired ratios, table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("bench_harness", REPO / "benchmarks" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_sides_alternate_and_warm_up_alike(harness):
    calls = []
    sides = {name: (lambda name=name: calls.append(name)) for name in ("A", "B")}
    runs = harness.run_paired(sides, reps=3, warmup=1)
    assert calls == ["A", "B", "B", "A", "A", "B", "B", "A"]  # 1 warm-up round, then 3 timed rounds
    assert {name: len(times) for name, times in runs.seconds.items()} == {"A": 3, "B": 3}
    assert all(t >= 0 for times in runs.seconds.values() for t in times)


def test_three_sides_run_forward_then_reversed(harness):
    calls = []
    harness.run_paired({n: (lambda n=n: calls.append(n)) for n in "ABC"}, reps=2)
    assert "".join(calls) == "ABCCBA"


def test_ratio_is_taken_per_round_then_summarised(harness):
    values = iter([{"x": 1.0}, {"x": 2.0}, {"x": 5.0}, {"x": 10.0}])  # round 0: A, B; round 1: B, A
    runs = harness.run_paired({"A": lambda: next(values), "B": lambda: next(values)}, reps=2)
    assert runs.values("A", "x") == [1.0, 10.0] and runs.values("B", "x") == [2.0, 5.0]
    ratio = runs.ratio("A", "B", metric="x")
    assert (ratio.median, ratio.low, ratio.high, ratio.n) == (1.25, 0.5, 2.0, 2)  # not 5.5 / 3.5
    assert runs.spread("A", "x").format(".1f") == "5.5 [1.0–10.0]"


def test_spread_of_one_value_and_of_none(harness):
    assert harness.Spread.of([0.25]).format(".2f") == "0.25"
    with pytest.raises(ValueError):
        harness.Spread.of([])
    with pytest.raises(ValueError):
        harness.run_paired({"A": lambda: None}, reps=0)


def test_table_columns_line_up(harness, capsys):
    harness.print_table(["name", "s"], [["bytes", "1.5"], ["gpt2-tokenizer", 12]], title="T")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "T"
    table = lines[2:]
    assert table[0] == "| name           | s   |"
    assert table[1] == "|----------------|-----|"
    assert table[3] == "| gpt2-tokenizer | 12  |"
    assert len({len(line) for line in table}) == 1
