"""One work unit, start to finish: read its tensors, quantize, stage the result.

A finished unit is a safetensors file in the staging area plus a JSON record with its
checksum and statistics; the record is written last, so a unit with a record is durable.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from sinq_ops import QuantConfig, quantize, relative_error
from sinq_ops.activation import normalisation, search
from sinq_ops.formats import dequantize_fp8, dequantize_mxfp4

from ..io.safetensors_io import (
    DTYPES, TensorInfo, aligned_order, header_bytes, tensor_bytes, tensor_from_bytes, write_stream,
)
from .calibration.staged import LayerStats
from .calibration.staged import load as load_stats
from ..io.storage import Location
from ..sources import Source
from .mapping import Piece
from .plan import TensorTask, Unit
from .served import SEARCH, quantize_served


class UnitError(ValueError):
    """A unit failed for a reason in the data: retrying will not help."""


@dataclass
class TensorStats:
    name: str
    shape: list[int]
    bits: int
    rel_error: float
    seconds: float
    sinkhorn: bool
    # A-SINQ: "searched" (an activation scale was searched and applied), "kurtosis gate" (RTN, as for
    # SINQ), or why the matrix had no calibration inputs (quantized as SINQ)
    activation: str | None = None


@dataclass
class UnitResult:
    index: int
    name: str
    staged: str  # file name in the staging area
    sha256: str
    size: int
    offsets: dict[str, list[int]]  # output tensor -> [start, nbytes] in the staged file
    sidecar: dict[str, dict]  # quantized leaf -> reference metadata
    stats: list[TensorStats]
    read_s: float
    quantize_s: float
    write_s: float
    worker: str = ""
    peak_rss: int = 0  # the worker process's peak resident memory after this unit, in bytes
    reused: bool = False  # staged by an earlier run of the same job and verified, not quantized again
    # [start, nbytes, sha256] of each run of tensors of one item size in the staged file: a shard
    # holds each such run whole, and the reducer checks it there once the store has assembled the shard.
    runs: list[list] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "UnitResult":
        raw = json.loads(text)
        raw["stats"] = [TensorStats(**s) for s in raw["stats"]]
        return cls(**raw)


def staged_names(unit: Unit) -> tuple[str, str]:
    return f"unit-{unit.index:05d}.safetensors", f"unit-{unit.index:05d}.json"


def staged_result(unit: Unit, staging: Location) -> UnitResult | None:
    """What an earlier run of the same job staged for ``unit``, if its record parses and the staged
    data matches the record's size and sha256."""
    data_name, record_name = staged_names(unit)
    if not (staging.exists(record_name) and staging.exists(data_name)):
        return None
    try:
        result = UnitResult.from_json(staging.read_bytes(record_name).decode())
    except (ValueError, KeyError, TypeError):
        return None
    if ((result.index, result.name) != (unit.index, unit.name) or not result.runs
            or staging.size(data_name) != result.size):
        return None
    return result if staging.sha256(data_name) == result.sha256 else None


def read_unit(source: Source, unit: Unit) -> list[list[torch.Tensor]]:
    """The source bytes of every task of ``unit``, fetched together as concurrent ranged reads:
    per task, per piece, the stored tensor and (FP8, MXFP4) its scale. Nothing is decoded yet, so
    a unit read ahead holds its source bytes (``Unit.in_bytes``) and no more."""
    stored = [[item for p in task.pieces for item in _stored(p)] if task.data is None else [] for task in unit.tasks]
    raw = iter(source.read_tensors([item for items in stored for item in items]))
    return [[next(raw) for _ in items] for items in stored]


def _stored(piece: Piece) -> list[tuple[str, TensorInfo]]:
    """The checkpoint tensors ``piece`` is decoded from, in the order ``assemble_task`` takes them."""
    return [(piece.file, piece.info)] + ([(piece.scale_file, piece.scale)] if piece.scale is not None else [])


