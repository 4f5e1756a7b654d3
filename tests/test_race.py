"""scripts/race.py's harness end to end on a tiny budget: both sides train side by side for the
same wall clock, snapshots are written at their moments and scored, and the table, the JSON and
the plot land in the run directory; and the config checks."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from flowerdiff.infra import devices
from flowerdiff.infra.config import ConfigError, build_module
from flowerdiff.tasks import race
from flowerdiff.tasks.race import (
    Clock,
    check_guidance,
    evaluate_ours,
    format_table,
    ours_trainer,
    peer_width,
    resolve_config,
    run_race,
)

from conftest import compose_config, write_images

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
TESTS = Path(__file__).resolve().parent
BUDGET_S = 3.0


def race_config(tmp_path: Path, *extra: str) -> DictConfig:
    folder = write_images(tmp_path / "images", count=24, size=32)
    cfg = compose_config(
        [
            f"data.root={folder}",
            f"paths.root_dir={tmp_path}",
            f"budget_minutes={BUDGET_S / 60}",
            "snapshots=2",
            "num_samples=6",
            "sample_batch_size=4",
            "feature_batch_size=4",
            "probe_steps=1",
            "sample_grid=4",
            "model=unet_tiny",
            "diffusion=ddpm",
            "sampler=ddim",
            "sampler.num_inference_steps=2",
            "data.batch_size=4",
            "lr_scheduler.warmup_steps=2",
            "peer.width=0.0625",  # block_out_channels (8, 8, 16, 16, 32, 32)
            "peer.batch_size=4",
            "peer.lr_warmup_steps=2",
            "peer.num_inference_steps=3",
            *extra,
        ],
        config_name="race",
        output_dir=tmp_path / "run",
    )
    with open_dict(cfg):
        cfg.feature_extractor = {"_target_": "conftest.TinyFeatures"}
    return cfg


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers (the bench extra) is not installed")
def test_race_end_to_end_on_a_tiny_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The side processes import TinyFeatures from this folder.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    report = run_race(race_config(tmp_path))
    run = tmp_path / "run"
    assert json.loads((run / "race.json").read_text()) == report
    assert (run / "race.png").stat().st_size > 0
    for side in ("ours", "peer"):
        result = report[side]
        assert result["steps"] > 0 and result["images_seen"] == result["steps"] * 4
        # The budget is honoured: training stopped at the first step past it.
        assert BUDGET_S <= result["train_s"] < BUDGET_S + 2 * max(result["probe_step_s"], 0.5)
        assert result["images_per_s"] > 0 and result["train_flops_per_image"] > 0
        assert result["lr_horizon"] >= 1
        records = result["snapshots"]
        assert [r["index"] for r in records] == [0, 1]
        for k, record in enumerate(records):
            assert record["elapsed_s"] >= BUDGET_S * (k + 1) / 2
            assert Path(record["path"]).is_file() and Path(record["features"]).is_file()
            assert (run / "race" / side / f"samples_{k}.png").is_file()
            assert record["fid"] >= 0 and "kid_mean" in record
        assert records[-1]["steps"] == result["steps"]
        assert records[0]["steps"] <= records[1]["steps"]
    # Each side sampled with its own sampler and step count.
    assert report["ours"]["snapshots"][0]["nfe"] == 2
    assert report["ours"]["snapshots"][0]["sampler"] == "ddim-2"
    assert report["peer"]["snapshots"][0]["nfe"] == 3
    assert report["peer"]["snapshots"][0]["sampler"] == "ddim-3"
    assert report["peer"]["block_out_channels"] == [8, 8, 16, 16, 32, 32]
    # The EMA snapshot of ours is the EMA callback's network, not the raw one.
    snapshot = torch.load(report["ours"]["snapshots"][0]["path"], weights_only=True)
    assert snapshot["weights"] == "ema"
    assert snapshot["steps"] == report["ours"]["snapshots"][0]["steps"]
    # The FID reference (not cached yet) was computed by the sides once they had evaluated:
    # its one piece by one of them; the main process joined it, cached it, removed the piece.
    assert report["ours"]["reference_pieces"] + report["peer"]["reference_pieces"] == 1
    assert not (run / "race" / "reference").exists()
    table = format_table(report)
    assert "| flowerdiff |" in table and "diffusers x0.0625" in table
    assert table.count("\n| 1 |") == 1 and table.count("\n| 2 |") == 1

    # Re-scoring the same snapshots with more samples trains nothing.
    written = {p: p.stat().st_mtime_ns for p in (run / "race").glob("*/snapshots/*.pt")}
    # One after the other, and with a new (cold) reference cache: the sides leave the reference
    # to the main process, which has every thread then.
    again = run_race(
        race_config(
            tmp_path,
            "evaluate_only=true",
            "num_samples=8",
            "parallel=false",
            f"fid_cache_dir={tmp_path / 'other-cache'}",
        )
    )
    assert {p: p.stat().st_mtime_ns for p in written} == written
    for side in ("ours", "peer"):
        assert again[side]["steps"] == report[side]["steps"]
        assert again[side]["snapshots"][1]["elapsed_s"] == report[side]["snapshots"][1]["elapsed_s"]
    assert again["num_samples"] == 8 and again["budget_minutes"] == report["budget_minutes"]
    assert again["ours"]["reference_pieces"] == again["peer"]["reference_pieces"] == 0
    assert list((tmp_path / "other-cache").glob("fid-reference-*.pt"))


def test_the_reference_work_folder_is_fresh_and_helping_is_best_effort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the race's")
    work = tmp_path / "race" / "reference"
    work.parent.mkdir()
    work.symlink_to(outside)  # a link where the race keeps its pieces: removed, not followed
    race.fresh_folder(work)
    assert work.is_dir() and not work.is_symlink() and not any(work.iterdir())
    assert (outside / "keep.txt").read_text() == "not the race's"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(race, "help_with_reference", broken)
    assert race.share_reference(race_config(tmp_path), work) == 0  # the race goes on


def test_clock_saves_due_snapshots_and_stops_at_the_budget() -> None:
    saved: list[int] = []
    clock = Clock(10.0, 4, lambda r: saved.append(r["index"]) or Path(f"s{r['index']}"))
    clock.begin()
    clock.start -= 5.1  # 5.1 s have passed: the snapshots at 2.5 s and 5 s are due
    assert clock.tick(8) and saved == [0, 1]
    clock.start -= 10  # past the end: the rest are written, and the budget is spent
    assert not clock.tick(8) and saved == [0, 1, 2, 3]
    assert [r["steps"] for r in clock.records] == [1, 1, 2, 2]
    assert [r["images"] for r in clock.records] == [8, 8, 16, 16]


def test_bad_settings_are_reported_together(tmp_path: Path) -> None:
    cfg = race_config(
        tmp_path,
        "image_size=48",
        "snapshots=0",
        "peer.sampler=euler",
        "peer.mixed_precision=fp16",
    )
    with pytest.raises(ConfigError) as error:
        resolve_config(cfg)
    message = str(error.value)
    assert "4 problems" in message
    assert "`image_size=48`" in message and "`snapshots=0`" in message
    assert "`peer.sampler='euler'`" in message
    assert "`peer.mixed_precision='fp16'` must be no, bf16 or auto" in message


def test_missing_data_folder_names_the_key(tmp_path: Path) -> None:
    cfg = race_config(tmp_path, "data.root=null")  # no ../shared beside tmp_path
    with pytest.raises(ConfigError, match=r"`data\.root` is null"):
        resolve_config(cfg)


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers (the bench extra) is not installed")
def test_auto_peer_width_matches_our_parameter_count(tmp_path: Path) -> None:
    cfg = race_config(tmp_path, "peer.width=auto")
    # x0.125 = (16, 16, 32, 32, 64, 64): 1.79M parameters at 32x32, the peer.
    assert peer_width(cfg, 1_800_000) == 0.125
    assert peer_width(cfg, 2_764_259) == 0.125  # 1.79M is nearer than x0.1875's 4.01M
    assert peer_width(cfg, 2_979_715) == 0.1875  # unet_cpu: 4.01M is nearer than 1.79M
    assert peer_width(cfg, 4_000_000) == 0.1875
    assert peer_width(race_config(tmp_path, "peer.width=0.5"), 1) == 0.5


def test_our_default_side_is_the_cpu_quick_recipe(tmp_path: Path) -> None:
    """conf/race.yaml repeats the recipe's values (its callbacks group holds only the EMA):
    they must not drift from experiment=cpu_quick."""
    race = compose_config([], config_name="race", output_dir=tmp_path / "race")
    quick = compose_config(["experiment=cpu_quick"], output_dir=tmp_path / "train")
    for key in ("model", "diffusion", "sampler", "optimizer", "lr_scheduler", "callbacks.ema"):
        assert OmegaConf.select(race, key) == OmegaConf.select(quick, key), key
    for key in ("data.batch_size", "data.image_size", "trainer.precision"):
        assert OmegaConf.select(race, key) == OmegaConf.select(quick, key), key


@pytest.mark.parametrize("native", [True, False])
def test_both_sides_train_in_bf16_only_where_the_cpu_has_it(
    native: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The defaults (auto-bf16, peer auto) resolve once, to the same choice for both sides;
    an explicit peer setting is kept."""
    monkeypatch.setattr(devices, "native_cpu_bf16", lambda: native)
    resolved = resolve_config(race_config(tmp_path))
    assert resolved.trainer.precision == ("bf16-mixed" if native else "32-true")
    assert resolved.peer.mixed_precision == ("bf16" if native else "no")
    kept = resolve_config(race_config(tmp_path, "peer.mixed_precision=bf16"))
    assert kept.peer.mixed_precision == "bf16"


