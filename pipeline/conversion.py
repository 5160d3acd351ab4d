"""Checkpoint tensor names to the names of the model transformers builds, by transformers' own rules.

The Hub stores many models under older names than transformers 5 gives their modules: Mixtral's
``block_sparse_moe`` is ``mlp``, and every mixture of experts stores one 2-D tensor per expert and
projection (``mlp.experts.7.gate_proj.weight``) where the model holds one 3-D parameter per
projection pair (``mlp.experts.gate_up_proj`` [experts, 2 x intermediate, hidden]). transformers
converts while it loads, by a table per model type (``conversion_mapping.py``). The planner asks
that table where each checkpoint tensor goes, so the output is written under the model's names
and layout and a source in either layout gives the same output.

Only the conversions that stack per-expert tensors (``MergeModulelist`` on the first dimension)
and concatenate projections (``Concatenate`` on each expert's rows) are understood; a checkpoint
whose tensors need any other conversion is refused, naming the tensor, rather than guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


class ConversionError(ValueError):
    """A checkpoint tensor reaches the model through a conversion this tool does not plan."""


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes in the model.

    ``expert`` is set for a per-expert tensor: it is the ``expert``-th matrix of the stacked
    parameter ``name``, or rows ``part`` of ``parts`` equal blocks of it (gate, then up).
    """

    name: str
    expert: int | None = None
    part: int = 0
    parts: int = 1


class Converter:
    """transformers' renaming and conversion rules for one model."""

    def __init__(self, model: nn.Module, places: frozenset[str]) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(model)
        self._renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._prefix = getattr(model, "base_model_prefix", None)
        self._places = dict.fromkeys(places, True)

    def target(self, key: str) -> Target:
        """Where checkpoint tensor ``key`` goes; a key that no rule touches keeps its name."""
        from transformers.core_model_loading import (
            Concatenate, MergeModulelist, apply_renamings, rename_source_key,
        )

        renamed, pattern = rename_source_key(key, self._renamings, self._converters, self._prefix, self._places)
        if pattern is None:
            return Target(renamed)
        converter = next(c for c in self._converters if pattern in c.source_patterns)
        ops = [type(op) for op in converter.operations]
        stacked = ops and ops[0] is MergeModulelist and converter.operations[0].dim == 0
        concatenated = ops[1:] == [Concatenate] and converter.operations[1].dim == 1
        if not stacked or not (len(ops) == 1 or concatenated) or len(converter.target_patterns) != 1:
            steps = ", ".join(type(op).__name__ for op in converter.operations) or "no operation"
            raise ConversionError(f"tensor {key!r} is converted by transformers ({steps}) in a way this tool "
                                  "does not plan")
        # transformers reads a pattern as a regex whose ``*.`` spans the expert number; here it must be one.
        expert = re.search(pattern.replace("*.", r"(\d+)\."), apply_renamings(key, self._renamings))
        if expert is None:
            raise ConversionError(f"tensor {key!r}: no expert number where transformers' pattern {pattern!r} "
                                  "has one")
        parts = len(converter.source_patterns) if len(ops) == 2 else 1
        part = converter.source_patterns.index(pattern) if parts > 1 else 0
        return Target(renamed, int(expert.group(1)), part, parts)
