"""Safetensors headers and byte layout, for range reads and streamed writes.

The ``safetensors`` package reads and writes whole files held in memory or on local disk;
here a header is parsed from the first bytes of any file-like object, so one tensor can be
fetched by byte range from object storage, and a file is written as a stream of tensors so
a multi-GB shard never sits in memory.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that cannot be trusted; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def read_header(f: BinaryIO, file_size: int, label: str) -> dict[str, TensorInfo]:
    """Parse and check the header of a safetensors file of ``file_size`` bytes."""
    head = f.read(8)
    if len(head) < 8:
        raise SafetensorsError(f"{label}: truncated safetensors file ({file_size} bytes)")
    (length,) = struct.unpack("<Q", head)
    if 8 + length > file_size:
        raise SafetensorsError(f"{label}: header length {length} exceeds the file size {file_size}")
    if length > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{label}: header of {length} bytes, over the {MAX_HEADER_BYTES // 2**20} MiB cap for "
                               "a safetensors header")
    try:
        raw = json.loads(f.read(length), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SafetensorsError(f"{label}: header is not valid JSON ({exc.__class__.__name__})") from None
    except _DuplicateKey as exc:
        raise SafetensorsError(f"{label}: tensor {exc.args[0]!r} is named twice in the header") from None
    if not isinstance(raw, dict):
        raise SafetensorsError(f"{label}: header is not a JSON object")
    raw.pop("__metadata__", None)
    base = 8 + length
    infos = [_tensor_info(label, name, entry, base) for name, entry in raw.items()]
    _check_coverage(label, infos, file_size - base, base)
    return {t.name: t for t in infos}


def _tensor_info(label: str, name: str, entry: object, base: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise SafetensorsError(f"{label}: tensor {name!r} has a malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise SafetensorsError(f"{label}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise SafetensorsError(f"{label}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{label}: tensor {name!r} has invalid data offsets {offsets!r}")
    info = TensorInfo(name, dtype, tuple(shape), base + offsets[0], offsets[1] - offsets[0])
    numel = 1
    for d in shape:
        numel *= d
    if numel * info.itemsize != info.nbytes:
        raise SafetensorsError(
            f"{label}: tensor {name!r} of shape {list(shape)} {dtype} needs {numel * info.itemsize} bytes, "
            f"its offsets span {info.nbytes}"
        )
    return info


def _check_coverage(label: str, infos: list[TensorInfo], data_bytes: int, base: int) -> None:
    pos = base
    last = None
    for t in sorted(infos, key=lambda t: (t.start, t.nbytes)):
        if t.start != pos:
            what = "overlaps another tensor" if t.start < pos else "leaves a gap before it"
            raise SafetensorsError(f"{label}: tensor {t.name!r} {what} (offset {t.start - base})")
        pos += t.nbytes
        last = t.name
    if pos - base != data_bytes:
        if pos - base > data_bytes:
            raise SafetensorsError(f"{label}: tensor data runs past the end of the file (in tensor {last!r})")
        raise SafetensorsError(f"{label}: {data_bytes - (pos - base)} bytes after the last tensor ({last!r})")


def tensor_from_bytes(info: TensorInfo, data: bytes | bytearray | memoryview) -> torch.Tensor:
    if len(data) != info.nbytes:
        raise SafetensorsError(f"tensor {info.name!r}: read {len(data)} bytes, expected {info.nbytes}")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    # A writable buffer (a ranged read's) is used in place; read-only bytes are copied once.
    buf = data if isinstance(data, (bytearray, memoryview)) and not memoryview(data).readonly else bytearray(data)
    return torch.frombuffer(buf, dtype=info.torch_dtype).reshape(info.shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy where possible."""
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to be written: its bytes come later, from ``fetch``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.dtype.itemsize


def aligned_order(tensors: Iterable[PlannedTensor]) -> list[PlannedTensor]:
    """Largest item size first, otherwise in the given order: every tensor lands aligned."""
    items = list(tensors)
    return sorted(items, key=lambda t: -t.dtype.itemsize)


def grouped_order(groups: Iterable[Iterable[PlannedTensor]]) -> list[PlannedTensor] | None:
    """The tensors group after group, each group in ``aligned_order``, when every tensor then still
    lands aligned to its item size; else None. A shard laid out this way holds each unit's staged
    bytes as one contiguous run, which the store can copy whole."""
    out: list[PlannedTensor] = []
    pos = 0
    for group in groups:
        for t in aligned_order(group):
            if pos % t.dtype.itemsize:
                return None
            out.append(t)
            pos += t.nbytes
    return out


def header_bytes(tensors: list[PlannedTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the JSON header for ``tensors`` laid out in the given order."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    pos = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_stream(
    out: BinaryIO, tensors: list[PlannedTensor], chunks: Iterable[bytes | memoryview],
    on_write: Callable[[bytes | memoryview], None] | None = None,
) -> int:
    """Write a safetensors file: the header for ``tensors``, then their bytes as ``chunks``
    (in the same order, split anyhow). Returns the bytes written."""
    head = header_bytes(tensors)
    data = 0
    out.write(head)
    if on_write is not None:
        on_write(head)
    for chunk in chunks:
        out.write(chunk)
        if on_write is not None:
            on_write(chunk)
        data += len(chunk)
    want = sum(t.nbytes for t in tensors)
    if data != want:
        raise SafetensorsError(f"got {data} bytes of tensor data, expected {want}")
    return len(head) + data
