"""ImagesPerSecond: training throughput in images per second, over all devices."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class ImagesPerSecond(Callback):
    """Log ``train/images_per_sec``: training images per wall-clock second, all ranks together,
    averaged over the last ``window`` batches.

    Lightning's ``ThroughputMonitor`` needs a ``batch_size_fn``, synchronises CUDA after every
    batch, warns without a FLOP count and logs eight keys on its own step axis; one number on
    the trainer's step is what a dashboard needs. Validation time is excluded (the window restarts
    after each validation), and averaging over many batches makes CUDA's asynchrony irrelevant
    without a per-batch synchronise.
    """

    def __init__(self, window: int = 20) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(
                f"callbacks.throughput.window={window} must be >= 1 (batches averaged)."
            )
        self.window = window
        self.marks: deque[tuple[float, int]] = deque(maxlen=window + 1)  # (time, images so far)

    def restart(self, *args: Any) -> None:
        self.marks.clear()

    on_train_epoch_start = restart
    on_validation_end = restart

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        seen = (self.marks[-1][1] if self.marks else 0) + images.shape[0] * trainer.world_size
        now = time.perf_counter()
        if self.marks and now > self.marks[0][0]:
            rate = (seen - self.marks[0][1]) / (now - self.marks[0][0])
            pl_module.log("train/images_per_sec", rate, on_step=True, on_epoch=False)
        self.marks.append((now, seen))
