"""A drop-in replacement for ``nn.Linear`` that keeps its weight SINQ-quantized."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import aux8
from .quantize import QuantizedWeight


class SINQLinear(nn.Module):
    """``y = deq(W) @ (scale2 * x) + b``: with 1D tiling the column scale multiplies the
    activations, as the paper does; 2D tiling applies it to the weight. The weight is
    dequantized on each call, in ``compute_dtype``, and never kept in full precision.

    It answers what a model may read of the ``nn.Linear`` it replaces: ``in_features``,
    ``out_features``, ``bias`` and ``weight`` (dequantized on access)."""

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None = None, compute_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.config = weight.config
        self.compute_dtype = compute_dtype
        self.sinkhorn_applied = weight.sinkhorn_applied
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scale2", weight.scale2)
        self._aux_shapes: dict[str, tuple[int, ...]] = {}
        for name in ("scale", "zero"):
            value = getattr(weight, name)
            if isinstance(value, aux8.Aux8):
                self._aux_shapes[name] = value.shape
                for part, t in value.tensors().items():
                    self.register_buffer(f"{name}_{part}", t)
            else:
                self.register_buffer(name, value)
        self.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False) if bias is not None else None

    def quantized_weight(self) -> QuantizedWeight:
        def values(name: str):
            if name in self._aux_shapes:
                parts = [getattr(self, f"{name}_{p}") for p in ("x", "s", "m")]
                return aux8.Aux8(*parts, self._aux_shapes[name])
            return getattr(self, name)

        return QuantizedWeight(self.qweight, values("scale"), values("zero"), self.scale2,
                               (self.out_features, self.in_features), self.config, self.sinkhorn_applied)

    @property
    def weight(self) -> Tensor:
        """The weight as the layer computes with it, ``deq(W) * scale2`` in ``compute_dtype``, made on
        each access: for models that read a Linear's weight outside its forward (Jamba's Mamba mixer
        multiplies by ``dt_proj.weight``, DeepSeek-V3.2's indexer asks ``weights_proj.weight.dtype``),
        which then compute with the quantized weight, as the same quantization applied in memory does."""
        if self.qweight.is_meta:  # a placeholder (a structure check): the shape, dtype and device alone
            return torch.empty((self.out_features, self.in_features), dtype=self.compute_dtype, device="meta")
        return self.quantized_weight().dequantize(self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_meta:  # no values (a structure check): what F.linear would give, at no cost
            if x.shape[-1] != self.in_features:
                raise RuntimeError(f"{type(self).__name__}: input of {x.shape[-1]} features, the layer takes "
                                   f"{self.in_features}")
            return x.new_empty((*x.shape[:-1], self.out_features))
        q = self.quantized_weight()
        h = x.to(self.compute_dtype)
        if self.config.tiling == "1D":
            h = h * self.scale2.reshape(-1).to(self.compute_dtype)
            w = q.dequantize(self.compute_dtype, apply_scale2=False)
        else:
            w = q.dequantize(self.compute_dtype)
        return F.linear(h, w, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{c.method} {c.bits}-bit g{c.group_size} {c.tiling}, compute_dtype={self.compute_dtype}")
