"""FlowersDataModule: sources, the decoded cache, odd images, the split, on-device transforms,
and labels (CSV, class sub-folders, Flowers102) with their error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

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


def test_without_a_cache_the_images_are_decoded_once(tmp_path: Path, monkeypatch) -> None:
    write_images(tmp_path / "imgs", 6)
    decoded = []
    decode = cache_module.decode_images

    def counting(files, image_size):
        decoded.append(len(files))
        return decode(files, image_size)

    monkeypatch.setattr(cache_module, "decode_images", counting)
    dm = make_dm(tmp_path / "imgs", tmp_path, cache_dir=None)
    dm.prepare_data()  # what Lightning calls first, then setup
    dm.setup("fit")
    assert decoded == [6] and len(dm.images) == 6


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
    with pytest.raises(ValueError, match=r"data\.source='imagenet'.*'flowers102', 'folder'"):
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


# -- labels (class-conditional training) ------------------------------------------------------
def write_coloured(folder: Path, names_and_labels: list[tuple[str, int]], size: int = 8) -> Path:
    """One flat-coloured PNG per ``(relative name, label)``: its red channel is ``40 * label +
    10``, so a decoded image tells which label it must carry."""
    for name, label in names_and_labels:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size), (40 * label + 10, 100, 100)).save(path)
    return folder


def label_of_pixels(image: torch.Tensor) -> int:
    return round((float(image[0].float().mean()) - 10) / 40)


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_labels_csv_one_based_batches_are_image_index_label(tmp_path: Path) -> None:
    pairs = [(f"img_{k:02d}.png", k % 4) for k in range(12)]
    folder = write_coloured(tmp_path / "imgs", pairs)
    # 1-based in the file, as Oxford's official ids: the smallest label is 1.
    write_csv(folder / "labels.csv", "file,label\n" + "".join(f"{n},{c + 1}\n" for n, c in pairs))
    dm = make_dm(folder, tmp_path, labels=True, val_fraction=0.25)
    dm.check(4)
    dm.setup("fit")
    assert dm.labels.tolist() == [c for _, c in pairs]
    for dataset in (dm.train_set, dm.val_set):
        image, index, label = dataset[0]
        assert isinstance(index, torch.Tensor) and label.dtype == torch.long
        assert label_of_pixels(image) == int(label) == pairs[int(index)][1]
    batch = next(iter(DataLoader(dm.train_set, batch_size=4)))
    assert len(batch) == 3
    images, indices, labels = batch
    assert [label_of_pixels(x) for x in images] == labels.tolist()
    assert labels.tolist() == [pairs[i][1] for i in indices.tolist()]


def test_labels_csv_zero_based_and_nested_paths(tmp_path: Path) -> None:
    pairs = [("a/one.png", 0), ("a/two.png", 2), ("b/three.png", 1), ("four.png", 2)]
    folder = write_coloured(tmp_path / "imgs", pairs)
    rows = "".join(f"{n},{c}\n" for n, c in reversed(pairs))  # any order, blank lines ignored
    write_csv(folder / "labels.csv", f"file,label\n{rows}\n")
    dm = make_dm(folder, tmp_path, labels=True, val_fraction=0.0, batch_size=1)
    dm.check(3)
    dm.setup()
    by_file = dict(pairs)
    files = dm.image_files()  # sorted: a/one, a/two, b/three, four
    assert dm.labels.tolist() == [by_file[p.relative_to(folder).as_posix()] for p in files]
    assert [label_of_pixels(x) for x in dm.images] == dm.labels.tolist()


def test_class_subfolders_label_as_image_folder(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    pairs = [(f"{cls}/{k}.png", c) for c, cls in enumerate(["daisy", "iris", "rose"]) for k in "ab"]
    pairs.append(("iris/deeper/c.png", 1))  # nested below its class folder: still that class
    folder = write_coloured(tmp_path / "imgs", pairs)
    dm = make_dm(folder, tmp_path, labels=True, val_fraction=0.0, batch_size=1)
    dm.check(3)
    dm.setup()
    reference = ImageFolder(str(folder))
    assert [Path(p) for p, _ in reference.samples] == dm.image_files()
    assert dm.labels.tolist() == reference.targets
    assert [label_of_pixels(x) for x in dm.images] == reference.targets


def write_flowers102(root: Path, labels: list[int], splits: dict[str, list[int]]) -> Path:
    """The layout torchvision's Flowers102 reads: flowers-102/jpg/image_NNNNN.jpg with the
    official 1-based ``imagelabels.mat`` and ``setid.mat``."""
    from scipy.io import savemat

    base = root / "flowers-102"
    pairs = [(f"jpg/image_{i + 1:05d}.jpg", label - 1) for i, label in enumerate(labels)]
    write_coloured(base, pairs)
    savemat(base / "imagelabels.mat", {"labels": np.array(labels)})
    savemat(base / "setid.mat", {key: np.array(ids) for key, ids in splits.items()})
    return root


def test_flowers102_source_gives_torchvisions_zero_based_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.datasets import Flowers102

    # The archive's checksums cannot match these files; everything else is torchvision's own.
    monkeypatch.setattr(Flowers102, "_check_integrity", lambda self: True)
    official = [3, 1, 2, 3, 1, 2]  # 1-based class ids of image_00001 .. image_00006
    splits = {"trnid": [5, 1], "valid": [3, 6], "tstid": [2, 4]}
    root = write_flowers102(tmp_path / "flowers", official, splits)
    dm = FlowersDataModule(
        source="flowers102",
        root=str(root),
        download=False,
        image_size=8,
        batch_size=2,
        val_fraction=0.0,
        labels=True,
        cache_dir=None,
    )
    dm.check(3)  # a download source is checked when it loads
    dm.setup()
    assert [p.name for p in dm.image_files()] == [f"image_{i:05d}.jpg" for i in range(1, 7)]
    assert dm.labels.tolist() == [label - 1 for label in official]
    assert [label_of_pixels(x) for x in dm.images] == dm.labels.tolist()

    too_few = FlowersDataModule(
        source="flowers102", root=str(root), download=False, image_size=8, labels=True
    )
    too_few.check(2)
    with pytest.raises(DataSourceError) as error:
        too_few.setup()
    message = str(error.value)
    assert "image_00001.jpg" in message and "label 2" in message
    assert "model.net.num_classes=2" in message and "\n" not in message


def test_class_names_file(tmp_path: Path) -> None:
    folder = write_coloured(tmp_path / "imgs", [("a/x.png", 0), ("b/y.png", 1)])
    names = tmp_path / "names.txt"
    names.write_text("pink primrose\n\nhard-leaved pocket orchid\n")
    dm = make_dm(folder, tmp_path, labels=True, class_names=str(names))
    assert dm.class_names() == ["pink primrose", "hard-leaved pocket orchid"]
    dm.check(2)
    with pytest.raises(DataSourceError, match=r"names\.txt.*lists 2 names.*num_classes=3"):
        dm.check(3)
    missing = make_dm(folder, tmp_path, labels=True, class_names=str(tmp_path / "nope.txt"))
    with pytest.raises(DataSourceError, match=r"data\.class_names=.*nope\.txt.*cannot be read"):
        missing.check(2)
    assert make_dm(folder, tmp_path, labels=True).class_names() is None


def one_paragraph(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message.strip(), message
    return message


def test_missing_labels_file_names_the_folder_and_an_image(tmp_path: Path) -> None:
    folder = write_coloured(tmp_path / "imgs", [("x.png", 0), ("y.png", 1)])
    dm = make_dm(folder, tmp_path, labels=True)
    with pytest.raises(DataSourceError) as error:
        dm.check(2)
    message = one_paragraph(error)
    assert "labels.csv" in message and str(folder / "x.png") in message
    assert "and 1 more" in message and "sub-folder" in message


def test_label_out_of_range_names_the_file_and_the_line(tmp_path: Path) -> None:
    folder = write_coloured(tmp_path / "imgs", [("x.png", 0), ("y.png", 1), ("z.png", 2)])
    write_csv(folder / "labels.csv", "file,label\nx.png,0\ny.png,5\nz.png,7\n")
    dm = make_dm(folder, tmp_path, labels=True)
    dm.check(8)
    with pytest.raises(DataSourceError) as error:
        dm.check(5)
    message = one_paragraph(error)
    assert f"{folder / 'labels.csv'}, line 3: label 5" in message  # the first bad line
    assert "model.net.num_classes=5" in message and "at least 6" in message
    # The same check guards the decoded set (setup runs it on the readable files).
    with pytest.raises(DataSourceError, match=r"line 3: label 5"):
        dm.setup()

    subfolders = write_coloured(tmp_path / "sub", [("a/1.png", 0), ("b/1.png", 1), ("c/1.png", 2)])
    with pytest.raises(DataSourceError) as error:
        make_dm(subfolders, tmp_path, labels=True).check(2)
    message = one_paragraph(error)
    assert str(subfolders / "c" / "1.png") in message and "class folder 'c'" in message
    assert "model.net.num_classes=3" in message


def test_file_without_a_label_is_named(tmp_path: Path) -> None:
    folder = write_coloured(tmp_path / "imgs", [("x.png", 0), ("sub/y.png", 1)])
    write_csv(folder / "labels.csv", "file,label\nx.png,0\n")
    with pytest.raises(DataSourceError) as error:
        make_dm(folder, tmp_path, labels=True).check(2)
    message = one_paragraph(error)
    assert "labels.csv has no label for 'sub/y.png'" in message and "sub/y.png,<label>" in message


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("file,label\nx.png,0\ny.png\n", 3, "is not `file,label`"),
        ("file,label\nx.png,0\ny.png,one\n", 3, "is not `file,label`"),
        ("file,label\nx.png,1\ny.png,0,extra\n", 3, "is not `file,label`"),
        ("file,label\nx.png,0\nx.png,1\ny.png,1\n", 3, "already has a label on line 2"),
        ("file,label\nx.png,-1\ny.png,1\n", 2, "is negative"),
    ],
    ids=["no-label", "not-an-integer", "three-fields", "twice", "negative"],
)
def test_malformed_csv_line_is_named(tmp_path: Path, text: str, line: int, why: str) -> None:
    folder = write_coloured(tmp_path / "imgs", [("x.png", 0), ("y.png", 1)])
    write_csv(folder / "labels.csv", text)
    with pytest.raises(DataSourceError) as error:
        make_dm(folder, tmp_path, labels=True).check(2)
    message = one_paragraph(error)
    assert f"labels.csv, line {line}" in message and why in message


def test_csv_without_header_and_with_a_byte_order_mark(tmp_path: Path) -> None:
    folder = write_coloured(tmp_path / "imgs", [("x.png", 0), ("y.png", 1)])
    (folder / "labels.csv").write_text("\ufeffx.png,0\ny.png,1\n", encoding="utf-8")
    dm = make_dm(folder, tmp_path, labels=True)
    dm.check(2)
    assert dm.file_labels() == [0, 1]


def test_labels_and_network_must_agree(tmp_path: Path) -> None:
    folder = write_coloured(tmp_path / "imgs", [("a/x.png", 0), ("b/y.png", 1)])
    with pytest.raises(DataSourceError, match=r"data\.labels=true.*num_classes=null"):
        make_dm(folder, tmp_path, labels=True).check(None)
    with pytest.raises(DataSourceError, match=r"num_classes=2, but data\.labels=false"):
        make_dm(folder, tmp_path).check(2)
    make_dm(folder, tmp_path).check(None)  # unconditional: no labels needed or read


def test_corrupt_images_are_skipped_and_labels_stay_aligned(tmp_path: Path) -> None:
    pairs = [(f"img_{k}.png", k % 3) for k in range(6)]
    folder = write_coloured(tmp_path / "imgs", pairs)
    (folder / "img_2b.png").write_bytes(b"no PNG at all")  # sorts between img_2 and img_3
    good = (folder / "img_4.png").read_bytes()
    (folder / "img_0a.png").write_bytes(good[: len(good) // 2])  # truncated
    rows = [*pairs, ("img_2b.png", 1), ("img_0a.png", 2)]
    write_csv(folder / "labels.csv", "file,label\n" + "".join(f"{n},{c}\n" for n, c in rows))
    dm = make_dm(folder, tmp_path, labels=True, val_fraction=0.0, batch_size=2)
    dm.check(3)
    with pytest.warns(UserWarning, match=r"Skipped 2 of 8 files"):
        dm.setup()
    assert dm.labels.tolist() == [c for _, c in pairs]
    assert [label_of_pixels(x) for x in dm.images] == dm.labels.tolist()
    # From the disk cache the same: labels follow the cached list of unreadable files.
    again = make_dm(folder, tmp_path, labels=True, val_fraction=0.0, batch_size=2)
    again.check(3)
    with pytest.warns(UserWarning, match=r"Skipped 2 of 8"):
        again.setup()
    assert torch.equal(again.labels, dm.labels)


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_images", 0), ("max_images", 2.5), ("image_size", 0), ("batch_size", True)],
)
def test_bad_numbers_raise_a_value_error_naming_the_key(
    tmp_path: Path, key: str, value: object
) -> None:
    with pytest.raises(ValueError, match=rf"`data\.{key}={value!r}`"):
        make_dm(tmp_path, tmp_path, **{key: value})


def test_max_images_takes_the_first_files(tmp_path: Path) -> None:
    folder = write_coloured(tmp_path / "imgs", [(f"{k}.png", k) for k in range(5)])
    write_csv(folder / "labels.csv", "file,label\n" + "".join(f"{k}.png,{k}\n" for k in range(5)))
    dm = make_dm(folder, tmp_path, labels=True, max_images=3, val_fraction=0.0, batch_size=1)
    dm.check(3)  # labels 3 and 4 belong to files that are not used
    dm.setup()
    assert dm.labels.tolist() == [0, 1, 2] and len(dm.images) == 3


@pytest.mark.data
@pytest.mark.skipif(not SHARED_FLOWERS.is_dir(), reason="../shared/data/flowers102_64 is absent")
def test_real_shared_labels_are_oxfords_ids_minus_one() -> None:
    """labels.csv of the shared folder: 7,370 rows, 1-based ids 1..102 read as 0..101, and the
    same classes as the official imagelabels.mat (index = image number - 1)."""
    from scipy.io import loadmat

    dm = FlowersDataModule(source="folder", root=str(SHARED_FLOWERS), labels=True)
    dm.check(102)
    files = dm.image_files()
    labels = dm.file_labels(files)
    assert len(files) == len(labels) == 7370
    assert min(labels) == 0 and max(labels) == 101 and len(set(labels)) == 102
    official = loadmat(SHARED_FLOWERS / "imagelabels.mat", squeeze_me=True)["labels"]
    numbers = [int(path.stem.split("_")[1]) for path in files]
    assert labels == [int(official[n - 1]) - 1 for n in numbers]
    with pytest.raises(DataSourceError, match=r"labels\.csv, line \d+: label 102 .*=101"):
        dm.check(101)


def test_cache_key_follows_contents_not_timestamps(tmp_path: Path) -> None:
    """A folder restored unchanged (new mtimes) keeps its caches (decoded images, FID reference);
    one changed pixel, size or file list gives a new key."""
    import os

    folder = write_images(tmp_path / "images", 3)
    files = sorted(folder.glob("*.png"))
    key = cache_module.cache_key(files, 16)
    for path in files:
        os.utime(path, (1e9, 1e9))
    assert cache_module.cache_key(files, 16) == key
    assert cache_module.cache_key(files, 32) != key
    assert cache_module.cache_key(files[:2], 16) != key
    pixels = np.asarray(Image.open(files[0])).copy()
    pixels[0, 0, 0] ^= 1
    Image.fromarray(pixels).save(files[0])
    assert cache_module.cache_key(files, 16) != key
