"""One run per run folder: an exclusive lock on run_dir/.lock for the run's life, and the clean-up of temporary
files that killed writes left behind (done under the lock, so no live writer of this run owns them).

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on run_dir/.lock, taken by rank 0 before any rank writes into the
folder and held until the run ends; the operating system releases it when the process dies, however it dies.
The file holds the holder's pid, host and start time, which a second run names when it refuses to start.
Forked children (DataLoader workers) close their copy of the descriptor at once, so a killed trainer's lock is
free as soon as the trainer itself is gone. On a shared filesystem the lock is only as good as the
filesystem's flock (NFSv4: yes, emulated with POSIX locks; Lustre: mounted with `-o flock`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path

from phenoflow.errors import PhenoflowError

LOCK_NAME = ".lock"
# Our writers' temporary names: `.<name>.tmp<pid>` (checkpoint._atomic, shard, index, manifest and label-table
# writers), `<name>.tmp<pid>` (vocabularies), `<name>.tmp` (config.yaml, reports), `<stem>.tmp.png` (grids).
TEMPORARY = re.compile(r".+\.tmp\d*|.+\.tmp\.png")
# The parts of a run folder training writes; evaluation's folders (report/, samples/, eval_cache/) are left
# alone, since an evaluation may be writing them while training starts.
TRAINING_PARTS = ("checkpoints", "data", "export")


class RunLockedError(PhenoflowError):
    """Another live run holds the run folder's lock."""


_HELD: dict[int, RunLock] = {}  # fd -> lock, for the fork hook


def _close_in_child() -> None:
    for fd, lock in list(_HELD.items()):
        with contextlib.suppress(OSError):
            os.close(fd)  # the child's copy only: the parent still holds the lock
        lock.fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """The exclusive lock on one run folder (see the module docstring). `acquire()` raises RunLockedError
    naming the holder; `release()` is idempotent."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    def holder(self) -> dict:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        if self.fd is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = self.holder()
            raise RunLockedError(
                f"run folder {self.run_dir} is in use by another run (pid {h.get('pid', '?')} on host "
                f"{h.get('host', '?')}, started {h.get('started', '?')}; lock file {self.path}). Two runs in one "
                f"folder would overwrite each other's checkpoints. Wait for it to finish or stop it (a killed "
                f"torchrun can leave its workers running: `kill {h.get('pid', '<pid>')}` on that host), or use "
                f"another run.name.") from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.write(fd, (json.dumps(info) + "\n").encode())
        self.fd = fd
        _HELD[fd] = self

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        _HELD.pop(fd, None)
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the last descriptor releases the flock (the file stays: nothing to race on)

    def __del__(self):
        with contextlib.suppress(AttributeError, TypeError, OSError):  # at interpreter shutdown too
            self.release()


def clean_temporaries(run_dir: Path) -> list[Path]:
    """Remove the temporary files of killed writes from a run folder (its top level and the parts training
    writes; only names matching TEMPORARY). Call with the run lock held. Returns the removed paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    candidates = [p for p in run_dir.iterdir() if p.is_file()]
    for part in TRAINING_PARTS:
        if (run_dir / part).is_dir():
            candidates += [p for p in (run_dir / part).rglob("*") if p.is_file()]
    removed = []
    for p in candidates:
        if TEMPORARY.fullmatch(p.name) and not p.is_symlink():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def take_run_folder(lock: RunLock, engine) -> list[Path]:
    """Rank 0 takes the run folder's lock and cleans its temporaries; every rank learns the outcome (one
    broadcast) and raises the same RunLockedError if the folder is held, before anything is written.
    Returns the removed temporaries (rank 0; [] elsewhere)."""
    error, removed = None, []
    if engine.is_main:
        try:
            lock.acquire()
            removed = clean_temporaries(lock.run_dir)
        except RunLockedError as e:
            error = str(e)
    error = engine.broadcast_object(error)
    if error is not None:
        raise RunLockedError(error)
    return removed
