"""Samplers: timestep spacing, one-step closed forms, the exact Gaussian oracle end to end on
both families, RNG, outputs, the registry and validation, and the book's bit-exact DDIM step."""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from flowerdiff.diffusion import (
    SAMPLERS,
    DDPMDiffusion,
    Diffusion,
    EDMDiffusion,
    Sampler,
    SamplerOutput,
    build_diffusion,
    build_sampler,
    make_generators,
    randn_per_image,
)
from flowerdiff.diffusion.analytic import GaussianOracle

T = 1000
SHAPE = (1, 4, 4)  # per-image shape for every test here
MU, S = 0.3, 0.5  # data distribution of the analytic tests: every pixel ~ N(MU, S^2)
SAMPLER_NAMES = ["ddim", "ddpm", "dpm_solver", "euler", "heun"]

Net = Callable[..., Tensor]


def sampler(name: str, **options: object) -> Sampler:
    return build_sampler({"name": name, **options})


def ddpm(
    prediction: str = "epsilon", default: Sampler | None = None, **schedule: object
) -> DDPMDiffusion:
    return DDPMDiffusion(default or sampler("ddim"), schedule=schedule, prediction=prediction)


def edm(default: Sampler | None = None) -> EDMDiffusion:
    return EDMDiffusion(default or sampler("heun"))


def family(name: str) -> Diffusion:
    return ddpm() if name == "ddpm" else edm()


def oracle(diffusion: Diffusion | None = None) -> GaussianOracle:
    """The exact denoiser of N(MU, S^2) per pixel; with a family, a network of that family."""
    return GaussianOracle(torch.full(SHAPE, MU), torch.full(SHAPE, S), diffusion)


def constant_net(output: Tensor) -> Net:
    return lambda x, t, cond=None: output


def seeded_noise(n: int, seed: int = 0) -> Tensor:
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def run(
    diffusion: Diffusion,
    net: Net,
    noise: Tensor,
    chosen: Sampler | None = None,
    generators: list[torch.Generator] | None = None,
) -> SamplerOutput:
    """Sample through the family's own parametrisation, keeping every step."""
    return diffusion.sample(
        diffusion.denoiser(net), noise, chosen, generators=generators, return_intermediates=True
    )


def timesteps(chosen: Sampler, diffusion: Diffusion | None = None) -> list[float]:
    return [level.t for level in (diffusion or ddpm()).plan(chosen).levels]


# ---------------------------------------------------------------------------------------------
# Timesteps


def test_timesteps_50_of_1000_per_spacing() -> None:
    leading = timesteps(sampler("ddim", timestep_spacing="leading"))
    trailing = timesteps(sampler("ddim", timestep_spacing="trailing"))
    linspace = timesteps(sampler("ddim", timestep_spacing="linspace"))
    assert leading == list(range(980, -1, -20))
    assert trailing == list(range(999, 18, -20))
    assert linspace == [round(i * 999 / 49) for i in range(49, -1, -1)]
    assert linspace[:3] == [999, 979, 958] and linspace[-2:] == [20, 0]


def test_timesteps_full_and_uneven_and_family_defaults() -> None:
    """DDPM family: leading for ddim/ddpm (the book), trailing for dpm_solver/euler/heun."""
    assert timesteps(sampler("ddpm", num_inference_steps=T)) == list(range(999, -1, -1))
    full_trailing = sampler("ddpm", num_inference_steps=T, timestep_spacing="trailing")
    assert timesteps(full_trailing) == list(range(999, -1, -1))
    assert timesteps(sampler("ddim", num_inference_steps=3)) == [666, 333, 0]
    assert timesteps(sampler("ddim", num_inference_steps=3, timestep_spacing="trailing")) == [
        999,
        666,
        332,
    ]
    for name in ("dpm_solver", "euler", "heun"):
        assert timesteps(sampler(name, num_inference_steps=20)) == list(range(999, 0, -50))
    for name in ("ddim", "ddpm"):
        assert timesteps(sampler(name, num_inference_steps=20)) == list(range(950, -1, -50))


