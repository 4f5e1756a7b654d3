"""Denoising networks, registered by name: ``model.net.name`` picks one."""

from __future__ import annotations

from torch import nn

from flowerdiff.models.unet import UNet
from flowerdiff.registry import Registry

NETWORKS: Registry[nn.Module] = Registry("network", "model.net")
NETWORKS.register("unet")(UNet)

__all__ = ["NETWORKS", "UNet"]
