"""Lightning callbacks: FID during training, denoising grids, NaN guard, throughput."""

from flowerdiff.callbacks.denoising_grid import DenoisingGridCallback
from flowerdiff.callbacks.fid import FIDCallback
from flowerdiff.callbacks.nan_guard import NaNGuard, NonFiniteLossError
from flowerdiff.callbacks.throughput import ImagesPerSecond

__all__ = [
    "DenoisingGridCallback",
    "FIDCallback",
    "ImagesPerSecond",
    "NaNGuard",
    "NonFiniteLossError",
]
