"""The DDPM family's tables: schedule shapes, zero-terminal-SNR rescale, add_noise, the
parametrisation conversions (now on DDPMDiffusion), levels between timesteps, validation."""

from __future__ import annotations

import math

import pytest
import torch

from flowerdiff.diffusion import (
    PREDICTION_TYPES,
    SCHEDULES,
    DDPMDiffusion,
    NoiseSchedule,
    build_diffusion,
    build_sampler,
)

T = 1000
ZT_OPTIONS = [False, True]
SCHEDULE_NAMES = SCHEDULES.names()


def ddpm(prediction: str = "epsilon", **schedule: object) -> DDPMDiffusion:
    return DDPMDiffusion(build_sampler({"name": "ddim"}), schedule=schedule, prediction=prediction)


def _schedules() -> list[tuple[str, bool]]:
    return [(name, zt) for name in SCHEDULE_NAMES for zt in ZT_OPTIONS]


def test_registry_holds_the_five_schedules() -> None:
    assert SCHEDULE_NAMES == ["cosine", "cosine_clipped", "linear", "scaled_linear", "sigmoid"]


@pytest.mark.parametrize(("name", "zero_terminal_snr"), _schedules())
def test_conversions_round_trip(name: str, zero_terminal_snr: bool) -> None:
    """For every prediction type, target -> x0 recovers x0, and eps = (x_t - alpha x0) / sigma
    recovers the noise.

    Float64 inputs (coefficients are the float32 tables, promoted), so even t = T-1 of the
    plain cosine schedule (sqrt(abar) ~ 5e-5) is well conditioned; tolerance 1e-5. Epsilon with
    zero terminal SNR cannot be built (tested below)."""
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 250, 500, 750, 998, T - 1])
    x0 = torch.rand(len(t), 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(len(t), 3, 4, 4, generator=gen, dtype=torch.float64)
    for prediction in PREDICTION_TYPES:
        if zero_terminal_snr and prediction == "epsilon":
            continue
        diffusion = ddpm(prediction, name=name, zero_terminal_snr=zero_terminal_snr)
        x_t = diffusion.schedule.add_noise(x0, eps, t)
        target = diffusion.training_target(x0, eps, t)
        for i, t_value in enumerate(t.tolist()):
            level = diffusion.level(t_value)
            x0_hat = diffusion.x0_from_output(target[i], x_t[i], level)
            torch.testing.assert_close(x0_hat, x0[i], atol=1e-5, rtol=0)
            if level.sigma > 0:
                eps_hat = (x_t[i] - level.alpha * x0_hat) / level.sigma
                torch.testing.assert_close(eps_hat, eps[i], atol=1e-5, rtol=0)


def test_training_targets_match_their_definitions() -> None:
    t = torch.tensor([10, 600])
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 1, 2, 2, generator=gen), torch.randn(2, 1, 2, 2, generator=gen)
    abar = NoiseSchedule().alphas_cumprod[t].view(-1, 1, 1, 1)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    torch.testing.assert_close(ddpm("v").training_target(x0, eps, t), v)
    torch.testing.assert_close(ddpm("epsilon").training_target(x0, eps, t), eps)
    torch.testing.assert_close(ddpm("x0").training_target(x0, eps, t), x0)


def test_level_holds_the_float32_tables() -> None:
    """The samplers step with exactly the float32 table values the book's code read."""
    diffusion = ddpm()
    schedule = diffusion.schedule
    for t in (0, 480, 999):
        level = diffusion.level(t)
        assert level.t == t
        assert level.alpha == schedule.sqrt_alphas_cumprod[t].item()
        assert level.sigma == schedule.sqrt_one_minus_alphas_cumprod[t].item()
        assert level.alpha_sq == schedule.alphas_cumprod[t].item()
        assert level.sigma_sq == 1.0 - schedule.alphas_cumprod[t].item()


@pytest.mark.parametrize(("name", "zero_terminal_snr"), _schedules())
def test_alphas_cumprod_monotone_in_unit_interval(name: str, zero_terminal_snr: bool) -> None:
    schedule = NoiseSchedule(name, zero_terminal_snr=zero_terminal_snr)
    assert schedule.betas.dtype == schedule.alphas_cumprod.dtype == torch.float32
    abar = schedule.alphas_cumprod.double()
    assert schedule.num_timesteps == T and abar.shape == (T,)
    assert bool((abar[1:] < abar[:-1]).all()), "abar must be strictly decreasing"
    assert abar[0] < 1.0
    assert abar[0] > 0.99  # first step adds little noise (beta_0 <= 0.0085 for all schedules)
    if zero_terminal_snr:
        assert abar[-1] == 0.0
    else:
        assert abar[-1] > 0.0
    betas = schedule.betas
    assert bool((betas > 0).all()) and bool((betas <= 1).all())
    snr = schedule.snr(torch.arange(T))
    assert bool((snr[1:] < snr[:-1]).all())


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_zero_terminal_snr_rescale(name: str) -> None:
    """Lin et al.: last abar becomes exactly 0, first abar unchanged, SNR(T-1) = 0."""
    plain = NoiseSchedule(name)
    rescaled = NoiseSchedule(name, zero_terminal_snr=True)
    assert rescaled.alphas_cumprod[-1].item() == 0.0
    assert rescaled.betas[-1].item() == pytest.approx(1.0)
    torch.testing.assert_close(
        rescaled.alphas_cumprod[0], plain.alphas_cumprod[0], rtol=1e-6, atol=0
    )
    assert rescaled.snr(torch.tensor([T - 1])).item() == 0.0
    # Consistency: betas reproduce the stored alpha-bars.
    abar_from_betas = torch.cumprod(1 - rescaled.betas.double(), 0)
    torch.testing.assert_close(abar_from_betas, rescaled.alphas_cumprod.double(), atol=1e-6, rtol=0)


