"""The errors of graceful's data layer (a leaf module: the data set loaders, the
sources and the Parquet schema raise them without importing each other)."""

from __future__ import annotations


class DatasetError(ValueError):
    """A data set spec, file or content is invalid."""


class SourceError(DatasetError):
    """A source is missing, unreadable or malformed; the message names the fix."""


class CollectionError(SourceError):
    """A collection spec, item or key that cannot be used; the message names the fix."""
