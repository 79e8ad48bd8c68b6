"""Each stage on a simulated multi-node cluster loses a worker node in the middle of its run: the run completes
and its output equals a run without the fault (caches and aligned sets row for row, the training loss curve step
for step). Prints the time from the node loss to the run's end (the recovery measurement of the README)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from alm_pipeline.pipeline.teacher_cache import ATTEMPTS_DIR, build_teacher_cache
from tests import factories
from tests.factories import assert_same_cache_rows, cache_rows, shard_bytes, teacher_cache_config, write_jsonl
from tests.multinode.simcluster import ACCEL

ON_WORKERS = (f"{ACCEL}=1",)  # one replica/worker per worker node


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    texts = factories.corpus_texts(96, max_chars=300)
    folder = tmp_path_factory.mktemp("corpus")
    return write_jsonl(folder / "c.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])


def _shards_written(out: Path) -> int:
    return len(list((out / "shards").glob("*.done.json"))) if (out / "shards").exists() else 0


def _cache_config(model: Path, corpus: Path, out: Path, **kw):
    settings = {
        "max_length": 96,
        "shard_size": shard_bytes(corpus, 8),
        "batch_tokens": 512,
        "concurrency": 2,
        "num_cpus_per_actor": 0.5,
        "actor_resources": ON_WORKERS,
    }
    return teacher_cache_config(model, corpus, out, **{**settings, **kw})


@pytest.fixture(scope="module")
def reference_cache(sim_cluster, tmp_path_factory, gpt2_bl_model, corpus) -> Path:
    """The cache of a run without a fault (on the same cluster)."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    sim_cluster.ensure_workers(2)
    assert build_teacher_cache(_cache_config(gpt2_bl_model, corpus, out)).shards_written == 8
    return out


def test_teacher_cache_survives_a_lost_worker_node(cluster, tmp_path, gpt2_bl_model, corpus, reference_cache):
    out = tmp_path / "faulty"
    summary, loss = cluster.run_losing_a_node(
        lambda: build_teacher_cache(_cache_config(gpt2_bl_model, corpus, out)),
        lambda: _shards_written(out) >= 1,
        progress=lambda: _shards_written(out),
    )
    assert loss.progress is not None and 1 <= loss.progress < 8, "the node was not lost mid-run"
    assert summary.shards_written == 8
    assert_same_cache_rows(cache_rows(out), cache_rows(reference_cache))
    print(f"\nteacher-cache: node lost -> run finished in {loss.recovery_seconds:.1f} s")


def test_teacher_cache_rebuilds_scored_shards_whose_only_copy_was_on_the_lost_node(
    cluster, tmp_path, gpt2_bl_model, corpus, reference_cache
):
    """The case the test above cannot isolate: every shard scored, none written, and the node that scored them
    (so the only copy of most scored shards, in its object store) is lost. Ray rebuilds each lost block from its
    lineage by scoring the shard again on a restarted actor, and the cache equals the one without the fault.
    ``--hold-writes`` keeps the write tasks waiting and notes each scored shard (shard, attempt, node)."""
    out, gate = tmp_path / "faulty", tmp_path / "release-writes"
    notes = Path(f"{gate}.scored")

    def scored() -> list[tuple[int, int, str]]:
        found = []
        for p in notes.glob("shard-*") if notes.exists() else ():
            shard, attempt, node = p.name.split(".", 2)
            found.append((int(shard.removeprefix("shard-")), int(attempt.removeprefix("attempt-")), node))
        return sorted(found)

    def release() -> None:
        time.sleep(3)  # until the head has declared the node dead (health checks: ~1.5 s)
        gate.touch()

    config = _cache_config(gpt2_bl_model, corpus, out, concurrency=1, hold_writes=str(gate))
    summary, loss = cluster.run_losing_a_node(
        lambda: build_teacher_cache(config),
        lambda: len(scored()) == 8,  # one replica: all 8 shards scored on its node, none written
        progress=lambda: _shards_written(out),
        which=lambda: scored()[0][2],
        after_loss=release,
    )
    assert loss.progress == 0
    first = [(k, a, n) for k, a, n in scored() if a == 1]
    lost_node = first[0][2]
    assert [k for k, *_ in first] == list(range(8)) and {n for *_, n in first} == {lost_node}
    again = [(k, a, n) for k, a, n in scored() if a > 1]
    # shards whose only copy went with the node (a write task already running had pulled a copy of its own)
    assert again, "no scored shard was lost with its node: the case did not occur"
    assert all(n != lost_node for *_, n in again)
    assert summary.shards_written == 8 and summary.shards_rescored == len(again)
    assert_same_cache_rows(cache_rows(out), cache_rows(reference_cache))
    print(
        f"\nteacher-cache: {len(again)} of 8 scored shards lost with their node and rebuilt; "
        f"run finished {loss.recovery_seconds:.1f} s after the loss"
    )


def _logged_steps(out: Path) -> int:
    path = out / "metrics.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def _train_config(aligned: Path, out: Path, model: Path, **kw):
    return factories.train_config(
        aligned,
        out,
        init_from=str(model),
        steps=10,
        checkpoint_every=2,
        batch_size=4,
        num_workers=2,
        cpus_per_worker=0.5,
        worker_resource=ON_WORKERS,
        **kw,
    )


