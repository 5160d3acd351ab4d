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
class Block:
    """Rows ``start:stop`` of a tensor of the unit (an expert's up rows within its gate_up matrix)."""

    name: str
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class SharedInput:
    """Quantized matrices that read one normed input: one column scale for all, folded into the norm.

    The scale is SINQ's for the ``lead`` rows alone, those whose output reaches the residual stream
    linearly (``v_proj`` through attention's weighted sum, ``up_proj`` through the product with the
    activated gate; every expert's and the shared expert's up rows together). ``q_proj``/``k_proj``
    feed a softmax and ``gate_proj`` an activation, which tolerate their own errors better; a scale
    computed over all readers stacked serves the linear one worse. On SmolLM2-135M at 4 bits, group
    64, WikiText-2 (8 x 2048 tokens): the stacked scale gives 21.26, the leads' 20.71, per-matrix
    scales (which do not fold) 20.91. A router reading the same input (``divided``) gets its
    columns divided by the scale, so it computes what it did.
    """

    norm: str  # the norm's weight (a copied tensor)
    readers: tuple[str, ...]  # quantized weights reading the norm's output
    lead: tuple[Block, ...]  # the rows whose own column scale all of them take
    one_plus: bool = False  # the norm computes x * (1 + w)
    divided: tuple[str, ...] = ()  # copied weights reading the norm's output: a router, a shared expert's gate


@dataclass(frozen=True)
class RowFold:
    """A quantized matrix whose input is the output of ``producer`` (through an elementwise product or
    attention's weighted sum): its column scale goes into the producer's rows ``start:stop`` (and bias)."""

    reader: str
    producer: str
    heads: int = 0  # attention output: query heads and key/value heads, the column scale tied per KV head
    kv_heads: int = 0
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class LayerFolds:
    """Every fold of one unit. Shared scales are computed before any row fold changes their lead
    (``pipeline.job.served``)."""

    rows: tuple[RowFold, ...] = ()
    shared: tuple[SharedInput, ...] = ()
    rtn: bool = False  # round-to-nearest: every column scale is 1 by the method itself

    def placement(self, key: str) -> str:
        """How the column scale of quantized matrix ``key`` (a tensor, or an expert's matrix) is placed,
        as the manifest says it."""
        if self.rtn:
            return "1 (round-to-nearest)"
        for r in self.rows:
            if r.reader == key:
                tied = " (tied across the query heads of each key/value head)" if r.heads else ""
                part = " (its up rows)" if r.stop is not None else ""
                return f"folded into {_kind(r.producer)}{part} rows{tied}"
        carried = "".join(sorted({f"; its {'up ' if r.stop is not None else ''}rows carry {_kind(r.reader)}'s"
                                  for r in self.rows if r.producer == key}))
        for s in self.shared:
            if key in s.readers:
                lead = " and ".join(dict.fromkeys(_kind(b.name) + (" up rows" if b.stop is not None else "")
                                                  for b in s.lead))
                others = ", ".join(dict.fromkeys(_kind(n) for n in s.readers))
                routers = "".join(f"; {_kind(d)} divided by it" for d in s.divided)
                return f"{lead}'s, shared by {others}, folded into {_kind(s.norm)}{routers}{carried}"
        return "1 (no exact fold for this kind)" + carried


