"""Crash-safe checkpoint writing: temp file in the same folder, fsync, then ``os.replace``.

Lightning 2.6's ``TorchCheckpointIO`` serialises into memory and writes through an fsspec
transaction, which on the local filesystem means ``tempfile.mkstemp()`` in the *system* temp
folder followed by ``shutil.move``. When ``$TMPDIR`` lives on another filesystem than the
checkpoints (tmpfs, node-local disk vs. NFS/Lustre: the usual cluster layout) ``shutil.move``
falls back to copying into the final path, so a ``kill -9`` during the copy leaves a truncated
``last.ckpt``; every kill also strands a checkpoint-sized file in ``$TMPDIR``, nothing is
fsynced, and the whole checkpoint is held in memory twice. :class:`AtomicCheckpointIO` writes
next to the target instead, so the rename is always atomic.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

# Partial files must not contain "last": Lightning's `ckpt_path="last"` picks the newest file
# whose name contains it, which could otherwise be a stranded partial write.
PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """The temp file for ``path``: hidden, in the same folder, one fixed name per target (a
    write killed half-way is overwritten by the next save of that target, not piled up)."""
    digest = hashlib.sha256(path.name.encode()).hexdigest()[:16]
    return path.with_name(f".ckpt-{digest}{PARTIAL_SUFFIX}")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    Readers see either the old complete file or the new complete file, whatever moment the
    process dies at; the directory is fsynced too, so the rename survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as file:
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (see the module docstring).

    Remote paths (``s3://``, ``gs://``...) keep Lightning's fsspec transaction, which uploads
    the object in one piece.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(path, lambda file: torch.save(checkpoint, file))
