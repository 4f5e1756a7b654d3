"""Samplers: timestep spacing, one-step closed forms, an exact-denoiser end-to-end check, RNG."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from flowerdiff.diffusion import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    NoiseSchedule,
    Sampler,
    make_generators,
    randn_per_image,
)

T = 1000
SHAPE = (1, 4, 4)  # per-image shape for every test here
MU, S = 0.3, 0.5  # data distribution of the analytic test: every pixel ~ N(MU, S^2)

ModelFn = Callable[[Tensor, Tensor], Tensor]


def gaussian_denoiser(schedule: NoiseSchedule, prediction_type: str) -> ModelFn:
    """The exact (MMSE-optimal) model for data ~ N(MU, S^2) per pixel.

    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is Gaussian with variance abar S^2 + 1 - abar, so
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) MU) / (abar S^2 + 1 - abar) and
    E[x0 | x_t] = MU + sqrt(abar) S^2 (x_t - sqrt(abar) MU) / (abar S^2 + 1 - abar).
    The v model is built from those two with the schedule's v conversion (E is linear).
    """

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        abar = schedule.alphas_cumprod[t].double().view(-1, 1, 1, 1)
        var = abar * S**2 + 1 - abar
        resid = x.double() - abar.sqrt() * MU
        eps = ((1 - abar).sqrt() * resid / var).float()
        x0 = (MU + abar.sqrt() * S**2 * resid / var).float()
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "x0":
            return x0
        return schedule.training_target(x0, eps, t, "v")

    return model_fn


def constant_model(output: Tensor) -> ModelFn:
    return lambda x, t: output


def exact_ode_map(noise: Tensor, schedule: NoiseSchedule, t0: int) -> Tensor:
    """Probability-flow ODE solution from x_{t0} = noise to t = 0 for Gaussian data (affine)."""
    abar = schedule.alphas_cumprod[t0].double()
    return MU + S * (noise.double() - abar.sqrt() * MU) / (abar * S**2 + 1 - abar).sqrt()


def seeded_noise(n: int, seed: int = 0) -> Tensor:
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Timesteps


def test_timesteps_50_of_1000_per_spacing() -> None:
    leading = DDIMSampler(50, timestep_spacing="leading").timesteps(T)
    trailing = DDIMSampler(50, timestep_spacing="trailing").timesteps(T)
    linspace = DDIMSampler(50, timestep_spacing="linspace").timesteps(T)
    assert leading == list(range(980, -1, -20))
    assert trailing == list(range(999, 18, -20))
    assert linspace == [round(i * 999 / 49) for i in range(49, -1, -1)]
    assert linspace[:3] == [999, 979, 958] and linspace[-2:] == [20, 0]


def test_timesteps_full_and_uneven() -> None:
    assert DDPMSampler(T).timesteps(T) == list(range(999, -1, -1))
    assert DDPMSampler(T, timestep_spacing="trailing").timesteps(T) == list(range(999, -1, -1))
    assert DDIMSampler(3, timestep_spacing="leading").timesteps(T) == [666, 333, 0]
    assert DDIMSampler(3, timestep_spacing="trailing").timesteps(T) == [999, 666, 332]
    assert DPMSolverSampler().timesteps(T) == list(range(999, 0, -50))  # default: trailing


@pytest.mark.parametrize(
    "sampler",
    [DDPMSampler(20), DDIMSampler(20, "linspace"), DPMSolverSampler(20)],
    ids=["ddpm", "ddim", "dpm"],
)
def test_model_is_called_with_the_visited_timesteps(sampler: Sampler) -> None:
    """An off-by-one between the model's t and the step's t is invisible to the distribution
    tests (one step of 1000 barely changes abar), so check the calls directly."""
    schedule = NoiseSchedule()
    model = gaussian_denoiser(schedule, "epsilon")
    calls: list[Tensor] = []

    def recording_model(x: Tensor, t: Tensor) -> Tensor:
        calls.append(t)
        return model(x, t)

    out = sampler.sample(recording_model, schedule, seeded_noise(3))
    assert [int(t[0]) for t in calls] == out.timesteps == sampler.timesteps(T)
    assert all(t.dtype == torch.long and t.shape == (3,) and bool((t == t[0]).all()) for t in calls)


# ---------------------------------------------------------------------------------------------
# One step against the closed forms


@pytest.mark.parametrize(
    ("eta", "clip_sample", "use_clipped"),
    [(0.0, False, False), (1.0, False, False), (1.0, True, False), (0.5, True, True)],
)
def test_ddim_step_matches_paper_formula(eta: float, clip_sample: bool, use_clipped: bool) -> None:
    """x_prev = sqrt(a_p) x0 + sqrt(1 - a_p - sigma^2) eps + sigma z (Song et al. eq. 12, 16)."""
    schedule = NoiseSchedule()
    x_t, eps = seeded_noise(3, 1), seeded_noise(3, 2)
    sampler = DDIMSampler(
        50, eta=eta, clip_sample=clip_sample, use_clipped_model_output=use_clipped
    )
    out = sampler.sample(
        constant_model(eps), schedule, x_t, "epsilon",
        generators=make_generators(7, 0, 3), return_intermediates=True,
    )  # fmt: skip
    z = randn_per_image((3, *SHAPE), make_generators(7, 0, 3), "cpu").double()

    a_t, a_p = (schedule.alphas_cumprod[t].double() for t in (980, 960))
    x, e = x_t.double(), eps.double()
    x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
    if clip_sample:
        x0 = x0.clamp(-1, 1)
        assert (x0.abs() == 1).any()  # the clip is active in this test
    if use_clipped:
        e = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    sigma = eta * ((1 - a_p) / (1 - a_t)).sqrt() * (1 - a_t / a_p).sqrt()
    expected = a_p.sqrt() * x0 + (1 - a_p - sigma**2).sqrt() * e + sigma * z

    torch.testing.assert_close(out.pred_x0[0].double(), x0, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.intermediates[0].double(), expected, atol=1e-5, rtol=1e-5)
    # The last step goes to abar = 1 (final_alpha_one=True): x is the x0 estimate.
    torch.testing.assert_close(out.intermediates[-1], out.pred_x0[-1])


def test_ddim_final_alpha_one_false_keeps_t0_noise_level() -> None:
    schedule = NoiseSchedule()
    x_t, eps = seeded_noise(2, 1), seeded_noise(2, 2)
    sampler = DDIMSampler(10, eta=0.0, clip_sample=False, final_alpha_one=False)
    out = sampler.sample(constant_model(eps), schedule, x_t, return_intermediates=True)
    a0 = schedule.alphas_cumprod[0].double()
    expected = a0.sqrt() * out.pred_x0[-1].double() + (1 - a0).sqrt() * eps.double()
    torch.testing.assert_close(out.intermediates[-1].double(), expected, atol=1e-5, rtol=0)


def test_ddpm_step_matches_generalised_posterior() -> None:
    """From t to the next visited s: alpha = a_t / a_s, beta = 1 - alpha, q(x_s | x_t, x0)."""
    schedule = NoiseSchedule()
    x_t, eps = seeded_noise(3, 1), seeded_noise(3, 2)
    out = DDPMSampler(50).sample(
        constant_model(eps), schedule, x_t, "epsilon",
        generators=make_generators(4, 0, 3), return_intermediates=True,
    )  # fmt: skip
    z = randn_per_image((3, *SHAPE), make_generators(4, 0, 3), "cpu").double()
    a_t, a_s = (schedule.alphas_cumprod[t].double() for t in (980, 960))
    x = x_t.double()
    x0 = ((x - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()).clamp(-1, 1)
    alpha = a_t / a_s
    beta = 1 - alpha
    mean = a_s.sqrt() * beta / (1 - a_t) * x0 + alpha.sqrt() * (1 - a_s) / (1 - a_t) * x
    variance = (1 - a_s) / (1 - a_t) * beta
    torch.testing.assert_close(
        out.intermediates[0].double(), mean + variance.sqrt() * z, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(out.intermediates[-1], out.pred_x0[-1])  # last step: no noise


def test_dpm_solver_first_two_steps_by_hand() -> None:
    """Step 1 is first order (= DDIM eta 0); step 2 is the 2M midpoint update in lambda."""
    schedule = NoiseSchedule()
    x_t, eps = seeded_noise(2, 1), seeded_noise(2, 2)
    sampler = DPMSolverSampler(20, clip_sample=False)
    out = sampler.sample(constant_model(eps), schedule, x_t, return_intermediates=True)
    t0, t1, t2 = sampler.timesteps(T)[:3]
    abar = [schedule.alphas_cumprod[t].double() for t in (t0, t1, t2)]
    alpha = [a.sqrt() for a in abar]
    sigma = [(1 - a).sqrt() for a in abar]
    lam = [torch.log(a / s) for a, s in zip(alpha, sigma, strict=True)]
    e = eps.double()
    x0_0 = (x_t.double() - sigma[0] * e) / alpha[0]
    h1 = lam[1] - lam[0]
    x1 = sigma[1] / sigma[0] * x_t.double() - alpha[1] * torch.expm1(-h1) * x0_0
    x0_1 = (x1 - sigma[1] * e) / alpha[1]
    h2 = lam[2] - lam[1]
    d1 = (h2 / h1) * (x0_1 - x0_0)
    x2 = sigma[2] / sigma[1] * x1 - alpha[2] * torch.expm1(-h2) * (x0_1 + 0.5 * d1)
    torch.testing.assert_close(out.intermediates[0].double(), x1, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.intermediates[1].double(), x2, atol=1e-4, rtol=1e-5)
    ddim = DDIMSampler(20, timestep_spacing="trailing", eta=0.0, clip_sample=False)
    ddim_out = ddim.sample(constant_model(eps), schedule, x_t, return_intermediates=True)
    torch.testing.assert_close(ddim_out.intermediates[0], out.intermediates[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Exact Gaussian denoiser, end to end


def test_gaussian_denoiser_is_the_regression_optimum() -> None:
    """Check the closed form: the least-squares fit of eps on x_t equals it, and the x0 form
    equals the schedule's conversion of the eps form (n = 200k samples, tolerance 0.01)."""
    schedule = NoiseSchedule()
    gen = torch.Generator().manual_seed(3)
    n = 200_000
    for t_value in (50, 500, 950):
        t = torch.full((n,), t_value)
        x0 = MU + S * torch.randn(n, 1, 1, 1, generator=gen)
        eps = torch.randn(n, 1, 1, 1, generator=gen)
        x_t = schedule.add_noise(x0, eps, t)
        slope = torch.cov(torch.stack([eps.flatten(), x_t.flatten()]))[0, 1] / x_t.var()
        intercept = eps.mean() - slope * x_t.mean()
        eps_model = gaussian_denoiser(schedule, "epsilon")
        probe = torch.linspace(-2, 2, 5).view(5, 1, 1, 1)
        fitted = slope * probe + intercept
        torch.testing.assert_close(eps_model(probe, t[:5]), fitted, atol=0.01, rtol=0)
        x0_model = gaussian_denoiser(schedule, "x0")(probe, t[:5])
        converted = schedule.predict_x0(eps_model(probe, t[:5]), probe, t[:5], "epsilon")
        torch.testing.assert_close(x0_model, converted, atol=1e-5, rtol=1e-5)


