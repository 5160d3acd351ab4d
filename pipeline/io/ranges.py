"""Byte ranges of one file fetched as many requests in flight at once.

An object store serves each connection at a fixed rate (tens of MB/s on S3, less over a long
path) and scales with connections, so a tensor read as one GET runs at one connection's rate
however fast the network is. Here the ranges a unit needs are joined where they nearly touch
(fewer requests for a layer's many small norms), cut into pieces of at most ``range_size`` and
fetched with ``concurrency`` in flight at every moment (on an asynchronous filesystem such as
s3fs a new request starts as each one ends), and the pieces are copied into one writable buffer
per joined range. Memory: the ranges' own bytes plus at most ``concurrency`` pieces in flight.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem

# Ranges closer than this are fetched as one: a request's latency costs more than the gap's bytes.
MAX_GAP = 256 * 1024


@dataclass(frozen=True)
class Span:
    """A run of the file fetched as one buffer, and the requested ranges inside it."""

    start: int
    nbytes: int
    members: tuple[int, ...]  # indexes into the requested ranges


def spans(ranges: list[tuple[int, int]], max_gap: int = MAX_GAP) -> list[Span]:
    """The requested ``(start, nbytes)`` ranges grouped into runs: sorted, and joined where the gap
    between neighbours is at most ``max_gap`` (overlapping ranges share a run)."""
    order = sorted((i for i, (_, n) in enumerate(ranges) if n > 0), key=lambda i: ranges[i][0])
    out: list[Span] = []
    start = end = 0
    members: list[int] = []
    for i in order:
        s, n = ranges[i]
        if members and s - end <= max_gap:
            end = max(end, s + n)
            members.append(i)
            continue
        if members:
            out.append(Span(start, end - start, tuple(members)))
        start, end, members = s, s + n, [i]
    if members:
        out.append(Span(start, end - start, tuple(members)))
    return out


def pieces(span: Span, range_size: int) -> list[tuple[int, int]]:
    """``span`` cut into ``(start, nbytes)`` requests of at most ``range_size`` bytes."""
    return [(s, min(range_size, span.start + span.nbytes - s)) for s in range(span.start, span.start + span.nbytes, range_size)]


def read_ranges(
    fs: fsspec.AbstractFileSystem | None, requests: list[tuple[str, int, int]], *, concurrency: int, range_size: int,
    label: Callable[[str], str] = str, max_gap: int = MAX_GAP,
    fetch: Callable[[list[tuple[str, int, int]]], list] | None = None,
) -> list[memoryview]:
    """The bytes of each ``(path, start, nbytes)`` request, as writable views (a tensor can be built
    on one without a copy), all files' pieces in flight together. A range the file does not hold in
    full fails naming ``label(path)``. ``fetch`` replaces ``fs`` for a store fsspec does not reach:
    it gets a batch of requests and returns their bytes (or exceptions) in order."""
    groups: list[tuple[str, Span, list[int]]] = []
    by_path: dict[str, list[int]] = {}
    for i, (path, _, _) in enumerate(requests):
        by_path.setdefault(path, []).append(i)
    for path, idx in by_path.items():
        for g in spans([requests[i][1:] for i in idx], max_gap):
            groups.append((path, g, [idx[m] for m in g.members]))
    buffers = [bytearray(g.nbytes) for _, g, _ in groups]
    work = [(gi, s, n) for gi, (_, g, _) in enumerate(groups) for s, n in pieces(g, range_size)]
    step = max(1, concurrency)
    if fetch is None and getattr(fs, "async_impl", False):
        from fsspec.asyn import sync

        sync(fs.loop, _fill, fs, groups, buffers, work, step, label)
        work = []
    for first in range(0, len(work), step):
        batch = work[first:first + step]
        batch_requests = [(groups[gi][0], s, n) for gi, s, n in batch]
        got = fetch(batch_requests) if fetch is not None else _fetch(fs, batch_requests, concurrency)
        for (gi, s, n), data in zip(batch, got):
            path, g, _ = groups[gi]
            if isinstance(data, BaseException):
                raise data
            if len(data) != n:
                raise OSError(f"{label(path)}: short read at offset {s} ({len(data)} of {n} bytes)")
            buffers[gi][s - g.start:s - g.start + n] = data
    out: list[memoryview] = [memoryview(bytearray())] * len(requests)
    for (_, g, members), buf in zip(groups, buffers):
        view = memoryview(buf)
        for i in members:
            _, s, n = requests[i]
            out[i] = view[s - g.start:s - g.start + n]
    return out


async def _fill(fs, groups: list, buffers: list[bytearray], work: list[tuple[int, int, int]], limit: int,
                label: Callable[[str], str]) -> None:
    """Every piece of ``work`` fetched on an asynchronous filesystem, ``limit`` in flight at any
    moment (a new one starts as soon as one ends), each copied into its buffer as it lands."""
    gate = asyncio.Semaphore(limit)

    async def one(gi: int, s: int, n: int) -> None:
        path, g, _ = groups[gi]
        async with gate:
            data = await fs._cat_file(path, start=s, end=s + n)
        if len(data) != n:
            raise OSError(f"{label(path)}: short read at offset {s} ({len(data)} of {n} bytes)")
        buffers[gi][s - g.start:s - g.start + n] = data

    await asyncio.gather(*(one(*w) for w in work))


def _fetch(fs: fsspec.AbstractFileSystem, batch: list[tuple[str, int, int]], concurrency: int) -> list:
    """One batch of requests, all in flight together: positioned reads locally, else threads."""
    if isinstance(fs, LocalFileSystem):
        out = []
        for path, s, n in batch:
            with open(path, "rb", buffering=0) as f:
                out.append(os.pread(f.fileno(), n, s))
        return out
    with ThreadPoolExecutor(max_workers=min(concurrency, len(batch))) as pool:
        return list(pool.map(lambda r: fs.cat_file(r[0], start=r[1], end=r[1] + r[2]), batch))
