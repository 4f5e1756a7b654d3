"""EDM (Karras et al. 2022): preconditioning and the Karras grid by hand, the exact Gaussian
oracle through Heun/Euler (accuracy and convergence order), the preconditioned loss in closed
form, training levels, network-evaluation counts, S_churn, validation and a real U-Net."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from torch import Tensor

from flowerdiff.diffusion import (
    EDMDiffusion,
    NoiseLevel,
    Sampler,
    build_diffusion,
    build_sampler,
    make_generators,
    randn_per_image,
)
from flowerdiff.diffusion.analytic import GaussianOracle
from flowerdiff.models import UNet

SHAPE = (1, 4, 4)
MU, S = 0.3, 0.5  # the Gaussian data of the sampling tests: every pixel ~ N(MU, S^2)
SD = 0.5  # sigma_data


def edm(name: str = "heun", **options: object) -> EDMDiffusion:
    diffusion = build_diffusion({"name": "edm"}, {"name": name, **options})
    assert isinstance(diffusion, EDMDiffusion)
    return diffusion


def sampler(name: str, **options: object) -> Sampler:
    return build_sampler({"name": name, **options})


def oracle(diffusion: EDMDiffusion | None = None) -> GaussianOracle:
    return GaussianOracle(torch.full(SHAPE, MU), torch.full(SHAPE, S), diffusion)


def seeded_noise(n: int, seed: int = 0) -> Tensor:
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def final_x(diffusion: EDMDiffusion, noise: Tensor, chosen: Sampler | None = None) -> Tensor:
    """The unclamped end point of sampling the exact oracle (through the preconditioning)."""
    out = diffusion.sample(
        diffusion.denoiser(oracle(diffusion)), noise, chosen, return_intermediates=True
    )
    return out.intermediates[-1]


def karras(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> list:
    """EDM eq. (5), written out independently of the implementation."""
    if n == 1:
        return [sigma_max]
    return [
        (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho)))
        ** rho
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------
# Preconditioning and the grid, by hand


def test_preconditioning_by_hand() -> None:
    """c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2),
    c_noise = ln(s)/4; at s = sd: 1/2, sd/sqrt(2), 1/(sd sqrt(2)), ln(sd)/4."""
    sigmas = [0.002, 0.5, 1.0, 80.0]
    got = edm().precondition(torch.tensor(sigmas, dtype=torch.float64))
    for i, s in enumerate(sigmas):
        total = s * s + SD * SD
        expected = (
            SD * SD / total,
            s * SD / math.sqrt(total),
            1 / math.sqrt(total),
            math.log(s) / 4,
        )
        for value, hand in zip(got, expected, strict=True):
            assert value[i].item() == pytest.approx(hand, rel=1e-12)
    at_sd = tuple(v[1].item() for v in got)
    assert at_sd == pytest.approx(
        (0.5, SD / math.sqrt(2), 1 / (SD * math.sqrt(2)), math.log(SD) / 4)
    )
    # The effective target of F has unit variance at every level for data of std sigma_data:
    # Var[(x0 - c_skip (x0 + s n)) / c_out] = 1.
    for s in sigmas:
        total = s * s + SD * SD
        skip, out = SD * SD / total, s * SD / math.sqrt(total)
        assert ((1 - skip) ** 2 * SD**2 + skip**2 * s**2) / out**2 == pytest.approx(1.0)


def test_denoise_wraps_the_network_in_the_preconditioning() -> None:
    """D(x; s) = c_skip x + c_out F(c_in x; c_noise): the network sees c_in x and c_noise as
    its time input (so every U-Net preset takes it through the same embedding)."""
    diffusion = edm()
    x = seeded_noise(3, 1) * 2.0
    output = seeded_noise(3, 2)
    seen: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def net(x_in: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        seen.append((x_in, c_noise, cond))
        return output

    s = 1.7
    labels = torch.tensor([0, 2, 1])
    got = diffusion.denoise(net, x, EDMDiffusion.level(s), labels)
    total = s * s + SD * SD
    x_in, c_noise, cond = seen[0]
    torch.testing.assert_close(x_in, x / math.sqrt(total))
    torch.testing.assert_close(c_noise, torch.full((3,), math.log(s) / 4))
    assert cond is labels
    expected = SD * SD / total * x + s * SD / math.sqrt(total) * output
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    ("n", "options"),
    [(18, {}), (5, {}), (1, {}), (6, {"sigma_min": 0.01, "sigma_max": 10.0, "rho": 3.0})],
)
def test_karras_grid_by_hand(n: int, options: dict) -> None:
    diffusion = EDMDiffusion(sampler("heun"), **options)
    plan = diffusion.plan(sampler("heun", num_inference_steps=n))
    got = [level.sigma for level in plan.levels]
    assert got == pytest.approx(karras(n, **options), rel=1e-12)
    assert got[0] == pytest.approx(options.get("sigma_max", 80.0))
    assert all(level.alpha == 1.0 and level.t == level.sigma for level in plan.levels)
    assert plan.lowest.sigma == options.get("sigma_min", 0.002)
    assert plan.level_at_ve_sigma(2.5) == EDMDiffusion.level(2.5)
    assert plan.level_at_ve_sigma(0.0).sigma == 0.0
    # The first and last steps of the default 18: 80 -> 57.586 ... 0.00753 -> 0.002 -> 0.
    if n == 18 and not options:
        assert got[1] == pytest.approx(57.586, rel=1e-4)
        assert got[-2] == pytest.approx(0.0075280, rel=1e-4)


def test_progress_inverts_level_at_progress_and_the_start_is_sigma_max() -> None:
    diffusion = edm()
    for p in (0.0, 0.25, 0.5, 1.0):
        level = diffusion.level_at_progress(p)
        assert diffusion.progress(level) == pytest.approx(p, abs=1e-12)
    assert diffusion.level_at_progress(0.0).sigma == pytest.approx(80.0)
    assert diffusion.level_at_progress(1.0).sigma == pytest.approx(0.002)
    assert diffusion.progress(NoiseLevel(0.0, 1.0, 0.0)) == 1.0
    noise = seeded_noise(2)
    first = diffusion.plan(diffusion.sampler).levels[0]
    torch.testing.assert_close(diffusion.initial_state(noise, first), 80.0 * noise)
    assert diffusion.describe(first) == "σ=80" and diffusion.describe(EDMDiffusion.level(0)) == (
        "clean"
    )


# ---------------------------------------------------------------------------------------------
# The exact Gaussian oracle through EDM's samplers


def test_heun_18_steps_reproduces_the_data_mean_and_std() -> None:
    """EDM's default, Heun with 18 steps (35 evaluations), on N(0.3, 0.5^2) with 4096 images
    of 1x4x4.

    Measured (seed 0 / worst of seeds 0-9): mean error -0.0039 / 0.0050, std error +0.0270 /
    +0.0294. The std error is discretisation error, not noise: it shrinks at second order
    (RMS against the exact ODE end point 0.0277 at 18 steps, 0.0049 at 40, 0.0007 at 100;
    std error +0.0042 at 40 steps). The mean is exact up to sampling error (s.e.
    0.5 / sqrt(65536) = 0.002) because the ODE map is affine per pixel and EDM starts at
    sigma = 80, where the prior's missing mean 0.3 is negligible. Tolerances: mean 0.012
    (6 s.e.), std 0.04 (the measured bias + 0.01, 7 s.e. of the std)."""
    diffusion = edm()
    assert diffusion.sampler.num_inference_steps == 18
    x = final_x(diffusion, seeded_noise(4096))
    assert abs(x.mean().item() - MU) < 0.012
    assert abs(x.std().item() - S) < 0.04
    fine = final_x(diffusion, seeded_noise(4096), sampler("heun", num_inference_steps=100))
    assert abs(fine.std().item() - S) < 0.006  # measured +0.0001 (seeds 1, 2: +0.0024, -0.0014)


def test_euler_converges_at_first_order_and_heun_at_second() -> None:
    """Fit the slope of log RMS error against log steps (12, 24, 48, 96), the error measured
    per sample against GaussianOracle.ode_solution from sigma_max.

    Measured slopes (seeds 0-2, identical to 3 decimals): Euler -0.984, Heun -2.154 (the
    first of Heun's steps from sigma = 80 is still large at 12 steps, hence a little steeper
    than 2), DPM-Solver++(2M) -2.123. Bounds: first order (-1.15, -0.85), second order
    (-2.4, -1.8)."""
    diffusion = edm()
    noise = seeded_noise(256)
    steps = [12, 24, 48, 96]

    def slope(name: str) -> tuple[float, list[float]]:
        errors = []
        for n in steps:
            chosen = sampler(name, num_inference_steps=n, clip_sample=False)
            start = diffusion.plan(chosen).levels[0]
            exact = oracle().ode_solution(diffusion.initial_state(noise, start), start)
            x = final_x(diffusion, noise, chosen)
            errors.append((x - exact).pow(2).mean().sqrt().item())
        return float(np.polyfit(np.log(steps), np.log(errors), 1)[0]), errors

    euler, euler_errors = slope("euler")
    heun, heun_errors = slope("heun")
    dpm, _ = slope("dpm_solver")
    assert -1.15 < euler < -0.85, euler_errors
    assert -2.4 < heun < -1.8, heun_errors
    assert -2.4 < dpm < -1.8
    assert heun_errors[-1] < 0.1 * euler_errors[-1]


def test_preconditioned_loss_of_the_exact_denoiser_is_its_closed_form() -> None:
    """For Gaussian data the optimal denoiser's error D - x0 is N(0, posterior variance), so
    at a fixed sigma the expected loss is, per pixel,
    weight(s) * Var[x0 | x] = (s^2 + sd^2) / (s sd)^2 * std^2 s^2 / (std^2 + s^2),
    averaged over the pixels (std varies 0.2..0.8 here, so it is not the trivial 1 of
    std = sd). A denoiser whose mean is off by delta pays weight * (delta s^2/(std^2+s^2))^2
    more.

    Monte Carlo: 16384 images x 16 pixels per sigma; the loss is a mean of weighted chi^2
    terms with relative s.e. ~sqrt(2 / 262144) = 0.0028 (measured spread over seeds 0.0034,
    worst of 10 seeds 0.8%). Tolerance 1.5% relative (~4.5 s.e.); a denoiser shifted by
    0.15 costs 4.8-7.9% more at sigma >= 0.3, so it cannot pass as the exact one."""
    diffusion = edm()
    mean = torch.linspace(-0.4, 0.4, 16).view(SHAPE)
    std = torch.linspace(0.2, 0.8, 16).view(SHAPE)
    exact = GaussianOracle(mean, std, diffusion)
    delta = 0.15
    shifted = GaussianOracle(mean + delta, std, diffusion)
    n = 16384
    var = std.double() ** 2
    for i, s in enumerate([0.002, 0.05, 0.3, 1.0, 5.0, 80.0]):
        gen = torch.Generator().manual_seed(i)
        x0 = mean + std * torch.randn(n, *SHAPE, generator=gen)
        noise = torch.randn(n, *SHAPE, generator=gen)
        levels = torch.full((n,), s)
        weight = (s * s + SD * SD) / (s * SD) ** 2
        closed = (weight * var * s * s / (var + s * s)).mean().item()
        loss = diffusion.loss(exact, x0, noise=noise, levels=levels).item()
        assert loss == pytest.approx(closed, rel=0.015), s
        extra = (weight * (delta * s * s / (var + s * s)) ** 2).mean().item()
        worse = diffusion.loss(shifted, x0, noise=noise, levels=levels).item()
        assert worse == pytest.approx(closed + extra, rel=0.015), s
        if s >= 0.3:
            assert extra > 0.04 * closed


def test_training_levels_are_log_normal() -> None:
    """Without levels, ln(sigma) ~ N(P_mean, P_std^2) = N(-1.2, 1.2^2): read back from the
    c_noise = ln(sigma) / 4 the network receives (20k draws: s.e. of the mean 0.0085, of the
    std 0.006; tolerance 0.04)."""
    seen: list[Tensor] = []

    def net(x: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        seen.append(c_noise)
        return torch.zeros_like(x)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        edm().loss(net, torch.zeros(20_000, 1, 1, 1))
    log_sigma = 4 * seen[0].double()
    assert abs(log_sigma.mean().item() + 1.2) < 0.04
    assert abs(log_sigma.std().item() - 1.2) < 0.04
    shifted = EDMDiffusion(sampler("heun"), p_mean=0.5, p_std=0.3)
    shifted.loss(net, torch.zeros(20_000, 1, 1, 1))
    assert abs(4 * seen[1].double().mean().item() - 0.5) < 0.04


def test_validation_levels_are_the_deciles_of_the_training_distribution() -> None:
    diffusion = edm()
    deciles = [math.exp(-1.2 + 1.2 * NormalDist().inv_cdf((k + 0.5) / 10)) for k in range(10)]
    got = diffusion.validation_levels(torch.tensor([0, 3, 9, 13]))
    assert got.tolist() == pytest.approx([deciles[0], deciles[3], deciles[9], deciles[3]])
    assert deciles[0] < math.exp(-1.2) < deciles[9]


# ---------------------------------------------------------------------------------------------
# Network evaluations and stochasticity


@pytest.mark.parametrize("n", [1, 2, 5, 18])
def test_heun_costs_2n_minus_1_evaluations(n: int) -> None:
    """Heun: an Euler step plus a correction per step, except the last one (to sigma = 0,
    where the correction would divide by 0); Euler and DPM-Solver++: one per step."""
    diffusion = edm()
    calls = []
    denoise = diffusion.denoiser(oracle(diffusion))

    def counting(x: Tensor, level: NoiseLevel) -> Tensor:
        calls.append(level.sigma)
        return denoise(x, level)

    expected = {"heun": 2 * n - 1, "euler": n, "dpm_solver": n}
    for name, count in expected.items():
        calls.clear()
        diffusion.sample(counting, seeded_noise(2), sampler(name, num_inference_steps=n))
        assert len(calls) == count, name
    calls.clear()
    churn = sampler("heun", num_inference_steps=n, s_churn=40.0)
    diffusion.sample(counting, seeded_noise(2), churn, generators=make_generators(0, 0, 2))
    assert len(calls) == 2 * n - 1
    # With churn the first evaluation is at the raised level s (1 + gamma), gamma capped at
    # sqrt(2) - 1 (s_churn / n >= 0.41 here).
    gamma = min(40.0 / n, math.sqrt(2) - 1)
    assert calls[0] == pytest.approx(80.0 * (1 + gamma))


def test_s_churn_changes_results_and_stays_seeded() -> None:
    diffusion = edm()
    net = oracle(diffusion)
    noise = seeded_noise(6, 3)

    def images(chosen: Sampler, seed: int | None, start: int = 0, count: int = 6) -> Tensor:
        gens = make_generators(seed, start, count) if seed is not None else None
        out = diffusion.sample(diffusion.denoiser(net), noise[start : start + count], chosen, gens)
        return out.images

    plain = sampler("heun", num_inference_steps=10)
    churn = sampler("heun", num_inference_steps=10, s_churn=20.0, s_min=0.05, s_max=50.0)
    deterministic = images(plain, 1)
    assert torch.equal(deterministic, images(plain, 2))  # no churn: the generators are unused
    a, b = images(churn, 1), images(churn, 2)
    assert not torch.allclose(a, deterministic, atol=1e-3)
    assert not torch.allclose(a, b, atol=1e-3)
    assert torch.equal(a, images(churn, 1))
    # Per image, independent of the batch split (generators by global index).
    split = torch.cat([images(churn, 1, 0, 2), images(churn, 1, 2, 4)])
    torch.testing.assert_close(split, a, atol=1e-6, rtol=0)
    # Outside [s_min, s_max] nothing is added: a range above sigma_max is the plain ODE.
    unused = sampler("heun", num_inference_steps=10, s_churn=20.0, s_min=100.0, s_max=200.0)
    torch.testing.assert_close(images(unused, 1), deterministic, atol=0, rtol=0)


def test_heun_with_churn_still_samples_the_data() -> None:
    """EDM's stochastic sampler (S_churn 40, S_min 0.05, S_max 50, S_noise 1.003) at 40
    steps. Measured over seeds 0-9 (4096 images): mean error worst 0.0051, std error +0.0204
    on average, worst +0.0221 (the raised levels lengthen every step; 18 steps give +0.065,
    which is why EDM uses more steps with churn). Tolerances: mean 0.012, std 0.035."""
    diffusion = edm()
    chosen = sampler(
        "heun", num_inference_steps=40, s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        x = final_x(diffusion, seeded_noise(4096), chosen)
    assert abs(x.mean().item() - MU) < 0.012
    assert abs(x.std().item() - S) < 0.035


# ---------------------------------------------------------------------------------------------
# Configuration


def test_defaults_and_config_round_trip() -> None:
    diffusion = edm()
    config = diffusion.to_config()
    assert config == {
        "name": "edm",
        "sigma_data": 0.5,
        "p_mean": -1.2,
        "p_std": 1.2,
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "rho": 7.0,
        "learned_weighting": False,
        "sampler": diffusion.sampler.to_config(),
    }
    assert config["sampler"]["name"] == "heun"
    rebuilt = build_diffusion(config)
    assert isinstance(rebuilt, EDMDiffusion) and rebuilt.to_config() == config


def test_config_validation_messages() -> None:
    heun = sampler("heun")
    cases = [
        ({"sigma_data": 0}, r"`diffusion.sigma_data=0` must be a number > 0"),
        ({"p_std": -1.0}, r"`diffusion.p_std=-1.0` must be a number > 0"),
        ({"rho": True}, r"`diffusion.rho=True` must be a number > 0"),
        ({"p_mean": "low"}, r"`diffusion.p_mean='low'` must be a number"),
        ({"sigma_min": 1.0, "sigma_max": 0.5}, r"sigma_min=1.0`.*0 < sigma_min < sigma_max"),
        ({"sigma_min": 0.0}, r"`diffusion.sigma_min=0.0`"),
        ({"sigma_max": math.inf}, r"`diffusion.sigma_max=inf`"),
        ({"learned_weighting": "yes"}, r"`diffusion.learned_weighting='yes'` must be true or"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            EDMDiffusion(heun, **options)
    with pytest.raises(ValueError, match=r"timestep_spacing='trailing'` is a DDPM-family.*=null"):
        edm().plan(sampler("euler", timestep_spacing="trailing"))
    # "karras" is accepted as EDM's own spacing.
    assert len(edm().plan(sampler("euler", timestep_spacing="karras")).levels) == 50


def test_a_unet_preset_trains_and_samples_under_edm() -> None:
    """The network receives c_noise (negative for sigma < 1) through its ordinary time
    embedding: the loss is finite and every parameter gets a finite gradient; sampling works
    on a conditional preset with labels."""
    torch.manual_seed(0)
    net = UNet(hidden_dims=[16, 32, 32, 64], attn_heads=2, attn_head_dim=8, num_classes=3)
    diffusion = edm()
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = diffusion.loss(net, x0, torch.tensor([0, 3]), levels=torch.tensor([0.01, 20.0]))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, p in net.named_parameters():
        if name == "class_embedding.weight":  # only the rows of labels 0 and 3 are used
            assert p.grad is not None and bool(p.grad[[1, 2]].eq(0).all()), name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        gens = make_generators(0, 0, 2)
        noise = randn_per_image((2, 3, 16, 16), gens, "cpu")
        out = diffusion.sample(
            diffusion.denoiser(net, torch.tensor([1, 2])),
            noise,
            sampler("heun", num_inference_steps=3),
            gens,
        )
    assert out.images.shape == (2, 3, 16, 16) and torch.isfinite(out.images).all()


# -- EDM2's learned loss weighting -----------------------------------------------------------
def test_learned_weighting_divides_by_the_learned_variance_and_adds_its_log() -> None:
    """Training loss: weighted error / exp(u) + u per image. u starts at 0 (EDM's own loss);
    validation (eval mode) keeps the fixed weighting, so runs stay comparable."""
    plain = EDMDiffusion(sampler("heun"))
    learned = EDMDiffusion(sampler("heun"), learned_weighting=True)
    exact = oracle(plain)
    gen = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(64, *SHAPE, generator=gen)
    noise = torch.randn(64, *SHAPE, generator=gen)
    levels = torch.tensor([0.05, 1.0, 5.0, 0.3]).repeat(16)
    reference = plain.loss(exact, x0, noise=noise, levels=levels)
    assert torch.equal(learned.loss(exact, x0, noise=noise, levels=levels), reference)
    with torch.no_grad():
        learned.logvar.linear.bias.fill_(math.log(2.0))
    halved = learned.loss(exact, x0, noise=noise, levels=levels)
    torch.testing.assert_close(halved, reference / 2 + math.log(2.0))
    learned.eval()
    assert torch.equal(learned.loss(exact, x0, noise=noise, levels=levels), reference)
    assert sum(p.numel() for p in learned.parameters()) == 129
    assert not list(plain.parameters())


def test_the_learned_variance_is_each_levels_expected_loss() -> None:
    """``e / exp(u) + u`` is smallest at ``u = ln E[e]``: trained alone, the head learns each
    level's expected weighted loss. The denoiser is the exact one of Gaussian data with its
    mean shifted by 1, whose expected loss has a closed form (see
    test_preconditioned_loss_of_the_exact_denoiser_is_its_closed_form) of 1.19, 2.91 and 5.08
    at the three levels: a head that learned one shared value would miss by 2x. 500 Adam steps
    of 255 images with a cosine LR reach within 1.5%; tolerance 5%."""
    torch.manual_seed(0)
    mean = torch.linspace(-0.4, 0.4, 16).view(SHAPE)
    std = torch.linspace(0.2, 0.8, 16).view(SHAPE)
    learned = EDMDiffusion(sampler("heun"), learned_weighting=True)
    shifted = GaussianOracle(mean + 1.0, std, learned)
    optimizer = torch.optim.Adam(learned.parameters(), lr=0.03)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 500)
    sigmas = torch.tensor([0.05, 0.3, 5.0])
    for step in range(500):
        gen = torch.Generator().manual_seed(step)
        x0 = mean + std * torch.randn(255, *SHAPE, generator=gen)
        noise = torch.randn(255, *SHAPE, generator=gen)
        optimizer.zero_grad()
        learned.loss(shifted, x0, noise=noise, levels=sigmas.repeat(85)).backward()
        optimizer.step()
        schedule.step()
    var = std.double().flatten() ** 2
    with torch.no_grad():
        learned_loss = learned.logvar(sigmas.log() / 4).exp()
    for s, value in zip(sigmas.tolist(), learned_loss.tolist(), strict=True):
        weight = (s * s + SD * SD) / (s * SD) ** 2
        closed = weight * var * s * s / (var + s * s) + weight * (s * s / (var + s * s)) ** 2
        assert value == pytest.approx(closed.mean().item(), rel=0.05), s
