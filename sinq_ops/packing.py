"""Bit packing of code rows in the reference's serialized layout.

Codes arrive as ``[rows, group]``. A packed word holds ``per_word`` codes taken from
``per_word`` equal slices of the (zero-padded) row axis, most significant slice first.
Padding rows are dropped again on unpacking, and the reference's loader drops them too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Packing:
    name: str
    bits: int
    per_word: int
    dtype: torch.dtype


PACKINGS = {
    8: Packing("8bit_u8", 8, 1, torch.uint8),
    6: Packing("6bit_32", 6, 5, torch.int32),
    5: Packing("5bit_32", 5, 6, torch.int32),
    4: Packing("4bit_u8", 4, 2, torch.uint8),
    3: Packing("3bit_32", 3, 10, torch.int32),
    2: Packing("2bit_u8", 2, 4, torch.uint8),
}


def packed_rows(rows: int, bits: int) -> int:
    per = PACKINGS[bits].per_word
    return -(-rows // per)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes ``[rows, group]`` into the reference layout for ``bits``."""
    spec = PACKINGS[bits]
    rows, group = codes.shape
    step = packed_rows(rows, bits)
    wide = torch.int32 if spec.dtype == torch.int32 else torch.uint8
    padded = torch.zeros(step * spec.per_word, group, dtype=wide, device=codes.device)
    padded[:rows] = codes
    slices = padded.view(spec.per_word, step, group)
    out = torch.zeros(step, group, dtype=wide, device=codes.device)
    for i in range(spec.per_word):
        out |= slices[i] << (spec.bits * (spec.per_word - 1 - i))
    return out


def unpack(packed: Tensor, bits: int, rows: int) -> Tensor:
    """Inverse of :func:`pack`: uint8 codes ``[rows, group]``."""
    spec = PACKINGS[bits]
    if packed.dtype != spec.dtype:
        raise ValueError(f"packed codes for {bits}-bit must be {spec.dtype}, got {packed.dtype}")
    mask = (1 << spec.bits) - 1
    parts = [((packed >> (spec.bits * (spec.per_word - 1 - i))) & mask).to(torch.uint8) for i in range(spec.per_word)]
    return torch.cat(parts, 0)[:rows]
