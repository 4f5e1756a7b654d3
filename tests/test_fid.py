"""FID: the distance against scipy, the extractors' input rule, the reference cache, the weights
check, and FIDCallback end to end: EMA weights sampled whatever the callback order, the reference
computed at the first evaluation only, class-balanced labels for a conditional model."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import WeightAveraging
from omegaconf import DictConfig, OmegaConf, open_dict
from scipy import linalg
from torch import Tensor
from torch.nn.utils import parameters_to_vector

from flowerdiff.callbacks.fid import FIDCallback
from flowerdiff.diffusion.guidance import Guidance
from flowerdiff.metrics import quality
from flowerdiff.metrics.features import (
    CPU_MICRO_BATCH,
    build_inception,
    in_micro_batches,
    resize_for_inception,
    to_uint8,
)
from flowerdiff.metrics.quality import SampleQuality, reference_features
from flowerdiff.metrics.weights import TORCHSCRIPT_FILE, FIDWeightsError, torchscript_path
from flowerdiff.tasks.train import train
from flowerdiff.training.generate import balanced_labels, shard
from flowerdiff.training.module import DiffusionModule

from conftest import SHARED_FLOWERS, TINY_OVERRIDES, TinyFeatures, compose_config


class CountingFeatures(TinyFeatures):
    """TinyFeatures that records the batch size of every call (on the class: Hydra builds it)."""

    calls: ClassVar[list[int]] = []

    def forward(self, images: Tensor) -> Tensor:
        CountingFeatures.calls.append(len(images))
        return super().forward(images)


def scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook formula, independently: ||mu1-mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def fid_of(real: Tensor, fake: Tensor) -> float:
    metric = SampleQuality(real.shape[1])
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return metric.compute()["fid"]


def test_frechet_distance_matches_scipy_and_grows_with_shift() -> None:
    generator = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 16, generator=generator) / 4
    real = torch.randn(600, 16, generator=generator) @ mix + 0.3
    fake = torch.randn(500, 16, generator=generator) @ (mix * 1.3) - 0.1
    expected = scipy_fid(real.double().numpy(), fake.double().numpy())
    assert fid_of(real, fake) == pytest.approx(expected, rel=1e-3, abs=1e-4)
    assert abs(fid_of(real, real)) < 1e-3
    scores = [fid_of(real, real + shift) for shift in (0.1, 0.5, 1.0)]
    assert scores == sorted(scores) and scores[0] > 0.1
    assert scores[-1] == pytest.approx(16.0, rel=1e-3)  # a pure shift: ||mu1 - mu2||^2 = 16


def test_shards_cover_every_image_once() -> None:
    for total, world in ((10, 3), (2, 4), (256, 2)):
        parts = [shard(total, rank, world) for rank in range(world)]
        indices = [i for start, count in parts for i in range(start, start + count)]
        assert indices == list(range(total))


def test_inception_runs_in_micro_batches_on_the_cpu_only() -> None:
    seen: list[tuple[str, int]] = []

    def forward(images: Tensor) -> Tensor:
        seen.append((images.device.type, len(images)))
        return images.flatten(1).float() * 2

    images = torch.arange(11 * 3, dtype=torch.uint8).reshape(11, 3, 1, 1)
    out = in_micro_batches(forward, images)
    torch.testing.assert_close(out, images.flatten(1).float() * 2)
    assert seen == [("cpu", CPU_MICRO_BATCH)] * (11 // CPU_MICRO_BATCH) + [
        ("cpu", 11 % CPU_MICRO_BATCH)
    ]
    seen.clear()
    in_micro_batches(forward, torch.zeros(11, 3, 1, 1, device="meta"))  # a GPU's batch: whole
    assert seen == [("meta", 11)]


def test_resize_is_tensorflow1_bilinear() -> None:
    """Against an independent formula of TF1's bilinear resize (StyleGAN's ``nv_bilinear``)."""
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    theta = torch.eye(2, 3).repeat(2, 1, 1)
    theta[:, :, 2] += 1 / 16 - 1 / 299  # TF1 samples at i * in/out, not at pixel centres
    grid = F.affine_grid(theta, [2, 3, 299, 299], align_corners=False)
    expected = F.grid_sample(images.float(), grid, padding_mode="border", align_corners=False)
    resized = resize_for_inception(images)
    assert resized.shape == (2, 3, 299, 299)
    torch.testing.assert_close(resized, (expected - 128) / 128, atol=1e-4, rtol=0)
    antialiased = F.interpolate(images.float(), 299, mode="bilinear", antialias=True)
    assert not torch.allclose(resized, (antialiased - 128) / 128, atol=1e-2)
    assert torch.equal(
        to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0])), torch.tensor([0, 128, 255, 255]).byte()
    )


def test_missing_weights_fail_fast_naming_file_and_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FIDWeightsError, match="make fid-weights") as error:
        build_inception(cache_dir=str(tmp_path / "empty"))
    assert TORCHSCRIPT_FILE in str(error.value)
    truncated = torchscript_path(tmp_path)
    truncated.write_bytes(b"not a network")
    with pytest.raises(FIDWeightsError, match="truncated"):
        build_inception(source="torchscript", cache_dir=str(tmp_path))


def test_reference_cache_hit_does_not_recompute(tmp_path: Path, monkeypatch) -> None:
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    calls = []

    def load() -> Tensor:
        calls.append(1)
        return images

    extractor = TinyFeatures()
    first, hit = reference_features(load, "folder|abc", extractor, tmp_path)
    assert not hit and calls == [1] and first.shape == (12, 8)
    second, hit = reference_features(load, "folder|abc", extractor, tmp_path)
    assert hit and calls == [1] and torch.equal(first, second)
    _, hit = reference_features(load, "folder|abc", TinyFeatures(seed=1), tmp_path)
    assert not hit  # another network is another cache entry
    _, hit = reference_features(load, "folder|other-size", extractor, tmp_path)
    assert not hit and len(calls) == 3


def test_reference_pieces_computed_elsewhere_are_joined_not_recomputed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race's sides share the reference: a helper computes the pieces nobody has claimed;
    the final call computes only the rest, and the result is one computation's."""
    monkeypatch.setattr(quality, "REFERENCE_PIECE", 4)
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    whole = quality.extract_features(TinyFeatures(), images, 3)
    work, cache = tmp_path / "work", tmp_path / "cache"
    claimed = quality.piece_path(work, "folder|abc", CountingFeatures(), 1).with_suffix(".claim")
    claimed.parent.mkdir(parents=True)
    claimed.touch()  # another process holds piece 1 (and, below, leaves a bad file)
    CountingFeatures.calls.clear()
    done = quality.help_with_reference(
        lambda: images, "folder|abc", CountingFeatures(), cache, work, 3
    )
    assert done == 2 and CountingFeatures.calls == [3, 1, 2]  # pieces 0 and 2 (images 0-3, 8-9)
    # Piece files that are not the features of their images are recomputed, not trusted: one
    # of the right shape but other values (caught by the first row's spot check), one with NaN.
    torch.save(torch.zeros(4, 8), claimed.with_suffix(".pt"))
    last = quality.piece_path(work, "folder|abc", CountingFeatures(), 2)
    torch.save(torch.full((2, 8), float("nan")), last)
    CountingFeatures.calls.clear()
    features, hit = reference_features(
        lambda: images, "folder|abc", CountingFeatures(), cache, 3, work_dir=work
    )
    # piece 0: its spot check; piece 1: spot check, then all of it; piece 2: all of it
    assert not hit and CountingFeatures.calls == [1, 1, 3, 1, 2]
    torch.testing.assert_close(features, whole, rtol=0, atol=1e-6)

    def never() -> Tensor:
        raise AssertionError("the cached reference was computed again")

    assert quality.help_with_reference(never, "folder|abc", CountingFeatures(), cache, work) == 0
    cached, hit = reference_features(never, "folder|abc", CountingFeatures(), cache, work_dir=work)
    assert hit and torch.equal(cached, features)


