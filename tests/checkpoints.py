"""Small Llama-style checkpoints with random weights in the real Hugging Face layout.

Used by the tests and the benchmarks: config.json, tokenizer files, bf16 weights with LLM-like
row/column structure, sharded with an index. The config and the tensor names and shapes are
those ``synthetic://`` sources generate, taken from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.sources.synthetic import llama_config, llama_layer_shapes


def _weight(shape: tuple[int, ...], g: torch.Generator, scale: float = 0.02) -> torch.Tensor:
    w = torch.randn(shape, generator=g, dtype=torch.float32) * scale
    if len(shape) == 2:
        w *= torch.exp(torch.randn(shape[0], 1, generator=g, dtype=torch.float32) * 0.1)
        w *= torch.exp(torch.randn(1, shape[1], generator=g, dtype=torch.float32) * 0.1)
    return w.to(torch.bfloat16)


def llama_tensors(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    t = {"model.embed_tokens.weight": _weight((v, h), g), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
         "lm_head.weight": _weight((v, h), g)}
    for n in range(cfg["num_hidden_layers"]):
        t.update({name: torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else _weight(shape, g)
                  for name, shape in llama_layer_shapes(cfg, n).items()})
    return t


def write_checkpoint(out: Path, cfg: dict, tensors: dict[str, torch.Tensor], shards: int = 2) -> Path:
    """Write ``tensors`` as ``shards`` safetensors files with an index, plus config and tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, out / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    return out


def write_llama_checkpoint(
    out: Path, layers: int = 4, hidden: int = 256, intermediate: int = 512, vocab: int = 512, shards: int = 2, seed: int = 0,
) -> Path:
    cfg = llama_config(layers, hidden, intermediate, vocab)
    return write_checkpoint(Path(out), cfg, llama_tensors(cfg, seed), shards)
