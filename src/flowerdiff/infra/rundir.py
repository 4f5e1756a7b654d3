"""One run per run directory: an exclusive lock that a second run meets at once.

Two runs writing into one ``hydra.run.dir`` overwrite each other's ``last.ckpt`` and
``metrics.json``. The lock is an advisory ``flock`` on ``<run dir>/.flowerdiff.lock``: the
kernel releases it when its process ends, however it ends (``kill -9`` included), so resuming a
dead run (``ckpt_path=last``) just works, while a live run blocks a second one with a message.
Only global rank zero takes it: the other processes of a multi-GPU run share the directory.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only

from flowerdiff.files import PARTIAL_SUFFIX

LOCK_FILE = ".flowerdiff.lock"


class RunDirectoryBusy(RuntimeError):
    """Another live run holds the run directory."""


@contextmanager
def run_directory_lock(directory: str | Path) -> Iterator[None]:
    """Hold the run directory for the duration of the block (rank zero only)."""
    if rank_zero_only.rank != 0:
        yield
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunDirectoryBusy(
                f"Another run ({holder}) is running in {directory} (hydra.run.dir). Two runs in "
                "one directory would overwrite each other's checkpoints and metrics: wait for it "
                "to finish, stop it, or give this run its own directory (hydra.run.dir=...). A "
                "run that died holds no lock, so `ckpt_path=last` resumes it."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        remove_stale_partials(directory)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_stale_partials(directory: Path) -> None:
    """Temp files of writes that a killed run left behind (only the lock holder writes here)."""
    for partial in directory.rglob(f".tmp-*{PARTIAL_SUFFIX}"):
        partial.unlink(missing_ok=True)
