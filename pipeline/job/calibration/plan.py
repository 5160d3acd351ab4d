"""The calibration stage's plan: which tensors make the first layer's input, the decoder layers in
order with their tensors, how the sequences are cut into shards, and what a worker holds.

Made from the quantize plan, never from tensor data: the same tasks the units read are what the
forward reads, so calibration and quantization see the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..planned import LAYER_PATTERN, Plan, TensorTask
from .options import CalibrationOptions

# Sequences are cut into at most this many shards: each shard's statistics travel to the driver
# and are merged in shard order, so the output is the same on any number of workers up to it.
MAX_SHARDS = 32
_ACTIVATION_WIDTHS = 6  # a layer's widest intermediate values per token, in multiples of its widest matrix input


@dataclass(frozen=True)
class CalibrationLayer:
    block: str  # the decoder layer, e.g. model.layers.7
    tasks: tuple[TensorTask, ...]

    @property
    def quantized(self) -> list[TensorTask]:
        return [t for t in self.tasks if t.quantize]

    @property
    def widest_input(self) -> int:
        return max((t.shape[0] if t.transpose else t.shape[-1] for t in self.quantized), default=0)


@dataclass(frozen=True)
class CalibrationPlan:
    options: CalibrationOptions
    decoder: str  # the language model's decoder module; its layers are run
    embed: tuple[TensorTask, ...]  # the decoder's tensors outside its layers (the embedding among them)
    layers: tuple[CalibrationLayer, ...]
    hidden_size: int

    @property
    def shards(self) -> int:
        return min(self.options.sequences, MAX_SHARDS)

    def shard_sequences(self, shard: int) -> range:
        """The sequences of ``shard``: consecutive, as even as the count allows."""
        n, k = self.options.sequences, self.shards
        return range(shard * n // k, (shard + 1) * n // k)

    def shard_cap(self, cap: int) -> int:
        """Sample rows one shard keeps of a site (``cap`` over all shards, spread evenly)."""
        return max(1, math.ceil(cap / self.shards))

    def workers(self, available: int) -> int:
        return max(1, min(available, self.shards))

    def memory_bytes(self, workers: int, gpu: bool) -> dict[str, int]:
        """What one calibration worker holds at its peak: its shards' hidden states (in and out), one
        layer's weights as the forward computes with them, one sequence's activations through the
        layer, and its shards' statistics of that layer (sums and sample rows)."""
        width = 2 if gpu else 4  # bf16 on a GPU, float32 on a CPU
        per_worker = math.ceil(self.shards / self.workers(workers))
        sequences = max(len(self.shard_sequences(s)) for s in range(self.shards)) * per_worker
        hidden = 2 * sequences * self.options.length * self.hidden_size * width
        layer = max((sum(t.numel for t in layer.tasks) * width for layer in self.layers), default=0)
        widest = max((layer.widest_input for layer in self.layers), default=self.hidden_size)
        activations = _ACTIVATION_WIDTHS * self.options.length * max(widest, self.hidden_size) * 4
        stats = max((_stats_bytes(layer, self.shard_cap(self.options.sample), self.shard_cap(self.options.expert_sample))
                     for layer in self.layers), default=0) * per_worker
        return {"hidden": hidden, "layer": layer, "activations": activations, "stats": stats,
                "total": hidden + layer + activations + stats}

    def describe(self, workers: int, gpu: bool, text: str | None = None) -> str:
        """The dry run's lines; ``text`` names where the tokens come from (default: the options' text)."""
        o = self.options
        m = self.memory_bytes(workers, gpu)
        n = self.workers(workers)
        gb = 1e9
        return "\n".join([
            f"calibration   {o.sequences} x {o.length} tokens of {text or o.resolved_text()}, through {len(self.layers)} "
            f"decoder layers one at a time; searches on {o.sample} tokens a matrix ({o.expert_sample} an expert)",
            f"  shards      {self.shards} of {len(self.shard_sequences(0))}-{len(self.shard_sequences(self.shards - 1))} "
            f"sequences on {n} workers ({'GPU, bf16' if gpu else 'CPU, float32'} forward)",
            f"  per worker  {m['total'] / gb:.2f} GB: hidden states {m['hidden'] / gb:.2f} (in and out), one layer "
            f"{m['layer'] / gb:.2f}, activations {m['activations'] / gb:.2f}, statistics {m['stats'] / gb:.2f}",
            f"  all workers hidden states {2 * o.tokens * self.hidden_size * (2 if gpu else 4) / gb:.2f} GB "
            f"(in and out), sharded",
        ])


def _stats_bytes(layer: CalibrationLayer, cap: int, expert_cap: int) -> int:
    """Sums (float64) and up to twice the cap of float32 sample rows per quantized input."""
    total = 0
    for t in layer.quantized:
        k = t.shape[0] if t.transpose else t.shape[-1]
        total += k * (8 + 2 * 4 * (expert_cap if t.expert is not None else cap))
    return total


def calibration_plan(plan: Plan, options: CalibrationOptions, decoder: str) -> CalibrationPlan:
    """The decoder's layers of ``plan`` in order, each with every tensor of its units."""
    prefix = f"{decoder}." if decoder else ""
    layers: dict[str, list[TensorTask]] = {}
    embed: list[TensorTask] = []
    for unit in plan.units:
        m = LAYER_PATTERN.match(unit.block + ".")
        if m is not None and unit.block.startswith(prefix):
            layers.setdefault(unit.block, []).extend(unit.tasks)
        elif m is None:
            embed.extend(t for t in unit.tasks if t.name.startswith(prefix) and LAYER_PATTERN.match(t.name) is None)
    ordered = sorted(layers, key=lambda b: int(LAYER_PATTERN.match(b + ".").group(2)))
    text = plan.model_config.get("text_config") or plan.model_config
    hidden = int(text.get("hidden_size") or text.get("d_model") or text.get("n_embd") or 0)
    return CalibrationPlan(options, decoder, tuple(embed), tuple(CalibrationLayer(b, tuple(layers[b])) for b in ordered),
                           hidden)
