"""The output lock (alm_pipeline.locking): a second writer — a real other process — is refused at once with the
holder named; the lock dies with its holder (kill -9 leaves no stale lock); outputs that cannot be written are
refused with one clear error."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from alm_pipeline.locking import (
    LOCK_FILE,
    OutputError,
    OutputLockedError,
    OutputNotWritableError,
    output_lock,
)
from tests.factories import lock_held_elsewhere


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    with lock_held_elsewhere(out, "teacher-cache") as holder:
        t0 = time.monotonic()
        with pytest.raises(OutputLockedError) as refused:
            output_lock(out, "train").acquire()
        assert time.monotonic() - t0 < 5
    message = str(refused.value)
    assert f"{out} is being written by another run" in message
    assert f"alm-pipeline teacher-cache (pid {holder.pid} on {socket.gethostname()}" in message
    assert refused.value.holder["pid"] == holder.pid and refused.value.holder["started"]
    # released when the holder ended: now this process may write, and the file describes it while it does
    with output_lock(out, "train") as lock:
        assert lock.holder()["pid"] == os.getpid() and lock.holder()["command"] == "alm-pipeline train"
    assert lock.holder() == {}  # released: no holder described


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    with lock_held_elsewhere(out) as holder:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        assert (out / LOCK_FILE).read_text()  # the dead holder's description is still in the file
        with output_lock(out, "train") as lock:  # but the lock died with it
            assert lock.holder()["pid"] == os.getpid()


def test_outputs_that_cannot_be_written_are_refused(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputNotWritableError, match="exists and is not a folder"):
        output_lock(a_file, "train").acquire()
    with pytest.raises(OutputNotWritableError, match="cannot write the output here"):
        output_lock(a_file / "run", "train").acquire()
    with pytest.raises(OutputError, match="object-store outputs are not supported yet"):
        output_lock("s3://bucket/run", "train")
