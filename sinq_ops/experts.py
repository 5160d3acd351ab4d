"""A mixture-of-experts module whose expert matrices stay SINQ-quantized, one weight per expert.

transformers 5 holds a model's experts as 3-D parameters (``gate_up_proj`` [experts, 2 x
intermediate, hidden], ``down_proj`` [experts, hidden, intermediate]) in one experts module per
layer. ``SINQExperts`` takes that module's place: it keeps the module (its activation, gate
function, biases and flags) and replaces each quantized 3-D parameter by one ``SINQLinear`` per
expert, which dequantizes only when that expert is selected.

Most experts classes are described by transformers' ``use_experts_implementation`` flags
(``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``), which every one of
its experts implementations computes from; this module computes the same from them, for the
selected experts only. A class without those flags (Llama 4's, which multiplies every expert
densely) gets its own forward, run on the dequantized parameters.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from .linear import SINQLinear


class SINQExperts(nn.Module):
    """``experts`` with the parameters named in ``weights`` quantized: ``weights[name][e]`` computes
    expert ``e``'s projection ``x -> x W_e^T`` (for a transposed parameter, ``x -> x W_e``, the
    product the module computes with). Parameters not named stay ``experts``' own."""

    def __init__(self, experts: nn.Module, weights: dict[str, list[SINQLinear]], *, transposed: bool) -> None:
        super().__init__()
        for name in weights:
            del experts._parameters[name]
        self.inner = experts
        self.weights = nn.ModuleDict({name: nn.ModuleList(mats) for name, mats in weights.items()})
        self.transposed = transposed
        self.num_experts = len(next(iter(weights.values())))
        self._flags = all(hasattr(experts, f) for f in ("has_gate", "has_bias", "has_post_expert_norm"))
        forward = type(experts).forward
        self._signature = inspect.signature(getattr(forward, "__wrapped__", forward))

    def _project(self, name: str, expert: int, x: Tensor) -> Tensor:
        if name in self.weights:
            out = self.weights[name][expert](x)
        else:
            w = getattr(self.inner, name)[expert].to(x.dtype)
            out = x @ w if self.transposed else x @ w.t()
        if self.inner.has_bias:
            out = out + getattr(self.inner, f"{name}_bias")[expert].to(out.dtype)
        return out

    def forward(self, *args, **kwargs):
        if not self._flags:
            return self._dense_forward(*args, **kwargs)
        hidden, index, weights = list(self._signature.bind(self.inner, *args, **kwargs).arguments.values())[1:4]
        inner = self.inner
        up = "gate_up_proj" if inner.has_gate else "up_proj"
        final = torch.zeros_like(hidden)
        if hidden.is_meta:  # no values to route by (a structure check): expert 0 runs, the others match it
            for name, mats in self.weights.items():
                odd = next((e for e, m in enumerate(mats) if (m.in_features, m.out_features) !=
                            (mats[0].in_features, mats[0].out_features)), None)
                if odd is not None:
                    raise RuntimeError(f"expert {odd}'s {name} is {mats[odd].out_features}x{mats[odd].in_features}, "
                                       f"expert 0's {mats[0].out_features}x{mats[0].in_features}")
            h = self._project(up, 0, hidden)
            out = self._project("down_proj", 0, inner._apply_gate(h) if inner.has_gate else inner.act_fn(h))
            return final + (inner.post_expert_norm(out) if inner.has_post_expert_norm else out).to(final.dtype)
        for expert in torch.unique(index).tolist():
            if not 0 <= expert < self.num_experts:  # expert-parallel sentinels select nothing here
                continue
            tokens, slot = torch.where(index == expert)
            h = self._project(up, expert, hidden[tokens])
            h = inner._apply_gate(h) if inner.has_gate else inner.act_fn(h)
            out = self._project("down_proj", expert, h)
            if inner.has_post_expert_norm:
                out = inner.post_expert_norm(out)
            final.index_add_(0, tokens, (out * weights[tokens, slot, None]).to(final.dtype))
        return final

    def _dense_forward(self, *args, **kwargs):
        """The module's own forward, on its parameters dequantized for the duration of the call."""
        for name, mats in self.weights.items():
            w = torch.stack([m.weight for m in mats])
            setattr(self.inner, name, w.transpose(1, 2) if self.transposed else w)
        try:
            return self.inner(*args, **kwargs)
        finally:
            for name in self.weights:
                delattr(self.inner, name)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, quantized={sorted(self.weights)}, transposed={self.transposed}"
