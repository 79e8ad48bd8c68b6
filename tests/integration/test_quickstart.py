"""``alm-pipeline quickstart`` reduced, end to end under a real local Ray."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alm_pipeline.cli.main import app

runner = CliRunner()


@pytest.mark.ray
def test_quickstart_reduced_end_to_end(ray_local, tmp_path, llama_sp_model, tokenizer_dirs):
    out = tmp_path / "qs"
    args = [
        "quickstart",
        "--output",
        str(out),
        "--teacher",
        str(llama_sp_model),
        "--max-docs",
        "12",
        "--max-length",
        "48",
        "--student",
        "bytes",
        "--student",
        str(tokenizer_dirs["byte_level"]),
        "--train-student",
        str(tokenizer_dirs["byte_level"]),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--eval-docs",
        "3",
        "--eval-max-bytes",
        "200",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "teacher bits/byte" in result.output
    # the chat stage needs a teacher with a chat template; this one has none
    assert "chat stage skipped: the teacher" in result.output and not (out / "chat").exists()
    assert (out / "cache" / "manifest.json").exists()
    for name in ("bytes", "tok_byte_level"):
        manifest = json.loads((out / "aligned" / name / "manifest.json").read_text())
        assert manifest["state"] == "complete" and manifest["coverage"]["documents_kept"] == 12
        assert (out / "aligned" / name / "tokenizer" / "tokenizer.json").exists()
    inspected = runner.invoke(app, ["inspect", str(out / "cache"), "--json"])
    summary = json.loads(inspected.output)
    assert summary["docs"] == 12 and summary["state"] == "complete" and summary["bits_per_byte"] > 0
    inspected = runner.invoke(app, ["inspect", str(out / "aligned" / "bytes")])
    assert inspected.exit_code == 0 and "coverage" in inspected.output
    # stages 3-4: a tokenizer-transfer run and bits per byte before / after, all recorded
    result_file = json.loads((out / "quickstart.json").read_text())
    training = result_file["training"]
    assert training["steps"] == 3 and training["student"] == str(tokenizer_dirs["byte_level"])
    final = out / "train" / "tok_byte_level" / "final"
    assert training["final"] == str(final) and (final / "config.json").exists()
    assert (final / "tokenizer.json").exists() and (out / "train" / "tok_byte_level" / "metrics.csv").exists()
    bpb = result_file["bits_per_byte"]
    assert set(bpb) == {"teacher", "student before", "student after"}
    for entry in bpb.values():
        assert entry["docs"] == 3 and entry["bits_per_byte"] > 0
    # the student before training is the FVT initialisation, the one after has moved
    assert bpb["student before"]["model"] == str(out / "student-init" / "tok_byte_level")
    assert bpb["student after"]["bits_per_byte"] != bpb["student before"]["bits_per_byte"]
    assert "student after" in result.output and set(result_file["seconds"]) == {
        "teacher-cache",
        "align",
        "train",
        "evaluate",
    }
    # a second run reuses everything (cache, aligned sets, the finished training run)
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "resuming: 1/1 shards" in again.output
    assert "already finished with these settings: reused" in again.output
