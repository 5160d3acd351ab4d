"""The model a config.json describes, built by transformers on the meta device.

What is quantized follows from this model's structure, never from tensor names: the weight of
every ``torch.nn.Linear`` (and of GPT-2's ``Conv1D``, quantized as its [out, in] transpose) and every matrix of an experts module (a module holding 3-D parameters,
one matrix per expert) is a candidate; a Linear that sits directly in a mixture-of-experts block
beside its experts computes a routing or gating signal (``shared_expert_gate``) and is kept, as
are routers (their own module classes), embeddings, norms and every other parameter.

The planner also checks against it that the output will load and compute what the source does:
every checkpoint tensor must have a place in the model (after transformers' own renaming of
checkpoint keys, ``pipeline.conversion``), and every parameter a tensor. It gives the buffers a
model computes from its config (rotary frequencies and the like: checkpoints do not store them,
but the reference loader insists on finding every buffer of the model it builds, so the output
carries them). The loader builds the model it fills here too. Parameters take no memory.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

# Experts modules that transformers does not describe with ``use_experts_implementation``
# (which sets ``is_transposed``): whether each stores its matrices [in, out].
_TRANSPOSED_EXPERTS = {"Llama4TextExperts": True, "JetMoeParallelExperts": False}


_BUILDING = threading.Lock()


class ArchitectureError(ValueError):
    """transformers cannot build the model that config.json describes."""


def read_config(model_config: dict):
    """``config.json`` as transformers reads it: through its own file reader (which decodes the
    ``{"__float__": "Infinity"}`` it writes for infinite floats, as the Mamba hybrids'
    ``time_step_limit``) into the config class of its ``model_type``, never running repository code.
    The source's ``quantization_config`` is left out: this tool decodes the source's format itself."""
    import transformers

    cfg = {k: v for k, v in model_config.items() if k != "quantization_config"}
    with tempfile.TemporaryDirectory(prefix="sinq-config-") as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        return transformers.AutoConfig.from_pretrained(tmp, trust_remote_code=False)


_INDEX = re.compile(r"\.(\d+)(?=\.)")


def check_layer_count(model_config: dict, names: list[str]) -> None:
    """Refuse, before transformers spends time and memory building it, a model whose config names
    more decoder layers than the checkpoint's tensor names could hold: every layer has parameters,
    stored under its index, so no index in ``names`` reaching ``num_hidden_layers - 1`` means layers
    no tensor fills (a config of 5000 layers over a checkpoint of two would take a minute and a
    gigabyte to build before any tensor is compared)."""
    try:
        layers = read_config(model_config).get_text_config().num_hidden_layers
    except Exception:  # noqa: BLE001 - a config transformers cannot read is reported when the model is built
        return
    if not isinstance(layers, int):
        return
    held = max((int(m) for n in names for m in _INDEX.findall(n)), default=-1) + 1
    # Some models count layers their names do not index alike (HRM's two stacks under one count): only
    # a config far beyond what the names could fill, where building it is what costs, is refused here.
    if layers > 2 * held + 64:
        raise ArchitectureError(f"names {layers} decoder layers (num_hidden_layers), but no tensor of the checkpoint "
                                f"has an index above {held - 1}, so at most {held} layers are filled; fix "
                                "num_hidden_layers")


def empty_model(model_config: dict) -> nn.Module:
    """The model class ``model_config`` names (its ``architectures``: a vision-language wrapper such
    as ``Qwen2_5_VLForConditionalGeneration`` included), else its ``AutoModelForCausalLM``, with its
    parameters on the meta device."""
    import transformers
    from accelerate import init_empty_weights

    config = read_config(model_config)
    named = (model_config.get("architectures") or [None])[0]
    cls = getattr(transformers, named, None) if isinstance(named, str) else None
    # init_empty_weights patches nn.Module for the whole process, and transformers sets the default
    # dtype while it builds: two threads building at once (concurrent jobs in one driver) would leave
    # either patched for everything after.
    with _BUILDING, init_empty_weights(include_buffers=False):
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls._from_config(config)
        return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def decoder_module(model: nn.Module) -> nn.Module | None:
    """The language model's decoder (``get_decoder()``), where it holds layers: BERT-style heads name
    their output projection ``decoder``, which is no decoder of layers."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if not isinstance(decoder, nn.Module) or not any(isinstance(m, nn.ModuleList) for m in decoder.modules()):
        return None
    return decoder


