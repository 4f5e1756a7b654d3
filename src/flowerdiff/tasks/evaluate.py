"""``evaluate(cfg)``: FID, KID, precision and recall of a model's samples or of an image folder.

The reference is the data set's cached Inception features (the same cache the training-time
FIDCallback fills), so a score here and ``val/fid`` in training are the same quantity. A
class-conditional model is scored on class-balanced samples; ``guidance_scale=[1,2,3]`` sweeps
classifier-free guidance and plots FID, precision and recall per scale (the trade-off).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from flowerdiff.data.cache import decode_images
from flowerdiff.data.sources import DataSourceError, list_folder_images
from flowerdiff.diffusion.guidance import Guidance
from flowerdiff.infra.config import (
    Problems,
    check_output_dir,
    check_positive_int,
    configured_sampler,
    plain,
)
from flowerdiff.infra.devices import autocast_context, resolve_device
from flowerdiff.infra.exports import load_model
from flowerdiff.metrics.features import to_uint8
from flowerdiff.metrics.quality import (
    SampleQuality,
    datamodule_reference,
    extract_features,
    precision_recall,
)
from flowerdiff.training.generate import evaluation_conditioning, sample_batches
from flowerdiff.training.module import DiffusionModule
from flowerdiff.viz.figures import plot_tradeoff

log = logging.getLogger(__name__)


def output_path(cfg: DictConfig) -> Path:
    if cfg.get("output_json"):
        return Path(cfg.output_json)
    if cfg.get("images_dir"):
        folder = Path(cfg.images_dir).resolve()
        return folder.parent / f"{folder.name}.fid.json"
    ckpt = Path(cfg.ckpt_path)
    steps = f"-{cfg.steps}steps" if cfg.steps is not None else ""
    stem = ckpt.stem if ckpt.suffix else ckpt.name
    return ckpt.with_name(f"{stem}.fid-{cfg.num_samples}{steps}-seed{cfg.seed}.json")


def guidance_scales(cfg: DictConfig) -> list[float | None]:
    """``guidance_scale``: null (no guidance), a number, or a list to sweep."""
    value = plain(cfg.get("guidance_scale"))
    if value is None:
        return [None]
    return list(value) if isinstance(value, list) else [value]


def check(cfg: DictConfig) -> tuple[Problems, torch.device | None]:
    """Every check that needs no model and no data."""
    problems = Problems()
    if bool(cfg.get("ckpt_path")) == bool(cfg.get("images_dir")):
        problems.add(
            "Pass exactly one of `ckpt_path=<file.ckpt or export>` (generate and score its "
            "samples) or `images_dir=<folder>` (score existing images)."
        )
    inputs_exist = True
    for key in ("ckpt_path", "images_dir"):
        if cfg.get(key) and not Path(str(cfg[key])).expanduser().exists():
            problems.add(f"`{key}={cfg[key]!r}` does not exist.")
            inputs_exist = False
    if cfg.get("images_dir") and Path(str(cfg.images_dir)).expanduser().is_file():
        problems.add(
            f"`images_dir={cfg.images_dir!r}` is a file; pass the folder of generated images."
        )
    if cfg.get("precision_recall", True):
        check_positive_int(cfg.get("pr_k", 3), "pr_k", problems)
    needed = minimum_samples(cfg)
    num_samples = cfg.get("num_samples")
    if num_samples is not None or not cfg.get("images_dir"):
        check_positive_int(num_samples, "num_samples", problems, minimum=2)
        if isinstance(num_samples, int) and 2 <= num_samples < needed:
            problems.add(
                f"`num_samples={num_samples}` is too few for precision and recall with "
                f"`pr_k={cfg.get('pr_k', 3)}`: they need more than pr_k samples. Use num_samples >= "
                f"{needed}, or precision_recall=false."
            )
    check_positive_int(cfg.get("batch_size"), "batch_size", problems)
    for scale in guidance_scales(cfg):
        if scale is not None:
            with problems.catch("guidance_scale"):
                Guidance(scale, plain(cfg.get("guidance_interval")))
    if cfg.get("output_json") or (
        inputs_exist and bool(cfg.get("ckpt_path")) != bool(cfg.get("images_dir"))
    ):  # the default lies next to the checkpoint or the folder, which may be read-only
        check_output_dir(output_path(cfg).parent, "output_json", problems)
    device = None
    with problems.catch("device"):
        device = resolve_device(cfg.device)
    if device is not None:
        with problems.catch("precision"):
            autocast_context(cfg.precision, device)
    return problems, device


def minimum_samples(cfg: DictConfig) -> int:
    """FID needs 2 images per side; precision and recall need more than ``pr_k``."""
    k = cfg.get("pr_k", 3)
    if cfg.get("precision_recall", True) and isinstance(k, int) and not isinstance(k, bool):
        return max(2, k + 1)
    return 2


def evaluate(cfg: DictConfig, extractor: nn.Module | None = None) -> dict[str, Any]:
    """Score the samples, print a table, write JSON (and the trade-off plot); returns results."""
    problems, device = check(cfg)
    problems.raise_if_any()
    assert device is not None
    module = load_model(cfg.ckpt_path, map_location=device) if cfg.get("ckpt_path") else None
    sampler = None
    if module is not None:
        with problems.catch("sampler"):
            sampler = configured_sampler(module.diffusion, cfg.get("sampler"), cfg.steps)
        if module.num_classes is None and guidance_scales(cfg) != [None]:
            problems.add("`guidance_scale` applies to class-conditional models only.")
    image_size = module.image_shape[-1] if module is not None else cfg.data.get("image_size")
    with open_dict(cfg):
        cfg.data.image_size = image_size
    datamodule = None
    with problems.catch("data"):
        datamodule = instantiate(cfg.data)
    problems.raise_if_any()
    assert datamodule is not None
    generated = decode_folder(cfg, image_size) if cfg.get("images_dir") else None
    # A missing or too small data set fails before the reference is computed.
    found = len(datamodule.image_files())
    if found < minimum_samples(cfg):
        raise DataSourceError(
            f"The reference data (data.root={str(cfg.data.get('root'))!r}) holds {found} "
            f"image(s); the scores need at least {minimum_samples(cfg)}. Point data.root at the "
            "data set the model was trained on."
        )
    extractor = (extractor or instantiate(cfg.fid.feature_extractor)).eval().to(device)

    tic = time.perf_counter()
    real, cache_hit = datamodule_reference(
        datamodule,
        extractor,
        cfg.fid.cache_dir,
        batch_size=cfg.batch_size,
        device=device,
        progress=True,
    )
    base = {
        "ckpt_path": str(cfg.ckpt_path) if cfg.get("ckpt_path") else None,
        "num_real": len(real),
        "reference_cached": cache_hit,
        "feature_extractor": getattr(extractor, "fingerprint", type(extractor).__name__),
    }
    reference_s = time.perf_counter() - tic
    runs = []
    for scale in guidance_scales(cfg):
        if generated is not None:
            batches, info = iter([generated]), {"images_dir": str(cfg.images_dir)}
        else:
            assert module is not None and sampler is not None
            batches, info = model_batches(cfg, module, sampler, device, scale)
        scores = score(cfg, real, batches, extractor, device)
        scores["timings"]["reference_s"] = reference_s
        runs.append({**scores, **info})
    result = {**base, **runs[0]} if len(runs) == 1 else {**base, "guidance_sweep": runs}
    path = output_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    if len(runs) > 1:
        result["plot"] = str(plot_tradeoff(runs, path.with_suffix(".png")))
    print_table(runs, path)
    return result


def decode_folder(cfg: DictConfig, image_size: int) -> Tensor:
    """The generated images of ``images_dir`` (at most ``num_samples``), decoded up front."""
    try:
        files = list_folder_images(cfg.images_dir)
    except DataSourceError:  # its message names data.root, the training data's key
        files = []
    if cfg.num_samples:
        files = files[: cfg.num_samples]
    images, bad = decode_images(files, image_size)
    if bad:
        log.warning("Skipped %d unreadable files, e.g. %s", len(bad), bad[0])
    needed = minimum_samples(cfg)
    if len(images) < needed:
        raise DataSourceError(
            f"images_dir={str(cfg.images_dir)!r} holds {len(images)} readable image(s) of "
            f"{len(files)} image files (PNG/JPEG, in it or its sub-folders); the scores need at "
            f"least {needed} (FID 2, precision/recall more than pr_k). Point images_dir at a "
            "folder of generated images."
        )
    return images


def model_batches(
    cfg: DictConfig,
    module: DiffusionModule,
    sampler: Any,
    device: torch.device,
    scale: float | None,
) -> tuple[Iterator[Tensor], dict[str, Any]]:
    """uint8 batches of the model's samples (class-balanced for conditional models)."""
    labels, guidance = evaluation_conditioning(
        module, cfg.num_samples, scale, plain(cfg.get("guidance_interval"))
    )
    info = {
        "sampler": repr(sampler),
        "seed": cfg.seed,
        "num_samples": cfg.num_samples,
        "guidance_scale": scale,
    }
    batches = sample_batches(
        module,
        cfg.num_samples,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        sampler=sampler,
        labels=labels,
        guidance=guidance,
        autocast=autocast_context(cfg.precision, device),
        progress=True,
    )
    return (to_uint8(batch.output.images) for batch in batches), info


