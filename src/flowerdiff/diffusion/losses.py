"""The DDPM family's regression loss: L1 / L2 / Huber per sample, optional min-SNR weighting."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

LOSS_KINDS: tuple[str, ...] = ("l1", "l2", "huber")
LOSS_WEIGHTINGS: tuple[str, ...] = ("none", "min_snr")


def min_snr_weight(snr: Tensor, gamma: float, prediction: str) -> Tensor:
    """Min-SNR-gamma weight (Hang et al. 2023) for a loss on the given prediction type.

    The x0-space weight min(snr, gamma) expressed in the space the network predicts in:
    epsilon: min(snr, gamma) / snr, v: min(snr, gamma) / (snr + 1), x0: min(snr, gamma).
    The epsilon weight is computed as gamma / max(snr, gamma), which is the same number but
    stays finite (= 1) at snr = 0 (zero-terminal-SNR schedules).
    """
    clipped = snr.clamp(max=gamma)
    if prediction == "epsilon":
        return gamma / snr.clamp(min=gamma)
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped


class RegressionLoss:
    """Per-pixel L1 / L2 / Huber error, averaged per sample.

    ``"l1"`` is the book's; Huber is ``F.huber_loss`` with ``huber_delta`` (quadratic below
    delta, linear above). ``weighting="min_snr"`` multiplies each sample's error by
    :func:`min_snr_weight` (the family supplies the SNR).
    """

    def __init__(
        self,
        kind: str = "l1",
        weighting: str = "none",
        snr_gamma: float = 5.0,
        huber_delta: float = 1.0,
    ) -> None:
        if kind not in LOSS_KINDS:
            raise ValueError(
                f"`diffusion.loss.kind={kind!r}` is not a known loss. Valid values are "
                f"{', '.join(map(repr, LOSS_KINDS))} ('l1' is the book's)."
            )
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"`diffusion.loss.weighting={weighting!r}` is not a known loss weighting. Valid "
                f"values are {', '.join(map(repr, LOSS_WEIGHTINGS))} ('min_snr' is Hang et al. "
                "2023, with diffusion.loss.snr_gamma)."
            )
        if not snr_gamma > 0:
            raise ValueError(
                f"`diffusion.loss.snr_gamma={snr_gamma}` must be > 0 (Hang et al. use 5.0)."
            )
        if not huber_delta > 0:
            raise ValueError(f"`diffusion.loss.huber_delta={huber_delta}` must be > 0.")
        self.kind = kind
        self.weighting = weighting
        self.snr_gamma = float(snr_gamma)
        self.huber_delta = float(huber_delta)

    def to_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "weighting": self.weighting,
            "snr_gamma": self.snr_gamma,
            "huber_delta": self.huber_delta,
        }

    def __repr__(self) -> str:
        return f"RegressionLoss({', '.join(f'{k}={v!r}' for k, v in self.to_config().items())})"

    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        """[B] mean error of each sample, in float32 even for half-precision outputs."""
        output, target = output.float(), target.float()
        if self.kind == "l1":
            err = F.l1_loss(output, target, reduction="none")
        elif self.kind == "l2":
            err = F.mse_loss(output, target, reduction="none")
        else:
            err = F.huber_loss(output, target, reduction="none", delta=self.huber_delta)
        return err.flatten(1).mean(dim=1)