@pytest.mark.parametrize(
    "chosen",
    [
        sampler("ddpm", num_inference_steps=20),
        sampler("ddim", num_inference_steps=20, timestep_spacing="linspace"),
        sampler("dpm_solver", num_inference_steps=20),
        sampler("euler", num_inference_steps=20),
    ],
    ids=["ddpm", "ddim", "dpm", "euler"],
)
def test_network_is_called_with_the_visited_timesteps(chosen: Sampler) -> None:
    """An off-by-one between the network's t and the step's t is invisible to the distribution
    tests (one step of 1000 barely changes abar), so check the calls directly."""
    diffusion = ddpm()
    net = oracle(diffusion)
    calls: list[Tensor] = []

    def recording(x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        calls.append(t)
        return net(x, t, cond)

    out = run(diffusion, recording, seeded_noise(3), chosen)
    assert [int(t[0]) for t in calls] == [level.t for level in out.levels] == timesteps(chosen)
    assert all(t.dtype == torch.long and t.shape == (3,) and bool((t == t[0]).all()) for t in calls)


# ---------------------------------------------------------------------------------------------
# One step against the closed forms (DDPM family, a constant epsilon network)


@pytest.mark.parametrize(
    ("eta", "clip_sample", "use_clipped"),
    [(0.0, False, False), (1.0, False, False), (1.0, True, False), (0.5, True, True)],
)
def test_ddim_step_matches_paper_formula(eta: float, clip_sample: bool, use_clipped: bool) -> None:
    """x_prev = sqrt(a_p) x0 + sqrt(1 - a_p - sigma^2) eps + sigma z (Song et al. eq. 12, 16)."""
    diffusion = ddpm()
    x_t, eps = seeded_noise(3, 1), seeded_noise(3, 2)
    chosen = sampler("ddim", eta=eta, clip_sample=clip_sample, use_clipped_model_output=use_clipped)
    out = run(diffusion, constant_net(eps), x_t, chosen, make_generators(7, 0, 3))
    z = randn_per_image((3, *SHAPE), make_generators(7, 0, 3), "cpu").double()

    a_t, a_p = (diffusion.schedule.alphas_cumprod[t].double() for t in (980, 960))
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
    diffusion = ddpm()
    x_t, eps = seeded_noise(2, 1), seeded_noise(2, 2)
    chosen = sampler(
        "ddim", num_inference_steps=10, eta=0.0, clip_sample=False, final_alpha_one=False
    )
    out = run(diffusion, constant_net(eps), x_t, chosen)
    a0 = diffusion.schedule.alphas_cumprod[0].double()
    expected = a0.sqrt() * out.pred_x0[-1].double() + (1 - a0).sqrt() * eps.double()
    torch.testing.assert_close(out.intermediates[-1].double(), expected, atol=1e-5, rtol=0)


def test_ddpm_step_matches_generalised_posterior() -> None:
    """From t to the next visited s: alpha = a_t / a_s, beta = 1 - alpha, q(x_s | x_t, x0)."""
    diffusion = ddpm()
    x_t, eps = seeded_noise(3, 1), seeded_noise(3, 2)
    chosen = sampler("ddpm", num_inference_steps=50)
    out = run(diffusion, constant_net(eps), x_t, chosen, make_generators(4, 0, 3))
    z = randn_per_image((3, *SHAPE), make_generators(4, 0, 3), "cpu").double()
    a_t, a_s = (diffusion.schedule.alphas_cumprod[t].double() for t in (980, 960))
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
    diffusion = ddpm()
    x_t, eps = seeded_noise(2, 1), seeded_noise(2, 2)
    chosen = sampler("dpm_solver", num_inference_steps=20, clip_sample=False)
    out = run(diffusion, constant_net(eps), x_t, chosen)
    t0, t1, t2 = (int(t) for t in timesteps(chosen)[:3])
    abar = [diffusion.schedule.alphas_cumprod[t].double() for t in (t0, t1, t2)]
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
    ddim = sampler(
        "ddim", num_inference_steps=20, timestep_spacing="trailing", eta=0.0, clip_sample=False
    )
    ddim_out = run(diffusion, constant_net(eps), x_t, ddim)
    torch.testing.assert_close(ddim_out.intermediates[0], out.intermediates[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family_name", ["ddpm", "edm"])
def test_ddim_eta0_is_euler_and_ddim_eta1_is_ddpm(family_name: str) -> None:
    """Two identities of the shared step math, along whole trajectories of the exact oracle:
    DDIM with eta = 0 is Euler on the probability-flow ODE in VE coordinates (without
    clipping, same spacing), and DDIM with eta = 1 is ancestral DDPM (same generators).
    Float32 tolerance: measured max difference 9.5e-7 (values up to 2.6); atol 5e-6."""
    diffusion = family(family_name)
    net = oracle(diffusion)
    noise = seeded_noise(8, 3)
    spacing = {"timestep_spacing": "trailing"} if family_name == "ddpm" else {}
    common = {"num_inference_steps": 20, "clip_sample": False, **spacing}
    ddim0 = run(diffusion, net, noise, sampler("ddim", eta=0.0, **common))
    euler = run(diffusion, net, noise, sampler("euler", **common))
    assert len(ddim0.intermediates) == len(euler.intermediates) == 20
    for a, b in zip(ddim0.intermediates, euler.intermediates, strict=True):
        torch.testing.assert_close(a, b, atol=5e-6, rtol=0)
    gens = list(make_generators(5, 0, 8))
    ddim1 = run(diffusion, net, noise, sampler("ddim", eta=1.0, **common), gens)
    ancestral = run(diffusion, net, noise, sampler("ddpm", **common), make_generators(5, 0, 8))
    for a, b in zip(ddim1.intermediates, ancestral.intermediates, strict=True):
        torch.testing.assert_close(a, b, atol=5e-6, rtol=0)
    assert not torch.allclose(ddim0.images, ddim1.images, atol=1e-2)  # eta matters


# ---------------------------------------------------------------------------------------------
# The exact Gaussian oracle, end to end


def assert_matches_gaussian(out: SamplerOutput, mean_tol: float, std_tol: float) -> None:
    """The unclamped final x has the data's mean and std (the images are it, clamped)."""
    x = out.intermediates[-1]
    assert abs(x.mean().item() - MU) < mean_tol, f"mean error {x.mean().item() - MU:+.4f}"
    assert abs(x.std().item() - S) < std_tol, f"std error {x.std().item() - S:+.4f}"
    torch.testing.assert_close(out.images, x.clamp(-1, 1))


def sample_gaussian(diffusion: Diffusion, chosen: Sampler, n: int) -> SamplerOutput:
    """n images of the oracle, stochastic steps drawn from the global RNG seeded at 0."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return run(diffusion, oracle(diffusion), seeded_noise(n), chosen)


# DDPM family, each prediction type (the network's output is converted by the family).
# (id, sampler, prediction type, images, |mean err| tol, |std err| tol)
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
PREDICTION_CASES = [
    ("ddpm-1000-eps", ("ddpm", {"num_inference_steps": 1000}), "epsilon", 1024, 0.02, 0.015),
    ("ddpm-1000-v", ("ddpm", {"num_inference_steps": 1000}), "v", 1024, 0.02, 0.015),
    ("ddim-eta0-50-eps", ("ddim", {"eta": 0.0}), "epsilon", 4096, 0.02, 0.025),
    ("ddim-eta0-50-v", ("ddim", {"eta": 0.0}), "v", 4096, 0.02, 0.025),
    ("ddim-eta0-50-x0", ("ddim", {"eta": 0.0}), "x0", 4096, 0.02, 0.025),
    ("ddim-eta1-50-eps", ("ddim", {"eta": 1.0}), "epsilon", 4096, 0.02, 0.045),
    ("ddim-eta1-50-v", ("ddim", {"eta": 1.0}), "v", 4096, 0.02, 0.045),
    ("dpm-20-eps", ("dpm_solver", {}), "epsilon", 4096, 0.02, 0.01),
    ("dpm-20-v", ("dpm_solver", {}), "v", 4096, 0.02, 0.01),
]


@pytest.mark.parametrize(
    ("chosen", "prediction", "n", "mean_tol", "std_tol"),
    [case[1:] for case in PREDICTION_CASES],
    ids=[case[0] for case in PREDICTION_CASES],
)
def test_samples_match_gaussian_data_per_prediction_type(
    chosen: tuple[str, dict],
    prediction: str,
    n: int,
    mean_tol: float,
    std_tol: float,
) -> None:
    """With the exact denoiser every sampler must reproduce N(MU, S^2)."""
    name, options = chosen
    diffusion = ddpm(prediction)
    out = sample_gaussian(diffusion, sampler(name, clip_sample=False, **options), n)
    assert_matches_gaussian(out, mean_tol, std_tol)


# Every sampler on both families, 4096 images, clip_sample off. Measured worst |err| over
# seeds 0-9 (global RNG and noise seed), mean | std:
#   DDPM family  ddpm-100 0.0041 | 0.0190    ddim eta 1, 50   0.0046 | 0.0341
#                ddim eta 0, 50 0.0128 | 0.0161   dpm_solver-20 0.0113 | 0.0032
#                euler-50 0.0110 | 0.0170    heun-18 0.0112 | 0.0076
#   EDM          ddpm-100 0.0030 | 0.0308    ddim eta 1, 100 = ddpm-100 (same step)
#                ddim eta 0, 50 0.0045 | 0.0302   dpm_solver-20 0.0050 | 0.0264
#                euler-50 0.0045 | 0.0302    heun-18 0.0050 | 0.0294
# The std errors are discretisation bias (they shrink with the steps: EDM ddpm 50 -> 100
# steps: -0.055 -> -0.029), the DDPM family's -0.01 mean bias is the N(0, 1) start explained
# above; EDM starts at sigma = 80, where the prior's missing mean MU is negligible. Tolerances
# keep >= 0.006 (3 s.e. of the mean, 4 of the std) above the worst seed.
FAMILY_CASES = {
    "ddpm": {
        "ddpm": ({"num_inference_steps": 100}, 0.015, 0.03),
        "ddim": ({"eta": 1.0, "num_inference_steps": 50}, 0.015, 0.045),
        "ddim-eta0": ({"eta": 0.0, "num_inference_steps": 50}, 0.02, 0.025),
        "dpm_solver": ({"num_inference_steps": 20}, 0.02, 0.01),
        "euler": ({"num_inference_steps": 50}, 0.02, 0.025),
        "heun": ({"num_inference_steps": 18}, 0.02, 0.015),
    },
    "edm": {
        "ddpm": ({"num_inference_steps": 100}, 0.012, 0.04),
        "ddim": ({"eta": 1.0, "num_inference_steps": 100}, 0.012, 0.04),
        "ddim-eta0": ({"eta": 0.0, "num_inference_steps": 50}, 0.012, 0.04),
        "dpm_solver": ({"num_inference_steps": 20}, 0.012, 0.035),
        "euler": ({"num_inference_steps": 50}, 0.012, 0.04),
        "heun": ({"num_inference_steps": 18}, 0.012, 0.04),
    },
}


@pytest.mark.parametrize(
    ("family_name", "case"),
    [(f, c) for f, cases in FAMILY_CASES.items() for c in cases],
    ids=[f"{f}-{c}" for f, cases in FAMILY_CASES.items() for c in cases],
)
def test_every_sampler_on_both_families_matches_gaussian_data(family_name: str, case: str) -> None:
    options, mean_tol, std_tol = FAMILY_CASES[family_name][case]
    chosen = sampler(case.removesuffix("-eta0"), clip_sample=False, **options)
    out = sample_gaussian(family(family_name), chosen, 4096)
    assert_matches_gaussian(out, mean_tol, std_tol)


# (id, sampler, prediction type, zero terminal SNR, RMS tolerance vs the exact ODE map)
# Measured RMS (512 images): 0.0149, 0.0016, 0.0162, 0.0024.
ODE_CASES = [
    ("ddim-50-leading", ("ddim", {"eta": 0.0}), "epsilon", False, 0.03),
    ("dpm-20-trailing", ("dpm_solver", {}), "epsilon", False, 0.004),
    ("ddim-50-zsnr-v", ("ddim", {"timestep_spacing": "trailing", "eta": 0.0}), "v", True, 0.03),
    ("dpm-20-zsnr-v", ("dpm_solver", {}), "v", True, 0.004),
]


@pytest.mark.parametrize(
    ("chosen", "prediction", "zero_terminal_snr", "rms_tol"),
    [case[1:] for case in ODE_CASES],
    ids=[case[0] for case in ODE_CASES],
)
def test_deterministic_samplers_follow_exact_ode_map(
    chosen: tuple[str, dict], prediction: str, zero_terminal_snr: bool, rms_tol: float
) -> None:
    """Per sample, DDIM(eta=0) / DPM-Solver++ output approximates the exact ODE solution
    from the first visited level (GaussianOracle.ode_solution)."""
    diffusion = ddpm(prediction, zero_terminal_snr=zero_terminal_snr)
    name, options = chosen
    noise = seeded_noise(512)
    out = run(diffusion, oracle(diffusion), noise, sampler(name, clip_sample=False, **options))
    exact = oracle().ode_solution(noise, out.levels[0])
    rms = (out.intermediates[-1] - exact).pow(2).mean().sqrt().item()
    assert rms < rms_tol


def test_dpm_solver_is_second_order_and_ddim_first_order() -> None:
    """Doubling the steps cuts DPM-Solver++(2M)'s error by > 3x (2nd order; measured 14.5x
    from 10 to 20 steps, still pre-asymptotic), DDIM's by ~2x (1st order; measured 1.95x)."""
    diffusion = ddpm()
    noise = seeded_noise(256)
    exact = oracle().ode_solution(noise, diffusion.level(T - 1))

    def rms(chosen: Sampler) -> float:
        x = run(diffusion, oracle(diffusion), noise, chosen).intermediates[-1]
        return (x - exact).pow(2).mean().sqrt().item()

    dpm = [rms(sampler("dpm_solver", num_inference_steps=n, clip_sample=False)) for n in (10, 20)]
    ddim = [
        rms(
            sampler(
                "ddim",
                num_inference_steps=n,
                timestep_spacing="trailing",
                eta=0.0,
                clip_sample=False,
            )
        )
        for n in (25, 50)
    ]
    assert dpm[0] / dpm[1] > 3.0
    assert 1.6 < ddim[0] / ddim[1] < 2.5


# ---------------------------------------------------------------------------------------------
# RNG: determinism and batch-split independence


def test_ddim_eta0_is_deterministic() -> None:
    diffusion = ddpm()
    noise = seeded_noise(4)
    chosen = sampler("ddim", num_inference_steps=10, eta=0.0)
    a = run(diffusion, oracle(diffusion), noise, chosen, make_generators(1, 0, 4)).images
    b = run(diffusion, oracle(diffusion), noise, chosen, make_generators(2, 0, 4)).images
    assert torch.equal(a, b)


STOCHASTIC = {
    "ddpm": {"name": "ddpm", "num_inference_steps": 10},
    "ddim-eta1": {"name": "ddim", "num_inference_steps": 10, "eta": 1.0},
    "heun-churn": {"name": "heun", "num_inference_steps": 6, "s_churn": 10.0},
    "euler-churn": {"name": "euler", "num_inference_steps": 6, "s_churn": 10.0},
}


@pytest.mark.parametrize("family_name", ["ddpm", "edm"])
@pytest.mark.parametrize("case", list(STOCHASTIC))
def test_stochastic_samplers_depend_on_generators(case: str, family_name: str) -> None:
    diffusion = family(family_name)
    chosen = build_sampler(STOCHASTIC[case])
    noise = seeded_noise(4)

    def images(seed: int) -> Tensor:
        return run(diffusion, oracle(diffusion), noise, chosen, make_generators(seed, 0, 4)).images

    a, b, c = images(1), images(2), images(1)
    assert not torch.allclose(a, b)
    assert torch.equal(a, c)


@pytest.mark.parametrize("family_name", ["ddpm", "edm"])
@pytest.mark.parametrize("case", [*STOCHASTIC, "dpm"])
def test_seeded_batch_split_independence(case: str, family_name: str) -> None:
    """6 images in one batch == the same 6 as batches of 2 + 4 (generators by global index)."""
    diffusion = ddpm("v") if family_name == "ddpm" else edm()
    config = STOCHASTIC.get(case, {"name": "dpm_solver", "num_inference_steps": 10})
    chosen = build_sampler(config)
    net = oracle(diffusion)

    def images(start: int, count: int) -> Tensor:
        gens = make_generators(1234, start, count)
        noise = randn_per_image((count, *SHAPE), gens, "cpu")
        return run(diffusion, net, noise, chosen, gens).images

    whole = images(0, 6)
    torch.testing.assert_close(torch.cat([images(0, 2), images(2, 4)]), whole, atol=1e-6, rtol=0)


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


@pytest.mark.parametrize("family_name", ["ddpm", "edm"])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_return_intermediates_lengths_shapes_and_captions(name: str, family_name: str) -> None:
    diffusion = family(family_name)
    chosen = sampler(name, num_inference_steps=7)
    noise = seeded_noise(3) * 3
    out = run(diffusion, oracle(diffusion), noise, chosen, make_generators(0, 0, 3))
    assert out.levels == diffusion.plan(chosen).levels and len(out.levels) == 7
    assert len(out.intermediates) == len(out.pred_x0) == 7
    assert all(x.shape == noise.shape for x in out.intermediates + out.pred_x0)
    assert out.images.shape == noise.shape and out.images.abs().max() <= 1.0
    expected_first = "σ=80" if family_name == "edm" else f"t={out.levels[0].t:g}"
    assert out.labels[0] == expected_first and len(out.labels) == 7
    denoiser = diffusion.denoiser(oracle(diffusion))
    plain = diffusion.sample(denoiser, noise, chosen, generators=make_generators(0, 0, 3))
    assert plain.intermediates == [] and plain.pred_x0 == []
    torch.testing.assert_close(plain.images, out.images)


def test_x0_processing_dynamic_threshold_and_clip() -> None:
    """One trailing step from t = 999 to abar = 1 returns the processed x0 prediction."""
    diffusion = ddpm("x0")
    x0 = torch.stack([torch.linspace(-0.5, 0.5, 16), torch.linspace(-3.0, 3.0, 16)]).view(2, *SHAPE)
    noise = seeded_noise(2)

    def final(**options: object) -> Tensor:
        chosen = sampler(
            "ddim", num_inference_steps=1, timestep_spacing="trailing", eta=0.0, **options
        )
        return run(diffusion, constant_net(x0), noise, chosen).intermediates[-1]

    p = 0.9
    s = np.maximum(np.quantile(np.abs(x0.view(2, -1).numpy()), p, axis=1), 1.0)
    assert s[0] == 1.0 and s[1] > 1.0
    expected = np.clip(x0.view(2, -1).numpy(), -s[:, None], s[:, None]) / s[:, None]
    torch.testing.assert_close(final(dynamic_threshold=p).view(2, -1), torch.from_numpy(expected))
    torch.testing.assert_close(final(clip_sample=True), x0.clamp(-1, 1))
    torch.testing.assert_close(final(clip_sample=False), x0)


@pytest.mark.parametrize("family_name", ["ddpm", "edm"])
def test_step_math_is_float32_for_half_precision_models(family_name: str) -> None:
    diffusion = family(family_name)
    net = oracle(diffusion)
    out = diffusion.sample(
        diffusion.denoiser(lambda x, t, cond=None: net(x, t, cond).bfloat16()),
        seeded_noise(2).bfloat16(),
        sampler("heun", num_inference_steps=5),
        return_intermediates=True,
    )
    assert out.images.dtype == torch.float32
    assert all(x.dtype == torch.float32 for x in out.intermediates + out.pred_x0)


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    diffusion = ddpm()
    diffusion.sample(
        diffusion.denoiser(oracle(diffusion)),
        seeded_noise(1),
        sampler("ddim", num_inference_steps=3),
        progress=True,
    )
    assert "DDIMSampler" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Registry, options and validation


def test_registry_names_and_config_round_trip() -> None:
    assert SAMPLERS.names() == SAMPLER_NAMES
    for name in SAMPLER_NAMES:
        built = sampler(name, num_inference_steps=9)
        config = built.to_config()
        assert config["name"] == name and config["num_inference_steps"] == 9
        assert build_sampler(config).to_config() == config
        assert repr(built).startswith(type(built).__name__ + "(num_inference_steps=9")
    for diffusion in (ddpm("v", sampler("dpm_solver"), name="linear"), edm()):
        config = diffusion.to_config()
        assert build_diffusion(config).to_config() == config


def test_unknown_names_and_keys_give_one_error_naming_key_and_valid_values() -> None:
    cases = [
        (lambda: build_sampler({"name": "unipc"}), "`sampler.name='unipc'` is not a known sampler",
         "'ddim', 'ddpm', 'dpm_solver', 'euler', 'heun'"),
        (lambda: build_sampler({"name": "heun", "eta": 0.5}),
         "`sampler.eta` is not a parameter of HeunSampler",
         "name, num_inference_steps, timestep_spacing, clip_sample, dynamic_threshold, s_churn"),
        (lambda: build_diffusion({"name": "flow"}, {"name": "ddim"}),
         "`diffusion.name='flow'` is not a known diffusion family", "'ddpm', 'edm'"),
        (lambda: build_diffusion({"name": "edm", "sigma_dat": 0.5}, {"name": "heun"}),
         "`diffusion.sigma_dat` is not a parameter of EDMDiffusion",
         "name, sigma_data, p_mean, p_std, sigma_min, sigma_max, rho"),
        (lambda: build_diffusion({"name": "ddpm", "schedule": {"name": "squared"}}, {"name": "ddim"}),
         "`diffusion.schedule.name='squared'` is not a known noise schedule",
         "'cosine', 'cosine_clipped', 'linear', 'scaled_linear', 'sigmoid'"),
        (lambda: build_diffusion({"name": "ddpm", "predicton": "v"}, {"name": "ddim"}),
         "`diffusion.predicton` is not a parameter of DDPMDiffusion",
         "name, schedule, prediction, loss"),
        (lambda: build_diffusion({"name": "ddpm"}), "`sampler` is missing", "sampler=ddim"),
        (lambda: build_sampler("ddim"), "`sampler` must be a mapping with a `name` key",  # type: ignore[arg-type]
         "'heun'"),
    ]  # fmt: skip
    for make, first, valid in cases:
        with pytest.raises(ValueError) as err:
            make()
        message = str(err.value)
        assert type(err.value) is ValueError
        assert message.startswith(first), message
        assert valid in message, message
        assert "\n" not in message  # one paragraph


def test_with_options_returns_a_new_sampler_and_never_mutates() -> None:
    original = sampler("ddim", num_inference_steps=50, eta=1.0, use_clipped_model_output=True)
    before = original.to_config()
    changed = original.with_options(num_inference_steps=7, eta=0.0)
    assert changed is not original and type(changed) is type(original)
    assert original.to_config() == before
    assert changed.to_config() == {**before, "num_inference_steps": 7, "eta": 0.0}
    with pytest.raises(ValueError, match=r"`sampler.num_inference_steps=0`"):
        original.with_options(num_inference_steps=0)
    with pytest.raises(ValueError, match=r"`sampler.etta` is not a parameter"):
        original.with_options(etta=0.5)
    assert original.to_config() == before
    # Sampling with another sampler leaves the family's default alone.
    diffusion = ddpm(default=original)
    diffusion.sample(diffusion.denoiser(oracle(diffusion)), seeded_noise(1), changed)
    assert diffusion.sampler is original and original.to_config() == before


def test_config_validation_messages() -> None:
    with pytest.raises(ValueError, match=r"num_inference_steps=0` .*integer >= 1"):
        sampler("ddim", num_inference_steps=0)
    with pytest.raises(ValueError, match=r"num_inference_steps=2.5` .*integer >= 1"):
        sampler("heun", num_inference_steps=2.5)
    with pytest.raises(ValueError, match=r"eta=-0.1` .*>= 0"):
        sampler("ddim", eta=-0.1)
    with pytest.raises(
        ValueError, match=r"timestep_spacing='uniform'`.*'leading', 'trailing', 'linspace'"
    ):
        sampler("ddpm", timestep_spacing="uniform")
    with pytest.raises(ValueError, match=r"dynamic_threshold=1.5"):
        sampler("dpm_solver", dynamic_threshold=1.5)
    with pytest.raises(ValueError, match=r"`sampler.s_churn=-1` must be a number >= 0"):
        sampler("heun", s_churn=-1)
    with pytest.raises(ValueError, match=r"`sampler.s_noise=0` must be a number > 0"):
        sampler("euler", s_noise=0)


def test_sample_time_validation_messages() -> None:
    diffusion = ddpm(num_timesteps=100)
    net = oracle(diffusion)
    noise = seeded_noise(2)
    with pytest.raises(ValueError, match=r"num_inference_steps=200` exceeds .*num_timesteps=100"):
        run(diffusion, net, noise, sampler("ddim", num_inference_steps=200))
    with pytest.raises(
        ValueError, match=r"timestep_spacing='karras'` is not a spacing of the DDPM"
    ):
        run(diffusion, net, noise, sampler("ddim", timestep_spacing="karras"))
    with pytest.raises(ValueError, match=r"timestep_spacing='leading'` is a DDPM-family spacing"):
        run(edm(), net, noise, sampler("heun", timestep_spacing="leading"))
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        run(diffusion, net, noise, sampler("ddpm", num_inference_steps=5), make_generators(0, 0, 3))
    with pytest.raises(ValueError, match=r"output shape \(2, 1, 2, 4\) does not match"):
        run(diffusion, lambda x, t, cond=None: x[:, :, :2], noise, sampler("ddim"))
    with pytest.raises(ValueError, match=r"output shape .* does not match"):
        run(edm(), lambda x, t, cond=None: x[:, :, :2], noise, sampler("heun"))
    # Euler/Heun step in VE coordinates: a first level without signal cannot be one of them.
    zsnr = ddpm("v", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        run(zsnr, oracle(zsnr), noise, sampler("heun", timestep_spacing="trailing"))


# ---------------------------------------------------------------------------------------------
# The book's run, bit for bit


def book_alphas_cumprod() -> list[float]:
    """The book's schedule computed independently, in float64 Python: cosine abar (s = 0.008)
    turned into betas, clipped to [1e-4, 0.02], multiplied back up."""
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    betas = [min(max(1 - f[t + 1] / f[t], 1e-4), 0.02) for t in range(T)]
    return list(itertools.accumulate((1 - b for b in betas), operator.mul))


def test_book_config_is_ddim50_and_its_first_step_is_the_paper_formula() -> None:
    """`experiment=flowers64` composes to the book's process (DDPM, cosine_clipped, epsilon,
    L1, DDIM-50 with eta 1, leading spacing, use_clipped_model_output, final_alpha_one), and
    its first DDIM step on a fixed fake network output equals Song et al.'s formula computed
    here in float64 from an independent schedule (tolerance 1e-6; measured 2.8e-7; the x0
    estimate, divided by sqrt(abar_980) = 0.068, agrees to 1.7e-6)."""
    from flowerdiff.infra.config import model_spec

    from conftest import compose_config

    cfg = compose_config(["experiment=flowers64", "model=unet_tiny", "data.image_size=16"])
    spec = model_spec(cfg)
    diffusion = spec.build_diffusion()
    assert isinstance(diffusion, DDPMDiffusion)
    assert diffusion.schedule.to_config() == {
        "name": "cosine_clipped",
        "num_timesteps": 1000,
        "zero_terminal_snr": False,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "cosine_s": 0.008,
    }
    assert diffusion.prediction == "epsilon"
    assert diffusion.regression.to_config() == {
        "kind": "l1",
        "weighting": "none",
        "snr_gamma": 5.0,
        "huber_delta": 1.0,
    }
    assert diffusion.sampler.to_config() == {
        "name": "ddim",
        "num_inference_steps": 50,
        "timestep_spacing": None,
        "clip_sample": True,
        "dynamic_threshold": None,
        "eta": 1.0,
        "use_clipped_model_output": True,
        "final_alpha_one": True,
    }
    assert timesteps(diffusion.sampler, diffusion) == list(range(980, -1, -20))  # leading
    assert spec.image_shape == (3, 16, 16)

    # The first step, with a fake network whose x0 lands inside [-1, 1] on half the pixels
    # (the clip and the recomputed noise both matter).
    abar = book_alphas_cumprod()
    a_t, a_p = abar[980], abar[960]
    gens = make_generators(11, 0, 2)
    x_t = randn_per_image((2, 3, 4, 4), gens, "cpu")
    u = torch.linspace(-2.0, 2.0, 96).view(2, 3, 4, 4)
    eps = ((x_t.double() - math.sqrt(a_t) * u) / math.sqrt(1 - a_t)).float()
    seen: list[Tensor] = []

    def fake(x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        seen.append(t)
        return eps

    out = diffusion.sample(
        diffusion.denoiser(fake), x_t, generators=gens, return_intermediates=True
    )
    assert seen[0].tolist() == [980, 980]
    # The step's fresh noise is each image's next draw after its starting noise, as in
    # DiffusionModule.sample.
    replay = make_generators(11, 0, 2)
    assert torch.equal(randn_per_image((2, 3, 4, 4), replay, "cpu"), x_t)
    z = randn_per_image((2, 3, 4, 4), replay, "cpu").double()
    x, e = x_t.double(), eps.double()
    x0 = ((x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)).clamp(-1, 1)
    assert 0 < int((x0.abs() < 1).sum()) < x0.numel()
    e = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)  # use_clipped_model_output
    std = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))  # eta = 1
    expected = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - std**2) * e + std * z
    torch.testing.assert_close(out.pred_x0[0].double(), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.intermediates[0].double(), expected, atol=1e-6, rtol=0)
