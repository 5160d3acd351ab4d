"""What a plan is: units of tensor tasks, laid out in shards, and what each costs a worker.

``pipeline.job.plan`` makes a ``Plan`` from a checkpoint's headers and config; the driver, the
workers (``pipeline.job.unit``) and the reducer read it. Kept apart from the planning itself so
that what travels to the workers is plain data with no planning code behind it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from sinq_ops import QuantConfig
from sinq_ops.memory import CPU_WORK_PER_ELEMENT, ERROR_CHECK_BYTES, GPU_WORK_PER_FP16_BYTE

from ..conversion import Conversion
from ..io.safetensors_io import PlannedTensor
from ..output.layout import shard_names
from ..sources import Source
from .folds import LayerFolds
from .formats import SourceFormat
from .mapping import Piece

# A decoder layer: "model.layers.12.", "model.language_model.layers.3.", "transformer.h.7.", ...
LAYER_PATTERN = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks)\.(\d+))\.")
# What one worker may plan for a unit: two workers sharing a 24 GB card (and its host's memory).
DEFAULT_WORKER_MEMORY = 12 * 10**9


@dataclass(frozen=True)
class TensorTask:
    """One tensor of the output's model: the source bytes it is made of, and what the output holds for it.

    ``pieces`` are concatenated in order into a tensor of ``shape`` (an expert's gate and up
    projections into its gate_up matrix, or every expert's matrices into a stacked parameter);
    a quantized task with ``transpose`` is quantized as that tensor's transpose.
    """

    name: str  # the model's tensor; for an expert's matrix, the stacked parameter's name and the expert number
    pieces: tuple[Piece, ...]
    dtype: str  # as written for a copied tensor; the source's (codes included) for a quantized one
    shape: tuple[int, ...]
    quantize: bool
    outputs: tuple[PlannedTensor, ...]
    leaf: str = ""  # the name the quantized tensors are keyed by (a Linear's module, an expert's matrix)
    transpose: bool = False
    expert: int | None = None
    data: bytes | None = None  # a tensor computed at plan time rather than read from the source
    # transformers' conversion that makes this tensor from the pieces (every task it makes shares it; the
    # first of them in the unit holds the pieces, converted once for all)
    conversion: Conversion | None = None
    # compressed-tensors: an expert's matrix written as the checkpoint's own per-expert tensors, each a
    # block of its rows ((leaf, rows) in order), the names serving engines load experts by
    parts: tuple[tuple[str, int], ...] = ()

    @property
    def key(self) -> str:
        """The task's name within its unit: an expert's matrix is its leaf (the parameter and the expert)."""
        return self.name if self.expert is None else self.leaf

    @property
    def file(self) -> str:
        return self.pieces[0].file if self.pieces else ""

    @property
    def source_name(self) -> str:
        """The checkpoint tensor to name in an error about this task."""
        return self.pieces[0].info.name if self.pieces else self.name

    @property
    def movable(self) -> bool:
        """Whether the task may go to another unit than its layer's other tensors: an expert's matrix
        made from that expert's own tensors."""
        return self.expert is not None and (self.conversion is None or self.conversion.expert is not None)

    @property
    def nbytes(self) -> int:
        if not self.pieces:
            return len(self.data or b"")
        return sum(p.info.nbytes + (p.scale.nbytes if p.scale is not None else 0) for p in self.pieces)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Unit:
    index: int
    name: str
    tasks: tuple[TensorTask, ...]
    block: str = ""  # the decoder layer (or other group) a split unit belongs to; shards never split a block
    folds: LayerFolds | None = None  # compressed-tensors output: where its matrices' column scales go

    @property
    def in_bytes(self) -> int:
        return sum(t.nbytes for t in self.tasks)

    @property
    def out_bytes(self) -> int:
        return sum(o.nbytes for t in self.tasks for o in t.outputs)

    @property
    def outputs(self) -> list[PlannedTensor]:
        return [o for t in self.tasks for o in t.outputs]

    def memory_bytes(self, gpu: bool = False) -> int:
        """Peak host memory of a worker on this unit: its source and output tensors, plus on a CPU
        worker the fp32 working copies of its largest weight (the weight, its square, the
        normalised tiles, codes). A compressed-tensors unit also holds its layer decoded at once for
        its folds: up to a float32 copy of every tensor, and Sinkhorn's working copies of the largest
        stack of rows a shared column scale is computed from (every expert's up rows, in a mixture)."""
        folded = 4 * sum(t.numel for t in self.tasks) if self.folds is not None else 0
        return memory_of(self.tasks, gpu) + folded + (0 if gpu else CPU_WORK_PER_ELEMENT * self.lead_numel)

    @property
    def lead_numel(self) -> int:
        """Elements of the largest stack of rows one of the unit's shared column scales is computed from."""
        if self.folds is None:
            return 0
        matrices = {t.key: (t.shape[1], t.shape[0]) if t.transpose else t.shape for t in self.tasks if t.quantize}
        return max((sum(((b.stop - b.start) if b.stop is not None else matrices[b.name][0]) * matrices[b.name][1]
                         for b in s.lead) for s in self.folds.shared), default=0)


def memory_of(tasks: tuple[TensorTask, ...] | list[TensorTask], gpu: bool = False) -> int:
    return peak_bytes(held_bytes(tasks), max((t.numel for t in tasks if t.quantize), default=0), gpu)


def held_bytes(tasks: tuple[TensorTask, ...] | list[TensorTask]) -> int:
    return sum(t.nbytes + sum(o.nbytes for o in t.outputs) for t in tasks)


def peak_bytes(held: int, largest: int, gpu: bool = False) -> int:
    """A unit's tensors held at once, plus a CPU worker's working copies of its largest weight."""
    return held + (0 if gpu else CPU_WORK_PER_ELEMENT * largest)


@dataclass(frozen=True)
class KindSummary:
    """What the plan does with the tensors of one kind of module (the class that holds them)."""

    kind: str
    quantized_matrices: int = 0
    quantized_params: int = 0
    kept_tensors: int = 0
    kept_params: int = 0
    kept_undivided: int = 0  # of the kept: quantizable matrices the group size does not divide (all tiny)


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
    worker_memory: int = DEFAULT_WORKER_MEMORY
    kinds: list[KindSummary] = field(default_factory=list)
    source_format: SourceFormat = field(default_factory=SourceFormat)
    unwritten_buffers: frozenset[str] = frozenset()  # buffers no safetensors dtype holds (loaders recompute them)
    notes: list[str] = field(default_factory=list)
    forward_check: str = ""  # how the commit check ran the output's forward pass (set once it has)
    output_format: str = "sinq"  # "sinq" or "compressed-tensors"
    column_scales: dict[str, str] = field(default_factory=dict)  # compressed-tensors: kind -> its placement

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

    @property
    def quantized_share(self) -> float:
        """Share of all the model's parameters (from the checkpoint) that are quantized."""
        quantized = sum(k.quantized_params for k in self.kinds)
        return quantized / max(1, quantized + sum(k.kept_params for k in self.kinds))

    def structure(self) -> dict:
        """The per-kind summary as the manifest records it."""
        return {"kinds": [vars(k) for k in self.kinds], "quantized_share": round(self.quantized_share, 6),
                "expert_matrices_quantized": sum(1 for t in self.quantized if t.expert is not None),
                **({"column_scales": self.column_scales} if self.column_scales else {}),
                **({"forward_check": self.forward_check} if self.forward_check else {})}

    def worker_memory_bytes(self, gpu: bool = False) -> int:
        """Peak host memory of one worker: the largest of its units' (``Unit.memory_bytes``)."""
        return max((u.memory_bytes(gpu) for u in self.units), default=0)

    def read_ahead_bytes(self) -> int:
        """What a worker holds besides the unit it quantizes: the next unit's source bytes while it
        reads them, or the last unit's outputs while it uploads them (one or the other at a time)."""
        return max((max(u.in_bytes, u.out_bytes) for u in self.units), default=0)

    def read_ahead_fits(self, gpu: bool = False) -> bool:
        """Whether a unit and the next one's source bytes fit ``worker_memory`` together (else a
        worker reads each unit only once the one before is done)."""
        return self.worker_memory_bytes(gpu) + self.read_ahead_bytes() <= self.worker_memory

    def gpu_memory_bytes(self) -> int:
        """Peak GPU memory of one GPU worker, its CUDA context aside: the largest weight on the device,
        what the kernels allocate for it, and the error check's unpacked codes (a byte per weight) and row blocks."""
        sizes = [(t.nbytes, t.numel) for t in self.quantized]
        peak = max((b + int(GPU_WORK_PER_FP16_BYTE * 2 * n) + n for b, n in sizes), default=0) + ERROR_CHECK_BYTES
        # A compressed-tensors unit holds its whole layer on the device for its folds, a float32 copy
        # of a producer whose rows took the next matrix's column scale, and Sinkhorn's working copies
        # of the rows a shared scale is computed from (torch path, the same per element as on a CPU).
        layer = max((sum(t.nbytes for t in u.tasks) + 4 * max((t.numel for t in u.tasks if t.quantize), default=0)
                     + CPU_WORK_PER_ELEMENT * u.lead_numel for u in self.units if u.folds is not None), default=0)
        return peak + layer

    def describe(self) -> str:
        gb = 1e9
        cfg = self.config
        layers = {u.block for u in self.units if LAYER_PATTERN.match(u.block + ".")}
        lines = [
            f"source        {self.source.spec}" + ("" if self.source_format.method == "float" else
                                                     f" ({_format_text(self.source_format)}, dequantized first)"),
            f"quantization  {cfg.method} {cfg.bits}-bit, group {cfg.group_size}, {cfg.tiling} tiling, "
            + (f"{cfg.aux} scales" if self.output_format == "sinq" else "written as compressed-tensors pack-quantized"),
            f"units         {len(self.units)} ({len(layers)} decoder layers; each unit planned within "
            f"{self.worker_memory / gb:.2f} GB of worker memory)",
            f"tensors       {len(self.quantized)} matrices quantized, "
            f"{sum(1 for u in self.units for t in u.tasks if not t.quantize)} tensors copied; "
            f"{100 * self.quantized_share:.2f}% of all parameters quantized",
            f"size          {self.in_bytes / gb:.3f} GB in -> {self.out_bytes / gb:.3f} GB out "
            f"({self.in_bytes / max(self.out_bytes, 1):.2f}x smaller)",
            f"shards        {len(self.shards)} (max {self.max_shard_size / gb:.2f} GB each)",
            f"worker memory {self.worker_memory_bytes() / gb:.3f} GB peak per CPU worker; per GPU worker "
            f"{self.worker_memory_bytes(gpu=True) / gb:.3f} GB host, {self.gpu_memory_bytes() / gb:.3f} GB GPU "
            "(plus its CUDA context)",
            f"read-ahead    {self.read_ahead_bytes() / gb:.3f} GB more per worker (the next unit read, or the last one "
            "uploaded, while one quantizes): "
            f"{'on' if self.read_ahead_fits() else 'off'} for CPU workers, "
            f"{'on' if self.read_ahead_fits(gpu=True) else 'off'} for GPU workers (on only within --worker-memory)",
            f"not converted {', '.join(self.not_converted) or '-'}",
            f"assets        {', '.join(self.assets) or '-'}",
            "",
            f"{'module kind':36s} {'quantized':>9} {'params':>14} {'kept':>6} {'params':>14} {'small':>5}",
        ]
        for k in self.kinds:
            lines.append(f"{k.kind[:36]:36s} {k.quantized_matrices:>9} {k.quantized_params:>14,} "
                         f"{k.kept_tensors:>6} {k.kept_params:>14,} {k.kept_undivided or '':>5}")
        lines += ["", f"{'#':>4} {'unit':40s} {'tensors':>7} {'quant':>5} {'in MB':>10} {'out MB':>10} {'shard':>5}"]
        shard_of = {u: i + 1 for i, units in enumerate(self.shards) for u in units}
        for u in self.units:
            q = sum(t.quantize for t in u.tasks)
            lines.append(
                f"{u.index:>4} {u.name[:40]:40s} {len(u.tasks):>7} {q:>5} {u.in_bytes / 1e6:>10.2f} "
                f"{u.out_bytes / 1e6:>10.2f} {shard_of[u.index]:>5}"
            )
        if self.column_scales:
            lines += ["", f"{'column scale of':36s} placed"]
            lines += [f"{kind[:36]:36s} {where}" for kind, where in self.column_scales.items()]
        lines.extend(self.notes)
        return "\n".join(lines)


def column_scale_placements(units: list[Unit]) -> dict[str, str]:
    """Per kind of quantized matrix (its name within the layer), where its column scale went."""
    found: dict[str, set[str]] = {}
    for u in units:
        for t in u.tasks:
            if t.quantize:
                kind = t.name[len(u.block) + 1:] if t.name.startswith(u.block + ".") else t.name
                found.setdefault(kind.removesuffix(".weight"), set()).add(u.folds.placement(t.key))
    return {kind: "; ".join(sorted(where)) for kind, where in sorted(found.items())}


def _format_text(fmt: SourceFormat) -> str:
    if fmt.method == "mxfp4":
        return "mxfp4 experts"
    scales = f"{fmt.block[0]}x{fmt.block[1]} block scales" if fmt.block else "per-tensor or per-row scales"
    return f"{fmt.method} with {scales}"
