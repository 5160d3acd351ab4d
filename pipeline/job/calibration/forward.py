"""The float model's forward pass, one decoder layer at a time, on a worker's calibration shards.

No machine holds the model: the model is built on the meta device from ``config.json`` and only
the layer being run is made real, from the same tensor tasks the quantize stage reads. The
layer runs inside its own decoder's forward, so masks, rotary embeddings and per-layer-type
attention are the model's own: the other layers are stand-ins, a pre-hook hands the layer the
shard's hidden states, and a hook on its output stops the pass. Hooks on the layer's quantized
Linears and experts modules gather each input's statistics (``stats.SiteStats``); an expert's
inputs are the tokens its router sent it, recomputed from the module's own call and checked
against the module's output before they are trusted.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from ...architecture import decoder_module, empty_model
from ..planned import TensorTask, Unit
from ..unit import _assembled, read_unit
from ...sources import Source
from .stats import SiteStats

logger = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """The model's forward cannot be run layer by layer here: one line says where."""


class _Stop(Exception):
    """Raised by the hook on the running layer's output: the rest of the model is not run."""


class _StandIn(nn.Module):
    """A layer not being run: passes its input on, carrying the real layer's plain attributes
    (``attention_type``, ``layer_type``) that the decoder's loop reads."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        for key, value in vars(layer).items():
            if not key.startswith("_") and not isinstance(value, (nn.Module, Tensor)):
                setattr(self, key, value)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states


class LayerRunner:
    """The meta model of ``model_config`` on one worker, and its shards' hidden states."""

    def __init__(self, source: Source, model_config: dict, device: str) -> None:
        self.source = source
        self.device = device
        self.dtype = torch.float32 if device == "cpu" else _model_dtype(model_config)
        self.model = empty_model(model_config)
        decoder = decoder_module(self.model)
        if decoder is None:
            raise CalibrationError(f"{source.spec}: the model names no decoder of layers to calibrate")
        self.decoder = decoder
        self.prefix = next(n for n, m in self.model.named_modules() if m is decoder)

    # -- making modules real ---------------------------------------------------------------------

    def _materialize(self, tasks: list[TensorTask]) -> list[tuple[nn.Module, str]]:
        """Read ``tasks`` from the source into the model's parameters; the places filled."""
        unit = Unit(-1, "calibration", tuple(tasks))
        raw = read_unit(self.source, unit)
        filled: list[tuple[nn.Module, str]] = []
        for task, tensor, _ in _assembled(self.source, unit, raw):
            owner, _, attr = task.name.rpartition(".")
            module = self.model.get_submodule(owner)
            current = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
            if current is None or (task.expert is None and current.device.type != "meta"):
                continue  # not the model's (dropped on load), or a buffer the model computed itself
            value = tensor.to(self.device, self.dtype if tensor.is_floating_point() else tensor.dtype)
            if task.expert is not None:
                if current.device.type == "meta":
                    current = torch.empty(current.shape, dtype=value.dtype, device=self.device)
                    _put(module, attr, current)
                    filled.append((module, attr))
                current.data[task.expert] = value
                continue
            _put(module, attr, value.reshape(current.shape))
            filled.append((module, attr))
        return filled

    @staticmethod
    def _release(filled: list[tuple[nn.Module, str]]) -> None:
        for module, attr in filled:
            tensor = module._parameters.get(attr) if attr in module._parameters else module._buffers[attr]
            _put(module, attr, torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"))

    def _check_real(self, module: nn.Module, what: str) -> None:
        left = [n for n, p in module.named_parameters() if p.device.type == "meta"]
        if left:
            raise CalibrationError(f"{self.source.spec}: {what}: no tensor of the checkpoint fills {left[0]}, "
                                   "which the forward needs")

    # -- running -----------------------------------------------------------------------------------

    def _layers(self) -> nn.ModuleList:
        lists = [m for m in self.decoder.children() if isinstance(m, nn.ModuleList)]
        if len(lists) != 1:
            raise CalibrationError(f"{self.source.spec}: the decoder holds {len(lists)} lists of layers; A-SINQ "
                                   "calibration runs decoders with one")
        return lists[0]

    @contextmanager
    def _only(self, index: int, hidden: Tensor | None) -> Iterator[dict]:
        """The decoder with every layer but ``index`` a stand-in; that layer is handed ``hidden``
        (or, with None, its input is captured and the pass stopped before it runs)."""
        layers = self._layers()
        kept = list(layers)
        caught: dict = {}
        for i, layer in enumerate(kept):
            if i != index:
                layers[i] = _StandIn(layer)
        target = kept[index]

        def enter(module, args, kwargs):
            if hidden is None:
                caught["input"] = args[0] if args else kwargs["hidden_states"]
                raise _Stop
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        def leave(module, args, kwargs, output):
            caught["output"] = output[0] if isinstance(output, (tuple, list)) else output
            raise _Stop

        hooks = [target.register_forward_pre_hook(enter, with_kwargs=True),
                 target.register_forward_hook(leave, with_kwargs=True)]
        try:
            yield caught
        finally:
            for h in hooks:
                h.remove()
            for i, layer in enumerate(kept):
                layers[i] = layer

    def _call(self, caught: dict, **inputs) -> None:
        try:
            with torch.no_grad():
                self.decoder(**inputs, use_cache=False)
        except _Stop:
            return
        except Exception as exc:  # noqa: BLE001 - the model's forward failed here: one line naming it
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CalibrationError(f"{self.source.spec}: the float forward for calibration failed: "
                                   f"{type(exc).__name__}: {text}") from None
        raise CalibrationError(f"{self.source.spec}: the decoder's forward never reached the layer being calibrated")

    def embed(self, tasks: list[TensorTask], ids: Tensor) -> Tensor:
        """The first layer's input for token ids ``ids`` ``[sequences, length]``: the decoder's own
        embedding (and whatever it does before its layers) from the decoder's non-layer tensors."""
        filled = self._materialize(tasks)
        try:
            out = []
            for row in ids:
                with self._only(0, None) as caught:
                    self._call(caught, input_ids=row.unsqueeze(0).to(self.device))
                out.append(caught["input"].to(self.dtype))
            return torch.cat(out)
        finally:
            self._release(filled)

    @contextmanager
    def layer(self, block: str, tasks: list[TensorTask]) -> Iterator["LayerCall"]:
        """The decoder layer ``block`` made real from ``tasks`` for the block's duration; the shards'
        hidden states go through it by calls of what it yields."""
        layers = self._layers()
        index = next((i for i, layer in enumerate(layers) if layer is self.model.get_submodule(block)), None)
        if index is None:
            raise CalibrationError(f"{self.source.spec}: {block} is not one of the decoder's layers")
        filled = self._materialize(tasks)
        try:
            self._check_real(layers[index], block)
            yield LayerCall(self, index, tasks)
        finally:
            self._release(filled)

    def _hooks(self, tasks: list[TensorTask], sites: dict[str, SiteStats], site_of: dict[str, str], cap: int,
               expert_cap: int, seen: dict) -> list:
        """Hooks adding the inputs of ``tasks``' quantized matrices to ``sites``; ``site_of`` maps each
        Linear's leaf to the site it reads (the first leaf that read the same input tensor)."""
        hooks = []

        for task in [t for t in tasks if t.quantize and t.expert is None]:
            def record(module, args, leaf=task.leaf):
                x = args[0]
                site = seen.get(id(x), (None, None))[1]
                if site is None:
                    site = leaf
                    seen[id(x)] = (x, leaf)
                    sites.setdefault(site, SiteStats(cap)).add(x.reshape(-1, x.shape[-1]))
                site_of[leaf] = site

            hooks.append(self.model.get_submodule(task.leaf).register_forward_pre_hook(record))
        experts = sorted({t.name.rpartition(".")[0] for t in tasks if t.quantize and t.expert is not None})
        for name in experts:
            hooks += _expert_hooks(self.model.get_submodule(name), name, sites, expert_cap)
        return hooks


class LayerCall:
    """One real layer of a ``LayerRunner``: runs a shard's hidden states through it."""

    def __init__(self, runner: LayerRunner, index: int, tasks: list[TensorTask]) -> None:
        self.runner, self.index, self.tasks = runner, index, tasks

    def __call__(self, hidden: Tensor, sites: dict[str, SiteStats] | None = None,
                 site_of: dict[str, str] | None = None, cap: int = 0, expert_cap: int = 0) -> Tensor:
        """``hidden`` ``[sequences, length, hidden]`` through the layer, a sequence at a time; with
        ``sites``, each quantized input's statistics are added to it, in token order (``_hooks``)."""
        r = self.runner
        # id of an input tensor within one layer call -> (the tensor, kept alive so that its id is not
        # reused by a later input of the same call, and its site); emptied after each call
        seen: dict[int, tuple[Tensor, str]] = {}
        hooks = r._hooks(self.tasks, sites, {} if site_of is None else site_of, cap, expert_cap, seen) \
            if sites is not None else []
        try:
            out = torch.empty_like(hidden)
            for i, row in enumerate(hidden):
                x = row.unsqueeze(0).to(r.device, r.dtype)
                with r._only(self.index, x) as caught:
                    r._call(caught, inputs_embeds=torch.zeros_like(x))
                out[i] = caught["output"][0].to(out.dtype)
                seen.clear()
            return out
        finally:
            for h in hooks:
                h.remove()


def _expert_hooks(module: nn.Module, name: str, sites: dict[str, SiteStats], cap: int) -> list:
    """Statistics of each expert's inputs from the tokens routed to it: the gate/up input is those
    tokens' hidden states, the down input the expert's own activation of them. Taken only from an
    experts module of the gate_up/down form, whose output the recomputation reproduces."""
    params = dict(module.named_parameters(recurse=False))
    form = set(params) == {"gate_up_proj", "down_proj"} and callable(getattr(module, "act_fn", None))
    if not form:
        logger.warning("%s: experts of another form (%s); they are quantized without an activation scale",
                       name, ", ".join(sorted(params)))
        return []
    transposed = bool(getattr(module, "is_transposed", False))
    pending: dict = {}

    def enter(mod, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
        pending["inputs"] = values[:3]

    def leave(mod, args, kwargs, output):
        x, index, weights = pending.pop("inputs")
        x = x.reshape(-1, x.shape[-1]).float()
        index = index.reshape(x.shape[0], -1)
        weights = weights.reshape(x.shape[0], -1).float()
        gate_up, down = mod.gate_up_proj, mod.down_proj  # one expert at a time in float32, never all
        got = output[0] if isinstance(output, (tuple, list)) else output
        rebuilt = torch.zeros_like(x[:, : got.shape[-1]]) if got.shape[-1] <= x.shape[-1] else None
        per_expert = []
        for e in range(gate_up.shape[0]):
            token, slot = torch.where(index == e)
            h = x[token]
            gu = h @ (gate_up[e].float() if transposed else gate_up[e].float().t())
            g, u = gu.chunk(2, dim=-1)
            inner = mod.act_fn(g) * u
            o = inner @ (down[e].float() if transposed else down[e].float().t())
            if rebuilt is not None:
                rebuilt.index_add_(0, token, o * weights[token, slot, None])
            per_expert.append((h, inner))
        got = got.reshape(-1, got.shape[-1]).float()
        if rebuilt is None or rebuilt.shape != got.shape or not torch.allclose(
                rebuilt, got, rtol=1e-2, atol=1e-3 * float(got.abs().max().clamp_min(1e-6))):
            logger.warning("%s: its output is not the gate_up/down form's; its experts are quantized without an "
                           "activation scale", name)
            return
        for e, (h, inner) in enumerate(per_expert):
            sites.setdefault(f"{name}.gate_up_proj.{e}", SiteStats(cap)).add(h)
            sites.setdefault(f"{name}.down_proj.{e}", SiteStats(cap)).add(inner)

    return [module.register_forward_pre_hook(enter, with_kwargs=True),
            module.register_forward_hook(leave, with_kwargs=True)]


def _put(module: nn.Module, attr: str, value: Tensor) -> None:
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _model_dtype(model_config: dict) -> torch.dtype:
    name = str(model_config.get("torch_dtype") or model_config.get("dtype") or "bfloat16")
    return {"float16": torch.float16, "float32": torch.float32}.get(name, torch.bfloat16)
