"""The headline benchmark's smallest configuration (benchmarks/bench_headline.py --quick, one student) runs to the
end: the cached side (teacher-cache and align on Ray, train_local) and the online side train on the same documents
with the same losses, and the online teacher scores exactly the cached documents once (one student, one epoch)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_bench():
    sys.path.insert(0, str(REPO / "benchmarks"))  # the script imports its sibling `harness`
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_headline", REPO / "benchmarks" / "bench_headline.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_quick_run_completes(tmp_path, capsys):
    from alm_pipeline.assets import is_installed

    if not is_installed("smollm2-135m"):
        pytest.skip("the real tokenizers are not installed (scripts/setup.sh)")
    bench = _load_bench()
    result = bench.main(["--quick", "--students", "gpt2", "--workdir", str(tmp_path)])
    cached, online = result["runs"].results["cached"][0], result["runs"].results["online"][0]
    assert result["loss_diff"] < 1e-4
    assert len(cached["losses"]["gpt2"]) == 2  # --quick: 2 steps
    assert online["teacher_tokens"] == cached["teacher_tokens"] > 0
    assert online["student_tokens"] == cached["student_tokens"]
    assert cached["cpu_s"] > 0 and online["cpu_s"] > 0
    assert "cached ÷ online" in capsys.readouterr().out
