"""One writer per output: the exclusive lock every writing command holds on its output folder for the whole run.

Two runs writing one folder lose work silently (two trainings prune each other's checkpoints, two teacher-cache
runs delete each other's staging folder). So each command that writes an output (``teacher-cache``, ``align``
per aligned set, ``train``, ``quickstart``, ``evaluate --run-dir``) first takes :func:`output_lock` on it; a
second writer is refused at once with an :class:`OutputLockedError` that names the holder (host, pid, user,
command, start time).

The lock is an interface (:class:`OutputLock`: ``acquire``, ``release``, ``holder``, a context manager) with two
implementations, chosen by :func:`output_lock` from the output's location:

* :class:`LocalOutputLock` (local paths, ``file://``): ``fcntl.flock`` on the file ``<output>/.alm-pipeline.lock``,
  which also holds the holder's description as JSON. The kernel drops the lock when its process ends, however it
  ends (``kill -9`` included), so there are no stale locks to clean up; a lock file left behind only describes its
  last holder. On a shared filesystem the lock is as good as that filesystem's ``flock`` (NFSv4 and Lustre
  support it; some FUSE mounts do not).
* :class:`ObjectStoreOutputLock` (``s3://``, ``gs://``): a lock object ``<output>/.alm-pipeline.lock`` holding the
  same owner fields, a random ``token`` and a ``heartbeat`` time that a background thread of the holder rewrites
  every ``heartbeat_seconds``. A lock object whose heartbeat is older than ``stale_seconds`` belongs to a holder
  that died and may be taken over; a fresh one refuses the second writer with the holder named.

  ``pyarrow.fs`` offers no atomic create (no conditional PUT; S3 and SeaweedFS 4.x honour ``If-None-Match: *``
  on PutObject, answering 412 to the second writer, but only a hand-signed request or boto3 could send it), so
  the lock is taken by *create, wait, read back*: write the lock object with our token, wait ``settle_seconds``, read it back, and
  hold the lock only if our token is still there (PUTs are atomic and reads after writes are consistent on S3,
  GCS and SeaweedFS, so of two writers that both found no lock, both read back the same, last, token and one of
  them wins). **Race window**: a writer whose read (finding no lock) and write both happen after the other
  writer's read-back (i.e. its read→write gap is longer than ``settle_seconds``) overwrites a lock just taken;
  the heartbeat thread of the first holder then finds a foreign token, stops refreshing and records the loss
  (:attr:`ObjectStoreOutputLock.lost`; a warning is logged), but cannot stop its run. Staleness compares the
  heartbeat written by the holder's clock with the reader's clock: hosts must keep their clocks within a small
  fraction of ``stale_seconds`` (NTP does).
"""

from __future__ import annotations

import errno
import fcntl
import getpass
import json
import logging
import os
import secrets
import shlex
import socket
import sys
import threading
import time
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

__all__ = [
    "LOCK_FILE",
    "LocalOutputLock",
    "ObjectStoreOutputLock",
    "OutputError",
    "OutputLock",
    "OutputLockedError",
    "OutputNotWritableError",
    "output_lock",
]

LOCK_FILE = ".alm-pipeline.lock"


class OutputError(RuntimeError):
    """An output folder cannot be written by this run; the message names the folder and the reason."""


class OutputLockedError(OutputError):
    """Another run holds the output's lock; ``holder`` describes it (may be empty if it could not be read)."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


class OutputNotWritableError(OutputError):
    """The output is an existing file, or its folder cannot be created or written (read-only filesystem,
    permissions)."""


def describe_holder(holder: dict) -> str:
    """``alm-pipeline train (pid 123 on host, user u, since 2026-...)`` from a lock's owner fields."""
    if not holder:
        return "another process (its description could not be read)"
    return (
        f"{holder.get('command', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"user {holder.get('user', '?')}, since {holder.get('started', '?')})"
    )


