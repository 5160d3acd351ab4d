"""From safetensors headers and config.json to work units, output tensors and shards.

Nothing here touches tensor data: the driver plans a 70B model from a few MB of headers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sinq_ops import QuantConfig, quantized_layout
from sinq_ops.memory import CPU_WORK_PER_ELEMENT, ERROR_CHECK_BYTES, GPU_WORK_PER_FP16_BYTE

from ..architecture import ArchitectureError, ModelLayout, model_layout
from ..io.safetensors_io import DTYPE_NAMES, PlannedTensor, TensorInfo, tensor_bytes
from ..output.layout import shard_names
from ..sources import Source

# A decoder layer: "model.layers.12.", "model.language_model.layers.3.", "transformer.h.7.", ...
LAYER_PATTERN = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks)\.(\d+))\.")
_QUANTIZABLE = ("F16", "BF16", "F32")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class PlanError(ValueError):
    """The checkpoint cannot be quantized as asked; the message says which tensor and why."""


@dataclass(frozen=True)
class TensorTask:
    """One source tensor: where it is, and what the output holds for it."""

    name: str
    file: str
    info: TensorInfo
    quantize: bool
    outputs: tuple[PlannedTensor, ...]
    data: bytes | None = None  # a tensor computed at plan time rather than read from the source

    @property
    def leaf(self) -> str:
        """The module name the reference keys quantized tensors by."""
        return self.name[: -len(".weight")] if self.quantize else self.name


@dataclass(frozen=True)
class Unit:
    index: int
    name: str
    tasks: tuple[TensorTask, ...]

    @property
    def in_bytes(self) -> int:
        return sum(t.info.nbytes for t in self.tasks)

    @property
    def out_bytes(self) -> int:
        return sum(o.nbytes for t in self.tasks for o in t.outputs)

    @property
    def outputs(self) -> list[PlannedTensor]:
        return [o for t in self.tasks for o in t.outputs]


@dataclass
class Plan:
    source: Source
    config: QuantConfig
    units: list[Unit]
    shards: list[list[int]]
    model_config: dict
    assets: list[str]
    not_converted: list[str]
    max_shard_size: int
    notes: list[str] = field(default_factory=list)

    @property
    def shard_names(self) -> list[str]:
        return shard_names(len(self.shards))

    @property
    def in_bytes(self) -> int:
        return sum(u.in_bytes for u in self.units)

    @property
    def out_bytes(self) -> int:
        return sum(u.out_bytes for u in self.units)

    @property
    def quantized(self) -> list[TensorTask]:
        return [t for u in self.units for t in u.tasks if t.quantize]

    def worker_memory_bytes(self, gpu: bool = False) -> int:
        """Peak host memory of one worker: a unit's source and output tensors, plus on a CPU worker
        the fp32 working copies of its largest tensor (the weight, its square, the normalised tiles, codes)."""
        peak = 0
        for u in self.units:
            largest = max((t.info.nbytes // t.info.itemsize for t in u.tasks if t.quantize), default=0)
            peak = max(peak, u.in_bytes + u.out_bytes + (0 if gpu else CPU_WORK_PER_ELEMENT * largest))
        return peak

    def gpu_memory_bytes(self) -> int:
        """Peak GPU memory of one GPU worker, its CUDA context aside: the largest weight on the device,
        what the kernels allocate for it, and the error check's unpacked codes (a byte per weight) and row blocks."""
        sizes = [(t.info.nbytes, t.info.nbytes // t.info.itemsize) for t in self.quantized]
        return max((b + int(GPU_WORK_PER_FP16_BYTE * 2 * n) + n for b, n in sizes), default=0) + ERROR_CHECK_BYTES

    def describe(self) -> str:
        gb = 1e9
        cfg = self.config
        lines = [
            f"source        {self.source.spec}",
            f"quantization  {cfg.method} {cfg.bits}-bit, group {cfg.group_size}, {cfg.tiling} tiling, {cfg.aux} scales",
            f"units         {len(self.units)} ({sum(1 for u in self.units if LAYER_PATTERN.match(u.name + '.'))} decoder layers)",
            f"tensors       {len(self.quantized)} quantized, "
            f"{sum(len(u.tasks) for u in self.units) - len(self.quantized)} copied",
            f"size          {self.in_bytes / gb:.3f} GB in -> {self.out_bytes / gb:.3f} GB out "
            f"({self.in_bytes / max(self.out_bytes, 1):.2f}x smaller)",
            f"shards        {len(self.shards)} (max {self.max_shard_size / gb:.2f} GB each)",
            f"worker memory {self.worker_memory_bytes() / gb:.3f} GB peak per CPU worker; per GPU worker "
            f"{self.worker_memory_bytes(gpu=True) / gb:.3f} GB host, {self.gpu_memory_bytes() / gb:.3f} GB GPU "
            "(plus its CUDA context)",
            f"not converted {', '.join(self.not_converted) or '-'}",
            f"assets        {', '.join(self.assets) or '-'}",
            "",
            f"{'#':>4} {'unit':40s} {'tensors':>7} {'quant':>5} {'in MB':>10} {'out MB':>10} {'shard':>5}",
        ]
        shard_of = {u: i + 1 for i, units in enumerate(self.shards) for u in units}
        for u in self.units:
            q = sum(t.quantize for t in u.tasks)
            lines.append(
                f"{u.index:>4} {u.name[:40]:40s} {len(u.tasks):>7} {q:>5} {u.in_bytes / 1e6:>10.2f} "
                f"{u.out_bytes / 1e6:>10.2f} {shard_of[u.index]:>5}"
            )
        lines.extend(self.notes)
        return "\n".join(lines)


def _generated(name: str, tensor) -> TensorTask:
    data = bytes(tensor_bytes(tensor))
    info = TensorInfo(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), 0, len(data))
    return TensorTask(name, "", info, False, (PlannedTensor(name, tensor.dtype, tuple(tensor.shape)),), data)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def _inventory(source: Source) -> dict[str, tuple[str, TensorInfo]]:
    inventory: dict[str, tuple[str, TensorInfo]] = {}
    files = source.weight_files()
    for file in files:
        for name, info in source.header(file).items():
            if not _SAFE_NAME.match(name) or ".." in name:
                raise PlanError(f"{source.spec}/{file}: tensor name {name!r} is not a plain dotted name")
            if name in inventory:
                raise PlanError(f"{source.spec}: tensor {name!r} appears in both {inventory[name][0]} and {file}")
            inventory[name] = (file, info)
    if source.exists("model.safetensors.index.json"):
        weight_map = source.read_json("model.safetensors.index.json")["weight_map"]
        for name, file in sorted(weight_map.items()):
            if name not in inventory or inventory[name][0] != file:
                raise PlanError(f"{source.spec}: index names tensor {name!r} in {file}, which does not hold it")
    if not inventory:
        raise PlanError(f"{source.spec}: the checkpoint holds no tensors")
    return inventory


def _loadable_layout(source: Source, model_config: dict, inventory: dict[str, tuple[str, TensorInfo]]) -> ModelLayout:
    """The model's layout, once the checkpoint is known to fill it exactly: a source that is itself
    quantized, a tensor with no place in the model or a parameter without a tensor is refused here,
    before any work, instead of ending in an output that cannot load."""
    qc = model_config.get("quantization_config")
    if isinstance(qc, dict):
        raise PlanError(f"{source.spec}/config.json: the checkpoint is already quantized "
                        f"({qc.get('quant_method', 'unknown format')}); quantized sources are not supported")
    try:
        layout = model_layout(model_config)
    except ArchitectureError as exc:
        raise PlanError(f"{source.spec}/config.json: {exc}") from None
    for name, (file, _) in sorted(inventory.items()):
        if name not in layout.places:
            raise PlanError(f"{source.spec}/{file}: tensor {name!r} has no place in {layout.class_name}, the model "
                            "config.json describes, so the output would not load")
    for names in layout.parameter_groups:
        if not any(n in inventory for n in names):
            raise PlanError(f"{source.spec}: no tensor for {names[0]} of {layout.class_name}, so the output would "
                            "not load")
    return layout


def make_plan(
    source: Source,
    config: QuantConfig,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    max_shard_size: int = 4 * 10**9,
) -> Plan:
    """Decide what is quantized, group tensors into units, and lay the units out in shards."""
    model_config = source.read_json("config.json")
    inventory = _inventory(source)
    layout = _loadable_layout(source, model_config, inventory)
    include, exclude = include or [], exclude or []

    layers: dict[tuple[str, int], list[str]] = {}
    others: list[str] = []
    for name in inventory:
        m = LAYER_PATTERN.match(name)
        if m:
            layers.setdefault((m.group(1)[: -len(m.group(2))], int(m.group(2))), []).append(name)
        else:
            others.append(name)

    def task(name: str, in_layer: bool) -> TensorTask:
        file, info = inventory[name]
        quantize = (
            in_layer and len(info.shape) == 2 and name.endswith(".weight") and info.torch_dtype.is_floating_point
            and (not include or _matches(name, include)) and not _matches(name, exclude)
        )
        if not quantize:
            return TensorTask(name, file, info, False, (PlannedTensor(name, info.torch_dtype, info.shape),))
        if layout.linear_weights.get(name) != info.shape:
            raise PlanError(
                f"{source.spec}/{file}: {name} is not the weight of a Linear layer of {layout.class_name}, so its "
                "quantized form would not load or would compute something else; leave it unquantized with "
                f"--exclude '{re.escape(name)}'"
            )
        if info.dtype not in _QUANTIZABLE:
            raise PlanError(f"{source.spec}/{file}: {name} is {info.dtype}; only {', '.join(_QUANTIZABLE)} weights "
                            "are quantized")
        n, k = info.shape
        g = config.group_size
        if k % g or (config.tiling == "2D" and n % g):
            dim = f"in_features={k}" if k % g else f"out_features={n} (2D tiling)"
            raise PlanError(
                f"{source.spec}/{file}: {name} has {dim}, not divisible by group size {g}; "
                f"pick a group size that divides it, or leave it unquantized with --exclude '{re.escape(name)}'"
            )
        leaf = name[: -len(".weight")]
        outputs = tuple(
            PlannedTensor(f"{leaf}.{suffix}", dtype, shape)
            for suffix, (dtype, shape) in quantized_layout((n, k), config).items()
        )
        return TensorTask(name, file, info, True, outputs)

    ordered = [(name, [task(name, False)]) for name in sorted(others)]
    buffers = {n: b for n, b in layout.buffers.items() if n not in inventory}
    if buffers:
        ordered.append(("(model buffers)", [_generated(n, b) for n, b in sorted(buffers.items())]))
    ordered += [(f"{base}{idx}", [task(n, True) for n in sorted(names)]) for (base, idx), names in sorted(layers.items())]
    units = [Unit(i, name, tuple(tasks)) for i, (name, tasks) in enumerate(ordered)]
    if not any(t.quantize for u in units for t in u.tasks):
        raise PlanError(f"{source.spec}: no tensor to quantize (no 2-D weights inside decoder layers match)")

    shards: list[list[int]] = [[]]
    size = 0
    for u in units:
        if shards[-1] and size + u.out_bytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(u.index)
        size += u.out_bytes

    quantized = {t.leaf for u in units for t in u.tasks if t.quantize}
    not_converted = sorted(
        {n[: -len(".weight")] for n, (_, i) in inventory.items()
         if n.endswith(".weight") and len(i.shape) == 2 and "embed" not in n and n[: -len(".weight")] not in quantized}
        | {"lm_head"}
    )
    return Plan(source, config, units, shards, model_config, source.assets(), not_converted, max_shard_size)
