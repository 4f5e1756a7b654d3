"""EMA of the weights that is useful from the first steps: warm-up or EDM2's power function.

Lightning's ``EMAWeightAveraging`` uses one constant decay: with 0.999 the averaged weights,
which every grid, sample and FID uses, are mostly the random initialisation for the first few
thousand steps. :class:`EMA` keeps Lightning's machinery (``WeightAveraging``: the averaged
weights are swapped in for validation, saved as the checkpoint's ``state_dict`` with the
training weights as ``current_model_state``, and copied over the model when training ends) and
changes only the decay ``beta_n`` of the update that folds in the ``(n+1)``-th weights:

- ``kind=constant``: ``beta_n = decay`` (Lightning's EMA).
- ``kind=warmup``: ``beta_n = min(decay, (1 + n) / (10 + n))``: 0.18 at the second update, 0.9
  at n = 80, 0.99 at n = 890, so the average follows the model early and still reaches
  ``decay``. This is diffusers' ``EMAModel(use_ema_warmup=False)`` rule and TensorFlow's
  ``ExponentialMovingAverage(num_updates=...)``.
- ``kind=power``: EDM2's power-function EMA (Karras et al. 2024, "Analyzing and Improving the
  Training Dynamics of Diffusion Models", eqs. 123-127): the average at update ``t`` weights
  the weights of update ``tau`` by ``tau**gamma``, a profile whose width relative to the
  training length is ``sigma_rel`` whatever the length; ``beta_t = (1 - 1/t)**(gamma + 1)``
  with ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))``. No decay to tune
  against the run's length; EDM2 uses sigma_rel 0.05-0.15.

``n`` counts averaging updates (not optimizer steps): the first update copies the weights,
each later one lerps with ``1 - beta_n``. The count is ``AveragedModel.n_averaged``, a buffer
saved in the checkpoint's ``averaging_state``, so a resumed run continues the profile exactly.
Updates use ``torch._foreach_lerp_`` on all tensors at once (one kernel per device and dtype).

``update_starting_at_step``: before that optimizer step the averaged weights are plain copies of
the training weights (so grids show the raw model); the warm-up or power profile starts there.

Post-hoc EMA (EDM2 section 3): with ``posthoc_sigma_rels`` (EDM2: ``[0.05, 0.10]``) the callback
also tracks those power-function profiles and writes both to ``posthoc_dir`` every
``posthoc_every_n_steps`` optimizer steps and when training ends; :func:`reconstruct_posthoc`
then combines the stored snapshots into the weights of any other ``sigma_rel`` (least squares
over the profiles, EDM2's Algorithm 3), so the EMA length is chosen after training:
``scripts/export.py posthoc_sigma_rel=...`` exports them, :func:`posthoc_checkpoint` writes
them as a checkpoint.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor, nn

from flowerdiff.files import atomic_torch_save

KINDS = ("warmup", "power", "constant")
# sigma_rel of the power function at gamma = 0, the widest profile with gamma > 0 (sqrt(1/12)).
MAX_SIGMA_REL = math.sqrt(1 / 12)
Loader = Callable[[Path], Any]  # reads a file as data (torch.load with weights_only)
# The post-hoc snapshots' default folder, beside the run's checkpoints/ (export.py looks there).
POSTHOC_DIR_NAME = "posthoc_ema"
SNAPSHOT_PATTERN = re.compile(r"ema-(\d+)-(\d+\.\d+)\.pt")


# -- the power function (EDM2) ------------------------------------------------------------------
def gamma_to_sigma_rel(gamma: float | np.ndarray) -> float | np.ndarray:
    """The relative standard deviation of the profile ``tau**gamma`` on [0, t] (EDM2 eq. 123)."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma > 0 whose profile has width ``sigma_rel`` (EDM2 eq. 126): the largest
    real root of ``gamma**3 + 7 gamma**2 + (16 - s) gamma + (12 - s)``, ``s = sigma_rel**-2``."""
    check_sigma_rel(sigma_rel, "sigma_rel")
    s = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def check_sigma_rel(sigma_rel: Any, key: str) -> None:
    """Refuse a relative EMA width outside (0, MAX_SIGMA_REL), naming the config ``key``."""
    if (
        isinstance(sigma_rel, bool)
        or not isinstance(sigma_rel, int | float)
        or not 0 < sigma_rel < MAX_SIGMA_REL
    ):
        raise ValueError(
            f"`{key}={sigma_rel!r}` must be in (0, {MAX_SIGMA_REL:.4f}): the EMA "
            "profile's width relative to the training length (EDM2 uses 0.05-0.15; larger is a "
            "longer average)."
        )


def power_beta(gamma: float, n: int) -> float:
    """beta of update ``t = n + 1`` of the power-function EMA: ``(1 - 1/t)**(gamma + 1)``."""
    return (n / (n + 1)) ** (gamma + 1) if n > 0 else 0.0


# -- the callback ---------------------------------------------------------------------------------
class EMA(WeightAveraging):
    """Exponential moving average of the weights with a warm-up or EDM2's power profile.

    Args:
        kind: ``warmup`` (default), ``power`` or ``constant`` (see the module docstring).
        decay: the largest decay (warmup) or the decay (constant); unused by ``power``.
        sigma_rel: the power profile's relative width; unused by the other kinds.
        update_every_n_steps: average after every n-th optimizer step.
        update_starting_at_step: optimizer step (0-based) of the first averaging update; before
            it the averaged weights are copies of the training weights. None: from the start.
        device: where the averaged weights live (None: beside the model).
        use_buffers: average the buffers too (the U-Net has none that change).
        posthoc_sigma_rels: power profiles to store for post-hoc EMA (EDM2: [0.05, 0.10]).
        posthoc_every_n_steps: optimizer steps between post-hoc snapshots.
        posthoc_dir: their folder (None: ``<trainer.default_root_dir>/posthoc_ema``).
    """

    def __init__(
        self,
        kind: str = "warmup",
        decay: float = 0.999,
        sigma_rel: float = 0.05,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        device: str | torch.device | None = None,
        use_buffers: bool = True,
        posthoc_sigma_rels: Sequence[float] | None = None,
        posthoc_every_n_steps: int = 1000,
        posthoc_dir: str | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(
                f"`callbacks.ema.kind={kind!r}` is not valid; use one of {', '.join(KINDS)} "
                "(warmup: min(decay, (1+n)/(10+n)); power: EDM2's sigma_rel profile)."
            )
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay < 1:
            raise ValueError(
                f"`callbacks.ema.decay={decay!r}` must be in [0, 1), e.g. 0.999 (the average "
                "spans about 1 / (1 - decay) updates)."
            )
        if kind == "power":
            check_sigma_rel(sigma_rel, "callbacks.ema.sigma_rel")
        for key, value, low in (
            ("update_every_n_steps", update_every_n_steps, 1),
            ("posthoc_every_n_steps", posthoc_every_n_steps, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`callbacks.ema.{key}={value!r}` must be an integer >= {low}.")
        if update_starting_at_step is not None and (
            isinstance(update_starting_at_step, bool)
            or not isinstance(update_starting_at_step, int)
            or update_starting_at_step < 0
        ):
            raise ValueError(
                f"`callbacks.ema.update_starting_at_step={update_starting_at_step!r}` must be "
                "null (average from the first step) or an optimizer step >= 0."
            )
        posthoc = [float(s) for s in posthoc_sigma_rels or ()]
        for s in posthoc:
            check_sigma_rel(s, "callbacks.ema.posthoc_sigma_rels")
        super().__init__(device=device, use_buffers=use_buffers, multi_avg_fn=self._average)
        self.kind = kind
        self.decay = float(decay)
        self.sigma_rel = float(sigma_rel)
        self.gamma = sigma_rel_to_gamma(sigma_rel) if kind == "power" else None
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.posthoc_sigma_rels = posthoc
        self.posthoc_gammas = [sigma_rel_to_gamma(s) for s in posthoc]
        self.posthoc_every_n_steps = posthoc_every_n_steps
        self.posthoc_dir = posthoc_dir
        self._posthoc: list[list[Tensor]] = []  # one list of tensors per post-hoc profile
        self._posthoc_saved_at = -1  # the update count of the latest post-hoc snapshots
        # Mirror of AveragedModel.n_averaged, read once at set-up/resume, so that an update never
        # waits for the device (a .item() per step would synchronise CUDA).
        self.num_updates = 0

    # -- the arithmetic ------------------------------------------------------------------------
    def decay_at(self, n: int) -> float:
        """beta of the update that folds in the ``(n+1)``-th weights (``n`` updates done)."""
        if n <= 0:
            return 0.0
        if self.kind == "constant":
            return self.decay
        if self.kind == "warmup":
            return min(self.decay, (1 + n) / (10 + n))
        assert self.gamma is not None
        return power_beta(self.gamma, n)

    def _average(self, averaged: list[Tensor], current: list[Tensor], _: Tensor) -> None:
        """AveragedModel's ``multi_avg_fn``: one foreach lerp for all floating tensors."""
        lerp(averaged, current, 1.0 - self.decay_at(self.num_updates))

    # -- when ----------------------------------------------------------------------------------
    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None:
            return False
        start = self.update_starting_at_step or 0
        return step_idx >= start and (step_idx - start) % self.update_every_n_steps == 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.num_updates = 0
            averaged, _ = self._pairs(pl_module)
            self._posthoc = [[t.detach().clone() for t in averaged] for _ in self.posthoc_gammas]

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step <= self._latest_update_step:  # no optimizer step in this batch
            return
        step_idx = trainer.global_step - 1
        start = self.update_starting_at_step
        if start is not None and step_idx < start:
            averaged, current = self._pairs(pl_module)
            copy(averaged, current)
            self._latest_update_step = trainer.global_step
            return
        if not self.should_update(step_idx=step_idx):
            return
        assert self._average_model is not None
        if self._posthoc:  # the post-hoc profiles advance with the same count
            _, current = self._pairs(pl_module)
            for gamma, profile in zip(self.posthoc_gammas, self._posthoc, strict=True):
                lerp(profile, current, 1.0 - power_beta(gamma, self.num_updates))
        self._average_model.update_parameters(pl_module)
        self.num_updates += 1
        self._latest_update_step = trainer.global_step
        if self._posthoc and trainer.global_step % self.posthoc_every_n_steps == 0:
            self.save_posthoc_snapshots(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Also store the profiles at the last update (as EDM2 does), so that a run stopped
        between two ``posthoc_every_n_steps`` (max_time, a race's clock) can be rebuilt at its
        end, not only at its last multiple."""
        if self._posthoc and self.num_updates != self._posthoc_saved_at:
            self.save_posthoc_snapshots(trainer, pl_module)
        super().on_train_end(trainer, pl_module)

    def _pairs(self, pl_module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """(averaged, current) tensors in AveragedModel's order (parameters, then buffers)."""
        assert self._average_model is not None
        averaged = self._average_model.module
        if self._use_buffers:
            return (
                [t.detach() for t in (*averaged.parameters(), *averaged.buffers())],
                [t.detach() for t in (*pl_module.parameters(), *pl_module.buffers())],
            )
        return (
            [p.detach() for p in averaged.parameters()],
            [p.detach() for p in pl_module.parameters()],
        )

    # -- post-hoc snapshots --------------------------------------------------------------------
    def save_posthoc_snapshots(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write each post-hoc profile as ``ema-<updates>-<sigma_rel>.pt`` (rank zero only)."""
        if not trainer.is_global_zero:
            return
        folder = Path(self.posthoc_dir or Path(trainer.default_root_dir) / POSTHOC_DIR_NAME)
        names = self._tensor_names(pl_module)
        self._posthoc_saved_at = self.num_updates
        for sigma_rel, profile in zip(self.posthoc_sigma_rels, self._posthoc, strict=True):
            state = {name: t.detach().cpu().clone() for name, t in zip(names, profile, strict=True)}
            atomic_torch_save(
                {
                    "state_dict": state,
                    "updates": self.num_updates,
                    "global_step": trainer.global_step,
                    "sigma_rel": sigma_rel,
                },
                folder / f"ema-{self.num_updates:09d}-{sigma_rel:.4f}.pt",
            )

    def _tensor_names(self, pl_module: nn.Module) -> list[str]:
        names = [name for name, _ in pl_module.named_parameters()]
        if self._use_buffers:
            names += [name for name, _ in pl_module.named_buffers()]
        return names

    # -- resume ----------------------------------------------------------------------------------
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is not None:
            self.num_updates = int(self._average_model.n_averaged)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["num_updates"] = self.num_updates  # informative: the count is n_averaged
        if self._posthoc:
            state["posthoc"] = [[t.detach().cpu().clone() for t in p] for p in self._posthoc]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        stored = state_dict.get("posthoc")
        if stored is not None and self._posthoc:
            if len(stored) != len(self._posthoc):
                raise ValueError(
                    f"the checkpoint holds {len(stored)} post-hoc EMA profiles, but "
                    f"callbacks.ema.posthoc_sigma_rels has {len(self._posthoc)}; resume with the "
                    "run's own EMA settings."
                )
            for profile, saved in zip(self._posthoc, stored, strict=True):
                copy(profile, [t.to(p.device) for t, p in zip(saved, profile, strict=True)])


def lerp(averaged: list[Tensor], current: list[Tensor], weight: float) -> None:
    """``averaged += weight * (current - averaged)`` for floating tensors (foreach, per device
    and dtype); other tensors (integer buffers) are copied."""
    floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
    others = [(a, c) for a, c in zip(averaged, current, strict=True) if not a.is_floating_point()]
    for group in _by_device_and_dtype(floats):
        a, c = zip(*group, strict=True)
        torch._foreach_lerp_(list(a), [t.to(a[0].device) for t in c], weight)
    for a, c in others:
        a.copy_(c)


def copy(averaged: list[Tensor], current: list[Tensor]) -> None:
    """``averaged = current`` for every tensor (foreach)."""
    for group in _by_device_and_dtype(list(zip(averaged, current, strict=True))):
        a, c = zip(*group, strict=True)
        torch._foreach_copy_(list(a), list(c))


def _by_device_and_dtype(pairs: list[tuple[Tensor, Tensor]]) -> Iterator[list[tuple[Tensor, ...]]]:
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[Tensor, ...]]] = {}
    for a, c in pairs:
        groups.setdefault((a.device, a.dtype), []).append((a, c))
    yield from groups.values()


# -- post-hoc reconstruction (EDM2, Algorithm 3) ----------------------------------------------
def power_profile_inner(a_t: np.ndarray, a_gamma: np.ndarray, b_t: np.ndarray, b_gamma: np.ndarray):
    """Inner products of the normalised profiles ``(gamma+1) tau**gamma / t**(gamma+1)`` on
    [0, t] (EDM2 eq. 151), broadcast over the arguments."""
    ratio = a_t / b_t
    exponent = np.where(a_t < b_t, b_gamma, -a_gamma)
    return (
        (a_gamma + 1)
        * (b_gamma + 1)
        * ratio**exponent
        / ((a_gamma + b_gamma + 1) * np.maximum(a_t, b_t))
    )


def posthoc_coefficients(
    in_t: Sequence[float], in_sigma_rel: Sequence[float], out_t: float, out_sigma_rel: float
) -> np.ndarray:
    """Weights of the stored snapshots (``t`` updates, ``sigma_rel``) whose combination is the
    closest, in L2 over the training time, to the profile ``out_sigma_rel`` ending at ``out_t``."""
    t = np.float64(in_t).reshape(-1, 1)
    gamma = np.float64([sigma_rel_to_gamma(s) for s in in_sigma_rel]).reshape(-1, 1)
    out_gamma = np.float64(sigma_rel_to_gamma(out_sigma_rel))
    a = power_profile_inner(t, gamma, t.T, gamma.T)
    b = power_profile_inner(t, gamma, np.float64(out_t), out_gamma)
    x = np.linalg.solve(a, b).reshape(-1)
    return x / x.sum()


def list_snapshots(folder: str | Path) -> list[tuple[int, float, Path]]:
    """``(updates, sigma_rel, path)`` of every post-hoc snapshot in ``folder``, oldest first."""
    found = []
    for path in Path(folder).glob("ema-*.pt"):
        match = SNAPSHOT_PATTERN.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), float(match.group(2)), path))
    return sorted(found)


def latest_snapshot(folder: str | Path, at_most: int) -> int | None:
    """The update count of the latest post-hoc snapshots in ``folder`` taken at or before
    ``at_most`` updates (a checkpoint's own count: no weights from after it), or None."""
    counts = [updates for updates, _, _ in list_snapshots(folder) if updates <= at_most]
    return max(counts, default=None)


def load_weights_only(path: Path) -> Any:
    """torch.load that refuses anything but tensors and plain containers (no code runs)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_snapshot(path: Path, load: Loader = load_weights_only) -> dict[str, Tensor]:
    """A post-hoc snapshot's tensors, refused unless the file holds a dict of tensors (a file
    from elsewhere is data: ``load`` must not run code)."""
    data = load(path)
    state = data.get("state_dict") if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(
        isinstance(name, str) and isinstance(tensor, Tensor) for name, tensor in state.items()
    ):
        raise ValueError(
            f"{str(path)!r} is not a post-hoc EMA snapshot (a `state_dict` of named tensors, "
            "as the EMA callback writes): remove it from the folder."
        )
    return state


def reconstruct_posthoc(
    folder: str | Path,
    sigma_rel: float,
    updates: int | None = None,
    load: Loader = load_weights_only,
) -> dict[str, Tensor]:
    """The EMA weights of profile ``sigma_rel`` at ``updates`` (None: the last snapshot),
    combined from the snapshots in ``folder`` up to that point."""
    check_sigma_rel(sigma_rel, "sigma_rel")
    snapshots = list_snapshots(folder)
    if updates is None and snapshots:
        updates = snapshots[-1][0]
    used = [s for s in snapshots if 0 < s[0] <= (updates or 0)]
    if not used or updates not in {s[0] for s in used}:
        raise ValueError(
            f"no post-hoc EMA snapshots in {str(folder)!r} end at update {updates}; found "
            f"{sorted({s[0] for s in snapshots})}. Train with callbacks.ema.posthoc_sigma_rels."
        )
    weights = posthoc_coefficients([s[0] for s in used], [s[1] for s in used], updates, sigma_rel)
    result: dict[str, Tensor] = {}
    for weight, (_, _, path) in zip(weights, used, strict=True):
        state = load_snapshot(path, load)
        if result and (
            state.keys() != result.keys()
            or any(result[name].shape != tensor.shape for name, tensor in state.items())
        ):
            raise ValueError(
                f"{str(path)!r} holds other tensors than the snapshots before it in "
                f"{str(folder)!r}: the folder mixes two models. Keep one run's snapshots in it."
            )
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                result[name] = tensor
            elif name in result:
                result[name] += float(weight) * tensor.double()
            else:
                result[name] = float(weight) * tensor.double()
    return {name: t.float() if t.is_floating_point() else t for name, t in result.items()}


def with_posthoc_weights(
    state: dict[str, Tensor],
    folder: str | Path,
    sigma_rel: float,
    updates: int | None = None,
    load: Loader = load_weights_only,
) -> dict[str, Tensor]:
    """``state`` (a module's) with every tensor the snapshots hold replaced by the post-hoc
    reconstruction at ``sigma_rel``; refused unless the snapshots cover all its weights."""
    weights = reconstruct_posthoc(folder, sigma_rel, updates, load)
    wrong = [
        name
        for name, tensor in state.items()
        if tensor.is_floating_point()
        and (name not in weights or weights[name].shape != tensor.shape)
    ]
    if wrong:
        raise ValueError(
            f"the post-hoc snapshots in {str(folder)!r} do not match the model's weights "
            f"({', '.join(wrong[:3])}...): they were written by another run. Pass that run's "
            "posthoc_ema folder."
        )
    return {
        name: weights[name].to(tensor.dtype) if name in weights else tensor
        for name, tensor in state.items()
    }


def posthoc_checkpoint(
    checkpoint: str | Path,
    folder: str | Path,
    sigma_rel: float,
    output: str | Path,
    updates: int | None = None,
    load: Loader | None = None,
) -> Path:
    """Write ``checkpoint`` with its EMA weights replaced by the post-hoc reconstruction at
    ``sigma_rel``: a checkpoint sample/evaluate/export read like any other."""
    if load is None:
        from flowerdiff.infra.checkpoints import read_checkpoint as load
    data = load(checkpoint)
    data["state_dict"] = with_posthoc_weights(data["state_dict"], folder, sigma_rel, updates, load)
    atomic_torch_save(data, output)
    return Path(output)
