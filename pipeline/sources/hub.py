"""A Hugging Face Hub repo at an exact commit: small files through the huggingface_hub cache,
tensors from the cache where they are, else by HTTP range requests."""

from __future__ import annotations

import io
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from fsspec.implementations.local import LocalFileSystem

from ..io.ranges import read_ranges
from ..io.safetensors_io import TensorInfo, read_header, tensor_from_bytes
from ..io.storage import Location
from .base import Source, SourceError
from ..io.containment import check_name, check_size, local_file, read_local

# Hub reads: requests in flight per unit, and the largest single range.
CONCURRENCY = 16
RANGE_SIZE = 8 * 1024 * 1024
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass
class HubSource(Source):
    """A Hub repo at an exact commit; small files come through the huggingface_hub cache."""

    repo_id: str = ""
    revision: str = ""
    endpoint: str = ""  # the Hub the driver resolved against (HF_ENDPOINT), for the workers too

    def _local(self, name: str) -> str:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(self.repo_id, name, revision=self.revision, endpoint=self.endpoint or None)

    def read_bytes(self, name: str) -> bytes:
        """Through the cache, checked there as any local checkpoint's files are (a snapshot's links
        into its own blobs allowed); a file not yet cached has its size checked before it is fetched."""
        check_name(self.spec, name)
        if not isinstance(self._cached(name), str):
            check_size(self.spec, name, self._remote_size(name))
        path = self._local(name)  # <cache>/models--org--name/snapshots/<commit>/<name>
        return read_local(self.spec, path[: -len(name)].rstrip("/"), name)

    def _cached(self, name: str) -> str | None | object:
        from huggingface_hub import try_to_load_from_cache

        return try_to_load_from_cache(self.repo_id, name, revision=self.revision)

    def exists(self, name: str) -> bool:
        """Without downloading: the cache, else (online) the Hub's file listing."""
        from huggingface_hub import HfApi, constants

        cached = self._cached(check_name(self.spec, name))
        if isinstance(cached, str):
            return True
        if cached is not None or constants.HF_HUB_OFFLINE:
            return False
        return HfApi(endpoint=self.endpoint or None).file_exists(self.repo_id, name, revision=self.revision)

    def _check_file(self, name: str) -> None:
        """A cached file is checked where it lies; one not cached is read from the Hub by name."""
        if isinstance(self._cached(name), str):
            super()._check_file(name)

    def list_files(self) -> list[str]:
        """The repo's top-level files at the commit: the cached snapshot when offline (what can be
        read then), else the Hub's own listing, without downloading anything."""
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            return super().list_files()
        return sorted(f for f in HfApi(endpoint=self.endpoint or None).list_repo_files(self.repo_id, revision=self.revision) if "/" not in f)

    def header(self, name: str) -> dict[str, TensorInfo]:
        """From the cached file, else by HTTP range requests: the driver never downloads a shard."""
        label = f"{self.spec}/{name}"
        cached = self._cached(name)
        if isinstance(cached, str):
            path, size = local_file(self.spec, cached[: -len(name)].rstrip("/"), name)
            with open(path, "rb") as f:
                return read_header(f, size, label)
        size = self._remote_size(name)
        head = bytes(self._remote([(name, 0, min(8, size))])[0])
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        body = bytes(self._remote([(name, 8, length)])[0]) if 0 < length and 8 + length <= size else b""
        return read_header(io.BytesIO(head + body), size, label)

    def read_tensors(self, wanted: list[tuple[str, TensorInfo]]) -> list[torch.Tensor]:
        """Tensors of files in the Hub cache read from it; the others fetched by concurrent HTTP range
        requests, so a worker moves only its unit's bytes and never fills the cache with whole shards."""
        cached = {name: self._cached(name) for name, _ in wanted}
        local = [i for i, (name, _) in enumerate(wanted) if isinstance(cached[name], str)]
        remote = sorted(set(range(len(wanted))) - set(local))
        views: list = [None] * len(wanted)
        if local:
            got = read_ranges(LocalFileSystem(), [(cached[wanted[i][0]], wanted[i][1].start, wanted[i][1].nbytes)
                                                  for i in local], concurrency=1, range_size=RANGE_SIZE)
            for i, view in zip(local, got):
                views[i] = view
        if remote:
            for i, view in zip(remote, self._remote([(wanted[i][0], wanted[i][1].start, wanted[i][1].nbytes)
                                                    for i in remote])):
                views[i] = view
        return [tensor_from_bytes(info, view) for (_, info), view in zip(wanted, views)]

    def _url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, name, revision=self.revision, endpoint=self.endpoint or None)

    def _remote_size(self, name: str) -> int:
        from huggingface_hub import get_hf_file_metadata

        self._need_online(name)
        return int(get_hf_file_metadata(self._url(name)).size)

    def _remote(self, requests: list[tuple[str, int, int]]) -> list[memoryview]:
        """``(file, start, nbytes)`` ranges of files at the commit, as ranged GETs on the files'
        resolve URLs (the token, if any, goes in the header the Hub library builds, never in a log)."""
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

        for name in {r[0] for r in requests}:
            self._need_online(name)
        headers = build_hf_headers()

        def get(req: tuple[str, int, int]) -> bytes:
            url, start, nbytes = req
            response = http_backoff("GET", url, headers={**headers, "Range": f"bytes={start}-{start + nbytes - 1}"},
                                    follow_redirects=True, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
            hf_raise_for_status(response)
            return response.content

        def fetch(batch: list[tuple[str, int, int]]) -> list:
            with ThreadPoolExecutor(max_workers=min(CONCURRENCY, len(batch))) as pool:
                return list(pool.map(get, batch))

        return read_ranges(None, [(self._url(n), s, b) for n, s, b in requests], concurrency=CONCURRENCY,
                           range_size=RANGE_SIZE, label=lambda url: f"{self.spec}/{url.rsplit('/', 1)[-1]}", fetch=fetch)

    def _need_online(self, name: str) -> None:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise SourceError(f"{self.spec}/{name}: not in the Hub cache, and HF_HUB_OFFLINE is set")


def resolve_hub(spec: str) -> HubSource:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, _, revision = spec.partition("@")
    try:
        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=["config.json"])
    except (RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError, HFValidationError) as exc:
        raise SourceError(f"{spec}: cannot resolve on the Hub or in the local cache ({exc.__class__.__name__})") from None
    commit = os.path.basename(folder.rstrip("/"))
    return HubSource(
        spec=spec, location=Location(folder), identity={"repo_id": repo_id, "revision": revision or "main", "commit": commit},
        repo_id=repo_id, revision=commit, endpoint=constants.ENDPOINT,
    )
