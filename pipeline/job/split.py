"""How a decoder layer's tasks become units: one unit, or, for a mixture of experts too large for a
worker, its other tensors followed by consecutive groups of experts. Kept apart from the planner
so that the rule a unit's size follows reads in one place."""

from __future__ import annotations

from ..sources import Source
from .errors import PlanError
from .planned import TensorTask, held_bytes, memory_of, peak_bytes


def split_layer(source: Source, block: str, tasks: list[TensorTask], budget: int) -> list[list[TensorTask]]:
    """A layer's tasks as one unit, or, when a mixture-of-experts layer exceeds ``budget``, as its other
    tensors followed by consecutive groups of experts, each group as large as fits (the first shared
    with the others). The other tensors are never split: a group holding them may exceed the budget."""
    if memory_of(tasks) <= budget or not any(t.movable for t in tasks):
        return [tasks]  # a dense layer is one unit, as it always was: only experts are split
    rest = [t for t in tasks if not t.movable]
    experts: dict[int, list[TensorTask]] = {}
    for t in tasks:
        if t.movable:
            experts.setdefault(t.expert, []).append(t)
    groups: list[list[TensorTask]] = [rest]
    held, largest = [held_bytes(rest)], [max((t.numel for t in rest if t.quantize), default=0)]
    for e in sorted(experts):
        more, size = held_bytes(experts[e]), max(t.numel for t in experts[e])
        if peak_bytes(held[-1] + more, max(largest[-1], size)) > budget and groups[-1]:
            groups.append([])
            held.append(0)
            largest.append(0)
        groups[-1].extend(experts[e])
        held[-1] += more
        largest[-1] = max(largest[-1], size)
    for g, h, big in zip(groups, held, largest):
        if peak_bytes(h, big) > budget and g and g[-1].expert is not None and all(t.expert == g[-1].expert for t in g):
            raise PlanError(f"{source.spec}: {block} needs {gb(peak_bytes(h, big))} of worker memory for expert "
                            f"{g[-1].expert} alone, more than --worker-memory {gb(budget)}; raise --worker-memory")
    return [g for g in groups if g]


def gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def unit_name(block: str, tasks: list[TensorTask], parts: int) -> str:
    experts = [t.expert for t in tasks if t.movable]
    if parts == 1 or not experts:
        return block
    return f"{block} (experts {min(experts)}-{max(experts)})"
