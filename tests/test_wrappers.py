"""Vision-language wrappers (Qwen2.5-VL, Gemma 3 multimodal): only the language model's decoder
layers are quantized unless asked, the vision tower is kept byte for byte, and ``load_quantized``
builds the class config.json names (Llama 4's mixture of experts included), whose text logits equal
the same model quantized in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.job.options import JobOptions
from pipeline.job.run import run_job
from pipeline.loader import load_quantized, load_source
from pipeline.output.layout import SIDECAR_NAME
from pipeline_checks import read_dir_tensors
from test_moe import _in_memory

TEXT = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _config(family: str):
    import transformers as tf

    if family == "llama4":
        return tf.Llama4Config(
            text_config={**TEXT, "intermediate_size": 64, "intermediate_size_mlp": 128, "head_dim": 32,
                         "num_local_experts": 4, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1,
                         "no_rope_layers": [1, 1], "attention_chunk_size": 64},
            vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                               image_size=28, patch_size=14, vision_output_dim=64, projector_input_dim=64,
                               projector_output_dim=64, pixel_shuffle_ratio=0.5))
    if family == "qwen2_5_vl":
        return tf.Qwen2_5_VLConfig(
            text_config={**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}},
            vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
                               fullatt_block_indexes=[1]))
    return tf.Gemma3Config(
        text_config={**TEXT, "head_dim": 32, "sliding_window": 16},
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "llama4"])
def test_wrapper_keeps_its_vision_tower_and_loads_as_the_class_it_names(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(_config(family))
    model.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    run_job(JobOptions.from_settings({"model": str(tmp_path / "src"), "out": str(out), "group_size": 32,
                                      "workers": 2}), log=lambda _: None, in_process=True)
    leaves = json.loads((out / SIDECAR_NAME).read_text())
    assert len(leaves) >= 2 * 7 and all("language_model." in leaf for leaf in leaves)
    written = read_dir_tensors(out)
    vision = [n for n in written if n.startswith(("model.visual.", "model.vision_tower.", "vision_model."))]
    assert vision and not any(n.endswith(".W_q") for n in vision)

    loaded = load_quantized(str(out))
    assert type(loaded).__name__ == type(model).__name__
    source = load_source(str(tmp_path / "src"))
    values = dict(source.named_parameters()) | dict(source.named_buffers())
    for name in vision:  # kept exactly: the float model's own values, under the model's names
        assert torch.equal(written[name].float(), values[name].detach().float()), name
    quantized = _in_memory(tmp_path / "src", sorted(leaves))
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # Llama 4's wrapper fails on text alone in transformers 5.24 (its output has no image_outputs),
        # float model and all; its language model, a Llama4ForCausalLM inside the wrapper, is what runs then.
        text = (lambda m: m.language_model) if family == "llama4" else (lambda m: m)
        want, got = text(quantized)(input_ids=ids).logits, text(loaded)(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()

    towers = tmp_path / "towers"
    run_job(JobOptions.from_settings({"model": str(tmp_path / "src"), "out": str(towers), "group_size": 32,
                                      "workers": 2, "include_towers": True}), log=lambda _: None, in_process=True)
    more = json.loads((towers / SIDECAR_NAME).read_text())
    assert set(leaves) < set(more) and any(n.startswith(("model.visual.", "model.vision_tower.", "vision_model.")) for n in more)
    load_quantized(str(towers))
