"""The commit check's last step: the output model's forward pass, before its manifest makes it complete.

A job that exits 0 must leave a model that runs. Loading alone does not show it: a model may read
something of a Linear outside that Linear's forward (Jamba's Mamba mixer multiplies by
``dt_proj.weight``, DeepSeek-V3.2's indexer asks ``weights_proj.weight.dtype``), and only running it
tells whether the quantized form gives it. The model is built from the plan, each quantized matrix a
placeholder of the layout the workers will write, and run on a few tokens:

- first on fake tensors (shapes on the meta device, no data), where transformers takes the paths it
  keeps for tracing: the same cost for a 70B model as for a tiny one; a failure there is the
  output's when the float model of the same config runs;
- where fake tensors cannot run the architecture at all (the float model fails on them too: a
  data-dependent shape), on real tensors of random values, if the model is small enough;
- otherwise the check is not run, and the job says so.
"""

from __future__ import annotations

import inspect
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from sinq_ops import QuantConfig, QuantizedWeight

from .architecture import decoder_module, empty_model, expert_modules
from .quantized import install

# Largest model run on real tensors when fake ones cannot run it (parameters, at 4 bytes each).
REAL_FORWARD_PARAMS = 300_000_000
_TOKENS = 4


@dataclass(frozen=True)
class ForwardCheck:
    problem: str | None  # "<module>: <error>" where the output's forward fails
    how: str  # "fake tensors", "real tensors" or "not run (<why>)"


def check_forward(model_config: dict, leaves: dict[str, tuple[int, int]], config: QuantConfig) -> ForwardCheck:
    """Run the output model's forward pass, ``leaves`` (leaf -> [out, in] as quantized) quantized."""
    found = _attempt(_output_model(model_config, leaves, config, "meta"), lambda: _float_model(model_config, "meta"),
                     fake=True)
    if found is not _INCONCLUSIVE:
        return ForwardCheck(found, "fake tensors")
    output = _output_model(model_config, leaves, config, "cpu")
    params = sum(p.numel() for p in output.parameters()) + sum(math.prod(s) for s in leaves.values())
    if params > REAL_FORWARD_PARAMS:
        return ForwardCheck(None, f"not run (fake tensors cannot run {type(output).__name__}, and at {params:,} "
                                  "parameters it is too large for real ones)")
    found = _attempt(_materialized(output), lambda: _materialized(_float_model(model_config, "cpu")), fake=False)
    if found is not _INCONCLUSIVE:
        return ForwardCheck(found, "real tensors")
    return ForwardCheck(None, f"not run ({type(output).__name__} does not run on token ids alone)")


_INCONCLUSIVE = "inconclusive"


def _attempt(output: nn.Module, source: Callable[[], nn.Module], *, fake: bool) -> str | None:
    """The output's problem, None, or ``_INCONCLUSIVE`` where the float model fails as well.

    The model itself runs on token ids, or, where it cannot without other inputs (a vision-language
    model that wants pixel values), its language model's decoder. A failure counts only where the
    float model of the same config runs: what fails there too is a limit of the check, not a finding."""
    float_model = None  # built only when the output fails
    for whole in (True, False):
        problem = _run(output, fake=fake, whole=whole)
        if problem is None:
            return None
        float_model = float_model or source()
        if _run(float_model, fake=fake, whole=whole) is None:
            return problem
    return _INCONCLUSIVE


def _float_model(model_config: dict, device: str) -> nn.Module:
    model = empty_model(model_config)
    if device == "meta":
        _meta_ready(model)
    return model


def _output_model(model_config: dict, leaves: dict[str, tuple[int, int]], config: QuantConfig,
                  device: str) -> nn.Module:
    """The output's model with placeholder quantized weights (zeros on ``device``)."""
    model = empty_model(model_config)
    weights = {leaf: _placeholder(shape, config, device) for leaf, shape in leaves.items()}
    biases = {}
    for leaf in weights:
        try:
            biases[leaf] = getattr(model.get_submodule(leaf), "bias", None)
        except AttributeError:
            continue
    install(model, weights, biases, torch.float32)
    if device == "meta":
        _meta_ready(model)
    return model


def _placeholder(shape: tuple[int, int], config: QuantConfig, device: str) -> QuantizedWeight:
    q = QuantizedWeight.placeholder(shape, config, device)
    if device != "meta":
        for t in [q.qweight, q.scale2, *_group_tensors(q.scale), *_group_tensors(q.zero)]:
            t.zero_()
        q.scale2.fill_(1)
    return q


def _group_tensors(values) -> list[torch.Tensor]:
    return list(values.tensors().values()) if hasattr(values, "tensors") else [values]


def _meta_ready(model: nn.Module) -> None:
    """Everything on the meta device; experts left in full precision computed without a loop over
    the experts the data selects."""
    if callable(getattr(model, "set_experts_implementation", None)) and expert_modules(model):
        model.set_experts_implementation("batched_mm")
    model.to("meta")


def _materialized(model: nn.Module) -> nn.Module:
    """``model``'s meta parameters as small random values (its buffers are already real)."""
    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.device.type == "meta":
                value = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02 if p.is_floating_point() \
                    else torch.zeros(p.shape, dtype=p.dtype)
                module._parameters[name] = nn.Parameter(value, requires_grad=False)
    return model.eval()


def text_entry(model: nn.Module, whole: bool = True) -> nn.Module:
    """The module to run on token ids alone: the model, unless its forward requires more (BLIP-2
    wants pixel values) or not ``whole``, then its language model's decoder."""
    required = [n for n, p in inspect.signature(model.forward).parameters.items()
                if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if whole and set(required) <= {"input_ids"}:
        return model
    decoder = decoder_module(model)
    return decoder if decoder is not None else model


def _run(model: nn.Module, *, fake: bool, whole: bool) -> str | None:
    """The first error of ``model``'s forward on a few tokens, naming the innermost module running."""
    running: list[str] = []  # the modules whose forward is under way, innermost last
    names = {m: n for n, m in model.named_modules()}

    def enter(module: nn.Module, _args) -> None:
        running.append(names[module])

    def leave(module: nn.Module, _args, _out) -> None:
        running.pop()

    hooks = [h for m in names for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    entry = text_entry(model, whole)
    device = "meta" if fake else "cpu"
    ids = torch.ones(1, _TOKENS, dtype=torch.long, device=device)
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # it logs a traceback for every operation fake tensors cannot run
    try:
        with (FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()), \
                torch.no_grad():
            entry(input_ids=ids, use_cache=False)
    except Exception as exc:  # noqa: BLE001 - whatever the forward raises is the reason not to commit
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = running[-1] if running and running[-1] else type(model).__name__
        return f"{where}: {type(exc).__name__}: {text}"
    finally:
        quiet.setLevel(level)
        for h in hooks:
            h.remove()
    return None
