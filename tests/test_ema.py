"""EMA: the warm-up and power-function arithmetic by hand and against EDM2's values, the averaged
weights against a manual computation, exact resume, the start/every-n rules, the config, and
post-hoc reconstruction."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, WeightAveraging
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from flowerdiff.callbacks.ema import (
    EMA,
    gamma_to_sigma_rel,
    list_snapshots,
    posthoc_checkpoint,
    posthoc_coefficients,
    power_beta,
    reconstruct_posthoc,
    sigma_rel_to_gamma,
)

from conftest import compose_config

# ---------------------------------------------------------------------------------------------
# The arithmetic


def test_warmup_decay_by_hand() -> None:
    ema = EMA(kind="warmup", decay=0.99)
    assert ema.decay_at(0) == 0.0  # the first update copies the weights
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(8) == pytest.approx(9 / 18)
    assert ema.decay_at(80) == pytest.approx(0.9)
    assert ema.decay_at(889) == pytest.approx(890 / 899)  # 0.98999 < 0.99: still warming up
    assert ema.decay_at(890) == 0.99  # (891/900 = 0.99): the cap from here on
    assert ema.decay_at(10**6) == 0.99
    constant = EMA(kind="constant", decay=0.9)
    assert [constant.decay_at(n) for n in (0, 1, 50)] == [0.0, 0.9, 0.9]


def test_power_gamma_matches_the_paper_and_inverts() -> None:
    # EDM2 (Karras et al. 2024), section 3.1: sigma_rel 0.10 <-> gamma 6.94, 0.05 <-> 16.97.
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    for sigma in (0.01, 0.05, 0.1, 0.2, 0.28):
        gamma = sigma_rel_to_gamma(sigma)
        assert gamma > 0
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma, rel=1e-12)
    # By hand: gamma = 1 gives sigma_rel = sqrt(2 / (9 * 4)) = sqrt(1/18).
    assert sigma_rel_to_gamma(math.sqrt(1 / 18)) == pytest.approx(1.0, rel=1e-9)


def test_power_beta_by_hand() -> None:
    gamma = sigma_rel_to_gamma(0.10)
    ema = EMA(kind="power", sigma_rel=0.10)
    assert ema.decay_at(0) == 0.0  # t = 1: (1 - 1/1)**(gamma+1) = 0, a copy
    assert ema.decay_at(1) == pytest.approx(0.5 ** (gamma + 1))  # t = 2
    assert ema.decay_at(99) == pytest.approx((1 - 1 / 100) ** (gamma + 1))  # t = 100
    assert power_beta(1.0, 3) == pytest.approx((3 / 4) ** 2)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.2])
def test_power_ema_weights_follow_the_profile_of_width_sigma_rel(sigma_rel: float) -> None:
    """The weight of update tau in the average after T updates is prod of the betas after it
    times its (1 - beta): its spread over tau / T must be sigma_rel, whatever T."""
    ema = EMA(kind="power", sigma_rel=sigma_rel)
    for total in (2_000, 20_000):
        betas = np.array([ema.decay_at(n) for n in range(total)])  # update t = n + 1
        after = np.concatenate([np.cumprod(betas[::-1])[::-1][1:], [1.0]])
        weights = (1 - betas) * after
        assert weights.sum() == pytest.approx(1.0, abs=1e-9)
        tau = np.arange(1, total + 1) / total
        mean = (weights * tau).sum()
        std = math.sqrt((weights * (tau - mean) ** 2).sum())
        assert std == pytest.approx(sigma_rel, rel=0.01)


def test_invalid_settings_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"callbacks\.ema\.kind"):
        EMA(kind="linear")
    with pytest.raises(ValueError, match=r"callbacks\.ema\.decay"):
        EMA(decay=1.0)
    with pytest.raises(ValueError, match=r"callbacks\.ema\.sigma_rel"):
        EMA(kind="power", sigma_rel=0.3)
    with pytest.raises(ValueError, match=r"callbacks\.ema\.update_every_n_steps"):
        EMA(update_every_n_steps=0)
    with pytest.raises(ValueError, match=r"callbacks\.ema\.update_starting_at_step"):
        EMA(update_starting_at_step=-1)
    with pytest.raises(ValueError, match=r"callbacks\.ema\.posthoc_sigma_rels"):
        EMA(posthoc_sigma_rels=[0.05, 0.5])
    EMA(kind="warmup", sigma_rel=0.5)  # unused by warmup: not checked


def test_default_config_is_the_warmup_ema_and_the_book_has_none() -> None:
    cfg = compose_config()
    ema = instantiate(cfg.callbacks.ema)
    assert isinstance(ema, EMA) and isinstance(ema, WeightAveraging)
    assert ema.kind == "warmup" and ema.decay == 0.999
    assert compose_config(["experiment=flowers64"]).callbacks.ema is None


# ---------------------------------------------------------------------------------------------
# In training


class Tiny(L.LightningModule):
    """A linear layer (and an integer buffer, which must be copied, not averaged)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 2)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        self.seen += 1
        return (self.net(batch[0]) - 1).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2)


