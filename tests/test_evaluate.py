"""scripts/evaluate.py's logic: FID/KID of a checkpoint's samples and of an image folder, and
every bad input reported as one paragraph before any feature is computed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

import flowerdiff.tasks.evaluate as evaluate_task
from flowerdiff.data.sources import DataSourceError
from flowerdiff.infra.config import ConfigError
from flowerdiff.tasks.evaluate import evaluate

from conftest import REPO_ROOT, TinyFeatures, compose_config, write_images


def evaluate_config(tmp_path: Path, image_folder: Path, *overrides: str) -> DictConfig:
    """The evaluate config with the 16 test images as the reference data."""
    return compose_config(
        [
            f"paths.root_dir={tmp_path}",
            f"fid.cache_dir={tmp_path / 'fid-cache'}",
            "device=cpu",
            "batch_size=4",
            "data=folder",
            f"data.root={image_folder}",
            *overrides,
        ],
        config_name="evaluate",
        output_dir=tmp_path / "eval",
    )


def test_evaluate_checkpoint_writes_json_next_to_it(
    tiny_checkpoint: Path, image_folder: Path, tmp_path: Path, capsys
) -> None:
    cfg = evaluate_config(
        tmp_path, image_folder, f"ckpt_path={tiny_checkpoint}", "num_samples=6", "steps=2", "seed=3"
    )
    result = evaluate(cfg, extractor=TinyFeatures())
    written = tiny_checkpoint.with_name("last.fid-6-2steps-seed3.json")
    assert json.loads(written.read_text()) == json.loads(json.dumps(result))
    assert result["fid"] > 0 and result["num_samples"] == 6 and result["num_real"] == 16
    assert "kid_mean" in result and not result["reference_cached"]
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert "num_inference_steps=2" in result["sampler"]
    assert set(result["timings"]) == {"reference_s", "sampling_s", "features_s", "statistics_s"}
    assert "FID" in capsys.readouterr().out
    # The data set's reference features are now cached; a second evaluation reuses them and,
    # with the same seed, scores the same images identically.
    again = evaluate(cfg, extractor=TinyFeatures())
    assert again["reference_cached"] and again["fid"] == pytest.approx(result["fid"])


def test_evaluate_image_folder_against_itself_is_zero(image_folder: Path, tmp_path: Path) -> None:
    cfg = evaluate_config(
        tmp_path, image_folder, f"images_dir={image_folder}", "data.image_size=16", "kid=false"
    )
    result = evaluate(cfg, extractor=TinyFeatures())
    assert abs(result["fid"]) < 1e-3 and result["num_samples"] == 16
    assert result["precision"] == pytest.approx(1.0) and result["recall"] == pytest.approx(1.0)
    assert (tmp_path / "images.fid.json").is_file()


def test_stored_data_config_is_never_used(
    tiny_checkpoint: Path, image_folder: Path, tmp_path: Path
) -> None:
    """The old design instantiated the checkpoint's `data` node; now the reference data is the
    evaluate config's own, and a stored data config beside the model is ignored."""
    marker = tmp_path / "pwned"
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["flowerdiff_config"] = {  # the old layout, as an attacker would write it
        "data": {"_target_": "builtins.open", "file": str(marker), "mode": "a"}
    }
    torch.save(checkpoint, tiny_checkpoint)
    cfg = evaluate_config(
        tmp_path,
        image_folder,
        f"ckpt_path={tiny_checkpoint}",
        "num_samples=2",  # the fewest FID takes (precision/recall need more than pr_k)
        "precision_recall=false",
        "steps=1",
    )
    result = evaluate(cfg, extractor=TinyFeatures())
    assert result["num_real"] == 16 and result["num_samples"] == 2 and "precision" not in result
    assert not marker.exists()


# -- every bad input: one paragraph naming the key, before any feature is computed -------------
def never(*args, **kwargs):
    raise AssertionError("heavy work started before the input was checked")


@pytest.fixture
def nothing_heavy(monkeypatch) -> None:
    """Fail the test if sampling starts or the reference data set is decoded."""
    monkeypatch.setattr(evaluate_task, "sample_batches", never)
    monkeypatch.setattr(evaluate_task, "datamodule_reference", never)


def test_evaluate_needs_exactly_one_input(
    tiny_checkpoint: Path, image_folder: Path, tmp_path: Path, forbidden_extractor
) -> None:
    for inputs in ((), (f"ckpt_path={tiny_checkpoint}", f"images_dir={image_folder}")):
        with pytest.raises(ConfigError, match=r"Pass exactly one of `ckpt_path=.*`images_dir="):
            evaluate(evaluate_config(tmp_path, image_folder, *inputs), forbidden_extractor)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (("steps=0",), "`sampler.num_inference_steps=0` (or `steps=`) is invalid"),
        (("sampler=ddpm", "steps=2000"), "`sampler.num_inference_steps=2000` exceeds"),
        (("num_samples=0",), "`num_samples=0` must be an integer >= 2"),
        (("num_samples=1",), "`num_samples=1` must be an integer >= 2"),
        (("num_samples=3",), "`num_samples=3` is too few for precision and recall with `pr_k=3`"),
        (("pr_k=0",), "`pr_k=0` must be an integer >= 1"),
        (("batch_size=0",), "`batch_size=0` must be an integer >= 1"),
        (("guidance_scale=2",), "`guidance_scale` applies to class-conditional models only"),
        (("precision=fp8",), "`precision='fp8'` is not a precision flowerdiff runs"),
    ],
)
def test_bad_model_evaluation_is_one_paragraph_before_any_work(
    overrides: tuple[str, ...],
    expected: str,
    tiny_checkpoint: Path,
    image_folder: Path,
    tmp_path: Path,
    forbidden_extractor,
    nothing_heavy,
) -> None:
    cfg = evaluate_config(tmp_path, image_folder, f"ckpt_path={tiny_checkpoint}", *overrides)
    with pytest.raises(ConfigError) as info:
        evaluate(cfg, extractor=forbidden_extractor)
    assert expected in str(info.value)
    assert not list(tiny_checkpoint.parent.glob("*.json"))


