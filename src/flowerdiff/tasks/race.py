"""The race: flowerdiff against diffusers' ``train_unconditional.py`` recipe at equal wall clock.

Both sides get the same device, the same decoded images (the data folder at ``image_size``), the
same seed, the same number of threads and the same training budget. Each side runs in its own
process (side by side by default, so one budget of wall clock; or one after the other):

1. build its model, then time ``probe_steps`` training steps on a throwaway copy, which gives
   the LR schedule's length (``lr_horizon=auto``: the steps the budget allows) to both sides
   alike; the sides wait for each other before probing and before training (file barriers), so
   that both measure and train under the same load;
2. train until the budget is spent, saving its EMA weights at ``k / snapshots`` of the budget
   (the clock stops while a snapshot is written);
3. sample ``num_samples`` images from every snapshot with its own sampler and step count (a
   class-conditional side of ours takes every class in turn, optionally with guidance), and
   write their Inception features.

The main process then scores every snapshot with FID and KID against the cached reference
features of the whole data set, prints a markdown table, and writes ``race.json`` and
``race.png`` (FID against wall-clock minutes and against images seen).

Ours is any training config, trained by Lightning as ``scripts/train.py`` trains it (its
callbacks from the ``callbacks`` group, EMA included), without validation, checkpoints or
loggers. The peer is that script's loop with diffusers' own classes: ``UNet2DModel`` in the
script's layout at a stated width, ``DDPMScheduler`` (linear, 1000 steps), MSE on epsilon, AdamW
with the script's defaults, ``get_scheduler("cosine")`` with 500 warm-up steps, gradient clipping
at 1.0 and ``EMAModel(use_ema_warmup=True, inv_gamma=1, power=3/4, decay=0.9999)``. Differences
from the script, the same for both sides: the images are decoded once and flipped per batch on
the device (the script decodes PNGs in its data loader every step); the cosine schedule's length
is the step count the budget allows (the script: its epochs), and once past it the peer's LR is
held at its last value (diffusers' cosine would rise again); sampling may use DDIM instead of the
script's 1000 DDPM steps (``peer.sampler``).

diffusers is imported only in the peer's process: it stays the ``bench`` extra.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from flowerdiff.data.datamodule import to_model_space
from flowerdiff.infra.config import (
    ConfigError,
    Problems,
    build_module,
    instantiate_callbacks,
    model_spec,
    plain,
    validate_train_config,
)
from flowerdiff.infra.devices import resolve_precision
from flowerdiff.metrics.features import to_uint8
from flowerdiff.metrics.quality import (
    SampleQuality,
    datamodule_data_key,
    datamodule_images,
    datamodule_reference,
    extract_features,
    help_with_reference,
)
from flowerdiff.tasks.benchmark import (
    CPU_ATTENTION_FLOPS,
    measuring_trainer,
    peer_unet,
    train_flops_per_image,
)
from flowerdiff.training.generate import evaluation_conditioning, sample_batches
from flowerdiff.viz.figures import grid, save_png

log = logging.getLogger(__name__)

SIDES = ("ours", "peer")
NAMES = {"ours": "flowerdiff", "peer": "diffusers train_unconditional.py"}
SHARED_DATA = Path("..") / "shared" / "data" / "flowers102_64"
PROBE_WARMUP = 2
# What evaluate_only may change; everything else comes from the race that trained.
EVALUATION_KEYS = (
    "evaluate_only",
    "num_samples",
    "sample_batch_size",
    "sample_seed",
    "kid",
    "sample_grid",
    "feature_extractor",
    "feature_batch_size",
    "fid_cache_dir",
    "output",
    "parallel",
    "threads",
    "sampler",
    "guidance_scale",
    "peer.sampler",
    "peer.num_inference_steps",
)
POLL_S = 0.05
REFERENCE_WORK = "reference"  # the race folder's pieces of the FID reference, while they last


# -- the clock ------------------------------------------------------------------------------------
class Clock:
    """The training budget and the snapshot moments of one side.

    ``tick`` is called after every optimizer step; it saves the snapshots that are due (the
    clock is paused while one is written) and says whether the budget allows another step.
    """

    def __init__(
        self, budget_s: float, snapshots: int, save: Callable[[dict[str, Any]], Path]
    ) -> None:
        self.budget_s = budget_s
        self.moments = [budget_s * (k + 1) / snapshots for k in range(snapshots)]
        self.save = save
        self.start = 0.0
        self.paused = 0.0
        self.steps = 0
        self.images = 0
        self.train_s = 0.0  # the elapsed time at the step that spent the budget
        self.records: list[dict[str, Any]] = []

    def begin(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def tick(self, images: int) -> bool:
        self.steps += 1
        self.images += images
        elapsed = self.elapsed()
        while len(self.records) < len(self.moments) and elapsed >= self.moments[len(self.records)]:
            tic = time.perf_counter()
            record = {
                "index": len(self.records),
                "elapsed_s": elapsed,
                "steps": self.steps,
                "images": self.images,
            }
            record["path"] = str(self.save(record))
            self.records.append(record)
            self.paused += time.perf_counter() - tic
        self.train_s = elapsed
        return elapsed < self.budget_s


class ClockCallback(L.Callback):
    """Our side's clock inside Lightning: ticks after every optimizer step, stops at the budget.
    Listed after the EMA callback, so a snapshot holds the EMA update of its own step."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._last_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.begin()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        if trainer.global_step == self._last_step:  # gradient accumulation: no step yet
            return
        images = batch[0].shape[0] * (trainer.global_step - self._last_step)
        self._last_step = trainer.global_step
        if not self.clock.tick(images * trainer.accumulate_grad_batches):
            trainer.should_stop = True


