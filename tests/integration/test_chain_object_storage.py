"""The whole chain on object storage, through the command line: ``teacher-cache`` → ``align`` → ``train`` →
``evaluate`` with every path on ``s3://`` (a real S3 server, SeaweedFS), each command a fresh process that starts
its own Ray; the results match the same chain on the local disk, and nothing named ``s3:`` appears on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alm_pipeline.cache.aligned import open_aligned_set
from alm_pipeline.cache.teacher import open_cache
from alm_pipeline.storage import location
from tests.factories import corpus_texts, shard_bytes, write_jsonl

pytestmark = pytest.mark.ray


def _cli(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "alm_pipeline.cli.main", *args],
        cwd=cwd,
        env={**os.environ, **env, "RAY_ADDRESS": ""},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (
        f"alm-pipeline {' '.join(args)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    )
    return done.stdout


def _chain(
    root: str, corpus: str, heldout: str, model: Path, shard_size: int, cwd: Path, env: dict[str, str]
) -> dict:
    """The four commands with every path under ``root`` (a local folder or an ``s3://`` prefix)."""
    ray = ["--num-cpus", "2"]
    _cli(["teacher-cache", "--teacher", str(model), "--data", corpus, "--id-field", "id", "--output",
          f"{root}/cache", "--max-length", "48", "--shard-size", str(shard_size), "--batch-tokens", "256", *ray],
         cwd, env)  # fmt: skip
    _cli(["align", "--cache", f"{root}/cache", "--student-tokenizer", str(model), "--output", f"{root}/aligned",
          *ray], cwd, env)  # fmt: skip
    aligned = f"{root}/aligned/{model.name}"
    _cli(["train", "--aligned", aligned, "--init-from", str(model), "--output", f"{root}/run", "--steps", "3",
          "--batch-size", "4", "--micro-batch-tokens", "128", "--checkpoint-every", "3", "--torch-threads", "1",
          "--no-progress", *ray], cwd, env)  # fmt: skip
    _cli(["evaluate", "--model", f"student={root}/run", "--data", f"heldout={heldout}", "--aligned",
          f"self={aligned}", "--cache", f"{root}/cache", "--max-length", "48", "--run-dir", f"{root}/eval"],
         cwd, env)  # fmt: skip
    return json.loads(location(f"{root}/eval/eval.json").read_bytes())


def test_teacher_cache_align_train_evaluate_all_on_s3(s3_server, tmp_path, gpt2_bl_model):
    from tests.s3server import in_env

    records = [{"id": f"d{i:02d}", "text": t} for i, t in enumerate(corpus_texts(12))]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"text": t} for t in corpus_texts(16)[12:]])
    size = shard_bytes(corpus, 3)  # three shards
    work = tmp_path / "cwd"
    work.mkdir()
    local = _chain(str(tmp_path / "local"), str(corpus), str(heldout), gpt2_bl_model, size, work, {})

    bucket = s3_server.make_bucket("chain")
    with in_env(s3_server):
        location(f"{bucket}/in/corpus.jsonl").write_bytes(corpus.read_bytes())
        location(f"{bucket}/in/heldout.jsonl").write_bytes(heldout.read_bytes())
        remote = _chain(
            f"{bucket}/out",
            f"{bucket}/in/corpus.jsonl",
            f"{bucket}/in/heldout.jsonl",
            gpt2_bl_model,
            size,
            work,
            {**s3_server.env, "ALM_PIPELINE_HOME": str(tmp_path / "home")},
        )
        cache = open_cache(f"{bucket}/out/cache")
        assert cache.num_shards == 3 and cache.root.uri == f"{bucket}/out/cache"
        aligned = open_aligned_set(f"{bucket}/out/aligned/{gpt2_bl_model.name}")
        assert sum(s.rows for s in aligned.shards) == 12
        assert location(f"{bucket}/out/run/final/config.json").exists()
        assert location(f"{bucket}/out/run/metrics.csv").exists()

    # the same numbers as on the local disk: the teacher's bits per byte from the cache, the trained student's
    # bits per byte and its agreement with the teacher
    rows = {
        side: {r["model"]: r for r in result["table"]["rows"]}
        for side, result in (("local", local), ("s3", remote))
    }
    assert set(rows["s3"]) == set(rows["local"]) == {"student", "teacher (cache)"}
    assert rows["s3"]["student"].keys() == rows["local"]["student"].keys()
    assert len([c for c in rows["s3"]["student"] if c != "model"]) >= 3  # bits per byte, |ΔC|, binarised KL
    for model, values in rows["local"].items():
        for column, value in values.items():
            if isinstance(value, float):
                assert rows["s3"][model][column] == pytest.approx(value, rel=1e-5), (model, column)
    on_disk = [p for p in tmp_path.rglob("*") if p.name.startswith("s3:")]
    assert not on_disk and not any(n.startswith("s3:") for n in os.listdir(work))
