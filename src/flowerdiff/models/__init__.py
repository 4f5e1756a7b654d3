"""Denoising networks: the chapter-15 U-Net and its building blocks."""

from flowerdiff.models.unet import UNet

__all__ = ["UNet"]
