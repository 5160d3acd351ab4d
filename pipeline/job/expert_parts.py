"""How a compressed-tensors output names an expert's matrices: by the checkpoint's own tensors.

transformers stacks a mixture of experts' per-expert checkpoint tensors into one parameter (each
expert's ``gate_proj`` and ``up_proj`` concatenated into ``gate_up_proj``); serving engines load
experts by the checkpoint's per-expert names (vLLM's ``experts.<e>.gate_proj.weight_packed``). In
1D tiling a matrix's codes are row by row, so a matrix quantized whole and written as blocks of its
rows is exactly what quantizing each block would give. This module finds, for one expert's matrix,
the checkpoint tensors that are its row blocks, and proves it on the conversion itself: the sources
are filled with distinct numbers (0, 1, 2, ... through all of them), converted, and the result must
be those numbers in order. A conversion that interleaves or transposes its inputs is refused rather
than misnamed.
"""

from __future__ import annotations

import torch

from ..conversion import Group
from .mapping import SourceGroup, is_stacked


def expert_parts(sg: SourceGroup, target: str, expert: int, transposed: bool,
                 proven: dict[tuple, bool]) -> tuple[tuple[str, int], ...]:
    """``(leaf, rows)`` of each checkpoint tensor making expert ``expert``'s matrix of ``target``
    (as quantized, ``[out, in]``), in row order. ``proven`` remembers conversions already checked.

    Raises ``ValueError`` naming the tensor when the checkpoint does not hold the expert's rows as
    tensors of its own."""
    group: Group = sg.group
    if len(group.targets) != 1:
        raise ValueError(f"{target}: its conversion makes {len(group.targets)} tensors at once")
    keys = [keys[expert] if len(keys) > expert else keys[0] for _, keys in group.sources]
    module = target.rpartition(".")[0]
    renamed = next((k for k in keys if not k.startswith(f"{module}.")), None)
    if renamed is not None:  # the output's other tensors go by the model's names: one naming for both
        raise ValueError(f"{target}: the checkpoint names it {renamed} outside the model's {module}, and an output "
                         "written by both namings would load in no serving engine")
    pieces = [sg.pieces[k] for k in keys]
    if any(is_stacked(p) or len(p.info.shape) != 2 for p in pieces):
        raise ValueError(f"{target}: the checkpoint stores it stacked ({keys[0]}), with no per-expert tensor to "
                         "write it as")
    shapes = [tuple(p.info.shape) if p.scale is None or p.codes != "mxfp4" else None for p in pieces]
    signature = (group.conversion.steps if group.conversion else "", tuple(shapes), transposed)
    if signature not in proven:
        proven[signature] = _row_blocks(group, expert, [p.pattern for p in pieces], shapes, transposed)
    if not proven[signature]:
        raise ValueError(f"{target}: transformers' conversion ({group.conversion.steps if group.conversion else '-'}) "
                         f"does not stack {', '.join(keys)} as blocks of rows")
    return tuple((k.removesuffix(".weight"), s[0]) for k, s in zip(keys, shapes))


def _row_blocks(group: Group, expert: int, patterns: list[str], shapes: list[tuple[int, ...] | None],
                transposed: bool) -> bool:
    """Whether the conversion makes the matrix ``[sum of rows, in]`` of its inputs' rows in order."""
    if group.conversion is None or any(s is None for s in shapes):
        return group.conversion is None and len(shapes) == 1
    numbered = torch.arange(sum(s[0] * s[1] for s in shapes), dtype=torch.float64)
    blocks = [b.reshape(s) for b, s in zip(numbered.split([s[0] * s[1] for s in shapes]), shapes)]
    inputs: dict[str, list[torch.Tensor]] = {}
    for pattern, block in zip(patterns, blocks):
        inputs.setdefault(pattern, []).append(block)
    try:
        made = next(iter(group.expert_conversion(expert).apply(inputs).values()))
    except Exception:  # noqa: BLE001 - an operation these marker tensors do not suit proves nothing
        return False
    matrix = made.reshape(made.shape[-2:])
    if transposed:
        matrix = matrix.t()
    return matrix.shape == (sum(s[0] for s in shapes), shapes[0][1]) and torch.equal(matrix.reshape(-1), numbered)
