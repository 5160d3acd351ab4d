"""``synthetic://NAME?layers=N&seed=S&dtype=bf16``: a checkpoint generated on the fly.

Each tensor is made where it is read (on the worker) from the seed and its name, with the
row/column structure of LLM weights, so a full 70B-shaped job runs through the whole
pipeline on any machine without 140 GB of disk. The same spec always gives the same bytes.

Dense models are Llama-shaped (``SHAPES``). Mixtures of experts (``MOE_CONFIGS``: Qwen3-235B-A22B,
Qwen3-30B-A3B, DeepSeek-V3) carry the real config.json and so the real layer shapes, in the Hub's
layout (one tensor per expert and projection, DeepSeek's router in float32), as transformers
would save the model: its tensor names come from the model built on the meta device and
transformers' own reverse conversion, never from a hand-written list.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from urllib.parse import parse_qs, urlparse

import torch

from ..io.safetensors_io import DTYPE_NAMES, DTYPES, TensorInfo
from ..io.storage import Location
from .base import Source, SourceError


def llama_config(
    layers: int, hidden: int, intermediate: int, vocab: int, heads: int = 4, kv_heads: int = 2, **overrides
) -> dict:
    """A Hugging Face Llama config.json of the given size."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, **overrides,
    }


def llama_layer_shapes(cfg: dict, layer: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one decoder layer's tensors in the Hugging Face Llama layout."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    p = f"model.layers.{layer}"
    return {
        f"{p}.input_layernorm.weight": (h,),
        f"{p}.post_attention_layernorm.weight": (h,),
        f"{p}.self_attn.q_proj.weight": (h, h),
        f"{p}.self_attn.k_proj.weight": (kv, h),
        f"{p}.self_attn.v_proj.weight": (kv, h),
        f"{p}.self_attn.o_proj.weight": (h, h),
        f"{p}.mlp.gate_proj.weight": (i, h),
        f"{p}.mlp.up_proj.weight": (i, h),
        f"{p}.mlp.down_proj.weight": (h, i),
    }


# name -> (hidden, intermediate, heads, kv heads, vocab, layers)
SHAPES = {
    "llama-70b": (8192, 28672, 64, 8, 128256, 80),
    "llama-8b": (4096, 14336, 32, 8, 128256, 32),
    "qwen3-32b": (5120, 25600, 64, 8, 151936, 64),
    "tiny": (256, 512, 4, 2, 512, 4),
}
# name -> config.json of a mixture of experts at full size (rope scaling left at its default).
_QWEN3_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "head_dim": 128,
              "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "vocab_size": 151936,
              "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
              "tie_word_embeddings": False, "hidden_act": "silu", "num_experts": 128, "num_experts_per_tok": 8}
