"""Checkpoint tensors to the model's tensors, by transformers' own conversion rules and operations.

The Hub stores many models under other names and layouts than the modules transformers 5 builds:
Mixtral's ``block_sparse_moe`` is ``mlp``; a mixture of experts stores one 2-D tensor per expert
where the model holds one 3-D parameter per projection pair; a fused ``query_key_value`` is split
into three projections, per-head convolution weights are concatenated, a vision tower's rotary
projections are permuted, Qwen3-VL-MoE's experts are transposed. transformers converts while it
loads, by a table per model (``conversion_mapping.py``) of renamings and ``WeightConverter``s whose
operations (Concatenate, Split, Chunk, Transpose, PermuteForRope, MergeModulelist, ...) turn the
checkpoint tensors a converter collects into the model's.

``map_checkpoint`` groups the checkpoint's tensors exactly as transformers' loader does and runs
each converter's own operations on meta tensors, which gives every model tensor's shape without
reading a byte. A worker later runs the same operations on the real tensors (``Conversion.apply``),
so the model's own parameter is what is quantized or copied, and a converter this tool has never
seen works as long as transformers' own does. Where the operations act on each expert's matrices
alone (stacking, joining or transposing within an expert), a group is converted one expert at a time,
so a layer can still be split into units by groups of experts.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class ConversionError(ValueError):
    """Checkpoint tensors that transformers' conversion cannot turn into the model's tensors."""


class _Shapes:
    """What an operation may consult of the model (``Split`` sizes its pieces, ``Transpose`` with
    ``check_dims`` compares shapes, ``PermuteForRope`` reads the config), without the model: the
    shapes of the parameters asked for, as meta tensors. At plan time it records which are asked, so
    that a worker gets exactly those."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], config: Any, record: bool = False) -> None:
        self.config = config
        self._shapes = shapes
        self.asked: dict[str, tuple[int, ...]] | None = {} if record else None

    def get_parameter(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise ConversionError(f"the operation asks for {name}, which the model does not have")
        if self.asked is not None:
            self.asked[name] = self._shapes[name]
        return torch.empty(self._shapes[name], device="meta")

    def get_submodule(self, name: str) -> nn.Module:  # an operation that needs a real module is refused
        raise ConversionError(f"the operation needs the module {name} itself")


@dataclass(frozen=True)
class Conversion:
    """What a worker needs to turn some checkpoint tensors into model tensors as transformers does:
    its converter (a fresh copy), the layer name it is run under, the model config its operations
    may read, and the parameter shapes they consult. ``expert`` is set when the inputs are one
    expert's tensors: every expert parameter is then seen with a leading dimension of 1."""

    key: str
    converter: Any  # transformers.core_model_loading.WeightConverter
    config: Any = field(repr=False)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    expert: int | None = None

    @property
    def steps(self) -> str:
        return _steps(self.converter)

    def apply(self, inputs: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Model tensor name -> tensor, from checkpoint tensors by source pattern, in transformers'
        order (every expert's, or with ``expert`` that expert's alone)."""
        return _run(self.converter, self.key, _Shapes(self.shapes, self.config), inputs)


def _steps(converter: Any) -> str:
    """A converter's operations, by name, for messages."""
    return ", ".join(type(op).__name__ for op in converter.operations)


def _run(converter: Any, key: str, model: _Shapes, inputs: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """transformers' ``WeightConverter.convert`` on a fresh copy of ``converter`` holding ``inputs``."""
    converter = copy.deepcopy(converter)
    for pattern, tensors in inputs.items():
        converter.collected_tensors[pattern] = list(tensors)
    out = converter.convert(key, model=model, config=model.config)
    return {name: value[0] if isinstance(value, list) else value for name, value in out.items()}


@dataclass(frozen=True)
class Group:
    """Checkpoint tensors that become model tensors together: a plain renaming (one tensor, one
    parameter; ``conversion`` is None) or one of transformers' converters with its inputs.

    ``sources`` are the checkpoint tensors by source pattern in transformers' order, ``targets`` the
    model tensors the group yields with their shapes. ``per_expert``: the operations act on each
    expert's matrices alone, so expert ``e``'s share of the targets comes from expert ``e``'s inputs
    (its tensor of each per-expert pattern, its slice of each stacked one)."""

    conversion: Conversion | None
    sources: tuple[tuple[str, tuple[str, ...]], ...]
    targets: dict[str, tuple[int, ...]]
    per_expert: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for _, keys in self.sources for k in keys)

    @functools.cached_property
    def _expert_shapes(self) -> dict[str, tuple[int, ...]]:
        """The parameter shapes an operation may consult, as one expert's inputs see them."""
        return {n: (1, *s[1:]) if n in self.targets else s for n, s in self.conversion.shapes.items()}

    def expert_conversion(self, expert: int) -> Conversion:
        """The conversion of expert ``expert``'s inputs (``per_expert`` groups only)."""
        assert self.conversion is not None and self.per_expert
        return Conversion(self.conversion.key, self.conversion.converter, self.conversion.config, self._expert_shapes,
                          expert)


# Operations that act within each expert's matrix when they leave dimension 0 (the expert) alone.
_EXPERT_LOCAL = ("Concatenate", "Chunk", "Split", "Transpose", "Interleave")


def _leaves_experts(op: Any, rank: int) -> bool:
    """Whether ``op`` keeps experts apart on tensors of ``rank`` dimensions, experts on the first."""
    name = type(op).__name__
    if name == "MergeModulelist":
        return op.dim == 0
    if name not in _EXPERT_LOCAL or getattr(op, "num_shards_attribute", None):
        return False
    dims = (op.dim0, op.dim1) if name == "Transpose" else (op.dim,)
    return all(d % rank != 0 for d in dims)


def transforms(model: nn.Module) -> tuple[list, list, str | None]:
    """transformers' renamings and converters for ``model`` and its base-model prefix."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    mapping = get_model_conversion_mapping(model)
    return ([t for t in mapping if isinstance(t, WeightRenaming)], [t for t in mapping if isinstance(t, WeightConverter)],
            getattr(model, "base_model_prefix", None))


def map_checkpoint(
    model: nn.Module, shapes: dict[str, tuple[int, ...]], tensors: dict[str, tuple[tuple[int, ...], torch.dtype]],
    experts: dict[str, int] | None = None,
) -> tuple[list[Group], list[str]]:
    """The checkpoint's tensors (name -> shape and dtype as decoded) grouped as transformers' loader
    groups them for ``model`` (``shapes``: its parameters and buffers), each group's targets
    shaped by running its operations on meta tensors; and the tensors that go nowhere in the
    model. ``experts`` maps each stacked expert parameter to its number of experts.

    Raises ``ConversionError`` naming the tensor and the operations when transformers' conversion
    fails on the checkpoint's tensors or yields a tensor the model has no place or shape for."""
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    renamings, converters, prefix = transforms(model)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    places = dict.fromkeys(shapes, True)
    collected: dict[str, tuple[Any, dict[str, list[str]]]] = {}
    plain: dict[str, str] = {}
    unplaced: list[str] = []
    for key in sorted(tensors, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, places)
        if renamed not in places and key in places:
            renamed, pattern = rename_source_key(key, [], [], prefix, places)
        if renamed not in places:
            unplaced.append(key)
        elif pattern is None:
            if renamed in plain or renamed in collected:
                raise ConversionError(f"tensor {key!r} fills {renamed}, which another tensor fills too")
            plain[renamed] = key
        else:
            if renamed in plain:
                raise ConversionError(f"tensor {key!r} fills {renamed}, which another tensor fills too")
            if renamed not in collected:  # each group gets its own converter, as transformers' loader gives it
                collected[renamed] = (copy.deepcopy(by_pattern[pattern]), {})
            collected[renamed][1].setdefault(pattern, []).append(key)

    groups = []
    memo: dict[tuple, Group] = {}  # layers alike: one meta run serves them all
    firsts = [(key, target) for target, key in plain.items()]
    firsts += [(next(iter(sources.values()))[0], target) for target, (_, sources) in collected.items()]
    for first, target in sorted(firsts, key=lambda kt: dot_natural_key(kt[0])):  # errors in checkpoint order
        if target in plain:
            if tuple(tensors[first][0]) != tuple(shapes[target]):
                raise ConversionError(f"tensor {first!r} has shape {list(tensors[first][0])}; the model's {target} "
                                      f"is {list(shapes[target])}")
            groups.append(Group(None, (("", (first,)),), {target: tuple(shapes[target])}))
        else:
            converter, sources = collected[target]
            original = by_pattern[next(iter(sources))]
            groups.append(_converted(model.config, target, converter, sources, tensors, shapes, experts or {},
                                     memo, id(original)))
    return groups, unplaced


def _numbers(name: str) -> list[str]:
    return [part for part in name.split(".") if part.isdigit()]


def _template(name: str, numbers: list[str]) -> str | None:
    """``name`` with its numbers (layer, expert) as ``#``, where they are ``numbers`` in order."""
    if _numbers(name) != numbers:
        return None
    return ".".join("#" if part.isdigit() else part for part in name.split("."))


def _filled(template: str, numbers: list[str]) -> str:
    it = iter(numbers)
    return ".".join(next(it) if part == "#" else part for part in template.split("."))


def _recalled(memo: dict[tuple, Group], signature: tuple, key: str, converter: Any, config: Any,
              sources: dict[str, list[str]], shapes: dict[str, tuple[int, ...]]) -> Group | None:
    """The group a converter makes of ``sources``, from the meta run of an alike group of another layer
    (the same converter, inputs of the same shapes): its targets and consulted shapes renumbered, and
    used only where the model has them so."""
    cached = memo.get(signature)
    if cached is None:
        return None
    numbers = _numbers(key)
    targets = {_filled(t, numbers): shape for t, shape in cached.targets.items()}
    asked = {_filled(t, numbers): shape for t, shape in cached.conversion.shapes.items()}
    if any(shapes.get(n) != s for n, s in {**targets, **asked}.items()):
        return None
    conversion = Conversion(key, converter, config, asked)
    return Group(conversion, tuple((p, tuple(keys)) for p, keys in sources.items()), targets, cached.per_expert)


def _remember(memo: dict[tuple, Group], signature: tuple, key: str, group: Group) -> None:
    numbers = _numbers(key)
    targets = {_template(t, numbers): s for t, s in group.targets.items()}
    asked = {_template(t, numbers): s for t, s in group.conversion.shapes.items()}
    if None not in targets and None not in asked:
        conversion = Conversion(_template(key, numbers), None, None, asked)
        memo[signature] = Group(conversion, (), targets, group.per_expert)


def _converted(config: Any, key: str, converter: Any, sources: dict[str, list[str]],
               tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], shapes: dict[str, tuple[int, ...]],
               experts: dict[str, int], memo: dict[tuple, Group], kind: int) -> Group:
    """One converter's group, its targets from its own operations run on meta tensors (or recalled
    from an alike group's run)."""
    first = next(iter(sources.values()))[0]
    steps = _steps(converter)
    _check_lists(key, sources, tensors, experts.get(key), steps)
    template = _template(key, _numbers(key))
    signature = (kind, template, experts.get(key),
                 tuple((p, len(keys), tensors[keys[0]][0], tensors[keys[0]][1]) for p, keys in sources.items()))
    recalled = _recalled(memo, signature, key, converter, config, sources, shapes)
    if recalled is not None:
        return recalled
    stand_in = _Shapes(shapes, config, record=True)
    inputs = {p: [torch.empty(tensors[k][0], dtype=tensors[k][1], device="meta") for k in keys]
              for p, keys in sources.items()}
    try:
        out = _run(converter, key, stand_in, inputs)
    except Exception as exc:  # noqa: BLE001 - any failure of transformers' operation is this tensor's refusal
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"tensor {first!r}: transformers' conversion ({steps}) fails on the checkpoint's "
                              f"tensors: {text}") from None
    targets = {}
    for name, tensor in out.items():
        if name not in shapes:
            raise ConversionError(f"tensor {first!r}: transformers' conversion ({steps}) yields {name}, which the "
                                  "model does not have")
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise ConversionError(f"tensor {first!r}: transformers' conversion ({steps}) yields {name} of shape "
                                  f"{list(tensor.shape)}; the model's is {list(shapes[name])}")
        targets[name] = tuple(tensor.shape)
    conversion = Conversion(key, converter, config, dict(stand_in.asked or {}))
    ordered = tuple((p, tuple(keys)) for p, keys in sources.items())
    group = Group(conversion, ordered, targets)
    if _per_expert(group, tensors, experts):
        group = Group(conversion, ordered, targets, per_expert=True)
    _remember(memo, signature, key, group)
    return group


