"""8-bit storage of group scales and zeros (the reference's "quantAux" format).

Values are viewed as ``[tile, -1]`` and each column gets its own min and step:
``value ~ codes * step + offset``. The reference uses tiles of 32 for scales and one tile
spanning the whole tensor for zeros. ``step`` and ``offset`` are kept in float32 (a few
bytes per 32 groups): at 8 bits, fp16 there would cost about 3% of reconstruction error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SCALE_TILE = 32


@dataclass
class Aux8:
    codes: Tensor  # uint8 [tile, n]
    step: Tensor  # float32 [1, n]
    offset: Tensor  # float32 [1, n]
    shape: tuple[int, ...]

    def values(self) -> Tensor:
        """The stored values in float32, in their logical shape."""
        return (self.codes.float() * self.step.float() + self.offset.float()).reshape(self.shape)

    def tensors(self) -> dict[str, Tensor]:
        return {"x": self.codes, "s": self.step, "m": self.offset}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def scale_tile(numel: int) -> int:
    """32 where it divides the element count (always, for the reference's own checkpoints).

    Otherwise the largest divisor below 32; the reference loader reads any tile height.
    """
    return next(t for t in range(min(SCALE_TILE, numel), 0, -1) if numel % t == 0)


def encode(values: Tensor, tile: int) -> Aux8:
    """Round ``values`` (float32) to 8 bits per column of a ``[tile, -1]`` view."""
    x = values.reshape(tile, -1)
    lo = x.amin(0, keepdim=True)
    span = x - lo
    step = span.amax(0, keepdim=True) / 255
    # A column whose values are all equal has step 0: its codes are 0 and the offset is exact.
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round(span / safe).clamp_(0, 255).to(torch.uint8)
    return Aux8(codes, step, lo, tuple(values.shape))
