"""fsspec filesystems for sources and destinations: local paths, s3:// and other URLs.

Credentials are never passed through here: s3fs finds them in the standard AWS settings
(environment, profiles, instance roles) on whichever machine does the reading or writing.
Only non-secret options (endpoint, profile name) travel with a location.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

import fsspec
from fsspec.core import url_to_fs

# Marks a local file still being written; it gets its final name only once complete.
PARTIAL = ".partial-"


@dataclass(frozen=True)
class StorageOptions:
    """Non-secret settings for object storage; secrets stay in the environment."""

    endpoint_url: str | None = None
    profile: str | None = None
    part_size: int = 64 * 1024 * 1024  # object-store uploads above this go up in parts of this size
    max_attempts: int = 10  # per request, with exponential backoff, for throttling and server errors

    def for_protocol(self, protocol: str) -> dict:
        if protocol not in ("s3", "s3a"):
            return {}
        opts: dict = {}
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        if self.profile:
            opts["profile"] = self.profile
        opts["config_kwargs"] = {"retries": {"max_attempts": self.max_attempts, "mode": "standard"}}
        return opts


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def open_fs(url: str, options: StorageOptions) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(url, **options.for_protocol(_protocol(url)))


@dataclass
class Location:
    """A directory-like place (local or object storage) addressed by relative names."""

    url: str
    options: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        if "://" not in self.url:
            self.url = os.path.abspath(os.path.expanduser(self.url))
        self.url = self.url.rstrip("/")

    @property
    def is_local(self) -> bool:
        return _protocol(self.url) == "file"

    def _fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return open_fs(self.url, self.options)

    def path(self, name: str) -> str:
        return f"{self._fs()[1]}/{name}"

    def child(self, name: str) -> "Location":
        return Location(f"{self.url}/{name}", self.options)

    def exists(self, name: str) -> bool:
        fs, root = self._fs()
        return fs.exists(f"{root}/{name}")

    def size(self, name: str) -> int:
        fs, root = self._fs()
        return int(fs.size(f"{root}/{name}"))

    def info(self, name: str) -> dict:
        fs, root = self._fs()
        return fs.info(f"{root}/{name}")

    def read_bytes(self, name: str) -> bytes:
        fs, root = self._fs()
        return fs.cat_file(f"{root}/{name}")

    def read_range(self, name: str, start: int, nbytes: int) -> bytes:
        if nbytes == 0:
            return b""
        fs, root = self._fs()
        data = fs.cat_file(f"{root}/{name}", start=start, end=start + nbytes)
        if len(data) != nbytes:
            raise OSError(f"{self.url}/{name}: short read at offset {start} ({len(data)} of {nbytes} bytes)")
        return data

    def sha256(self, name: str, chunk: int = 16 * 1024 * 1024) -> str:
        """Streamed sha256 of a file, without holding it in memory."""
        fs, root = self._fs()
        digest = hashlib.sha256()
        with fs.open(f"{root}/{name}", "rb", block_size=chunk) as f:
            while block := f.read(chunk):
                digest.update(block)
        return digest.hexdigest()

    def list(self, prefix: str = "") -> list[str]:
        """Names of files directly under ``prefix`` (relative to this location)."""
        fs, root = self._fs()
        base = f"{root}/{prefix}".rstrip("/")
        if not fs.exists(base):
            return []
        fs.invalidate_cache(base)
        return sorted(p["name"].rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=True) if p["type"] == "file")

    def remove(self, name: str, recursive: bool = False) -> None:
        fs, root = self._fs()
        path = f"{root}/{name}"
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Write ``name`` only if it does not exist yet, atomically; False if it already did.

        Local files use O_EXCL; S3 uses a conditional PUT (If-None-Match: *)."""
        fs, root = self._fs()
        path = f"{root}/{name}"
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                with open(path, "xb") as f:
                    f.write(data)
            except FileExistsError:
                return False
            return True
        if _protocol(self.url) not in ("s3", "s3a"):
            raise ValueError(f"{self.url}: exclusive creation needs a local path or s3://")
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def remove_partials(self) -> None:
        """Remove the unfinished files that writers killed mid-write left directly under this location.

        Only local writes leave any: an object store never shows an upload that did not complete.
        """
        if not self.is_local:
            return
        for name in self.list():
            if PARTIAL in name:
                self.remove(name)

    def remove_empty_dir(self, name: str) -> None:
        """Local directories only: object stores have no empty directories to leave behind."""
        path = self.path(name)
        if self.is_local and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open_write(name) as f:
            f.write(data)

    @contextmanager
    def open_write(self, name: str) -> Iterator[BinaryIO]:
        """A stream whose file appears, whole, only when the block ends without error."""
        fs, root = self._fs()
        path = f"{root}/{name}"
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}{PARTIAL}{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return
        f = fs.open(path, "wb", block_size=self.options.part_size)
        try:
            yield f
        except BaseException:
            f.discard()
            f.closed = True  # otherwise garbage collection would close it, committing the part written
            raise
        f.close()
        fs.invalidate_cache(path)
