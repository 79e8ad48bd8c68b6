"""``train --verify``: a same-size corrupted shard of the aligned set (the marker-and-size check cannot see it)
is refused before training, naming the shard; without ``--verify`` the cheap open lets it through."""

from __future__ import annotations

import shutil

import pytest

from alm_pipeline.cache.aligned import open_aligned_set
from alm_pipeline.trainer.driver import _check_source
from alm_pipeline.trainer.errors import TrainingError
from tests.factories import train_config

pytestmark = pytest.mark.ray


def test_verify_refuses_a_corrupted_shard_before_training(ray_local, self_aligned, gpt2_bl_model, tmp_path):
    copy = tmp_path / "aligned"
    shutil.copytree(self_aligned, copy)
    shard = open_aligned_set(copy).shard_location(0).local_path
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF  # same size: only a checksum finds it
    shard.write_bytes(bytes(data))

    plain = train_config(copy, tmp_path / "run", init_from=str(gpt2_bl_model))
    assert _check_source(plain)["kind"] == "aligned"  # markers and sizes agree
    with pytest.raises(TrainingError, match=rf"--aligned .*{shard.name}"):
        _check_source(train_config(copy, tmp_path / "run", init_from=str(gpt2_bl_model), verify=True))
