"""The benchmarks' shared harness: paired runs in alternating order, medians with their spread, one table printer.

Every benchmark compares sides (a baseline and what is measured against it) on one shared, noisy machine. So:

* the sides run in **rounds**, in alternating order: A B, B A, A B, ... (with more sides: forward, then
  reversed), so that a slow drift of the machine hits every side alike;
* **warm-up is the same for every side**: ``warmup`` untimed calls of each side, in the same alternating order,
  before the timed rounds (``warmup=0``: every side is timed from cold, as its first round);
* each side is reported as the **median and the min–max** over the rounds, and a **ratio** between two sides
  is computed per round (the two calls of one round ran back to back) and then reported the same way.

    runs = run_paired({"ids only": baseline, "align": align}, reps=5, warmup=1)
    runs.spread("align")                           # Spread of the wall times
    runs.ratio("align", "ids only")                # Spread of the per-round time ratios
    runs.ratio("pipe", "bare", metric="tok_s")      # per-round ratios of what the calls returned (dicts)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Spread:
    """Median and range of repeated measurements."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no measurements")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def format(self, spec: str = ".3f") -> str:
        """``median [min–max]`` (just the median when there is one measurement)."""
        if self.n == 1:
            return f"{self.median:{spec}}"
        return f"{self.median:{spec}} [{self.low:{spec}}–{self.high:{spec}}]"


def alternating_order(names: Sequence[str], round_index: int) -> list[str]:
    """The order of the sides in one round: forward in even rounds, reversed in odd ones (A B, B A, ...)."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


@dataclass
class Runs:
    """What :func:`run_paired` measured: per side, one entry per timed round."""

    seconds: dict[str, list[float]] = field(default_factory=dict)  # wall time of each call
    results: dict[str, list[Any]] = field(default_factory=dict)  # what each call returned

    def values(self, side: str, metric: str | None = None) -> list[float]:
        """The wall times of ``side``'s calls, or the entry ``metric`` of the dicts they returned."""
        if metric is None:
            return list(self.seconds[side])
        return [float(r[metric]) for r in self.results[side]]

    def spread(self, side: str, metric: str | None = None) -> Spread:
        """Median and range of ``side``'s wall times (or of ``metric``, see :meth:`values`)."""
        return Spread.of(self.values(side, metric))

    def ratio(self, numerator: str, denominator: str, metric: str | None = None) -> Spread:
        """``numerator / denominator`` per round (paired), then its median and range."""
        top, bottom = self.values(numerator, metric), self.values(denominator, metric)
        return Spread.of([a / b for a, b in zip(top, bottom, strict=True)])


def run_paired(sides: dict[str, Callable[[], Any]], reps: int, warmup: int = 0) -> Runs:
    """Run every side ``warmup`` times untimed, then ``reps`` timed rounds, in alternating order."""
    if reps < 1:
        raise ValueError("reps must be at least 1")
    names = list(sides)
    for i in range(warmup):
        for name in alternating_order(names, i):
            sides[name]()
    runs = Runs({name: [] for name in names}, {name: [] for name in names})
    for i in range(reps):
        for name in alternating_order(names, warmup + i):
            t0 = time.perf_counter()
            result = sides[name]()
            runs.seconds[name].append(time.perf_counter() - t0)
            runs.results[name].append(result)
    return runs


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """A Markdown table, columns padded to their widest cell (readable in a terminal and in a note)."""
    cells = [[str(c) for c in columns]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(columns))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    if title:
        print(f"\n{title}\n")
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))


def shard_bytes_for(path: str, docs_per_shard: int, docs: int | None = None) -> int:
    """A teacher-cache ``shard_size`` (bytes) giving about ``docs_per_shard`` documents per shard of the jsonl
    file ``path`` (its first ``docs`` lines, when given): the mean line length times the count."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    lines = lines[:docs] if docs is not None else lines
    mean = sum(len(line) + 1 for line in lines) / max(1, len(lines))
    return max(1, round(mean * docs_per_shard))


def planned_shard_docs(path: str, shard_size: int) -> list[int]:
    """How many documents each shard of the teacher-cache stage holds for the jsonl file ``path`` cut at
    ``shard_size`` bytes (the stage's own planner and reader), so a baseline can batch the same documents."""
    from alm_pipeline.pipeline.corpus import CorpusConfig, CorpusStats, list_corpus, plan_shards, read_shard

    config = CorpusConfig(path=path)
    return [
        sum(1 for _ in read_shard(entry, config, CorpusStats()))
        for entry in plan_shards(list_corpus(config), shard_size)
    ]
