"""A synthetic 200,000-shard teacher cache: how long opening it takes, and one align task's overhead.

Builds a cache of ``--shards`` shard entries (realistic sizes, checksums and stats; no shard files except one
tiny real shard, since nothing measured here reads the others), then measures, ``--reps`` times each (median
[min–max]):

* **write manifest**: ``manifest.json`` + the shard index ``shards.parquet`` from the shards' entries (the
  driver does this at the end of a run);
* **open**: ``open_cache(verify=False)`` — manifest, shard index (read and checked against its SHA-256);
* **fingerprint**: the cache identity (over every shard's SHA-256) that align records;
* **all entries**: ``cache.shards`` as ``ShardInfo`` objects (stats parsed; only summaries need it);
* **task rows**: the driver's per-shard rows for the Ray tasks (:func:`align_stage.shard_rows`);
* **task overhead**: what one align task does besides aligning — unpickle its callable (students, settings),
  parse its row's shard entry and open/read its shard from the entry alone — and the bytes Ray ships to it;
* **old: json manifest**: for comparison, ``json.loads`` of the format-1 manifest listing every shard inline,
  which every task of the old align stage parsed (goal for the new task overhead: < 50 ms).

    python benchmarks/bench_manifest.py [--shards 200000] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import secrets
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from harness import Spread, print_table  # noqa: E402

from alm_pipeline.cache import store  # noqa: E402
from alm_pipeline.cache.teacher import CACHE_SCHEMA, FORMAT_VERSION, TeacherCache, open_cache  # noqa: E402
from alm_pipeline.pipeline.align_stage import (  # noqa: E402
    AlignSettings,
    _AlignCacheShard,
    _entry,
    _SetOutput,
    shard_rows,
)
from alm_pipeline.pipeline.byteview import load_byte_view  # noqa: E402
from alm_pipeline.storage import location  # noqa: E402

REAL_SHARD = 123_456


def _stats(rng) -> dict:
    return {
        "docs": 256,
        "tokens": int(rng.integers(100_000, 300_000)),
        "truncated_docs": int(rng.integers(0, 5)),
        "text_bytes": int(rng.integers(400_000, 1_200_000)),
        "predicted_tokens": int(rng.integers(100_000, 300_000)),
        "predicted_bytes": int(rng.integers(400_000, 1_200_000)),
        "sum_logprob": float(-rng.random() * 1e6),
    }


def build(root: Path, num_shards: int) -> tuple[list[store.ShardInfo], dict]:
    rng = np.random.default_rng(0)
    view = load_byte_view("bytes")  # the teacher's tokenizer here: any tokenizer does for timing
    texts = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer."]
    encs = [view.encode(t) for t in texts]
    table = pa.Table.from_pydict(
        {
            "doc_id": ["a", "b"],
            "text": [e.text for e in encs],
            "token_ids": [list(e.token_ids) for e in encs],
            "offsets": [list(e.offsets) for e in encs],
            "logprob": [[float("nan")] + [-1.0] * (len(e.token_ids) - 1) for e in encs],
            "boundary_logprob": [[-0.5] * len(e.token_ids) for e in encs],
            "truncated": [False, False],
        },
        schema=CACHE_SCHEMA,
    )
    real = TeacherCache.write_shard(root, REAL_SHARD, table, stats=_stats(rng))
    shards = []
    for k in range(num_shards):
        if k == REAL_SHARD:
            shards.append(real)
            continue
        shards.append(
            store.ShardInfo(
                index=k,
                file=f"{store.SHARD_DIR}/{store.shard_name(k)}",
                rows=256,
                tokens=int(rng.integers(100_000, 300_000)),
                bytes=int(rng.integers(1_000_000, 3_000_000)),
                sha256=secrets.token_hex(32),
                stats=_stats(rng),
            )
        )
    tok = view.describe()
    manifest = TeacherCache.new_manifest(
        "complete",
        {"format_version": FORMAT_VERSION, "synthetic": True},
        num_shards,
        shards,
        teacher={"name": "synthetic", "path": "-", "engine": "hf", "dtype": "float32"},
        tokenizer={**tok, "fingerprint": "synthetic"},
        settings={"max_length": 1024},
        logprob_dtype="float32",
    )
    return shards, manifest


def ms(spread: Spread) -> str:
    return Spread(spread.median * 1e3, spread.low * 1e3, spread.high * 1e3, spread.n).format(".1f") + " ms"


def timed(fn, reps: int) -> tuple[Spread, object]:
    seconds, result = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - t0)
    return Spread.of(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if args.shards <= REAL_SHARD:
        raise SystemExit(f"--shards must be more than {REAL_SHARD}")

    with tempfile.TemporaryDirectory(prefix="bench-manifest-") as tmp:
        root = Path(tmp) / "cache"
        shards, manifest = build(root, args.shards)
        rows = []
        write, _ = timed(lambda: TeacherCache.write_manifest(root, manifest), args.reps)
        rows.append(("write manifest + shard index", f"{write.format('.3f')} s"))
        index_mb = (root / store.SHARD_INDEX).stat().st_size / 1e6
        manifest_kb = (root / store.MANIFEST).stat().st_size / 1e3

        opened, cache = timed(lambda: open_cache(root, verify=False), args.reps)
        rows.append(("open (manifest + shard index)", f"{opened.format('.3f')} s"))
        fp, _ = timed(lambda: open_cache(root, verify=False).fingerprint, args.reps)
        rows.append(("open + fingerprint", f"{fp.format('.3f')} s"))
        entries, _ = timed(lambda: open_cache(root, verify=False).shards, args.reps)
        rows.append(("open + all entries as ShardInfo", f"{entries.format('.3f')} s"))
        cache = open_cache(root, verify=False)
        task_rows, all_rows = timed(
            lambda: shard_rows(cache, list(range(cache.num_shards)), [[0]] * cache.num_shards), args.reps
        )
        rows.append(("driver: every task's row", f"{task_rows.format('.3f')} s"))

        # one task: the callable Ray ships (students, settings), the row, reading the shard from its entry
        view = load_byte_view("bytes")
        out = location(Path(tmp) / "aligned" / "bytes")
        fn = _AlignCacheShard(
            cache.root.uri,
            view.is_special,
            [_SetOutput("bytes", "bytes", view, out, {}, [])],
            AlignSettings(),
        )
        payload = pickle.dumps(fn)
        row = all_rows[REAL_SHARD]

        def task_overhead() -> None:
            task = pickle.loads(payload)
            TeacherCache.read_shard_entry(task.cache_root, _entry(row))

        overhead = []
        for _ in range(max(args.reps, 20)):
            t0 = time.perf_counter()
            task_overhead()
            overhead.append(time.perf_counter() - t0)
        task = Spread.of(overhead)
        rows.append(("task overhead (unpickle + entry + read shard)", ms(task)))
        rows.append(
            ("bytes shipped to a task (callable + row)", f"{len(payload) + len(pickle.dumps(row)):,}")
        )
        full, _ = timed(lambda: fn(row), args.reps)
        rows.append(("whole task on a 2-document shard (align + write)", ms(full)))

        old = json.dumps({"shards": [s.to_json() for s in shards]}, indent=2)
        old_parse, _ = timed(lambda: json.loads(old), args.reps)
        rows.append(("old: parse the format-1 json manifest (per task)", f"{old_parse.format('.3f')} s"))
        print_table(
            ("step", "time"),
            rows,
            title=f"{args.shards:,} shards: shards.parquet {index_mb:.1f} MB, manifest.json {manifest_kb:.1f} kB "
            f"(format-1 manifest: {len(old) / 1e6:.1f} MB)",
        )
        print(
            f"\ntask overhead median {task.median * 1e3:.1f} ms (goal < 50 ms); the old align task parsed the "
            f"whole manifest: {old_parse.median * 1e3:.0f} ms"
        )


if __name__ == "__main__":
    main()
