"""Read-only checkpoint sources: a local directory, any fsspec URL, or a Hugging Face Hub repo.

A source is small and picklable: the driver resolves it once (exact revision, file list) and
ships it to the workers, which fetch their tensors by byte range themselves.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
from dataclasses import dataclass, field

import torch

from .safetensors_io import SafetensorsError, TensorInfo, read_header, tensor_from_bytes
from .storage import Location, StorageOptions

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied through to the output beside the weights.
ASSET_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class SourceError(ValueError):
    """The source is missing something or holds something we refuse to read."""


@dataclass
class Source:
    """A checkpoint directory: names are file names relative to ``location``."""

    spec: str
    location: Location
    identity: dict = field(default_factory=dict)

    def read_bytes(self, name: str) -> bytes:
        return self.location.read_bytes(name)

    def exists(self, name: str) -> bool:
        return self.location.exists(name)

    def read_json(self, name: str) -> dict:
        try:
            data = json.loads(self.read_bytes(name))
        except FileNotFoundError:
            raise SourceError(f"{self.spec}: {name} is missing") from None
        except (PermissionError, IsADirectoryError) as exc:
            raise SourceError(f"{self.spec}: {name} cannot be read ({exc.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{self.spec}: {name} is not valid JSON ({exc.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise SourceError(f"{self.spec}: {name} is not a JSON object")
        return data

    def header(self, name: str) -> dict[str, TensorInfo]:
        label = f"{self.spec}/{name}"
        if not self.location.exists(name):
            raise SourceError(f"{label} is named in the index but missing")
        size = self.location.size(name)
        head = self.location.read_range(name, 0, min(8, size))
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        body = self.location.read_range(name, 8, length) if 0 < length and 8 + length <= size else b""
        return read_header(io.BytesIO(head + body), size, label)

    def read_tensor(self, name: str, info: TensorInfo) -> torch.Tensor:
        return tensor_from_bytes(info, self.location.read_range(name, info.start, info.nbytes))

    def weight_files(self) -> list[str]:
        """The safetensors files holding the weights; pickle checkpoints are refused."""
        if self.exists(INDEX_NAME):
            index = self.read_json(INDEX_NAME)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise SourceError(f"{self.spec}: {INDEX_NAME} has no weight_map")
            files = sorted(set(weight_map.values()))
            for f in files:
                if not self.exists(f):
                    raise SourceError(f"{self.spec}/{f} is named in {INDEX_NAME} but missing")
            return files
        if self.exists(SINGLE_NAME):
            return [SINGLE_NAME]
        pickles = [n for n in self.location.list() if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise SourceError(
                f"{self.spec}: only pickle checkpoints found ({pickles[0]}); they are never unpickled. "
                "Convert the model to safetensors first"
            )
        raise SourceError(f"{self.spec}: no {SINGLE_NAME} or {INDEX_NAME} found")

    def assets(self) -> list[str]:
        return [n for n in ASSET_FILES if self.exists(n)]


def _fsspec_identity(location: Location, files: list[str]) -> dict:
    ident: dict = {"url": location.url}
    tags = {}
    for name in files:
        info = location.info(name)
        tag = info.get("ETag") or info.get("etag")
        tags[name] = str(tag).strip('"') if tag else {"size": int(info.get("size", 0)), "mtime": info.get("mtime")}
    ident["files"] = tags
    return ident


@dataclass
class HubSource(Source):
    """A Hub repo at an exact commit; files come through the huggingface_hub cache."""

    repo_id: str = ""
    revision: str = ""

    def _local(self, name: str) -> str:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(self.repo_id, name, revision=self.revision)

    def read_bytes(self, name: str) -> bytes:
        with open(self._local(name), "rb") as f:
            return f.read()

    def _cached(self, name: str) -> str | None | object:
        from huggingface_hub import try_to_load_from_cache

        return try_to_load_from_cache(self.repo_id, name, revision=self.revision)

    def exists(self, name: str) -> bool:
        """Without downloading: the cache, else (online) the Hub's file listing."""
        from huggingface_hub import HfApi, constants

        cached = self._cached(name)
        if isinstance(cached, str):
            return True
        if cached is not None or constants.HF_HUB_OFFLINE:
            return False
        return HfApi().file_exists(self.repo_id, name, revision=self.revision)

    def header(self, name: str) -> dict[str, TensorInfo]:
        """From the cached file, else by HTTP range requests: the driver never downloads a shard."""
        label = f"{self.spec}/{name}"
        cached = self._cached(name)
        if isinstance(cached, str):
            with open(cached, "rb") as f:
                return read_header(f, os.path.getsize(cached), label)
        from huggingface_hub import HfFileSystem

        fs, path = HfFileSystem(), f"{self.repo_id}@{self.revision}/{name}"
        size = int(fs.size(path))
        head = fs.cat_file(path, start=0, end=min(8, size))
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        body = fs.cat_file(path, start=8, end=8 + length) if 0 < length and 8 + length <= size else b""
        return read_header(io.BytesIO(head + body), size, label)

    def read_tensor(self, name: str, info: TensorInfo) -> torch.Tensor:
        with open(self._local(name), "rb") as f:
            f.seek(info.start)
            return tensor_from_bytes(info, f.read(info.nbytes))


def _resolve_hub(spec: str) -> HubSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, _, revision = spec.partition("@")
    try:
        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=["config.json"])
    except (RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError, HFValidationError) as exc:
        raise SourceError(f"{spec}: cannot resolve on the Hub or in the local cache ({exc.__class__.__name__})") from None
    commit = os.path.basename(folder.rstrip("/"))
    return HubSource(
        spec=spec, location=Location(folder), identity={"repo_id": repo_id, "revision": revision or "main", "commit": commit},
        repo_id=repo_id, revision=commit,
    )


def open_source(spec: str, options: StorageOptions | None = None) -> Source:
    """Resolve ``spec``: a URL (``s3://...``), a local directory, ``org/name[@revision]`` on the Hub,
    or a generated ``synthetic://NAME?layers=N&seed=S&dtype=bf16`` checkpoint."""
    options = options or StorageOptions()
    if spec.startswith("synthetic://"):
        from .synthetic import open_synthetic

        return open_synthetic(spec)
    if "://" in spec:
        location = Location(spec, options)
    elif os.path.isdir(os.path.expanduser(spec)):
        location = Location(spec)
    elif _HUB_ID.match(spec):
        return _resolve_hub(spec)
    else:
        raise SourceError(f"{spec}: no such directory, URL or Hub repo id")
    src = Source(spec=spec, location=location)
    if not src.exists("config.json"):
        raise SourceError(f"{spec}: config.json is missing (is this a Hugging Face checkpoint directory?)")
    files = src.weight_files()
    src.identity = _fsspec_identity(location, ["config.json", *files])
    return src


__all__ = ["Source", "HubSource", "SourceError", "SafetensorsError", "open_source", "ASSET_FILES"]
