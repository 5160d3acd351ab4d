"""Source weights stored in FP8, turned back into the float weights they stand for.

Releases such as DeepSeek-V3/R1 and the Qwen3 ``-FP8`` checkpoints store each Linear weight as
``float8_e4m3fn`` (or ``e5m2``) with a float32 ``weight_scale_inv``: one per block of rows and
columns (128 x 128 usually, the blocks at the right and bottom edges cut short), one per row, or
one for the whole tensor. The true weight is ``W[i, j] = Q[i, j] * scale_inv[i // bm, j // bn]``.
SINQ quantizes that true weight, and its error is measured against it: quantizing the raw codes
would leave every scale out, thousands of times off for some blocks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[int, ...] | None:
    """The block-scale shape a weight of ``shape`` needs (``None`` without a block size: one scale
    per tensor or per row is accepted then)."""
    if block is None:
        return None
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def dequantize_fp8(weight: Tensor, scale_inv: Tensor, block: tuple[int, int] | None) -> Tensor:
    """The float32 weight that FP8 ``weight`` and its ``scale_inv`` encode.

    ``block`` (rows, columns) is the scale block size; without it ``scale_inv`` holds one value, or
    one per row (``[rows]`` or ``[rows, 1]``). Leading dimensions (stacked experts) are carried
    through. Raises ``ValueError`` naming the shapes when the scale does not fit the weight.
    """
    if weight.dtype not in FP8_DTYPES:
        raise ValueError(f"weight is {weight.dtype}, not an FP8 type")
    w = weight.to(torch.float32)
    s = scale_inv.to(torch.float32)
    rows, cols = w.shape[-2:]
    if block is not None:
        want = fp8_scale_shape(tuple(w.shape), block)
        if tuple(s.shape) != want:
            raise ValueError(f"block scales of shape {list(s.shape)} do not fit a weight of shape "
                             f"{list(w.shape)} in {block[0]}x{block[1]} blocks (need {list(want)})")
        s = s.repeat_interleave(block[0], dim=-2)[..., :rows, :]
        return w * s.repeat_interleave(block[1], dim=-1)[..., :cols]
    if s.numel() == 1:
        return w * s.reshape(())
    if s.numel() == math.prod(w.shape[:-1]):
        return w * s.reshape(*w.shape[:-1], 1)
    raise ValueError(f"scales of shape {list(s.shape)} fit a weight of shape {list(w.shape)} neither per "
                     "tensor nor per row, and the source names no block size")
