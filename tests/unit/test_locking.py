"""The output lock (alm_pipeline.locking): a second writer — a real other process — is refused at once with the
holder named; the lock dies with its holder (kill -9 leaves no stale lock); outputs that cannot be written are
refused with one clear error."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from alm_pipeline.locking import (
    LOCK_FILE,
    ObjectStoreOutputLock,
    OutputError,
    OutputLockedError,
    OutputNotWritableError,
    output_lock,
)
from alm_pipeline.storage import location
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
    with pytest.raises(OutputError, match=r"ftp://host/run: unsupported URI scheme 'ftp'"):
        output_lock("ftp://host/run", "train")


# ------------------------------------------------------------------------------------------ object storage


def _s3_lock(uri: str, command: str = "train", **timing) -> ObjectStoreOutputLock:
    timing = {"heartbeat_seconds": 0.2, "stale_seconds": 2.0, "settle_seconds": 0.3, **timing}
    lock = output_lock(uri, command)
    assert isinstance(lock, ObjectStoreOutputLock)
    for key, value in timing.items():
        setattr(lock, key, value)
    return lock


def test_s3_a_second_writer_in_another_process_is_refused_naming_the_holder(s3_bucket):
    out = f"{s3_bucket}/run"
    with lock_held_elsewhere(out, "teacher-cache") as holder:
        with pytest.raises(OutputLockedError) as refused:  # the holder beats every 10 s: stale after 60 s
            _s3_lock(out, stale_seconds=60.0).acquire()
        message = str(refused.value)
        assert f"{out} is being written by another run" in message
        assert f"alm-pipeline teacher-cache (pid {holder.pid} on {socket.gethostname()}" in message
        assert "token" not in refused.value.holder and refused.value.holder["heartbeat"]
    # the holder released it on exit: the lock object is gone and this process may write
    assert not location(out).join(LOCK_FILE).exists()
    with _s3_lock(out) as lock:
        assert lock.holder()["pid"] == os.getpid()
        assert location(out).join(LOCK_FILE).exists()
    assert not location(out).join(LOCK_FILE).exists()


def test_s3_heartbeat_keeps_the_lock_and_a_dead_holders_lock_goes_stale(s3_bucket):
    out = f"{s3_bucket}/run"
    with _s3_lock(out) as first:
        beat = first.holder()["heartbeat_unix"]
        time.sleep(2.5)  # longer than stale_seconds: only the heartbeat keeps the lock fresh
        assert first.holder()["heartbeat_unix"] > beat
        with pytest.raises(OutputLockedError):
            _s3_lock(out).acquire()
    # a holder that died (kill -9): its lock object stays, with an old heartbeat
    dead = {"command": "alm-pipeline train", "pid": 1, "host": "gone", "heartbeat_unix": time.time() - 3.0}
    location(out).join(LOCK_FILE).write_json({**dead, "token": "x"})
    with _s3_lock(out) as taken:
        assert taken.holder()["pid"] == os.getpid()
    location(out).join(LOCK_FILE).write_json({**dead, "heartbeat_unix": time.time(), "token": "x"})
    with pytest.raises(OutputLockedError, match=r"pid 1 on gone"):
        _s3_lock(out).acquire()


def test_s3_two_writers_racing_for_a_free_lock_one_wins(s3_bucket):
    """Both find no lock object and write theirs at about the same time: exactly one holds the lock."""
    out = f"{s3_bucket}/run"
    locks = [_s3_lock(out, settle_seconds=1.0) for _ in range(2)]
    results: list = [None, None]
    barrier = threading.Barrier(2)

    def take(i: int) -> None:
        barrier.wait()
        try:
            locks[i].acquire()
            results[i] = "held"
        except OutputLockedError:
            results[i] = "refused"

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["held", "refused"]
    for lock in locks:
        lock.release()


def test_s3_a_missing_bucket_is_refused_naming_the_uri(s3_bucket):
    with pytest.raises(
        OutputNotWritableError,
        match=r"s3://no-such-bucket-x/run: bucket s3://no-such-bucket-x does not exist",
    ):
        output_lock("s3://no-such-bucket-x/run", "align").acquire()
    assert not location("s3://no-such-bucket-x").exists()  # nothing was created
