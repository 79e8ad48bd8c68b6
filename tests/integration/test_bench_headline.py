"""The headline benchmark's smallest configuration (benchmarks/bench_headline.py --quick, one student) runs to the
end: the cached side (teacher-cache and align on Ray, train_local) and the online side train on the same documents
with the same losses, and the online teacher scores exactly the cached documents once (one student, one epoch)."""

from __future__ import annotations

import pytest

from tests import factories


def test_quick_run_completes(tmp_path, capsys):
    from alm_pipeline.assets import is_installed

    if not is_installed("smollm2-135m"):
        pytest.skip("the real tokenizers are not installed (scripts/setup.sh)")
    bench = factories.load_benchmark("bench_headline")
    result = bench.main(["--quick", "--students", "gpt2", "--workdir", str(tmp_path)])
    cached, online = result["runs"].results["cached"][0], result["runs"].results["online"][0]
    assert result["loss_diff"] < 1e-4
    assert len(cached["losses"]["gpt2"]) == 2  # --quick: 2 steps
    assert online["teacher_tokens"] == cached["teacher_tokens"] > 0
    assert online["student_tokens"] == cached["student_tokens"]
    assert cached["cpu_s"] > 0 and online["cpu_s"] > 0
    assert "cached ÷ online" in capsys.readouterr().out
