"""A model with its quantized matrices in place: every quantized Linear (or Conv1D) swapped for a
``SINQLinear``, every experts module with quantized matrices for a ``SINQExperts``.

The loader builds it from an output's tensors; the commit check (``pipeline.forward_check``) from
the plan alone, with placeholders, to run its forward pass before anything commits.
"""

from __future__ import annotations

import torch
from torch import nn

from sinq_ops import QuantizedWeight, SINQExperts, SINQLinear

from .architecture import expert_modules, experts_transposed


class IncompleteExperts(ValueError):
    """An experts parameter with quantized matrices for some of its experts only."""


def install(model: nn.Module, weights: dict[str, QuantizedWeight], biases: dict[str, torch.Tensor | None],
            dtype: torch.dtype) -> nn.Module:
    """Swap ``model``'s quantized modules in place. ``weights`` maps each quantized leaf (a Linear's
    module name, or ``<stacked parameter>.<expert>``) to its weight; ``biases`` a Linear's leaf to
    its bias, where it has one."""
    experts = expert_modules(model)
    stacked = {f"{m}.{p}": m for m, module in experts.items() for p, _ in module.named_parameters(recurse=False)}
    per_expert: dict[str, dict[str, dict[int, QuantizedWeight]]] = {}
    for leaf, q in weights.items():
        param, _, number = leaf.rpartition(".")
        if param in stacked and number.isdigit():
            per_expert.setdefault(stacked[param], {}).setdefault(param, {})[int(number)] = q
            continue
        parent, _, child = leaf.rpartition(".")
        setattr(model.get_submodule(parent), child, SINQLinear(q, biases.get(leaf), compute_dtype=dtype))
    for module_name, params in per_expert.items():
        module = experts[module_name]
        mats = {}
        for param, by_expert in params.items():
            count = getattr(module, param.rpartition(".")[2]).shape[0]
            if sorted(by_expert) != list(range(count)):
                missing = min(set(range(count)) - set(by_expert))
                raise IncompleteExperts(f"no quantized matrix for expert {missing} of {param}")
            mats[param.rpartition(".")[2]] = [SINQLinear(by_expert[e], None, compute_dtype=dtype) for e in range(count)]
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent), child, SINQExperts(module, mats, transposed=experts_transposed(module)))
    return model