class StepTimes(L.Callback):
    """Durations of the optimizer steps of the probe (the first ``PROBE_WARMUP`` untimed)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._last = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        now = time.perf_counter()
        if trainer.global_step > PROBE_WARMUP:
            self.durations.append(now - self._last)
        self._last = now


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


# -- FLOPs and network evaluations ------------------------------------------------------------------
def forward_flops_per_image(net: nn.Module, x: Tensor, t: Tensor) -> float:
    with (
        FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter,
        torch.no_grad(),
    ):
        net(x, t)
    return counter.get_total_flops() / x.shape[0]


class CallCounter:
    """Counts forward calls of a network: the network evaluations per sampled image."""

    def __init__(self, net: nn.Module) -> None:
        self.calls = 0
        self.handle = net.register_forward_pre_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1

    def close(self) -> None:
        self.handle.remove()


# -- the barrier between the side processes -----------------------------------------------------------
def barrier(folder: Path, side: str, name: str) -> None:
    """Say this side is ready for ``name`` and wait for the main process's go."""
    (folder / f"{side}.{name}.ready").touch()
    while not (folder / f"{name}.go").exists():
        time.sleep(POLL_S)


# -- our side -----------------------------------------------------------------------------------------
def fixed_horizon(factory: Callable[..., Any], horizon: int, optimizer: Any, total: Any) -> Any:
    """The LR factory with the race's horizon instead of Lightning's estimate (infinite here)."""
    return factory(optimizer, horizon)


# Trainer keys of our side's recipe that the race keeps (checked by validate_train_config)
CLIPPING_KEYS = ("gradient_clip_val", "gradient_clip_algorithm")


def ours_trainer(cfg: DictConfig, callbacks: list[L.Callback], max_steps: int) -> L.Trainer:
    # max_steps: the clock stops the real run; finite for Lightning's estimate of its length
    precision = resolve_precision(cfg.trainer.precision, cfg.device)
    clipping = {key: cfg.trainer[key] for key in CLIPPING_KEYS if cfg.trainer.get(key) is not None}
    return measuring_trainer(cfg.device, precision, max_steps, callbacks, max_epochs=-1, **clipping)


def ema_net(trainer: L.Trainer, module: L.LightningModule) -> tuple[nn.Module, str]:
    """The network with the EMA weights (the first WeightAveraging callback), else the raw one."""
    from lightning.pytorch.callbacks import WeightAveraging

    for callback in trainer.callbacks:
        if isinstance(callback, WeightAveraging) and callback._average_model is not None:
            return callback._average_model.module.net, "ema"
    return module.net, "raw"


