"""Source weights stored in FP8 or MXFP4, turned back into the float weights they stand for.

Releases such as DeepSeek-V3/R1 and the Qwen3 ``-FP8`` checkpoints store each Linear weight as
``float8_e4m3fn`` (or ``e5m2``) with a float32 ``weight_scale_inv``: one per block of rows and
columns (128 x 128 usually, the blocks at the right and bottom edges cut short), one per row, or
one for the whole tensor. The true weight is ``W[i, j] = Q[i, j] * scale_inv[i // bm, j // bn]``.
SINQ quantizes that true weight, and its error is measured against it: quantizing the raw codes
would leave every scale out, thousands of times off for some blocks.

gpt-oss ships its experts in MXFP4 (the OCP microscaling format): ``X_blocks`` holds e2m1 codes two
to a byte (the low nibble first) for 32 consecutive weights of a row, ``X_scales`` one e8m0 exponent
per 32 (``2 ** (s - 127)``). A block's weights are ``code_value * 2 ** (s - 127)``.
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


# The 16 values of an e2m1 code: sign, two exponent bits, one mantissa bit.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32


def mxfp4_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The weight an MXFP4 ``[..., rows, groups, 16]`` code tensor holds: ``[..., rows, groups * 32]``."""
    *lead, rows, groups, pairs = blocks_shape
    return (*lead, rows, groups * 2 * pairs)


def dequantize_mxfp4(blocks: Tensor, scales: Tensor) -> Tensor:
    """The float32 weight ``[..., rows, groups * 32]`` that MXFP4 ``blocks`` ``[..., rows, groups, 16]``
    (uint8, two codes a byte) and ``scales`` ``[..., rows, groups]`` (uint8 e8m0) encode. Raises
    ``ValueError`` naming the shapes when they do not fit each other."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, not {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 3 or tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] * 2 != MXFP4_BLOCK:
        raise ValueError(f"MXFP4 blocks of shape {list(blocks.shape)} and scales of shape {list(scales.shape)} "
                         f"do not fit each other ({MXFP4_BLOCK} weights a scale)")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).to(torch.int64)  # low nibble first
    values = table[codes].reshape(*blocks.shape[:-1], MXFP4_BLOCK)
    values = torch.ldexp(values, scales.to(torch.int32).sub(127).unsqueeze(-1).to(torch.float32))
    return values.reshape(mxfp4_shape(tuple(blocks.shape)))
