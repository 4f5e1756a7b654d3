"""FID sharded over two DDP processes (CPU, gloo) equals FID of the same samples in one process.

The test runs this file as a script (Lightning's DDP launcher re-executes the script for rank 1,
which pytest cannot be): both ranks validate with FIDCallback, then rank 0 scores the same
seeded samples unsharded and writes both numbers to a JSON file. The model is class-conditional
with guidance, so each rank must also take its own share of the class-balanced labels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_fid_sharded_over_two_ranks_equals_one_process(tmp_path: Path, image_folder: Path) -> None:
    files = sorted(p.name for p in image_folder.glob("*.png"))
    rows = "".join(f"{name},{k % 3}\n" for k, name in enumerate(files))
    (image_folder / "labels.csv").write_text(f"file,label\n{rows}")
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, str(Path(__file__)), str(tmp_path), str(image_folder), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["ddp"] == pytest.approx(result["single"], rel=1e-6, abs=1e-9)
    assert result["ranks"] == [result["ddp"], result["ddp"]]  # every rank got the reduced value
    assert result["cache_hit"]  # rank 0 filled the reference cache, the rest read it
    # Rank 1's share is the unsharded set's tail (float32 kernels may round differently per
    # batch size, hence not bit-exact).
    assert result["max_shard_difference"] < 1e-4
    # 7 images over 2 ranks: 4 + 3, with the labels of images 0-3 and 4-6 of the balanced set.
    assert result["rank_labels"] == [[0, 1, 2, 0], [1, 2, 0]]


def main(tmp_path: Path, image_folder: Path, out: Path) -> None:
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from test_fid import TinyFeatures

    from flowerdiff.callbacks.fid import FIDCallback
    from flowerdiff.diffusion.guidance import Guidance
    from flowerdiff.infra.config import build_module
    from flowerdiff.metrics.features import to_uint8
    from flowerdiff.metrics.quality import SampleQuality, datamodule_reference, extract_features
    from flowerdiff.training.generate import balanced_labels
    from flowerdiff.training.module import DiffusionModule

    from conftest import TINY_OVERRIDES, compose_config

    cfg = compose_config(
        [
            *TINY_OVERRIDES,
            f"data.root={image_folder}",
            f"paths.root_dir={tmp_path}",
            "data.labels=true",
            "model.net.num_classes=3",
        ],
        output_dir=tmp_path / "run",
    )
    torch.manual_seed(0)
    module = build_module(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.check(3)
    callback = FIDCallback(
        TinyFeatures(),
        num_samples=7,  # uneven shards: 4 + 3
        batch_size=2,
        every_n_epochs=1,
        num_inference_steps=2,
        cache_dir=str(tmp_path / "fid-cache"),
        guidance_scale=2.0,
    )
    seen: list[int] = []
    original = DiffusionModule.sample

    def spy(self: DiffusionModule, num_images: int, **kwargs: object) -> object:
        seen.extend(kwargs["class_labels"].tolist())
        return original(self, num_images, **kwargs)

    DiffusionModule.sample = spy
    trainer = L.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    ddp = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/fid"]
    DiffusionModule.sample = original
    ranks = [torch.zeros(1, dtype=torch.float64) for _ in range(2)]
    torch.distributed.all_gather(ranks, torch.tensor([ddp], dtype=torch.float64))
    rank_labels: list[list[int]] = [[], []]
    torch.distributed.all_gather_object(rank_labels, seen)
    if trainer.global_rank != 0:
        return

    # The same 7 images, unsharded, in one process, against the same reference features.
    sampler = callback.sampler_for(module)
    labels, guidance = balanced_labels(7, 3), Guidance(2.0)
    whole = module.sample(7, seed=0, sampler=sampler, class_labels=labels, guidance=guidance).images
    rank1 = module.sample(
        3, seed=0, start_index=4, sampler=sampler, class_labels=labels[4:], guidance=guidance
    ).images
    extractor = TinyFeatures()
    real, hit = datamodule_reference(datamodule, extractor, tmp_path / "fid-cache")
    single = SampleQuality(real.shape[1], sync=False)
    single.update(real, real=True)
    single.update(extract_features(extractor, to_uint8(whole)), real=False)
    result = {
        "ddp": ddp,
        "single": single.compute()["fid"],
        "ranks": [float(r) for r in ranks],
        "cache_hit": hit,
        "max_shard_difference": float((whole[4:] - rank1).abs().max()),
        "rank_labels": rank_labels,
    }
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:4]))