def probe_ours(cfg: DictConfig, datamodule: L.LightningDataModule) -> tuple[float, float, float]:
    """Median step time of the real training step (Lightning, callbacks, data) on a throwaway
    module, and its training and forward FLOPs per image."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    probe = build_module(cfg)
    times = StepTimes()
    trainer = ours_trainer(
        cfg, [*instantiate_callbacks(cfg.callbacks), times], PROBE_WARMUP + cfg.probe_steps
    )
    trainer.fit(probe, datamodule=datamodule)
    images, *_ = next(iter(datamodule.train_dataloader()))
    images = to_model_space(images.to(probe.device), flip=False)
    train_flops = train_flops_per_image(lambda: probe.diffusion.loss(probe, images), len(images))
    t = torch.full((len(images),), 0.5, device=images.device)
    return median(times.durations), train_flops, forward_flops_per_image(probe.net, images, t)


def train_ours(cfg: DictConfig, folder: Path) -> dict[str, Any]:
    seed = int(cfg.seed)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # decode (or read the cache) before any clock runs

    barrier(folder.parent, "ours", "probe")
    step_s, train_flops, forward_flops = probe_ours(cfg, datamodule)
    horizon = resolve_horizon(cfg, step_s)

    L.seed_everything(seed, workers=True, verbose=False)
    module = build_module(cfg)
    if module.lr_scheduler_factory is not None:
        module.lr_scheduler_factory = functools.partial(
            fixed_horizon, module.lr_scheduler_factory, horizon
        )
    snapshots = folder / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True)
    trainer_box: list[L.Trainer] = []

    def save(record: dict[str, Any]) -> Path:
        net, kind = ema_net(trainer_box[0], module)
        path = snapshots / f"snapshot_{record['index']}.pt"
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        torch.save({"state_dict": state, "weights": kind, **record}, path)
        return path

    clock = Clock(cfg.budget_minutes * 60, cfg.snapshots, save)
    callbacks = [*instantiate_callbacks(cfg.callbacks), ClockCallback(clock)]
    trainer = ours_trainer(cfg, callbacks, 10**9)
    trainer_box.append(trainer)
    barrier(folder.parent, "ours", "train")
    trainer.fit(module, datamodule=datamodule)
    return {
        "params": sum(p.numel() for p in module.net.parameters()),
        "batch_size": int(cfg.data.batch_size),
        "probe_step_s": step_s,
        "lr_horizon": horizon,
        "train_flops_per_image": train_flops,
        "forward_flops_per_image": forward_flops,
        **clock_summary(clock),
    }


@torch.no_grad()
def evaluate_ours(cfg: DictConfig, records: list[dict[str, Any]], folder: Path) -> None:
    """Sample every snapshot with our sampler; a class-conditional model takes every class in
    turn (as evaluate.py), with classifier-free guidance when ``guidance_scale`` is set."""
    extractor = instantiate(cfg.feature_extractor).eval()
    module = build_module(cfg).to(cfg.device).eval()
    sampler = module.diffusion.sampler
    scale = cfg.get("guidance_scale")
    labels, guidance = evaluation_conditioning(module, cfg.num_samples, scale)
    sampler_name = f"{sampler.to_config()['name']}-{sampler.num_inference_steps}"
    if labels is not None:
        sampler_name += f" cfg{scale:g}" if guidance is not None else " cond"
    for record in records:
        state = torch.load(record["path"], map_location="cpu", weights_only=True)["state_dict"]
        module.net.load_state_dict(state)
        counter = CallCounter(module.net)
        tic = time.perf_counter()
        images = torch.cat(
            [
                to_uint8(batch.output.images).cpu()
                for batch in sample_batches(
                    module,
                    cfg.num_samples,
                    seed=cfg.sample_seed,
                    batch_size=cfg.sample_batch_size,
                    labels=labels,
                    guidance=guidance,
                )
            ]
        )
        counter.close()
        finish_record(cfg, record, images, extractor, folder, tic, counter.calls)
        record["sampler"] = sampler_name


# -- the peer -------------------------------------------------------------------------------------------
def peer_width(cfg: DictConfig, our_params: int) -> float:
    """``peer.width``, or (auto) the width k/16 whose parameter count is nearest ours."""
    if str(cfg.peer.width) != "auto":
        return float(cfg.peer.width)
    best = None
    for k in range(1, 33):
        width = k / 16
        with torch.device("meta"):
            params = sum(p.numel() for p in peer_unet(cfg.image_size, width).parameters())
        if best is None or abs(params - our_params) < best[0]:
            best = (abs(params - our_params), width)
    assert best is not None
    return best[1]


class Peer:
    """train_unconditional.py's model, noise scheduler, optimizer, LR schedule and EMA."""

    def __init__(self, cfg: DictConfig, width: float, horizon: int, device: torch.device) -> None:
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        p = cfg.peer
        self.model = peer_unet(cfg.image_size, width).to(device)
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=p.num_train_timesteps, beta_schedule=p.beta_schedule
        )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=p.learning_rate,
            betas=(p.adam_beta1, p.adam_beta2),
            weight_decay=p.adam_weight_decay,
            eps=p.adam_epsilon,
        )
        self.horizon = horizon
        self.lr_scheduler = get_scheduler(
            p.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=p.lr_warmup_steps,
            num_training_steps=horizon,
        )
        self.ema = EMAModel(
            self.model.parameters(),
            decay=p.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=p.ema_inv_gamma,
            power=p.ema_power,
            model_cls=type(self.model),
            model_config=self.model.config,
        )
        self.max_grad_norm = p.max_grad_norm
        # --mixed_precision bf16: accelerate's autocast around the forward (fp16 needs a GPU)
        self.autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=p.mixed_precision == "bf16"
        )
        self.steps = 0

    def loss(self, clean: Tensor) -> Tensor:
        noise = torch.randn(clean.shape, dtype=clean.dtype, device=clean.device)
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (clean.shape[0],),
            device=clean.device,
        ).long()
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        with self.autocast:
            output = self.model(noisy, timesteps).sample
        return F.mse_loss(output.float(), noise.float())

    def step(self, clean: Tensor) -> None:
        self.model.train()
        self.loss(clean).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        if self.steps < self.horizon:  # past its length diffusers' cosine would rise again
            self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.ema.step(self.model.parameters())
        self.steps += 1

    def ema_state(self) -> dict[str, Tensor]:
        averaged = copy.deepcopy(self.model)
        self.ema.copy_to(averaged.parameters())
        return {k: v.detach().cpu().clone() for k, v in averaged.state_dict().items()}


