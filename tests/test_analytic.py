"""The exact Gaussian denoiser: optimal predictions, the closed-form ODE end point, and the module."""

from __future__ import annotations

import pytest
import torch

from flowerdiff.analytic import GaussianDenoiser, analytic_module, pixel_frechet_distance
from flowerdiff.diffusion import DDIMSampler, DPMSolverSampler, NoiseSchedule

SHAPE = (3, 4, 4)


def gaussian(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(SHAPE, generator=gen) - 0.5, 0.1 + 0.3 * torch.rand(SHAPE, generator=gen)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_prediction_is_the_regression_optimum(prediction_type: str) -> None:
    """E[target | x_t] is the least-squares optimum: its residual has mean zero and is
    uncorrelated with x_t (Monte Carlo, 60k seeded samples per pixel)."""
    schedule = NoiseSchedule()
    mean, std = gaussian()
    model = GaussianDenoiser(mean, std, schedule, prediction_type)
    gen = torch.Generator().manual_seed(1)
    n = 60_000
    for t_value in (30, 500, 990):
        t = torch.full((n,), t_value)
        x0 = mean + std * torch.randn(n, *SHAPE, generator=gen)
        noise = torch.randn(n, *SHAPE, generator=gen)
        x_t = schedule.add_noise(x0, noise, t)
        residual = model(x_t, t) - schedule.training_target(x0, noise, t, prediction_type)
        assert residual.mean(0).abs().max() < 0.02
        centred = x_t - x_t.mean(0)
        assert (residual * centred).mean(0).abs().max() < 0.02
        # and no nearby model does better: shrinking or shifting the prediction costs MSE
        target = schedule.training_target(x0, noise, t, prediction_type)
        best = residual.pow(2).mean()
        assert best < (0.9 * model(x_t, t) - target).pow(2).mean()
        assert best < (model(x_t, t) + 0.05 - target).pow(2).mean()


def test_deterministic_samplers_converge_to_the_ode_solution() -> None:
    schedule = NoiseSchedule()
    mean, std = gaussian()
    model = GaussianDenoiser(mean, std, schedule)
    noise = torch.randn(256, *SHAPE, generator=torch.Generator().manual_seed(2))
    exact = model.ode_solution(noise, schedule.num_timesteps - 1)

    def error(sampler: DDIMSampler | DPMSolverSampler) -> float:
        out = sampler.sample(model, schedule, noise)
        assert out.timesteps[0] == schedule.num_timesteps - 1
        return (out.images - exact.clamp(-1, 1)).pow(2).mean().sqrt().item()

    ddim = [error(DDIMSampler(n, "trailing", clip_sample=False, eta=0.0)) for n in (10, 100, 1000)]
    assert ddim[0] > ddim[1] > ddim[2] and ddim[2] < 2e-3
    assert error(DPMSolverSampler(50, clip_sample=False)) < 0.5 * ddim[1]


def test_analytic_module_samples_the_fitted_gaussian() -> None:
    mean, std = gaussian()
    data = mean + std * torch.randn(4096, *SHAPE, generator=torch.Generator().manual_seed(3))
    module = analytic_module(data, sampler=DPMSolverSampler(20, clip_sample=False))
    torch.testing.assert_close(module.net.mean.float(), data.mean(0))
    out = module.sample(512, seed=5)
    assert out.images.shape == (512, *SHAPE)
    assert torch.equal(out.images, module.sample(512, seed=5).images)
    assert pixel_frechet_distance(out.images, mean, std) < 5e-3
    assert pixel_frechet_distance(out.images + 0.3, mean, std) > 0.08


def test_fit_needs_a_batch() -> None:
    with pytest.raises(ValueError, match=r"N >= 2 images"):
        GaussianDenoiser.fit(torch.zeros(1, *SHAPE), NoiseSchedule())
