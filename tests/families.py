"""Tiny random models of every decoder family transformers registers, built generically.

The quantizer must cope with whatever layout a family has (fused projections, 3-D expert tensors,
Conv1D, linear attention, Mamba mixers, vision towers, ...), and new families arrive with every
transformers release. Hand-writing one tiny config per family does not scale and goes stale, so this
module starts from each family's own default config (``CONFIG_MAPPING[model_type]()``), shrinks every
size its fields name, recursively through sub-configs, and builds the model with the class the auto
mapping names. Short tables (``_INIT``, ``_OVERRIDES``) cover the few families the generic rule
cannot, mostly default configs that describe no usable model (the Hub checkpoints set the field).

Sizes are chosen for a quantizer with group size 32: hidden 64, MLP 128, head_dim 32, 2 heads and
1 KV head (2 when the family is multi-head), 4 experts with 2 per token and expert width 64, LoRA
ranks 32, vocabulary 256, and 2 decoder layers, or the fewest layers that keep every kind of layer a
hybrid family has (attention, Mamba, linear attention, dense-before-MoE, ...).
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

CAUSAL_LM, IMAGE_TEXT_TO_TEXT = "causal-lm", "image-text-to-text"
HIDDEN, FFN, EXPERT_FFN, HEAD_DIM, VOCAB = 64, 128, 64, 32, 256
EXPERTS, TOP_K, RANK, LAYERS, MAX_POSITIONS = 4, 2, 32, 2, 512
IMAGE, PATCH = 32, 8
_SPECIAL_FLOOR = VOCAB - 64  # special token ids at or above this are remapped into [VOCAB - 64, VOCAB)


# ---------------------------------------------------------------------------------------------
# Registry


@cache
def _mappings() -> tuple[dict[str, str], dict[str, str]]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), dict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


@cache
def _all_registered() -> dict[str, str]:
    causal, image_text = _mappings()
    return {t: (CAUSAL_LM if t in causal else IMAGE_TEXT_TO_TEXT) for t in sorted(set(causal) | set(image_text))}


@cache
def skipped() -> dict[str, str]:
    """model_type -> why it is left out: families whose default config is encoder-decoder (BART,
    Whisper, ...). They have a causal-LM class (a decoder alone) but are not decoder-only models, and
    the quantizer's layer walk targets decoder-only stacks."""
    from transformers import CONFIG_MAPPING

    out = {}
    for model_type in _all_registered():
        try:
            encoder_decoder = bool(getattr(CONFIG_MAPPING[model_type](), "is_encoder_decoder", False))
        except Exception:  # a config that cannot even be defaulted is reported by build(), not here
            encoder_decoder = False
        if encoder_decoder:
            out[model_type] = "encoder-decoder config (is_encoder_decoder=True)"
    return out


def registered() -> dict[str, str]:
    """model_type -> "causal-lm" or "image-text-to-text" for every decoder-only family in transformers'
    auto mappings. A type in both is recorded as causal-lm: its causal-LM class is the language model
    alone, which is what the quantizer walks. Encoder-decoder families are in ``skipped()``."""
    skip = skipped()
    return {t: kind for t, kind in _all_registered().items() if t not in skip}


def model_class(model_type: str) -> type:
    """The transformers class the auto mapping names for the family (causal-LM mapping first)."""
    import transformers

    causal, image_text = _mappings()
    name = causal.get(model_type) or image_text[model_type]
    if not hasattr(transformers, name):
        raise RuntimeError(f"transformers has no class {name} (missing optional dependency?)")
    return getattr(transformers, name)


# ---------------------------------------------------------------------------------------------
# Generic shrinking of a config dict


