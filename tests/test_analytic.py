"""The shared analytic oracles: the exact Gaussian denoiser as a network of either family, the
closed-form ODE end point, the mixture oracle's Bayes rule, and the analytic module."""

from __future__ import annotations

import math

import pytest
import torch

from flowerdiff.diffusion import Diffusion, build_diffusion, build_sampler
from flowerdiff.diffusion.analytic import (
    GaussianMixtureOracle,
    GaussianOracle,
    pixel_frechet_distance,
)
from flowerdiff.tasks.notebook import analytic_module

SHAPE = (3, 4, 4)


def gaussian(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(SHAPE, generator=gen) - 0.5, 0.1 + 0.3 * torch.rand(SHAPE, generator=gen)


def ddpm(prediction: str = "epsilon", sampler: dict | None = None, **schedule: object) -> Diffusion:
    return build_diffusion(
        {"name": "ddpm", "prediction": prediction, "schedule": schedule},
        sampler or {"name": "ddim", "clip_sample": False, "eta": 0.0},
    )


FAMILIES = {
    "ddpm-epsilon": lambda: ddpm("epsilon"),
    "ddpm-v": lambda: ddpm("v"),
    "ddpm-x0": lambda: ddpm("x0"),
    "ddpm-v-zsnr": lambda: ddpm("v", zero_terminal_snr=True),
    "edm": lambda: build_diffusion({"name": "edm"}, {"name": "heun"}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_oracle_network_denoises_to_the_exact_estimate(family: str) -> None:
    """network_for inverts each parametrisation: the oracle plugged in as a network, read back
    through the family's own denoise, is E[x0 | x] of the closed form (float32 tolerance),
    at the noisiest, a middle and the cleanest level the family samples."""
    diffusion = FAMILIES[family]()
    mean, std = gaussian()
    oracle = GaussianOracle(mean, std, diffusion)
    plan = diffusion.plan(diffusion.sampler.with_options(num_inference_steps=10))
    x = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(1))
    for level in (plan.levels[0], plan.levels[5], plan.lowest):
        x_level = diffusion.add_noise(mean + std * x, x.flip(0), level)
        got = diffusion.denoise(oracle, x_level, level)
        var = std.double() ** 2
        a, s = level.alpha, level.sigma
        expected = mean + a * var / (a * a * var + s * s) * (x_level.double() - a * mean)
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_prediction_is_the_regression_optimum(prediction: str) -> None:
    """E[target | x_t] is the least-squares optimum: its residual has mean zero and is
    uncorrelated with x_t (Monte Carlo, 60k seeded samples per pixel; s.e. of either
    statistic <= 1/sqrt(60k) = 0.004, tolerance 0.02 = 5 s.e.)."""
    diffusion = ddpm(prediction)
    mean, std = gaussian()
    model = GaussianOracle(mean, std, diffusion)
    gen = torch.Generator().manual_seed(1)
    n = 60_000
    for t_value in (30, 500, 990):
        t = torch.full((n,), t_value)
        x0 = mean + std * torch.randn(n, *SHAPE, generator=gen)
        noise = torch.randn(n, *SHAPE, generator=gen)
        x_t = diffusion.schedule.add_noise(x0, noise, t)
        target = diffusion.training_target(x0, noise, t)
        prediction_t = model(x_t, t)
        residual = prediction_t - target
        assert residual.mean(0).abs().max() < 0.02
        centred = x_t - x_t.mean(0)
        assert (residual * centred).mean(0).abs().max() < 0.02
        # and no nearby model does better: shrinking or shifting the prediction costs MSE
        best = residual.pow(2).mean()
        assert best < (0.9 * prediction_t - target).pow(2).mean()
        assert best < (prediction_t + 0.05 - target).pow(2).mean()


def test_oracle_epsilon_equals_the_least_squares_fit() -> None:
    """The closed form against data: a least-squares line of eps on x_t, fitted on 200k
    samples of N(0.3, 0.5^2), predicts what the oracle's epsilon network outputs (tolerance
    0.01; the fit's s.e. is ~0.002)."""
    diffusion = ddpm("epsilon")
    oracle = GaussianOracle(torch.full((1, 1, 1), 0.3), torch.full((1, 1, 1), 0.5), diffusion)
    gen = torch.Generator().manual_seed(3)
    n = 200_000
    for t_value in (50, 500, 950):
        t = torch.full((n,), t_value)
        x0 = 0.3 + 0.5 * torch.randn(n, 1, 1, 1, generator=gen)
        eps = torch.randn(n, 1, 1, 1, generator=gen)
        x_t = diffusion.schedule.add_noise(x0, eps, t)
        slope = torch.cov(torch.stack([eps.flatten(), x_t.flatten()]))[0, 1] / x_t.var()
        intercept = eps.mean() - slope * x_t.mean()
        probe = torch.linspace(-2, 2, 5).view(5, 1, 1, 1)
        torch.testing.assert_close(
            oracle(probe, t[:5]), slope * probe + intercept, atol=0.01, rtol=0
        )


@pytest.mark.parametrize("family", ["ddpm-epsilon", "edm"])
def test_ode_solution_is_the_limit_of_fine_sampling(family: str) -> None:
    """ode_solution is where the probability-flow ODE ends: DDIM(eta=0) on the DDPM family
    (10, 100, 1000 trailing steps) and Euler on EDM's grid converge to it at first order.
    Measured RMS (256 images x 48 pixels): DDPM 0.061 / 0.0075 / 0.00089; EDM Euler 0.0171 / 0.00174 at 48 / 480 steps (ratio 9.9 for 10x the
    steps: first order)."""
    diffusion = FAMILIES[family]()
    mean, std = gaussian()
    oracle = GaussianOracle(mean, std)
    noise = torch.randn(256, *SHAPE, generator=torch.Generator().manual_seed(2))

    def error(steps: int, name: str | None = None) -> float:
        if name is not None:
            sampler = build_sampler(
                {"name": name, "num_inference_steps": steps, "clip_sample": False}
            )
        elif family == "edm":
            sampler = build_sampler({"name": "euler", "num_inference_steps": steps})
        else:  # the family's DDIM(eta=0), on trailing spacing so that it starts at t = 999
            sampler = diffusion.sampler.with_options(
                num_inference_steps=steps, timestep_spacing="trailing"
            )
        plan = diffusion.plan(sampler)
        start = plan.levels[0]
        assert family == "edm" or start.t == 999
        exact = oracle.ode_solution(diffusion.initial_state(noise, start), start)
        out = diffusion.sample(oracle.denoiser(), noise, sampler, return_intermediates=True)
        return (out.intermediates[-1] - exact).pow(2).mean().sqrt().item()

    if family == "edm":
        coarse, fine = error(48), error(480)
        assert 8 < coarse / fine < 12 and fine < 4e-3
    else:
        errors = [error(n) for n in (10, 100, 1000)]
        assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3
        # Second order pays: DPM-Solver++(2M) with 50 steps beats DDIM with 100 by > 2x
        # (measured 0.00346 vs 0.0075; seeded, so no sampling noise in the ratio).
        assert error(50, "dpm_solver") < 0.5 * errors[1]


def test_ode_solution_maps_the_marginal_to_the_data() -> None:
    """The end point is affine per pixel: x at level (alpha, sigma) drawn from its marginal
    N(alpha mean, alpha^2 std^2 + sigma^2) lands on N(mean, std^2), exactly in distribution
    (checked with the exact moments of the affine map, no sampling)."""
    mean, std = gaussian()
    oracle = GaussianOracle(mean, std)
    diffusion = ddpm()
    level = diffusion.level(700)
    spread = (
        math.sqrt(level.alpha_sq) * mean.double(),
        (level.alpha_sq * std.double() ** 2 + level.sigma_sq).sqrt(),
    )
    at_mean = oracle.ode_solution(spread[0].float()[None], level)[0]
    one_sd = oracle.ode_solution((spread[0] + spread[1]).float()[None], level)[0]
    torch.testing.assert_close(at_mean, mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(one_sd - at_mean, std, atol=1e-6, rtol=0)


def test_mixture_oracle_is_bayes_rule() -> None:
    """Conditional estimates are each class's Gaussian denoiser; the unconditional one weighs
    them by p(k | x), computed here independently with torch.distributions; the null label
    (= num_classes) is unconditional, as a network trained with label dropout."""
    gen = torch.Generator().manual_seed(4)
    means = torch.rand(3, 1, 2, 2, generator=gen) - 0.5
    stds = 0.2 + 0.2 * torch.rand(3, 1, 2, 2, generator=gen)
    oracle = GaussianMixtureOracle(means, stds)
    x = torch.randn(6, 1, 2, 2, generator=gen).double()
    alpha, sigma = 0.8, 0.6
    labels = torch.tensor([0, 1, 2, 3, 3, 1])
    got = oracle.clean_estimate(x, alpha, sigma, labels)
    per_class = []
    log_p = []
    for k in range(3):
        mean, var = means[k].double(), stds[k].double() ** 2
        spread = (alpha**2 * var + sigma**2).sqrt()
        per_class.append(mean + alpha * var / spread**2 * (x - alpha * mean))
        marginal = torch.distributions.Normal(alpha * mean, spread)
        log_p.append(marginal.log_prob(x).flatten(1).sum(1))
    weights = torch.stack(log_p).softmax(0)  # equal priors
    unconditional = sum(weights[k].view(-1, 1, 1, 1) * per_class[k] for k in range(3))
    for i, label in enumerate(labels.tolist()):
        expected = unconditional[i] if label == 3 else per_class[label][i]
        torch.testing.assert_close(got[i], expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(oracle.clean_estimate(x, alpha, sigma, None), unconditional)


def test_analytic_module_samples_the_fitted_gaussian() -> None:
    """The notebooks' analytic module: the per-pixel fit of the data as a network, seeded.
    Measured pixel Fréchet distance of 512 DPM-Solver++ samples: 1.2e-3 (tolerance 5e-3);
    shifting the samples by 0.3 adds 0.09 (> 0.08)."""
    mean, std = gaussian()
    data = mean + std * torch.randn(4096, *SHAPE, generator=torch.Generator().manual_seed(3))
    module = analytic_module(data, sampler={"name": "dpm_solver", "clip_sample": False})
    torch.testing.assert_close(module.net.mean.float(), data.mean(0))
    out = module.sample(512, seed=5)
    assert out.images.shape == (512, *SHAPE)
    assert torch.equal(out.images, module.sample(512, seed=5).images)
    assert pixel_frechet_distance(out.images, mean, std) < 5e-3
    assert pixel_frechet_distance(out.images + 0.3, mean, std) > 0.08


def test_pixel_frechet_distance_by_hand() -> None:
    samples = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]]).view(3, 1, 1, 2)
    # per-pixel mean (2, 4), std (2, sqrt(13)); against mean (1, 4), std (2, 3)
    expected = ((2 - 1) ** 2 + 0 + 0 + (math.sqrt(13) - 3) ** 2) / 2
    got = pixel_frechet_distance(samples, torch.tensor([1.0, 4.0]), torch.tensor([2.0, 3.0]))
    assert got == pytest.approx(expected, rel=1e-6)


def test_fit_needs_a_batch_and_forward_needs_a_family() -> None:
    with pytest.raises(ValueError, match=r"N >= 2 images"):
        GaussianOracle.fit(torch.zeros(1, *SHAPE))
    oracle = GaussianOracle.fit(torch.randn(4, *SHAPE))
    with pytest.raises(ValueError, match="without a diffusion"):
        oracle(torch.zeros(1, *SHAPE), torch.tensor([3]))
