"""One writer per output: the exclusive lock every writing command holds on its output folder for the whole run.

Two runs writing one folder lose work silently (two trainings prune each other's checkpoints, two teacher-cache
runs delete each other's staging folder). So each command that writes an output (``teacher-cache``, ``align``
per aligned set, ``train``, ``quickstart``, ``evaluate --run-dir``) first takes :func:`output_lock` on it; a
second writer is refused at once with an :class:`OutputLockedError` that names the holder (host, pid, user,
command, start time).

The lock is an interface (:class:`OutputLock`: ``acquire``, ``release``, ``holder``, a context manager) with one
implementation today, :class:`LocalOutputLock`: ``fcntl.flock`` on the file ``<output>/.alm-pipeline.lock``,
which also holds the holder's description as JSON. The kernel drops the lock when its process ends, however it
ends (``kill -9`` included), so there are no stale locks to clean up; a lock file left behind only describes
its last holder. On a shared filesystem the lock is as good as that filesystem's ``flock`` (NFSv4 and Lustre
support it; some FUSE mounts do not).

Object storage (``s3://``, ``gs://``; a later issue adds pyarrow.fs URIs) has no ``flock``. An implementation
for it goes behind the same interface: a lock object ``<output>/.alm-pipeline.lock`` created only if absent
(a conditional put), holding the same owner fields plus a ``heartbeat`` time that a background thread of the
holder refreshes every few seconds; a writer that finds a lock object whose heartbeat is older than a timeout
(the holder died) replaces it with a conditional put on its version, any other writer is refused with the
holder named. Until then :func:`output_lock` refuses URIs rather than run without a lock.
"""

from __future__ import annotations

import errno
import fcntl
import getpass
import json
import os
import shlex
import socket
import sys
import time
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

__all__ = [
    "LOCK_FILE",
    "LocalOutputLock",
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


def output_lock(path: str | os.PathLike[str], command: str) -> OutputLock:
    """The lock for the output ``path`` written by ``alm-pipeline <command>`` (not yet acquired)."""
    text = os.fspath(path)
    if "://" in text:
        raise OutputError(
            f"{text}: object-store outputs are not supported yet (they need a lock object with a heartbeat; "
            "see alm_pipeline.locking)"
        )
    return LocalOutputLock(Path(text).absolute(), command)
