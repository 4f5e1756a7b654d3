"""Callbacks that interrupt a training subprocess the way the outside world does (tests only).

A test puts this folder on the subprocess's PYTHONPATH and adds
``+callbacks.interrupt._target_=interrupts.SignalAt +callbacks.interrupt.step=N
+callbacks.interrupt.signal=KILL``.
"""

from __future__ import annotations

import os
import signal as signals

import lightning as L


class SignalAt(L.Callback):
    """Send ``signal`` (KILL or TERM) to this process right after optimizer step ``step``."""

    def __init__(self, step: int, signal: str = "KILL") -> None:
        self.step = step
        self.signal = getattr(signals, f"SIG{signal}")

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)
