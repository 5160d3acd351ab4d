"""S3 multipart uploads with their parts in flight together, and objects assembled server-side.

s3fs's file writer sends one part at a time, so a staged unit or a shard goes up at one
connection's rate. ``ParallelUpload`` keeps up to ``concurrency`` parts in flight (memory: that
many parts), and like every S3 upload the object appears only when the upload completes.

``compose`` builds an object from byte strings and ``Extent``s, ranges of other objects in the
same store: an extent becomes an ``UploadPartCopy`` part, so the store copies the bytes and they
never pass through this process. S3's rules shape the parts (``plan_parts``): every part but the
last holds at least 5 MiB and at most 5 GiB, and an upload has at most 10,000 parts. Bytes that
cannot stand as a part of their own (the safetensors header, a small unit) are sent, topped up
to 5 MiB from the head of the next extent; everything else is copied.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Union

MIN_PART = 5 * 2**20
MAX_PART = 5 * 2**30
MAX_PARTS = 10_000


@dataclass(frozen=True)
class Extent:
    """``nbytes`` bytes at ``start`` of the object ``path`` (a full ``bucket/key`` path)."""

    path: str
    start: int
    nbytes: int


Piece = Union[bytes, Extent]


@dataclass(frozen=True)
class Part:
    """One part of a composed object: a server-side copy of ``copy``, or the bytes of ``send``
    (byte strings, and extents read here) uploaded."""

    nbytes: int
    copy: Extent | None = None
    send: tuple[Piece, ...] = ()


def plan_parts(pieces: list[Piece], min_part: int = MIN_PART, max_part: int = MAX_PART) -> list[Part]:
    """Parts for ``pieces`` in order, every one but the last at least ``min_part`` bytes.

    Example: a 40 KB header, a 300 MB extent and a 2 MB extent give three parts: the header plus
    the extent's first 5 MiB less 40 KB (sent), the rest of the extent (copied), and the 2 MB
    extent (sent, as the last part may be small)."""
    parts: list[Part] = []
    pending: list[Piece] = []
    held = 0

    def flush() -> None:
        nonlocal pending, held
        parts.append(Part(held, send=tuple(pending)))
        pending, held = [], 0

    for piece in pieces:
        if not isinstance(piece, Extent):
            pending.append(bytes(piece))
            held += len(piece)
            continue
        ext = piece
        if held:
            need = max(0, min_part - held)
            if ext.nbytes - need < min_part:  # too little would be left to copy: send it all
                pending.append(ext)
                held += ext.nbytes
                if held >= min_part:
                    flush()
                continue
            if need:
                pending.append(Extent(ext.path, ext.start, need))
                held += need
            flush()
            ext = Extent(ext.path, ext.start + need, ext.nbytes - need)
        if ext.nbytes < min_part:
            pending.append(ext)
            held += ext.nbytes
            continue
        count = -(-ext.nbytes // max_part)
        size = -(-ext.nbytes // count)
        for s in range(ext.start, ext.start + ext.nbytes, size):
            n = min(size, ext.start + ext.nbytes - s)
            parts.append(Part(n, copy=Extent(ext.path, s, n)))
    if pending or not parts:
        flush()
    return parts


def _split(fs, path: str) -> tuple[str, str]:
    """Bucket and key of an s3fs path."""
    bucket, key, _ = fs.split_path(path)
    return bucket, key


async def _bounded(coros: list, limit: int) -> list:
    """The results of ``coros``, at most ``limit`` running at once. If any fails, the first failure is
    raised only once every one has settled: an upload aborted with parts still in flight can keep them."""
    gate = asyncio.Semaphore(max(1, limit))

    async def one(coro):
        async with gate:
            return await coro

    results = await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        raise failed
    return results


def compose(fs, path: str, parts: list[Part], *, concurrency: int) -> int:
    """Write the object ``path`` from ``parts`` as one multipart upload, ``concurrency`` parts in
    flight; returns the bytes sent from here. On any failure the upload is aborted, so nothing
    appears."""
    if len(parts) > MAX_PARTS:
        raise ValueError(f"{path}: {len(parts)} parts, more than S3's {MAX_PARTS}")
    from fsspec.asyn import sync

    bucket, key = _split(fs, path)
    upload = sync(fs.loop, fs._call_s3, "create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    try:
        done = sync(fs.loop, _bounded, [_part(fs, bucket, key, upload, n, part) for n, part in enumerate(parts, 1)],
                    concurrency)
        sync(fs.loop, fs._call_s3, "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload,
             MultipartUpload={"Parts": [etag for etag, _ in done]})
    except BaseException:
        sync(fs.loop, fs._call_s3, "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload)
        raise
    fs.invalidate_cache(path)
    return sum(sent for _, sent in done)


async def _part(fs, bucket: str, key: str, upload: str, number: int, part: Part) -> tuple[dict, int]:
    """Upload or copy one part; returns its entry for the completion and the bytes sent from here.
    A sent part's extents are read only now, so at most the parts in flight are held."""
    if part.copy is not None:
        return await _copy_part(fs, bucket, key, upload, number, part.copy), 0
    chunks = [p if isinstance(p, bytes) else await fs._cat_file(p.path, start=p.start, end=p.start + p.nbytes)
              for p in part.send]
    body = b"".join(chunks)
    if len(body) != part.nbytes:
        raise OSError(f"{bucket}/{key}: part {number} has {len(body)} bytes, planned {part.nbytes}")
    return await _send_part(fs, bucket, key, upload, number, body), len(body)


