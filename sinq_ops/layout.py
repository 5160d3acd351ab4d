"""The tensors a quantized weight is stored as, known from its shape and config alone.

Lets a planner size an output, and a loader check one, before any weight is quantized.
"""

from __future__ import annotations

import torch

from . import aux8, packing
from .config import QuantConfig


def quantized_layout(shape: tuple[int, int], config: QuantConfig) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Dtype and shape of every tensor :meth:`QuantizedWeight.to_state_dict` produces, by key suffix.

    Lets a planner size the output before anything is quantized.
    """
    n, k = shape
    g = config.group_size
    groups = n * k // g
    spec = packing.PACKINGS[config.bits]
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {"W_q": (spec.dtype, (packing.packed_rows(groups, config.bits), g))}
    out["meta.scale2"] = (torch.float16, (1, k) if config.tiling == "1D" else (groups // g, 1, g))
    if config.aux == "int8":
        tile = aux8.scale_tile(groups)
        out.update({
            "meta.scale.x": (torch.uint8, (tile, groups // tile)),
            "meta.scale.s": (torch.float32, (1, groups // tile)),
            "meta.scale.m": (torch.float32, (1, groups // tile)),
            "meta.zero.x": (torch.uint8, (groups, 1)),
            "meta.zero.s": (torch.float32, (1, 1)),
            "meta.zero.m": (torch.float32, (1, 1)),
        })
    else:
        group_shape = (groups, 1) if config.tiling == "1D" else (groups // g, g, 1)
        out.update({"meta.scale": (torch.float16, group_shape), "meta.zero": (torch.float16, group_shape)})
    return out
