"""Extraction: one pass of the model over a task, last-token features of every layer to a cache."""

from chiptuning.extract.extractor import ExtractConfig, extract

__all__ = ["ExtractConfig", "extract"]
