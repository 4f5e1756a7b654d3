"""Class-conditional models end to end (issue 14): label dropout and the null class, export
round trips, per-class grids from scripts/sample.py, the guidance sweep of scripts/evaluate.py,
precision and recall, training from a labels.csv, and the FID callback's guidance trade-off
(in one process and sharded over two DDP ranks).

The classifier-free guidance maths itself is tested on the analytic mixture oracle in
tests/test_guidance.py; here the models are the tiny U-Net of tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from torch import Tensor, nn

from flowerdiff.callbacks.fid import TRADEOFF_KEY, FIDCallback, scale_key
from flowerdiff.data.sources import DataSourceError
from flowerdiff.diffusion.guidance import Guidance
from flowerdiff.infra.config import ConfigError, build_module
from flowerdiff.infra.exports import CONFIG_FILE, export_checkpoint, load_model, read_export
from flowerdiff.metrics.features import to_uint8
from flowerdiff.metrics.quality import (
    SampleQuality,
    datamodule_reference,
    extract_features,
    precision_recall,
)
from flowerdiff.tasks.evaluate import evaluate
from flowerdiff.tasks.sample import sample
from flowerdiff.tasks.train import train
from flowerdiff.training.generate import balanced_labels, sample_batches
from flowerdiff.training.module import DiffusionModule

from conftest import REPO_ROOT, TINY_OVERRIDES, compose_config

K = 3  # classes of the tiny data; label K is the null class
NAMES = ("oxeye daisy", "yellow iris", "corn poppy")
HERE = Path(__file__).resolve().parent


def write_labels(folder: Path, base: int = 0) -> list[int]:
    """labels.csv beside the 16 test images: image k has class k mod K (``base``: 1 writes the
    ids 1-based, as Oxford's). Returns the 0-based labels in file order."""
    files = sorted(p.name for p in folder.glob("*.png"))
    labels = [k % K for k in range(len(files))]
    rows = "".join(f"{name},{label + base}\n" for name, label in zip(files, labels, strict=True))
    (folder / "labels.csv").write_text(f"file,label\n{rows}")
    return labels


def write_names(tmp_path: Path) -> Path:
    path = tmp_path / "class_names.txt"
    path.write_text("\n".join(NAMES) + "\n")
    return path


class MixingFeatures(nn.Module):
    """A stand-in for Inception under which precision and recall are not trivially 0 or 1:
    uint8 16x16 images -> 6 features, sines of fixed random projections of the pixels, spread
    over [-1, 1] for any images, so real and generated sets overlap (an untrained model's
    samples are far from the data under any meaningful features: both scores would be 0).
    With k = 1 and a handful of images in 6-D, the scores land well inside (0, 1)."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("projection", torch.randn(3 * 16 * 16, 6, generator=generator))

    def forward(self, images: Tensor) -> Tensor:
        return torch.sin(images.float().flatten(1) / 255 @ self.projection)


@pytest.fixture
def conditional_config(
    tiny_config, image_folder: Path, tmp_path: Path
) -> Callable[..., DictConfig]:
    """The tiny training config with K classes from a labels.csv and their names."""
    write_labels(image_folder)
    names = write_names(tmp_path)

    def make(*extra: str) -> DictConfig:
        return tiny_config(
            "data.labels=true",
            f"model.net.num_classes={K}",
            f"data.class_names={names}",
            *extra,
        )

    return make


@pytest.fixture
def conditional_checkpoint(conditional_config, tmp_path: Path) -> Path:
    """A checkpoint of the tiny conditional model as training lays it out (untrained weights:
    the class embedding is random, so the labels change the samples)."""
    torch.manual_seed(0)
    module = build_module(conditional_config())
    path = tmp_path / "conditional" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "flowerdiff": module.spec.to_dict()}, path)
    return path


def recording_loss(module: DiffusionModule, monkeypatch: pytest.MonkeyPatch) -> list[Tensor]:
    """Replace the diffusion's loss by one that records the labels it is given (no network
    call): what training_step / validation_step hand to the model."""
    seen: list[Tensor] = []

    def loss(net, x0, cond=None, noise=None, levels=None) -> Tensor:
        seen.append(cond.clone())
        return torch.zeros((), requires_grad=True)

    monkeypatch.setattr(module.diffusion, "loss", loss)
    return seen


def datamodule_of(cfg: DictConfig) -> object:
    datamodule = instantiate(cfg.data)
    datamodule.check(K)
    datamodule.setup("fit")
    return datamodule


# -- label dropout and the null class -----------------------------------------------------------
def test_label_dropout_rate_over_many_batches(conditional_config, monkeypatch) -> None:
    """model.label_dropout=0.1 (unet_tiny's default): over 2000 training steps of 4 labels
    (8000 labels) the share replaced by the null class K is 0.1 within 0.015. Each label is an
    independent Bernoulli(0.1) draw, so the share's standard error is sqrt(0.1 * 0.9 / 8000)
    = 0.0034 and 0.015 is 4.5 of them (measured with seed 0: 0.1009). The same holds per class
    (s.e. 0.0058, tolerance 0.025: dropping ignores the class; measured 0.101, 0.095, 0.106),
    and the number dropped per batch is binomial, not a fixed share: P(no label of 4 dropped)
    = 0.9^4 = 0.656 (s.e. over 2000 batches 0.011, tolerance 0.05; measured 0.654). Labels
    that are kept are unchanged."""
    cfg = conditional_config()
    module = build_module(cfg)
    assert module.label_dropout == pytest.approx(0.1)
    seen = recording_loss(module, monkeypatch)
    batches = list(datamodule_of(cfg).train_dataloader())
    assert len(batches) == 3 and all(len(b) == 3 for b in batches)  # (image, index, label)
    torch.manual_seed(0)
    given = []
    for step in range(2000):
        batch = batches[step % len(batches)]
        module.training_step(batch, step)
        given.append(batch[2])
    given_labels, used = torch.cat(given), torch.stack(seen)
    dropped = used.flatten() == K
    assert int(given_labels.min()) >= 0 and int(given_labels.max()) < K  # data: never the null
    assert torch.equal(used.flatten()[~dropped], given_labels[~dropped])
    assert abs(dropped.float().mean().item() - 0.1) < 0.015
    for c in range(K):
        assert abs(dropped[given_labels == c].float().mean().item() - 0.1) < 0.025, c
    none_dropped = ((used == K).sum(dim=1) == 0).float().mean().item()
    assert abs(none_dropped - 0.9**4) < 0.05


def test_null_class_never_comes_from_the_data(conditional_config, monkeypatch) -> None:
    """The datamodule yields labels in [0, K) only, in training and validation alike; only
    drop_labels introduces K; validation never drops (even at label_dropout=0.9)."""
    cfg = conditional_config("model.label_dropout=0.9")
    datamodule = datamodule_of(cfg)
    train_labels = torch.cat([b[2] for _ in range(20) for b in datamodule.train_dataloader()])
    val_batches = list(datamodule.val_dataloader())
    val_labels = torch.cat([b[2] for b in val_batches])
    assert set(train_labels.tolist()) == set(range(K))  # every class, never K
    assert int(val_labels.max()) < K and int(val_labels.min()) >= 0
    module = build_module(cfg)
    seen = recording_loss(module, monkeypatch)
    torch.manual_seed(0)
    for index, batch in enumerate(val_batches * 50):
        module.validation_step(batch, index)
    assert torch.equal(torch.cat(seen), torch.cat([b[2] for b in val_batches * 50]))
    seen.clear()
    module.training_step(next(iter(datamodule.train_dataloader())), 0)
    assert (seen[0] == K).any()  # ... while training drops (0.9: all 4 kept has p = 1e-4)
    # drop_labels leaves unlabelled batches and unconditional networks alone.
    assert module.drop_labels(None) is None


def test_a_label_equal_to_num_classes_is_refused_not_read_as_null(
    conditional_config, image_folder: Path
) -> None:
    """0-based labels 0..K in labels.csv are K + 1 classes: with num_classes=K the label K
    would *be* the null class, so it stops the run naming the file and the line. 1-based ids
    1..K are K classes (0..K-1) and never reach K."""
    cfg = conditional_config()
    csv = image_folder / "labels.csv"
    rows = csv.read_text().splitlines()
    rows[5] = rows[5].split(",")[0] + f",{K}"  # a 0-based file (it also holds 0)
    csv.write_text("\n".join(rows) + "\n")
    datamodule = instantiate(cfg.data)
    with pytest.raises(DataSourceError, match=rf"labels\.csv, line 6: label {K} is class index"):
        datamodule.check(K)
    labels = write_labels(image_folder, base=1)  # Oxford-style ids 1..K
    datamodule = datamodule_of(cfg)
    assert datamodule.labels.tolist() == labels and int(datamodule.labels.max()) == K - 1


# -- export round trip ----------------------------------------------------------------------------
def test_conditional_export_round_trip(conditional_checkpoint: Path, tmp_path: Path) -> None:
    """export_checkpoint + load_model: the same samples for the same labels and guidance as
    the checkpoint itself; num_classes and class_names survive in the spec and config.yaml."""
    out = export_checkpoint(conditional_checkpoint, tmp_path / "export")
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    guidance = Guidance(2.5, interval=(0.1, 50.0), rescale=0.5)
    images = {}
    for name, source in (
        ("checkpoint", conditional_checkpoint),
        ("export", out),
        ("safetensors", out / "model.safetensors"),
    ):
        module = load_model(source)
        assert module.num_classes == K and module.spec.class_names == NAMES, name
        images[name] = module.sample(6, seed=3, class_labels=labels, guidance=guidance).images
    assert torch.equal(images["export"], images["checkpoint"])
    assert torch.equal(images["safetensors"], images["checkpoint"])
    # Not a vacuous equality: guidance and labels both change these images.
    plain = module.sample(6, seed=3, class_labels=labels).images
    other = module.sample(6, seed=3, class_labels=labels.roll(1), guidance=guidance).images
    assert (plain - images["export"]).abs().max() > 1e-3
    assert (other - images["export"]).abs().max() > 1e-3
    _, stored, _ = read_export(out)
    assert stored["class_names"] == list(NAMES) and stored["network"]["num_classes"] == K
    config = yaml.safe_load((out / CONFIG_FILE).read_text())
    assert config["model"]["class_names"] == list(NAMES)


# -- scripts/sample.py ----------------------------------------------------------------------------
def sample_config(checkpoint: Path, out_dir: Path, *overrides: str) -> DictConfig:
    return compose_config(
        [f"ckpt_path={checkpoint}", f"out_dir={out_dir}", "device=cpu", *overrides],
        config_name="sample",
        output_dir=out_dir,
    )


def script_env(tmp_path: Path) -> dict[str, str]:
    env = os.environ | {
        "FLOWERDIFF_ROOT": str(tmp_path),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("HYDRA_FULL_ERROR", None)
    return env


PER_CLASS = ("class_labels=[0,2]", "per_class=3", "guidance_scale=2", "trajectory_images=0")


def check_per_class_grid(out: Path, checkpoint: Path) -> None:
    """grid.png: 2 rows (classes 0 and 2) of 3 images of 16 px, names in a left margin; the
    images are module.sample's for labels [0,0,0,2,2,2] with guidance 2, and row 2 is not what
    class 0 would give from the same noise."""
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB")).astype(int)
    cell, pad = 16, 2
    height, width = 2 * (cell + pad) + pad, 3 * (cell + pad) + pad
    assert grid.shape[0] == height and grid.shape[1] > width + 20  # a margin for the names
    margin = grid.shape[1] - width
    for row in range(2):  # each row's name is written (dark pixels) in the white margin
        band = grid[pad + row * (cell + pad) : (row + 1) * (cell + pad), :margin]
        assert (band.min(axis=2) < 128).sum() > 10, row
    module = load_model(checkpoint)
    labels = torch.tensor([0, 0, 0, 2, 2, 2])
    expected = module.sample(6, seed=0, class_labels=labels, guidance=Guidance(2.0)).images
    files = sorted((out / "images").glob("*.png"))
    assert [p.name for p in files] == [f"{k:05d}.png" for k in range(6)]
    written = torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in files])
    want = (expected.clamp(-1, 1) + 1).div(2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    assert (written.permute(0, 3, 1, 2).int() - want.int()).abs().max() <= 1
    for k in range(6):  # the grid cells are those images, row by row
        r, c = divmod(k, 3)
        top, left = pad + r * (cell + pad), margin + pad + c * (cell + pad)
        cell_pixels = grid[top : top + cell, left : left + cell]
        assert np.abs(cell_pixels - written[k].numpy()).max() <= 1, k
    as_class_0 = module.sample(6, seed=0, class_labels=torch.zeros(6, dtype=torch.long))
    guided_0 = module.sample(
        6, seed=0, class_labels=torch.zeros(6, dtype=torch.long), guidance=Guidance(2.0)
    )
    assert torch.allclose(guided_0.images[:3], expected[:3])
    assert (guided_0.images[3:] - expected[3:]).abs().amax(dim=(1, 2, 3)).min() > 1e-2
    assert not torch.allclose(as_class_0.images, expected, atol=1e-3)


def test_sample_per_class_grid(conditional_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    written = sample(sample_config(conditional_checkpoint, out, *PER_CLASS))
    assert written["grid"] == out / "grid.png" and len(written["images"]) == 6
    check_per_class_grid(out, conditional_checkpoint)


@pytest.mark.slow
def test_sample_script_per_class_grid(conditional_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "sample.py")]
    command += [f"ckpt_path={conditional_checkpoint}", f"out_dir={out}", *PER_CLASS]
    done = subprocess.run(
        command, cwd=tmp_path, env=script_env(tmp_path), timeout=300, capture_output=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    check_per_class_grid(out, conditional_checkpoint)


BAD_SAMPLING = [
    ("unconditional", ("class_labels=[0,1]",), "this model is unconditional"),
    ("conditional", ("class_labels=[0,3]",), "class_labels [0, 3] are out of range"),
    ("conditional", ("per_class=0",), "`per_class=0` must be null or an integer >= 1"),
    ("conditional", ("guidance_scale=-1",), "`guidance_scale=-1` must be a number >= 0"),
]


@pytest.mark.parametrize(("model", "overrides", "expected"), BAD_SAMPLING)
def test_bad_conditional_sampling_is_one_paragraph(
    model: str,
    overrides: tuple[str, ...],
    expected: str,
    conditional_checkpoint: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch,
) -> None:
    """Each bad input: a ConfigError of exactly one problem, naming it, before any sampling."""
    import flowerdiff.tasks.sample as sample_task

    def never(*args, **kwargs):
        raise AssertionError("sampling started before the input was checked")

    monkeypatch.setattr(sample_task, "sample_batches", never)
    checkpoint = conditional_checkpoint if model == "conditional" else tiny_checkpoint
    with pytest.raises(ConfigError) as info:
        sample(sample_config(checkpoint, tmp_path / "out", *overrides))
    header, *paragraphs = str(info.value).split("\n\n")
    assert header.startswith("The config has 1 problem;")
    assert len(paragraphs) == 1 and "\n" not in paragraphs[0] and expected in paragraphs[0]
    assert not (tmp_path / "out" / "images").exists()


@pytest.mark.slow
def test_bad_conditional_sampling_script_has_no_traceback(
    conditional_checkpoint: Path, tmp_path: Path
) -> None:
    """The script prints the paragraph (every case above is the same ConfigError route)."""
    _, overrides, expected = BAD_SAMPLING[1]
    command = [sys.executable, str(REPO_ROOT / "scripts" / "sample.py")]
    command += [f"ckpt_path={conditional_checkpoint}", f"out_dir={tmp_path / 'out'}", *overrides]
    done = subprocess.run(
        command, cwd=tmp_path, env=script_env(tmp_path), timeout=300, capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "Error: The config has 1 problem" in done.stderr and expected in done.stderr


# -- precision and recall -------------------------------------------------------------------------
def brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Kynkäänniemi et al. 2019 written out with loops: a sample is in a set's manifold when it
    lies within the distance from some member to that member's k-th nearest other member."""

    def radii(points: np.ndarray) -> list[float]:
        out = []
        for i, p in enumerate(points):
            others = [np.linalg.norm(p - q) for j, q in enumerate(points) if j != i]
            out.append(sorted(others)[k - 1])
        return out

    def inside(queries: np.ndarray, support: np.ndarray, r: list[float]) -> float:
        hits = [
            any(np.linalg.norm(q - s) <= r_s for s, r_s in zip(support, r, strict=True))
            for q in queries
        ]
        return sum(hits) / len(queries)

    return {
        "precision": inside(fake, real, radii(real)),
        "recall": inside(real, fake, radii(fake)),
    }


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k: int) -> None:
    generator = torch.Generator().manual_seed(k)
    real = torch.randn(40, 5, generator=generator)
    fake = torch.randn(33, 5, generator=generator) + 1.0  # shifted: neither share is 0 or 1
    expected = brute_force_precision_recall(real.double().numpy(), fake.double().numpy(), k)
    assert precision_recall(real, fake, k=k) == expected
    assert precision_recall(real, fake, k=k, chunk=7) == expected  # chunking changes nothing
    assert 0 < expected["precision"] < 1 and 0 < expected["recall"] < 1  # not a trivial case


