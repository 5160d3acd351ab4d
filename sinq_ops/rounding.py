"""Group-wise rounding of normalised weights: uniform asymmetric codes or NF codebooks.

A group is the last axis of the input (``group_size`` consecutive input weights of one row).
"""

from __future__ import annotations

import torch
from torch import Tensor

# QLoRA's NF4 levels and the 8-level NF3 levels used by SINQ, both on [-1, 1].
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF3_LEVELS = (
    -1.0, -0.5350227355957031, -0.2469314038753510, 0.0,
    0.1833375245332718, 0.3819939494132996, 0.6229856610298157, 1.0,
)
_MIN_RANGE = 1e-4


def codebook(name: str, device: torch.device | str = "cpu") -> Tensor:
    levels = {"nf4": NF4_LEVELS, "nf3": NF3_LEVELS}[name]
    return torch.tensor(levels, dtype=torch.float32, device=device)


def round_uniform(x: Tensor, max_code: int, *, zero_in_range: bool = False,
                  scale_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min/max round-to-nearest: returns (codes uint8, scale, zero) with x ~ (q - zero) * scale.

    ``zero_in_range`` widens each group's range to include 0, so that the zero is itself a code
    (0 <= zero <= max_code): formats that store the zero in as many bits as a code need that.
    ``scale_dtype`` rounds the scale to the dtype it will be stored in before the codes are chosen,
    so the codes are the nearest for the scale a loader will read (bfloat16 keeps 8 bits of it).
    """
    scale, zero = _grid(x, max_code, zero_in_range, scale_dtype)
    codes = torch.round(x / scale + zero).clamp_(0, max_code).to(torch.uint8)
    return codes, scale, zero


def _grid(x: Tensor, max_code: int, zero_in_range: bool, scale_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """Each group's step and zero (``round_uniform``'s arithmetic, shared with ``fake_uniform``)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)  # both faster than one aminmax on the CPU
    if zero_in_range:
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    scale = (hi - lo).clamp_min(_MIN_RANGE) / max_code
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).float()
    return scale, -torch.round(lo / scale)


def fake_uniform(x: Tensor, max_code: int, *, zero_in_range: bool = False, times: Tensor | None = None) -> Tensor:
    """``decode(*round_uniform(x))``, times ``times`` (broadcast over groups), computed in place of
    ``x`` (a float32 tensor the caller gives up): a search that rounds a matrix once per candidate
    keeps one copy of it and never materialises the uint8 codes."""
    scale, zero = _grid(x, max_code, zero_in_range, None)
    out = x.div_(scale).add_(zero).round_().clamp_(0, max_code).sub_(zero)
    return out.mul_(scale if times is None else scale * times)


def round_codebook(x: Tensor, levels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest codebook level after a mean shift: x ~ (levels[q] - zero) * scale."""
    mean = x.mean(-1, keepdim=True)
    scale = (x - mean).abs().amax(-1, keepdim=True).clamp_min(_MIN_RANGE)
    zero = -mean / scale
    normalised = x / scale + zero
    # Levels are sorted, so the nearest one is found from the midpoints; ties go to the lower level.
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize(normalised, midpoints).to(torch.uint8)
    return codes, scale, zero


def decode(codes: Tensor, scale: Tensor, zero: Tensor, levels: Tensor | None) -> Tensor:
    """Inverse of the rounding above, in float32."""
    values = codes.to(torch.float32) if levels is None else levels[codes.long()]
    return (values - zero) * scale
