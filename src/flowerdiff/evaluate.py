"""``evaluate(cfg)``: FID (and KID) of a checkpoint's samples, or of a folder of images.

The reference is the data set's cached Inception features (the same cache the training-time
FIDCallback fills), so a score here and ``val/fid`` in training are the same quantity. Weights
are loaded with ``weights_only=True`` (``flowerdiff.checkpoint.load_module``): evaluating a
downloaded checkpoint cannot execute code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from tqdm.auto import tqdm

from flowerdiff.build import resolve_precision
from flowerdiff.checkpoint import load_config, load_module
from flowerdiff.data.cache import decode_images
from flowerdiff.data.sources import list_folder_images
from flowerdiff.metrics.features import to_uint8
from flowerdiff.metrics.quality import SampleQuality, datamodule_reference, extract_features

log = logging.getLogger(__name__)


def autocast_context(
    precision: str | int, device: torch.device
) -> contextlib.AbstractContextManager:
    """The autocast Lightning's ``*-mixed`` precision would use for the forward pass."""
    precision = str(resolve_precision(precision, "gpu" if device.type == "cuda" else device.type))
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def generated_batches(
    cfg: DictConfig, device: torch.device
) -> tuple[Iterator[Tensor], dict[str, Any]]:
    """uint8 batches of the checkpoint's samples, and what describes them (for the report)."""
    module = load_module(cfg.ckpt_path, map_location=device)
    sampler = instantiate(cfg.sampler) if cfg.get("sampler") else module.sampler
    if cfg.steps is not None:
        sampler.num_inference_steps = int(cfg.steps)
    precision = autocast_context(cfg.precision, device)
    info = {"sampler": repr(sampler), "seed": cfg.seed, "num_samples": cfg.num_samples}

    def batches() -> Iterator[Tensor]:
        bar = tqdm(total=cfg.num_samples, desc="Sampling", unit="img")
        for start in range(0, cfg.num_samples, cfg.batch_size):
            n = min(cfg.batch_size, cfg.num_samples - start)
            with precision:
                images = module.sample(n, seed=cfg.seed, start_index=start, sampler=sampler)
            bar.update(n)
            yield to_uint8(images.images)
        bar.close()

    return batches(), info


def folder_batches(cfg: DictConfig, image_size: int) -> tuple[Iterator[Tensor], dict[str, Any]]:
    """uint8 batches of a folder of generated images, decoded like the training data."""
    files = list_folder_images(cfg.images_dir)
    if cfg.num_samples:
        files = files[: cfg.num_samples]

    def batches() -> Iterator[Tensor]:
        for start in tqdm(range(0, len(files), cfg.batch_size), desc="Reading images"):
            images, bad = decode_images(files[start : start + cfg.batch_size], image_size)
            if bad:
                log.warning("Skipped %d unreadable files, e.g. %s", len(bad), bad[0])
            yield images

    return batches(), {"images_dir": str(cfg.images_dir), "num_samples": len(files)}


def data_config(cfg: DictConfig, checkpoint_config: dict[str, Any]) -> DictConfig:
    """``data`` from the command line, else the data the checkpoint was trained on."""
    if cfg.get("data") is not None:
        return cfg.data
    if "data" in checkpoint_config:
        return OmegaConf.create(checkpoint_config["data"])
    raise ValueError(
        "No data set for the reference statistics: pass one, e.g. `data=folder "
        "data.root=../shared/data/flowers102_64 data.image_size=64` (with a checkpoint, its "
        "training data is the default)."
    )


def output_path(cfg: DictConfig) -> Path:
    if cfg.get("output_json"):
        return Path(cfg.output_json)
    if cfg.get("images_dir"):
        folder = Path(cfg.images_dir).resolve()
        return folder.parent / f"{folder.name}.fid.json"
    ckpt = Path(cfg.ckpt_path)
    steps = f"-{cfg.steps}steps" if cfg.steps is not None else ""
    return ckpt.with_name(f"{ckpt.stem}.fid-{cfg.num_samples}{steps}-seed{cfg.seed}.json")


def evaluate(cfg: DictConfig, extractor: nn.Module | None = None) -> dict[str, Any]:
    """Score the samples, print a table, write JSON; returns the scores and timings."""
    if bool(cfg.get("ckpt_path")) == bool(cfg.get("images_dir")):
        raise ValueError(
            "Pass exactly one of ckpt_path=<file.ckpt> (generate and score its samples) or "
            "images_dir=<folder> (score existing images)."
        )
    device = resolve_device(str(cfg.device))
    # load_config refuses stored configs naming anything but flowerdiff's own classes: the
    # `data` node is instantiated below, and a crafted one could otherwise call any function.
    checkpoint_config = load_config(cfg.ckpt_path) if cfg.get("ckpt_path") else {}
    datamodule = instantiate(data_config(cfg, checkpoint_config))
    extractor = (extractor or instantiate(cfg.fid.feature_extractor)).eval().to(device)

    tic = time.perf_counter()
    real, cache_hit = datamodule_reference(
        datamodule, extractor, cfg.fid.cache_dir, cfg.batch_size, device, progress=True
    )
    timings = {"reference_s": time.perf_counter() - tic}
    quality = SampleQuality(real.shape[1], kid=cfg.kid).to(device)
    quality.update(real, real=True)

    if cfg.get("images_dir"):
        batches, info = folder_batches(cfg, datamodule.hparams.image_size)
    else:
        batches, info = generated_batches(cfg, device)
    generate = features = 0.0
    tic = time.perf_counter()
    for images in batches:
        toc = time.perf_counter()
        quality.update(extract_features(extractor, images, cfg.batch_size, device), real=False)
        generate += toc - tic
        tic = time.perf_counter()
        features += tic - toc
    tic = time.perf_counter()
    scores = quality.compute()
    timings.update(sampling_s=generate, features_s=features, statistics_s=time.perf_counter() - tic)
    result = {
        **scores,
        **info,
        "ckpt_path": str(cfg.ckpt_path) if cfg.get("ckpt_path") else None,
        "num_real": len(real),
        "reference_cached": cache_hit,
        "feature_extractor": getattr(extractor, "fingerprint", type(extractor).__name__),
        "timings": timings,
    }
    path = output_path(cfg)
    path.write_text(json.dumps(result, indent=2))
    print_table(result, path)
    return result


def print_table(result: dict[str, Any], path: Path) -> None:
    table = Table(title="Sample quality")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("FID", f"{result['fid']:.3f}")
    if "kid_mean" in result:
        table.add_row(
            "KID (x1000)", f"{1000 * result['kid_mean']:.3f} ± {1000 * result['kid_std']:.3f}"
        )
    table.add_row("generated images", str(result["num_samples"]))
    table.add_row("real images", str(result["num_real"]))
    for key, seconds in result["timings"].items():
        table.add_row(key.removesuffix("_s") + " (s)", f"{seconds:.1f}")
    console = Console()
    console.print(table)
    console.print(f"Written to {path}")
