"""Crash-safe writing: temp file in the same folder, fsync, then ``os.replace``.

Every file flowerdiff writes that a crash must not damage goes through :func:`atomic_write`:
checkpoints, exports, the decoded-image cache and the FID reference statistics.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

# Partial files must not contain "last": Lightning's `ckpt_path="last"` picks the newest file
# whose name contains it, which could otherwise be a stranded partial write.
PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """A fresh temp name beside ``path`` (hidden, unique per write, without "last")."""
    digest = hashlib.sha256(path.name.encode()).hexdigest()[:12]
    return path.with_name(f".tmp-{digest}-{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    Readers see either the old complete file or the new complete file, whatever moment the
    process dies at; the directory is fsynced too, so the rename survives a power cut. Each
    write has its own temp name (two processes writing one target never share one), hidden
    and without "last" in it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_torch_save(obj: object, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write` (caches, reference statistics)."""
    atomic_write(path, lambda file: torch.save(obj, file))