def test_recall_drops_when_generated_features_collapse() -> None:
    """Samples from the real distribution: precision and recall both high (measured 0.91 and
    0.81 with 300 points in 8-D, k = 3). Samples collapsed near one mode (std 0.05 around a
    real point): still inside the real manifold (precision 1.0), but they cover almost none of
    it (recall 0.003)."""
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=generator)
    diverse = torch.randn(300, 8, generator=generator)
    collapsed = real[0] + 0.05 * torch.randn(300, 8, generator=generator)
    good, bad = precision_recall(real, diverse), precision_recall(real, collapsed)
    assert good["precision"] > 0.7 and good["recall"] > 0.7, good
    assert bad["precision"] > 0.95 and bad["recall"] < 0.05, bad


# -- scripts/evaluate.py: the guidance sweep --------------------------------------------------------
def test_evaluate_guidance_sweep_writes_json_and_plot(
    conditional_checkpoint: Path, image_folder: Path, tmp_path: Path
) -> None:
    cfg = compose_config(
        [
            f"paths.root_dir={tmp_path}",
            f"fid.cache_dir={tmp_path / 'fid-cache'}",
            "device=cpu",
            "batch_size=4",
            "data=folder",
            f"data.root={image_folder}",
            f"ckpt_path={conditional_checkpoint}",
            "num_samples=6",
            "steps=2",
            "kid=false",
            "pr_k=1",
            "guidance_scale=[1,2,3]",
        ],
        config_name="evaluate",
        output_dir=tmp_path / "eval",
    )
    result = evaluate(cfg, extractor=MixingFeatures())
    json_path = conditional_checkpoint.with_name("last.fid-6-2steps-seed0.json")
    stored = json.loads(json_path.read_text())
    sweep = stored["guidance_sweep"]
    assert [run["guidance_scale"] for run in sweep] == [1, 2, 3]
    for run in sweep:
        assert np.isfinite(run["fid"]) and run["fid"] > 0 and run["num_samples"] == 6
        assert 0 <= run["precision"] <= 1 and 0 <= run["recall"] <= 1
    assert len({run["fid"] for run in sweep}) == 3  # guidance changes the samples
    plot = Path(result["plot"])
    assert plot == json_path.with_suffix(".png")
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (720, 480)  # 6 x 4 inches at 120 dpi
    # Each scale's numbers are those of its own samples (class-balanced, guided).
    module = load_model(conditional_checkpoint)
    sampler = module.diffusion.sampler.with_options(num_inference_steps=2)
    real, _ = datamodule_reference(
        instantiate(cfg.data), MixingFeatures(), tmp_path / "fid-cache", batch_size=4
    )
    for run in sweep:
        fake = torch.cat(
            [
                extract_features(MixingFeatures(), to_uint8(batch.output.images), 4)
                for batch in sample_batches(
                    module,
                    6,
                    batch_size=4,
                    sampler=sampler,
                    labels=balanced_labels(6, K),
                    guidance=Guidance(run["guidance_scale"]),
                )
            ]
        )
        assert precision_recall(real, fake, k=1) == {k: run[k] for k in ("precision", "recall")}


