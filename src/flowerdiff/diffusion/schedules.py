"""Noise schedules and the single set of epsilon / x0 / v conversions.

Notation (DDPM): ``abar_t = prod_{s<=t} (1 - beta_s)``, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``
and ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (Salimans & Ho 2022). Every sampler and the
loss go through :meth:`NoiseSchedule.training_target`, :meth:`NoiseSchedule.predict_x0` and
:meth:`NoiseSchedule.predict_eps`, so a convention change can only ever happen here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v", "x0")
SCHEDULE_NAMES: tuple[str, ...] = ("cosine_clipped", "linear", "cosine", "scaled_linear", "sigmoid")

# Per-schedule (beta_start, beta_end) used when the caller passes None. For "cosine_clipped" they
# are the clip bounds, for "cosine" they are unused.
_DEFAULT_BETA_RANGE: dict[str, tuple[float, float]] = {
    "cosine_clipped": (1e-4, 0.02),
    "linear": (1e-4, 0.02),
    "cosine": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "sigmoid": (1e-4, 0.02),
}


def check_prediction_type(prediction_type: str) -> None:
    """Raise a ValueError naming the valid prediction types."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type={prediction_type!r} is not supported. Valid values are "
            f"{', '.join(map(repr, PREDICTION_TYPES))}: what the network predicts "
            "(the noise, the velocity v = sqrt(abar) eps - sqrt(1 - abar) x0, or the clean image)."
        )