def score(
    cfg: DictConfig,
    real: Tensor,
    batches: Iterator[Tensor],
    extractor: nn.Module,
    device: torch.device,
) -> dict[str, Any]:
    """FID (KID, precision, recall) of the generated batches against the real features."""
    quality = SampleQuality(real.shape[1], kid=cfg.kid, sync=False).to(device)
    quality.update(real, real=True)
    fake, generate, features = [], 0.0, 0.0
    tic = time.perf_counter()
    for images in batches:  # sampling happens as the loop asks for the next batch
        toc = time.perf_counter()
        generate += toc - tic
        batch_features = extract_features(extractor, images, cfg.batch_size, device)
        quality.update(batch_features, real=False)
        fake.append(batch_features)
        tic = time.perf_counter()
        features += tic - toc
    scores: dict[str, Any] = quality.compute()
    if cfg.get("precision_recall", True):
        scores.update(precision_recall(real, torch.cat(fake), k=cfg.get("pr_k", 3)))
    scores["num_samples"] = sum(len(f) for f in fake)
    scores["timings"] = {
        "sampling_s": generate,
        "features_s": features,
        "statistics_s": time.perf_counter() - tic,
    }
    return scores


def print_table(runs: list[dict[str, Any]], path: Path) -> None:
    table = Table(title="Sample quality")
    columns = ["guidance", "FID", "KID (x1000)", "precision", "recall", "images", "seconds"]
    for column in columns:
        table.add_column(column, justify="right")
    for run in runs:
        kid = (
            f"{1000 * run['kid_mean']:.2f} ± {1000 * run['kid_std']:.2f}"
            if "kid_mean" in run
            else ""
        )
        scale = run.get("guidance_scale")
        table.add_row(
            "-" if scale is None else f"{scale:g}",
            f"{run['fid']:.3f}",
            kid,
            f"{run['precision']:.3f}" if "precision" in run else "",
            f"{run['recall']:.3f}" if "recall" in run else "",
            str(run["num_samples"]),
            f"{sum(run['timings'].values()):.1f}",
        )
    console = Console()
    console.print(table)
    console.print(f"Written to {path}")
