"""Speed of our training step and sampler against a plain PyTorch loop and diffusers, side by side.

Every figure comes from one process on one device, measured one after the other with the same
batch, precision and synthetic uint8 images, so the ratios hold even where absolute timings are
noisy (a shared CPU). diffusers is imported here only, and only when the peer is measured: it is
the ``bench`` extra, never a runtime dependency.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.profilers import SimpleProfiler
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from flowerdiff.data.datamodule import FlowersDataModule, IndexedImages, to_model_space
from flowerdiff.diffusion import DDPMDiffusion
from flowerdiff.diffusion.samplers import DDIMSampler
from flowerdiff.infra.config import Problems, build_module, instantiate_callbacks
from flowerdiff.infra.devices import (
    AUTOCAST_DTYPES,
    autocast_context,
    check_precision,
    resolve_precision,
)
from flowerdiff.training.module import DiffusionModule, fused_kwargs

log = logging.getLogger(__name__)

# diffusers' train_unconditional example (the book's peer): 6 levels, attention at the 2nd lowest.
PEER_CHANNELS = (128, 128, 256, 256, 512, 512)
PEER_DOWN = ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D")
PEER_UP = ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4


# -- measuring ------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    """Resident memory of this process (Linux), for CPU peak memory."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so that resident memory at the start of a
    measurement is what is alive, not what an earlier loop left cached."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak memory above the level at entry, in MiB: CUDA's allocator counter on GPUs, resident
    memory sampled every millisecond on the CPU (where torch keeps no such counter; it includes
    what the C allocator keeps cached, so it is an upper bound)."""
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        result["peak_mib"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    gc.collect()
    release_freed_memory()
    start, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result["peak_mib"] = max(0, max(peak[0], rss_bytes()) - start) / 2**20


def matmul_peak_flops(device: torch.device, precision: str, size: int, repeats: int = 10) -> float:
    """Best observed FLOP/s of one square matmul in the compute dtype: the MFU denominator."""
    dtype = AUTOCAST_DTYPES.get(precision, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# torch's FLOP counter knows the CUDA attention kernels but not the CPU one SDPA uses here.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: (
            flop_counter.sdpa_backward_flop_count(grad, q, k, v)
        )
    ),
}


def train_flops_per_image(step: Callable[[], Tensor], batch_size: int) -> float:
    """Forward + backward FLOPs of one training step per image (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        step().backward()
    return counter.get_total_flops() / batch_size


# -- models ---------------------------------------------------------------------------------
def peer_unet(image_size: int, width: float) -> nn.Module:
    """diffusers' ``UNet2DModel`` in the flowers configuration, channels scaled by ``width``."""
    from diffusers import UNet2DModel  # the bench extra, imported only here

    channels = tuple(max(8, round(c * width / 8) * 8) for c in PEER_CHANNELS)
    return UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=channels,
        down_block_types=PEER_DOWN,
        up_block_types=PEER_UP,
        norm_num_groups=max(1, round(32 * width)),
    )


class DiffusersInterface(nn.Module):
    """Our U-Net behind what diffusers' pipelines call (``.config``, ``.dtype``, ``out.sample``),
    so DDIMPipeline can sample from it: the sampling loops are then compared on one network."""

    def __init__(self, net: nn.Module, image_size: int, in_channels: int) -> None:
        super().__init__()
        self.net = net
        self.config = SimpleNamespace(sample_size=image_size, in_channels=in_channels)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, sample: Tensor, timestep: Tensor | int) -> SimpleNamespace:
        return SimpleNamespace(sample=self.net(sample, timestep))