def peer_batches(images: Tensor, batch_size: int, device: torch.device) -> Iterator[Tensor]:
    """The script's shuffled DataLoader, epoch after epoch; scale and flip per batch."""
    loader = DataLoader(TensorDataset(images), batch_size=batch_size, shuffle=True)
    while True:
        for (batch,) in loader:
            yield to_model_space(batch.to(device), flip=True)


def probe_peer(
    cfg: DictConfig, images: Tensor, width: float, device: torch.device
) -> tuple[float, float, float]:
    """Median step time of the peer's step on a throwaway copy; its FLOPs per image."""
    torch.manual_seed(int(cfg.seed))
    probe = Peer(cfg, width, 10**9, device)
    batches = peer_batches(images, int(cfg.peer.batch_size), device)
    durations = []
    for k in range(PROBE_WARMUP + cfg.probe_steps):
        tic = time.perf_counter()
        probe.step(next(batches))
        if k >= PROBE_WARMUP:
            durations.append(time.perf_counter() - tic)
    clean = next(batches)
    train_flops = train_flops_per_image(lambda: probe.loss(clean), len(clean))
    t = torch.full((len(clean),), 500, device=device, dtype=torch.long)
    return median(durations), train_flops, forward_flops_per_image(probe.model, clean, t)


def train_peer(cfg: DictConfig, folder: Path) -> dict[str, Any]:
    seed, device = int(cfg.seed), torch.device(cfg.device)
    images = instantiate(cfg.data).load_images()
    our_params = json.loads((folder.parent / "params.json").read_text())["ours"]
    width = peer_width(cfg, our_params)
    batch_size = int(cfg.peer.batch_size)

    barrier(folder.parent, "peer", "probe")
    step_s, train_flops, forward_flops = probe_peer(cfg, images, width, device)
    horizon = resolve_horizon(cfg, step_s)

    torch.manual_seed(seed)
    peer = Peer(cfg, width, horizon, device)
    batches = peer_batches(images, batch_size, device)
    snapshots = folder / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True)

    def save(record: dict[str, Any]) -> Path:
        path = snapshots / f"snapshot_{record['index']}.pt"
        torch.save({"state_dict": peer.ema_state(), "weights": "ema", **record}, path)
        return path

    clock = Clock(cfg.budget_minutes * 60, cfg.snapshots, save)
    barrier(folder.parent, "peer", "train")
    clock.begin()
    running = True
    while running:
        batch = next(batches)
        peer.step(batch)
        running = clock.tick(len(batch))
    return {
        "params": sum(p.numel() for p in peer.model.parameters()),
        "width": width,
        "block_out_channels": list(peer.model.config.block_out_channels),
        "batch_size": batch_size,
        "probe_step_s": step_s,
        "lr_horizon": horizon,
        "train_flops_per_image": train_flops,
        "forward_flops_per_image": forward_flops,
        **clock_summary(clock),
    }


@torch.no_grad()
def evaluate_peer(
    cfg: DictConfig, records: list[dict[str, Any]], folder: Path, width: float
) -> None:
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    extractor = instantiate(cfg.feature_extractor).eval()
    p = cfg.peer
    unet = peer_unet(cfg.image_size, width).to(cfg.device).eval()
    scheduler = DDPMScheduler(
        num_train_timesteps=p.num_train_timesteps, beta_schedule=p.beta_schedule
    )
    if p.sampler == "ddpm":
        pipeline = DDPMPipeline(unet=unet, scheduler=scheduler)
    else:
        pipeline = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    for record in records:
        state = torch.load(record["path"], map_location="cpu", weights_only=True)["state_dict"]
        unet.load_state_dict(state)
        counter = CallCounter(unet)
        tic = time.perf_counter()
        chunks = []
        for start in range(0, cfg.num_samples, cfg.sample_batch_size):
            n = min(cfg.sample_batch_size, cfg.num_samples - start)
            generators = [
                torch.Generator().manual_seed(cfg.sample_seed * 1_000_003 + start + i)
                for i in range(n)
            ]
            out = pipeline(
                batch_size=n,
                generator=generators,
                num_inference_steps=p.num_inference_steps,
                output_type="np",
            ).images  # [N, H, W, C] in [0, 1], as the script saves them
            chunks.append(
                torch.from_numpy(out).permute(0, 3, 1, 2).mul(255).round().to(torch.uint8)
            )
        counter.close()
        finish_record(cfg, record, torch.cat(chunks), extractor, folder, tic, counter.calls)
        record["sampler"] = f"{p.sampler}-{p.num_inference_steps}"


