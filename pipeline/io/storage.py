"""fsspec filesystems for sources and destinations: local paths, s3:// and other URLs.

Credentials are never passed through here: s3fs finds them in the standard AWS settings
(environment, profiles, instance roles) on whichever machine does the reading or writing.
Only non-secret options (endpoint, profile name) travel with a location.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

import fsspec
from fsspec.core import url_to_fs

from .multipart import MAX_PARTS, Extent, ParallelUpload, compose, plan_parts
from .ranges import read_ranges

# Marks a local file still being written; it gets its final name only once complete.
PARTIAL = ".partial-"


class NoConditionalWrites(ValueError):
    """The store offers no exclusive create or conditional replace (only local paths and s3:// do)."""


@dataclass(frozen=True)
class StorageOptions:
    """Non-secret settings for object storage; secrets stay in the environment."""

    endpoint_url: str | None = None
    profile: str | None = None
    part_size: int = 16 * 1024 * 1024  # object-store uploads above this go up in parts of this size
    max_attempts: int = 10  # per request, with exponential backoff, for throttling and server errors
    # Requests in flight at once per transfer (a unit's ranged reads, an upload's parts, a shard's
    # copies), and the size of each ranged read: a store scales with connections, not with one.
    concurrency: int = 16
    range_size: int = 8 * 1024 * 1024
    # Every shard byte streamed through the reducer, instead of the store copying the staged units
    # into place (S3 UploadPartCopy, a local copy_file_range): for a store that cannot.
    stream_assembly: bool = False

    def __post_init__(self) -> None:
        for name, low in (("concurrency", 1), ("range_size", 64 * 1024), ("part_size", 5 * 1024 * 1024),
                          ("max_attempts", 1)):
            if getattr(self, name) < low:
                flag = "--upload-part-size" if name == "part_size" else "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be at least {low}, got {getattr(self, name)}")

    def for_protocol(self, protocol: str) -> dict:
        if protocol not in ("s3", "s3a"):
            return {}
        opts: dict = {}
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        if self.profile:
            opts["profile"] = self.profile
        # botocore's pool holds 10 connections by default, which would cap every transfer at 10
        # requests in flight; a worker may read one unit and upload another at once.
        opts["config_kwargs"] = {"retries": {"max_attempts": self.max_attempts, "mode": "standard"},
                                 "max_pool_connections": 2 * self.concurrency + 4}
        return opts


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def open_fs(url: str, options: StorageOptions) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(url, **options.for_protocol(_protocol(url)))


