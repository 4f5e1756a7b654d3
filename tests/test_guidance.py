"""Classifier-free guidance on the analytic mixture oracle (one Gaussian per class, exact
conditional and unconditional denoisers), for every sampler and both families.

The closed form used throughout. Classes k have means m_k and a common per-pixel std s_d; in
VE coordinates (y = x / alpha at noise level s = sigma / alpha) the class-k denoiser is
D_k = m_k + g' (y - m_k) with g' = s_d^2 / (s_d^2 + s^2), and the unconditional one is
sum_k r_k(y) D_k with responsibilities r_k ∝ exp(-|y - m_k|^2 / (2 (s_d^2 + s^2))). Because
the variances are equal, D_k - D_c = g (m_k - m_c) with g = s^2 / (s_d^2 + s^2), so

    D_w = D_u + w (D_c - D_u) = D_c + (w - 1) g (m_c - m̄(y)),   m̄ = sum_k r_k m_k.

Guidance therefore pushes the clean estimate along m_c - m̄, away from the responsibility-
weighted mean of the classes, by (w - 1) g; it acts where the noise is large (g ~ 1) and the
classes still overlap (m̄ far from m_c), and vanishes at w = 1. The guided probability-flow ODE,
dy/d ln(s) = y - D_w(y, s), has no closed-form solution (m̄ depends on y), so the tests
integrate it with RK4 in ln(s) from that closed-form D_w, independently of the library, and
compare the deterministic samplers with it per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from flowerdiff.diffusion import (
    Diffusion,
    NoiseLevel,
    Sampler,
    build_diffusion,
    build_sampler,
)
from flowerdiff.diffusion.analytic import GaussianMixtureOracle
from flowerdiff.diffusion.guidance import Guidance
from flowerdiff.training.module import DiffusionModule

K = 3  # classes; label K is the null (unconditional) class
SHAPE = (1, 2, 2)
MEANS = 0.4 * torch.tensor(
    [[1, 1, -1, -1], [-1, 1, 1, -1], [1, -1, 1, -1]], dtype=torch.float64
).view(K, *SHAPE)
STD = torch.tensor([0.25, 0.3, 0.35, 0.3], dtype=torch.float64).view(SHAPE)  # every class
SAMPLER_NAMES = ["ddim", "ddpm", "dpm_solver", "heun", "euler"]


def family(name: str, chosen: str = "ddim", **options: object) -> Diffusion:
    return build_diffusion({"name": name}, {"name": chosen, **options})


def sampler(name: str, **options: object) -> Sampler:
    return build_sampler({"name": name, **options})


def mixture(diffusion: Diffusion) -> GaussianMixtureOracle:
    return GaussianMixtureOracle(MEANS.float(), STD.float().expand(K, *SHAPE), diffusion)


def away_directions() -> Tensor:
    """[K, C, H, W]: unit vector from the mean of the other classes to class k's mean."""
    directions = []
    for c in range(K):
        others = torch.cat([MEANS[:c], MEANS[c + 1 :]]).mean(0)
        direction = MEANS[c] - others
        directions.append(direction / direction.norm())
    return torch.stack(directions)


def closed_form_guided(y: Tensor, s: float, labels: Tensor, w: float) -> Tensor:
    """D_w in VE coordinates, written from the formula in the module docstring."""
    y = y.double()
    var = STD**2
    m_c = MEANS[labels]
    conditional = m_c + var / (var + s * s) * (y - m_c)
    log_r = (-0.5 * (y[None] - MEANS[:, None]) ** 2 / (var + s * s)).flatten(2).sum(-1)
    m_bar = torch.einsum("kb,kchw->bchw", log_r.softmax(0), MEANS)
    return conditional + (w - 1) * s * s / (var + s * s) * (m_c - m_bar)


