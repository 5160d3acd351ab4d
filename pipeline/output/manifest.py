"""manifest.json: written last, it is what makes an output complete and checkable.

Built, loaded and verified here only, so the reducer that writes it and the loader, driver and
nightly runs that read it cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..io.storage import Location
from .layout import TOOL_NAME, tool_version

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


def build_manifest(
    *, source: dict, quantization: dict, files: list[FileRecord], tensors: list[dict], units: list[dict],
    source_bytes: int, tensor_bytes: int, shards: int, tensors_copied: int, timings: dict, run_key: str,
    structure: dict | None = None,
) -> dict:
    """The manifest of a finished job: every other file with its size and sha256, per-tensor
    statistics (``name``, ``rel_error``, ...) and their totals, and per kind of module what was
    quantized and kept (``structure``)."""
    errors = [t["rel_error"] for t in tensors]
    worst = max(range(len(errors)), key=errors.__getitem__)
    return {
        "format": FORMAT,
        "tool": {"name": TOOL_NAME, "version": tool_version()},
        "source": source,
        "quantization": quantization,
        "files": [vars(f) for f in sorted(files, key=lambda f: f.name)],
        "tensors": tensors,
        "units": units,
        "structure": structure or {},
        "totals": {
            "source_bytes": source_bytes,
            "output_bytes": sum(f.bytes for f in files),
            "tensor_bytes": tensor_bytes,
            "units": len(units),
            "shards": shards,
            "tensors_quantized": len(tensors),
            "tensors_copied": tensors_copied,
            "mean_rel_error": sum(errors) / len(errors),
            "max_rel_error": errors[worst],
            "worst_tensor": tensors[worst]["name"],
        },
        "timings": timings,
        "run_key": run_key,
    }


def with_files(manifest: dict, records: list[FileRecord]) -> dict:
    """``manifest`` with ``records`` added to its files (replacing those of the same names) and its
    output size recomputed: for a file added to a complete output (the evaluation's)."""
    files = {f["name"]: FileRecord(**f) for f in manifest["files"]}
    files.update({r.name: r for r in records})
    ordered = sorted(files.values(), key=lambda f: f.name)
    return {
        **manifest,
        "files": [vars(f) for f in ordered],
        "totals": {**manifest["totals"], "output_bytes": sum(f.bytes for f in ordered)},
    }


def encode_manifest(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()


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