def test_book_schedule_terminal_alpha_bar() -> None:
    """cosine s=0.008, betas clipped to [1e-4, 0.02]: abar_999 = 0.0031948 ≈ 0.0032 (abs tol 1e-5)."""
    schedule = NoiseSchedule()
    assert schedule.name == "cosine_clipped"
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(0.0032, abs=1e-5)
    assert schedule.betas.min().item() == pytest.approx(1e-4)
    assert schedule.betas.max().item() == pytest.approx(0.02)


def test_schedule_shapes() -> None:
    linear = NoiseSchedule("linear")
    assert linear.betas[0].item() == pytest.approx(1e-4)
    assert linear.betas[-1].item() == pytest.approx(0.02)
    scaled = NoiseSchedule("scaled_linear")
    assert (scaled.params["beta_start"], scaled.params["beta_end"]) == (0.00085, 0.012)
    root = scaled.betas.double().sqrt()
    torch.testing.assert_close(root.diff(), root.diff()[:1].expand(T - 1), atol=1e-7, rtol=0)
    assert scaled.betas[-1].item() == pytest.approx(0.012)
    assert NoiseSchedule("scaled_linear", beta_start=1e-4).betas[0].item() == pytest.approx(1e-4)
    cosine = NoiseSchedule("cosine")
    assert cosine.betas[-1].item() == pytest.approx(0.999)
    assert cosine.betas[0].item() == pytest.approx(4.13e-5, rel=1e-2)  # unclipped N&D start
    sigmoid = NoiseSchedule("sigmoid")
    lo = 1e-4 + (0.02 - 1e-4) / (1 + math.exp(3.0))
    assert sigmoid.betas[0].item() == pytest.approx(lo)
    assert sigmoid.betas[-1].item() == pytest.approx(0.02 - (lo - 1e-4))


def test_to_config_keeps_every_parameter_and_rebuilds() -> None:
    """Defaults are written out, so a stored config keeps its meaning if a default changes."""
    schedule = NoiseSchedule("sigmoid", num_timesteps=500, beta_end=0.03)
    config = schedule.to_config()
    assert config == {
        "name": "sigmoid",
        "num_timesteps": 500,
        "zero_terminal_snr": False,
        "beta_start": 1e-4,
        "beta_end": 0.03,
        "sigmoid_range": (-3.0, 3.0),
    }
    assert torch.equal(NoiseSchedule(**config).betas, schedule.betas)


def test_add_noise_statistics() -> None:
    """x0 = const: x_t has mean sqrt(abar) x0 and std sqrt(1 - abar) (n = 200k per t)."""
    schedule = NoiseSchedule()
    gen = torch.Generator().manual_seed(1)
    x0_value, n = 0.7, 200_000
    for t_value in (0, 300, 700, T - 1):
        t = torch.full((n,), t_value)
        x_t = schedule.add_noise(torch.full((n, 1), x0_value), torch.randn(n, 1, generator=gen), t)
        abar = schedule.alphas_cumprod[t_value].item()
        # 5 standard errors: std(mean) = sqrt((1-abar)/n) <= 0.0023.
        assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * x0_value, abs=0.0115)
        assert x_t.std().item() == pytest.approx(math.sqrt(1 - abar), rel=0.01)


def test_family_add_noise_equals_the_schedule_s() -> None:
    diffusion = ddpm()
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 1, 4, 4, generator=gen), torch.randn(3, 1, 4, 4, generator=gen)
    by_schedule = diffusion.schedule.add_noise(x0, noise, torch.full((3,), 640))
    torch.testing.assert_close(diffusion.add_noise(x0, noise, diffusion.level(640)), by_schedule)


