"""DiffusionLoss: per-kind values, reduction, min-SNR weights and targets, by hand."""

from __future__ import annotations

import pytest
import torch

from flowerdiff.diffusion import DiffusionLoss, NoiseSchedule

# Two samples of four pixels; "x0" prediction makes the target the x0 we pass in.
OUTPUT = torch.tensor([[0.5, -2.0, 0.1, 3.0], [0.0, 0.25, -0.75, 1.5]]).view(2, 1, 2, 2)
X0 = torch.zeros(2, 1, 2, 2)
NOISE = torch.ones(2, 1, 2, 2)
T_SMALL_LARGE = torch.tensor([100, 900])  # SNR above and below gamma = 5 on the book schedule


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
    loss = DiffusionLoss(kind=kind, huber_delta=delta)
    value = loss(OUTPUT, X0, NOISE, T_SMALL_LARGE, NoiseSchedule(), prediction_type="x0")
    assert value.ndim == 0
    assert value.item() == pytest.approx(_hand_loss(kind, delta=delta), rel=1e-6)


def test_l1_is_the_default_and_value_is_known() -> None:
    # Sample 1: (0.5 + 2 + 0.1 + 3) / 4 = 1.4; sample 2: (0 + 0.25 + 0.75 + 1.5) / 4 = 0.625.
    value = DiffusionLoss()(OUTPUT, X0, NOISE, T_SMALL_LARGE, NoiseSchedule(), "x0")
    assert value.item() == pytest.approx((1.4 + 0.625) / 2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_min_snr_weights_by_hand(prediction_type: str) -> None:
    """Hang et al. 2023: eps min(snr,g)/snr, v min(snr,g)/(snr+1), x0 min(snr,g)."""
    schedule, gamma = NoiseSchedule(), 5.0
    abar = schedule.alphas_cumprod[T_SMALL_LARGE].double().tolist()
    snr = [a / (1 - a) for a in abar]
    assert snr[0] > gamma > snr[1]  # both branches of the min are exercised
    hand = {
        "epsilon": [min(s, gamma) / s for s in snr],
        "v": [min(s, gamma) / (s + 1) for s in snr],
        "x0": [min(s, gamma) for s in snr],
    }[prediction_type]
    # x0 = noise = 0 makes every target 0, so the residual is OUTPUT whatever the type.
    x0, noise = torch.zeros_like(X0), torch.zeros_like(NOISE)
    loss = DiffusionLoss(kind="l2", weighting="min_snr", snr_gamma=gamma)
    value = loss(OUTPUT, x0, noise, T_SMALL_LARGE, schedule, prediction_type)
    assert value.item() == pytest.approx(_hand_loss("l2", weights=hand), rel=1e-5)


def test_min_snr_epsilon_weight_finite_at_zero_terminal_snr() -> None:
    schedule = NoiseSchedule(zero_terminal_snr=True)
    t = torch.tensor([999, 999])
    loss = DiffusionLoss(kind="l1", weighting="min_snr")
    value = loss(OUTPUT, X0, torch.zeros_like(NOISE), t, schedule, "epsilon")
    # snr = 0 -> weight min(0, g) / 0 -> limit 1.
    assert value.item() == pytest.approx(_hand_loss("l1"), rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_target_per_prediction_type(prediction_type: str) -> None:
    """A perfect prediction of the documented target gives zero loss; the noise does not."""
    schedule = NoiseSchedule()
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    t = torch.tensor([5, 400, 990])
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = {
        "epsilon": noise,
        "x0": x0,
        "v": abar.sqrt() * noise - (1 - abar).sqrt() * x0,
    }[prediction_type]
    loss = DiffusionLoss(kind="l2")
    assert loss(target, x0, noise, t, schedule, prediction_type).item() == pytest.approx(
        0, abs=1e-10
    )
    wrong = noise if prediction_type != "epsilon" else x0
    assert loss(wrong, x0, noise, t, schedule, prediction_type).item() > 0.1


def test_half_precision_output_gives_float32_loss() -> None:
    value = DiffusionLoss()(OUTPUT.bfloat16(), X0, NOISE, T_SMALL_LARGE, NoiseSchedule(), "x0")
    assert value.dtype == torch.float32


def test_invalid_arguments_name_the_valid_values() -> None:
    with pytest.raises(ValueError, match=r"kind='mse'.*'l1', 'l2', 'huber'"):
        DiffusionLoss(kind="mse")
    with pytest.raises(ValueError, match=r"weighting='snr'.*'none', 'min_snr'"):
        DiffusionLoss(weighting="snr")
    with pytest.raises(ValueError, match="snr_gamma"):
        DiffusionLoss(snr_gamma=0)
    with pytest.raises(ValueError, match="huber_delta"):
        DiffusionLoss(huber_delta=-1)
    with pytest.raises(ValueError, match="prediction_type='eps'"):
        DiffusionLoss()(OUTPUT, X0, NOISE, T_SMALL_LARGE, NoiseSchedule(), "eps")
