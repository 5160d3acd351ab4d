"""manifest.json: written last, it is what makes an output complete and checkable.

Built, loaded and verified here only, so the reducer that writes it and the loader, driver and
nightly runs that read it cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..io.hf_names import INDEX_NAME
from ..io.storage import Location
from ..io.containment import ContainmentError, check_name
from .layout import SIDECAR_NAME, TOOL_NAME, tool_version

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


def _records(dest: Location, manifest: dict) -> list[dict]:
    """The manifest's file records, each a name inside the output with a size and a sha256."""
    records = manifest.get("files")
    if not isinstance(records, list):
        raise IncompleteOutput(f"{dest.url}/{MANIFEST_NAME} lists no files")
    for rec in records:
        if not (isinstance(rec, dict) and isinstance(rec.get("bytes"), int) and isinstance(rec.get("sha256"), str)):
            raise IncompleteOutput(f"{dest.url}/{MANIFEST_NAME} has a malformed file record: {str(rec)[:80]}")
        try:
            check_name(dest.url, rec.get("name"))
        except ContainmentError as exc:
            raise IncompleteOutput(f"{MANIFEST_NAME}: {exc}") from None
    return records


def _check_coverage(dest: Location, listed: set[str]) -> None:
    """Every file a loader reads is one the manifest covers: config.json, the index, the sidecar
    where there is one, and every shard the index names. A file outside the manifest could
    change what the output computes without any check noticing."""
    for name in ("config.json", INDEX_NAME):
        if name not in listed:
            raise IncompleteOutput(f"{dest.url}/{name} is not covered by the manifest")
    if SIDECAR_NAME not in listed and dest.exists(SIDECAR_NAME):
        raise IncompleteOutput(f"{dest.url}/{SIDECAR_NAME} is not covered by the manifest")
    try:
        weight_map = json.loads(dest.read_bytes(INDEX_NAME)).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, AttributeError):
        raise IncompleteOutput(f"{dest.url}/{INDEX_NAME} is not a valid index") from None
    if not isinstance(weight_map, dict):
        raise IncompleteOutput(f"{dest.url}/{INDEX_NAME} has no weight_map")
    for shard in sorted({str(f) for f in weight_map.values()}):
        if shard not in listed:
            raise IncompleteOutput(f"{dest.url}/{shard} is named in the index but not covered by the manifest")


def verify(dest: Location, hashes: bool = True) -> dict:
    """Check every file the manifest lists (size, and sha256 unless ``hashes`` is False), and that
    the manifest covers every file a loader reads (``_check_coverage``)."""
    manifest = load_manifest(dest)
    records = _records(dest, manifest)
    for rec in records:
        name = rec["name"]
        try:
            size = dest.size(name)
        except FileNotFoundError:
            raise IncompleteOutput(f"{dest.url}/{name} is listed in the manifest but missing") from None
        if size != rec["bytes"]:
            raise IncompleteOutput(f"{dest.url}/{name} has {size} bytes, the manifest says {rec['bytes']}")
        if hashes and dest.sha256(name) != rec["sha256"]:
            raise IncompleteOutput(f"{dest.url}/{name} does not match its sha256 in the manifest")
    _check_coverage(dest, {rec["name"] for rec in records})
    return manifest
