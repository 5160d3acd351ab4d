"""Tiny random mixtures of experts built with transformers' own classes, one per family.

Each is small enough to quantize and load in seconds on a CPU, and keeps what makes its family
hard: Qwen3-MoE's per-expert tensors (or transformers 5's fused ones), Qwen3-Next's linear
attention and shared expert gate, Mixtral's older module names, DeepSeek-V3's dense first layer,
shared experts and scored router, GLM-4.5's router bias, gpt-oss's transposed, interleaved experts
with biases, and Llama 4's dense expert product and Linear-subclass router.
"""

from __future__ import annotations

from pathlib import Path

import torch

H, I, V = 64, 64, 96  # hidden size, expert width, vocabulary


def _attention(**extra) -> dict:
    return {"vocab_size": V, "hidden_size": H, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
            "max_position_embeddings": 128, **extra}


def configs() -> dict:
    """Family name -> (model class, config) for a two-layer model of four to eight experts."""
    import transformers as tf

    return {
        "qwen3_moe": (tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig(
            **_attention(), intermediate_size=128, moe_intermediate_size=I, num_hidden_layers=2, num_experts=4,
            num_experts_per_tok=2, norm_topk_prob=True)),
        "qwen3_next": (tf.Qwen3NextForCausalLM, tf.Qwen3NextConfig(
            **_attention(), intermediate_size=128, moe_intermediate_size=I, shared_expert_intermediate_size=I,
            num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"],
            linear_num_value_heads=2, linear_num_key_heads=1, linear_key_head_dim=32, linear_value_head_dim=32,
            linear_conv_kernel_dim=4)),
        "mixtral": (tf.MixtralForCausalLM, tf.MixtralConfig(
            **_attention(), intermediate_size=I, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)),
        "deepseek_v3": (tf.DeepseekV3ForCausalLM, tf.DeepseekV3Config(
            vocab_size=V, hidden_size=H, intermediate_size=128, moe_intermediate_size=I, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=64,
            kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, max_position_embeddings=128)),
        "glm4_moe": (tf.Glm4MoeForCausalLM, tf.Glm4MoeConfig(
            **_attention(), intermediate_size=128, moe_intermediate_size=I, num_hidden_layers=2, n_routed_experts=4,
            n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1)),
        "gpt_oss": (tf.GptOssForCausalLM, tf.GptOssConfig(
            **_attention(), intermediate_size=I, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"], sliding_window=16)),
        "llama4": (tf.Llama4ForCausalLM, tf.Llama4TextConfig(
            **_attention(), intermediate_size=I, intermediate_size_mlp=128, num_hidden_layers=2, num_local_experts=4,
            num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layers=[1, 1], attention_chunk_size=64)),
    }


def build(family: str, *, seed: int = 0) -> torch.nn.Module:
    """The family's tiny model, random but the same for the same seed."""
    cls, config = configs()[family]
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # nonzero expert biases, so that a bias applied to the wrong expert shows
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.dim() >= 1 and "experts" in name:
                p.normal_(0, 0.02)
    return model


def save(family: str, out: Path, *, fused: bool = False, seed: int = 0) -> Path:
    """Write the family's tiny model to ``out`` with ``save_pretrained``: the Hub's per-expert layout,
    or with ``fused`` the 3-D expert tensors transformers 5 holds."""
    build(family, seed=seed).save_pretrained(out, save_original_format=not fused)
    return out
