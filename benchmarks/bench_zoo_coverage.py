"""Coverage of every teacher x student pair of the tokenizer zoo and the real tokenizers: the share of the
cached text's bytes that lies inside valid chunks after the align stage.

Teachers are the zoo families accepted in both roles (tests/zoo.py: tiny tokenizers trained on the tests' text
whose ``tokenizer.json`` mirrors GPT-2, Llama-3, Qwen2, DeepSeek-V3, Llama-2 legacy, Mistral, Gemma, Phi-3,
bytes) plus the real tokenizers installed by ``scripts/setup.sh`` (GPT-2, SmolLM2, Qwen3, Mistral); students are
those plus the T5-like Unigram (student only). Documents: real text, the first ``--docs`` of each held-out
domain (plays, maths, code) and of the bundled corpus. Each teacher "caches" every document as teacher-cache
does (its own tokenization, cut at ``--max-length`` tokens, the text kept being what those tokens cover; the
log-prob values do not change coverage), then ``align_table`` — the align stage's own function — maps the rows
onto each student. Coverage = bytes in valid chunks ÷ bytes of every cached text, documents the student cannot
reproduce (characters outside an unknown-token vocabulary) counting as 0.

Goal (issue "every major tokenizer family"): ≥ 95 % for subword students, ≥ 99 % for the bytes student.

    python benchmarks/bench_zoo_coverage.py [--docs 40] [--max-length 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from harness import print_table  # noqa: E402

from alm_pipeline.assets import bundled_corpus_path, domain_path, read_jsonl  # noqa: E402
from alm_pipeline.cache.teacher import CACHE_SCHEMA  # noqa: E402
from alm_pipeline.pipeline.align import CoverageStats  # noqa: E402
from alm_pipeline.pipeline.align_stage import AlignSettings, DroppedDocs, align_table  # noqa: E402
from alm_pipeline.pipeline.byteview import ByteView, load_byte_view  # noqa: E402
from tests.zoo import ZOO, build_zoo, real_tokenizers  # noqa: E402


def documents(per_source: int) -> list[tuple[str, str]]:
    sources = [bundled_corpus_path()]
    for domain in ("plays", "maths", "code"):
        path = domain_path(domain)
        if os.path.exists(path):
            sources.append(path)
    docs = []
    for path in sources:
        for i, row in enumerate(read_jsonl(path)[:per_source]):
            docs.append((f"{Path(path).stem}:{row.get('id', i)}", row["text"]))
    return docs


def cache_table(view: ByteView, docs: list[tuple[str, str]], max_length: int, rng) -> pa.Table:
    """What teacher-cache writes for ``docs`` with this teacher (random log-probs)."""
    rows = {name: [] for name in CACHE_SCHEMA.names}
    for doc_id, text in docs:
        enc = view.encode(view.normalize_text(text), max_length=max_length)
        n = len(enc.token_ids)
        rows["doc_id"].append(doc_id)
        rows["text"].append(enc.text)
        rows["token_ids"].append(enc.token_ids)
        rows["offsets"].append(enc.offsets)
        rows["logprob"].append(-rng.exponential(2.0, n).astype(np.float32))
        rows["boundary_logprob"].append(np.log(rng.uniform(1e-4, 1.0, n)).astype(np.float32))
        rows["truncated"].append(enc.truncated)
    return pa.table(rows, schema=CACHE_SCHEMA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--docs", type=int, default=40, help="documents per source (corpus, plays, maths, code)"
    )
    parser.add_argument("--max-length", type=int, default=512, help="teacher tokens per document")
    args = parser.parse_args()

    docs = documents(args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = build_zoo(Path(tmp))
        views = {f.name: load_byte_view(dirs[f.name]) for f in ZOO if f.roles != "refused"}
    views.update({name: load_byte_view(path) for name, path in real_tokenizers().items()})
    teachers = [name for name, view in views.items() if not view.emits_unknown]
    students = list(views)
    rng = np.random.default_rng(0)
    print(
        f"{len(docs)} documents; teacher max length {args.max_length} tokens; {len(teachers)} teachers x "
        f"{len(students)} students"
    )

    cells: dict[tuple[str, str], float] = {}  # over every cached text
    kept_cells: dict[tuple[str, str], float] = {}  # over the texts the student reproduces
    dropped_docs: dict[str, int] = {}
    for teacher in teachers:
        table = cache_table(views[teacher], docs, args.max_length, rng)
        total = sum(len(t.encode("utf-8")) for t in table["text"].to_pylist())
        for student in students:
            coverage, dropped = CoverageStats(), DroppedDocs()
            align_table(table, views[teacher].is_special, views[student], AlignSettings(), coverage, dropped)
            cells[teacher, student] = coverage.covered_bytes / total
            kept_cells[teacher, student] = coverage.covered_bytes / max(coverage.text_bytes, 1)
            dropped_docs[student] = max(dropped_docs.get(student, 0), sum(dropped.counts.values()))

    real = set(real_tokenizers())
    short = {
        name: name.replace("-tokenizer", "").replace("_", " ") + ("*" if name in real else "")
        for name in students
    }
    rows = [[short[t]] + [f"{100 * cells[t, s]:.2f}" for s in students] for t in teachers]
    print_table(
        ["teacher \\ student"] + [short[s] for s in students],
        rows,
        "coverage % of every cached text (rows: teacher; *: real tokenizer, else a zoo family)",
    )

    unknown = [s for s in students if views[s].emits_unknown]
    summary = []
    for label, group, goal, table_ in (
        ("subword students", [s for s in students if s != "bytes" and s not in unknown], 0.95, cells),
        ("bytes student", ["bytes"], 0.99, cells),
        ("unknown-token students, all texts", unknown, None, cells),
        ("unknown-token students, texts they reproduce", unknown, 0.95, kept_cells),
    ):
        if not group:
            continue
        values = [table_[t, s] for t in teachers for s in group]
        worst = min(values)
        worst_pair = next(f"{t} -> {s}" for t in teachers for s in group if table_[t, s] == worst)
        summary.append(
            [
                label,
                f"{100 * statistics.median(values):.2f}",
                f"{100 * worst:.2f} ({worst_pair})",
                f">= {goal:.0%}" if goal else "-",
                ("met" if worst >= goal else "not met") if goal else "-",
            ]
        )
    print_table(["pairs", "median %", "worst %", "goal", "verdict"], summary, "summary")
    lossy = {s: n for s, n in dropped_docs.items() if n}
    if lossy:
        print(f"\ndocuments dropped (not reproducible: unknown characters), most over the teachers: {lossy}")


if __name__ == "__main__":
    main()
