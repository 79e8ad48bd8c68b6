"""The one model × metric table of ``alm-pipeline evaluate``: a row per model, a column per metric.

A column is named ``FAMILY/GROUP`` (``bits_per_byte/maths``, ``binarised_kl/bytes``): the family is what is
measured, the group where (a text domain, an aligned set, a task). Adding a metric is one :meth:`ResultTable.add`
call with a new column name; the text table, ``eval.csv``, ``eval.json`` and the bar chart of
:mod:`alm_pipeline.evaluation.plots` (one panel per family, a group of bars per group, a bar per model) all
follow. Missing cells (a model not evaluated on something) are ``None`` in JSON and empty in the CSV.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field

__all__ = ["CSV_FILE", "ResultTable", "column", "split_column"]

CSV_FILE = "eval.csv"


def column(family: str, group: str) -> str:
    """The column name of metric ``family`` measured on ``group``."""
    return f"{family}/{group}"


def split_column(name: str) -> tuple[str, str]:
    """``(family, group)`` of a column name (a name without ``/`` is its own family, with an empty group)."""
    family, _, group = name.partition("/")
    return family, group


@dataclass
class ResultTable:
    """Metric values by model row and column, in the order they were added, plus footnotes."""

    rows: dict[str, dict[str, float | None]] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, model: str, metric: str, value: float | None) -> None:
        """Set one cell (a non-finite value is stored as ``None``)."""
        if metric not in self.columns:
            self.columns.append(metric)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        self.rows.setdefault(model, {})[metric] = float(value) if ok else None

    def add_row(self, model: str) -> None:
        """A row without values yet (so that the rows keep the order the models were given in)."""
        self.rows.setdefault(model, {})

    def value(self, model: str, metric: str) -> float | None:
        return self.rows.get(model, {}).get(metric)

    def to_json(self) -> dict:
        return {
            "columns": list(self.columns),
            "rows": [{"model": m, **{c: v.get(c) for c in self.columns}} for m, v in self.rows.items()],
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: dict) -> ResultTable:
        table = cls(notes=list(data.get("notes") or []))
        for col in data.get("columns") or []:
            table.columns.append(str(col))
        for row in data.get("rows") or []:
            name = str(row.get("model"))
            table.add_row(name)
            for col in table.columns:
                table.add(name, col, row.get(col))
        return table

    def to_csv(self) -> str:
        """One row per model, one column per metric (``model`` first); empty cells where there is no value."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["model", *self.columns])
        for model, values in self.rows.items():
            writer.writerow(
                [model, *("" if values.get(c) is None else repr(values[c]) for c in self.columns)]
            )
        return out.getvalue()

    def write_csv(self, path: str | os.PathLike[str]) -> str:
        """Write :meth:`to_csv` atomically to a local path or an object-storage URI; returns where."""
        from alm_pipeline.storage import location

        out = location(path)
        out.write_bytes(self.to_csv().encode("utf-8"))
        return out.uri

    def to_text(self, digits: int = 4) -> str:
        """A Markdown table (models down, metrics across; ``-`` where there is no value), then the notes."""
        header = ["model", *self.columns]
        body = [
            [model, *("-" if values.get(c) is None else f"{values[c]:.{digits}f}" for c in self.columns)]
            for model, values in self.rows.items()
        ]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            padded = [
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ]
            return "| " + " | ".join(padded) + " |"

        rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
        lines = [line(header), rule, *(line(r) for r in body)]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