def _rule(key: str, value: int) -> int | None:
    """The tiny value for integer field ``key`` (None: leave it), by what its name says it sizes.
    Only ever shrinks, so small defaults (3 image channels, kernel 4) stay."""
    k = key.lower()

    def cap(target: int) -> int:
        return min(value, target)

    if k.endswith("token_id") or k.endswith("token_index") or k.endswith("_id") or "token_ids" in k:
        return None  # token ids are handled by _remap_token_ids
    if re.search(r"(^|_)(vocab_size|vocab_size_per_layer_input|unpadded_vocab_size|group_vocab)$", k):
        return cap(VOCAB)
    if k in ("additional_vocab_size",):
        return cap(16)
    # mixture of experts
    if re.search(r"(num_experts|n_routed_experts|num_local_experts|moe_num_experts|n_experts|num_routed_experts)$", k):
        return cap(EXPERTS)
    if re.search(r"(num_experts_per_tok|num_experts_per_token|moe_topk|moe_k|^top_k|n_experts_per_tok|"
                 r"num_selected_experts|experts_per_token|top_k_experts)$", k):
        return cap(TOP_K)
    if re.search(r"(n_shared_experts|num_shared_experts|zero_expert_num)$", k):
        return cap(1)
    if k in ("n_group", "num_expert_group"):
        return cap(2)
    if k == "topk_group":
        return cap(1)
    if re.search(r"(moe_intermediate_size|expert_ffn_hidden_size|shared_expert_intermediate_size|"
                 r"shared_experts_intermediate_size|moe_hidden_size|share_expert_dim|expert_intermediate_size|"
                 r"moe_shared_expert_intermediate_size|shared_intermediate_size)$", k):
        return cap(EXPERT_FFN)
    # low ranks
    if re.search(r"(lora_rank|_rank|lowrank)$", k) and "time_step" not in k and "dt" not in k:
        return cap(RANK)
    # head dims (MLA: nope + rope = 32, v = 32)
    if k == "rotary_dim":  # partial rotary (GPT-J, CodeGen): half the head
        return cap(HEAD_DIM // 2)
    if k == "codebook_dim":  # audio tokenizers tie it to their hidden size
        return cap(HIDDEN)
    if "channel" in k and not re.search(r"(num_channels|in_channels|audio_channels|input_channels)$", k):
        return cap(32)  # convolutional towers: VQ tokenizers, SAM necks, audio subsamplers
    if k in ("time_step_rank", "dt_rank", "mamba_dt_rank"):  # Mamba's dt projection input
        return cap(RANK)
    if k == "o_groups":  # grouped output projection (DeepSeek-V4): input = heads x head_dim / groups
        return cap(2)
    if k in ("num_res_blocks", "num_residual_layers", "num_lstm_layers"):
        return cap(1)
    if k == "num_filters":  # EnCodec-style audio encoders: width = num_filters x 2^(upsampling stages)
        return cap(4)
    if k in ("num_query_tokens", "latent_query_num"):  # image placeholder tokens per image
        return cap(4)
    if k in ("codebook_size", "num_embeddings"):  # VQ image / audio tokenizers
        return cap(32)
    if k == "qk_rope_head_dim":
        return cap(16)
    if k == "qk_nope_head_dim":
        return cap(16)
    if re.search(r"(head_dim|d_kv|d_head|dim_head|attention_head_size|kv_channels|head_size|headdim)$", k):
        return cap(HEAD_DIM)
    # heads
    if re.search(r"(num_key_value_heads|num_kv_heads|n_kv_heads|key_value_heads|num_query_groups|"
                 r"linear_num_key_heads)$", k):
        return None  # derived from the head count in _shrink
    if re.search(r"(num_attention_heads|^n_head|^n_heads|num_heads|attention_heads|index_n_heads|heads_per_ngram|"
                 r"linear_num_value_heads|resampler_heads|resampler_n_heads)$", k):
        return cap(2)
    # widths
    if re.search(r"(intermediate_size|ffn_dim|^d_ff|ffn_hidden_size|mlp_dim|dim_ff|^dff|^d_inner|^n_inner|"
                 r"feed_forward_size|intermediate_size_mlp|projector_hidden_size|projection_intermediate_size|"
                 r"alignment_intermediate_size|mlp_only_intermediate_size|dense_intermediate_size)$", k):
        return cap(FFN)
    if re.search(r"(hidden_size|^d_model|n_embd|embed_dim|^emb_dim|embedding_dim|embedding_size|^dim|"
                 r"word_embed_proj_dim|lru_width|_hidden_dim|^projection_dim|output_dim|input_dim|"
                 r"hidden_size_per_layer_input|mamba_d_ssm|^width|_in_dim|_out_dim|_input_size|_output_size|"
                 r"hidden_size_global)$", k) and "patch" not in k:
        return cap(HIDDEN)
    # layers
    if re.search(r"(^num_hidden_layers|^n_layer|^n_layers|^num_layers|^decoder_layers|^encoder_layers|^depth|"
                 r"^layers|num_decoder_layers|num_encoder_layers|decoder_num_layers|conf_num_hidden_layers|"
                 r"resampler_depth|^num_blocks|vision_layers|audio_layers|text_layers)$", k):
        return cap(LAYERS)
    # state-space / recurrent
    if re.search(r"(state_size|d_state|ssm_state_size|mamba_d_state)$", k):
        return cap(16)
    if re.search(r"(conv_kernel|conv_kernel_dim|conv_l_cache|d_conv|mamba_d_conv)$", k):
        return cap(4)
    # images
    if k in ("image_size", "max_image_size", "min_image_size", "crop_size", "resolution", "max_img_size"):
        return cap(IMAGE)
    if k == "patch_size":
        return cap(PATCH) if value > PATCH else None
    # positions
    if k in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_len", "context_length",
             "max_source_positions", "max_target_positions"):
        return cap(MAX_POSITIONS)
    return None


