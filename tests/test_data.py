"""FlowersDataModule: sources, the decoded cache, odd images, the split and on-device transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowerdiff.data import DataSourceError, FlowersDataModule
from flowerdiff.data import cache as cache_module

from conftest import SHARED_FLOWERS, write_images


def make_dm(root: Path, tmp_path: Path, **kwargs) -> FlowersDataModule:
    options = {"image_size": 16, "batch_size": 4, "cache_dir": str(tmp_path / "cache")} | kwargs
    return FlowersDataModule(source="folder", root=str(root), **options)


def test_nested_folder_is_read_without_class_subfolders(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 5)
    write_images(tmp_path / "imgs" / "deeper" / "still", 3, seed=1)
    dm = make_dm(tmp_path / "imgs", tmp_path, val_fraction=0.25)
    dm.setup("fit")
    assert dm.images.shape == (8, 3, 16, 16)
    assert dm.images.dtype == torch.uint8
    assert len(dm.train_set) == 6 and len(dm.val_set) == 2


def test_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 20)
    first, second = make_dm(tmp_path / "imgs", tmp_path), make_dm(tmp_path / "imgs", tmp_path)
    first.setup(), second.setup()
    assert torch.equal(first.val_set.indices, second.val_set.indices)
    assert not set(first.val_set.indices.tolist()) & set(first.train_set.indices.tolist())
    assert len(first.val_set) + len(first.train_set) == 20


def test_decoded_images_are_cached_and_reused(tmp_path: Path, monkeypatch) -> None:
    write_images(tmp_path / "imgs", 6)
    make_dm(tmp_path / "imgs", tmp_path).prepare_data()
    assert len(list((tmp_path / "cache").glob("images-*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("the second run decoded images instead of using the cache")

    monkeypatch.setattr(cache_module, "decode_images", no_decoding)
    dm = make_dm(tmp_path / "imgs", tmp_path)
    dm.setup()
    assert len(dm.images) == 6


def test_cache_is_rebuilt_when_the_folder_changes(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 6)
    make_dm(tmp_path / "imgs", tmp_path).prepare_data()
    write_images(tmp_path / "imgs" / "more", 2, seed=3)
    dm = make_dm(tmp_path / "imgs", tmp_path)
    dm.setup()
    assert len(dm.images) == 8


def test_book_geometry_short_side_resize_then_center_crop(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 10:30] = 255  # a white centre band exactly as wide as the crop
    (tmp_path / "imgs").mkdir()
    Image.fromarray(pixels).save(tmp_path / "imgs" / "wide.png")
    dm = make_dm(tmp_path / "imgs", tmp_path, image_size=10, val_fraction=0.0, batch_size=1)
    dm.setup()
    image = dm.images[0].float()
    assert image.shape == (3, 10, 10)
    assert image[:, :, 1:-1].min() > 200  # the crop is the white centre: no black border kept


def test_odd_modes_become_rgb(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (8, 8), 128).save(folder / "gray.png")
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(folder / "rgba.png")
    Image.new("RGB", (8, 8), (200, 0, 0)).convert("P").save(folder / "palette.png")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(folder / "sixteen.png")
    dm = make_dm(folder, tmp_path, image_size=8, val_fraction=0.0, batch_size=1)
    dm.setup()
    by_name = dict(zip(sorted(p.name for p in folder.iterdir()), dm.images, strict=True))
    assert by_name["gray.png"].float().mean() == pytest.approx(128, abs=1)
    assert by_name["rgba.png"][:, 0, 0].tolist() == [10, 20, 30]
    assert by_name["palette.png"][0].float().mean() > 190
    assert by_name["sixteen.png"].float().mean() == pytest.approx(255, abs=1)


def test_corrupt_and_non_image_files_are_skipped_with_one_warning(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "imgs", 6)
    (folder / "notes.txt").write_text("not an image, and not even listed")
    (folder / "fake.png").write_bytes(b"this is no PNG")
    good = (folder / "img_000.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    dm = make_dm(folder, tmp_path)
    with pytest.warns(UserWarning, match=r"Skipped 2 of 8 files") as record:
        dm.setup()
    message = str(record[0].message)
    assert "fake.png" in message and "truncated.png" in message
    assert len(dm.images) == 6


def test_missing_folder_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match=r"is not a directory.*data\.root"):
        make_dm(tmp_path / "nowhere", tmp_path).prepare_data()


def test_empty_folder_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match=r"holds no image files"):
        make_dm(tmp_path / "empty", tmp_path).prepare_data()


def test_folder_of_only_corrupt_files_stops_before_training(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(DataSourceError, match=r"None of the 1 files"), pytest.warns(UserWarning):
        make_dm(tmp_path / "bad", tmp_path).prepare_data()


def test_flowers102_without_network_names_the_fix(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    class Offline:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Dataset not found or corrupted. You can use download=True")

    monkeypatch.setattr(torchvision.datasets, "Flowers102", Offline)
    dm = FlowersDataModule(source="flowers102", root=str(tmp_path), download=False)
    with pytest.raises(DataSourceError, match=r"data=folder data\.root="):
        dm.prepare_data()


def test_unknown_source_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"data.source='imagenet'.*'folder'.*'flowers102'"):
        FlowersDataModule(source="imagenet")


def test_batch_transfer_scales_to_unit_range_and_flips_only_in_training(tmp_path: Path) -> None:
    dm = make_dm(write_images(tmp_path / "imgs", 4), tmp_path)

    class FakeTrainer:
        training = False
        world_size = 1

    dm.trainer = FakeTrainer()
    images = torch.tensor([[[[0, 255]]]], dtype=torch.uint8).expand(64, 3, 1, 2)
    scaled, _ = dm.on_after_batch_transfer((images, torch.arange(64)), 0)
    assert scaled[:, :, 0, 0].eq(-1).all() and scaled[:, :, 0, 1].eq(1).all()
    FakeTrainer.training = True
    flipped, _ = dm.on_after_batch_transfer((images, torch.arange(64)), 0)
    share = flipped[:, 0, 0, 0].eq(1).float().mean()
    assert 0.2 < share < 0.8  # about half the batch is mirrored


@pytest.mark.data
@pytest.mark.skipif(not SHARED_FLOWERS.is_dir(), reason="../shared/data/flowers102_64 is absent")
def test_real_flower_folder_loads(tmp_path: Path) -> None:
    dm = FlowersDataModule(
        source="folder",
        root=str(SHARED_FLOWERS),
        image_size=32,
        max_images=64,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup()
    assert dm.images.shape == (64, 3, 32, 32)
    assert 40 < dm.images.float().mean() < 200
