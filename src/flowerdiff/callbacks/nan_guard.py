"""Stop (or skip the batch) on a NaN/Inf loss before it reaches the weights or a checkpoint."""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.optim import Optimizer

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient; the weights were left untouched."""


class NaNGuard(Callback):
    """Checks the loss and the gradients right before every optimizer step.

    The decision is taken in ``on_before_optimizer_step``, after backward: the gradients are
    already all-reduced there, so under DDP every rank sees the same verdict (the loss flags of
    all ranks are combined too) and they stop or skip together instead of deadlocking.

    - ``skip_batch=False`` (default): raise :class:`NonFiniteLossError` naming the step and the
      last good checkpoint. The optimizer step has not run, so the weights stay finite.
    - ``skip_batch=True``: drop the gradients (``grad = None``: the optimizer leaves those
      weights and their moments untouched) and go on; after ``max_consecutive_skips`` bad
      batches in a row the run stops as above, since skipping would never end.

    Under 16-bit mixed precision, infinite gradients are the GradScaler's business (it skips
    the step and lowers the scale), so only the loss is checked there. Independently of all
    this, a checkpoint whose ``state_dict`` holds a non-finite tensor is never written.
    """

    def __init__(self, skip_batch: bool = False, max_consecutive_skips: int = 10) -> None:
        if max_consecutive_skips < 1:
            raise ValueError(
                f"callbacks.nan_guard.max_consecutive_skips={max_consecutive_skips} must be >= 1 "
                "(bad batches in a row tolerated with skip_batch=true before the run stops)."
            )
        self.skip_batch = skip_batch
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive_skips = 0
        self.total_skips = 0
        self._loss_finite: Tensor | None = None

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor
    ) -> None:
        # Accumulated as a tensor (no GPU sync) over gradient-accumulation micro-batches.
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer
    ) -> None:
        loss_ok = bool(self._loss_finite) if self._loss_finite is not None else True
        self._loss_finite = None
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        grads = [g for g in grads if g is not None]
        grads_ok = True
        if grads and getattr(trainer.precision_plugin, "scaler", None) is None:
            grads_ok = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        bad = trainer.strategy.reduce_boolean_decision(not (loss_ok and grads_ok), all=False)
        if not bad:
            self.consecutive_skips = 0
            return
        what = "loss" if not loss_ok else "gradient norm"
        step = trainer.global_step
        if self.skip_batch and self.consecutive_skips < self.max_consecutive_skips:
            self.consecutive_skips += 1
            self.total_skips += 1
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
            _warn(
                f"Non-finite {what} at step {step} (epoch {trainer.current_epoch}): skipped this "
                f"batch (callbacks.nan_guard.skip_batch=true; {self.total_skips} skipped so far, "
                f"{self.consecutive_skips} in a row)."
            )
            return
        raise NonFiniteLossError(self._stop_message(trainer, what, step))

    def _stop_message(self, trainer: L.Trainer, what: str, step: int) -> str:
        if self.skip_batch:
            cause = (
                f"the {what} was NaN/Inf for {self.consecutive_skips + 1} batches in a row "
                f"(callbacks.nan_guard.max_consecutive_skips={self.max_consecutive_skips})"
            )
        else:
            cause = f"the {what} is NaN/Inf"
        good = last_good_checkpoint(trainer)
        where = (
            f"The last good checkpoint is {good}; resume from it with ckpt_path={good}"
            if good
            else "No checkpoint had been written yet in this run"
        )
        return (
            f"Training stopped at step {step} (epoch {trainer.current_epoch}): {cause}. The "
            f"optimizer step was not taken, so the weights are still finite and no checkpoint "
            f"holds NaN weights. {where}. Usual fixes: a lower optimizer.lr, "
            "trainer.gradient_clip_val=1.0, trainer.precision=32-true or bf16-mixed instead of "
            "16-mixed; or set callbacks.nan_guard.skip_batch=true to skip such batches."
        )

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse to write a checkpoint with NaN/Inf weights (raising here aborts the save)."""
        bad = [
            name
            for name, value in checkpoint.get("state_dict", {}).items()
            if isinstance(value, Tensor)
            and value.is_floating_point()
            and not bool(torch.isfinite(value).all())
        ]
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            good = last_good_checkpoint(trainer) or "none yet"
            raise NonFiniteLossError(
                f"Refusing to save a checkpoint at step {trainer.global_step}: the weights hold "
                f"NaN/Inf values ({shown}). The last good checkpoint is {good}."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"total_skips": self.total_skips}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_skips = int(state_dict.get("total_skips", 0))


def last_good_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint this run wrote, else the one it resumed from."""
    written = [
        path
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint)
        for path in (callback.last_model_path, callback.best_model_path)
        if path and os.path.isfile(path)
    ]
    if written:
        return max(written, key=os.path.getmtime)
    return trainer.ckpt_path


@rank_zero_only
def _warn(message: str) -> None:
    log.warning(message)
