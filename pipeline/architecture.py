"""The model a config.json describes, built by transformers on the meta device.

The planner checks against it that the output will load and compute what the source does:
every quantized weight must be a ``torch.nn.Linear`` of the model (not a router, a fused expert
tensor or a transposed Conv1D, which the loader's ``SINQLinear`` would replace or misread), every
checkpoint tensor must have a place in it, and every parameter a tensor. It also gives the buffers
a model computes from its config (rotary frequencies and the like: checkpoints do not store them,
but the reference loader insists on finding every buffer of the model it builds, so the output
carries them). The loader builds the model it fills here too. Parameters take no memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class ArchitectureError(ValueError):
    """transformers cannot build the model that config.json describes."""


def empty_model(model_config: dict) -> nn.Module:
    """The ``AutoModelForCausalLM`` of ``model_config`` with its parameters on the meta device."""
    import transformers
    from accelerate import init_empty_weights

    cfg = {k: v for k, v in model_config.items() if k != "quantization_config"}
    config = transformers.AutoConfig.for_model(**cfg)
    with init_empty_weights(include_buffers=False):
        return transformers.AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class ModelLayout:
    """What a checkpoint must hold for the model to load from it."""

    class_name: str
    linear_weights: dict[str, tuple[int, ...]]  # weight name of every nn.Linear -> [out, in]
    places: frozenset[str]  # every parameter and buffer name, shared (tied) ones under each name
    parameter_groups: tuple[tuple[str, ...], ...]  # the names of each parameter, tied ones together
    buffers: dict[str, torch.Tensor]


def model_layout(model_config: dict) -> ModelLayout:
    """The layout of the model in ``model_config``; ``ArchitectureError`` if transformers cannot
    build it (an unknown ``model_type``, a config that names no causal LM)."""
    try:
        model = empty_model(model_config)
    except (ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArchitectureError(f"transformers cannot build a causal LM from config.json ({text})") from None
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # as the loader does: a tied head needs no tensor of its own
    linear = {f"{name}.weight": tuple(m.weight.shape) for name, m in model.named_modules()
              if type(m) is nn.Linear}
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    buffers = {name: b.detach().cpu().contiguous() for name, b in model.named_buffers() if b is not None}
    places = frozenset(n for names in groups.values() for n in names) | frozenset(buffers)
    return ModelLayout(type(model).__name__, linear, places, tuple(tuple(g) for g in groups.values()), buffers)


def model_buffers(model_config: dict) -> dict[str, torch.Tensor]:
    """Buffer name -> tensor for the architecture in ``model_config``."""
    return model_layout(model_config).buffers
