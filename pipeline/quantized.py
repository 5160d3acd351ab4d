"""A model with its quantized matrices in place: every quantized Linear (or Conv1D) swapped for a
``SINQLinear``; every experts module with quantized matrices made a ``SINQExperts`` (its own class and
forward, one ``SINQLinear`` per expert, the standard expert product routed to the selected experts
through transformers' own experts-implementation dispatch).

The loader builds it from an output's tensors; the commit check (``pipeline.forward_check``) from
the plan alone, with placeholders, to run its forward pass before anything commits.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sinq_ops import QuantizedWeight, SINQLinear
from sinq_ops.experts import SINQExperts, quantize_experts, selected_experts_forward

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
        quantize_experts(module, mats, transposed=experts_transposed(module))
        if all(hasattr(module, f) for f in ("has_gate", "has_bias", "has_post_expert_norm", "config")):
            # The module's forward asks its config which experts implementation to run: its own copy
            # names this one, so the module's own code (and any subclass wrapping it) stays as it is.
            module.config = copy.copy(module.config)
            module.config._experts_implementation_internal = _implementation()
    _share_tied(model)
    return model


def _share_tied(model: nn.Module) -> None:
    """A module whose parameters are tied to quantized ones (Zamba's shared block, repeated through its
    layers; an encoder's experts shared with a decoder's) becomes that same quantized module, as the
    tie made them one parameter in memory, when it holds no tensor of its own. Ties that this makes
    hold are left out of transformers' own tying (which would look for a parameter)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}

    def owner(name: str) -> tuple[str, nn.Module | None, str]:
        module_name, _, attr = name.rpartition(".")
        try:
            return module_name, model.get_submodule(module_name), attr
        except AttributeError:
            return module_name, None, attr

    for target, source in list(tied.items()):
        owners = [owner(target), owner(source)]
        if any(m is None for _, m, _ in owners):
            continue
        quantized = [isinstance(m, SINQLinear) or (isinstance(m, SINQExperts) and a in m.sinq_weights)
                     for _, m, a in owners]
        if quantized[0] == quantized[1]:
            continue
        (_, module, _), (other_name, other, _) = owners if quantized[0] else owners[::-1]
        same_kind = type(other) in type(module).__mro__ or (isinstance(module, SINQLinear) and hasattr(other, "weight"))
        if same_kind and all(p.is_meta for p in other.parameters()):
            parent, _, child = other_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)
    for target, source in list(tied.items()):
        (_, a, attr_a), (_, b, attr_b) = owner(target), owner(source)
        if a is not None and a is b and attr_a == attr_b:
            del tied[target]


_IMPLEMENTATION = "sinq"


def _implementation() -> str:
    """The name under which transformers' experts interface runs ``selected_experts_forward``."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if _IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(_IMPLEMENTATION, selected_experts_forward)
    return _IMPLEMENTATION
