"""Installing the BIG-bench task files (alm_pipeline.setup_assets.prepare_task_data; lookup in
alm_pipeline.assets): only the chosen task.json come out of the tarball, a failed download is skipped with a
warning, and an incomplete install is not used. Runs offline (the real download happens in scripts/setup.sh)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest

from alm_pipeline import setup_assets
from alm_pipeline.assets import (
    BIGBENCH,
    MARKER_NAME,
    AssetNotInstalledError,
    bigbench_task_file,
    task_data_installed,
    task_data_path,
)

GOOD_TASK = {
    "name": "tiny",
    "task_prefix": "Yes or no?",
    "examples": [
        {"input": f"question {i}", "target_scores": {"yes": i % 2, "no": 1 - i % 2}} for i in range(4)
    ],
}


def make_sdist(path: Path, spec, members: dict[str, bytes]) -> Path:
    """A gzipped tarball laid out like the bigbench sdist: ``<member_dir>/<task>/task.json`` and other files."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{spec.member_dir}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_only_the_chosen_task_files_are_extracted(tmp_path):
    spec = dataclasses.replace(BIGBENCH, tasks=("beta", "alpha"), member_dir="pkg-1.0/pkg/tasks")
    alpha = json.dumps(GOOD_TASK).encode()
    beta = json.dumps({**GOOD_TASK, "name": "beta"}, indent=1).encode()
    sdist = make_sdist(
        tmp_path / "pkg.tar.gz",
        spec,
        {
            "alpha/task.json": alpha,
            "alpha/README.md": b"readme",
            "gamma/task.json": b"not even json",
            "beta/task.json": beta,
            "beta/sub/task.json": b"{}",
        },
    )
    staging = tmp_path / "out"
    staging.mkdir()
    info = setup_assets._extract_task_files(spec, sdist, staging)
    assert sorted(p.name for p in staging.iterdir()) == ["alpha.json", "beta.json"]
    assert (staging / "alpha.json").read_bytes() == alpha and (staging / "beta.json").read_bytes() == beta
    assert info["tasks"]["beta"]["sha256"] == hashlib.sha256(beta).hexdigest()
    assert info["tasks"]["alpha"]["examples"] == 4 and info["tasks"]["alpha"]["chance"] == 0.5


def test_a_missing_or_broken_task_file_fails_the_install(tmp_path):
    spec = dataclasses.replace(BIGBENCH, tasks=("alpha", "beta"), member_dir="pkg-1.0/pkg/tasks")
    (tmp_path / "a").mkdir()
    sdist = make_sdist(tmp_path / "one.tar.gz", spec, {"alpha/task.json": json.dumps(GOOD_TASK).encode()})
    with pytest.raises(setup_assets.AssetPrepareError, match="one.tar.gz has no task.json for beta"):
        setup_assets._extract_task_files(spec, sdist, tmp_path / "a")
    (tmp_path / "b").mkdir()
    bad = {**GOOD_TASK, "examples": [{"input": "x", "target_scores": {"yes": 1}}]}
    sdist = make_sdist(
        tmp_path / "two.tar.gz",
        spec,
        {"alpha/task.json": json.dumps(GOOD_TASK).encode(), "beta/task.json": json.dumps(bad).encode()},
    )
    with pytest.raises(setup_assets.AssetPrepareError, match=r"task beta does not load: .*examples\[0\]"):
        setup_assets._extract_task_files(spec, sdist, tmp_path / "b")


def test_failed_download_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    # pip with no index and an empty find-links folder finds nothing, as it would offline
    (tmp_path / "links").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    home = tmp_path / "home"
    with caplog.at_level(logging.WARNING, logger=setup_assets.__name__):
        status = setup_assets.prepare_task_data(home)
    assert status == "skipped: download failed"
    assert "WARNING: could not download bigbench==1.0.0" in caplog.text
    assert not task_data_path(home).exists() and not list(home.glob(".tmp-*"))
    with pytest.raises(AssetNotInstalledError, match="are not installed.*setup_assets prepare"):
        bigbench_task_file(BIGBENCH.tasks[0], home)


def test_marker_decides_whether_the_tasks_are_installed(tmp_path):
    folder = task_data_path(tmp_path)
    folder.mkdir(parents=True)
    for task in BIGBENCH.tasks:
        (folder / f"{task}.json").write_text(json.dumps(GOOD_TASK))
    assert not task_data_installed(tmp_path)  # an interrupted install: no marker
    extra = {"tasks": {task: {"file": f"{task}.json"} for task in BIGBENCH.tasks[:-1]}}
    setup_assets._write_task_marker(BIGBENCH, folder, extra)
    assert not task_data_installed(tmp_path)  # a marker that misses a task
    with pytest.raises(AssetNotInstalledError, match="incomplete"):
        bigbench_task_file(BIGBENCH.tasks[0], tmp_path)
    extra = {"tasks": {task: {"file": f"{task}.json"} for task in BIGBENCH.tasks}}
    setup_assets._write_task_marker(BIGBENCH, folder, extra)
    assert task_data_installed(tmp_path)
    assert bigbench_task_file(BIGBENCH.tasks[0], tmp_path) == folder / f"{BIGBENCH.tasks[0]}.json"
    marker = json.loads((folder / MARKER_NAME).read_text())
    assert marker["sha256"] == BIGBENCH.sha256 and marker["licence"].startswith("Apache-2.0")
    assert setup_assets.prepare_task_data(tmp_path) == "present"  # a no-op: nothing downloaded
    with pytest.raises(KeyError, match="unknown BIG-bench task 'hyperbaton'"):
        bigbench_task_file("hyperbaton", tmp_path)