async def _send_part(fs, bucket: str, key: str, upload: str, number: int, body: bytes) -> dict:
    out = await fs._call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=body)
    return {"PartNumber": number, "ETag": out["ETag"]}


async def _copy_part(fs, bucket: str, key: str, upload: str, number: int, ext: Extent) -> dict:
    src_bucket, src_key = _split(fs, ext.path)
    out = await fs._call_s3("upload_part_copy", Bucket=bucket, Key=key, UploadId=upload, PartNumber=number,
                            CopySource={"Bucket": src_bucket, "Key": src_key},
                            CopySourceRange=f"bytes={ext.start}-{ext.start + ext.nbytes - 1}")
    return {"PartNumber": number, "ETag": out["CopyPartResult"]["ETag"]}


class ParallelUpload:
    """A write-only stream that uploads ``path`` in parts of ``part_size``, up to ``concurrency`` at
    once; small objects go up as one PUT. ``close`` completes the upload, ``discard`` aborts it."""

    def __init__(self, fs, path: str, *, part_size: int, concurrency: int) -> None:
        self.fs, self.path = fs, path
        self.bucket, self.key = _split(fs, path)
        self.part_size, self.concurrency = max(MIN_PART, part_size), max(1, concurrency)
        self.buffer = bytearray()
        self.upload: str | None = None
        self.inflight: list[Future] = []
        self.done: list[dict] = []
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        pos = 0
        if self.buffer:
            pos = min(len(view), self.part_size - len(self.buffer))
            self.buffer += view[:pos]
            if len(self.buffer) < self.part_size:
                return len(view)
            self._submit(bytes(self.buffer))
            self.buffer = bytearray()
        while len(view) - pos >= self.part_size:
            self._submit(bytes(view[pos:pos + self.part_size]))
            pos += self.part_size
        self.buffer += view[pos:]
        return len(view)

    def _submit(self, body: bytes) -> None:
        from fsspec.asyn import sync

        if self.upload is None:
            self.upload = sync(self.fs.loop, self.fs._call_s3, "create_multipart_upload", Bucket=self.bucket,
                               Key=self.key)["UploadId"]
        number = len(self.done) + len(self.inflight) + 1
        coro = _send_part(self.fs, self.bucket, self.key, self.upload, number, body)
        self.inflight.append(asyncio.run_coroutine_threadsafe(coro, self.fs.loop))
        while len(self.inflight) >= self.concurrency:
            self.done.append(self.inflight.pop(0).result())

    def close(self) -> None:
        from fsspec.asyn import sync

        if self.closed:
            return
        if self.upload is None:
            sync(self.fs.loop, self.fs._call_s3, "put_object", Bucket=self.bucket, Key=self.key, Body=bytes(self.buffer))
        else:
            if self.buffer:
                self._submit(bytes(self.buffer))
            self.done += [f.result() for f in self.inflight]
            self.inflight = []
            sync(self.fs.loop, self.fs._call_s3, "complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                 UploadId=self.upload, MultipartUpload={"Parts": sorted(self.done, key=lambda p: p["PartNumber"])})
        self.closed = True
        self.buffer = bytearray()
        self.fs.invalidate_cache(self.path)

    def discard(self) -> None:
        """Abort: wait for the parts in flight, then drop the upload so that nothing appears."""
        from fsspec.asyn import sync

        for f in self.inflight:
            try:
                f.result()
            except Exception:  # the upload is abandoned whatever its parts did
                pass
        self.inflight, self.buffer, self.closed = [], bytearray(), True
        if self.upload is not None:
            sync(self.fs.loop, self.fs._call_s3, "abort_multipart_upload", Bucket=self.bucket, Key=self.key,
                 UploadId=self.upload)
