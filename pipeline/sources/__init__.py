"""Checkpoint sources: a local directory, any fsspec URL, a Hub repo, or a generated one.

``open_source`` is the one door: it recognises the kind from the spec and returns a resolved,
picklable ``Source``. Each kind lives in its own module and imports only ``base``.
"""

from __future__ import annotations

import os

from ..io.storage import Location, StorageOptions
from .base import ASSET_FILES, Source, SourceError
from .files import open_files
from .hub import HUB_ID, HubSource, resolve_hub


def open_source(spec: str, options: StorageOptions | None = None) -> Source:
    """Resolve ``spec``: a URL (``s3://...``), a local directory, ``org/name[@revision]`` on the Hub,
    or a generated ``synthetic://NAME?layers=N&seed=S&dtype=bf16`` checkpoint."""
    options = options or StorageOptions()
    if spec.startswith("synthetic://"):
        from .synthetic import open_synthetic

        return open_synthetic(spec)
    if "://" in spec:
        return open_files(spec, Location(spec, options))
    if os.path.isdir(os.path.expanduser(spec)):
        return open_files(spec, Location(spec))
    if HUB_ID.match(spec):
        return resolve_hub(spec)
    raise SourceError(f"{spec}: no such directory, URL or Hub repo id")


__all__ = ["ASSET_FILES", "HubSource", "Source", "SourceError", "open_source"]