def test_training_survives_a_lost_worker_node_with_the_same_loss_curve(
    cluster, tmp_path, small_aligned, gpt2_bl_model
):
    from alm_pipeline.trainer.driver import run_training
    from alm_pipeline.trainer.metrics import read_metrics_csv

    reference = run_training(_train_config(small_aligned, tmp_path / "reference", gpt2_bl_model))
    out = tmp_path / "faulty"
    # the node goes once a checkpoint is there; an autoscaler would bring a fresh one: here, 1 s later
    result, loss = cluster.run_losing_a_node(
        lambda: run_training(_train_config(small_aligned, out, gpt2_bl_model)),
        # step 3 logged: the step-2 checkpoint was reported to Ray Train before step 3 began
        lambda: _logged_steps(out) >= 3,
        progress=lambda: _logged_steps(out),
        replace_after=1.0,
    )
    assert loss.progress is not None and loss.progress < 10, "the node was not lost mid-run"
    assert result.steps == reference.steps == 10
    assert result.info.get("resumed_from"), "the workers were not restarted from a checkpoint"
    curve = read_metrics_csv(out / "metrics.csv")
    assert [r["step"] for r in curve] == list(range(1, 11))
    np.testing.assert_allclose(
        [r["loss"] for r in curve],
        [r["loss"] for r in read_metrics_csv(tmp_path / "reference" / "metrics.csv")],
        rtol=1e-6,
    )
    print(f"\ntrain: node lost at step {loss.progress} -> run finished in {loss.recovery_seconds:.1f} s")


def _align(cache: Path, out: Path, tokenizers: dict):
    from alm_pipeline.pipeline.align_stage import AlignConfig, build_aligned_sets

    students = (str(tokenizers["byte_level_small"]), "bytes")
    return build_aligned_sets(AlignConfig(cache=str(cache), student_tokenizers=students, output=str(out)))


def _aligned_tables(out: Path) -> dict[str, object]:
    """Every aligned shard under ``out`` (both sets), by its path relative to ``out``."""
    import pyarrow.parquet as pq

    return {str(p.relative_to(out)): pq.read_table(p) for p in sorted(out.glob("*/shards/*.parquet"))}


def test_align_survives_a_lost_worker_node(cluster, tmp_path, reference_cache, tokenizer_dirs):
    _align(reference_cache, tmp_path / "reference", tokenizer_dirs)
    out = tmp_path / "faulty"

    def written() -> int:
        return sum(1 for _ in out.glob("*/shards/*.done.json")) if out.exists() else 0

    _, loss = cluster.run_losing_a_node(
        lambda: _align(reference_cache, out, tokenizer_dirs), lambda: written() >= 1, progress=written
    )
    assert loss.progress is not None and 1 <= loss.progress < 16, "the node was not lost mid-run"
    expected, got = _aligned_tables(tmp_path / "reference"), _aligned_tables(out)
    assert len(expected) == 16 and sum(t.num_rows for t in expected.values()) == 2 * 96
    assert got.keys() == expected.keys()
    for name, table in got.items():
        assert table.equals(expected[name]), f"{name} differs from the run without the fault"
    print(f"\nalign: node lost -> run finished in {loss.recovery_seconds:.1f} s")


# The runs below end with lost nodes that never come back (until the test brings them back).


def test_training_whose_node_never_comes_back_fails_naming_the_resource(
    cluster, tmp_path, small_aligned, gpt2_bl_model
):
    from alm_pipeline.trainer.driver import run_training
    from alm_pipeline.trainer.errors import TrainingError

    out = tmp_path / "run"
    with pytest.raises(TrainingError) as caught:
        cluster.run_losing_a_node(
            lambda: run_training(_train_config(small_aligned, out, gpt2_bl_model, placement_timeout=5)),
            lambda: _logged_steps(out) >= 3,
        )
    message = str(caught.value)
    assert (
        "could not place 2 worker(s) needing CPU=0.5, accel=1 each within --placement-timeout 5 s" in message
    )
    assert "--resume continues" in message and (out / "checkpoints" / "checkpoint-000002").exists()


def test_teacher_cache_whose_nodes_never_come_back_fails_naming_the_resource(
    cluster, tmp_path, gpt2_bl_model, corpus, reference_cache
):
    from alm_pipeline.pipeline.teacher_cache import TeacherCacheError

    out = tmp_path / "cache"
    said: list[str] = []
    with pytest.raises(TeacherCacheError) as caught:
        cluster.run_losing_a_node(
            lambda: build_teacher_cache(
                _cache_config(gpt2_bl_model, corpus, out, placement_timeout=5), progress=said.append
            ),
            # as soon as a replica has begun scoring (its attempt is counted), before most shards are done
            lambda: (out / ATTEMPTS_DIR).exists() and any((out / ATTEMPTS_DIR).iterdir()),
            nodes=2,
        )
    assert (
        "no node of the Ray cluster can hold a teacher replica (needs CPU=0.5, accel=1) and none joined within"
        in str(caught.value)
    )
    assert any("waiting up to 5 s for one to join" in m for m in said), said
    written = _shards_written(out)
    assert written < 8  # what was written stays for a re-run
    # the failed run stopped reading from its Ray Data executor (which shuts down; its tasks already submitted
    # may still finish when nodes join, writing whole shards that a re-run keeps)
    assert not [t for t in threading.enumerate() if t.name == "alm-stage-rows"]
    cluster.ensure_workers(2)
    summary = build_teacher_cache(_cache_config(gpt2_bl_model, corpus, out))
    assert summary.shards_reused >= written and summary.shards_reused + summary.shards_written == 8
    assert_same_cache_rows(cache_rows(out), cache_rows(reference_cache))