_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "depth",
                     "num_decoder_layers")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _layer_count_key(d: dict) -> str | None:
    return next((k for k in _LAYER_COUNT_KEYS if _is_int(d.get(k)) and d[k] > 0), None)


def _layerish(key: str) -> bool:
    k = key.lower()
    return bool(re.search(r"(layer|index|indexes|indices|idxs|_ids$|block)", k)) and "token" not in k


def _classify_lists(d: dict, n: int) -> tuple[dict, dict, dict]:
    """Split d's lists that depend on the layer count n into per-layer lists (one entry per layer),
    pointer lists (one entry per layer, each a layer index: kv_source_layers) and index lists (the
    indices of some layers: mlp_only_layers, global_attn_indexes, ...)."""
    per_layer, pointers, indexes = {}, {}, {}
    for k, v in d.items():
        if not isinstance(v, list) or k in ("eos_token_id",) or "token" in k.lower():
            continue
        ints = all(_is_int(x) for x in v)
        layer_ints = ints and _layerish(k) and all(-n <= x < n for x in v)
        if len(v) == n and n > 1:
            if layer_ints and len(set(v)) > 1 and "source" in k.lower():
                pointers[k] = v
            elif layer_ints and len(set(v)) == n and sorted(v) == list(range(n)):
                indexes[k] = v  # every layer listed
            else:
                per_layer[k] = v
        elif layer_ints and v:
            indexes[k] = v
    return per_layer, pointers, indexes


def _per_layer_config(d: dict) -> dict[int, dict]:
    plc = d.get("per_layer_config")
    return {int(i): o for i, o in plc.items()} if isinstance(plc, dict) else {}


_PERIODS = (("attn_layer_period", "attn_layer_offset"), ("expert_layer_period", "expert_layer_offset"),
            ("decoder_sparse_step", None), ("moe_layer_freq", None), ("interleave_moe_layer_step", None),
            ("full_attention_interval", None), ("sliding_window_pattern", None), ("_sliding_window_pattern", None),
            ("attn_layer_interval", None), ("global_attn_every_n_layers", None))


def _periodic_kind(d: dict, i: int) -> tuple:
    out = []
    for period, offset in _PERIODS:
        p = d.get(period)
        if _is_int(p) and p > 1:
            out.append((i - (d.get(offset) or 0)) % p == 0 if offset else (i + 1) % p == 0)
    return tuple(out)


def _cycles(d: dict, n: int) -> dict[str, list]:
    """Repeating block patterns shorter than the stack (RecurrentGemma's block_types)."""
    return {k: v for k, v in d.items() if isinstance(v, list) and 1 < len(v) < n and all(isinstance(x, str) for x in v)
            and re.search(r"(types|pattern)$", k.lower())}


def _select_layers(d: dict, n: int) -> list[int]:
    """Original layer indices to keep: the first layer of each distinct kind (its entries in every
    per-layer list, its membership in every index list, its per-layer overrides, whether it is one of
    the dense first layers of a mixture of experts, its place in periodic patterns), at least LAYERS."""
    per_layer, pointers, indexes = _classify_lists(d, n)
    overrides = _per_layer_config(d)
    cycles = _cycles(d, n)
    dense_first = d.get("first_k_dense_replace") or d.get("first_k_dense") or 0
    shared = d.get("num_kv_shared_layers") if _is_int(d.get("num_kv_shared_layers")) else 0
    kinds, keep = [], []
    for i in range(n):
        kind = (tuple(repr(v[i]) for v in per_layer.values()) + tuple(repr(v[i % len(v)]) for v in cycles.values())
                + (shared > 0 and i >= n - shared,)
                + tuple(v[i] == i for v in pointers.values())
                + tuple((i in v or i - n in v) for v in indexes.values())
                + (repr(overrides.get(i)), _is_int(dense_first) and i < dense_first) + _periodic_kind(d, i))
        if kind not in kinds:
            kinds.append(kind)
            keep.append(i)
    for v in pointers.values():  # a layer that reads another layer's cache keeps that layer
        keep += [v[i] for i in keep if v[i] not in keep]
    for i in range(n):
        if len(keep) >= LAYERS:
            break
        if i not in keep:
            keep.append(i)
    return sorted(set(keep))