def test_cuda_without_a_gpu_names_device(
    tiny_checkpoint: Path, image_folder: Path, tmp_path: Path, monkeypatch, forbidden_extractor
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(evaluate_task, "load_model", never)
    cfg = evaluate_config(tmp_path, image_folder, f"ckpt_path={tiny_checkpoint}", "device=cuda")
    with pytest.raises(ConfigError) as info:
        evaluate(cfg, extractor=forbidden_extractor)
    message = str(info.value)
    assert "`device='cuda'` asks for a CUDA GPU, but none is visible" in message
    assert str(tiny_checkpoint) not in message


def corrupt_folder(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        (folder / f"broken_{index}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


@pytest.mark.parametrize("kind", ["empty", "corrupt", "one-image", "a-file"])
def test_unusable_images_dir_is_named_before_any_feature(
    kind: str, image_folder: Path, tmp_path: Path, forbidden_extractor, nothing_heavy
) -> None:
    folder = tmp_path / "generated"
    if kind == "empty":
        folder.mkdir()
    elif kind == "corrupt":
        corrupt_folder(folder)
    elif kind == "one-image":
        write_images(folder, 1)
        corrupt_folder(folder / "more")
    else:
        folder.write_text("not a folder")
    cfg = evaluate_config(tmp_path, image_folder, f"images_dir={folder}", "data.image_size=16")
    with pytest.raises((DataSourceError, ConfigError)) as info:
        evaluate(cfg, extractor=forbidden_extractor)
    message = str(info.value)
    assert f"images_dir='{folder}'" in message, message
    assert "data.root" not in message, message


def test_image_folder_needs_an_image_size(
    image_folder: Path, tmp_path: Path, forbidden_extractor, nothing_heavy
) -> None:
    """With images_dir there is no model to take the size from: data.image_size is named."""
    cfg = evaluate_config(tmp_path, image_folder, f"images_dir={image_folder}")
    with pytest.raises(ConfigError, match=r"`data\.image_size=None` must be a positive integer"):
        evaluate(cfg, extractor=forbidden_extractor)


@pytest.mark.parametrize("count", ["0", "1"])
def test_too_few_images_from_a_folder(
    count: str, image_folder: Path, tmp_path: Path, forbidden_extractor, nothing_heavy
) -> None:
    cfg = evaluate_config(
        tmp_path,
        image_folder,
        f"images_dir={image_folder}",
        "data.image_size=16",
        f"num_samples={count}",
    )
    with pytest.raises(ConfigError, match=rf"`num_samples={count}` must be an integer >= 2"):
        evaluate(cfg, extractor=forbidden_extractor)


def test_missing_reference_data_is_named_before_any_feature(
    tiny_checkpoint: Path, image_folder: Path, tmp_path: Path, forbidden_extractor, monkeypatch
) -> None:
    monkeypatch.setattr(evaluate_task, "sample_batches", never)
    cfg = evaluate_config(
        tmp_path,
        tmp_path / "no-such-data",
        f"ckpt_path={tiny_checkpoint}",
        "num_samples=4",
    )
    with pytest.raises(DataSourceError, match=r"data\.root='.*no-such-data' is not a directory"):
        evaluate(cfg, extractor=forbidden_extractor)


def test_unwritable_output_json_is_named_first(
    tiny_checkpoint: Path, image_folder: Path, tmp_path: Path, unwritable_dir: Path
) -> None:
    target = unwritable_dir / "fid.json"
    cfg = evaluate_config(
        tmp_path, image_folder, f"ckpt_path={tiny_checkpoint}", f"output_json={target}"
    )
    with pytest.raises(ConfigError, match=r"`output_json='.*'` cannot be written"):
        evaluate(cfg, extractor=None)  # None: the real extractor would be built, if reached


def test_too_small_reference_data_is_named_before_any_feature(
    tiny_checkpoint: Path, tmp_path: Path, forbidden_extractor, nothing_heavy
) -> None:
    few = write_images(tmp_path / "few", 3)
    cfg = evaluate_config(tmp_path, few, f"ckpt_path={tiny_checkpoint}", "num_samples=4")
    with pytest.raises(DataSourceError, match=r"data\.root='.*few'\) holds 3 image\(s\).* 4"):
        evaluate(cfg, extractor=forbidden_extractor)


@pytest.mark.slow
def test_evaluate_script_prints_one_paragraph(tiny_checkpoint: Path, tmp_path: Path) -> None:
    env = os.environ | {"FLOWERDIFF_ROOT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "evaluate.py"),
            f"ckpt_path={tiny_checkpoint}",
            "steps=0",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ZeroDivisionError" not in done.stderr
    assert "Error: The config has 1 problem" in done.stderr
    assert "`sampler.num_inference_steps=0` (or `steps=`) is invalid" in done.stderr
