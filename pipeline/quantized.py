"""A model with its quantized matrices in place: every quantized Linear (or Conv1D) swapped for a
``SINQLinear``, every experts module with quantized matrices for a ``SINQExperts``.

The loader builds it from an output's tensors; the commit check builds it from the plan alone,
with placeholders on the meta device, and runs its forward pass, so that a model that reads
something of a Linear its quantized form does not give fails the job instead of committing.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from sinq_ops import QuantConfig, QuantizedWeight, SINQExperts, SINQLinear

from .architecture import empty_model, expert_modules, experts_transposed


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


def forward_problem(model_config: dict, leaves: dict[str, tuple[int, int]], config: QuantConfig) -> str | None:
    """The first error of the output model's forward pass, as ``"<module>: <error>"``, or None.

    The model ``model_config`` describes is built on the meta device with ``leaves`` (leaf ->
    [out, in] as quantized) swapped for quantized placeholders, and run on a few meta tokens: no
    tensor data is read or computed, so it costs the same for a 70B model as for a tiny one, and it
    fails wherever the model reaches for something a quantized module does not have."""
    model = empty_model(model_config)
    weights = {leaf: QuantizedWeight.placeholder(shape, config) for leaf, shape in leaves.items()}
    biases = {}
    for leaf in weights:
        try:
            module = model.get_submodule(leaf)
        except AttributeError:
            continue
        biases[leaf] = getattr(module, "bias", None)
    install(model, weights, biases, torch.float32)
    if callable(getattr(model, "set_experts_implementation", None)) and expert_modules(model):
        model.set_experts_implementation("batched_mm")  # experts left in full precision: no data-dependent loop
    model.to("meta")
    running: list[str] = []  # the modules whose forward is under way, innermost last
    names = {m: n for n, m in model.named_modules()}

    def enter(module: nn.Module, _args) -> None:
        running.append(names[module])

    def leave(module: nn.Module, _args, _out) -> None:
        running.pop()

    hooks = [h for m in names for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        # Fake tensors: transformers takes the paths it keeps for tracing (torch.export) and checks no values.
        with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()), torch.no_grad():
            model(input_ids=torch.zeros(1, 4, dtype=torch.long, device="meta"), use_cache=False)
    except Exception as exc:  # noqa: BLE001 - whatever the forward raises is the reason not to commit
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{running[-1] if running else type(model).__name__}: {type(exc).__name__}: {text}"
    finally:
        for h in hooks:
            h.remove()
    return None