class RecordWeights(Callback):
    """The training weights after every optimizer step."""

    def __init__(self) -> None:
        self.weights: list[Tensor] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_) -> None:
        self.weights.append(torch.nn.utils.parameters_to_vector(pl_module.parameters()).clone())


def loader(batches: int) -> DataLoader:
    x = torch.linspace(-1, 1, 2 * batches * 3).reshape(2 * batches, 3)
    return DataLoader(TensorDataset(x), batch_size=2, shuffle=False)


def fit(
    ema: EMA, steps: int, tmp_path: Path, *extra: Callback, ckpt_path: str | None = None
) -> tuple[Tiny, RecordWeights]:
    module, record = Tiny(), RecordWeights()
    trainer = L.Trainer(
        max_epochs=steps // 3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in extra),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[record, ema, *extra],
    )
    trainer.fit(module, loader(3), ckpt_path=ckpt_path)  # 3 optimizer steps per epoch
    return module, record


def manual_ema(weights: list[Tensor], decays: list[float]) -> Tensor:
    average = weights[0].double()
    for n, w in enumerate(weights[1:], start=1):
        average = decays[n] * average + (1 - decays[n]) * w.double()
    return average


@pytest.mark.parametrize(
    "settings", [{"kind": "warmup", "decay": 0.5}, {"kind": "power", "sigma_rel": 0.2}]
)
def test_averaged_weights_equal_a_manual_computation(tmp_path: Path, settings: dict) -> None:
    ema = EMA(**settings)
    module, record = fit(ema, 6, tmp_path)
    decays = [ema.decay_at(n) for n in range(6)]
    assert 0 < decays[1] < decays[5] < 1  # the warm-up / power profile is in effect
    expected = manual_ema(record.weights, decays)
    # After fit, Lightning copies the averaged weights over the model.
    got = torch.nn.utils.parameters_to_vector(module.parameters()).double()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(got, record.weights[-1].double())
    assert int(module.seen) == 6  # the integer buffer is copied, not lerped
    assert ema.num_updates == 6 == int(ema._average_model.n_averaged)


def test_start_step_copies_and_every_n_skips(tmp_path: Path) -> None:
    ema = EMA(kind="warmup", decay=0.9, update_starting_at_step=2, update_every_n_steps=2)
    module, record = fit(ema, 6, tmp_path)
    # Steps 0 and 1 (0-based) copy; averaging updates after steps 2 and 4 only.
    assert ema.num_updates == 2
    expected = manual_ema([record.weights[2], record.weights[4]], [0.0, ema.decay_at(1)])
    got = torch.nn.utils.parameters_to_vector(module.parameters()).double()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["warmup", "power"])