def closed_form_ode(y: Tensor, s_start: float, labels: Tensor, w: float) -> Tensor:
    """End point of the guided probability-flow ODE from (y, s_start): RK4 in u = ln(s) with
    100 steps down to s = 0.002, then the last jump to s = 0 lands on D_w (as every sampler's
    final step does). 400 steps change the result by < 1e-5."""
    s_end, steps = 0.002, 100
    u, h = math.log(s_start), (math.log(s_end) - math.log(s_start)) / steps
    y = y.double()

    def slope(y: Tensor, u: float) -> Tensor:
        return y - closed_form_guided(y, math.exp(u), labels, w)

    for _ in range(steps):
        k1 = slope(y, u)
        k2 = slope(y + h / 2 * k1, u + h / 2)
        k3 = slope(y + h / 2 * k2, u + h / 2)
        k4 = slope(y + h * k3, u + h)
        y, u = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), u + h
    return closed_form_guided(y, s_end, labels, w)


def guided_samples(
    diffusion: Diffusion,
    chosen: Sampler,
    w: float,
    n: int,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(final unclamped x, labels, starting noise): n images, classes in turn, fresh noise of
    the stochastic steps from the global RNG seeded at ``seed``."""
    labels = torch.arange(n) % K
    noise = torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed))
    denoiser = Guidance(scale=w).denoiser(diffusion, mixture(diffusion), labels, K)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = diffusion.sample(denoiser, noise, chosen, return_intermediates=True)
    return out.intermediates[-1].double(), labels, noise


# ---------------------------------------------------------------------------------------------
# The guided estimate


@pytest.mark.parametrize("family_name", ["ddpm", "edm"])
def test_guided_estimate_is_the_closed_form(family_name: str) -> None:
    """Guidance.denoiser (one doubled forward of the mixture oracle through the family's
    parametrisation, then D_u + w (D_c - D_u)) equals the closed form D_c + (w - 1) g
    (m_c - m̄) at levels across the range, for w = 0 (unconditional), 0.5, 1, 2 and 5.
    Float32 network outputs: measured max difference 5.5e-7 on EDM and 1.2e-5 on the DDPM
    family, at t = 999 where x0 = (x - sigma eps) / alpha divides the float32 rounding of
    eps by alpha = 0.057 (tolerance 5e-5)."""
    diffusion = family(family_name)
    oracle = mixture(diffusion)
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    levels = (
        [diffusion.level(t) for t in (5, 300, 700, 999)]  # type: ignore[attr-defined]
        if family_name == "ddpm"
        else [diffusion.level(s) for s in (0.01, 0.4, 2.0, 80.0)]  # type: ignore[attr-defined]
    )
    for level in levels:
        x0 = MEANS[labels] + STD * torch.randn(6, *SHAPE, generator=gen, dtype=torch.float64)
        x = diffusion.add_noise(x0, torch.randn(6, *SHAPE, generator=gen), level).float()
        for w in (0.0, 0.5, 1.0, 2.0, 5.0):
            got = Guidance(scale=w).denoiser(diffusion, oracle, labels, K)(x, level)
            expected = closed_form_guided(x / level.alpha, level.ve_sigma, labels, w)
            torch.testing.assert_close(got.double(), expected, atol=5e-5, rtol=0)
        unconditional = oracle.clean_estimate(x, level.alpha, level.sigma, None)
        w0 = Guidance(scale=0.0).denoiser(diffusion, oracle, labels, K)(x, level)
        torch.testing.assert_close(w0.double(), unconditional, atol=5e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# w = 1: each class's own Gaussian, for every sampler


# Per class c (2048 images of 2x2; 6144 in all), the RMS over pixels of the sample mean's
# error and the pixel-averaged std error, against m_c and the class std (0.25..0.35).
# Measured worst over seeds 0-9 and the 3 classes, mean RMS | std error:
#   DDPM family  ddim eta 1, 50   0.0114 | 0.0329    ddpm-100  0.0123 | 0.0186
#                dpm_solver-20    0.0174 | 0.0153    heun-18   0.0173 | 0.0184
#                euler-50         0.0171 | 0.0197
#   EDM          ddim eta 1, 100  0.0116 | 0.0236    ddpm-100  0.0116 | 0.0236 (same step)
#                dpm_solver-20    0.0150 | 0.0210    heun-18   0.0151 | 0.0234
#                euler-50         0.0134 | 0.0241
# Sampling error alone: a pixel's mean has s.e. 0.3 / sqrt(2048) = 0.0066, so the RMS of four
# is ~0.007; the DDPM family's ODE samplers add the ~0.3 sqrt(abar_999) |m| bias of their
# N(0, 1) start (see test_samplers). The std errors are the samplers' discretisation biases
# (as for one Gaussian; s.e. of a pixel-averaged std 0.002). Tolerances: 0.025 on the mean
# RMS, the worst std error + ~0.01 on the std.
W1_CASES = {
    "ddpm": {
        "ddim": ({"num_inference_steps": 50, "eta": 1.0}, 0.025, 0.045),
        "ddpm": ({"num_inference_steps": 100}, 0.025, 0.03),
        "dpm_solver": ({"num_inference_steps": 20}, 0.025, 0.025),
        "heun": ({"num_inference_steps": 18}, 0.025, 0.03),
        "euler": ({"num_inference_steps": 50}, 0.025, 0.03),
    },
    "edm": {
        "ddim": ({"num_inference_steps": 100, "eta": 1.0}, 0.025, 0.035),
        "ddpm": ({"num_inference_steps": 100}, 0.025, 0.035),
        "dpm_solver": ({"num_inference_steps": 20}, 0.025, 0.03),
        "heun": ({"num_inference_steps": 18}, 0.025, 0.035),
        "euler": ({"num_inference_steps": 50}, 0.025, 0.035),
    },
}


def class_errors(x: Tensor, labels: Tensor) -> list[tuple[float, float]]:
    """Per class: (RMS over pixels of sample mean - m_c, mean over pixels of sample std -
    std). The RMS lets no pixel's error cancel another's; the std error keeps its sign, the
    samplers' discretisation bias."""
    errors = []
    for c in range(K):
        samples = x[labels == c]
        errors.append(
            (
                (samples.mean(0) - MEANS[c]).pow(2).mean().sqrt().item(),
                (samples.std(0) - STD).mean().item(),
            )
        )
    return errors


@pytest.mark.parametrize(
    ("family_name", "name"),
    [(f, s) for f, cases in W1_CASES.items() for s in cases],
    ids=[f"{f}-{s}" for f, cases in W1_CASES.items() for s in cases],
)
def test_w1_reproduces_each_class_mean_and_std(family_name: str, name: str) -> None:
    options, mean_tol, std_tol = W1_CASES[family_name][name]
    diffusion = family(family_name)
    chosen = sampler(name, clip_sample=False, **options)
    x, labels, _ = guided_samples(diffusion, chosen, 1.0, 6144)
    for c, (mean_error, std_error) in enumerate(class_errors(x, labels)):
        assert mean_error < mean_tol, (c, mean_error)
        assert abs(std_error) < std_tol, (c, std_error)


# ---------------------------------------------------------------------------------------------
# w > 1: away from the other classes, as the closed form says


# Deterministic samplers against the RK4 solution of the closed-form guided ODE, per sample
# (768 images, w = 2 and 4; the class-0 mean moves by ~0.25 and ~0.52 along the away
# direction, so a wrong scale shows at once). Measured RMS, w = 2 / 4:
#   DDPM family  heun-40 0.0041 / 0.0052   dpm_solver-40 0.0021 / 0.0028
#                euler-100 = ddim eta 0, 100 trailing 0.0070 / 0.0071
#   EDM          heun-40 0.0039 / 0.0049   dpm_solver-40 0.0049 / 0.0079
#                euler-100 = ddim eta 0, 100 0.0092 / 0.0093
# These are the samplers' discretisation errors (first order for Euler/DDIM, second for Heun
# and DPM-Solver++); tolerances are ~1.6-2x the measured values.
ODE_CASES = {
    "ddpm": {
        "heun": ({"num_inference_steps": 40}, 0.01),
        "dpm_solver": ({"num_inference_steps": 40}, 0.006),
        "euler": ({"num_inference_steps": 100}, 0.012),
        "ddim": ({"num_inference_steps": 100, "eta": 0.0, "timestep_spacing": "trailing"}, 0.012),
    },
    "edm": {
        "heun": ({"num_inference_steps": 40}, 0.01),
        "dpm_solver": ({"num_inference_steps": 40}, 0.014),
        "euler": ({"num_inference_steps": 100}, 0.015),
        "ddim": ({"num_inference_steps": 100, "eta": 0.0}, 0.015),
    },
}


@pytest.mark.parametrize(
    ("family_name", "name"),
    [(f, s) for f, cases in ODE_CASES.items() for s in cases],
    ids=[f"{f}-{s}" for f, cases in ODE_CASES.items() for s in cases],
)
def test_guided_ode_samplers_follow_the_closed_form_ode(family_name: str, name: str) -> None:
    options, rms_tol = ODE_CASES[family_name][name]
    diffusion = family(family_name)
    chosen = sampler(name, clip_sample=False, **options)
    start = diffusion.plan(chosen).levels[0]
    for w in (2.0, 4.0):
        x, labels, noise = guided_samples(diffusion, chosen, w, 768)
        y_start = diffusion.initial_state(noise, start).double() / start.alpha
        reference = closed_form_ode(y_start, start.ve_sigma, labels, w)
        rms = (x - reference).pow(2).mean().sqrt().item()
        assert rms < rms_tol, (w, rms)


MONOTONE_CASES = {
    "ddim": {"num_inference_steps": 50, "eta": 1.0},
    "ddpm": {"num_inference_steps": 100},
    "dpm_solver": {"num_inference_steps": 20},
    "heun": {"num_inference_steps": 18},
    "euler": {"num_inference_steps": 50},
}


@pytest.mark.parametrize("family_name", ["ddpm", "edm"])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_guidance_moves_samples_away_from_the_other_classes(name: str, family_name: str) -> None:
    """For every sampler (the stochastic ones included, whose guided distribution is not the
    ODE's), the class means move along m_c - mean(others) monotonically in w: the projection
    of (sample mean - m_c) grows by > 0.05 from w = 1 to 2 and from 2 to 4 (its s.e. with
    512 images per class is ~0.013), and the distance to the nearest other class mean grows.
    Measured projections w = 1 / 2 / 4 (class 0, seed 0): ODE samplers ~0.00 / 0.25 / 0.52,
    ancestral (DDPM, DDIM eta 1) ~0.01 / 0.17 / 0.29. Smallest increments over seeds 0-4 and
    the 3 classes: 0.120 and 0.083 (ancestral), 0.195 and 0.202 (ODE); largest |projection|
    at w = 1: 0.039 (tolerance 0.06, ~4.5 s.e.)."""
    diffusion = family(family_name)
    chosen = sampler(name, clip_sample=False, **MONOTONE_CASES[name])
    directions = away_directions()
    projections, nearest = [], []
    for w in (1.0, 2.0, 4.0):
        x, labels, _ = guided_samples(diffusion, chosen, w, 1536)
        class_means = torch.stack([x[labels == c].mean(0) for c in range(K)])
        projections.append(((class_means - MEANS) * directions).flatten(1).sum(1))
        distances = (class_means[:, None] - MEANS[None]).flatten(2).norm(dim=2)  # [c, k]
        distances[torch.arange(K), torch.arange(K)] = math.inf
        nearest.append(distances.min(1).values)
    assert projections[0].abs().max() < 0.06, projections[0]
    assert bool((projections[1] - projections[0] > 0.05).all()), projections
    assert bool((projections[2] - projections[1] > 0.05).all()), projections
    assert bool((nearest[1] > nearest[0]).all() and (nearest[2] > nearest[1]).all()), nearest


# ---------------------------------------------------------------------------------------------
# Interval, rescale, one batched forward


class CountingNet(torch.nn.Module):
    """The mixture oracle as a network, recording each call's batch, time input and labels."""

    def __init__(self, diffusion: Diffusion) -> None:
        super().__init__()
        self.oracle = mixture(diffusion)
        self.num_classes = K
        self.calls: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        self.calls.append((x, t, class_labels))
        return self.oracle(x, t, class_labels)


def test_guidance_interval_applies_only_inside() -> None:
    """Kynkäänniemi et al.: guide only where low < sigma/alpha <= high; elsewhere the plain
    conditional model, with one un-doubled forward."""
    diffusion = family("edm")
    net = CountingNet(diffusion)
    labels = torch.tensor([0, 1, 2])
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2
    interval = Guidance(scale=3.0, interval=(0.5, 5.0)).denoiser(diffusion, net, labels, K)
    everywhere = Guidance(scale=3.0).denoiser(diffusion, net, labels, K)
    for s, inside in [(10.0, False), (5.0, True), (1.0, True), (0.5, False), (0.1, False)]:
        level = diffusion.level(s)  # type: ignore[attr-defined]
        net.calls.clear()
        got = interval(x, level)
        assert [len(call[0]) for call in net.calls] == [6 if inside else 3], s
        expected = everywhere(x, level) if inside else diffusion.denoise(net, x, level, labels)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        if s == 1.0:
            assert not torch.allclose(got, diffusion.denoise(net, x, level, labels), atol=1e-3)
    # Over a whole Heun run, doubled batches are exactly the evaluations inside the interval.
    net.calls.clear()
    diffusion.sample(interval, torch.randn(3, *SHAPE), sampler("heun", num_inference_steps=12))
    for x_in, c_noise, call_labels in net.calls:
        s = math.exp(4 * float(c_noise[0]))
        assert len(x_in) == (6 if 0.5 < s <= 5.0 else 3), s
        assert call_labels is not None and call_labels[:3].tolist() == [0, 1, 2]


def test_cfg_rescale() -> None:
    """Lin et al. 2023 on the x0 estimate: phi = 0 is plain guidance; phi = 1 rescales each
    image's guided estimate to the conditional estimate's std; phi in between mixes the two."""
    diffusion = family("ddpm")
    net = mixture(diffusion)
    labels = torch.tensor([0, 1, 2, 1])
    level = diffusion.level(600)  # type: ignore[attr-defined]
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(2))
    conditional = diffusion.denoise(net, x, level, labels)
    unconditional = diffusion.denoise(net, x, level, torch.full_like(labels, K))
    plain = unconditional + 3.0 * (conditional - unconditional)

    def guided(phi: float) -> Tensor:
        return Guidance(scale=3.0, rescale=phi).denoiser(diffusion, net, labels, K)(x, level)

    torch.testing.assert_close(guided(0.0), plain)
    rescaled = guided(1.0)
    per_image = (1, 2, 3)
    torch.testing.assert_close(rescaled.std(dim=per_image), conditional.std(dim=per_image))
    ratio = conditional.std(dim=per_image, keepdim=True) / plain.std(dim=per_image, keepdim=True)
    torch.testing.assert_close(rescaled, plain * ratio)
    assert not torch.allclose(ratio, torch.ones_like(ratio), atol=0.05)  # the rescale acts
    torch.testing.assert_close(guided(0.7), 0.7 * rescaled + 0.3 * plain)