# -- shared by both sides -------------------------------------------------------------------------
def resolve_horizon(cfg: DictConfig, step_s: float) -> int:
    if str(cfg.lr_horizon) == "auto":
        return max(1, int(cfg.budget_minutes * 60 / step_s))
    return int(cfg.lr_horizon)


def clock_summary(clock: Clock) -> dict[str, Any]:
    train_s = clock.train_s
    return {
        "steps": clock.steps,
        "images_seen": clock.images,
        "train_s": train_s,
        "images_per_s": clock.images / train_s,
        "snapshots": clock.records,
    }


def finish_record(
    cfg: DictConfig,
    record: dict[str, Any],
    images: Tensor,
    extractor: nn.Module,
    folder: Path,
    tic: float,
    calls: int,
) -> None:
    """Features (and a grid) of one snapshot's samples; timings and evaluations per image."""
    record["sampling_s"] = time.perf_counter() - tic
    batches = math.ceil(cfg.num_samples / cfg.sample_batch_size)
    record["nfe"] = calls / batches
    tic = time.perf_counter()
    features = extract_features(extractor, images, cfg.feature_batch_size, cfg.device)
    record["features_s"] = time.perf_counter() - tic
    path = folder / f"features_{record['index']}.pt"
    torch.save(features, path)
    record["features"] = str(path)
    if cfg.sample_grid:
        shown = images[: cfg.sample_grid].float().div(127.5).sub(1)
        save_png(grid(shown), folder / f"samples_{record['index']}.png")


def run_side(config_path: str | Path, side: str) -> None:
    """One side, in its own process: train, then sample and extract features."""
    cfg = OmegaConf.load(config_path)
    folder = Path(config_path).parent / side
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(cfg.threads))
    trained = folder / "train.json"
    if cfg.evaluate_only:
        result = json.loads(trained.read_text())
    else:
        result = train_ours(cfg, folder) if side == "ours" else train_peer(cfg, folder)
        trained.write_text(json.dumps(result, indent=2))
    if side == "ours":
        evaluate_ours(cfg, result["snapshots"], folder)
    else:
        evaluate_peer(cfg, result["snapshots"], folder, result["width"])
    work_dir = folder.parent / REFERENCE_WORK
    result["reference_pieces"] = share_reference(cfg, work_dir) if cfg.parallel else 0
    (folder / "result.json").write_text(json.dumps(result, indent=2))


def share_reference(cfg: DictConfig, work_dir: Path) -> int:
    """Side by side, the side that finishes first would leave its core idle: both take pieces
    of the FID reference (when it is not cached) until none is left, and the main process joins
    them (one after the other, it computes the reference with every thread). Best effort: a
    failure here costs only time, never the race (the main process computes what is missing)."""
    try:
        datamodule = instantiate(cfg.data)
        return help_with_reference(
            datamodule_images(datamodule),
            datamodule_data_key(datamodule),
            instantiate(cfg.feature_extractor).eval(),
            cfg.fid_cache_dir,
            work_dir,
            cfg.feature_batch_size,
            cfg.device,
        )
    except Exception as error:  # any failure: the main process computes the rest
        log.warning("Not helping with the FID reference: %s", error)
        return 0


