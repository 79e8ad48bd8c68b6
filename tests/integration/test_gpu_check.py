"""benchmarks/gpu_check.py, the prepared GPU check, in its CPU dry run (--device cpu --tiny), so the script a
rarely-lent GPU machine runs does not rot: every step it takes on the GPU runs here at tiny sizes (vLLM left out:
its CPU start-up alone is longer than this test may take) and the one table comes out, also in $OUT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alm_pipeline.assets import is_installed, models_home

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not is_installed("smollm2-135m"), reason=f"smollm2-135m not installed in {models_home()}")
def test_gpu_check_dry_run_prints_one_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "benchmarks/gpu_check.py",
        "--device",
        "cpu",
        "--tiny",
        "--skip-vllm",
        "--threads",
        "1",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.strip() in done.stdout
    rows = [line for line in table.splitlines() if line.startswith("| (")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| (a) hf vs vLLM engine",
        "| (b) cached ALM step ÷ next-token step, bf16",
        "| (c) peak memory next-token / ALM step, bf16",
    ]
    assert "skipped (--skip-vllm)" in rows[0] and "failed" not in table and "NO" not in rows[2]
    assert " ms)" in rows[1] and " MiB / " in rows[2]  # measured, not a failure message
