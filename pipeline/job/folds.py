"""Where each quantized matrix's column scale goes in a compressed-tensors output.

Serving engines hold no per-input-column scale, so SINQ's column scale must move into the tensors
that produce the matrix's input (``sinq_ops.columns``). Which tensor that is depends on the layer's
dataflow, which names alone do not prove: Gemma's ``post_attention_layernorm`` normalises the
attention's output, not the MLP's input, and Gemma 3n's ``v_norm`` stands between ``v_proj`` and
``o_proj``. So folds are made only for families whose decoder layer is known to compute what the
recipe assumes (``RECIPES``, each checked against the family's own transformers class by the
tests); every other quantized matrix gets a column scale of 1, and the plan says so per kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class SharedInput:
    """Quantized matrices that read one normed input: one column scale for all, folded into the norm.

    The scale is SINQ's for ``lead`` alone, the reader whose output reaches the residual stream
    linearly (``v_proj`` through attention's weighted sum, ``up_proj`` through the product with the
    activated gate). ``q_proj``/``k_proj`` feed a softmax and ``gate_proj`` an activation, which
    tolerate their own errors better; a scale computed over all readers stacked serves the linear
    one worse. On SmolLM2-135M at 4 bits, group 64, WikiText-2 (8 x 2048 tokens): the stacked scale
    gives 21.26, the leads' 20.71, per-matrix scales (which do not fold) 20.91.
    """

    norm: str  # the norm's weight (a copied tensor)
    readers: tuple[str, ...]  # quantized weights reading the norm's output
    lead: str  # the reader whose own column scale all of them take
    one_plus: bool = False  # the norm computes x * (1 + w)


@dataclass(frozen=True)
class RowFold:
    """A quantized matrix whose input is the output of ``producer`` (through an elementwise product or
    attention's weighted sum): its column scale goes into the producer's rows (and bias)."""

    reader: str
    producer: str
    heads: int = 0  # attention output: query heads and key/value heads, the column scale tied per KV head
    kv_heads: int = 0


@dataclass(frozen=True)
class LayerFolds:
    """Every fold of one unit. Shared scales are computed before any row fold changes their lead
    (``pipeline.job.served``)."""

    rows: tuple[RowFold, ...] = ()
    shared: tuple[SharedInput, ...] = ()
    rtn: bool = False  # round-to-nearest: every column scale is 1 by the method itself

    def placement(self, name: str) -> str:
        """How the column scale of quantized weight ``name`` is placed, as the manifest says it."""
        if self.rtn:
            return "1 (round-to-nearest)"
        for r in self.rows:
            if r.reader == name:
                tied = " (tied across the query heads of each key/value head)" if r.heads else ""
                return f"folded into {_kind(r.producer)} rows{tied}"
        carried = "".join(f"; its rows carry {_kind(r.reader)}'s" for r in self.rows if r.producer == name)
        for s in self.shared:
            if name in s.readers:
                others = ", ".join(_kind(n) for n in s.readers)
                return f"{_kind(s.lead)}'s, shared by {others}, folded into {_kind(s.norm)}{carried}"
        return "1 (no exact fold for this kind)" + carried


def _kind(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj``: the name within its layer."""
    return re.sub(r"^.*?\.\d+\.", "", name.removesuffix(".weight"))


@dataclass(frozen=True)
class Recipe:
    """A family's dense decoder layer: the names, relative to the layer, of what reads what."""

    attention_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attention: str = "self_attn"
    mlp: str = "mlp"
    one_plus: bool = False


# Families whose decoder layer is x + attn(norm1(x)) then x + mlp(norm2(x)), q/k/v and gate/up
# reading their norm's output directly, v's output reaching o_proj through attention only, and
# up's output multiplying act(gate) before down_proj. q_norm/k_norm (Qwen 3) sit after q/k: no effect.
RECIPES = {name: Recipe() for name in ("llama", "mistral", "qwen2", "qwen3")}
# Gemma's norms compute x * (1 + w); Gemma 2 and 3 normalise the attention's output with
# post_attention_layernorm and feed the MLP from pre_feedforward_layernorm.
RECIPES["gemma"] = Recipe(one_plus=True)
RECIPES.update({name: Recipe(mlp_norm="pre_feedforward_layernorm", one_plus=True) for name in ("gemma2", "gemma3_text")})


def recipe_for(model_config: dict) -> Recipe | None:
    return RECIPES.get(str(model_config.get("model_type", "")))


def layer_folds(block: str, names: dict[str, bool], model_config: dict, method: str) -> LayerFolds:
    """The folds of decoder layer ``block`` whose tensors (name -> quantized) are all in its unit.

    A fold is made only when every tensor it touches is there, its matrices quantized and its norm
    copied; otherwise its readers keep a column scale of 1."""
    if method == "rtn":
        return LayerFolds(rtn=True)
    recipe = recipe_for(model_config)
    if recipe is None:
        return LayerFolds()
    p = f"{block}."
    att, mlp = f"{p}{recipe.attention}.", f"{p}{recipe.mlp}."

    def quantized(*ws: str) -> bool:
        return all(names.get(w) is True for w in ws)

    rows, shared = [], []
    heads = int(model_config.get("num_attention_heads") or 0)
    kv_heads = int(model_config.get("num_key_value_heads") or heads)
    o, v = f"{att}o_proj.weight", f"{att}v_proj.weight"
    if heads and quantized(o, v):
        rows.append(RowFold(o, v, heads, kv_heads))
    down, up, gate = f"{mlp}down_proj.weight", f"{mlp}up_proj.weight", f"{mlp}gate_proj.weight"
    if quantized(down, up):
        rows.append(RowFold(down, up))
    for norm, readers, lead in ((f"{p}{recipe.attention_norm}.weight", tuple(f"{att}{x}_proj.weight" for x in "qkv"), v),
                                (f"{p}{recipe.mlp_norm}.weight", (gate, up), up)):
        if names.get(norm) is False and quantized(*readers):
            shared.append(SharedInput(norm, readers, lead, recipe.one_plus))
    return LayerFolds(tuple(rows), tuple(shared))


# What vLLM fuses into one layer of one quantization scheme: all of a group or none of it quantized.
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def unfused(block: str, names: dict[str, bool]) -> str | None:
    """Why layer ``block`` (tensor name -> quantized) would not load in vLLM, which fuses q/k/v and
    gate/up into one layer each and refuses one whose parts are quantized differently; else None."""
    for group in FUSED:
        got = {m: names.get(f"{block}.{m}.weight") for m in group}
        if len({q for q in got.values() if q is not None}) > 1:
            kept = [m for m, q in got.items() if q is False]
            return (f"{block}: {', '.join(kept)} would stay unquantized beside its quantized "
                    f"{'/'.join(m.rsplit('.', 1)[1] for m in group)} partners, which serving engines fuse into one "
                    "layer of one scheme; quantize all of them or none (--include/--exclude)")
    return None