@pytest.mark.slow
def test_evaluate_script_guidance_sweep(
    conditional_checkpoint: Path, image_folder: Path, tmp_path: Path
) -> None:
    """`python scripts/evaluate.py ... guidance_scale=[1,3]` exits 0 (it used to write the JSON,
    then fail with a KeyError traceback: a sweep's result has no top-level FID)."""
    env = script_env(tmp_path) | {
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    }
    command = [sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py")]
    command += [
        f"ckpt_path={conditional_checkpoint}",
        "data=folder",
        f"data.root={image_folder}",
        f"fid.cache_dir={tmp_path / 'fid-cache'}",
        "~fid.feature_extractor",
        "+fid.feature_extractor._target_=test_conditional.MixingFeatures",
        "num_samples=6",
        "batch_size=6",
        "steps=2",
        "kid=false",
        "guidance_scale=[1,3]",
    ]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, timeout=300, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    stored = json.loads(
        conditional_checkpoint.with_name("last.fid-6-2steps-seed0.json").read_text()
    )
    assert [run["guidance_scale"] for run in stored["guidance_sweep"]] == [1, 3]
    assert conditional_checkpoint.with_name("last.fid-6-2steps-seed0.png").is_file()


# -- training from a labels.csv -------------------------------------------------------------------
@pytest.mark.slow
def test_train_conditional_model_from_labels_csv(
    tiny_config, image_folder: Path, tmp_path: Path
) -> None:
    """flowerdiff.tasks.train.train with data.labels=true and an Oxford-style (1-based)
    labels.csv: the checkpoint's spec holds num_classes and the class names, and the model it
    rebuilds samples per class."""
    write_labels(image_folder, base=1)
    names = write_names(tmp_path)
    cfg = tiny_config("data.labels=true", f"model.net.num_classes={K}", f"data.class_names={names}")
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss_epoch"]) and np.isfinite(metrics["val/loss"])
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["flowerdiff"]["network"]["num_classes"] == K
    assert checkpoint["flowerdiff"]["class_names"] == list(NAMES)
    assert checkpoint["state_dict"]["net.class_embedding.weight"].shape[0] == K + 1  # + null
    module = load_model(path)
    out = module.sample(3, class_labels=torch.arange(K), guidance=Guidance(2.0))
    assert out.images.shape == (3, 3, 16, 16) and torch.isfinite(out.images).all()


# -- the FID callback's guidance trade-off ----------------------------------------------------------
def fid_train_config(tmp_path: Path, image_folder: Path, *extra: str) -> DictConfig:
    """The tiny conditional run with the real `fid` callback config and a small extractor."""
    write_labels(image_folder)
    cfg = compose_config(
        [
            *(o for o in TINY_OVERRIDES if o != "~callbacks.fid"),
            f"data.root={image_folder}",
            f"paths.root_dir={tmp_path}",
            "data.labels=true",
            f"model.net.num_classes={K}",
            f"data.class_names={write_names(tmp_path)}",
            "callbacks.fid.num_samples=6",
            "callbacks.fid.batch_size=4",
            "callbacks.fid.every_n_epochs=1",
            "callbacks.fid.num_inference_steps=2",
            *extra,
        ],
        output_dir=tmp_path / "run",
    )
    with open_dict(cfg):
        cfg.callbacks.fid.feature_extractor = {"_target_": "test_conditional.MixingFeatures"}
        items = OmegaConf.to_container(cfg.callbacks)
        cfg.callbacks = {name: items[name] for name in ("ema", "fid", "model_checkpoint")}
    return cfg


@pytest.mark.slow
def test_fid_callback_logs_the_guidance_tradeoff(tmp_path: Path, image_folder: Path) -> None:
    """guidance_scales=[1,2,3] with precision_recall: val/fid (the primary scale, 2 here) and
    val/fid_w<s>, val/precision_w<s>, val/recall_w<s> per scale, in the metrics and the CSV
    log, and the trade-off PNG under images/samples/guidance_tradeoff."""
    cfg = fid_train_config(
        tmp_path,
        image_folder,
        "callbacks.fid.guidance_scales=[1,2,3]",
        "callbacks.fid.precision_recall=true",
        "callbacks.fid.guidance_scale=2",
    )
    metrics = train(cfg)
    for scale in (1, 2, 3):
        for name in ("fid", "precision", "recall"):
            value = metrics[scale_key(name, scale)]
            assert np.isfinite(value), (name, scale)
            if name != "fid":
                assert 0 <= value <= 1
    assert metrics["val/fid"] == metrics["val/fid_w2"] == metrics["val/fid_best"]
    assert metrics["val/recall"] == metrics["val/recall_w2"]
    assert len({metrics[scale_key("fid", s)] for s in (1, 2, 3)}) == 3
    run_dir = tmp_path / "run"
    (plot,) = (run_dir / "images" / TRADEOFF_KEY).glob("step_*.png")
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (720, 480)
    (log,) = run_dir.glob("csv/metrics.csv")
    header = log.read_text().splitlines()[0].split(",")
    assert {"val/fid_w1", "val/precision_w3", "val/recall_w2"} <= set(header)


@pytest.fixture
def fid_setup(conditional_config, tmp_path: Path) -> tuple[DiffusionModule, object]:
    cfg = conditional_config()
    torch.manual_seed(0)
    return build_module(cfg).eval(), datamodule_of(cfg)


def validate_with(callback: FIDCallback, module: DiffusionModule, datamodule, root: Path) -> dict:
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        logger=False,
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return trainer.validate(module, datamodule=datamodule, verbose=False)[0]


def expected_scores(
    callback: FIDCallback, module: DiffusionModule, datamodule, cache: Path, scale: float, n: int
) -> dict[str, float]:
    """FID, precision and recall of the callback's images at ``scale``, computed here from the
    same seeded, class-balanced, guided samples and the cached real features."""
    real, _ = datamodule_reference(datamodule, MixingFeatures(), cache)
    batches = sample_batches(
        module,
        n,
        seed=callback.seed,
        batch_size=callback.batch_size,
        sampler=callback.sampler_for(module),
        labels=balanced_labels(n, K),
        guidance=Guidance(scale),
    )
    fake = torch.cat(
        [extract_features(MixingFeatures(), to_uint8(b.output.images)) for b in batches]
    )
    metric = SampleQuality(real.shape[1], sync=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return {"fid": metric.compute()["fid"], **precision_recall(real, fake, k=callback.pr_k)}


def test_fid_callback_scores_each_scale_on_its_own_samples(fid_setup, tmp_path: Path) -> None:
    module, datamodule = fid_setup
    cache = tmp_path / "fid-cache"
    callback = FIDCallback(
        MixingFeatures(),
        num_samples=7,
        batch_size=3,
        every_n_epochs=1,
        num_inference_steps=2,
        cache_dir=str(cache),
        guidance_scales=[0, 1.5, 4],  # guidance_scale 1.0 is not among them: the first is primary
        precision_recall=True,
        pr_k=1,
    )
    logged = validate_with(callback, module, datamodule, tmp_path / "run")
    shares = []
    for scale in (0, 1.5, 4):
        expected = expected_scores(callback, module, datamodule, cache, scale, 7)
        assert logged[scale_key("fid", scale)] == pytest.approx(expected["fid"], rel=1e-5)
        # (logged values are float32: one image more or less inside would move them by 1/7)
        assert logged[scale_key("precision", scale)] == pytest.approx(expected["precision"])
        assert logged[scale_key("recall", scale)] == pytest.approx(expected["recall"])
        shares += [expected["precision"], expected["recall"]]
    assert any(0 < share < 1 for share in shares), shares  # the equalities are not 0 == 0
    assert logged["val/fid"] == logged["val/fid_w0"]
    assert (tmp_path / "run" / "images" / TRADEOFF_KEY / "step_0000000.png").is_file()


def test_fid_callback_single_scale_keeps_todays_keys(fid_setup, tmp_path: Path) -> None:
    """guidance_scales null (or []): one scale, no per-scale keys, no plot; precision_recall
    adds the unsuffixed val/precision and val/recall."""
    module, datamodule = fid_setup
    cache = tmp_path / "fid-cache"
    for scales in (None, []):
        callback = FIDCallback(
            MixingFeatures(),
            num_samples=6,
            batch_size=6,
            every_n_epochs=1,
            num_inference_steps=2,
            cache_dir=str(cache),
            guidance_scale=2.0,
            guidance_scales=scales,
            precision_recall=True,
        )
        logged = validate_with(callback, module, datamodule, tmp_path / "run")
        assert set(logged) == {"val/loss", "val/fid", "val/fid_best", "val/precision", "val/recall"}
        expected = expected_scores(callback, module, datamodule, cache, 2.0, 6)
        assert logged["val/fid"] == pytest.approx(expected["fid"], rel=1e-5)
        assert logged["val/recall"] == pytest.approx(expected["recall"])
    assert not (tmp_path / "run" / "images").exists()


def test_fid_callback_rejects_bad_scales() -> None:
    cases = [
        ({"guidance_scales": [1, -2]}, r"guidance_scales=\[1, -2\]: `guidance_scale=-2` must be"),
        ({"guidance_scales": [1, 2, 1.0]}, r"guidance_scales=\[1, 2, 1.0\] repeats a scale"),
        ({"precision_recall": True, "pr_k": 6}, r"pr_k=6 must be an integer >= 1 and below"),
        ({"precision_recall": True, "pr_k": 0}, r"pr_k=0"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            FIDCallback(MixingFeatures(), num_samples=6, **options)
    callback = FIDCallback(MixingFeatures(), num_samples=6, guidance_scales=[3, 2])
    assert callback.guidance == Guidance(3)  # guidance_scale 1.0 is not swept: the first is
    assert FIDCallback(MixingFeatures(), guidance_scales=[3, 1]).guidance == Guidance(1.0)


@pytest.mark.slow
def test_fid_tradeoff_sharded_over_two_ranks(tmp_path: Path, image_folder: Path) -> None:
    """Two DDP processes (CPU, gloo): the per-scale FID, precision and recall equal those of
    the same samples scored in one process; every rank logs the same values."""
    write_labels(image_folder)
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, str(Path(__file__)), str(tmp_path), str(image_folder), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    for key, value in result["single"].items():
        assert result["ddp"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        assert result["rank1"][key] == result["ddp"][key], key  # the same on every rank
    shares = [v for k, v in result["single"].items() if "precision" in k or "recall" in k]
    assert any(0 < share < 1 for share in shares), shares  # rank 0's share alone would differ
    assert result["plots"] == 1


def main(tmp_path: Path, image_folder: Path, out: Path) -> None:
    """The DDP half of test_fid_tradeoff_sharded_over_two_ranks (run as a script: Lightning's
    launcher re-executes it for rank 1)."""
    import lightning as L

    cfg = compose_config(
        [
            *TINY_OVERRIDES,
            f"data.root={image_folder}",
            f"paths.root_dir={tmp_path}",
            "data.labels=true",
            f"model.net.num_classes={K}",
        ],
        output_dir=tmp_path / "run",
    )
    torch.manual_seed(0)
    module = build_module(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.check(K)
    cache = tmp_path / "fid-cache"
    callback = FIDCallback(
        MixingFeatures(),
        num_samples=7,  # uneven shards: 4 + 3, in batches of 2 on each rank
        batch_size=2,
        every_n_epochs=1,
        num_inference_steps=2,
        cache_dir=str(cache),
        guidance_scales=[1.0, 3.0],
        precision_recall=True,
        pr_k=1,
    )
    trainer = L.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        callbacks=[callback],
        logger=False,
        default_root_dir=str(tmp_path / "ddp"),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    logged = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    logged = {key: float(value) for key, value in logged.items()}
    ranks: list[dict[str, float]] = [{}, {}]
    torch.distributed.all_gather_object(ranks, logged)
    if trainer.global_rank != 0:
        return
    single = {}
    for scale in (1.0, 3.0):
        # One process, batches of 2 from image 0: the same batches as the two ranks' shares.
        scores = expected_scores(callback, module.eval(), datamodule, cache, scale, 7)
        single.update({scale_key(name, scale): value for name, value in scores.items()})
    result = {
        "ddp": logged,
        "rank1": ranks[1],
        "single": single,
        "plots": len(list((tmp_path / "ddp" / "images" / TRADEOFF_KEY).glob("*.png"))),
    }
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:4]))
