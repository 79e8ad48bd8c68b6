"""Align stage on chat data: cost relative to the same rows aligned as plain text, and coverage of the chat pairs.

Builds a teacher cache of the bundled conversations (``alm_pipeline/data/chat.jsonl``, each repeated ``--copies``
times under new ids) with a 1-layer random model and SmolLM2's real tokenizer and chat template (ChatML). Then,
for each student tokenizer, paired and in alternating order (:mod:`harness`: ``--warmup`` untimed calls of each
side, then ``--reps`` timed rounds), ``align_table`` — the align stage's own function — on:

* **plain** (the baseline): the same cache rows with their chat columns set to null, i.e. the teacher's rendering
  aligned as one plain text (the student tokenizes the rendering as text; no template, no content coordinates);
* **chat**: the rows as cached: the student renders every conversation with its own template (Qwen3's, SmolLM2's,
  the bytes template; for the Mistral tokenizer, which ships none, a Mistral-style file), tokenizes it section by
  section, and both sides are aligned in content coordinates with the loss restricted to assistant turns.

Both sides read the same teacher tokens and produce an aligned table; the ratio chat ÷ plain is taken per round,
then its median and range are printed. The coverage columns are the align stage's ``chat`` report: content
bytes in chunks that count ÷ content bytes that may count (assistant messages; ``all``: every message), and the
template runs (one per point between two messages, per side) that found a counterpart.

    python benchmarks/bench_chat_align.py [--copies 16] [--reps 5] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
from harness import print_table, run_paired  # noqa: E402
from models import random_llama  # noqa: E402

from alm_pipeline.assets import is_installed, resolve_model  # noqa: E402
from alm_pipeline.cache import open_cache  # noqa: E402
from alm_pipeline.cache.teacher import CHAT_FIELDS  # noqa: E402
from alm_pipeline.pipeline.align import CoverageStats  # noqa: E402
from alm_pipeline.pipeline.align_chat import ChatStats  # noqa: E402
from alm_pipeline.pipeline.align_stage import AlignSettings, align_table, cache_columns  # noqa: E402
from alm_pipeline.pipeline.byteview import load_byte_view  # noqa: E402
from alm_pipeline.pipeline.chat import load_chat_template  # noqa: E402
from alm_pipeline.pipeline.corpus import CorpusConfig  # noqa: E402
from alm_pipeline.pipeline.ray_utils import RayConfig, ensure_ray  # noqa: E402
from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, build_teacher_cache  # noqa: E402
from tests.factories import MISTRAL_TEMPLATE  # noqa: E402

CHAT_CORPUS = REPO / "alm_pipeline" / "data" / "chat.jsonl"
STUDENTS = ("bytes", "smollm2-135m", "qwen3-tokenizer", "mistral-tokenizer")


def repeated_corpus(path: Path, copies: int) -> Path:
    rows = [json.loads(line) for line in CHAT_CORPUS.read_text().splitlines() if line.strip()]
    with path.open("w") as f:
        for k in range(copies):
            for row in rows:
                f.write(json.dumps({**row, "id": f"{row['id']}-{k}"}) + "\n")
    return path


def as_plain(table: pa.Table) -> pa.Table:
    """The same rows with the chat columns null: each conversation becomes its rendering, as plain text."""
    for name in (f.name for f in CHAT_FIELDS):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(i), pa.nulls(len(table), table.schema.field(i).type))
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=16, help="repetitions of the 18 bundled rows")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_chat_align_"))
    ensure_ray(RayConfig())
    teacher = random_llama(resolve_model("smollm2-135m"), work / "teacher", "tiny")
    corpus = repeated_corpus(work / "chat.jsonl", args.copies)
    build_teacher_cache(
        TeacherCacheConfig(
            teacher=teacher,
            corpus=CorpusConfig(path=str(corpus), id_field="id"),
            output=str(work / "cache"),
            max_length=args.max_length,
            batch_tokens=16384,
            num_cpus_per_actor=1.5,
        )
    )
    cache = open_cache(work / "cache")
    chat = pa.concat_tables(cache.iter_tables(columns=cache_columns(cache)))
    plain = as_plain(chat)
    teacher_tokens = cache.summary()["tokens"]
    special = cache.special_token_mask()
    (work / "mistral.jinja").write_text(MISTRAL_TEMPLATE)

    rows = []
    for student in [s for s in STUDENTS if s == "bytes" or is_installed(s)]:
        path = student if student == "bytes" else str(resolve_model(student))
        view = load_byte_view(path)
        override = str(work / "mistral.jinja") if student == "mistral-tokenizer" else None
        template = load_chat_template(path, override)

        def run_chat(view=view, template=template, loss_on="auto") -> dict:
            stats = ChatStats()
            align_table(
                chat, special, view, AlignSettings(loss_on=loss_on), CoverageStats(), None, template, stats
            )
            return stats.as_dict()

        def run_plain(view=view) -> dict:
            coverage = CoverageStats()
            align_table(plain, special, view, AlignSettings(), coverage)
            return {"coverage": coverage.coverage}

        runs = run_paired({"plain": run_plain, "chat": run_chat}, reps=args.reps, warmup=args.warmup)
        assistant = runs.results["chat"][-1]
        every = run_chat(loss_on="all")
        chat_s = runs.spread("chat")
        rows.append(
            [
                student,
                runs.spread("plain").format(".3f"),
                chat_s.format(".3f"),
                runs.ratio("chat", "plain").format(".2f"),
                f"{teacher_tokens / chat_s.median:,.0f}",
                f"{assistant['covered_bytes'] / assistant['loss_bytes']:.4f}",
                f"{every['covered_bytes'] / every['loss_bytes']:.4f}",
                f"{assistant['paired_template_runs']}/{assistant['teacher_template_runs']}",
                f"{runs.results['plain'][-1]['coverage']:.4f}",
            ]
        )

    print(
        f"\n{len(chat)} rows ({cache.chat_docs} conversations), {teacher_tokens} teacher tokens (SmolLM2 ChatML, max "
        f"length {args.max_length}); {args.warmup} untimed warm-up call(s) of each side, then {args.reps} paired "
        "rounds in alternating order; median [min–max]; one core"
    )
    print_table(
        [
            "student",
            "plain s",
            "chat s",
            "chat / plain (per round)",
            "chat teacher tok/s",
            "coverage (assistant)",
            "coverage (all)",
            "template runs paired",
            "plain coverage",
        ],
        rows,
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