def _kind(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj``: the name within its layer (an
    expert's matrix, ``...experts.gate_up_proj.7``, as its stacked parameter)."""
    return re.sub(r"\.\d+$", "", re.sub(r"^.*?\.\d+\.", "", name.removesuffix(".weight")))


@dataclass(frozen=True)
class Recipe:
    """A family's dense decoder layer: the names, relative to the layer, of what reads what."""

    attention_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attention: str = "self_attn"
    mlp: str = "mlp"
    one_plus: bool = False
    # A mixture of experts in the MLP's place: ``<mlp>.experts.gate_up_proj`` / ``down_proj`` stacked (each
    # expert's gate and up rows written as the checkpoint's ``gate_proj`` / ``up_proj``), the router
    # ``<mlp>.<router>`` and an optional shared expert (a dense MLP) with its gate, all reading the MLP's norm.
    router: str = ""
    shared_expert: str = "shared_expert"
    shared_expert_gate: str = "shared_expert_gate"


# Families whose decoder layer is x + attn(norm1(x)) then x + mlp(norm2(x)), q/k/v and gate/up
# reading their norm's output directly, v's output reaching o_proj through attention only, and
# up's output multiplying act(gate) before down_proj. q_norm/k_norm (Qwen 3) sit after q/k: no effect.
RECIPES = {name: Recipe() for name in ("llama", "mistral", "qwen2", "qwen3")}
# Gemma's norms compute x * (1 + w); Gemma 2 and 3 normalise the attention's output with
# post_attention_layernorm and feed the MLP from pre_feedforward_layernorm.
RECIPES["gemma"] = Recipe(one_plus=True)
# Qwen 2/3 mixtures of experts: the same layer with softmax top-k routing over SwiGLU experts whose
# router (and Qwen 2's shared expert and its sigmoid gate) reads the post-attention norm's output.
RECIPES.update({name: Recipe(router="gate") for name in ("qwen2_moe", "qwen3_moe")})
RECIPES.update({name: Recipe(mlp_norm="pre_feedforward_layernorm", one_plus=True) for name in ("gemma2", "gemma3_text")})


def recipe_for(model_config: dict) -> Recipe | None:
    return RECIPES.get(str(model_config.get("model_type", "")))


def layer_folds(block: str, names: dict[str, bool], model_config: dict, method: str,
                parts: dict[str, tuple[tuple[str, int], ...]] | None = None) -> LayerFolds:
    """The folds of decoder layer ``block`` whose tensors (``TensorTask.key`` -> quantized) are all in
    its unit; ``parts`` gives an expert's matrix's row blocks as the checkpoint names them.

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
    attention_norm = f"{p}{recipe.attention_norm}.weight"
    if names.get(attention_norm) is False and quantized(*(qkv := tuple(f"{att}{x}_proj.weight" for x in "qkv"))):
        shared.append(SharedInput(attention_norm, qkv, (Block(v),), recipe.one_plus))
    mlp_norm = f"{p}{recipe.mlp_norm}.weight"
    experts = _experts(f"{mlp}experts.", names, parts or {}) if recipe.router else None
    if experts is None:  # a dense MLP (also a mixture-of-experts family's dense layers)
        dense, readers, lead, divided = mlp, (), (), ()
    else:
        dense = f"{mlp}{recipe.shared_expert}."
        readers, lead = tuple(r for r, _ in experts), tuple(b for _, b in experts)
        rows += [RowFold(down, b.name, start=b.start, stop=b.stop) for down, b in
                 ((f"{mlp}experts.down_proj.{b.name.rpartition('.')[2]}", b) for _, b in experts)]
        divided = tuple(w for w in (f"{mlp}{recipe.router}.weight", f"{mlp}{recipe.shared_expert_gate}.weight")
                        if names.get(w) is False)
    down, up, gate = f"{dense}down_proj.weight", f"{dense}up_proj.weight", f"{dense}gate_proj.weight"
    if quantized(down, up):
        rows.append(RowFold(down, up))
    if quantized(gate, up):
        readers, lead = readers + (gate, up), lead + (Block(up),)
    elif experts is not None and any(names.get(w) is not None for w in (gate, up)):
        readers = ()  # a shared expert kept in full precision would read the scaled input
    if names.get(mlp_norm) is False and readers and (experts is None or f"{mlp}{recipe.router}.weight" in divided):
        shared.append(SharedInput(mlp_norm, readers, lead, recipe.one_plus, divided))
    return LayerFolds(tuple(rows), tuple(shared))


def _experts(prefix: str, names: dict[str, bool], parts: dict[str, tuple[tuple[str, int], ...]]
             ) -> list[tuple[str, Block]] | None:
    """Each expert's gate_up matrix with its up rows, when every expert's gate_up and down matrices
    are quantized in this unit; else None (a dense layer, or experts kept in full precision)."""
    gate_up = sorted((k for k in names if k.startswith(f"{prefix}gate_up_proj.")), key=lambda k: int(k.rpartition(".")[2]))
    if not gate_up or not all(names[k] and names.get(f"{prefix}down_proj.{k.rpartition('.')[2]}") for k in gate_up):
        return None
    found = []
    for k in gate_up:
        start = 0
        for leaf, rows in parts.get(k, ()):
            if leaf.endswith(".up_proj"):
                found.append((k, Block(k, start, start + rows)))
                break
            start += rows
        else:
            return None
    return found


# What vLLM fuses into one layer of one quantization scheme: all of a group or none of it quantized.
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
         ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"))


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
    experts = {m: {q for k, q in names.items() if k.startswith(f"{block}.mlp.experts.{m}")} for m in ("gate_up_proj", "down_proj")}
    if all(experts.values()) and len(experts["gate_up_proj"] | experts["down_proj"]) > 1:
        return (f"{block}: mlp.experts' gate_up_proj and down_proj would be quantized differently, and serving engines "
                "run an experts layer in one scheme; quantize both or neither (--include/--exclude)")
    return None
