"""NoiseSchedule: schedule shapes, zero-terminal-SNR rescale, add_noise and the conversions."""

from __future__ import annotations

import math

import pytest
import torch

from flowerdiff.diffusion import PREDICTION_TYPES, SCHEDULE_NAMES, NoiseSchedule

T = 1000
ZT_OPTIONS = [False, True]


def _schedules():
    return [(name, zt) for name in SCHEDULE_NAMES for zt in ZT_OPTIONS]


@pytest.mark.parametrize(("name", "zero_terminal_snr"), _schedules())
def test_conversions_round_trip(name: str, zero_terminal_snr: bool) -> None:
    """For every prediction type, target -> (x0, eps) -> target recovers the inputs.

    Float64 inputs (coefficients are the float32 buffers, promoted), so even t = T-1 of the
    plain cosine schedule (sqrt(abar) ~ 5e-5) is well conditioned; tolerance 1e-5.
    """
    schedule = NoiseSchedule(name, zero_terminal_snr=zero_terminal_snr)
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 250, 500, 750, 998, T - 1])
    x0 = torch.rand(len(t), 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(len(t), 3, 4, 4, generator=gen, dtype=torch.float64)
    x_t = schedule.add_noise(x0, eps, t)
    for ptype in PREDICTION_TYPES:
        target = schedule.training_target(x0, eps, t, ptype)
        # With zero terminal SNR, x0 from epsilon is undefined at t = T-1 (tested separately).
        n = len(t) - 1 if zero_terminal_snr and ptype == "epsilon" else len(t)
        x0_hat = schedule.predict_x0(target[:n], x_t[:n], t[:n], ptype)
        eps_hat = schedule.predict_eps(target, x_t, t, ptype)
        torch.testing.assert_close(x0_hat, x0[:n], atol=1e-5, rtol=0)
        torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=0)
        # ...and the v target rebuilt from the recovered noise.
        v = schedule.training_target(x0, eps_hat, t, "v")
        torch.testing.assert_close(v, schedule.training_target(x0, eps, t, "v"), atol=1e-5, rtol=0)


def test_v_matches_definition() -> None:
    schedule = NoiseSchedule()
    t = torch.tensor([10, 600])
    x0, eps = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    torch.testing.assert_close(schedule.training_target(x0, eps, t, "v"), expected)


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
    assert (scaled.beta_start, scaled.beta_end) == (0.00085, 0.012)
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
    schedule = NoiseSchedule().to(torch.float64)
    assert schedule.alphas_cumprod.dtype == torch.float64
    assert dict(schedule.state_dict()) == {}


def test_epsilon_x0_undefined_at_zero_snr_raises() -> None:
    schedule = NoiseSchedule(zero_terminal_snr=True)
    x = torch.randn(2, 1, 2, 2)
    t = torch.tensor([5, T - 1])
    with pytest.raises(ValueError, match=r"abar_t = 0.*prediction_type='v'"):
        schedule.predict_x0(x, x, t, "epsilon")
    # v and x0 predictions stay finite at the terminal step: x0 = -v there.
    x0 = schedule.predict_x0(x, x, t, "v")
    torch.testing.assert_close(x0[1], -x[1])
    assert torch.isfinite(schedule.predict_eps(x, x, t, "x0")).all()


def test_unknown_names_raise_with_valid_values() -> None:
    with pytest.raises(ValueError, match=r"name='squared'.*'cosine_clipped'.*'sigmoid'"):
        NoiseSchedule("squared")
    schedule = NoiseSchedule()
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"prediction_type='sample'.*'epsilon', 'v', 'x0'"):
        schedule.predict_x0(x, x, torch.tensor([3]), "sample")
    with pytest.raises(ValueError, match="beta_start"):
        NoiseSchedule("linear", beta_start=0.03, beta_end=0.02)
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule(num_timesteps=1)