def assemble_task(source: Source, task: TensorTask, raw: list[torch.Tensor],
                  converted: dict | None = None) -> torch.Tensor:
    """The tensor ``task`` is made of, from its pieces as ``read_unit`` fetched them: computed at plan
    time, one checkpoint tensor, its pieces joined in order, or its share of what transformers'
    conversion makes of them. FP8 and MXFP4 pieces come back as the float32 weights they encode, and
    a copied task in its planned dtype.

    A conversion runs once, for the first task of it in the unit (the one holding the pieces); its
    other tensors wait in ``converted`` for the tasks that take them."""
    if task.data is not None:
        return tensor_from_bytes(TensorInfo(task.name, task.dtype, task.shape, 0, len(task.data)), task.data)
    stored = iter(raw)
    parts = [_decode(source, p, next(stored), next(stored) if p.scale is not None else None) for p in task.pieces]
    if task.conversion is not None:
        tensor = _converted(source, task, parts, {} if converted is None else converted)
    elif len(parts) == 1 and tuple(parts[0].shape) == task.shape:
        tensor = parts[0]
    else:
        tensor = torch.cat([p.reshape(-1) for p in parts]).reshape(task.shape)
    if not task.quantize and tensor.dtype != DTYPES[task.dtype]:
        tensor = tensor.to(DTYPES[task.dtype])
    elif not task.quantize and tensor.untyped_storage().nbytes() > tensor.nbytes:
        # A view into a read buffer shared with the unit's other tensors: an output kept until it is
        # uploaded must not keep the whole buffer alive.
        tensor = tensor.clone()
    return tensor


def _converted(source: Source, task: TensorTask, parts: list[torch.Tensor], converted: dict) -> torch.Tensor:
    """``task``'s tensor out of its conversion, run now if ``task`` holds the pieces."""
    conversion = task.conversion
    key = (conversion.key, conversion.expert)
    if task.pieces:
        inputs: dict[str, list[torch.Tensor]] = {}
        for piece, part in zip(task.pieces, parts):
            inputs.setdefault(piece.pattern, []).append(part.unsqueeze(0) if piece.stacked else part)
        try:
            converted[key] = conversion.apply(inputs)
        except Exception as exc:  # noqa: BLE001 - transformers' operation failed on these bytes: name them
            raise UnitError(f"{source.spec}/{task.file}: {task.source_name}: transformers' conversion "
                            f"({conversion.steps}) failed: {exc}") from None
    tensor = converted[key][task.name]
    if task.expert is not None:
        tensor = tensor[0 if conversion.expert is not None else task.expert]
    return tensor