# (id, sampler factory, prediction type, images, |mean err| tol, |std err| tol)
# Measured (seed 0 / worst |err| over seeds 0-9), mean err | std err:
#   DDPM 1000 steps        -0.0049 / 0.0084 | -0.0009 / 0.0066   (1024 images x 16 px)
#   DDIM eta=0, 50 leading -0.0118 / 0.0128 | -0.0146 / 0.0161   (first-order ODE solver bias)
#   DDIM eta=1, 50 leading -0.0025 / 0.0046 | -0.0313 / 0.0341   (discretisation bias; diffusers
#                                                                 gives the same to 1e-5)
#   DPM++(2M) 20 trailing  -0.0103 / 0.0113 | -0.0017 / 0.0032
# A mean bias of about -0.01 is expected: the sampler starts from x ~ N(0, 1) at the first
# timestep t0, where the true marginal has mean sqrt(abar_t0) MU (0.017 at t0 = 999, 0.021 at
# 980); the flow carries that offset to about -S sqrt(abar_t0) MU = -0.009 / -0.010 at t = 0.
# Statistical s.e. (4096 images): mean 0.002, std 0.0014; tolerances keep >= 0.005 of margin.
ANALYTIC_CASES = [
    ("ddpm-1000-eps", lambda: DDPMSampler(1000, clip_sample=False), "epsilon", 1024, 0.02, 0.015),
    ("ddpm-1000-v", lambda: DDPMSampler(1000, clip_sample=False), "v", 1024, 0.02, 0.015),
    ("ddim-eta0-50-eps", lambda: DDIMSampler(50, eta=0.0, clip_sample=False), "epsilon", 4096, 0.02, 0.025),
    ("ddim-eta0-50-v", lambda: DDIMSampler(50, eta=0.0, clip_sample=False), "v", 4096, 0.02, 0.025),
    ("ddim-eta0-50-x0", lambda: DDIMSampler(50, eta=0.0, clip_sample=False), "x0", 4096, 0.02, 0.025),
    ("ddim-eta1-50-eps", lambda: DDIMSampler(50, eta=1.0, clip_sample=False), "epsilon", 4096, 0.02, 0.045),
    ("ddim-eta1-50-v", lambda: DDIMSampler(50, eta=1.0, clip_sample=False), "v", 4096, 0.02, 0.045),
    ("dpm-20-eps", lambda: DPMSolverSampler(20, clip_sample=False), "epsilon", 4096, 0.02, 0.01),
    ("dpm-20-v", lambda: DPMSolverSampler(20, clip_sample=False), "v", 4096, 0.02, 0.01),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make_sampler", "prediction_type", "n", "mean_tol", "std_tol"),
    [case[1:] for case in ANALYTIC_CASES],
    ids=[case[0] for case in ANALYTIC_CASES],
)
def test_samples_match_gaussian_data(
    make_sampler: Callable[[], Sampler],
    prediction_type: str,
    n: int,
    mean_tol: float,
    std_tol: float,
) -> None:
    """With the exact denoiser every sampler must reproduce N(MU, S^2) (unclamped final x)."""
    schedule = NoiseSchedule()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = make_sampler().sample(
            gaussian_denoiser(schedule, prediction_type), schedule, seeded_noise(n),
            prediction_type, return_intermediates=True,
        )  # fmt: skip
    x = out.intermediates[-1]
    assert abs(x.mean().item() - MU) < mean_tol
    assert abs(x.std().item() - S) < std_tol
    torch.testing.assert_close(out.images, x.clamp(-1, 1))