def test_gather_broadcasts_int_and_vector_timesteps() -> None:
    schedule = NoiseSchedule()
    x0, eps = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    by_int = schedule.add_noise(x0, eps, 500)
    by_vec = schedule.add_noise(x0, eps, torch.tensor([500, 500]))
    torch.testing.assert_close(by_int, by_vec)
    torch.testing.assert_close(by_vec[0, 0, 0, 0], schedule.sqrt_alphas_cumprod[500])
    snr = schedule.snr(torch.tensor([0, 999]))
    abar = schedule.alphas_cumprod[[0, 999]]
    torch.testing.assert_close(snr, abar / (1 - abar))


def test_buffers_follow_to_but_not_state_dict() -> None:
    """The tables are rebuilt from the config: neither the schedule nor either family puts
    anything into a checkpoint's state dict."""
    schedule = NoiseSchedule().to(torch.float64)
    assert schedule.alphas_cumprod.dtype == torch.float64
    assert dict(schedule.state_dict()) == {}
    for family in ("ddpm", "edm"):
        assert dict(build_diffusion({"name": family}, {"name": "ddim"}).state_dict()) == {}


def test_levels_between_timesteps_interpolate_log_sigma() -> None:
    """level_at_ve_sigma (EDM's churn on the DDPM family) inverts the table: a timestep's own
    VE noise level gives back that timestep, and halfway in log-sigma gives t + 0.5; the
    oracle's coefficients at a fractional t agree with the level's alpha and sigma.

    The round trip is good to 1e-3 of a timestep, not to float precision: a level's alpha and
    sigma are the float32 tables' sqrt(abar) and sqrt(1 - abar), each rounded once, while the
    interpolation table is log(sigma / alpha) from abar (measured: t = 3 comes back as
    2.99994)."""
    diffusion = ddpm()
    for t in (3, 250, 998):
        level = diffusion.level(t)
        assert diffusion.level_at_ve_sigma(level.ve_sigma).t == pytest.approx(t, abs=1e-3)
        upper = diffusion.level(t + 1).ve_sigma
        middle = diffusion.level_at_ve_sigma(math.sqrt(level.ve_sigma * upper))
        assert middle.t == pytest.approx(t + 0.5, abs=1e-3)
        assert middle.alpha**2 + middle.sigma**2 == pytest.approx(1.0)
        # The network sees t as float32 (network_input_t), which limits the agreement to ~1e-7.
        alpha, sigma = diffusion.coefficients(torch.tensor([middle.t], dtype=torch.float32))
        assert alpha.item() == pytest.approx(middle.alpha, rel=1e-6)
        assert sigma.item() == pytest.approx(middle.sigma, rel=1e-6)
    assert diffusion.level_at_ve_sigma(0.0).sigma == 0.0  # clean data
    assert diffusion.level_at_ve_sigma(1e6).t == T - 1  # clamped to the noisiest timestep


def test_epsilon_with_zero_terminal_snr_is_refused_at_construction() -> None:
    """x0 from a noise prediction is undefined at abar = 0; v and x0 stay finite there."""
    with pytest.raises(ValueError, match=r"zero_terminal_snr=true.*prediction=epsilon.*=v"):
        ddpm("epsilon", zero_terminal_snr=True)
    x = torch.randn(2, 1, 2, 2)
    for prediction in ("v", "x0"):
        diffusion = ddpm(prediction, zero_terminal_snr=True)
        terminal = diffusion.level(T - 1)
        assert (terminal.alpha, terminal.sigma) == (0.0, 1.0)
        x0 = diffusion.x0_from_output(x, x, terminal)
        torch.testing.assert_close(x0, -x if prediction == "v" else x)  # v: x0 = -v there


def test_unknown_names_and_keys_raise_with_valid_values() -> None:
    with pytest.raises(
        ValueError, match=r"`diffusion.schedule.name='squared'`.*'cosine_clipped'.*'sigmoid'"
    ):
        NoiseSchedule("squared")
    with pytest.raises(ValueError, match=r"`diffusion.prediction='sample'`.*'epsilon', 'v', 'x0'"):
        ddpm("sample")
    # An unknown schedule key lists the keys that are valid, including the ones NoiseSchedule
    # consumes itself.
    with pytest.raises(ValueError) as err:
        NoiseSchedule("linear", max_beta=0.5)
    message = str(err.value)
    assert "`diffusion.schedule.max_beta` is not a parameter" in message
    assert "name, num_timesteps, zero_terminal_snr, beta_start, beta_end." in message
    with pytest.raises(ValueError, match="beta_start"):
        NoiseSchedule("linear", beta_start=0.03, beta_end=0.02)
    with pytest.raises(ValueError, match=r"num_timesteps=1` is invalid"):
        NoiseSchedule(num_timesteps=1)
    with pytest.raises(ValueError, match=r"`diffusion.schedule.max_beta=1.0` must be in \(0, 1\)"):
        NoiseSchedule("cosine", max_beta=1.0)
    with pytest.raises(ValueError, match=r"`diffusion.schedule` must be a mapping"):
        DDPMDiffusion(build_sampler({"name": "ddim"}), schedule="cosine")  # type: ignore[arg-type]