def _cosine_betas(num_timesteps: int, s: float) -> Tensor:
    """Nichol & Dhariwal (2021) betas, 1 - abar(t+1)/abar(t), before any clipping."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return 1 - abar[1:] / abar[:-1]


def _rescale_zero_terminal_snr(abar: Tensor) -> Tensor:
    """Lin et al. (2023) Algorithm 1: shift/scale sqrt(abar) so the last is 0, the first unchanged."""
    sqrt_abar = abar.sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    return sqrt_abar**2


class NoiseSchedule(nn.Module):
    """Betas and alpha-bars of a discrete diffusion process plus the conversions built on them.

    Args:
        name: one of :data:`SCHEDULE_NAMES`.

            * ``"cosine_clipped"`` (default, the book's schedule): cosine betas (``cosine_s``) clipped
              to ``[beta_start, beta_end]``; with the defaults ``abar_999 ≈ 0.0032``.
            * ``"linear"``: DDPM, betas linear from ``beta_start`` to ``beta_end``.
            * ``"cosine"``: Nichol & Dhariwal, betas capped at ``max_beta``.
            * ``"scaled_linear"``: Stable Diffusion, linear in sqrt(beta) space.
            * ``"sigmoid"``: GeoDiff, ``beta_start + (beta_end - beta_start) * sigmoid(u)`` with
              ``u`` linear over ``sigmoid_range``.
        num_timesteps: T, the number of training timesteps.
        beta_start, beta_end: ``None`` selects the schedule's own default (``scaled_linear``:
            0.00085 / 0.012, all others 1e-4 / 0.02), so switching ``name`` alone gives the
            published schedule. Ignored by ``"cosine"``.
        zero_terminal_snr: rescale any schedule so ``abar_{T-1} = 0`` (Lin et al. 2023). The
            terminal step then has no signal, so x0 cannot be recovered from an epsilon
            prediction there: :meth:`predict_x0` raises for ``"epsilon"`` at such a timestep.
            Pair it with ``"v"`` (or ``"x0"``) prediction and ``"trailing"`` sampler spacing.

    The schedule is computed in float64 and stored as float32 non-persistent buffers (they follow
    ``.to()`` but are not in the state dict).
    """

    betas: Tensor
    alphas_cumprod: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor

    def __init__(
        self,
        name: str = "cosine_clipped",
        num_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        cosine_s: float = 0.008,
        max_beta: float = 0.999,
        sigmoid_range: tuple[float, float] = (-3.0, 3.0),
        zero_terminal_snr: bool = False,
    ) -> None:
        super().__init__()
        if name not in SCHEDULE_NAMES:
            raise ValueError(
                f"NoiseSchedule name={name!r} is not supported. Valid values are "
                f"{', '.join(map(repr, SCHEDULE_NAMES))}; 'cosine_clipped' is the book's default "
                "(cosine betas clipped to [beta_start, beta_end])."
            )
        if num_timesteps < 2:
            raise ValueError(
                f"NoiseSchedule num_timesteps={num_timesteps} is too small; it must be an "
                "integer >= 2 (the number of training timesteps T, typically 1000)."
            )
        default_start, default_end = _DEFAULT_BETA_RANGE[name]
        beta_start = default_start if beta_start is None else float(beta_start)
        beta_end = default_end if beta_end is None else float(beta_end)
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(
                f"NoiseSchedule beta_start={beta_start} / beta_end={beta_end} are invalid; they "
                "must satisfy 0 < beta_start <= beta_end < 1 (leave them None for the "
                f"defaults of {name!r})."
            )
        self.name = name
        self.num_timesteps = int(num_timesteps)
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.zero_terminal_snr = bool(zero_terminal_snr)

        T = self.num_timesteps
        if name == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif name == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        elif name == "sigmoid":
            u = torch.linspace(*sigmoid_range, T, dtype=torch.float64)
            betas = beta_start + (beta_end - beta_start) * torch.sigmoid(u)
        elif name == "cosine":
            betas = _cosine_betas(T, cosine_s).clamp(max=max_beta)
        else:  # cosine_clipped
            betas = _cosine_betas(T, cosine_s).clamp(beta_start, beta_end)

        abar = torch.cumprod(1 - betas, dim=0)
        if self.zero_terminal_snr:
            abar = _rescale_zero_terminal_snr(abar)
            betas = 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])

        # Non-persistent: the schedule is a pure function of the arguments (kept in the run's
        # config), so checkpoints neither carry it nor break when it is reconfigured.
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", abar.float(), persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", abar.sqrt().float(), persistent=False)
        self.register_buffer(
            "sqrt_one_minus_alphas_cumprod", (1 - abar).sqrt().float(), persistent=False
        )

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, num_timesteps={self.num_timesteps}, "
            f"zero_terminal_snr={self.zero_terminal_snr}"
        )

    @staticmethod
    def _gather(buffer: Tensor, t: Tensor | int, like: Tensor) -> Tensor:
        """buffer[t] reshaped to broadcast against ``like`` ([B] -> [B, 1, ..., 1])."""
        t = torch.as_tensor(t, device=buffer.device).long()
        values = buffer[t].to(like.device)
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample q(x_t | x0) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return (
            self._gather(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t), shape [B] (0 at a zero-SNR terminal step)."""
        abar = self.alphas_cumprod[torch.as_tensor(t, device=self.alphas_cumprod.device).long()]
        return abar / (1 - abar)

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """What the network should output for ``x_t = add_noise(x0, noise, t)``."""
        check_prediction_type(prediction_type)
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "x0":
            return x0
        return (
            self._gather(self.sqrt_alphas_cumprod, t, x0) * noise
            - self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def predict_x0(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, prediction_type: str
    ) -> Tensor:
        """x0 implied by the model output.

        Raises:
            ValueError: for ``"epsilon"`` at a timestep with ``abar_t = 0`` (zero terminal SNR),
                where x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) is undefined. Raising rather
                than clamping abar keeps a silent, huge x0 out of samplers.
        """
        check_prediction_type(prediction_type)
        if prediction_type == "x0":
            return model_output
        sqrt_abar = self._gather(self.sqrt_alphas_cumprod, t, x_t)
        sqrt_one_minus = self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if prediction_type == "v":
            return sqrt_abar * x_t - sqrt_one_minus * model_output
        if self.zero_terminal_snr and bool((sqrt_abar == 0).any()):
            raise ValueError(
                "predict_x0 with prediction_type='epsilon' was asked for x0 at a timestep where "
                "abar_t = 0 (zero_terminal_snr=True): there is no signal left, so x0 cannot be "
                "recovered from a noise prediction. Use prediction_type='v' (recommended with "
                "zero terminal SNR) or 'x0', or a schedule without zero_terminal_snr."
            )
        return (x_t - sqrt_one_minus * model_output) / sqrt_abar

    def predict_eps(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, prediction_type: str
    ) -> Tensor:
        """Noise implied by the model output (always defined: 1 - abar_t >= beta_0 > 0)."""
        check_prediction_type(prediction_type)
        if prediction_type == "epsilon":
            return model_output
        sqrt_abar = self._gather(self.sqrt_alphas_cumprod, t, x_t)
        sqrt_one_minus = self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if prediction_type == "v":
            return sqrt_one_minus * x_t + sqrt_abar * model_output
        return (x_t - sqrt_abar * model_output) / sqrt_one_minus