def fid_config(
    tmp_path: Path,
    image_folder: Path,
    *extra: str,
    fid_first: bool = False,
    monitor: bool = True,
    extractor: str = "test_fid.TinyFeatures",
    run: str = "run",
) -> DictConfig:
    """The tiny training config with the real `fid` callback config and a small extractor."""
    overrides = [o for o in TINY_OVERRIDES if o != "~callbacks.fid"]
    watch = ["callbacks.model_checkpoint.monitor=val/fid", "+callbacks.model_checkpoint.mode=min"]
    cfg = compose_config(
        [
            *overrides,
            f"data.root={image_folder}",
            f"paths.root_dir={tmp_path}",
            "callbacks.fid.num_samples=6",
            "callbacks.fid.batch_size=4",
            "callbacks.fid.every_n_epochs=1",
            "callbacks.fid.num_inference_steps=2",
            *(watch if monitor else []),
            *extra,
        ],
        output_dir=tmp_path / run,
    )
    with open_dict(cfg):
        cfg.callbacks.fid.feature_extractor = {"_target_": extractor}
        # Only what this test is about; callbacks run in config order (FID before or after EMA).
        items = OmegaConf.to_container(cfg.callbacks)
        order = (
            ("fid", "ema", "model_checkpoint") if fid_first else ("ema", "fid", "model_checkpoint")
        )
        cfg.callbacks = {name: items[name] for name in order}
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("fid_first", [False, True])
def test_callback_samples_ema_weights_and_logs_fid(
    tmp_path: Path, image_folder: Path, monkeypatch, fid_first: bool
) -> None:
    seen: list[dict[str, Tensor]] = []
    original = FIDCallback.run

    def recording_evaluate(callback: FIDCallback, trainer, module: DiffusionModule):
        ema = next(c for c in trainer.callbacks if isinstance(c, WeightAveraging))
        seen.append(
            {
                "sampled": parameters_to_vector(module.net.parameters()).clone(),
                "swapped_out": parameters_to_vector(ema._average_model.module.net.parameters()),
            }
        )
        return original(callback, trainer, module)

    monkeypatch.setattr(FIDCallback, "run", recording_evaluate)
    cfg = fid_config(tmp_path, image_folder, fid_first=fid_first)
    metrics = train(cfg)

    assert np.isfinite(metrics["val/fid"]) and metrics["val/fid"] > 0
    assert metrics["val/fid_best"] == metrics["val/fid"]
    assert len(seen) == 1  # one epoch, one validation
    # After fit, the module holds the EMA weights (Lightning copies them in at train end; no
    # optimizer step happened since that validation): those are what was sampled ...
    # (the checkpoint ModelCheckpoint wrote while monitoring val/fid, after that validation).
    saved = sorted((tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    assert saved, "ModelCheckpoint(monitor=val/fid) wrote nothing"
    ema_weights = torch.load(saved[-1], weights_only=True)
    ema_vector = torch.cat(
        [v.flatten() for k, v in ema_weights["state_dict"].items() if k.startswith("net.")]
    )
    torch.testing.assert_close(seen[0]["sampled"], ema_vector)
    # ... and not the raw training weights, which sat in the EMA callback during the window.
    assert not torch.allclose(seen[0]["sampled"], seen[0]["swapped_out"])
    assert (tmp_path / "data" / "cache" / "fid").is_dir()


@pytest.mark.slow
def test_reference_is_computed_at_the_first_evaluation_and_cached(
    tmp_path: Path, image_folder: Path
) -> None:
    """A run that never evaluates never extracts a real feature; the first evaluation extracts
    all 16 images once (not again at the second); the next run reads them from the cache."""
    cache = tmp_path / "data" / "cache" / "fid"
    counting = {"monitor": False, "extractor": "test_fid.CountingFeatures"}

    def calls(*overrides: str, run: str) -> list[int]:
        CountingFeatures.calls.clear()
        metrics = train(fid_config(tmp_path, image_folder, *overrides, run=run, **counting))
        assert ("val/fid" in metrics) == bool(CountingFeatures.calls)
        return list(CountingFeatures.calls)

    assert calls("callbacks.fid.every_n_epochs=2", run="never") == []
    assert not list(cache.glob("fid-reference-*.pt"))
    # No cache: 16 real images in one batch at the first evaluation, then each evaluation's 6
    # samples in batches of 4; the second evaluation reuses the real features in memory.
    no_cache = ("trainer.max_epochs=2", "callbacks.fid.cache_dir=null")
    assert calls(*no_cache, run="in-memory") == [16, 4, 2, 4, 2]
    assert not cache.exists() or not list(cache.glob("fid-reference-*.pt"))
    # With the cache: filled by the first run that evaluates, read by the next.
    assert calls(run="fills") == [16, 4, 2]
    assert len(list(cache.glob("fid-reference-*.pt"))) == 1
    assert calls(run="reads") == [4, 2]


def write_labels(folder: Path, num_classes: int) -> Path:
    files = sorted(p.name for p in folder.glob("*.png"))
    rows = "".join(f"{name},{k % num_classes}\n" for k, name in enumerate(files))
    (folder / "labels.csv").write_text(f"file,label\n{rows}")
    return folder


@pytest.mark.slow
def test_conditional_model_is_scored_on_class_balanced_guided_samples(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_labels(image_folder, 3)
    calls: list[tuple[int, Tensor | None, Guidance | None]] = []
    original = DiffusionModule.sample

    def spy(module: DiffusionModule, num_images: int, **kwargs) -> object:
        calls.append((kwargs["start_index"], kwargs["class_labels"], kwargs["guidance"]))
        return original(module, num_images, **kwargs)

    monkeypatch.setattr(DiffusionModule, "sample", spy)
    cfg = fid_config(
        tmp_path,
        image_folder,
        "data.labels=true",
        "model.net.num_classes=3",
        "callbacks.fid.guidance_scale=1.5",
        monitor=False,
    )
    metrics = train(cfg)
    assert np.isfinite(metrics["val/fid"])
    assert [start for start, _, _ in calls] == [0, 4]
    labels = torch.cat([labels for _, labels, _ in calls]).tolist()
    assert labels == [0, 1, 2, 0, 1, 2] == balanced_labels(6, 3).tolist()
    assert all(guidance == Guidance(1.5) for _, _, guidance in calls)


@pytest.mark.data
@pytest.mark.slow
def test_real_inception_halves_low_blurred_high() -> None:
    """With the real network on the flower images: two halves agree, blurred images do not."""
    if not SHARED_FLOWERS.is_dir():
        pytest.skip(f"no flower images at {SHARED_FLOWERS}")
    if not torchscript_path().is_file():
        pytest.skip(f"no Inception weights at {torchscript_path()} (run `make fid-weights`)")
    from torchvision.transforms.v2.functional import gaussian_blur

    from flowerdiff.data.cache import decode_images
    from flowerdiff.data.sources import list_folder_images

    files = list_folder_images(SHARED_FLOWERS)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:64]
    images, _ = decode_images([files[i] for i in order.tolist()], 64)
    first, second = images[:32], images[32:]
    blurred = gaussian_blur(second, kernel_size=[5, 5], sigma=[1.5, 1.5])
    extractor = build_inception(source="torchscript")
    features = [quality.extract_features(extractor, x, 32) for x in (first, second, blurred)]
    # The extractor feeds the network channels_last and CPU_MICRO_BATCH images at a time (both
    # faster on the CPU): the same features as one plain batch, up to float rounding (measured:
    # 4.5e-6 at most, features up to 5.3).
    with torch.no_grad():
        plain = extractor.net(resize_for_inception(first[:8])).float().flatten(1)
    torch.testing.assert_close(features[0][:8], plain, rtol=0, atol=1e-4)

    def score(fake: Tensor) -> dict[str, float]:
        metric = SampleQuality(2048, kid=True, kid_subset_size=32, sync=False)
        metric.update(features[0], real=True)
        metric.update(fake, real=False)
        return metric.compute()

    halves, blur = score(features[1]), score(features[2])
    # 32 images per set: FID's small-sample bias dominates both (measured 203 vs 220), so the
    # unbiased KID carries the "low vs far higher" claim (measured 0.010 vs 0.045).
    assert blur["fid"] > halves["fid"], (halves, blur)
    assert abs(halves["kid_mean"]) < 0.02 and blur["kid_mean"] > halves["kid_mean"] + 0.02


def test_callback_rejects_too_few_samples() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        FIDCallback(TinyFeatures(), num_samples=1)


@pytest.mark.slow
def test_edm_run_trains_logs_grids_and_fid_then_every_script_reads_it(
    tmp_path: Path, image_folder: Path
) -> None:
    """`diffusion=edm` goes through the same pipeline as the DDPM family: training with the
    FID and denoising-grid callbacks, then sample, evaluate and export on its checkpoint."""
    from PIL import Image

    from flowerdiff.infra.exports import load_model
    from flowerdiff.tasks.evaluate import evaluate
    from flowerdiff.tasks.export import export
    from flowerdiff.tasks.sample import sample

    cfg = compose_config(
        [
            *(o for o in TINY_OVERRIDES if o != "~callbacks.fid"),
            f"data.root={image_folder}",
            f"paths.root_dir={tmp_path}",
            "diffusion=edm",
            "sampler=heun",
            "callbacks.fid.num_samples=6",
            "callbacks.fid.batch_size=4",
            "callbacks.fid.every_n_epochs=1",
            "callbacks.fid.num_inference_steps=2",
        ],
        output_dir=tmp_path / "run",
    )
    with open_dict(cfg):
        cfg.callbacks.fid.feature_extractor = {"_target_": "test_fid.TinyFeatures"}
    metrics = train(cfg)
    assert np.isfinite(metrics["val/fid"]) and np.isfinite(metrics["val/loss"])
    images = tmp_path / "run" / "images"
    assert list((images / "samples" / "grid").glob("step_*.png"))
    assert list((images / "samples" / "trajectory").glob("step_*.png"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert load_model(checkpoint).diffusion.name == "edm"

    def config(name: str, *overrides: str) -> DictConfig:
        return compose_config(
            [f"ckpt_path={checkpoint}", *overrides],
            config_name=name,
            output_dir=tmp_path / name,
        )

    written = sample(
        config("sample", "device=cpu", f"out_dir={tmp_path / 's'}", "num_images=2", "steps=3")
    )
    assert Image.open(written["grid"]).size[0] > 16
    result = evaluate(
        config(
            "evaluate",
            "device=cpu",
            "num_samples=6",
            "steps=2",
            "batch_size=3",
            "data=folder",
            f"data.root={image_folder}",
            f"fid.cache_dir={tmp_path / 'fid-cache'}",
            f"paths.root_dir={tmp_path}",
        ),
        extractor=TinyFeatures(),
    )
    assert np.isfinite(result["fid"])
    out = export(config("export", f"out_dir={tmp_path / 'e'}"))
    exported = load_model(out)
    assert exported.diffusion.name == "edm"
    torch.testing.assert_close(
        exported.sample(2, seed=1).images, load_model(checkpoint).sample(2, seed=1).images
    )
