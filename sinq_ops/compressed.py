"""A quantized weight in compressed-tensors' ``pack-quantized`` layout, the one vLLM and SGLang serve.

Per Linear ``X``: ``X.weight_packed`` int32 ``[out, in * bits / 32]`` (codes along the input axis,
the first in the lowest bits), ``X.weight_scale`` ``[out, in / g]`` in the model's dtype,
``X.weight_zero_point`` int32 ``[out * bits / 32, in / g]`` (zeros packed along the output axis)
and ``X.weight_shape`` int64 ``[2]``. compressed-tensors stores signed values with an offset of
``2 ** (bits - 1)`` added before packing; SINQ's unsigned codes and integer zeros are those packed
values already, so they carry over bit for bit: ``W = (Q - Z) * S``.

There is no place for SINQ's column scale: a weight goes out in this layout only after its column
scale has been folded into the tensors that produce its input (``sinq_ops.columns``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import packing
from .config import QuantConfig, check_servable
from .quantize import QuantizedWeight, _values

SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def pack_int32(values: Tensor, bits: int, dim: int) -> Tensor:
    """Unsigned ``values`` (< 2**bits) of a 2-D tensor packed ``32 // bits`` to an int32 along ``dim``,
    the first in the lowest bits; the packed axis is padded with zeros to a whole word."""
    per = 32 // bits
    v = values.to(torch.int64)
    if dim == 0:
        v = v.t()
    rows, cols = v.shape
    words = -(-cols // per)
    v = torch.nn.functional.pad(v, (0, words * per - cols)).reshape(rows, words, per)
    shifts = torch.arange(per, dtype=torch.int64, device=v.device) * bits
    packed = (v << shifts).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.t().contiguous() if dim == 0 else packed


def unpack_int32(packed: Tensor, bits: int, dim: int, size: int) -> Tensor:
    """Inverse of :func:`pack_int32`: ``size`` unsigned values along ``dim``, as uint8."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed values must be int32, got {packed.dtype}")
    per = 32 // bits
    p = packed.t() if dim == 0 else packed
    shifts = torch.arange(per, dtype=torch.int64, device=p.device) * bits
    values = (p.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    values = values.reshape(p.shape[0], -1)[:, :size].to(torch.uint8)
    return values.t().contiguous() if dim == 0 else values


def layout(shape: tuple[int, int], config: QuantConfig, scale_dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Dtype and shape of each tensor :func:`to_compressed` gives for a weight of ``shape``, by suffix."""
    n, k = shape
    per = 32 // config.bits
    return {
        "weight_packed": (torch.int32, (n, -(-k // per))),
        "weight_scale": (scale_dtype, (n, k // config.group_size)),
        "weight_zero_point": (torch.int32, (-(-n // per), k // config.group_size)),
        "weight_shape": (torch.int64, (2,)),
    }


def to_compressed(q: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, Tensor]:
    """``q``'s codes, group scales and zeros in the ``pack-quantized`` layout, by suffix.

    ``q.scale2`` is left out on purpose: the caller has folded it into the model's other tensors.
    Raises ``ValueError`` when a zero is not a code (quantize with ``zero_in_range``)."""
    check_servable(q.config)
    n, k = q.shape
    g = q.config.group_size
    codes = packing.unpack(q.qweight, q.config.bits, n * k // g).reshape(n, k)
    zero = _values(q.zero).reshape(n, k // g)
    if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() > q.config.max_code:
        raise ValueError("group zeros must be codes (0..2**bits-1) for compressed-tensors; quantize with zero_in_range")
    scale = _values(q.scale).reshape(n, k // g).to(scale_dtype)
    return {
        "weight_packed": pack_int32(codes, q.config.bits, 1),
        "weight_scale": scale.contiguous(),
        "weight_zero_point": pack_int32(zero.to(torch.uint8), q.config.bits, 0),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }


def from_compressed(tensors: dict[str, Tensor], config: QuantConfig) -> QuantizedWeight:
    """The quantized weight the ``pack-quantized`` tensors (by suffix) hold, with a column scale of
    ones: it computes what a serving engine computes from them."""
    check_servable(config)
    n, k = (int(d) for d in tensors["weight_shape"].tolist())
    want = layout((n, k), config, tensors["weight_scale"].dtype)
    for suffix, (dtype, shape) in want.items():
        t = tensors[suffix]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{suffix} is {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)} for a "
                             f"{n}x{k} weight")
    g = config.group_size
    codes = unpack_int32(tensors["weight_packed"], config.bits, 1, k)
    zero = unpack_int32(tensors["weight_zero_point"], config.bits, 0, n)
    qweight = packing.pack(codes.reshape(-1, g), config.bits)
    return QuantizedWeight(qweight, tensors["weight_scale"].reshape(-1, 1), zero.reshape(-1, 1).to(torch.float16),
                           torch.ones(1, k, dtype=torch.float16), (n, k), config)


def cat_rows(parts: list[dict[str, Tensor]], bits: int) -> dict[str, Tensor]:
    """The ``pack-quantized`` tensors (by suffix) of the matrix whose row blocks ``parts`` hold, in
    order: a checkpoint's per-expert gate and up projections as the one matrix a model stacks them in.
    Codes are packed along the input axis, so their rows join as they are; zeros are packed along
    the output axis, so they are unpacked first."""
    shapes = [[int(d) for d in p["weight_shape"].tolist()] for p in parts]
    if len({k for _, k in shapes}) != 1:
        raise ValueError(f"row blocks of one matrix need one in_features: {shapes}")
    zeros = [unpack_int32(p["weight_zero_point"], bits, 0, n) for p, (n, _) in zip(parts, shapes)]
    return {
        "weight_packed": torch.cat([p["weight_packed"] for p in parts]),
        "weight_scale": torch.cat([p["weight_scale"] for p in parts]),
        "weight_zero_point": pack_int32(torch.cat(zeros), bits, 0),
        "weight_shape": torch.tensor([sum(n for n, _ in shapes), shapes[0][1]], dtype=torch.int64),
    }