def _shrink_layers(d: dict) -> set[str]:
    """Shrink the layer count and keep every list and pattern that depends on it consistent; return
    the keys already set (so that the generic size rules leave them)."""
    key = _layer_count_key(d)
    if key is None:
        return set()
    n = d[key]
    per_layer, pointers, indexes = _classify_lists(d, n)
    cycles = _cycles(d, n)
    shared = d.get("num_kv_shared_layers") if _is_int(d.get("num_kv_shared_layers")) else 0
    keep = _select_layers(d, n)
    m = len(keep)
    d[key] = m
    for k, v in cycles.items():
        d[k] = [v[i % len(v)] for i in keep]
    if shared:
        d["num_kv_shared_layers"] = sum(i >= n - shared for i in keep)
    for k, v in per_layer.items():
        d[k] = [v[i] for i in keep]
    for k, v in pointers.items():
        d[k] = [keep.index(v[i]) for i in keep]
    for k, v in indexes.items():
        d[k] = [j for j, i in enumerate(keep) if i in v or i - n in v]
    overrides = _per_layer_config(d)
    if overrides:
        width = len(str(m - 1))
        d["per_layer_config"] = {str(j).zfill(width): _shrink(dict(overrides[i]))
                                 for j, i in enumerate(keep) if i in overrides}
    done = {key, *per_layer, *pointers, *indexes, *cycles, "num_kv_shared_layers"}
    if _is_int(d.get("first_k_dense_replace")):
        d["first_k_dense_replace"] = sum(i < d["first_k_dense_replace"] for i in keep)
        done.add("first_k_dense_replace")
    # periodic patterns: the kept layers alternate kinds, so every period becomes the new count
    for period, offset in _PERIODS:
        if _is_int(d.get(period)) and d[period] > m:
            d[period] = m
            if offset and _is_int(d.get(offset)):
                d[offset] = min(d[offset], m - 1)
    for k in ("max_window_layers", "moe_layer_end_index", "moe_layer_start_index", "insert_layer_id"):
        if _is_int(d.get(k)) and d[k] > 0:
            d[k] = min(d[k], m - 1 if k == "moe_layer_start_index" else m)
    return done


def _shrink(d: dict) -> dict:
    """Shrink one config dict in place (and its sub-config dicts), then return it."""
    before = {k: v for k, v in d.items() if _is_int(v)}
    done = _shrink_layers(d)
    for k, v in list(d.items()):
        if k in done or k in ("rope_parameters", "rope_scaling", "per_layer_config"):
            continue
        if isinstance(v, dict) and _looks_like_config(v):
            _shrink(v)
        elif _is_int(v):
            new = _rule(k, v)
            if new is not None and new > 0:
                d[k] = new
        elif k in ("vision_feature_layer", "vision_feature_layers") and (_is_int(v) or isinstance(v, list)):
            d[k] = _feature_layers(v)
    for k, v in list(d.items()):
        if isinstance(v, list) and v and all(_is_int(x) for x in v):
            lk = k.lower()
            if re.search(r"(image_size|patch_size)$", lk):
                d[k] = [min(x, IMAGE if "image" in lk else PATCH) for x in v]
            elif re.search(r"(hidden_sizes|intermediate_size|moe_intermediate_size|embed_dim)$", lk):
                d[k] = [min(x, FFN if "intermediate" in lk else HIDDEN) for x in v]
            elif re.search(r"(num_heads|num_attention_heads_per_layer)$", lk):
                d[k] = [min(x, 2) for x in v]
            elif re.search(r"(depths)$", lk):
                d[k] = [min(x, 1) for x in v]
            elif "channel_multiplier" in lk:  # VQ tokenizers: widths base x multiplier (GroupNorm needs 32s)
                d[k] = [min(x, 2) for x in v]
            elif "channel" in lk:
                d[k] = [min(x, 32) for x in v]
        elif isinstance(v, list) and v and all(isinstance(x, dict) and _looks_like_config(x) for x in v):
            for x in v:
                _shrink(x)
    heads = next((k for k in ("num_attention_heads", "n_head", "num_heads", "n_heads", "attention_heads",
                              "resampler_n_heads") if _is_int(d.get(k))), None)
    # key-value heads: as many as the query heads for a multi-head family (or when unset), else 1
    for kv in ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "num_query_groups", "multi_query_group_num"):
        if kv in d and heads and (d[kv] is None or _is_int(d[kv])):
            d[kv] = d[heads] if d[kv] is None or before.get(kv) == before.get(heads) else min(d[kv], 1)
    for prefix in ("swa_", "sliding_", "global_"):
        h, kv = f"{prefix}num_attention_heads", f"{prefix}num_key_value_heads"
        if _is_int(d.get(h)) and _is_int(d.get(kv)):
            d[kv] = d[h] if before.get(kv) == before.get(h) else min(d[kv], 1)
    for prefix in ("linear_", "index_", "indexer_"):
        kv = f"{prefix}num_key_heads"
        if _is_int(d.get(kv)):
            d[kv] = min(d[kv], 1)
    _fill_unset(d)
    if heads and "head_dim" in d and d["head_dim"] is None and _is_int(d.get("hidden_size")):
        d["head_dim"] = d["hidden_size"] // d[heads]  # several defaults leave it unset and the model needs it
    _fix_mla(d, before)
    _fix_mamba(d, before)
    _fix_rope(d)
    return d