def decoder_prefix(model: nn.Module) -> str:
    """The module name of the language model's decoder (``model``, ``model.language_model``, ...):
    its layers are the ones quantized by default, a vision or audio tower's are not."""
    decoder = decoder_module(model)
    for name, module in model.named_modules():
        if module is decoder:
            return name
    return ""


@dataclass(frozen=True)
class ExpertWeights:
    """A 3-D parameter of an experts module: ``experts`` matrices stacked on the first dimension.

    Each expert's matrix is quantized as a weight of its own, in the orientation the module
    computes with: ``[out, in]``. A transposed parameter stores ``[in, out]`` and is quantized as
    its transpose, so that groups run along the input features as for a Linear.
    """

    name: str
    experts: int
    stored: tuple[int, int]  # one expert's matrix as the parameter stores it
    transposed: bool

    @property
    def shape(self) -> tuple[int, int]:
        """One expert's matrix as quantized: [out, in]."""
        return (self.stored[1], self.stored[0]) if self.transposed else self.stored


@dataclass(frozen=True)
class ModelLayout:
    """What a checkpoint must hold for the model to load from it, and what of it is quantizable."""

    class_name: str
    linear_weights: dict[str, tuple[int, ...]]  # weight of every quantizable nn.Linear -> [out, in]
    linear_modules: frozenset[str]  # every module that is a Linear, of any subclass (lm_head, Llama 4's router)
    conv1d_weights: dict[str, tuple[int, int]]  # weight of every GPT-2-style Conv1D -> as stored, [in, out]
    expert_weights: dict[str, ExpertWeights]  # every 3-D parameter of an experts module
    places: frozenset[str]  # every parameter and buffer name, shared (tied) ones under each name
    ignored: tuple[str, ...]  # checkpoint-name patterns transformers drops on load (DeepSeek-V3's MTP layer)
    parameter_groups: tuple[tuple[str, ...], ...]  # the names of each parameter, tied ones together
    buffers: dict[str, torch.Tensor]
    decoder: str  # the language model's decoder module ("" when the model names none)
    kinds: dict[str, str]  # parameter or buffer name -> class name of the module that holds it
    shapes: dict[str, tuple[int, ...]]  # parameter or buffer name -> shape
    model: nn.Module = field(repr=False, compare=False)  # on the meta device


_LINEAR_CLASSES: dict[type, bool] = {}