# (id, sampler, prediction type, zero terminal SNR, RMS tolerance vs the exact ODE map)
ODE_CASES = [
    ("ddim-50-leading", DDIMSampler(50, eta=0.0, clip_sample=False), "epsilon", False, 0.03),
    ("dpm-20-trailing", DPMSolverSampler(20, clip_sample=False), "epsilon", False, 0.004),
    ("ddim-50-zsnr-v", DDIMSampler(50, "trailing", eta=0.0, clip_sample=False), "v", True, 0.03),
    ("dpm-20-zsnr-v", DPMSolverSampler(20, clip_sample=False), "v", True, 0.004),
]


@pytest.mark.parametrize(
    ("sampler", "prediction_type", "zero_terminal_snr", "rms_tol"),
    [case[1:] for case in ODE_CASES],
    ids=[case[0] for case in ODE_CASES],
)
def test_deterministic_samplers_follow_exact_ode_map(
    sampler: Sampler, prediction_type: str, zero_terminal_snr: bool, rms_tol: float
) -> None:
    """Per sample, DDIM(eta=0) / DPM-Solver++ output approximates the exact ODE solution."""
    schedule = NoiseSchedule(zero_terminal_snr=zero_terminal_snr)
    noise = seeded_noise(512)
    model = gaussian_denoiser(schedule, prediction_type)
    out = sampler.sample(model, schedule, noise, prediction_type, return_intermediates=True)
    exact = exact_ode_map(noise, schedule, sampler.timesteps(T)[0])
    rms = (out.intermediates[-1].double() - exact).pow(2).mean().sqrt().item()
    assert rms < rms_tol