def fresh_folder(path: Path) -> None:
    """``path`` as a new, empty, real folder (an earlier race's files, or a link, removed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True)


# -- the main process ------------------------------------------------------------------------------
def resolve_config(cfg: DictConfig) -> DictConfig:
    """Check the config, resolve the data folder; returns a plain resolved copy."""
    problems = Problems()
    with problems.catch("budget_minutes"):
        if not isinstance(cfg.budget_minutes, int | float) or cfg.budget_minutes <= 0:
            raise ValueError(f"`budget_minutes={cfg.budget_minutes}` must be > 0.")
    for key in ("snapshots", "num_samples", "sample_batch_size", "threads", "probe_steps"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.add(f"`{key}={value!r}` must be an integer >= 1.")
    if isinstance(cfg.num_samples, int) and cfg.num_samples < 2:
        problems.add(f"`num_samples={cfg.num_samples}`: FID needs at least 2 images per snapshot.")
    size = cfg.image_size
    if not isinstance(size, int) or size < 32 or size % 32:
        problems.add(
            f"`image_size={size!r}` must be a multiple of 32: the peer's UNet2DModel halves the "
            "resolution 5 times (the script's 6 levels)."
        )
    if str(cfg.lr_horizon) != "auto" and not (
        isinstance(cfg.lr_horizon, int) and cfg.lr_horizon > 0
    ):
        problems.add(f"`lr_horizon={cfg.lr_horizon!r}` must be auto or a number of steps >= 1.")
    if cfg.peer.sampler not in ("ddpm", "ddim"):
        problems.add(f"`peer.sampler={cfg.peer.sampler!r}` must be ddpm or ddim.")
    if cfg.peer.mixed_precision not in ("no", False, "bf16", "auto"):  # YAML: bare `no` is false
        problems.add(
            f"`peer.mixed_precision={cfg.peer.mixed_precision!r}` must be no, bf16 or auto "
            "(the script's --mixed_precision, or auto: bf16 when our side trains in bf16; fp16 "
            "needs a GPU's loss scaling)."
        )
    if cfg.device not in ("cpu", "cuda"):
        problems.add(f"`device={cfg.device!r}` must be cpu or cuda.")
    scale = cfg.get("guidance_scale")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 <= scale < 1e3
    ):
        problems.add(f"`guidance_scale={scale!r}` must be null or a number >= 0, e.g. 1.5.")
    root = cfg.data.root
    if root is None:
        shared = Path(cfg.paths.root_dir) / SHARED_DATA
        if shared.is_dir():
            root = str(shared.resolve())
        else:
            problems.add(
                f"`data.root` is null and {shared} does not exist: give the data folder, e.g. "
                "data.root=/path/to/flowers (both sides train on it)."
            )
    problems.raise_if_any("The race config")
    with open_dict(cfg):
        cfg.data.root = root
    validate_train_config(cfg)  # our side, as scripts/train.py would check it
    with open_dict(cfg):  # both sides' precision, decided once on this machine
        cfg.trainer.precision = resolve_precision(cfg.trainer.precision, cfg.device)
        if cfg.peer.mixed_precision == "auto":
            cfg.peer.mixed_precision = "bf16" if cfg.trainer.precision == "bf16-mixed" else "no"
    return OmegaConf.create({key: plain(node) for key, node in cfg.items() if key != "hydra"})


def run_race(cfg: DictConfig) -> dict[str, Any]:
    """Run both sides, score every snapshot, print the table, write JSON and PNG."""
    try:
        import diffusers  # noqa: F401  (checked here; imported by the peer's process)
    except ImportError as error:
        raise ConfigError(
            "The race needs diffusers for the peer: pip install -e '.[bench]'."
        ) from error
    resolved = resolve_config(cfg)
    output = Path(resolved.output)
    folder = output.parent / "race"
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.yaml"
    if resolved.evaluate_only:
        resolved = reuse_training(resolved, folder)
    check_guidance(resolved)  # after reuse_training: the model may be the earlier race's
    OmegaConf.save(resolved, config_path)
    instantiate(resolved.feature_extractor)  # missing Inception weights fail before training
    spec = model_spec(resolved)
    with torch.device("meta"):
        our_params = sum(p.numel() for p in spec.build_network().parameters())
    (folder / "params.json").write_text(json.dumps({"ours": our_params}))

    groups = [list(SIDES)] if resolved.parallel else [[side] for side in SIDES]
    log.info(
        "Race%s: %s min per side, %s, %d thread(s) each; logs in %s",
        " (evaluating the snapshots of the earlier run)" if resolved.evaluate_only else "",
        resolved.budget_minutes,
        "side by side" if resolved.parallel else "one after the other",
        resolved.threads,
        folder,
    )
    fresh_folder(folder / REFERENCE_WORK)  # no claims or pieces of an earlier race
    for sides in groups:
        run_processes(config_path, folder, sides, int(resolved.threads))
    results = {side: json.loads((folder / side / "result.json").read_text()) for side in SIDES}
    report = score(resolved, results, folder / REFERENCE_WORK)
    shutil.rmtree(folder / REFERENCE_WORK)  # its pieces are in the reference cache now
    print(format_table(report))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    plot = plot_curves(report, output.with_suffix(".png"))
    print(f"written: {output}" + (f" and {plot}" if plot else ""))
    return report


def check_guidance(cfg: DictConfig) -> None:
    """Guidance needs classes: refuse ``guidance_scale`` for an unconditional side of ours."""
    scale = cfg.get("guidance_scale")
    if scale is not None and OmegaConf.select(cfg, "model.net.num_classes") is None:
        raise ConfigError(
            f"`guidance_scale={scale!r}` needs a class-conditional side of ours "
            "(model.net.num_classes=N data.labels=true); set guidance_scale=null."
        )


def reuse_training(cfg: DictConfig, folder: Path) -> DictConfig:
    """``evaluate_only``: the earlier race's config in ``folder`` with this run's evaluation
    settings (samples, samplers, features): the snapshots are re-scored, nothing is trained."""
    missing = [
        str(path)
        for path in (folder / "config.yaml", *(folder / side / "train.json" for side in SIDES))
        if not path.is_file()
    ]
    if missing:
        raise ConfigError(
            f"`evaluate_only=true` re-scores a finished race's snapshots, but {', '.join(missing)} "
            "do not exist. Point hydra.run.dir at that race's run directory."
        )
    earlier = OmegaConf.load(folder / "config.yaml")
    unsafe = callable_parts(OmegaConf.to_container(earlier), OmegaConf.to_container(cfg))
    if unsafe:
        raise ConfigError(
            f"{folder / 'config.yaml'} is read as data, and it names what this checkout's race "
            f"config does not: {'; '.join(unsafe)}. A race directory's config holds resolved "
            "values and the call targets of conf/race.yaml; re-run the race instead of "
            "re-scoring a directory from elsewhere."
        )
    for key in EVALUATION_KEYS:
        OmegaConf.update(earlier, key, OmegaConf.select(cfg, key), merge=False)
    return earlier


HYDRA_CALL_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")


def callable_parts(stored: Any, current: Any, key: str = "") -> list[str]:
    """What in a stored race config could make this program call something: any interpolation
    (a resolver runs code), and Hydra call keys that differ from this checkout's config at the
    same key. Everything else in it is a plain value."""
    found: list[str] = []
    if isinstance(stored, str) and "${" in stored:
        found.append(f"{key or '<root>'}={stored!r} (an interpolation)")
    elif isinstance(stored, dict):
        for name, value in stored.items():
            child = f"{key}.{name}" if key else str(name)
            here = current.get(name) if isinstance(current, dict) else None
            if name in HYDRA_CALL_KEYS and value != here:
                found.append(f"{child}={value!r}")
            else:
                found += callable_parts(value, here, child)
    elif isinstance(stored, list):
        for index, value in enumerate(stored):
            here = current[index] if isinstance(current, list) and index < len(current) else None
            found += callable_parts(value, here, f"{key}[{index}]")
    return found


def run_processes(config_path: Path, folder: Path, sides: list[str], threads: int) -> None:
    """Start ``sides`` as processes, release their barriers together, wait for them."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    for name in ("probe", "train"):  # an earlier race in this folder must not open them
        (folder / f"{name}.go").unlink(missing_ok=True)
        for side in sides:
            (folder / f"{side}.{name}.ready").unlink(missing_ok=True)
    processes = {}
    for side in sides:
        (folder / side).mkdir(exist_ok=True)
        logfile = open(folder / side / "log.txt", "w")  # noqa: SIM115 (closed below)
        command = [sys.executable, "-m", "flowerdiff.tasks.race", str(config_path), side]
        processes[side] = (
            subprocess.Popen(command, env=env, stdout=logfile, stderr=subprocess.STDOUT),
            logfile,
        )
    pending = ["probe", "train"]
    try:
        while any(process.poll() is None for process, _ in processes.values()):
            if pending and all((folder / f"{s}.{pending[0]}.ready").exists() for s in sides):
                (folder / f"{pending[0]}.go").touch()
                if pending[0] == "train":
                    log.info("Both sides training (%s)", ", ".join(sides))
                pending.pop(0)
            failed = [s for s, (p, _) in processes.items() if p.poll() not in (None, 0)]
            if failed:
                break
            time.sleep(POLL_S)
    finally:
        for process, logfile in processes.values():
            if process.poll() is None and any(
                p.poll() not in (None, 0) for p, _ in processes.values()
            ):
                process.terminate()
            process.wait()
            logfile.close()
    for side, (process, _) in processes.items():
        if process.returncode != 0:
            tail = (folder / side / "log.txt").read_text().strip().splitlines()[-25:]
            raise RuntimeError(
                f"The {side} side of the race failed (exit {process.returncode}); the end of "
                f"{folder / side / 'log.txt'}:\n" + "\n".join(tail)
            )