def computes_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.nn.Linear`` whose forward computes ``x W^T + b`` and nothing
    else, so that a ``SINQLinear`` can take its place: Linear itself, and subclasses such as Falcon's
    ``FalconLinear`` once a small probe of their own forward, on real tensors, gives that map. A
    router (Llama 4's is a Linear that also picks experts) or a subclass computing anything else is
    kept in full precision."""
    cls = type(module)
    if cls is nn.Linear or (isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward):
        return "Router" not in cls.__name__
    if not isinstance(module, nn.Linear) or "Router" in cls.__name__:
        return False
    if cls not in _LINEAR_CLASSES:
        _LINEAR_CLASSES[cls] = _probe_linear(module)
    return _LINEAR_CLASSES[cls]


def _probe_linear(module: nn.Linear) -> bool:
    """Run ``module``'s own forward on a 3 x 5 copy of it with real tensors, against ``F.linear``."""
    probe = type(module).__new__(type(module))
    probe.__dict__.update(module.__dict__)
    probe._parameters, probe._buffers, probe._modules = {}, dict(module._buffers), dict(module._modules)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, generator=g)
    bias = torch.randn(3, generator=g) if module.bias is not None else None
    probe.in_features, probe.out_features = 5, 3
    probe.weight = nn.Parameter(weight, requires_grad=False)
    probe.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
    x = torch.randn(2, 5, generator=g)
    try:
        with torch.no_grad():
            out = probe(x)
    except Exception:  # noqa: BLE001 - a forward that cannot run on a plain weight is not a plain Linear
        return False
    want = torch.nn.functional.linear(x, weight, bias)
    return isinstance(out, torch.Tensor) and out.shape == want.shape and torch.allclose(out, want, atol=1e-5)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a Linear that stores its weight [in, out] and computes ``x @ W + b``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def experts_transposed(module: nn.Module) -> bool:
    """Whether an experts module stores its matrices [in, out] (``ArchitectureError`` if unknown)."""
    transposed = getattr(module, "is_transposed", None)
    if isinstance(transposed, bool):
        return transposed
    name = type(module).__name__
    if name in _TRANSPOSED_EXPERTS:
        return _TRANSPOSED_EXPERTS[name]
    raise ArchitectureError(f"{name} holds 3-D expert parameters in a layout this tool does not know "
                            "(transformers does not describe it); its matrices cannot be quantized")


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Experts modules: those transformers marks as such (``use_experts_implementation`` sets
    ``is_transposed``) or that count their experts (``num_experts``), holding floating 3-D
    parameters, one matrix per expert. A convolution's 3-D kernel is no expert."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            continue
        if not any(p.dim() == 3 and p.is_floating_point() for p in m.parameters(recurse=False)):
            continue
        if hasattr(m, "is_transposed") or hasattr(m, "num_experts") or type(m).__name__ in _TRANSPOSED_EXPERTS:
            found[name] = m
    return found


def _routes(name: str, linear: nn.Linear, blocks: dict[str, tuple[str, int]]) -> bool:
    """Whether a Linear routes or gates for a mixture of experts, and so is kept: it sits directly
    beside an experts module (``shared_expert_gate``), or inside a module beside one and scores
    one output per expert (Gemma 4's ``router.proj``). ``blocks`` maps each module holding an
    experts module to that module's name and expert count. A Linear inside a transformers
    ``*Router`` module (DBRX's ``router.layer``) is kept as well, experts module or not."""
    parts = name.split(".")
    if ".".join(parts[:-1]) in blocks:
        return True
    for depth in range(len(parts) - 1):
        block = ".".join(parts[:depth])
        if block in blocks:
            experts_name, count = blocks[block]
            if not name.startswith(f"{experts_name}.") and linear.out_features == count:
                return True
    return False


