"""Dense architectures whose layers are not plain Linear-and-head: GPT-2's Conv1D (weights stored
[in, out], quantized as the [out, in] transpose the layer computes with) and GPT-NeoX's ``embed_out``
head. Each output loads and computes what the source quantized in memory does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from pipeline.architecture import is_conv1d
from pipeline.job.options import JobOptions
from pipeline.job.run import run_job
from pipeline.loader import load_quantized, load_source
from pipeline.output.layout import SIDECAR_NAME
from sinq_ops import QuantConfig, quantize

CONFIG = QuantConfig(group_size=32)
MODELS = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=2, n_positions=64)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_output_loads_and_computes_the_in_memory_quantized_model(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    MODELS[family]().save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    manifest = run_job(JobOptions.from_settings({"model": str(tmp_path / "src"), "out": str(out), "group_size": 32,
                                                 "workers": 2}), log=lambda _: None, in_process=True)
    leaves = json.loads((out / SIDECAR_NAME).read_text())
    assert len(leaves) == 2 * 4 and manifest["totals"]["tensors_quantized"] == 8
    model = load_source(str(tmp_path / "src"))
    with torch.no_grad():
        for leaf in leaves:
            module = model.get_submodule(leaf)
            w = module.weight.detach()
            conv = is_conv1d(module)
            q = quantize((w.t() if conv else w).contiguous(), **CONFIG.to_dict()).dequantize(torch.float32)
            module.weight.copy_(q.t() if conv else q)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = model(ids).logits, load_quantized(str(out))(ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
    if family == "gpt2":
        assert all(s["shape"][1] == 64 or s["shape"] == [64, 256] for s in manifest["tensors"])  # [out, in]