def score(
    cfg: DictConfig, results: dict[str, dict[str, Any]], work_dir: Path | None = None
) -> dict[str, Any]:
    """FID/KID of every snapshot against the reference features of the whole data set (the
    pieces the sides computed in ``work_dir`` joined, the rest computed now)."""
    extractor = instantiate(cfg.feature_extractor).eval()
    datamodule = instantiate(cfg.data)
    real, _ = datamodule_reference(
        datamodule,
        extractor,
        cfg.fid_cache_dir,
        batch_size=cfg.feature_batch_size,
        device=cfg.device,
        progress=True,
        work_dir=work_dir,
    )
    quality = SampleQuality(real.shape[1], kid=cfg.kid, sync=False)
    quality.update(real, real=True)
    for result in results.values():
        for record in result["snapshots"]:
            quality.update(torch.load(record["features"], weights_only=True), real=False)
            record.update(quality.compute())
            quality.reset_fake()
    return {
        "budget_minutes": cfg.budget_minutes,
        "parallel": cfg.parallel,
        "threads": cfg.threads,
        "device": cfg.device,
        "image_size": cfg.image_size,
        "data_root": cfg.data.root,
        "reference_images": len(real),
        "num_samples": cfg.num_samples,
        "ours_config": {
            key: plain(cfg.get(key))
            for key in (
                "model",
                "diffusion",
                "sampler",
                "optimizer",
                "lr_scheduler",
                "callbacks",
                "data",
            )
        },
        "peer_config": plain(cfg.peer),
        **results,
    }


