"""Training loss: regression onto the prediction-type target with optional min-SNR weighting."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from flowerdiff.diffusion.schedules import NoiseSchedule, check_prediction_type

LOSS_KINDS: tuple[str, ...] = ("l1", "l2", "huber")
LOSS_WEIGHTINGS: tuple[str, ...] = ("none", "min_snr")


def min_snr_weight(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma weight (Hang et al. 2023) for a loss on the given prediction type.

    The x0-space weight min(snr, gamma) expressed in the space the network predicts in:
    epsilon: min(snr, gamma) / snr, v: min(snr, gamma) / (snr + 1), x0: min(snr, gamma).
    The epsilon weight is computed as gamma / max(snr, gamma), which is the same number but
    stays finite (= 1) at snr = 0 (zero-terminal-SNR schedules).
    """
    check_prediction_type(prediction_type)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return gamma / snr.clamp(min=gamma)
    if prediction_type == "v":
        return clipped / (snr + 1)
    return clipped


class DiffusionLoss(nn.Module):
    """Per-pixel L1 / L2 / Huber loss against ``schedule.training_target``.

    Reduction: mean over the non-batch dims per sample, times the per-sample weight, then mean
    over the batch. ``"l1"`` is the book's default; Huber is ``F.huber_loss`` with ``huber_delta``
    (quadratic below delta, linear above).
    """

    def __init__(
        self,
        kind: str = "l1",
        weighting: str = "none",
        snr_gamma: float = 5.0,
        huber_delta: float = 1.0,
    ) -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(
                f"DiffusionLoss kind={kind!r} is not supported. Valid values are "
                f"{', '.join(map(repr, LOSS_KINDS))} (the book uses 'l1')."
            )
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"DiffusionLoss weighting={weighting!r} is not supported. Valid values are "
                f"{', '.join(map(repr, LOSS_WEIGHTINGS))} ('min_snr' is Hang et al. 2023 with "
                "snr_gamma)."
            )
        if snr_gamma <= 0:
            raise ValueError(
                f"DiffusionLoss snr_gamma={snr_gamma} must be > 0 (Hang et al. use 5.0)."
            )
        if huber_delta <= 0:
            raise ValueError(f"DiffusionLoss huber_delta={huber_delta} must be > 0.")
        self.kind = kind
        self.weighting = weighting
        self.snr_gamma = float(snr_gamma)
        self.huber_delta = float(huber_delta)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, weighting={self.weighting!r}, snr_gamma={self.snr_gamma}"

    def forward(
        self,
        model_output: Tensor,
        x0: Tensor,
        noise: Tensor,
        t: Tensor,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
    ) -> Tensor:
        """Scalar loss; computed in float32 even if the model output is half precision."""
        target = schedule.training_target(x0, noise, t, prediction_type).float()
        output = model_output.float()
        if self.kind == "l1":
            err = F.l1_loss(output, target, reduction="none")
        elif self.kind == "l2":
            err = F.mse_loss(output, target, reduction="none")
        else:
            err = F.huber_loss(output, target, reduction="none", delta=self.huber_delta)
        per_sample = err.flatten(1).mean(dim=1)
        if self.weighting == "min_snr":
            snr = schedule.snr(t).to(per_sample.device)
            per_sample = per_sample * min_snr_weight(snr, self.snr_gamma, prediction_type)
        return per_sample.mean()
