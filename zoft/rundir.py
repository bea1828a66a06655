"""Run folders that lose nothing: a name is reserved before the work starts, and a run's folder
is held by exactly one process.

A run works in ``.NAME.partial/`` beside its final place and holds an exclusive lock on its
``.lock`` file for as long as it runs (the kernel drops the lock when the process dies, kill -9
included). The folder is made under a private name with its lock already taken, then renamed
into place, so no other process ever sees it unlocked while its owner lives. A ``.partial``
folder whose lock can be taken belongs to a dead process: without a checkpoint it is debris and
is removed; with one it waits for ``--resume``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from zoft.compare import method_of, short_label
from zoft.errors import RunTaken, ZoftError

CHECKPOINT = "checkpoint.safetensors"


def safe_name(text: str) -> str:
    """``text`` as a folder name: every run of other characters than letters, digits and ._=- becomes -."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text)


def default_run_name(cfg, task_name: str) -> str:
    """task-method-sSEED-time-rand: the method as ``zoft compare`` labels it, so the folder of a run
    with a head start or a tuner says so (--tuner auto counts as asked for, found or not, since the
    name is taken before the model loads); the time and random suffix keep names unique."""
    label = short_label(method_of({**asdict(cfg), "tuner_path": None if cfg.tuner == "none" else cfg.tuner}))
    return safe_name(f"{task_name}-{label}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")


def _try_lock(path: Path) -> int | None:
    """An exclusive lock on ``path`` (created if missing), or None while another process holds it."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_writable(folder: Path, what: str = "output dir"):
    """Create ``folder`` if needed and prove that files can be written there, before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".zoft-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ZoftError(f"{what} {folder} is not a writable folder ({e.strerror or e})") from None


def remove_stale(folder: Path):
    """Remove what dead runs left in ``folder``: unlocked partial folders without a checkpoint."""
    for partial in folder.glob(".*.partial*"):
        if not partial.is_dir() or (partial / CHECKPOINT).is_file():
            continue
        owner = re.search(r"\.partial-(\d+)$", partial.name)  # a name being reserved right now?
        if owner and _alive(int(owner.group(1))):
            continue
        fd = _try_lock(partial / ".lock") if (partial / ".lock").exists() else None
        if fd is not None or not (partial / ".lock").exists():
            shutil.rmtree(partial, ignore_errors=True)
        if fd is not None:
            os.close(fd)


class RunFolder:
    def __init__(self, run_dir: Path, owner: bool = True):
        """``owner`` False (the ranks but rank 0 of a distributed run): the folder is read, never
        reserved, locked, renamed or removed."""
        self.run_dir = Path(run_dir)
        self.partial = self.run_dir.parent / f".{self.run_dir.name}.partial"
        self.owner = owner
        self._fd: int | None = None

    def reserve(self):
        """Take the name for a fresh run: fails at once if any process has it."""
        if not self.owner:
            return
        parent = self.run_dir.parent
        check_writable(parent)
        remove_stale(parent)
        if self.run_dir.exists():
            raise ZoftError(f"run directory already exists: {self.run_dir}")
        private = parent / f".{self.run_dir.name}.partial-{os.getpid()}"
        private.mkdir()
        self._fd = _try_lock(private / ".lock")
        try:
            os.rename(private, self.partial)  # fails when the name is taken: the partial is never empty
        except OSError as e:
            self.release()
            shutil.rmtree(private, ignore_errors=True)
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise RunTaken(f"another run named {self.run_dir.name} is running or was interrupted in {parent};"
                            f" continue it with --resume {self.run_dir}, or pick another --run-name") from None

    def claim(self):
        """Take an interrupted run's folder for ``--resume``."""
        if (self.run_dir / "summary.json").is_file():
            raise ZoftError(f"{self.run_dir} is complete; nothing to resume")
        if not (self.partial / CHECKPOINT).is_file():
            raise ZoftError(f"no checkpoint to resume in {self.partial}")
        if not self.owner:
            return
        self._fd = _try_lock(self.partial / ".lock")
        if self._fd is None:
            raise RunTaken(f"{self.run_dir.name} is being run by another process")

    def release(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def commit(self):
        """The run succeeded: its folder takes its final name, without the resume files."""
        if not self.owner:
            return
        (self.partial / CHECKPOINT).unlink(missing_ok=True)
        # rename while the lock file exists and is held: another process's remove_stale takes a
        # partial without a checkpoint or a lock file for a dead run's and deletes it
        os.rename(self.partial, self.run_dir)
        (self.run_dir / ".lock").unlink(missing_ok=True)
        self.release()

    def discard(self):
        if not self.owner:
            return
        shutil.rmtree(self.partial, ignore_errors=True)
        self.release()

    @property
    def held(self) -> bool:
        """A live process (this one or another) holds the run's folder right now."""
        if not (self.partial / ".lock").exists():
            return False
        fd = _try_lock(self.partial / ".lock")
        if fd is not None:
            os.close(fd)
        return fd is None

    @property
    def resumable(self) -> bool:
        return (self.partial / CHECKPOINT).is_file()


class TableLock:
    """One writer of a grid's table and plot at a time; ``held`` is False when another process is
    writing them (the same ones: every run is complete by then)."""

    def __init__(self, folder: Path):
        self._fd = _try_lock(folder / ".grid.lock")
        self.held = self._fd is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)