def test_dpm_solver_is_second_order_and_ddim_first_order() -> None:
    """Doubling the steps cuts DPM-Solver++(2M)'s error by > 3x (2nd order), DDIM's by ~2x."""
    schedule = NoiseSchedule()
    noise = seeded_noise(256)
    exact = exact_ode_map(noise, schedule, T - 1)

    def rms(sampler: Sampler) -> float:
        model = gaussian_denoiser(schedule, "epsilon")
        x = sampler.sample(model, schedule, noise, return_intermediates=True).intermediates[-1]
        return (x.double() - exact).pow(2).mean().sqrt().item()

    dpm = [rms(DPMSolverSampler(n, clip_sample=False)) for n in (10, 20)]
    ddim = [rms(DDIMSampler(n, "trailing", eta=0.0, clip_sample=False)) for n in (25, 50)]
    assert dpm[0] / dpm[1] > 3.0
    assert 1.6 < ddim[0] / ddim[1] < 2.5


# ---------------------------------------------------------------------------------------------
# RNG: determinism and batch-split independence


def test_ddim_eta0_is_deterministic() -> None:
    schedule = NoiseSchedule()
    noise = seeded_noise(4)
    model = gaussian_denoiser(schedule, "epsilon")
    sampler = DDIMSampler(10, eta=0.0)
    a = sampler.sample(model, schedule, noise, generators=make_generators(1, 0, 4)).images
    b = sampler.sample(model, schedule, noise, generators=make_generators(2, 0, 4)).images
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "sampler", [DDPMSampler(10), DDIMSampler(10, eta=1.0)], ids=["ddpm", "ddim-eta1"]
)
def test_stochastic_samplers_depend_on_generators(sampler: Sampler) -> None:
    schedule = NoiseSchedule()
    noise = seeded_noise(4)
    model = gaussian_denoiser(schedule, "epsilon")
    a = sampler.sample(model, schedule, noise, generators=make_generators(1, 0, 4)).images
    b = sampler.sample(model, schedule, noise, generators=make_generators(2, 0, 4)).images
    c = sampler.sample(model, schedule, noise, generators=make_generators(1, 0, 4)).images
    assert not torch.allclose(a, b)
    assert torch.equal(a, c)


