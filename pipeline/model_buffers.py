"""Buffers a model computes from its config (rotary frequencies and the like).

Checkpoints do not store them, but the reference loader insists on finding every buffer of
the model it builds, so the output carries them. They come from transformers building the
architecture on the meta device (parameters take no memory; buffers are computed for real).
"""

from __future__ import annotations

import torch


def model_buffers(model_config: dict) -> dict[str, torch.Tensor]:
    """Buffer name -> tensor for the architecture in ``model_config``; empty if transformers
    does not know the architecture."""
    import transformers
    from accelerate import init_empty_weights

    cfg = {k: v for k, v in model_config.items() if k != "quantization_config"}
    try:
        config = transformers.AutoConfig.for_model(**cfg)
        with init_empty_weights(include_buffers=False):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError, ImportError):
        return {}
    return {name: b.detach().cpu().contiguous() for name, b in model.named_buffers() if b is not None}