def _described(operation: str):
    """A ``Location`` method whose object-store failures name the operation and the URL: a store's
    own message is often a bare "Forbidden". Not-found and exists errors pass as they are (callers
    turn them into their own lines), as do local ones, which name their path already."""
    def wrap(method):
        @functools.wraps(method)
        def described(self: "Location", name: str = "", *args, **kwargs):
            try:
                return method(self, name, *args, **kwargs)
            except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError):
                raise
            except OSError as exc:
                where = f"{self.url}/{name}" if name else self.url
                if self.is_local or where in str(exc):
                    raise
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                try:
                    renamed = type(exc)(f"{operation} {where}: {text}")
                except Exception:  # noqa: BLE001 - a subclass with its own constructor
                    renamed = OSError(f"{operation} {where}: {text}")
                raise renamed from exc
        return described
    return wrap


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

    @_described("checking")
    def exists(self, name: str) -> bool:
        fs, root = self._fs()
        return fs.exists(f"{root}/{name}")

    @_described("reading the size of")
    def size(self, name: str) -> int:
        fs, root = self._fs()
        return int(fs.size(f"{root}/{name}"))

    @_described("reading the details of")
    def info(self, name: str) -> dict:
        fs, root = self._fs()
        return fs.info(f"{root}/{name}")

    @_described("reading")
    def read_bytes(self, name: str) -> bytes:
        fs, root = self._fs()
        return fs.cat_file(f"{root}/{name}")

    def read_range(self, name: str, start: int, nbytes: int) -> bytes:
        return bytes(self.read_ranges(name, [(start, nbytes)])[0])

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[memoryview]:
        """The bytes of each ``(start, nbytes)`` range of ``name`` (``read_many``)."""
        return self.read_many([(name, s, n) for s, n in ranges])

    def read_many(self, requests: list[tuple[str, int, int]]) -> list[memoryview]:
        """The bytes of each ``(name, start, nbytes)`` request, fetched as concurrent requests of at
        most ``range_size`` bytes, ``concurrency`` in flight (``pipeline.io.ranges``)."""
        fs, root = self._fs()
        return read_ranges(fs, [(f"{root}/{n}", s, b) for n, s, b in requests], concurrency=self.options.concurrency,
                           range_size=self.options.range_size,
                           label=lambda path: f"{self.url}/{path[len(root) + 1:]}")

    def sha256(self, name: str) -> str:
        """Streamed sha256 of a file, without holding it in memory."""
        return self.digests(name, [])[0]

    def digests(self, name: str, cuts: list[int]) -> tuple[str, list[str]]:
        """The sha256 of the whole file and of each segment between the offsets ``cuts`` (sorted,
        inside the file), from one pass of concurrent ranged reads: what checks that a file
        assembled by the store holds the bytes it was given."""
        size = self.size(name)
        bounds = [0, *cuts, size]
        whole = hashlib.sha256()
        segments = [hashlib.sha256() for _ in bounds[1:]]
        window = self.options.concurrency * self.options.range_size
        seg = 0
        for start in range(0, size, window):
            [block] = self.read_ranges(name, [(start, min(window, size - start))])
            pos = start
            while pos < start + len(block):
                while bounds[seg + 1] <= pos:
                    seg += 1
                end = min(bounds[seg + 1], start + len(block))
                piece = block[pos - start:end - start]
                whole.update(piece)
                segments[seg].update(piece)
                pos = end
        return whole.hexdigest(), [d.hexdigest() for d in segments[:len(cuts) + 1]] if cuts else []

    @_described("listing")
    def list(self, prefix: str = "") -> list[str]:
        """Names of files directly under ``prefix`` (relative to this location)."""
        fs, root = self._fs()
        base = f"{root}/{prefix}".rstrip("/")
        if not fs.exists(base):
            return []
        fs.invalidate_cache(base)
        return sorted(p["name"].rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=True) if p["type"] == "file")

    @_described("removing")
    def remove(self, name: str, recursive: bool = False) -> None:
        fs, root = self._fs()
        path = f"{root}/{name}"
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

    @_described("creating")
    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Write ``name`` only if it does not exist yet, atomically; False if it already did.

        Local files are hard-linked into place; S3 takes a conditional PUT (``If-None-Match: *``).
        Stores answer a lost race with 412 Precondition Failed, some (SeaweedFS) without saying which
        condition failed, and AWS with 409 ConditionalRequestConflict when the racers overlap."""
        fs, root = self._fs()
        path = f"{root}/{name}"
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}{PARTIAL}{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)  # fails if the name exists; the content is whole the moment it appears
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
            return True
        self._need_s3("exclusive creation")
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True

    @_described("reading")
    def read_tagged(self, name: str) -> tuple[bytes, str] | None:
        """The bytes of ``name`` and a tag that changes whenever it is rewritten (the S3 ETag, a local
        file's sha256); None when it does not exist."""
        fs, root = self._fs()
        path = f"{root}/{name}"
        if self.is_local:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None
            return data, hashlib.sha256(data).hexdigest()
        self._need_s3("tagged reads")
        from fsspec.asyn import sync

        bucket, key, _ = fs.split_path(path)
        try:
            out = sync(fs.loop, fs._call_s3, "get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        body = out["Body"]
        try:
            data = sync(fs.loop, body.read)
        finally:
            body.close()
        return data, out["ETag"]

    @_described("replacing")
    def replace_if(self, name: str, data: bytes | None, tag: str) -> bool:
        """Replace ``name`` with ``data`` (or remove it, for None) only while it still has ``tag``
        (``read_tagged``); False when it changed or went. On S3 a PUT or DELETE with ``If-Match``;
        locally the check and the change run under an flock on the file itself, and a racer that
        waited for it finds the name pointing at another file."""
        fs, root = self._fs()
        path = f"{root}/{name}"
        if self.is_local:
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                return False
            with f:
                fcntl.flock(f, fcntl.LOCK_EX)  # held until the change is made: racers queue here
                try:
                    same_file = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
                except FileNotFoundError:
                    return False
                if not same_file or hashlib.sha256(f.read()).hexdigest() != tag:
                    return False
                if data is None:
                    os.remove(path)
                else:
                    self.write_bytes(name, data)  # a new file renamed over this one: a racer's check then fails
                return True
        self._need_s3("conditional writes")
        from fsspec.asyn import sync

        bucket, key, _ = fs.split_path(path)
        try:
            if data is None:
                sync(fs.loop, fs._call_s3, "delete_object", Bucket=bucket, Key=key, IfMatch=tag)
            else:
                sync(fs.loop, fs._call_s3, "put_object", Bucket=bucket, Key=key, Body=data, IfMatch=tag)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        finally:
            fs.invalidate_cache(path)
        return True

    def _need_s3(self, what: str) -> None:
        if _protocol(self.url) not in ("s3", "s3a"):
            raise NoConditionalWrites(f"{self.url}: {what} needs a local path or s3://")

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
    def open_write(self, name: str, size: int | None = None) -> Iterator[BinaryIO]:
        """A stream whose file appears, whole, only when the block ends without error.

        ``size``, when known, lets an object-store upload cut parts small enough to keep
        ``concurrency`` of them in flight (never under S3's 5 MiB): a 25 MB unit goes up as five
        parts at once, not as two of 16 MiB."""
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
        if _protocol(self.url) in ("s3", "s3a"):
            part = self.options.part_size if size is None else min(self.options.part_size,
                                                                    -(-size // self.options.concurrency))
            f = ParallelUpload(fs, path, part_size=part, concurrency=self.options.concurrency)
        else:
            f = fs.open(path, "wb", block_size=self.options.part_size)
        try:
            yield f
        except BaseException:
            f.discard()
            f.closed = True  # otherwise garbage collection would close it, committing the part written
            raise
        try:
            f.close()
        except BaseException:  # a last part or the completion failed: abort, so no open upload is left
            f.discard()
            f.closed = True
            raise
        fs.invalidate_cache(path)

    def compose(self, name: str, pieces: list[bytes | tuple[str, int, int]]) -> int:
        """Write ``name`` from ``pieces``: byte strings, and ``(other, start, nbytes)`` ranges of other
        files at this location. Returns how many bytes passed through this process.

        Unless ``stream_assembly``, the ranges never do: on S3 they become ``UploadPartCopy`` parts
        (``pipeline.io.multipart``), on a local filesystem ``os.copy_file_range`` (a reflink or an
        in-kernel copy). Elsewhere, or with it, they are read and streamed. Either way the file
        appears whole or not at all."""
        fs, root = self._fs()
        protocol = _protocol(self.url)
        if not self.options.stream_assembly and protocol in ("s3", "s3a"):
            parts = plan_parts([p if isinstance(p, bytes) else Extent(f"{root}/{p[0]}", p[1], p[2]) for p in pieces])
            if len(parts) <= MAX_PARTS:
                return compose(fs, f"{root}/{name}", parts, concurrency=self.options.concurrency)
        sent = 0
        with self.open_write(name) as f:
            for piece in pieces:
                if isinstance(piece, bytes):
                    f.write(piece)
                    sent += len(piece)
                elif self.is_local and not self.options.stream_assembly:
                    _copy_local(f, f"{root}/{piece[0]}", piece[1], piece[2])
                else:
                    for start in range(piece[1], piece[1] + piece[2], self.options.range_size * self.options.concurrency):
                        block = self.read_range(piece[0], start, min(self.options.range_size * self.options.concurrency,
                                                                     piece[1] + piece[2] - start))
                        f.write(block)
                        sent += len(block)
        return sent


def _copy_local(f: BinaryIO, source: str, start: int, nbytes: int) -> None:
    """Append ``nbytes`` of ``source`` from ``start`` to the open file ``f``, in the kernel where it can."""
    f.flush()
    pos = f.tell()
    with open(source, "rb") as src:
        done = 0
        try:
            while done < nbytes:
                n = os.copy_file_range(src.fileno(), f.fileno(), nbytes - done, start + done, pos + done)
                if n == 0:
                    raise OSError(f"{source}: ends before offset {start + nbytes}")
                done += n
        except (AttributeError, OSError) as exc:  # no copy_file_range here, or not across these filesystems
            if isinstance(exc, OSError) and exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                                               errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            src.seek(start + done)
            f.seek(pos + done)
            while done < nbytes:
                block = src.read(min(16 * 1024 * 1024, nbytes - done))
                if not block:
                    raise OSError(f"{source}: ends before offset {start + nbytes}") from None
                f.write(block)
                done += len(block)
    f.seek(pos + nbytes)


def _precondition_failed(exc: BaseException) -> bool:
    """Whether the store refused a conditional write: 412 Precondition Failed, or 409
    ConditionalRequestConflict for a racing one (s3fs keeps the botocore error as the cause)."""
    while exc is not None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and (
                response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict")
                or response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
