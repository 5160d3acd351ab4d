"""manifest.json: written last, it is what makes an output complete and checkable."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from .storage import Location

MANIFEST_NAME = "manifest.json"
FORMAT = "sinq-cluster-manifest/1"


@dataclass(frozen=True)
class FileRecord:
    name: str
    bytes: int
    sha256: str

    @classmethod
    def of(cls, name: str, data: bytes) -> "FileRecord":
        return cls(name, len(data), hashlib.sha256(data).hexdigest())


class IncompleteOutput(ValueError):
    """No manifest, or a manifest whose files do not match it."""


def load_manifest(dest: Location) -> dict:
    if not dest.exists(MANIFEST_NAME):
        raise IncompleteOutput(f"{dest.url}: no {MANIFEST_NAME}, so the output is incomplete")
    try:
        manifest = json.loads(dest.read_bytes(MANIFEST_NAME))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise IncompleteOutput(f"{dest.url}/{MANIFEST_NAME} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IncompleteOutput(f"{dest.url}/{MANIFEST_NAME} is not a manifest of this tool")
    return manifest


def verify(dest: Location, hashes: bool = True) -> dict:
    """Check every file the manifest lists (size, and sha256 unless ``hashes`` is False)."""
    manifest = load_manifest(dest)
    for rec in manifest["files"]:
        name = rec["name"]
        if not dest.exists(name):
            raise IncompleteOutput(f"{dest.url}/{name} is listed in the manifest but missing")
        if dest.size(name) != rec["bytes"]:
            raise IncompleteOutput(f"{dest.url}/{name} has {dest.size(name)} bytes, the manifest says {rec['bytes']}")
        if hashes and dest.sha256(name) != rec["sha256"]:
            raise IncompleteOutput(f"{dest.url}/{name} does not match its sha256 in the manifest")
    return manifest
