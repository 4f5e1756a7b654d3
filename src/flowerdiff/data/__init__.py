"""Data: image sources, the decoded-image cache and the Lightning data module."""

from flowerdiff.data.datamodule import FlowersDataModule
from flowerdiff.data.sources import SOURCES, DataSourceError

__all__ = ["SOURCES", "DataSourceError", "FlowersDataModule"]