def model_layout(model_config: dict) -> ModelLayout:
    """The layout of the model in ``model_config``; ``ArchitectureError`` if transformers cannot
    build it (an unknown ``model_type``, a class it does not have)."""
    try:
        model = empty_model(model_config)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the config cannot be built
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArchitectureError(f"transformers cannot build the model config.json describes ({text})") from None
    model.tie_weights()  # every tie transformers makes (a wrapper's language model's too): one tensor fills them
    experts_modules = expert_modules(model)
    experts: dict[str, ExpertWeights] = {}
    counts: dict[str, int] = {}  # experts module -> its number of experts
    for mname, module in experts_modules.items():
        transposed = experts_transposed(module)
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and p.is_floating_point():
                name = f"{mname}.{pname}"
                experts[name] = ExpertWeights(name, p.shape[0], (p.shape[1], p.shape[2]), transposed)
                counts[mname] = p.shape[0]
    routers = [name for name, m in model.named_modules() if "Router" in type(m).__name__]
    blocks = {m.rpartition(".")[0]: (m, count) for m, count in counts.items()}
    linear = {f"{name}.weight": tuple(m.weight.shape) for name, m in model.named_modules()
              if computes_linear(m) and not _routes(name, m, blocks)
              and not any(name.startswith(f"{r}.") for r in routers)}
    groups: dict[int, list[str]] = {}
    kinds: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            name = f"{mname}.{pname}" if mname else pname
            groups.setdefault(id(p), []).append(name)
            kinds[name], shapes[name] = type(module).__name__, tuple(p.shape)
        for bname, b in module.named_buffers(recurse=False):
            name = f"{mname}.{bname}" if mname else bname
            if b is not None:
                kinds[name], shapes[name] = type(module).__name__, tuple(b.shape)
    buffers = {name: b.detach().cpu().contiguous() for name, b in model.named_buffers() if b is not None}
    places = frozenset(n for names in groups.values() for n in names) | frozenset(buffers)
    linear_modules = frozenset(name for name, m in model.named_modules() if isinstance(m, nn.Linear))
    conv1d = {f"{name}.weight": tuple(m.weight.shape) for name, m in model.named_modules() if is_conv1d(m)}
    ignored = tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    return ModelLayout(type(model).__name__, linear, linear_modules, conv1d, experts, places, ignored,
                       tuple(tuple(g) for g in groups.values()), buffers, decoder_prefix(model), kinds, shapes, model)


@functools.lru_cache(maxsize=2)
def _shared_layout(config_json: str) -> ModelLayout:
    return model_layout(json.loads(config_json))


def shared_layout(model_config: dict) -> ModelLayout:
    """``model_layout``, built once for the planner and the commit check of the same config. Its model
    must be read, never changed (``load_source`` fills a layout of its own)."""
    return _shared_layout(json.dumps(model_config, sort_keys=True))


def model_buffers(model_config: dict) -> dict[str, torch.Tensor]:
    """Buffer name -> tensor for the architecture in ``model_config``."""
    return model_layout(model_config).buffers


def output_problem(model_config: dict, names: list[str], leaves: list[str], unwritten: frozenset[str],
                   leaf_of: Callable[[str], str]) -> str | None:
    """The first reason an output holding tensors ``names``, of which ``leaves`` are quantized
    (``leaf_of`` names the leaf a tensor belongs to, else gives the tensor's own name), would not load into the model ``model_config`` describes;
    ``None`` when every tensor has a place and every parameter and buffer (but the ``unwritten``
    buffers, which no safetensors dtype holds and every loader recomputes) has a tensor.

    The planner checks the source against the model before any work; this checks the output itself,
    just before its manifest makes it complete, so a planning mistake can never commit."""
    layout = shared_layout(model_config)
    quantized = set(leaves)
    modules = set(layout.linear_modules) | {w.removesuffix(".weight") for w in layout.conv1d_weights}
    supplied: set[str] = set()
    experts: dict[str, set[int]] = {}
    for name in sorted(names):
        leaf = leaf_of(name)
        if leaf == name or leaf not in quantized:
            if name not in layout.places:
                return f"output tensor {name!r} has no place in {layout.class_name}"
            supplied.add(name)
            continue
        param, _, number = leaf.rpartition(".")
        if leaf in modules:
            supplied.add(f"{leaf}.weight")
        elif param in layout.expert_weights and number.isdigit() and int(number) < layout.expert_weights[param].experts:
            experts.setdefault(param, set()).add(int(number))
        else:
            return f"output tensor {name!r} belongs to no Linear or expert matrix of {layout.class_name}"
    supplied.update(p for p, got in experts.items() if len(got) == layout.expert_weights[p].experts)
    for group in layout.parameter_groups:
        if not supplied.intersection(group):
            return f"no output tensor for {group[0]} of {layout.class_name}"
    missing = sorted(set(layout.buffers) - unwritten - supplied)
    return f"no output tensor for buffer {missing[0]} of {layout.class_name}" if missing else None