def test_our_trainer_clips_gradients_as_the_recipe_says(tmp_path: Path) -> None:
    """Clipping changes what is learned, so a recipe's clipping must reach the race's trainer."""
    assert ours_trainer(race_config(tmp_path), [], 1).gradient_clip_val is None
    cfg = race_config(
        tmp_path, "+trainer.gradient_clip_val=0.5", "+trainer.gradient_clip_algorithm=value"
    )
    trainer = ours_trainer(cfg, [], 1)
    assert trainer.gradient_clip_val == 0.5
    assert trainer.gradient_clip_algorithm == "value"
    with pytest.raises(ConfigError, match=r"`trainer\.gradient_clip_val=-1` must be a number"):
        resolve_config(race_config(tmp_path, "+trainer.gradient_clip_val=-1"))


def test_a_class_conditional_side_samples_every_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conditional recipe is sampled as evaluate.py samples it (every class in turn, with the
    guidance asked for), not silently from its unconditional "null" class."""
    cfg = race_config(tmp_path, "model.net.num_classes=3", "guidance_scale=2.0")
    path = tmp_path / "snapshot.pt"
    torch.save({"state_dict": build_module(cfg).net.state_dict()}, path)
    seen: dict[str, Any] = {}

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return sample_batches(*args, **kwargs)

    sample_batches = race.sample_batches
    monkeypatch.setattr(race, "sample_batches", spy)
    record: dict[str, Any] = {"index": 0, "path": str(path)}
    evaluate_ours(cfg, [record], tmp_path)
    assert seen["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    assert seen["guidance"].scale == 2.0
    assert record["sampler"] == "ddim-2 cfg2" and Path(record["features"]).is_file()
    # Guidance without classes is refused, naming the key; so is a scale that is no number.
    check_guidance(cfg)
    with pytest.raises(ConfigError, match=r"`guidance_scale=2\.0` needs a class-conditional"):
        check_guidance(race_config(tmp_path, "guidance_scale=2.0"))
    with pytest.raises(ConfigError, match=r"`guidance_scale=-1` must be null or a number"):
        resolve_config(race_config(tmp_path, "guidance_scale=-1"))


@pytest.mark.parametrize(
    "payload",
    [
        "${oc.decode:'{_target_: builtins.open, file: MARKER, mode: a}'}",
        {"_target_": "builtins.open", "file": "MARKER", "mode": "a"},
    ],
    ids=["resolver", "target"],
)
def test_evaluate_only_reads_a_race_directory_as_data(tmp_path: Path, payload: Any) -> None:
    """A race directory from elsewhere cannot make `evaluate_only` call what it names."""
    cfg = race_config(tmp_path, "evaluate_only=true")
    folder = Path(cfg.output).parent / "race"
    marker = tmp_path / "marker"
    stored = OmegaConf.to_container(resolve_config(race_config(tmp_path)))
    if isinstance(payload, str):
        payload = payload.replace("MARKER", str(marker))
    else:
        payload = {**payload, "file": str(marker)}
    stored["data"]["root"] = payload
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(stored), folder / "config.yaml")
    for side in ("ours", "peer"):
        (folder / side).mkdir(exist_ok=True)
        (folder / side / "train.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"config.yaml is read as data.*data\.root"):
        run_race(cfg)
    assert not marker.exists()