def unwrap_sample(net: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """``net(x, t)`` as a tensor, for ours (a tensor) and diffusers' (``out.sample``) alike."""

    def forward(x: Tensor, t: Tensor) -> Tensor:
        out = net(x, t)
        return out if isinstance(out, Tensor) else out.sample

    return forward


# -- the three training loops ---------------------------------------------------------------
class BenchmarkData(FlowersDataModule):
    """The real data module (uint8 batches, scaling and flips on the device) on random images."""

    def __init__(self, images: Tensor, batch_size: int) -> None:
        super().__init__(
            batch_size=batch_size, val_fraction=0.0, num_workers=0, image_size=images.shape[-1]
        )
        self.images = images
        self.train_set = IndexedImages(images, torch.arange(len(images)))
        self.val_set = IndexedImages(images, torch.arange(0))

    def prepare_data(self) -> None:
        """Nothing to download or decode."""


class StepTimer(L.Callback):
    """Wall time of each training batch after ``warmup``, from one batch's start to the next's
    (hooks, logging and data included), and the peak memory of training (from its start, so the
    first step's optimizer state and the allocator's growth count, as in the plain loop)."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup = warmup
        self.device = device
        self.durations: list[float] = []
        self.memory: dict[str, float] = {}
        self._memory_context: contextlib.AbstractContextManager | None = None
        self._last = 0.0

    def _tick(self) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        if self._last:
            self.durations.append(now - self._last)
        self._last = now

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._memory_context = peak_memory(self.device)
        self.memory = self._memory_context.__enter__()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.warmup:
            self._tick()

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._tick()
        assert self._memory_context is not None
        self._memory_context.__exit__(None, None, None)


def median(values: list[float]) -> float:
    """The median step time: robust to other processes stealing the CPU for a moment."""
    return float(torch.tensor(values).median())


def measuring_trainer(
    accelerator: str, precision: Any, max_steps: int, callbacks: list[L.Callback], **options: Any
) -> L.Trainer:
    """A Trainer that only trains, for timing (benchmark, race): no logger, checkpoints,
    progress bar, model summary or validation to add their cost."""
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        benchmark=accelerator == "cuda",
        callbacks=callbacks,
        **options,
    )


def lightning_step(
    cfg: DictConfig, images: Tensor, device: torch.device, precision: str, profile: bool = False
) -> dict[str, Any]:
    """Our training step as ``scripts/train.py`` runs it: Lightning, callbacks, logging."""
    warmup, steps = cfg.warmup_steps, cfg.steps
    module = build_module(cfg)
    timer = StepTimer(warmup, device)
    # The full per-hook report goes to a file beside the JSON; the table shows the top entries.
    profiler = SimpleProfiler(Path(cfg.output).parent, "lightning_profile") if profile else None
    trainer = measuring_trainer(
        device.type,
        precision,
        warmup + steps,
        [*instantiate_callbacks(cfg.get("callbacks")), timer],
        profiler=profiler,
    )
    trainer.fit(module, datamodule=BenchmarkData(images, cfg.batch_size))
    result = {
        "images_per_s": cfg.batch_size / median(timer.durations),
        "peak_mib": timer.memory["peak_mib"],
    }
    if profiler is not None:
        totals = {name: sum(d) for name, d in profiler.recorded_durations.items()}
        result["profile_s"] = dict(sorted(totals.items(), key=lambda kv: -kv[1])[:12])
    return result


def plain_step(
    cfg: DictConfig,
    net: nn.Module,
    module: DiffusionModule,
    images: Tensor,
    device: torch.device,
    precision: str,
) -> dict[str, Any]:
    """The same training as a plain PyTorch loop (what a careful hand-written script does):
    uint8 batch to the device, scale and flip, noise, loss, backward, AdamW, LR schedule, EMA."""
    net = net.to(device)
    memory_format = torch.channels_last if module.channels_last else torch.contiguous_format
    net.to(memory_format=memory_format)
    diffusion = module.diffusion.to(device)
    forward = unwrap_sample(net)
    optimizer_factory = instantiate(cfg.optimizer)
    optimizer = optimizer_factory(
        params=net.parameters(), **fused_kwargs(optimizer_factory, device, precision)
    )
    scheduler = instantiate(cfg.lr_scheduler)(optimizer, cfg.warmup_steps + cfg.steps)
    decay = OmegaConf.select(cfg, "callbacks.ema.decay", default=0.999)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    autocast = autocast_context(precision, device)
    batch = cfg.batch_size

    def loss_of(step: int) -> Tensor:
        x = images[(step * batch) % len(images) :][:batch].to(device, non_blocking=True)
        x = to_model_space(x, flip=True).contiguous(memory_format=memory_format)
        with autocast():
            return diffusion.loss(lambda x_t, t, cond: forward(x_t, t), x)

    def train_step(step: int) -> None:
        scaler.scale(loss_of(step)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        ema.update_parameters(net)

    durations = []
    with peak_memory(device) as memory:
        for step in range(cfg.warmup_steps):
            train_step(step)
        for step in range(cfg.warmup_steps, cfg.warmup_steps + cfg.steps):
            durations.append(timed(lambda step=step: train_step(step), device))
    flops = train_flops_per_image(lambda: loss_of(0), batch)
    optimizer.zero_grad(set_to_none=True)
    return {
        "images_per_s": batch / median(durations),
        "peak_mib": memory["peak_mib"],
        "train_flops_per_image": flops,
        "params": sum(p.numel() for p in net.parameters()),
    }


# -- sampling -------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def ddim_pipeline(unet: nn.Module, module: DiffusionModule) -> Any:
    """diffusers' DDIMPipeline with our schedule's betas and our sampler's settings."""
    from diffusers import DDIMPipeline, DDIMScheduler

    sampler = module.diffusion.sampler
    scheduler = DDIMScheduler(
        num_train_timesteps=module.diffusion.schedule.num_timesteps,
        trained_betas=module.diffusion.schedule.betas.double().cpu().numpy(),
        clip_sample=getattr(sampler, "clip_sample", True),
        timestep_spacing=sampler.timestep_spacing or sampler.default_timestep_spacing,
    )
    pipeline = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sampling(
    cfg: DictConfig, module: DiffusionModule, peer: nn.Module | None, device: torch.device
) -> dict[str, float]:
    """Images/s of our sampler; for DDIM on the DDPM family also of diffusers' DDIMPipeline on
    our U-Net and on the peer's (the pipeline runs DDIM on a discrete schedule only, so for
    other samplers or EDM there is nothing like-for-like to compare with)."""
    n, steps = cfg.sample_batch_size, module.diffusion.sampler.num_inference_steps
    eta = getattr(module.diffusion.sampler, "eta", 1.0)
    results = {"ours": n / timed(lambda: module.sample(n, seed=0), device)}
    comparable = isinstance(module.diffusion, DDPMDiffusion) and isinstance(
        module.diffusion.sampler, DDIMSampler
    )
    if peer is None or not comparable:
        if peer is not None:
            log.info("No DDIMPipeline figures: the sampler is not DDIM on the DDPM family.")
        return results
    adapter = DiffusersInterface(module.net, module.image_shape[1], module.image_shape[0])
    for name, unet in (("diffusers_pipeline_our_unet", adapter), ("diffusers_pipeline_peer", peer)):
        pipeline = ddim_pipeline(unet.eval(), module)
        generator = torch.Generator().manual_seed(0)

        def run(pipeline: Any = pipeline, generator: torch.Generator = generator) -> None:
            pipeline(
                batch_size=n,
                generator=generator,
                num_inference_steps=steps,
                eta=eta,
                use_clipped_model_output=getattr(
                    module.diffusion.sampler, "use_clipped_model_output", False
                ),
                output_type="pt",
            )

        with torch.no_grad():
            results[name] = n / timed(run, device)
    return results


# -- the whole benchmark --------------------------------------------------------------------
def resolve_peer_width(cfg: DictConfig) -> float:
    """``auto``: diffusers' channels scaled like ours (our first width over its 128)."""
    if str(cfg.peer_width) != "auto":
        return float(cfg.peer_width)
    return cfg.model.net.hidden_dims[0] / PEER_CHANNELS[0]


def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Measure everything, print the table, write the JSON; returns the JSON's content."""
    threads = torch.get_num_threads()
    try:
        return _run_benchmark(cfg)
    finally:
        torch.set_num_threads(
            threads
        )  # `threads=` must not outlive the call (tests share a process)


def _run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    problems = Problems()
    with problems.catch("precision"):
        check_precision(cfg.precision, "precision")
    problems.raise_if_any()
    accelerator = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    device = torch.device("cpu" if accelerator == "auto" else accelerator)
    precision = str(resolve_precision(cfg.precision, device.type))
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    count = cfg.batch_size * (cfg.warmup_steps + cfg.steps)
    size = cfg.image_size
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "model": OmegaConf.to_container(cfg.model.net, resolve=True),
        "image_size": size,
        "batch_size": cfg.batch_size,
        "precision": precision,
        "sampler": str(cfg.sampler.name),
        "sampler_steps": cfg.sampler.num_inference_steps,
        "matmul_peak_flops": matmul_peak_flops(device, precision, cfg.matmul_size),
    }
    report["lightning"] = lightning_step(cfg, images, device, precision, profile=cfg.profile)
    module = build_module(cfg).to(device)
    report["plain"] = plain_step(cfg, module.net, module, images, device, precision)
    peer = None
    if cfg.peer:
        try:
            peer = peer_unet(size, resolve_peer_width(cfg))
        except ImportError:
            log.warning("diffusers is not installed (pip install -e '.[bench]'): no peer figures.")
    if peer is not None:
        if cfg.model.get("compile"):  # the same speed options as ours
            peer.compile()
        report["peer_width"] = resolve_peer_width(cfg)
        report["peer"] = plain_step(cfg, peer, module, images, device, precision)
    module.net.eval()
    with autocast_context(precision, device)():
        report["sampling_images_per_s"] = sampling(cfg, module, peer, device)
    # Measured again at the end: on a shared machine the best of both is closer to the truth.
    report["matmul_peak_flops"] = max(
        report["matmul_peak_flops"], matmul_peak_flops(device, precision, cfg.matmul_size)
    )
    add_ratios(report)
    print(format_table(report))
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"written: {output}")
    return report