def test_resume_gives_the_same_ema_as_a_straight_run(tmp_path: Path, kind: str) -> None:
    def checkpoints(run: str) -> ModelCheckpoint:
        return ModelCheckpoint(
            dirpath=tmp_path / run, filename="{epoch}", save_top_k=-1, every_n_epochs=1
        )

    settings = {"kind": kind, "decay": 0.8, "sigma_rel": 0.15}
    fit(EMA(**settings), 6, tmp_path / "a", checkpoints("straight"))
    resumed_ema = EMA(**settings)
    fit(
        resumed_ema,
        6,
        tmp_path / "b",
        checkpoints("resumed"),
        ckpt_path=str(tmp_path / "straight" / "epoch=0.ckpt"),
    )
    assert resumed_ema.num_updates == 6
    straight = torch.load(tmp_path / "straight" / "epoch=1.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "epoch=1.ckpt", weights_only=True)
    for key in ("state_dict", "current_model_state", "averaging_state"):
        assert straight[key].keys() == resumed[key].keys()
        for name in straight[key]:
            torch.testing.assert_close(resumed[key][name], straight[key][name], rtol=0, atol=0)
    assert int(straight["averaging_state"]["n_averaged"]) == 6
    # A resume that restarted the warm-up/power count would differ:
    assert not torch.equal(
        straight["state_dict"]["net.weight"], straight["current_model_state"]["net.weight"]
    )


# ---------------------------------------------------------------------------------------------
# Post-hoc EMA


def simulate(sigma_rels: list[float], trajectory: np.ndarray, every: int) -> dict:
    """Power EMAs of a scalar trajectory; snapshots every ``every`` updates."""
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    averages = [0.0] * len(gammas)
    snapshots = []
    for n, value in enumerate(trajectory):
        for k, gamma in enumerate(gammas):
            beta = power_beta(gamma, n)
            averages[k] = beta * averages[k] + (1 - beta) * value
        if (n + 1) % every == 0:
            snapshots += [(n + 1, s, averages[k]) for k, s in enumerate(sigma_rels)]
    return {"final": averages, "snapshots": snapshots}


def test_posthoc_reconstruction_matches_a_tracked_profile() -> None:
    """EDM2's least squares over stored 0.05/0.10 snapshots recovers an EMA of width 0.07
    (tracked directly for comparison) far better than either stored profile does."""
    steps = np.arange(1, 4001)
    trajectory = np.sin(steps / 400) + 0.3 * np.cos(steps / 97) + steps / 4000
    stored = simulate([0.05, 0.10], trajectory, every=400)
    target = simulate([0.07], trajectory, every=4000)["final"][0]
    t, s, values = zip(*stored["snapshots"], strict=True)
    weights = posthoc_coefficients(t, s, 4000, 0.07)
    assert weights.sum() == pytest.approx(1.0)
    reconstructed = float(np.dot(weights, values))
    error = abs(reconstructed - target)
    assert error < 0.02 * abs(stored["final"][0] - stored["final"][1])
    # Asking for a stored profile at the last snapshot gives that snapshot.
    one_hot = posthoc_coefficients(t, s, 4000, 0.10)
    assert one_hot[-1] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_posthoc_snapshots_and_checkpoint(tmp_path: Path) -> None:
    ema = EMA(
        kind="power",
        sigma_rel=0.10,
        posthoc_sigma_rels=[0.05, 0.10],
        posthoc_every_n_steps=4,
        posthoc_dir=str(tmp_path / "posthoc"),
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", every_n_epochs=2)
    fit(ema, 6, tmp_path, checkpoint)
    found = list_snapshots(tmp_path / "posthoc")
    # Every 4 steps, and at the end of training (step 6), between two multiples.
    assert [(t, s) for t, s, _ in found] == [(4, 0.05), (4, 0.1), (6, 0.05), (6, 0.1)]
    # The tracked 0.10 profile is the callback's own (same sigma_rel, same count).
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    snapshot = torch.load(found[-1][2], weights_only=True)["state_dict"]
    torch.testing.assert_close(snapshot["net.weight"], ckpt["state_dict"]["net.weight"])
    rebuilt = reconstruct_posthoc(tmp_path / "posthoc", 0.10)
    torch.testing.assert_close(rebuilt["net.weight"], snapshot["net.weight"], atol=1e-5, rtol=0)
    out = posthoc_checkpoint(
        tmp_path / "ckpt" / "last.ckpt",
        tmp_path / "posthoc",
        0.07,
        tmp_path / "phema.ckpt",
        load=lambda p: torch.load(p, weights_only=True),
    )
    written = torch.load(out, weights_only=True)
    torch.testing.assert_close(
        written["state_dict"]["net.weight"],
        reconstruct_posthoc(tmp_path / "posthoc", 0.07)["net.weight"],
    )
    assert written["current_model_state"].keys() == ckpt["current_model_state"].keys()
    with pytest.raises(ValueError, match="no post-hoc EMA snapshots"):
        reconstruct_posthoc(tmp_path / "posthoc", 0.07, updates=5)
