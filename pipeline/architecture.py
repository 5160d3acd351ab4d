"""The model a config.json describes, built by transformers on the meta device.

The planner takes from it the buffers a model computes from its config (rotary frequencies
and the like: checkpoints do not store them, but the reference loader insists on finding every
buffer of the model it builds, so the output carries them); the loader builds the model it
fills. Parameters take no memory; buffers are computed for real.
"""

from __future__ import annotations

import torch
from torch import nn


def empty_model(model_config: dict) -> nn.Module:
    """The ``AutoModelForCausalLM`` of ``model_config`` with its parameters on the meta device."""
    import transformers
    from accelerate import init_empty_weights

    cfg = {k: v for k, v in model_config.items() if k != "quantization_config"}
    config = transformers.AutoConfig.for_model(**cfg)
    with init_empty_weights(include_buffers=False):
        return transformers.AutoModelForCausalLM.from_config(config)


def model_buffers(model_config: dict) -> dict[str, torch.Tensor]:
    """Buffer name -> tensor for the architecture in ``model_config``; empty if transformers
    does not know the architecture."""
    try:
        model = empty_model(model_config)
    except (ValueError, KeyError, TypeError, AttributeError, ImportError):
        return {}
    return {name: b.detach().cpu().contiguous() for name, b in model.named_buffers() if b is not None}
