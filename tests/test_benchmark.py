"""scripts/benchmark.py end to end on unet_tiny: every figure is produced (not how fast)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from flowerdiff.tasks.benchmark import format_table, run_benchmark

from conftest import compose_config

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def positive(value: float) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_benchmark_produces_every_figure(tmp_path: Path) -> None:
    cfg = compose_config(
        [
            "model=unet_tiny",
            "image_size=32",  # the peer's 6 levels halve 5 times
            "batch_size=2",
            "warmup_steps=1",
            "steps=2",
            "sampler.num_inference_steps=2",
            "matmul_size=128",
            "threads=1",
            "profile=true",
            f"peer={HAS_DIFFUSERS}",
            f"paths.root_dir={tmp_path}",
        ],
        config_name="benchmark",
        output_dir=tmp_path / "run",
    )
    report = run_benchmark(cfg)
    assert json.loads((tmp_path / "run" / "benchmark.json").read_text()) == report

    assert positive(report["matmul_peak_flops"])
    for row in ("lightning", "plain"):
        for key in ("images_per_s", "train_flops_per_image", "mfu"):
            assert positive(report[row][key]), (row, key)
        assert report[row]["peak_mib"] >= 0
    assert positive(report["lightning"]["vs_plain"])
    assert report["lightning"]["profile_s"]  # Lightning's per-hook timings
    assert positive(report["sampling_images_per_s"]["ours"])
    table = format_table(report)
    assert "ours, Lightning step" in table and "ours, plain PyTorch loop" in table

    if not HAS_DIFFUSERS:
        pytest.skip("diffusers not installed (the bench extra): peer figures not checked")
    assert positive(report["peer"]["images_per_s"]) and positive(report["lightning"]["vs_peer"])
    assert report["peer"]["params"] > 0 and positive(report["peer"]["mfu"])
    for key in ("diffusers_pipeline_our_unet", "diffusers_pipeline_peer"):
        assert positive(report["sampling_images_per_s"][key]), key
    assert "diffusers UNet2DModel" in table


def test_peer_is_the_flowers_configuration_scaled() -> None:
    pytest.importorskip("diffusers")
    from flowerdiff.tasks.benchmark import peer_unet

    full = peer_unet(64, 1.0)
    assert tuple(full.config.block_out_channels) == (128, 128, 256, 256, 512, 512)
    assert full.config.down_block_types[4] == "AttnDownBlock2D"
    assert full.config.layers_per_block == 2
    assert tuple(peer_unet(64, 0.125).config.block_out_channels) == (16, 16, 32, 32, 64, 64)


@pytest.mark.slow
def test_benchmark_runs_edm_with_its_own_sampler(tmp_path: Path) -> None:
    """EDM has no discrete schedule for diffusers' DDIMPipeline: our sampler is timed alone."""
    cfg = compose_config(
        [
            "model=unet_tiny",
            "diffusion=edm",
            "sampler=heun",
            "sampler.num_inference_steps=2",
            "image_size=32",  # the peer's 6 levels halve 5 times
            "batch_size=2",
            "warmup_steps=1",
            "steps=2",
            "matmul_size=64",
            "threads=1",
            f"peer={HAS_DIFFUSERS}",
            f"paths.root_dir={tmp_path}",
        ],
        config_name="benchmark",
        output_dir=tmp_path / "run",
    )
    report = run_benchmark(cfg)
    assert set(report["sampling_images_per_s"]) == {"ours"}
    assert positive(report["sampling_images_per_s"]["ours"])
    assert positive(report["lightning"]["images_per_s"]) and positive(report["plain"]["mfu"])
    assert "| heun-2 sampling |" in format_table(report)


def test_a_bad_precision_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    import flowerdiff.tasks.benchmark as benchmark
    from flowerdiff.infra.config import ConfigError

    def never(*args, **kwargs):
        raise AssertionError("the benchmark measured before checking its precision")

    monkeypatch.setattr(benchmark, "matmul_peak_flops", never)
    cfg = compose_config(
        ["model=unet_tiny", "precision=bf16", f"paths.root_dir={tmp_path}"],
        config_name="benchmark",
        output_dir=tmp_path / "run",
    )
    with pytest.raises(ConfigError, match=r"`precision='bf16'` is not a precision flowerdiff"):
        run_benchmark(cfg)