def _decode(source: Source, piece: Piece, tensor: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return tensor
    try:
        if piece.codes == "mxfp4":  # codes hold [..., out, in]; the parameter stores [..., in, out]
            return dequantize_mxfp4(tensor, scale).transpose(-1, -2)
        return dequantize_fp8(tensor, scale, piece.block)
    except ValueError as exc:
        raise UnitError(f"{source.spec}/{piece.file}: {piece.info.name}: {exc}") from None


def process_unit(source: Source, unit: Unit, config: QuantConfig, staging: Location, device: str,
                 compute: AbstractContextManager = nullcontext(), *, calibration: Location | None = None) -> UnitResult:
    """Quantize every tensor of ``unit`` that the plan marks, copy the rest, stage the result;
    or take the result an earlier run staged, once it verifies. With ``calibration`` (A-SINQ), each
    matrix's activation scale is searched on its layer's staged statistics there.

    Only the quantization runs inside ``compute``: a worker that holds a lock there reads its next
    unit, or uploads its last one, while it quantizes this one."""
    earlier = staged_result(unit, staging)
    if earlier is not None:
        earlier.reused = True
        return earlier
    t0 = time.perf_counter()
    raw = read_unit(source, unit)
    layer_stats = _layer_stats(calibration, unit, config)
    read_s = time.perf_counter() - t0
    with compute:
        outputs, sidecar, stats, read_s, quant_s = _quantize(source, unit, config, device, raw, read_s, layer_stats)
    return _stage(unit, staging, outputs, sidecar, stats, read_s, quant_s)


def _assembled(source: Source, unit: Unit, raw: list[list[torch.Tensor]]) -> Iterator[tuple[TensorTask, torch.Tensor, float]]:
    """Each task of ``unit`` with its tensor decoded from the bytes read (``assemble_task``), and the
    seconds that took; a conversion's results are dropped once its last task has taken them."""
    converted: dict = {}  # conversion -> the tensors it made, until every task taking one has run
    left = Counter((t.conversion.key, t.conversion.expert) for t in unit.tasks if t.conversion is not None)
    for task, stored in zip(unit.tasks, raw):
        t0 = time.perf_counter()
        try:
            tensor = assemble_task(source, task, stored, converted)
        except UnitError:
            raise
        except ValueError as exc:  # bytes that do not decode as planned: name the file and the tensor
            raise UnitError(f"{source.spec}/{task.file}: {task.source_name}: {exc}") from None
        stored.clear()
        if task.conversion is not None:
            key = (task.conversion.key, task.conversion.expert)
            left[key] -= 1
            if not left[key]:
                converted.pop(key, None)
        yield task, tensor, time.perf_counter() - t0


def _layer_stats(calibration: Location | None, unit: Unit, config: QuantConfig) -> LayerStats | None:
    """The staged calibration statistics of ``unit``'s layer; a layer the calibration forward does not
    run (a vision tower's, with --include-towers) has none, and its matrices are quantized as SINQ."""
    if calibration is None or not config.calibrated or not any(t.quantize for t in unit.tasks):
        return None
    if not calibration.exists(f"{unit.block}.json"):
        return LayerStats({}, {}, {t.leaf: "outside the language model's decoder layers, which calibration runs"
                                   for t in unit.tasks if t.quantize})
    return load_stats(calibration, unit.block)


def _activation_scale(w: torch.Tensor, leaf: str, config: QuantConfig, layer_stats: LayerStats | None,
                      ) -> tuple[dict, str | None]:
    """``quantize``'s A-SINQ arguments for the matrix ``leaf`` from its staged inputs (its activation
    scale, and the Sinkhorn scales the search computed), and what became of its scale."""
    if layer_stats is None:
        return {}, None
    inputs = layer_stats.inputs(leaf)
    if inputs is None:
        return {}, layer_stats.missing.get(leaf, "no calibration statistics")
    mean, sample = inputs
    sinkhorn = normalisation(w, config)
    if sinkhorn is None:
        return {}, "kurtosis gate"
    scale = search(w, sample.to(w.device, torch.float32), config, x_abs_mean=mean.to(w.device), **SEARCH,
                   sinkhorn=sinkhorn)
    return {"activation_scale": scale, "sinkhorn": sinkhorn}, "searched"


def _quantize(source: Source, unit: Unit, config: QuantConfig, device: str, raw: list[list[torch.Tensor]],
              read_s: float, layer_stats: LayerStats | None = None,
              ) -> tuple[dict[str, torch.Tensor], dict[str, dict], list[TensorStats], float, float]:
    """The unit's output tensors, sidecar entries and statistics, and the read and quantize seconds."""
    if unit.folds is not None:
        return _quantize_served(source, unit, config, device, raw, read_s, layer_stats)
    outputs: dict[str, torch.Tensor] = {}
    sidecar: dict[str, dict] = {}
    stats: list[TensorStats] = []
    quant_s = 0.0
    for task, tensor, seconds in _assembled(source, unit, raw):
        read_s += seconds
        if not task.quantize:
            outputs[task.name] = tensor
            continue
        t0 = time.perf_counter()
        w = tensor.to(device)
        if task.transpose:
            w = w.t().contiguous()
        try:
            calibrated, activation = _activation_scale(w, task.leaf, config, layer_stats)
            q = quantize(w, **config.to_dict(), **calibrated)
        except ValueError as exc:
            raise UnitError(f"{source.spec}/{task.file}: {task.source_name}: {exc}") from None
        err = relative_error(w, q)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        quant_s += seconds
        outputs.update(q.to("cpu").to_state_dict(task.leaf))
        sidecar[task.leaf] = q.metadata()
        label = task.name if task.expert is None else task.leaf
        stats.append(TensorStats(label, list(w.shape), config.bits, err, seconds, q.sinkhorn_applied, activation))
        del w, q, tensor
    return outputs, sidecar, stats, read_s, quant_s


def _quantize_served(source: Source, unit: Unit, config: QuantConfig, device: str, raw: list[list[torch.Tensor]],
                     read_s: float, layer_stats: LayerStats | None = None,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, dict], list[TensorStats], float, float]:
    """``_quantize`` for a compressed-tensors output: the layer decoded whole, then ``quantize_served``."""
    tensors: dict[str, torch.Tensor] = {}
    for task, tensor, seconds in _assembled(source, unit, raw):
        read_s += seconds
        tensors[task.key] = tensor.t().contiguous() if task.quantize and task.transpose else tensor
    sidecar: dict[str, dict] = {}
    stats: list[TensorStats] = []

    def stat(task: TensorTask, leaf: str, w: torch.Tensor, q, seconds: float) -> None:
        sidecar[leaf] = {"format": "pack-quantized", "nbits": config.bits, "group_size": config.group_size,
                         "shape": list(w.shape), "method": config.method,
                         "column_scale": unit.folds.placement(task.key)}
        if task.parts:  # a row block of an expert's matrix: which one, so that loaders stack them back
            start = sum(n for p, n in task.parts[:[p for p, _ in task.parts].index(leaf)])
            sidecar[leaf].update({"of": task.leaf, "rows": [start, start + w.shape[0]]})
        stats.append(TensorStats(task.name if task.expert is None else leaf, list(w.shape), config.bits,
                                 relative_error(w, q), seconds, q.sinkhorn_applied, activation.get(task.key)))

    inputs = None
    activation: dict[str, str] = {}
    if layer_stats is not None:
        leaf_of = {t.key: t.leaf for t in unit.tasks if t.quantize}

        def inputs(key: str):
            got = layer_stats.inputs(leaf_of[key])
            if got is None:
                activation[key] = layer_stats.missing.get(leaf_of[key], "no calibration statistics")
            return got

    t0 = time.perf_counter()
    try:
        outputs = quantize_served(unit, config, device, tensors, stat, inputs, activation)
    except ValueError as exc:
        raise UnitError(f"{source.spec}: {unit.name}: {exc}") from None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return outputs, sidecar, stats, read_s, time.perf_counter() - t0