def _feature_layers(v: int | list) -> int | list:
    """Vision-tower layers a projector reads, re-pointed into the shrunk tower (LAYERS layers): the
    distinct positive indices, deepest first, become LAYERS-1, LAYERS-2, ...; negative ones stay
    when in range."""
    values = v if isinstance(v, list) else [v]
    positive = sorted({x for x in values if _is_int(x) and x >= 0}, reverse=True)
    new = {x: max(LAYERS - 1 - j, 0) for j, x in enumerate(positive)}
    out = [new[x] if _is_int(x) and x >= 0 else (x if not _is_int(x) or x >= -LAYERS else -1) for x in values]
    return out if isinstance(v, list) else out[0]


def _fix_mamba(d: dict, before: dict) -> None:
    """Mamba-2 mixers: heads x head_dim must equal the inner width (expand x hidden, or mamba_d_ssm),
    and the groups must divide the heads."""
    heads = next((k for k in ("mamba_n_heads", "mamba_num_heads", "n_mamba_heads") if _is_int(d.get(k))), None)
    head_dim = next((k for k in ("mamba_d_head", "mamba_head_dim", "mamba_headdim") if _is_int(d.get(k))), None)
    expand = next((k for k in ("mamba_expand", "expand") if isinstance(d.get(k), (int, float))), None)
    if heads is None and "num_heads" in d and "state_size" in d and expand:  # Mamba2Config
        heads, head_dim = "num_heads", "head_dim"
    if not (heads and head_dim and expand and _is_int(d.get("hidden_size"))):
        return
    inner = d.get("mamba_d_ssm") if _is_int(d.get("mamba_d_ssm")) else int(d[expand] * d["hidden_size"])
    d[head_dim] = min(d[head_dim], HEAD_DIM)
    d[heads] = max(inner // d[head_dim], 1)
    for g in ("n_groups", "mamba_n_groups", "mamba_ngroups"):
        if _is_int(d.get(g)):
            d[g] = 1


def _fix_mla(d: dict, before: dict) -> None:
    """Multi-head latent attention: a head size that equalled the rotary part (DeepSeek's head_dim) or
    the whole query/key head (nope + rope: qk_head_dim, Mistral 4's head_dim, dots3's swa_head_dim)
    keeps that equality."""
    rope, nope = before.get("qk_rope_head_dim"), before.get("qk_nope_head_dim")
    if not (_is_int(rope) and _is_int(nope)):
        return
    for k, v in before.items():
        if k.endswith("head_dim") and k not in ("qk_rope_head_dim", "qk_nope_head_dim"):
            if v == rope:
                d[k] = d["qk_rope_head_dim"]
            elif v == rope + nope:
                d[k] = d["qk_rope_head_dim"] + d["qk_nope_head_dim"]


def _fill_unset(d: dict) -> None:
    """Some default configs leave a size unset that the model needs (the Hub configs set it): fill
    the expert count and experts per token of a mixture of experts, and a sliding window that
    sliding-attention layers need."""
    for k, v in d.items():
        if v is None:
            if re.search(r"^(num_experts|n_routed_experts|num_local_experts)$", k):
                d[k] = EXPERTS
            elif re.search(r"^(num_experts_per_tok|top_k_experts)$", k):
                d[k] = TOP_K
            elif k == "moe_intermediate_size":
                d[k] = EXPERT_FFN
            elif k == "n_shared_experts":
                d[k] = 1
    types = d.get("layer_types")
    if "sliding_window" in d and d["sliding_window"] is None and isinstance(types, list) and any(
            "sliding" in str(t) for t in types):
        d["sliding_window"] = 64


def _looks_like_config(v: dict) -> bool:
    return "model_type" in v or any(k in v for k in ("hidden_size", "num_hidden_layers", "d_model", "vocab_size"))


def _expects_mrope(d: dict) -> bool:
    from transformers import CONFIG_MAPPING

    try:
        cls = CONFIG_MAPPING[d["model_type"]]
    except Exception:
        return False
    if "mrope_section" in (getattr(cls, "ignore_keys_at_rope_validation", None) or ()):
        return True
    return "mrope_section" in _modeling_source(cls.__module__)


@cache
def _modeling_source(config_module: str) -> str:
    """The text of the modeling file next to a configuration module ('' if none)."""
    import importlib.util

    spec = importlib.util.find_spec(config_module.replace(".configuration_", ".modeling_"))
    return Path(spec.origin).read_text() if spec and spec.origin else ""


def _fix_rope(d: dict) -> None:
    """Keep rotary parameters consistent with the shrunk head size: mrope sections sum to half the
    rotary dim, longrope factor lists have one entry per rotary frequency, and the original context is
    capped like max_position_embeddings."""
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    if not isinstance(rope, dict):
        return
    ropes = rope.values() if all(isinstance(x, dict) for x in rope.values()) and rope else [rope]
    head_dim = d.get("head_dim") or (d.get("hidden_size", HIDDEN) // max(d.get("num_attention_heads", 2), 1))
    if d.get("qk_rope_head_dim"):
        head_dim = d["qk_rope_head_dim"]
    for r in ropes:
        if not isinstance(r, dict):
            continue
        if "mrope_section" not in r and _expects_mrope(d):  # the model falls back to the full-size sections
            r["mrope_section"] = [6, 6, 4]
        partial = r.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0
        half = max(int(head_dim * partial) // 2, 1)
        for k, v in list(r.items()):
            if k in ("original_max_position_embeddings",) and isinstance(v, int):
                r[k] = min(v, MAX_POSITIONS)
            elif k in ("mrope_section",) and isinstance(v, list) and v:
                r[k] = _scale_sections(v, half)
            elif k in ("short_factor", "long_factor") and isinstance(v, list):
                r[k] = (v + [v[-1]] * half)[:half] if v else v


def _scale_sections(sections: list[int], total: int) -> list[int]:
    old = sum(sections)
    if old == total:
        return sections
    out = [max(1, s * total // old) for s in sections]
    out[0] += total - sum(out)
    return out


def _remap_token_ids(d: dict, mapping: dict[int, int]) -> None:
    """Special token ids at or above _SPECIAL_FLOOR move, distinct ids to distinct new ids, into
    [VOCAB - 64, VOCAB) (the same old id gets the same new id in every sub-config)."""
    for k, v in list(d.items()):
        lk = k.lower()
        is_token = lk.endswith(("token_id", "token_index", "_token_ids", "token_ids")) or lk in (
            "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "cls_token_id", "mask_token_id",
            "decoder_start_token_id", "im_start_id", "im_end_id", "im_newline_id", "image_patch_id",
            "_pad_token_id", "boi_token_index", "eoi_token_index", "user_token_id")
        if isinstance(v, dict):
            if _looks_like_config(v):
                _remap_token_ids(v, mapping)
        elif is_token and isinstance(v, int) and not isinstance(v, bool):
            d[k] = _new_id(v, mapping)
        elif is_token and isinstance(v, list) and all(isinstance(x, int) for x in v):
            d[k] = [_new_id(x, mapping) for x in v]


def _new_id(v: int, mapping: dict[int, int]) -> int:
    if v < _SPECIAL_FLOOR:
        return v
    if v not in mapping:
        mapping[v] = VOCAB - 1 - len(mapping)
        if mapping[v] < _SPECIAL_FLOOR:
            raise ValueError("more than 64 distinct special token ids")
    return mapping[v]


# ---------------------------------------------------------------------------------------------
# Per-family overrides: applied to the shrunk dict (nested keys with "/"), each for a reason the
# generic rule cannot see.

# Defaults some config classes cannot even construct: keyword arguments for the defaulting call.
_INIT: dict[str, dict[str, Any]] = {
    # a draft model that reads the backbone's cache: its validator rejects gemma4_text's per-layer inputs
    "gemma4_assistant": {"text_config": {"model_type": "gemma4_text", "hidden_size_per_layer_input": 0,
                                         "vocab_size_per_layer_input": 0}},
}

_COMPASS_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
_OVERRIDES: dict[str, dict[str, Any]] = {
    # default configs that describe no usable model (the Hub checkpoints set these):
    "bamba": {"attn_layer_indices": [1]},  # no attention layer by default; the forward needs one
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},  # likewise all Mamba
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # unset, the model indexes it
    "deepseek_ocr2": {"text_config/mlp_layer_types": ["dense", "sparse"]},  # unset, the model indexes it
    "chameleon": {"vocabulary_map": {"<image>": VOCAB - 1}},  # unset, the model reads the image token from it
    "cohere_compass": {"text_config/rope_parameters": _COMPASS_ROPE},  # per-layer-type rope, empty by default
    "cohere_compass_text": {"rope_parameters": _COMPASS_ROPE},
    # Granite 4 Vision: unset (vision layer, LM layer) pairs and Q-Former rate; its 4 spatial groups
    # target LM layers 12..21 by default
    "granite4_vision": {"deepstack_layer_map": [[1, 0], [2, 1]], "downsample_rate": "1/2",
                        "spatial_target_layers": [0, 0, 1, 1]},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 32,  # QSA indexer unset
                       "indexer_budget": 16, "indexer_compress_ratio": 4},
    # layer counts the generic rule cannot see:
    # Dory serializes each layer as an (attention, mlp) pair and splits the stack into input, looped
    # and output layers that must add up: one of each
    "dory": {"num_hidden_layers": 6, "n_input_layers": 2, "n_recurrent_layers": 2, "n_output_layers": 2,
             "layer_types": ["sliding_attention", "mlp", "full_attention", "mlp", "sliding_attention", "mlp"]},
    # HRM stores the unrolled count (layers per stack x H_cycles x (L_cycles + 1)): 1 layer per stack
    "hrm_text": {"num_layers_per_stack": 1, "num_hidden_layers": 8, "H_cycles": 2, "L_cycles": 3},
    # Reformer: its LM head needs is_decoder; the axial position factors must multiply to the positions
    # and their widths add up to the hidden size
    # Zamba: the shared attention block reads [hidden, embeddings] concatenated (twice the hidden size),
    # and Zamba 1 ties that block across hybrid layers, so it needs two of them
    "zamba": {"attention_hidden_size": 2 * HIDDEN, "attention_head_dim": HIDDEN,
              "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    "zamba2": {"attention_hidden_size": 2 * HIDDEN, "attention_head_dim": HIDDEN},
    # BLIP-2 family: the image placeholder id is unset by default (the processor adds it)
    "blip-2": {"image_token_id": VOCAB - 1},
    "instructblip": {"image_token_id": VOCAB - 1},
    "instructblipvideo": {"video_token_id": VOCAB - 1},
    # xLSTM: the native recurrent step (used below the chunk size) assumes equal query/key and value head
    # sizes (its default qk_dim_factor 0.5 fails "matC_old has wrong shape")
    "xlstm": {"qk_dim_factor": 1.0},
    "reformer": {"is_decoder": True, "axial_pos_shape": [16, 32], "axial_pos_embds_dim": [16, 48]},
    "dbrx": {"attn_config/rope_theta": 10000.0,  # the attention reads a field its config class lacks
             "attn_config/clip_qkv": 8.0},  # and clamps with it (None by default: an error)
    "step3p7": {"text_config/sliding_window": 64},  # the model builds a sliding mask whatever layer_types say
    # Apertus 1.5: image then audio codebooks occupy consecutive id ranges that must fit in the vocabulary
    "apertus1p5": {"image_token_offset": VOCAB - 96, "audio_token_offset": VOCAB - 64},
    # Gemma 3n's AltUp coefficients take 4 inputs, which no group size divides; in the real model they are
    # a millionth of the quantized parameters and stay in full precision (under 0.1%). Wider MLPs keep
    # that true of the tiny model too.
    "gemma3n_text": {"intermediate_size": [8 * FFN] * 6},
    # AXK2's gated norms project through a rank-16 MLP: in the real model (hidden 2048, 128 experts) a
    # ten-thousandth of its quantized parameters, kept in full precision; 32x narrower, they would not be
    "axk2": {"gated_norm_rank": RANK},
}
_OVERRIDES["qwen4_exp"] = {f"text_config/{k}": v for k, v in _OVERRIDES["qwen4_exp_text"].items()}


def _apply(d: dict, overrides: dict[str, Any]) -> None:
    for path, value in overrides.items():
        *parents, last = path.split("/")
        node = d
        for p in parents:
            node = node[p]
        node[last] = value


class NotBuilt(RuntimeError):
    """A family that cannot be built here; the message is one line (the caller records it)."""


def _one_line(model_type: str, e: Exception) -> NotBuilt:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # strict-dataclass validation errors put the real reason on their second line
    text = " ".join(lines[:2]) if type(e).__name__.startswith("StrictDataclass") else (lines[0] if lines else "")
    return NotBuilt(f"{model_type}: {type(e).__name__}: {text[:300]}")


def tiny_config(model_type: str) -> PreTrainedConfig:
    """The family's default config with every size shrunk (see module docstring); raises NotBuilt
    with a one-line reason when the config class cannot be defaulted or rebuilt."""
    from transformers import CONFIG_MAPPING

    try:
        cls = CONFIG_MAPPING[model_type]
        d = cls(**copy.deepcopy(_INIT.get(model_type, {}))).to_dict()
        d.pop("transformers_version", None)
        _shrink(d)
        _remap_token_ids(d, {})
        _apply(d, _OVERRIDES.get(model_type, {}))
        d.pop("model_type", None)
        return cls.from_dict(copy.deepcopy(d))  # rebuilt, so the config's own validators see the tiny sizes
    except Exception as e:
        raise _one_line(model_type, e) from e


def build(model_type: str, seed: int = 0) -> torch.nn.Module:
    """The family's tiny random model in eval mode and float32, with the class its auto mapping names;
    the same weights for the same seed. Raises NotBuilt with a one-line reason."""
    if model_type in skipped():
        raise NotBuilt(f"{model_type}: {skipped()[model_type]}")
    config = tiny_config(model_type)
    try:
        cls = model_class(model_type)
        if getattr(cls, "config_class", None) is not None and cls.config_class is config.sub_configs.get(
                "text_config"):
            config = config.get_text_config()  # what AutoModelForCausalLM.from_config does for a composite config
        torch.manual_seed(seed)
        return cls._from_config(config, dtype=torch.float32).eval()
    except Exception as e:
        raise _one_line(model_type, e) from e


def save(model_type: str, out: Path, seed: int = 0) -> Path:
    """Write the family's tiny model to ``out`` with ``save_pretrained`` (the Hub layout: transformers
    converts its in-memory layout back to the original checkpoint format) and return ``out``."""
    out = Path(out)
    build(model_type, seed=seed).save_pretrained(out)
    return out


def _special_ids(d: dict) -> set[int]:
    """Every token id a config dict (and its sub-config dicts) names."""
    out: set[int] = set()
    for k, v in d.items():
        k = str(k)
        if isinstance(v, dict):
            out |= _special_ids(v)
        elif ("token" in k or k.endswith("_id")) and _is_int(v):
            out.add(v)
        elif ("token" in k or k.endswith("_id")) and isinstance(v, list):
            out |= {x for x in v if _is_int(x)}
    return out


def text_input(config, length: int = 8, seed: int = 0) -> torch.Tensor:
    """input_ids [1, length] of ordinary tokens: none of the special ids the config names (so no
    image/audio placeholder appears in a text-only forward), the same for the same seed."""
    text = config.get_text_config(decoder=True)
    vocab = getattr(text, "vocab_size", None) or VOCAB
    special = _special_ids(config.to_dict())
    allowed = torch.tensor([i for i in range(3, min(vocab, _SPECIAL_FLOOR)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(0, len(allowed), (1, length), generator=g)]


def example_inputs(model: torch.nn.Module, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword arguments for a forward of ``model``: text ``input_ids``, and for the few families whose
    forward cannot run on text alone (BLIP, BLIP-2, InstructBLIP, IDEFICS, Kosmos-2), one tiny random
    image with its placeholder tokens."""
    config = model.config
    ids = text_input(config, length, seed)
    out = {"input_ids": ids}
    vision = getattr(config, "vision_config", None)
    model_type = config.model_type
    if model_type == "xmod":  # language adapters: pick the first language
        out["lang_ids"] = torch.zeros(1, dtype=torch.long)
    if vision is None or model_type not in ("blip", "blip-2", "instructblip", "instructblipvideo", "idefics",
                                            "kosmos-2"):
        return out
    g = torch.Generator().manual_seed(seed + 1)
    size = vision.image_size if _is_int(vision.image_size) else vision.image_size[0]
    shape = (getattr(vision, "num_channels", 3), size, size)
    frames = {"instructblipvideo": (1, 2), "idefics": (1, 1)}.get(model_type, (1,))
    out["pixel_values"] = torch.randn(*frames, *shape, generator=g)
    placeholder = getattr(config, "image_token_id", None) or getattr(config, "video_token_id", None)
    queries = getattr(config, "num_query_tokens", None)
    if placeholder is not None and queries:  # BLIP-2 family: one placeholder per query token, first
        out["input_ids"] = ids = torch.cat([torch.full((1, queries), placeholder), ids], dim=1)
    if model_type.startswith("instructblip"):
        out["qformer_input_ids"] = ids[:, -length:]
    if model_type == "idefics":
        out["image_attention_mask"] = torch.ones(1, ids.shape[1], 1, dtype=torch.long)
    if model_type == "kosmos-2":  # the image's latent queries replace tokens 1..n
        mask = torch.zeros_like(ids)
        mask[:, 1:1 + config.latent_query_num] = 1
        out["image_embeds_position_mask"] = mask
    return out