def _check_lists(key: str, sources: dict[str, list[str]], tensors: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 count: int | None, steps: str) -> None:
    """Name the tensor at fault where a converter collects several (one per expert): one of another
    shape than the rest, or an expert with no tensor (the operations would only say that shapes differ)."""
    for keys in sources.values():
        odd = next((k for k in keys if tensors[k][0] != tensors[keys[0]][0]), None)
        if odd is not None:
            raise ConversionError(f"tensor {odd!r} of shape {list(tensors[odd][0])} differs from {keys[0]!r} "
                                  f"{list(tensors[keys[0]][0])}, which transformers' conversion ({steps}) joins it "
                                  f"with into {key}")
        if count is None or len(keys) < 2 or len(keys) >= count:
            continue
        parts = [k.split(".") for k in keys]
        where = [i for i in range(len(parts[0])) if len({len(p) for p in parts}) == 1 and len({p[i] for p in parts}) > 1]
        if len(where) == 1 and all(p[where[0]].isdigit() for p in parts):
            missing = sorted(set(range(count)) - {int(p[where[0]]) for p in parts})
            raise ConversionError(f"no tensor for expert {missing[0]} of {key} ({len(missing)} of {count} missing "
                                  f"beside {keys[0]!r})")


def _per_expert(group: Group, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], experts: dict[str, int]) -> bool:
    """Whether expert ``e``'s inputs alone give expert ``e``'s share of every target: every target is a
    stacked expert parameter, every source pattern holds one tensor per expert or one stacked tensor,
    the operations leave the expert dimension alone, and one expert's meta run has the right shapes."""
    conversion = group.conversion
    if conversion is None or not all(t in experts for t in group.targets):
        return False
    count = experts[next(iter(group.targets))]
    if any(experts[t] != count for t in group.targets):
        return False
    inputs: dict[str, list[torch.Tensor]] = {}
    for pattern, keys in group.sources:
        if len(keys) == count and all(len(tensors[k][0]) == 2 for k in keys):
            inputs[pattern] = [torch.empty(tensors[keys[0]][0], dtype=tensors[keys[0]][1], device="meta")]
        elif len(keys) == 1 and len(tensors[keys[0]][0]) == 3 and tensors[keys[0]][0][0] == count:
            shape, dtype = tensors[keys[0]]
            inputs[pattern] = [torch.empty((1, *shape[1:]), dtype=dtype, device="meta")]
        else:
            return False
    if not all(_leaves_experts(op, 3) for op in conversion.converter.operations):
        return False
    trial = Group(conversion, group.sources, group.targets, per_expert=True).expert_conversion(0)
    try:
        out = trial.apply(inputs)
    except Exception:  # noqa: BLE001 - an operation that cannot run on one expert: convert the whole group
        return False
    return set(out) == set(group.targets) and all(tuple(v.shape) == (1, *group.targets[n][1:]) for n, v in out.items())