def _stage(unit: Unit, staging: Location, outputs: dict[str, torch.Tensor], sidecar: dict[str, dict],
           stats: list[TensorStats], read_s: float, quant_s: float) -> UnitResult:
    """Write the unit's outputs to the staging area, then its record: the unit is durable once both are."""
    planned = aligned_order(unit.outputs)
    for p in planned:
        got = outputs[p.name]
        if got.dtype != p.dtype or tuple(got.shape) != p.shape:
            raise UnitError(f"{unit.name}: {p.name} came out {got.dtype} {list(got.shape)}, planned {p.dtype} {list(p.shape)}")
    offsets, pos = {}, len(header_bytes(planned))
    for p in planned:
        offsets[p.name] = [pos, p.nbytes]
        pos += p.nbytes

    t0 = time.perf_counter()
    data_name, record_name = staged_names(unit)
    digest = hashlib.sha256()
    runs: list[list] = []  # [start, nbytes, sha256] per item size, as the file holds them
    hashers: list = []

    def data():
        for p in planned:
            if not p.nbytes:
                continue
            if not runs or runs[-1][3] != p.dtype.itemsize:
                runs.append([offsets[p.name][0], 0, "", p.dtype.itemsize])
                hashers.append(hashlib.sha256())
            chunk = tensor_bytes(outputs[p.name])
            hashers[-1].update(chunk)
            runs[-1][1] += len(chunk)
            yield chunk

    with staging.open_write(data_name, size=pos) as f:
        size = write_stream(f, planned, data(), digest.update)
    write_s = time.perf_counter() - t0
    result = UnitResult(
        unit.index, unit.name, data_name, digest.hexdigest(), size, offsets, sidecar, stats, read_s, quant_s, write_s,
        runs=[[start, nbytes, h.hexdigest()] for (start, nbytes, _, _), h in zip(runs, hashers)],
    )
    staging.write_bytes(record_name, result.to_json().encode())
    return result
