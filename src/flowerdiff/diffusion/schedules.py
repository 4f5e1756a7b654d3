"""Discrete noise schedules: betas -> alpha-bar buffers, the forward process and the SNR.

Each schedule is a function ``(num_timesteps, **its parameters) -> betas`` (float64) registered
in :data:`SCHEDULES`; ``schedule.name`` in the config picks one. Notation (DDPM):
``abar_t = prod_{s<=t} (1 - beta_s)`` and ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from flowerdiff.registry import Registry, check_keys

SCHEDULES: Registry[Tensor] = Registry("noise schedule", "diffusion.schedule")
MAX_TIMESTEPS = 100_000  # far beyond any published schedule; bounds what a stored config costs


def _check_beta_range(beta_start: float, beta_end: float) -> None:
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"`diffusion.schedule.beta_start={beta_start}` / `beta_end={beta_end}` are invalid; "
            "they must satisfy 0 < beta_start <= beta_end < 1."
        )


def _cosine_betas(num_timesteps: int, s: float) -> Tensor:
    """Nichol & Dhariwal (2021) betas, 1 - abar(t+1)/abar(t), before any clipping."""
    if isinstance(s, bool) or not isinstance(s, int | float) or not 0 <= s < 1:
        raise ValueError(f"`diffusion.schedule.cosine_s={s!r}` must be in [0, 1) (0.008 usual).")
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return 1 - abar[1:] / abar[:-1]


@SCHEDULES.register("cosine_clipped")
def cosine_clipped_betas(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, cosine_s: float = 0.008
) -> Tensor:
    """The book's schedule: cosine betas clipped to [beta_start, beta_end] (abar_999 = 0.0032)."""
    _check_beta_range(beta_start, beta_end)
    return _cosine_betas(num_timesteps, cosine_s).clamp(beta_start, beta_end)


@SCHEDULES.register("linear")
def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM (Ho et al. 2020): betas linear from beta_start to beta_end."""
    _check_beta_range(beta_start, beta_end)
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


@SCHEDULES.register("cosine")
def cosine_betas(num_timesteps: int, cosine_s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal (2021): cosine abar, betas capped at max_beta."""
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"`diffusion.schedule.max_beta={max_beta}` must be in (0, 1).")
    return _cosine_betas(num_timesteps, cosine_s).clamp(max=max_beta)


@SCHEDULES.register("scaled_linear")
def scaled_linear_betas(
    num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """Stable Diffusion: linear in sqrt(beta)."""
    _check_beta_range(beta_start, beta_end)
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


@SCHEDULES.register("sigmoid")
def sigmoid_betas(
    num_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    sigmoid_range: tuple[float, float] = (-3.0, 3.0),
) -> Tensor:
    """GeoDiff: beta_start + (beta_end - beta_start) * sigmoid(u), u linear over sigmoid_range."""
    _check_beta_range(beta_start, beta_end)
    low, high = (float(v) for v in sigmoid_range)
    u = torch.linspace(low, high, num_timesteps, dtype=torch.float64)
    return beta_start + (beta_end - beta_start) * torch.sigmoid(u)


def _rescale_zero_terminal_snr(abar: Tensor) -> Tensor:
    """Lin et al. (2023) Algorithm 1: shift/scale sqrt(abar) so the last is 0, the first unchanged."""
    sqrt_abar = abar.sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    return sqrt_abar**2


class NoiseSchedule(nn.Module):
    """Betas and alpha-bars of a discrete diffusion process.

    Args:
        name: a registered schedule (:data:`SCHEDULES`); ``cosine_clipped`` is the book's.
        num_timesteps: T, the number of training timesteps.
        zero_terminal_snr: rescale so that ``abar_{T-1} = 0`` (Lin et al. 2023). The last step
            then holds no signal: pair it with v-prediction and trailing sampler spacing.
        **params: the schedule function's own parameters (e.g. ``beta_start``, ``beta_end``).

    The schedule is computed in float64 and stored as float32 non-persistent buffers: they
    follow ``.to()`` but are not in the state dict (the config rebuilds them).
    """

    betas: Tensor
    alphas_cumprod: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor

    def __init__(
        self,
        name: str = "cosine_clipped",
        num_timesteps: int = 1000,
        zero_terminal_snr: bool = False,
        **params: Any,
    ) -> None:
        super().__init__()
        if (
            isinstance(num_timesteps, bool)
            or not isinstance(num_timesteps, int)
            or not 2 <= num_timesteps <= MAX_TIMESTEPS
        ):
            raise ValueError(
                f"`diffusion.schedule.num_timesteps={num_timesteps!r}` is invalid: it is the "
                f"number of training timesteps T, an integer from 2 to {MAX_TIMESTEPS} (1000 "
                "in the book)."
            )
        # Keys are checked here rather than in SCHEDULES.build, so that the message lists
        # num_timesteps and zero_terminal_snr among the valid keys of `diffusion.schedule`.
        check_keys(
            SCHEDULES.get(name),
            params,
            SCHEDULES.config_key,
            exclude={"num_timesteps": num_timesteps},
            also_valid=("num_timesteps", "zero_terminal_snr"),
        )
        betas = SCHEDULES.build({"name": name, **params}, num_timesteps=num_timesteps)
        self.name = name
        self.num_timesteps = num_timesteps
        self.zero_terminal_snr = bool(zero_terminal_snr)
        # Every parameter with its value, defaults included: a stored config keeps its meaning
        # even if a default changes later.
        defaults = {
            key: p.default
            for key, p in inspect.signature(SCHEDULES.get(name)).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        self.params = {**defaults, **params}
        abar = torch.cumprod(1 - betas, dim=0)
        if self.zero_terminal_snr:
            abar = _rescale_zero_terminal_snr(abar)
            betas = 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", abar.float(), persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", abar.sqrt().float(), persistent=False)
        self.register_buffer(
            "sqrt_one_minus_alphas_cumprod", (1 - abar).sqrt().float(), persistent=False
        )

    def to_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_timesteps": self.num_timesteps,
            "zero_terminal_snr": self.zero_terminal_snr,
            **self.params,
        }

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, num_timesteps={self.num_timesteps}, "
            f"zero_terminal_snr={self.zero_terminal_snr}"
        )

    @staticmethod
    def gather(buffer: Tensor, t: Tensor | int, like: Tensor) -> Tensor:
        """buffer[t] reshaped to broadcast against ``like`` ([B] -> [B, 1, ..., 1])."""
        t = torch.as_tensor(t, device=buffer.device).long()
        values = buffer[t].to(like.device)
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample q(x_t | x0) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return (
            self.gather(self.sqrt_alphas_cumprod, t, x0) * x0
            + self.gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t), shape [B] (0 at a zero-SNR terminal step)."""
        abar = self.alphas_cumprod[torch.as_tensor(t, device=self.alphas_cumprod.device).long()]
        return abar / (1 - abar)