@pytest.mark.parametrize("family_name", ["ddpm", "edm"])
def test_one_batched_forward_of_the_doubled_batch_per_guided_evaluation(
    family_name: str,
) -> None:
    """Every evaluation of a guided run is one network call on [x; x] with labels
    [labels; null]; w = 1 and w = 0 are single un-doubled calls (conditional, unconditional).
    Heun with 5 steps evaluates 9 times."""
    diffusion = family(family_name)
    net = CountingNet(diffusion)
    labels = torch.tensor([2, 0, 1, 1])
    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(3))
    heun = sampler("heun", num_inference_steps=5)
    for w, batch, expected_labels in [
        (3.0, 8, [2, 0, 1, 1, K, K, K, K]),
        (1.0, 4, [2, 0, 1, 1]),
        (0.0, 4, [K, K, K, K]),
    ]:
        net.calls.clear()
        diffusion.sample(Guidance(scale=w).denoiser(diffusion, net, labels, K), noise, heun)
        assert len(net.calls) == 9, w
        for x_in, _, call_labels in net.calls:
            assert len(x_in) == batch and call_labels is not None
            assert call_labels.tolist() == expected_labels
            if batch == 8:
                assert torch.equal(x_in[:4], x_in[4:])


@pytest.mark.parametrize(
    ("family_name", "config"),
    [
        ("ddpm", {"name": "ddpm", "num_inference_steps": 20}),
        ("ddpm", {"name": "ddim", "num_inference_steps": 20, "eta": 1.0}),
        ("edm", {"name": "heun", "num_inference_steps": 8, "s_churn": 10.0}),
        ("edm", {"name": "ddpm", "num_inference_steps": 20}),
    ],
    ids=["ddpm-ddpm", "ddpm-ddim", "edm-heun-churn", "edm-ddpm"],
)
def test_seeded_guided_sampling_is_per_image_and_independent_of_the_batch_split(
    family_name: str, config: dict
) -> None:
    """Through DiffusionModule.sample with labels and guidance: images 0..5 of a seed are the
    same in one batch or as 2 + 4 (generators by global index); another seed differs."""
    diffusion = build_diffusion({"name": family_name}, config)
    module = DiffusionModule(mixture(diffusion), diffusion, SHAPE).eval()
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    guidance = Guidance(scale=2.5)

    def images(seed: int, start: int, count: int) -> Tensor:
        return module.sample(
            count,
            seed=seed,
            start_index=start,
            class_labels=labels[start : start + count],
            guidance=guidance,
        ).images

    whole = images(7, 0, 6)
    torch.testing.assert_close(
        torch.cat([images(7, 0, 2), images(7, 2, 4)]), whole, atol=1e-6, rtol=0
    )
    assert torch.equal(images(7, 0, 6), whole)
    assert not torch.allclose(images(8, 0, 6), whole, atol=1e-3)
    # The labels matter: the same seed with other classes gives other images.
    other = module.sample(6, seed=7, class_labels=labels.roll(1), guidance=guidance).images
    assert not torch.allclose(other, whole, atol=1e-2)


def test_validation_messages() -> None:
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: Guidance(scale=-1.0), r"`guidance_scale=-1.0` must be a number >= 0"),
        (lambda: Guidance(scale=float("nan")), r"`guidance_scale=nan`"),
        (lambda: Guidance(scale=True), r"`guidance_scale=True`"),  # type: ignore[arg-type]
        (lambda: Guidance(interval=(5.0, 1.0)), r"`guidance_interval=\[5.0, 1.0\]` needs 0 <= low"),
        (lambda: Guidance(interval=(1.0,)), r"must be null or \[low, high\]"),  # type: ignore[arg-type]
        (lambda: Guidance(rescale=1.5), r"`guidance_rescale=1.5` must be in \[0, 1\]"),
        (lambda: Guidance(rescale="high"), r"`guidance_rescale='high'`"),  # type: ignore[arg-type]
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    assert Guidance(interval=[0.28, 5.42]).interval == (0.28, 5.42)  # type: ignore[arg-type]
    active = Guidance(interval=(0.28, 5.42))
    assert active.active(NoiseLevel(0.0, 1.0, 1.0)) and not active.active(NoiseLevel(0, 1.0, 6.0))