MOE_CONFIGS = {
    "qwen3-235b-a22b": {**_QWEN3_MOE, "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
                        "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4},
    "qwen3-30b-a3b": {**_QWEN3_MOE, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                      "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4},
    "deepseek-v3": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
        "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
        "vocab_size": 129280, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "tie_word_embeddings": False, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
}
# Layers a template model is built with: enough for every kind of layer (DeepSeek-V3's dense first three).
_TEMPLATE_LAYERS = 4
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_POOL = 1 << 24
_BLOCK_ELEMENTS = 1 << 20


@dataclass
class SyntheticSource(Source):
    shape_name: str = "tiny"
    layers: int = 4
    seed: int = 0
    dtype: torch.dtype = torch.bfloat16

    def _config(self) -> dict:
        dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(self.dtype, "float32")
        if self.shape_name in MOE_CONFIGS:
            return {**MOE_CONFIGS[self.shape_name], "num_hidden_layers": self.layers, "torch_dtype": dtype}
        hidden, inter, heads, kv, vocab, _ = SHAPES[self.shape_name]
        return llama_config(self.layers, hidden, inter, vocab, heads, kv, max_position_embeddings=8192,
                            rope_theta=500000.0, torch_dtype=dtype)

    def read_json(self, name: str) -> dict:
        if name != "config.json":
            raise SourceError(f"{self.spec}: has no {name}")
        return self._config()

    def exists(self, name: str) -> bool:
        return name == "config.json"

    def assets(self) -> list[str]:
        return []

    def weight_files(self) -> list[str]:
        return ["embeddings", *(f"layer-{i:05d}" for i in range(self.layers)), "head"]

    def _shapes(self, file: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if self.shape_name in MOE_CONFIGS:
            return _moe_shapes(self.shape_name, self.dtype, file)
        cfg = self._config()
        hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
        if file == "embeddings":
            shapes = {"model.embed_tokens.weight": (vocab, hidden)}
        elif file == "head":
            shapes = {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
        else:
            shapes = llama_layer_shapes(cfg, int(file.split("-")[1]))
        return {name: (shape, self.dtype) for name, shape in shapes.items()}

    def header(self, name: str) -> dict[str, TensorInfo]:
        out, pos = {}, 0
        for tname, (shape, dtype) in self._shapes(name).items():
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            out[tname] = TensorInfo(tname, DTYPE_NAMES[dtype], shape, pos, nbytes)
            pos += nbytes
        return out

    def read_tensors(self, wanted: list[tuple[str, TensorInfo]]) -> list[torch.Tensor]:
        return [self.read_tensor(name, info) for name, info in wanted]

    def read_tensor(self, name: str, info: TensorInfo) -> torch.Tensor:
        g = _generator(f"{self.seed}:{info.name}")
        if len(info.shape) == 1:
            return (1 + 0.1 * torch.randn(info.shape, generator=g, dtype=torch.float32)).to(DTYPES[info.dtype])
        rows, cols = info.shape
        windows = _normal_pool(self.seed, max(_POOL, 4 * cols)).unfold(0, cols, 1)
        starts = torch.randint(0, windows.shape[0], (rows,), generator=g)
        row_scale = 0.02 * torch.exp(0.1 * torch.randn(rows, 1, generator=g, dtype=torch.float32))
        col_scale = torch.exp(0.1 * torch.randn(1, cols, generator=g, dtype=torch.float32))
        out = torch.empty(info.shape, dtype=DTYPES[info.dtype])
        step = max(1, _BLOCK_ELEMENTS // cols)
        block = torch.empty(min(step, rows), cols)
        for r0 in range(0, rows, step):
            b = block[:min(rows - r0, step)]
            torch.index_select(windows, 0, starts[r0:r0 + len(b)], out=b)
            out[r0:r0 + len(b)] = b.mul_(row_scale[r0:r0 + len(b)]).mul_(col_scale)
        return out


@functools.lru_cache(maxsize=8)
def _moe_template(shape_name: str, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of a few-layer model of ``shape_name`` in the Hub's layout: the model built on the
    meta device, its state reverted to the saved format by transformers itself."""
    from transformers.core_model_loading import revert_weight_conversion

    from ..architecture import empty_model

    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
    model = empty_model({**MOE_CONFIGS[shape_name], "num_hidden_layers": _TEMPLATE_LAYERS, "torch_dtype": name})
    saved = revert_weight_conversion(model, model.state_dict())
    return {k: (tuple(v.shape), v.dtype) for k, v in saved.items()}


def _moe_shapes(shape_name: str, dtype: torch.dtype, file: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """One synthetic file's tensors: the embeddings, one decoder layer (the template's layer of that
    kind, renumbered), or the final norm and head."""
    template = _moe_template(shape_name, dtype)
    if file in ("embeddings", "head"):
        return {k: v for k, v in sorted(template.items())
                if ".layers." not in k and (("embed" in k) == (file == "embeddings"))}
    layer = int(file.split("-")[1])
    source = min(layer, _TEMPLATE_LAYERS - 1)
    prefix = f"model.layers.{source}."
    return {f"model.layers.{layer}.{k[len(prefix):]}": v for k, v in sorted(template.items()) if k.startswith(prefix)}


def decoder_matrices(shape_name: str) -> list[tuple[str, int, int, int]]:
    """The weight matrices of one decoder layer of a named shape, grouped by shape:
    ``(names, out_features, in_features, count)``, e.g. ``("q/o_proj", 8192, 8192, 2)``."""
    hidden, inter, heads, kv, vocab, _ = SHAPES[shape_name]
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, shape in llama_layer_shapes(llama_config(1, hidden, inter, vocab, heads, kv), 0).items():
        if len(shape) == 2:
            groups.setdefault(shape, []).append(name.split(".")[-2])
    return [(_joined(names), n, k, len(names)) for (n, k), names in groups.items()]


def _joined(names: list[str]) -> str:
    """``["q_proj", "o_proj"]`` -> ``"q/o_proj"``."""
    suffix = "_" + names[0].split("_")[-1]
    return "/".join(n.removesuffix(suffix) for n in names) + suffix


def _generator(key: str) -> torch.Generator:
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@functools.lru_cache(maxsize=2)
def _normal_pool(seed: int, size: int) -> torch.Tensor:
    """Standard normal values that every matrix row of a source is a window of, at a random start.

    Drawing each value anew ran at 0.3 GB/s on two cores and made generation, not quantization,
    the cost of a synthetic job; copying windows runs at memory speed. Rows share values, at
    other positions, which the row and column statistics do not notice.
    """
    return torch.randn(size, generator=_generator(f"{seed}:pool"), dtype=torch.float32)


def open_synthetic(spec: str) -> SyntheticSource:
    url = urlparse(spec)
    name = url.netloc or url.path.lstrip("/")
    known = {**{n: s[5] for n, s in SHAPES.items()}, **{n: c["num_hidden_layers"] for n, c in MOE_CONFIGS.items()}}
    if name not in known:
        raise SourceError(f"{spec}: unknown synthetic model {name!r}; choose one of {', '.join(known)}")
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    unknown = set(query) - {"layers", "seed", "dtype"}
    if unknown:
        raise SourceError(f"{spec}: unknown parameter {sorted(unknown)[0]!r} (layers, seed, dtype)")
    try:
        layers = int(query.get("layers", known[name]))
        seed = int(query.get("seed", 0))
        dtype = _DTYPES[query.get("dtype", "bf16")]
    except (ValueError, KeyError):
        raise SourceError(f"{spec}: layers and seed must be integers, dtype one of {', '.join(_DTYPES)}") from None
    if layers < 1:
        raise SourceError(f"{spec}: layers must be at least 1")
    ident = {"synthetic": name, "layers": layers, "seed": seed, "dtype": str(dtype)}
    return SyntheticSource(spec=spec, location=Location("memory://synthetic"), identity=ident,
                           shape_name=name, layers=layers, seed=seed, dtype=dtype)