class OutputLock(ABC):
    """An exclusive, non-blocking lock on one output (see the module docstring). Use as a context manager:
    ``with output_lock(path, "train"): ...``."""

    def __init__(self, path: str | os.PathLike[str], command: str):
        self.path = path
        self.command = command

    @abstractmethod
    def acquire(self) -> None:
        """Take the lock now or raise :class:`OutputLockedError` (or :class:`OutputNotWritableError`)."""

    @abstractmethod
    def release(self) -> None:
        """Give the lock up (a no-op when not held)."""

    @abstractmethod
    def holder(self) -> dict:
        """The owner fields recorded by the current (or last) holder; ``{}`` when there are none."""

    def owner(self) -> dict:
        """This process's owner fields."""
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
        return {
            "command": f"alm-pipeline {self.command}",
            "argv": shlex.join(sys.argv),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": user,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class LocalOutputLock(OutputLock):
    """``fcntl.flock`` on ``<folder>/.alm-pipeline.lock`` (the folder is created if needed)."""

    def __init__(self, path: str | os.PathLike[str], command: str):
        super().__init__(Path(path), command)
        self.file = self.path / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        folder = self.path
        if folder.exists() and not folder.is_dir():
            raise OutputNotWritableError(f"{folder}: exists and is not a folder; choose another output")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise OutputNotWritableError(f"{folder}: cannot write the output here ({_reason(err)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputNotWritableError(f"{self.file}: cannot lock it ({_reason(err)})") from None
            holder = self._current_holder()
            raise OutputLockedError(
                f"{folder} is being written by another run: {describe_holder(holder)}. Only one command may "
                "write an output at a time; wait for that run to end, or choose another output",
                holder,
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(self.owner(), indent=2) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as err:
            os.close(fd)  # closing drops the lock
            raise OutputNotWritableError(f"{self.file}: cannot write it ({_reason(err)})") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no description of a holder that is gone
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    def holder(self) -> dict:
        try:
            text = self.file.read_text()
        except OSError:
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _current_holder(self) -> dict:
        """The holder's description; a holder that has just taken the lock may not have written it yet (the
        file is then empty, or still names its dead predecessor), so look again for a moment."""
        deadline = time.monotonic() + 1.0
        while True:
            holder = self.holder()
            if (holder and not _is_dead_here(holder)) or time.monotonic() > deadline:
                return holder
            time.sleep(0.05)


def _is_dead_here(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


class ObjectStoreOutputLock(OutputLock):
    """A lock object with a heartbeat on an object store (see the module docstring for how it is taken and its
    race window)."""

    heartbeat_seconds = 10.0
    stale_seconds = 60.0
    settle_seconds = 1.0

    def __init__(
        self,
        path,
        command: str,
        *,
        heartbeat_seconds: float | None = None,
        stale_seconds: float | None = None,
        settle_seconds: float | None = None,
    ):
        from alm_pipeline.storage import location

        super().__init__(location(path), command)
        self.file = self.path / LOCK_FILE
        self.heartbeat_seconds = heartbeat_seconds or self.heartbeat_seconds
        self.stale_seconds = stale_seconds or self.stale_seconds
        self.settle_seconds = self.settle_seconds if settle_seconds is None else settle_seconds
        self.lost = False  # set when another writer replaced the lock object while this one held it
        self._token: str | None = None
        self._owner: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        from alm_pipeline.storage import StorageError, require_bucket

        if self._token is not None:
            return
        try:
            require_bucket(self.path)
            current = self._read()
            if current and not self._is_stale(current):
                raise self._refusal(current)
            token = secrets.token_hex(16)
            self._owner = self.owner()
            self._write(token)
            time.sleep(self.settle_seconds)
            after = self._read()
        except StorageError as err:
            raise OutputNotWritableError(f"{self.path}: cannot lock the output ({err})") from None
        if after.get("token") != token:
            raise self._refusal(after)
        self._token, self.lost = token, False
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="alm-output-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if self._token is None:
            return
        token, self._token = self._token, None
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            if self._read().get("token") == token:
                self.file.remove()
        except OSError as err:  # the run is over; a lock left behind goes stale
            logging.getLogger(__name__).warning("%s: could not remove the lock object (%s)", self.file, err)

    def holder(self) -> dict:
        try:
            data = self._read()
        except OSError:
            return {}
        return {k: v for k, v in data.items() if k != "token"}

    def _read(self) -> dict:
        try:
            data = json.loads(self.file.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError:
            return {"heartbeat_unix": 0.0}  # unreadable: treated as stale
        return data if isinstance(data, dict) else {"heartbeat_unix": 0.0}

    def _write(self, token: str) -> None:
        now = time.time()
        record = {
            **self._owner,
            "heartbeat": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
            "heartbeat_unix": now,
            "token": token,
        }
        self.file.write_bytes((json.dumps(record, indent=2) + "\n").encode())

    def _is_stale(self, record: dict) -> bool:
        try:
            beat = float(record.get("heartbeat_unix", 0.0))
        except (TypeError, ValueError):
            return True
        return time.time() - beat > self.stale_seconds

    def _refusal(self, record: dict) -> OutputLockedError:
        holder = {k: v for k, v in record.items() if k != "token"}
        return OutputLockedError(
            f"{self.path} is being written by another run: {describe_holder(holder)}, last heartbeat "
            f"{holder.get('heartbeat', '?')}. Only one command may write an output at a time; wait for that run "
            f"to end (a lock whose heartbeat is older than {self.stale_seconds:.0f} s is taken over), or choose "
            "another output",
            holder,
        )

    def _heartbeat(self) -> None:
        log = logging.getLogger(__name__)
        token = self._token
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                if self._read().get("token") != token:
                    self.lost = True
                    log.warning(
                        "%s: another writer replaced this run's lock; its output may be mixed", self.file
                    )
                    return
                self._write(token)
            except OSError as err:  # a transient storage error: try again at the next beat
                log.warning("%s: could not refresh the lock (%s)", self.file, err)


def output_lock(path, command: str) -> OutputLock:
    """The lock for the output ``path`` (a local path, ``file://``, ``s3://`` or ``gs://`` URI, or a
    :class:`~alm_pipeline.storage.Location`) written by ``alm-pipeline <command>`` (not yet acquired)."""
    from alm_pipeline.storage import StorageError, location

    try:
        loc = location(path)
    except StorageError as err:
        raise OutputNotWritableError(str(err)) from None
    if loc.is_local:
        return LocalOutputLock(loc.local_path, command)
    return ObjectStoreOutputLock(loc, command)
