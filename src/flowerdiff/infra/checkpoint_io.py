"""Crash-safe checkpoints: Lightning's checkpoint IO, writing through :func:`atomic_write`.

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

from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from flowerdiff.files import atomic_write


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
