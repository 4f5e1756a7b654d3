"""Data: image sources, the decoded-image cache and the Lightning data module."""

from flowerdiff.data.datamodule import FlowersDataModule
from flowerdiff.data.sources import DataSourceError

__all__ = ["DataSourceError", "FlowersDataModule"]
