"""What format the source's weights are stored in, and which scale tensor belongs to which weight.

A source is plain float (F16, BF16, F32); FP8 as transformers' ``fp8`` quantization writes it
(``quantization_config: {quant_method: fp8, weight_block_size: [128, 128]}``, each FP8
``X.weight`` beside a float32 ``X.weight_scale_inv``); or MXFP4 as gpt-oss ships its experts
(``quant_method: mxfp4``, ``X_blocks`` codes beside ``X_scales`` exponents standing for the
parameter ``X``). Such weights are dequantized on the worker (``sinq_ops.formats``) before anything
else, so their scales never reach the output and the output carries this tool's
``quantization_config`` only. Every other quantized format (GPTQ, AWQ, compressed-tensors,
bitsandbytes, an unknown ``quant_method``) is refused here, before any work, naming the format:
its tensors would otherwise be quantized as if they were weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sinq_ops.formats import fp8_scale_shape, mxfp4_shape

from ..io.safetensors_io import TensorInfo

SCALE_SUFFIX = "_scale_inv"
BLOCKS_SUFFIX, MX_SCALES_SUFFIX = "_blocks", "_scales"
_FP8 = ("F8_E4M3", "F8_E5M2")
_READ = ("fp8", "mxfp4")


class FormatError(ValueError):
    """The source's weight format is not one this tool reads; the message names it."""


@dataclass(frozen=True)
class SourceFormat:
    method: str = "float"  # "float", "fp8" or "mxfp4"
    block: tuple[int, int] | None = None  # FP8 scale block (rows, columns); None: per tensor or per row

    def describe(self) -> dict:
        """As the manifest records it."""
        if self.method == "float":
            return {"method": "float"}
        return {"method": self.method, "weight_block_size": list(self.block) if self.block else None}


def source_format(label: str, model_config: dict) -> SourceFormat:
    """The format ``config.json``'s ``quantization_config`` names; ``FormatError`` for any but fp8."""
    qc = model_config.get("quantization_config")
    if qc is None:
        return SourceFormat()
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method not in _READ:
        raise FormatError(f"{label}: the checkpoint is already quantized ({method or 'unknown format'}); of "
                          "quantized sources only fp8 (with weight_scale_inv) and mxfp4 are read")
    if method == "mxfp4":
        return SourceFormat("mxfp4")
    block = qc.get("weight_block_size")
    if block is not None and not (isinstance(block, list) and len(block) == 2
                                  and all(isinstance(b, int) and b > 0 for b in block)):
        raise FormatError(f"{label}: quantization_config.weight_block_size {block!r} is not two positive integers")
    return SourceFormat("fp8", tuple(block) if block else None)


def logical_shape(info: TensorInfo, fmt: SourceFormat, paired: bool) -> tuple[int, ...]:
    """The shape of the parameter a (paired) checkpoint tensor stands for: MXFP4 codes
    ``[..., rows, groups, 16]`` hold the transpose of ``[..., rows, groups * 32]``, as gpt-oss's
    experts store their matrices [in, out]."""
    if fmt.method == "mxfp4" and paired:
        *lead, rows, cols = mxfp4_shape(info.shape)
        return (*lead, cols, rows)
    return info.shape


def pair_scales(
    label: str, fmt: SourceFormat, inventory: dict[str, tuple[str, TensorInfo]],
) -> tuple[dict[str, tuple[str, TensorInfo]], dict[str, tuple[str, TensorInfo]]]:
    """The checkpoint's tensors without their scales, and each quantized weight's scale by weight
    name (an MXFP4 parameter under its own name, its codes as the tensor).

    Refuses an FP8 tensor without a scale (or in a source that names no fp8 format), a scale
    without its weight, and a scale whose shape does not fit its weight."""
    if fmt.method == "mxfp4":
        return _pair_mxfp4(label, inventory)
    scales = {n[: -len(SCALE_SUFFIX)]: v for n, v in inventory.items()
              if fmt.method == "fp8" and n.endswith(SCALE_SUFFIX)}
    tensors = {n: v for n, v in inventory.items() if not (fmt.method == "fp8" and n.endswith(SCALE_SUFFIX))}
    for name, (file, info) in sorted(tensors.items()):
        if info.dtype not in _FP8:
            continue
        if name not in scales:
            why = "no weight_scale_inv beside it" if fmt.method == "fp8" else "config.json names no fp8 format"
            raise FormatError(f"{label}/{file}: tensor {name!r} is {info.dtype} with {why}, so its true values "
                              "are unknown")
        sfile, scale = scales[name]
        want = fp8_scale_shape(info.shape, fmt.block)
        fits = (scale.shape == want if want is not None else
                math.prod(scale.shape) in (1, math.prod(info.shape[:-1])))
        if not fits:
            raise FormatError(f"{label}/{sfile}: scale {name + SCALE_SUFFIX!r} of shape {list(scale.shape)} does "
                              f"not fit {name} {list(info.shape)}"
                              + (f" in {fmt.block[0]}x{fmt.block[1]} blocks" if fmt.block else ""))
    for name, (file, _) in sorted(scales.items()):
        if name not in tensors or tensors[name][1].dtype not in _FP8:
            raise FormatError(f"{label}/{file}: scale {name + SCALE_SUFFIX!r} belongs to no FP8 tensor")
    return tensors, scales


def _pair_mxfp4(
    label: str, inventory: dict[str, tuple[str, TensorInfo]],
) -> tuple[dict[str, tuple[str, TensorInfo]], dict[str, tuple[str, TensorInfo]]]:
    blocks = {n[: -len(BLOCKS_SUFFIX)]: v for n, v in inventory.items() if n.endswith(BLOCKS_SUFFIX)}
    scales = {n[: -len(MX_SCALES_SUFFIX)]: v for n, v in inventory.items() if n.endswith(MX_SCALES_SUFFIX)}
    tensors = {n: v for n, v in inventory.items() if not n.endswith((BLOCKS_SUFFIX, MX_SCALES_SUFFIX))}
    for name in sorted(set(blocks) | set(scales)):
        if name not in blocks or name not in scales:
            file, info = blocks.get(name) or scales[name]
            raise FormatError(f"{label}/{file}: {info.name!r} has no {'scales' if name in blocks else 'blocks'} "
                              "beside it, so its true values are unknown")
        (file, codes), (_, exps) = blocks[name], scales[name]
        if codes.dtype != "U8" or exps.dtype != "U8" or len(codes.shape) < 3 or codes.shape[:-1] != exps.shape \
                or codes.shape[-1] != 16:
            raise FormatError(f"{label}/{file}: MXFP4 {codes.name!r} {codes.dtype} {list(codes.shape)} and "
                              f"{exps.name!r} {exps.dtype} {list(exps.shape)} do not fit each other")
        if name in tensors:
            raise FormatError(f"{label}/{file}: {name!r} is stored both in MXFP4 and as a tensor")
        tensors[name] = (file, codes)
    return tensors, {n: scales[n] for n in blocks}
