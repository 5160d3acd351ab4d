"""Checkpoints that are plain files: a local directory or any fsspec URL (``s3://...``).

Their identity is what the store says of each file (ETag, else size and mtime), so a resume
never reuses work staged from different bytes.
"""

from __future__ import annotations

from ..io.storage import Location
from .base import Source, SourceError


def _fsspec_identity(location: Location, files: list[str]) -> dict:
    ident: dict = {"url": location.url}
    tags = {}
    for name in files:
        info = location.info(name)
        tag = info.get("ETag") or info.get("etag")
        tags[name] = str(tag).strip('"') if tag else {"size": int(info.get("size", 0)), "mtime": info.get("mtime")}
    ident["files"] = tags
    return ident


def open_files(spec: str, location: Location) -> Source:
    """A checkpoint directory at ``location``, checked for config.json and its weight files."""
    src = Source(spec=spec, location=location)
    if not src.exists("config.json"):
        raise SourceError(f"{spec}: config.json is missing (is this a Hugging Face checkpoint directory?)")
    files = src.weight_files()
    src.identity = _fsspec_identity(location, ["config.json", *files])
    return src
