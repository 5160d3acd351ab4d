"""Which bytes of the checkpoint make each tensor of the model, before any byte is read.

The planner and ``load_source`` both need this: the checkpoint's tensors grouped as transformers'
loader groups them (``pipeline.conversion``), each tensor located in its file as a ``Piece`` (with
its FP8 or MXFP4 scale, decoded first), and one expert's share of a stacked tensor as a byte range
of its own, so that a unit holding a group of experts reads those experts and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..architecture import ModelLayout
from ..conversion import ConversionError, Group, map_checkpoint
from ..io.safetensors_io import TensorInfo
from .formats import SourceFormat, logical_shape


class MappingError(ValueError):
    """The checkpoint's tensors do not make the model's; the message names the file and tensor."""


@dataclass(frozen=True)
class Piece:
    """Bytes of the source that a task reads: one checkpoint tensor, or one expert's matrix of a
    stacked one (``info`` then spans that matrix only)."""

    file: str
    info: TensorInfo
    scale: TensorInfo | None = None  # an FP8 weight's scale_inv or MXFP4 codes' scales: dequantized first
    scale_file: str = ""
    block: tuple[int, int] | None = None  # FP8 scale blocks
    codes: str = ""  # "fp8" or "mxfp4" when ``info`` holds codes rather than the weight
    pattern: str = ""  # the converter's source pattern this tensor is collected under
    stacked: bool = False  # one expert's slice of a stacked tensor, given to a conversion as [1, ...]


@dataclass(frozen=True)
class SourceGroup:
    """A group of checkpoint tensors that make model tensors together, with their pieces."""

    group: Group
    pieces: dict[str, Piece]  # checkpoint tensor -> where it lies

    def ordered(self) -> tuple[Piece, ...]:
        """Every piece, in the order the conversion takes them."""
        return tuple(self.pieces[k] for k in self.group.keys)

    def expert(self, expert: int, experts: int) -> tuple[Piece, ...]:
        """Expert ``expert``'s pieces of a per-expert group: its tensor of each per-expert source
        pattern, its slice of each stacked tensor."""
        out = []
        for _, keys in self.group.sources:
            first = self.pieces[keys[0]]
            if len(keys) == 1 and is_stacked(first):
                out.append(expert_piece(first, experts, expert, stacked=True))
            else:
                out.append(self.pieces[keys[expert]])
        return tuple(out)


def is_stacked(piece: Piece) -> bool:
    """Whether ``piece`` holds every expert's matrix, stacked on its first dimension."""
    return piece.codes == "mxfp4" or len(piece.info.shape) == 3


def expert_piece(whole: Piece, experts: int, expert: int, *, stacked: bool = False) -> Piece:
    """One expert's matrix of a stacked piece: a contiguous byte range, read on its own (a per-expert
    FP8 scale sliced alike)."""
    scale = whole.scale
    if scale is not None and len(scale.shape) >= 2 and scale.shape[0] == experts:  # per expert: block or row scales
        scale = _slice(scale, experts, expert)
    return Piece(whole.file, _slice(whole.info, experts, expert), scale, whole.scale_file, whole.block, whole.codes,
                 whole.pattern, stacked)


def _slice(info: TensorInfo, experts: int, expert: int) -> TensorInfo:
    """Expert ``expert``'s matrix of a tensor stacked on its first dimension: a contiguous byte range."""
    size = info.nbytes // experts
    return TensorInfo(info.name, info.dtype, info.shape[1:], info.start + expert * size, size)


def source_groups(
    spec: str, layout: ModelLayout, inventory: dict[str, tuple[str, TensorInfo]],
    scales: dict[str, tuple[str, TensorInfo]], fmt: SourceFormat,
) -> tuple[list[SourceGroup], list[str]]:
    """The checkpoint's tensors grouped into the model's (``pipeline.conversion``), and the names of
    those transformers itself drops on load (DeepSeek-V3's multi-token-prediction layer).

    A tensor with no place in the model, or one its conversion cannot turn into the model's tensor
    of the right shape, is refused here, naming the file and tensor, instead of ending in an
    output that cannot load."""
    decoded: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, (_, info) in inventory.items():
        paired = name in scales
        decoded[name] = (logical_shape(info, fmt, paired), torch.float32 if paired else info.torch_dtype)
    experts = {name: ew.experts for name, ew in layout.expert_weights.items()}
    try:
        groups, unplaced = map_checkpoint(layout.model, layout.shapes, decoded, experts)
    except ConversionError as exc:
        key = re.search(r"'([^']+)'", str(exc))
        file = inventory[key.group(1)][0] if key and key.group(1) in inventory else "config.json"
        raise MappingError(f"{spec}/{file}: {exc}, so the output would not load") from None
    skipped = []
    for name in unplaced:
        if any(re.search(p, name) for p in layout.ignored):
            skipped.append(name)  # transformers drops it on load too
            continue
        raise MappingError(f"{spec}/{inventory[name][0]}: tensor {name!r} has no place in {layout.class_name}, the "
                           "model config.json describes, so the output would not load")
    out = []
    for group in groups:
        pieces = {}
        for pattern, keys in group.sources:
            for k in keys:
                file, info = inventory[k]
                scale_file, scale = scales.get(k, ("", None))
                pieces[k] = Piece(file, info, scale, scale_file, fmt.block if scale is not None else None,
                                  fmt.method if scale is not None else "", pattern)
        out.append(SourceGroup(group, pieces))
    return out, skipped
