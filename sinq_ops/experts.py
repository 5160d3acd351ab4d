"""Experts modules whose matrices stay SINQ-quantized, one weight per expert.

transformers 5 holds a model's experts as 3-D parameters (``gate_up_proj`` [experts, 2 x
intermediate, hidden], ``down_proj`` [experts, hidden, intermediate]) in one experts module per
layer. ``quantize_experts`` keeps that module, its class and its own forward (Ergo's, which runs
each route through a per-expert norm around the standard product, stays exactly what it is), and
replaces each quantized 3-D parameter by one ``SINQLinear`` per expert:

- ``selected_experts_forward`` computes the standard expert product for the selected experts only,
  from the flags transformers' ``use_experts_implementation`` sets (``has_gate``, ``has_bias``,
  ``is_transposed``, ``has_post_expert_norm``); a loader registers it as an experts implementation,
  so a module's own forward reaches it wherever it would reach the standard product;
- anything else that reads a quantized parameter (a class without those flags, such as Llama 4's,
  which multiplies every expert densely) gets it dequantized, stacked as the module stores it.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .linear import SINQLinear


class SINQExperts:
    """Mixed into the class of an experts module that ``quantize_experts`` turned quantized."""

    sinq_weights: nn.ModuleDict  # parameter name -> one SINQLinear per expert
    sinq_transposed: bool  # the module stores its matrices [in, out]


def quantize_experts(module: nn.Module, weights: dict[str, list[SINQLinear]], *, transposed: bool) -> nn.Module:
    """Make ``module`` compute with ``weights`` in place of its parameters of those names:
    ``weights[name][e]`` computes expert ``e``'s projection ``x -> x W_e^T`` (for a transposed
    parameter, ``x -> x W_e``, the product the module computes with)."""
    for name in weights:
        del module._parameters[name]
    module.sinq_weights = nn.ModuleDict({name: nn.ModuleList(mats) for name, mats in weights.items()})
    module.sinq_transposed = transposed
    module.__class__ = _quantized_class(type(module), tuple(sorted(weights)))
    return module


@functools.cache
def _quantized_class(cls: type, names: tuple[str, ...]) -> type:
    """``cls`` with each of ``names`` a property giving the parameter dequantized, as it is stored."""

    def stacked(name: str) -> property:
        def get(self) -> Tensor:
            w = torch.stack([m.weight for m in self.sinq_weights[name]])
            return w.transpose(1, 2) if self.sinq_transposed else w

        return property(get, doc=f"{name}, dequantized from one SINQLinear per expert on each read")

    return type(f"SINQ{cls.__name__}", (SINQExperts, cls),
                {"__module__": cls.__module__, **{name: stacked(name) for name in names}})


def _project(module: nn.Module, name: str, expert: int, x: Tensor) -> Tensor:
    if name in module.sinq_weights:
        out = module.sinq_weights[name][expert](x)
    else:
        w = module._parameters[name][expert].to(x.dtype)
        out = x @ w if module.sinq_transposed else x @ w.t()
    if module.has_bias:
        out = out + getattr(module, f"{name}_bias")[expert].to(out.dtype)
    return out


def _expert(module: nn.Module, expert: int, x: Tensor) -> Tensor:
    """One expert's output: up (gated), down, and its post-expert norm where the module has one."""
    h = _project(module, "gate_up_proj" if module.has_gate else "up_proj", expert, x)
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    out = _project(module, "down_proj", expert, h)
    return module.post_expert_norm(out) if module.has_post_expert_norm else out


def selected_experts_forward(module: nn.Module, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The standard experts product of a quantized experts module, for the selected experts only:
    each token's output is the sum over its ``top_k_index`` of the weighted expert outputs."""
    final = torch.zeros_like(hidden)
    count = len(next(iter(module.sinq_weights.values())))
    if hidden.is_meta:  # no values to route by (a structure check): expert 0 runs, the others match it
        for name, mats in module.sinq_weights.items():
            odd = next((e for e, m in enumerate(mats) if (m.in_features, m.out_features) !=
                        (mats[0].in_features, mats[0].out_features)), None)
            if odd is not None:
                raise RuntimeError(f"expert {odd}'s {name} is {mats[odd].out_features}x{mats[odd].in_features}, "
                                   f"expert 0's {mats[0].out_features}x{mats[0].in_features}")
        return final + _expert(module, 0, hidden).to(final.dtype)
    for expert in torch.unique(top_k_index).tolist():
        if not 0 <= expert < count:  # expert-parallel sentinels select nothing here
            continue
        tokens, slot = torch.where(top_k_index == expert)
        out = _expert(module, expert, hidden[tokens])
        final.index_add_(0, tokens, (out * top_k_weights[tokens, slot, None]).to(final.dtype))
    return final
