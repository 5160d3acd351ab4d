"""What format the source's weights are stored in, and which scale tensor belongs to which weight.

A source is plain float (F16, BF16, F32), or FP8 as transformers' ``fp8`` quantization writes it
(``quantization_config: {quant_method: fp8, weight_block_size: [128, 128]}``, each FP8
``X.weight`` beside a float32 ``X.weight_scale_inv``). FP8 weights are dequantized on the worker
(``sinq_ops.formats``) before anything else, so their scales never reach the output and the output
carries this tool's ``quantization_config`` only. Every other quantized format (GPTQ, AWQ,
compressed-tensors, bitsandbytes, MXFP4, an unknown ``quant_method``) is refused here, before any
work, naming the format: its tensors would otherwise be quantized as if they were weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sinq_ops.formats import fp8_scale_shape

from ..io.safetensors_io import TensorInfo

SCALE_SUFFIX = "_scale_inv"
_FP8 = ("F8_E4M3", "F8_E5M2")


class FormatError(ValueError):
    """The source's weight format is not one this tool reads; the message names it."""


@dataclass(frozen=True)
class SourceFormat:
    method: str = "float"  # "float" or "fp8"
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
    if method != "fp8":
        raise FormatError(f"{label}: the checkpoint is already quantized ({method or 'unknown format'}); of "
                          "quantized sources only fp8 (with weight_scale_inv) is read")
    block = qc.get("weight_block_size")
    if block is not None and not (isinstance(block, list) and len(block) == 2
                                  and all(isinstance(b, int) and b > 0 for b in block)):
        raise FormatError(f"{label}: quantization_config.weight_block_size {block!r} is not two positive integers")
    return SourceFormat("fp8", tuple(block) if block else None)


def pair_scales(
    label: str, fmt: SourceFormat, inventory: dict[str, tuple[str, TensorInfo]],
) -> tuple[dict[str, tuple[str, TensorInfo]], dict[str, tuple[str, TensorInfo]]]:
    """The checkpoint's tensors without their scales, and each FP8 weight's scale by weight name.

    Refuses an FP8 tensor without a scale (or in a source that names no fp8 format), a scale
    without its weight, and a scale whose shape does not fit its weight."""
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
    return tensors, {n: s for n, s in scales.items()}
