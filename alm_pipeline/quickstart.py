"""The embedded default job: the whole pipeline on the bundled corpus with a real small teacher.

Stages (each reuses what an earlier run produced: caches and aligned sets resume/verify instead of
recomputing):

1. ``teacher-cache``: SmolLM2-135M-Instruct over the first ``max_docs`` documents of the bundled Shakespeare
   corpus;
2. ``align``: that one cache onto every student tokenizer (``bytes`` and the GPT-2 tokenizer by default);

and a final table with each artefact's path and its key numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alm_pipeline.pipeline.ray_utils import RayConfig


@dataclass(frozen=True)
class QuickstartConfig:
    output: str = "runs/quickstart"
    teacher: str = "smollm2-135m"
    data: str | None = None  # None: the bundled corpus
    max_docs: int = 64
    max_length: int = 256
    students: tuple[str, ...] = ("bytes", "gpt2-tokenizer")
    gamma: float = 0.1
    num_cpus_per_actor: float = 1.5  # on a 2-core machine: 2 torch threads, CPU left for the other tasks
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class QuickstartResult:
    cache: dict
    aligned: list[dict]
    seconds: dict

    def lines(self) -> list[str]:
        c = self.cache
        out = [
            "",
            "== quickstart results ==",
            f"teacher cache   {c['path']}",
            f"                {c['docs']} docs, {c['tokens']} tokens, {c['bytes_per_token']} bytes/token on disk, "
            f"teacher bits/byte {c['bits_per_byte']}",
        ]
        for a in self.aligned:
            out.append(f"aligned set     {a['path']}")
            out.append(
                f"                student {a['student_tokenizer']}: {a['docs']} docs, {a['groups']} chunks, "
                f"coverage {a['coverage']:.2%}, {a['mean_group_bytes']} bytes/chunk"
            )
        out.append("time            " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        return out


def run_quickstart(
    config: QuickstartConfig, progress: Callable[[str], None] | None = None
) -> QuickstartResult:
    from alm_pipeline.assets import bundled_corpus_path, is_installed
    from alm_pipeline.cache.aligned import open_aligned_set
    from alm_pipeline.cache.reader import open_cache
    from alm_pipeline.pipeline.align_stage import AlignConfig, AlignSettings, build_aligned_sets
    from alm_pipeline.pipeline.corpus import CorpusConfig
    from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, build_teacher_cache

    say = progress or (lambda msg: None)
    out = Path(config.output).absolute()
    seconds: dict[str, float] = {}

    t = time.time()
    say(f"[1/2] teacher cache: {config.teacher} over {config.max_docs} documents")
    build_teacher_cache(
        TeacherCacheConfig(
            teacher=config.teacher,
            corpus=CorpusConfig(path=config.data or bundled_corpus_path(), limit=config.max_docs),
            output=str(out / "cache"),
            max_length=config.max_length,
            shard_size=16,
            num_cpus_per_actor=config.num_cpus_per_actor,
            ray=config.ray,
        ),
        progress=say,
    )
    seconds["teacher-cache"] = time.time() - t

    students = []
    for s in config.students:
        if s != "bytes" and not Path(s).exists() and s.endswith("-tokenizer") and not is_installed(s):
            say(f"skipping student tokenizer {s!r}: not installed (scripts/setup.sh installs it; needs npm)")
            continue
        students.append(s)
    t = time.time()
    say(f"[2/2] align to {', '.join(students)}")
    summaries = build_aligned_sets(
        AlignConfig(
            cache=str(out / "cache"),
            student_tokenizers=tuple(students),
            output=str(out / "aligned"),
            settings=AlignSettings(gamma=config.gamma),
            ray=config.ray,
        ),
        progress=say,
    )
    seconds["align"] = time.time() - t
    return QuickstartResult(
        cache=open_cache(out / "cache").summary(),
        aligned=[open_aligned_set(s.path).summary() for s in summaries],
        seconds=seconds,
    )