@pytest.mark.parametrize(
    "sampler",
    [DDPMSampler(20), DDIMSampler(20, eta=1.0), DPMSolverSampler(10)],
    ids=["ddpm", "ddim-eta1", "dpm"],
)
def test_seeded_batch_split_independence(sampler: Sampler) -> None:
    """6 images in one batch == the same 6 as batches of 2 + 4 (generators by global index)."""
    schedule = NoiseSchedule()
    model = gaussian_denoiser(schedule, "v")

    def run(start: int, count: int) -> Tensor:
        gens = make_generators(1234, start, count)
        noise = randn_per_image((count, *SHAPE), gens, "cpu")
        return sampler.sample(model, schedule, noise, "v", generators=gens).images

    whole = run(0, 6)
    torch.testing.assert_close(torch.cat([run(0, 2), run(2, 4)]), whole, atol=1e-6, rtol=0)


def test_make_generators_and_randn_per_image() -> None:
    one = randn_per_image((1, *SHAPE), make_generators(5, 3, 1), "cpu")
    six = randn_per_image((6, *SHAPE), make_generators(5, 0, 6), "cpu")
    assert torch.equal(one[0], six[3])
    other_seed = randn_per_image((6, *SHAPE), make_generators(6, 0, 6), "cpu")
    assert not torch.allclose(six, other_seed)
    assert len({float(x) for x in six[:, 0, 0, 0]}) == 6  # images get different streams
    assert randn_per_image((2, 3), None, "cpu", torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="one generator per image"):
        randn_per_image((3, *SHAPE), make_generators(5, 0, 2), "cpu")
    with pytest.raises(ValueError, match="non-negative"):
        make_generators(-1, 0, 2)


# ---------------------------------------------------------------------------------------------
# Outputs, x0 processing, dtypes