def add_ratios(report: dict[str, Any]) -> None:
    """Our step's speed over the plain loop's and the peer's; MFU from the measured peak."""
    ours, plain = report["lightning"], report["plain"]
    ours["train_flops_per_image"] = plain["train_flops_per_image"]
    ours["vs_plain"] = ours["images_per_s"] / plain["images_per_s"]
    for row in ("lightning", "plain", "peer"):
        if row in report:
            r = report[row]
            r["mfu"] = r["images_per_s"] * r["train_flops_per_image"] / report["matmul_peak_flops"]
    if "peer" in report:
        ours["vs_peer"] = ours["images_per_s"] / report["peer"]["images_per_s"]
    sampling = report["sampling_images_per_s"]
    if "diffusers_pipeline_our_unet" in sampling:
        sampling["ours_vs_pipeline_same_unet"] = (
            sampling["ours"] / sampling["diffusers_pipeline_our_unet"]
        )


def format_table(report: dict[str, Any]) -> str:
    """A markdown table: paste it into an issue as is."""
    gflop = 1e9
    lines = [
        f"device {report['device']} ({report['threads']} threads), precision "
        f"{report['precision']}, batch {report['batch_size']} x {report['image_size']}px, "
        f"matmul peak {report['matmul_peak_flops'] / gflop:.1f} GFLOP/s",
        "",
        "| training | params | images/s | ours vs this | peak MiB | GFLOP/image | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ours = report["lightning"]
    rows = [("ours, Lightning step", ours, report["plain"]["params"])]
    rows.append(("ours, plain PyTorch loop", report["plain"], report["plain"]["params"]))
    if "peer" in report:
        name = f"diffusers UNet2DModel x{report['peer_width']:.3g}, plain loop"
        rows.append((name, report["peer"], report["peer"]["params"]))
    for name, row, params in rows:
        ratio = ours["images_per_s"] / row["images_per_s"]
        lines.append(
            f"| {name} | {params / 1e6:.2f}M | {row['images_per_s']:.1f} | {ratio:.2f}x | "
            f"{row['peak_mib']:.0f} | {row['train_flops_per_image'] / gflop:.2f} | "
            f"{row['mfu'] * 100:.1f}% |"
        )
    sampler = f"{report.get('sampler', 'ddim')}-{report['sampler_steps']}"
    lines += ["", f"| {sampler} sampling | images/s |", "|---|---:|"]
    names = {
        "ours": "ours (flowerdiff sampler, our U-Net)",
        "diffusers_pipeline_our_unet": "diffusers DDIMPipeline, our U-Net",
        "diffusers_pipeline_peer": "diffusers DDIMPipeline, its UNet2DModel",
        "ours_vs_pipeline_same_unet": "ratio ours / DDIMPipeline (same U-Net)",
    }
    for key, value in report["sampling_images_per_s"].items():
        lines.append(f"| {names[key]} | {value:.2f} |")
    if "profile_s" in ours:
        lines += ["", "| our step, Lightning profiler | total s |", "|---|---:|"]
        lines += [f"| {name} | {s:.3f} |" for name, s in ours["profile_s"].items()]
    return "\n".join(lines)
