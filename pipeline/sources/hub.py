"""A Hugging Face Hub repo at an exact commit, read through the huggingface_hub cache."""

from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass

import torch

from ..io.safetensors_io import TensorInfo, read_header, tensor_from_bytes
from ..io.storage import Location
from .base import Source, SourceError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


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

    def list_files(self) -> list[str]:
        """The repo's top-level files at the commit: the cached snapshot when offline (what can be
        read then), else the Hub's own listing, without downloading anything."""
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            return super().list_files()
        return sorted(f for f in HfApi().list_repo_files(self.repo_id, revision=self.revision) if "/" not in f)

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


def resolve_hub(spec: str) -> HubSource:
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