@pytest.mark.parametrize(
    "sampler", [DDPMSampler(7), DDIMSampler(7), DPMSolverSampler(7)], ids=["ddpm", "ddim", "dpm"]
)
def test_return_intermediates_lengths_and_shapes(sampler: Sampler) -> None:
    schedule = NoiseSchedule()
    noise = seeded_noise(3) * 3
    model = gaussian_denoiser(schedule, "epsilon")
    out = sampler.sample(model, schedule, noise, return_intermediates=True)
    assert out.timesteps == sampler.timesteps(T) and len(out.timesteps) == 7
    assert len(out.intermediates) == len(out.pred_x0) == 7
    assert all(x.shape == noise.shape for x in out.intermediates + out.pred_x0)
    assert out.images.shape == noise.shape and out.images.abs().max() <= 1.0
    plain = sampler.sample(model, schedule, noise)
    assert plain.intermediates == [] and plain.pred_x0 == []


def test_x0_processing_dynamic_threshold_and_clip() -> None:
    """One trailing step from t = 999 to abar = 1 returns the processed x0 prediction."""
    schedule = NoiseSchedule()
    x0 = torch.stack([torch.linspace(-0.5, 0.5, 16), torch.linspace(-3.0, 3.0, 16)]).view(2, *SHAPE)
    noise = seeded_noise(2)

    def final(**kwargs: object) -> Tensor:
        sampler = DDIMSampler(1, "trailing", eta=0.0, **kwargs)
        out = sampler.sample(constant_model(x0), schedule, noise, "x0", return_intermediates=True)
        return out.intermediates[-1]

    p = 0.9
    s = np.maximum(np.quantile(np.abs(x0.view(2, -1).numpy()), p, axis=1), 1.0)
    assert s[0] == 1.0 and s[1] > 1.0
    expected = np.clip(x0.view(2, -1).numpy(), -s[:, None], s[:, None]) / s[:, None]
    torch.testing.assert_close(final(dynamic_threshold=p).view(2, -1), torch.from_numpy(expected))
    torch.testing.assert_close(final(clip_sample=True), x0.clamp(-1, 1))
    torch.testing.assert_close(final(clip_sample=False), x0)


def test_step_math_is_float32_for_half_precision_models() -> None:
    schedule = NoiseSchedule()
    model = gaussian_denoiser(schedule, "epsilon")
    out = DDIMSampler(5).sample(
        lambda x, t: model(x, t).bfloat16(), schedule, seeded_noise(2).bfloat16(),
        return_intermediates=True,
    )  # fmt: skip
    assert out.images.dtype == torch.float32
    assert all(x.dtype == torch.float32 for x in out.intermediates + out.pred_x0)


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    schedule = NoiseSchedule()
    DDIMSampler(3).sample(
        gaussian_denoiser(schedule, "epsilon"), schedule, seeded_noise(1), progress=True
    )
    assert "DDIMSampler" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Validation


def test_config_validation_messages() -> None:
    with pytest.raises(ValueError, match=r"num_inference_steps=0 .*integer >= 1"):
        DDIMSampler(0)
    with pytest.raises(ValueError, match=r"eta=-0.1 .*>= 0"):
        DDIMSampler(eta=-0.1)
    with pytest.raises(
        ValueError, match=r"timestep_spacing='uniform'.*'leading', 'trailing', 'linspace'"
    ):
        DDPMSampler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match=r"dynamic_threshold=1.5"):
        DPMSolverSampler(dynamic_threshold=1.5)


def test_sample_time_validation_messages() -> None:
    schedule = NoiseSchedule(num_timesteps=100)
    model = gaussian_denoiser(schedule, "epsilon")
    noise = seeded_noise(2)
    with pytest.raises(ValueError, match=r"num_inference_steps=200 exceeds .*num_timesteps=100"):
        DDIMSampler(200).sample(model, schedule, noise)
    with pytest.raises(ValueError, match=r"prediction_type='sample'"):
        DDIMSampler(5).sample(model, schedule, noise, "sample")
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        DDPMSampler(5).sample(model, schedule, noise, generators=make_generators(0, 0, 3))
    with pytest.raises(ValueError, match="model output shape"):
        DDIMSampler(5).sample(lambda x, t: x[:, :, :2], schedule, noise)
    zsnr = NoiseSchedule(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="abar_t = 0"):
        DDIMSampler(5, "trailing").sample(gaussian_denoiser(zsnr, "epsilon"), zsnr, noise)
