"""The DDPM family's training loss: per-kind values, reduction, min-SNR weights, targets and the
validation levels, by hand. (EDM's preconditioned loss is in test_edm.py.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from flowerdiff.diffusion import DDPMDiffusion, NoiseSchedule, build_diffusion, build_sampler
from flowerdiff.diffusion.losses import RegressionLoss, min_snr_weight

# Two samples of four pixels; "x0" prediction makes the target the x0 we pass in.
OUTPUT = torch.tensor([[0.5, -2.0, 0.1, 3.0], [0.0, 0.25, -0.75, 1.5]]).view(2, 1, 2, 2)
X0 = torch.zeros(2, 1, 2, 2)
NOISE = torch.ones(2, 1, 2, 2)
T_SMALL_LARGE = torch.tensor([100, 900])  # SNR above and below gamma = 5 on the book schedule


def ddpm(prediction: str = "x0", schedule: dict | None = None, **loss: object) -> DDPMDiffusion:
    return DDPMDiffusion(
        build_sampler({"name": "ddim"}), schedule=schedule, prediction=prediction, loss=loss
    )


def constant_net(output: Tensor) -> Callable[..., Tensor]:
    """A network (x, t, cond) -> output that ignores its inputs."""
    return lambda x, t, cond=None: output


def _hand_loss(kind: str, weights: list[float] | None = None, delta: float = 1.0) -> float:
    def per_pixel(d: float) -> float:
        if kind == "l1":
            return abs(d)
        if kind == "l2":
            return d * d
        return 0.5 * d * d if abs(d) < delta else delta * (abs(d) - 0.5 * delta)

    rows = OUTPUT.view(2, 4).tolist()
    per_sample = [sum(per_pixel(d) for d in row) / 4 for row in rows]
    weights = weights or [1.0, 1.0]
    return sum(w * v for w, v in zip(weights, per_sample, strict=True)) / 2


@pytest.mark.parametrize(
    ("kind", "delta"), [("l1", 1.0), ("l2", 1.0), ("huber", 1.0), ("huber", 0.3)]
)
def test_loss_values_by_hand(kind: str, delta: float) -> None:
    value = ddpm(kind=kind, huber_delta=delta).loss(
        constant_net(OUTPUT), X0, noise=NOISE, levels=T_SMALL_LARGE
    )
    assert value.ndim == 0
    assert value.item() == pytest.approx(_hand_loss(kind, delta=delta), rel=1e-6)


def test_l1_is_the_default_and_value_is_known() -> None:
    # Sample 1: (0.5 + 2 + 0.1 + 3) / 4 = 1.4; sample 2: (0 + 0.25 + 0.75 + 1.5) / 4 = 0.625.
    diffusion = ddpm()
    assert diffusion.regression.kind == "l1"
    value = diffusion.loss(constant_net(OUTPUT), X0, noise=NOISE, levels=T_SMALL_LARGE)
    assert value.item() == pytest.approx((1.4 + 0.625) / 2)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_min_snr_weights_by_hand(prediction: str) -> None:
    """Hang et al. 2023: eps min(snr,g)/snr, v min(snr,g)/(snr+1), x0 min(snr,g)."""
    gamma = 5.0
    abar = NoiseSchedule().alphas_cumprod[T_SMALL_LARGE].double().tolist()
    snr = [a / (1 - a) for a in abar]
    assert snr[0] > gamma > snr[1]  # both branches of the min are exercised
    hand = {
        "epsilon": [min(s, gamma) / s for s in snr],
        "v": [min(s, gamma) / (s + 1) for s in snr],
        "x0": [min(s, gamma) for s in snr],
    }[prediction]
    # x0 = noise = 0 makes every target 0, so the residual is OUTPUT whatever the type.
    x0, noise = torch.zeros_like(X0), torch.zeros_like(NOISE)
    diffusion = ddpm(prediction, kind="l2", weighting="min_snr", snr_gamma=gamma)
    value = diffusion.loss(constant_net(OUTPUT), x0, noise=noise, levels=T_SMALL_LARGE)
    assert value.item() == pytest.approx(_hand_loss("l2", weights=hand), rel=1e-5)


def test_min_snr_weights_at_zero_terminal_snr() -> None:
    """At snr = 0 the epsilon weight min(0, g) / 0 has the limit 1 (finite, computed as
    g / max(snr, g)); through the family, v at a zero-SNR step gets weight 0 / 1 = 0."""
    snr = torch.tensor([0.0, 2.0, 50.0])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v"), torch.tensor([0.0, 2 / 3, 5 / 51]))
    diffusion = ddpm("v", {"zero_terminal_snr": True}, kind="l1", weighting="min_snr")
    value = diffusion.loss(constant_net(OUTPUT), X0, noise=NOISE, levels=torch.tensor([999, 999]))
    assert value.item() == 0.0


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_target_per_prediction_type(prediction: str) -> None:
    """A perfect prediction of the documented target gives zero loss; the noise does not."""
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    t = torch.tensor([5, 400, 990])
    abar = NoiseSchedule().alphas_cumprod[t].view(-1, 1, 1, 1)
    target = {
        "epsilon": noise,
        "x0": x0,
        "v": abar.sqrt() * noise - (1 - abar).sqrt() * x0,
    }[prediction]
    diffusion = ddpm(prediction, kind="l2")
    perfect = diffusion.loss(constant_net(target), x0, noise=noise, levels=t)
    assert perfect.item() == pytest.approx(0, abs=1e-10)
    wrong = noise if prediction != "epsilon" else x0
    assert diffusion.loss(constant_net(wrong), x0, noise=noise, levels=t).item() > 0.1


def test_network_sees_the_noised_input_and_its_timesteps() -> None:
    """net(x_t, t, cond) with x_t = sqrt(abar) x0 + sqrt(1 - abar) noise, t as given; without
    levels, t is drawn uniformly from 0..T-1 as long integers."""
    diffusion = ddpm("epsilon")
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 1, 2, 2, generator=gen), torch.randn(2, 1, 2, 2, generator=gen)
    seen: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def net(x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        seen.append((x, t, cond))
        return torch.zeros_like(x)

    labels = torch.tensor([4, 1])
    diffusion.loss(net, x0, labels, noise=noise, levels=T_SMALL_LARGE)
    x, t, cond = seen[0]
    abar = NoiseSchedule().alphas_cumprod[T_SMALL_LARGE].view(-1, 1, 1, 1)
    torch.testing.assert_close(x, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    assert torch.equal(t, T_SMALL_LARGE) and cond is labels
    with torch.random.fork_rng():
        torch.manual_seed(0)
        diffusion.loss(net, torch.zeros(4096, 1, 1, 1))
    drawn = seen[1][1]
    assert drawn.dtype == torch.long and drawn.shape == (4096,)
    assert int(drawn.min()) >= 0 and int(drawn.max()) <= 999
    # Uniform on 0..999: mean 499.5, s.e. 289 / sqrt(4096) = 4.5; 5 s.e. of slack.
    assert abs(drawn.double().mean().item() - 499.5) < 23


def test_validation_levels_are_a_fixed_grid_by_index() -> None:
    """10 timesteps round(linspace(0, 999, 10)), picked by data-set index modulo 10, so the
    validation loss compares across epochs and runs."""
    diffusion = ddpm()
    grid = [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    indices = torch.tensor([0, 1, 9, 10, 23])
    assert diffusion.validation_levels(indices).tolist() == [grid[i % 10] for i in indices]


def test_half_precision_output_gives_float32_loss() -> None:
    value = ddpm().loss(constant_net(OUTPUT.bfloat16()), X0, noise=NOISE, levels=T_SMALL_LARGE)
    assert value.dtype == torch.float32


def test_invalid_arguments_name_the_key_and_valid_values() -> None:
    with pytest.raises(ValueError, match=r"`diffusion.loss.kind='mse'`.*'l1', 'l2', 'huber'"):
        RegressionLoss(kind="mse")
    with pytest.raises(ValueError, match=r"weighting='snr'`.*'none', 'min_snr'"):
        RegressionLoss(weighting="snr")
    with pytest.raises(ValueError, match="snr_gamma=0"):
        RegressionLoss(snr_gamma=0)
    with pytest.raises(ValueError, match="huber_delta=-1"):
        RegressionLoss(huber_delta=-1)
    # Through the family: a misspelt key is named with the keys that exist.
    with pytest.raises(ValueError) as err:
        ddpm(kind="l1", wieghting="min_snr")
    assert str(err.value).startswith("`diffusion.loss.wieghting` is not a parameter")
    assert "are: kind, weighting, snr_gamma, huber_delta." in str(err.value)
    with pytest.raises(ValueError, match=r"`diffusion.loss` must be a mapping"):
        build_diffusion({"name": "ddpm", "loss": "l1"}, {"name": "ddim"})
