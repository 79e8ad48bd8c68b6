"""Opening a teacher cache or an aligned set: what is not one, an unfinished one and another format version are
refused with a message that names the folder and the command that makes or finishes it."""

from __future__ import annotations

import json

import pytest

from alm_pipeline.cache.aligned import ALIGNED_FORMAT_VERSION, ALIGNED_KIND, open_aligned_set
from alm_pipeline.cache.store import CacheIntegrityError
from alm_pipeline.cache.teacher import CACHE_KIND, FORMAT_VERSION, open_cache

OPENERS = {
    "cache": (open_cache, CACHE_KIND, FORMAT_VERSION, "teacher cache", "alm-pipeline teacher-cache"),
    "aligned": (open_aligned_set, ALIGNED_KIND, ALIGNED_FORMAT_VERSION, "aligned set", "alm-pipeline align"),
}


def _manifest(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(fields))
    return folder


@pytest.mark.parametrize("which", sorted(OPENERS))
def test_refusals_name_the_folder_and_the_command(tmp_path, which):
    opener, kind, version, what, command = OPENERS[which]
    with pytest.raises(CacheIntegrityError, match=rf"{tmp_path}: not an? {what} \(no manifest.json\)"):
        opener(tmp_path)
    other = "alm-aligned-set" if which == "cache" else "alm-teacher-cache"
    folder = _manifest(tmp_path / "other", kind=other, format_version=version, state="complete")
    with pytest.raises(CacheIntegrityError, match=rf"not an? {what} \(kind='{other}'\)"):
        opener(folder)
    folder = _manifest(tmp_path / "old", kind=kind, format_version=version + 98, state="complete")
    with pytest.raises(CacheIntegrityError, match=rf"format version {version + 98}.*`{command}`"):
        opener(folder)
    folder = _manifest(tmp_path / "half", kind=kind, format_version=version, state="in_progress")
    with pytest.raises(CacheIntegrityError, match=rf"{folder}: the {what} is incomplete.*same `{command}`"):
        opener(folder)