def format_table(report: dict[str, Any]) -> str:
    """Markdown: one summary row per side, then FID/KID at every snapshot."""
    ours, peer = report["ours"], report["peer"]
    lines = [
        f"Race: {report['budget_minutes']} min per side on {report['device']} "
        f"({'side by side' if report['parallel'] else 'one after the other'}, "
        f"{report['threads']} thread(s) each), {report['image_size']}x{report['image_size']}, "
        f"{report['num_samples']} samples per snapshot against {report['reference_images']} "
        "reference images",
        "",
        "| side | params | batch | steps | images seen | images/s | train GFLOP/img | sampler | "
        "NFE | final FID | final KID |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for side, result in (("ours", ours), ("peer", peer)):
        name = NAMES[side] if side == "ours" else f"diffusers x{result['width']:g}"
        last = result["snapshots"][-1]
        lines.append(
            f"| {name} | {result['params'] / 1e6:.2f}M | {result['batch_size']} | "
            f"{result['steps']} | {result['images_seen']} | {result['images_per_s']:.1f} | "
            f"{result['train_flops_per_image'] / 1e9:.3f} | {last['sampler']} | "
            f"{last['nfe']:.0f} | {last['fid']:.1f} | {_kid(last)} |"
        )
    lines += [
        "",
        "| snapshot | minute | ours steps | ours FID | ours KID | peer steps | peer FID | "
        "peer KID | FID ratio ours/peer |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(ours["snapshots"], peer["snapshots"], strict=True):
        lines.append(
            f"| {a['index'] + 1} | {a['elapsed_s'] / 60:.1f} | {a['steps']} | {a['fid']:.1f} | "
            f"{_kid(a)} | {b['steps']} | {b['fid']:.1f} | {_kid(b)} | {a['fid'] / b['fid']:.2f} |"
        )
    return "\n".join(lines)


def _kid(record: dict[str, Any]) -> str:
    return f"{record['kid_mean']:.4f}" if "kid_mean" in record else "-"


def plot_curves(report: dict[str, Any], path: Path) -> Path | None:
    """FID against wall-clock minutes and against images seen, both sides."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no race.png (the table and JSON are written).")
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for side, marker in (("ours", "o"), ("peer", "s")):
        result = report[side]
        label = (
            f"{NAMES['ours']} ({result['params'] / 1e6:.2f}M)"
            if side == "ours"
            else f"diffusers recipe x{result['width']:g} ({result['params'] / 1e6:.2f}M)"
        )
        fid = [r["fid"] for r in result["snapshots"]]
        minutes = [r["elapsed_s"] / 60 for r in result["snapshots"]]
        seen = [r["images"] / 1000 for r in result["snapshots"]]
        axes[0].plot(minutes, fid, marker=marker, label=label)
        axes[1].plot(seen, fid, marker=marker, label=label)
    axes[0].set_xlabel("training wall clock (minutes)")
    axes[1].set_xlabel("training images seen (thousands)")
    for axis in axes:
        axis.set_ylabel("FID (lower is better)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(
        f"{report['image_size']}px, {report['budget_minutes']} min per side, "
        f"{report['num_samples']} samples per point"
    )
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


if __name__ == "__main__":  # one side of a race: python -m flowerdiff.tasks.race <config> <side>
    logging.basicConfig(level=logging.INFO)
    run_side(sys.argv[1], sys.argv[2])
