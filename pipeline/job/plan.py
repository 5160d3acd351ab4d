"""From safetensors headers and config.json to work units, output tensors and shards.

Nothing here touches tensor data: the driver plans a 70B model from a few MB of headers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re

from sinq_ops import QuantConfig, quantized_layout
from sinq_ops.compressed import layout as compressed_layout
from sinq_ops.config import check_servable

from ..architecture import ArchitectureError, ModelLayout, check_layer_count, shared_layout
from ..conversion import Conversion
from ..io.safetensors_io import DTYPE_NAMES, DTYPES, PlannedTensor, TensorInfo, tensor_bytes
from ..output.layout import CARD_NAME
from ..sources import Source
from .errors import PlanError
from .expert_parts import expert_parts
from .folds import LayerFolds, layer_folds, recipe_for, unfused
from .formats import FormatError, pair_scales, source_format
from .mapping import MappingError, Piece, SourceGroup, expert_piece, source_groups
from .planned import DEFAULT_WORKER_MEMORY, LAYER_PATTERN, KindSummary, Plan, TensorTask, Unit, column_scale_placements
from .split import gb, split_layer, unit_name

_QUANTIZABLE = ("F16", "BF16", "F32")
logger = logging.getLogger(__name__)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
# Matrices the group size does not divide are kept in full precision when together they hold less than
# this share of the quantized parameters (Gemma 3n's AltUp coefficients: 4 input features); else refused.
SMALL_KEPT_SHARE = 0.001


def _generated(name: str, tensor) -> TensorTask:
    data = bytes(tensor_bytes(tensor))
    return TensorTask(name, (), DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), False,
                      (PlannedTensor(name, tensor.dtype, tuple(tensor.shape)),), data=data)


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


def _layout(source: Source, model_config: dict, names: list[str]) -> ModelLayout:
    try:
        check_layer_count(model_config, names)
        return shared_layout(model_config)
    except ArchitectureError as exc:
        raise PlanError(f"{source.spec}/config.json: {exc}") from None


def _float_dtype(model_config: dict) -> str:
    """The dtype dequantized FP8 tensors are written in when copied: the model's own."""
    name = model_config.get("torch_dtype") or model_config.get("dtype") or "bfloat16"
    return {"float16": "F16", "float32": "F32"}.get(str(name), "BF16")


def make_plan(
    source: Source,
    config: QuantConfig,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    max_shard_size: int = 4 * 10**9,
    worker_memory: int = DEFAULT_WORKER_MEMORY,
    include_towers: bool = False,
    output_format: str = "sinq",
) -> Plan:
    """Decide what is quantized, group tensors into units, and lay the units out in shards.

    A decoder layer is one unit unless its planned memory (``Unit.memory_bytes``) exceeds
    ``worker_memory``; then it is split into units by consecutive groups of experts, the first
    also holding the layer's other tensors. Shards are laid out by whole layers, so the output's
    bytes do not depend on how a layer was split. For example, a DeepSeek-V3 layer (256 experts,
    22.5 GB in bf16) becomes three units under the default 12 GB.

    Only the language model's decoder layers are quantized unless ``include_towers``: a vision or
    audio tower's layers are copied.

    ``output_format="compressed-tensors"`` plans the layout serving engines load
    (``sinq_ops.compressed``), each decoder layer one unit with its folds (``pipeline.job.folds``).
    """
    served = output_format == "compressed-tensors"
    if served:
        try:
            check_servable(config)
        except ValueError as exc:
            raise PlanError(f"{source.spec}: {exc}") from None
    model_config = source.read_json("config.json")
    # Every file the job will read whole is checked now (inside the checkpoint, regular, within its
    # cap), not when the reducer copies it: the source's card too, whose licence fields it reads.
    assets = source.assets()
    source.check_files([n for n in source.list_files() if n == CARD_NAME])
    try:
        fmt = source_format(f"{source.spec}/config.json", model_config)
        inventory, scales = pair_scales(source.spec, fmt, _inventory(source))
    except FormatError as exc:
        raise PlanError(str(exc)) from None
    layout = _layout(source, model_config, list(inventory))
    try:
        groups, skipped = source_groups(source.spec, layout, inventory, scales, fmt)
    except MappingError as exc:
        raise PlanError(str(exc)) from None
    filled = {t for g in groups for t in g.group.targets}
    for names in layout.parameter_groups:
        if not any(n in filled for n in names):
            raise PlanError(f"{source.spec}: no tensor for {names[0]} of {layout.class_name}, so the output would "
                            "not load")
    include, exclude = include or [], exclude or []
    decoder = f"{layout.decoder}." if layout.decoder else ""

    def chosen(name: str) -> bool:
        in_decoder = name.startswith(decoder) or include_towers
        return (LAYER_PATTERN.match(name) is not None and in_decoder and (not include or _matches(name, include))
                and not _matches(name, exclude))

    def matrix(name: str) -> tuple[tuple[int, int], str] | None:
        """A chosen tensor's matrix as quantized, [out, in], and how to name it; None if it is copied."""
        if not chosen(name):
            return None
        if name in layout.linear_weights:
            return layout.linear_weights[name], name
        if name in layout.conv1d_weights:
            n_in, n_out = layout.conv1d_weights[name]
            return (n_out, n_in), f"{name} (a Conv1D, [{n_out}, {n_in}] as quantized)"
        if name in layout.expert_weights:
            ew = layout.expert_weights[name]
            return ew.shape, f"{name} (each expert's matrix, {list(ew.shape)} as quantized)"
        return None

    # What is quantized; a weight the group size does not divide is kept when all such are tiny.
    quantized: dict[str, tuple[int, int]] = {}
    undivided: list[tuple[str, str, int]] = []  # (tensor, refusal, parameters)
    for sg in groups:
        first = sg.ordered()[0]
        for name in sg.group.targets:
            found = matrix(name)
            if found is None:
                continue
            if first.info.dtype not in _QUANTIZABLE and first.scale is None:
                raise PlanError(f"{source.spec}/{first.file}: {first.info.name} is {first.info.dtype}; only "
                                f"{', '.join(_QUANTIZABLE)} weights are quantized")
            (n, k), what = found
            g = config.group_size
            if k % g or (config.tiling == "2D" and n % g):
                dim = f"in_features={k}" if k % g else f"out_features={n} (2D tiling)"
                undivided.append((name, f"{source.spec}/{first.file}: {what} has {dim}, not divisible by group size "
                                  f"{g}; pick a group size that divides it, or leave it unquantized with --exclude "
                                  f"'{re.escape(name)}'", math.prod(layout.shapes[name])))
            else:
                quantized[name] = (n, k)
    kept_small = sum(p for _, _, p in undivided)
    if undivided and kept_small >= SMALL_KEPT_SHARE * sum(math.prod(layout.shapes[n]) for n in quantized):
        raise PlanError(undivided[0][1])

    if served:
        odd = next((n for n in sorted(quantized) if n in layout.conv1d_weights), None)
        if odd is not None:
            raise PlanError(f"{source.spec}: --format compressed-tensors writes Linear layers and experts only, and "
                            f"{odd} is a Conv1D; use --format sinq, or leave it unquantized with --exclude "
                            f"'{re.escape(odd)}'")
        scale_dtype = DTYPES[_float_dtype(model_config)]
    proven: dict[tuple, bool] = {}  # conversions shown to stack an expert's checkpoint tensors as row blocks

    def out_layout(shape: tuple[int, int]) -> dict:
        return compressed_layout(shape, config, scale_dtype) if served else quantized_layout(shape, config)

    def quantized_task(name: str, leaf: str, pieces: tuple[Piece, ...], transpose: bool, expert: int | None,
                       conversion: Conversion | None, dtype: str, parts: tuple[tuple[str, int], ...] = ()) -> TensorTask:
        shape = quantized[name]
        stored = (shape[1], shape[0]) if transpose else shape
        outputs = tuple(PlannedTensor(f"{part}.{suffix}", dt, shp) for part, rows in parts or ((leaf, shape[0]),)
                        for suffix, (dt, shp) in out_layout((rows, shape[1])).items())
        return TensorTask(name, pieces, dtype, stored, True, outputs, leaf, transpose, expert, conversion=conversion,
                          parts=parts)

    def parts_of(sg: SourceGroup, name: str, expert: int, transposed: bool) -> tuple[tuple[str, int], ...]:
        """A compressed-tensors expert's matrix as the checkpoint's per-expert tensors (``expert_parts``)."""
        if not served:
            return ()
        try:
            return expert_parts(sg, name, expert, transposed, proven)
        except ValueError as exc:
            raise PlanError(f"{source.spec}/{sg.ordered()[0].file}: --format compressed-tensors writes experts by "
                            f"their checkpoint tensors, and {exc}; use --format sinq, or leave them unquantized with "
                            f"--exclude '{re.escape(name)}'") from None

    def copied(name: str, pieces: tuple[Piece, ...], first: Piece, conversion: Conversion | None) -> TensorTask:
        shape = layout.shapes[name]
        dtype = _float_dtype(model_config) if first.scale is not None else first.info.dtype
        return TensorTask(name, pieces, dtype, shape, False, (PlannedTensor(name, DTYPES[dtype], shape),),
                          conversion=conversion)

    def tasks_for(sg: SourceGroup) -> list[TensorTask]:
        """The tasks of one group: the first task of each conversion holds its pieces."""
        group, pieces = sg.group, sg.ordered()
        first, dtype = pieces[0], pieces[0].info.dtype
        tasks: list[TensorTask] = []
        if group.per_expert and all(n in quantized for n in group.targets):
            count = layout.expert_weights[next(iter(group.targets))].experts
            targets = [(name, layout.expert_weights[name].transposed) for name in sorted(group.targets)]
            for e in range(count):
                conversion, mine = group.expert_conversion(e), sg.expert(e, count)
                for name, transposed in targets:
                    tasks.append(quantized_task(name, f"{name}.{e}", mine, transposed, e, conversion, dtype,
                                                parts_of(sg, name, e, transposed)))
                    mine = ()
            return tasks
        held = pieces
        for name in sorted(group.targets):
            if name in quantized and name in layout.expert_weights:
                ew = layout.expert_weights[name]
                if served:  # the checkpoint holds every expert's matrix in one tensor: no per-expert name
                    raise PlanError(f"{source.spec}/{first.file}: --format compressed-tensors writes experts by their "
                                    f"checkpoint tensors, and the checkpoint stores {name} stacked ({first.info.name}), "
                                    f"with no per-expert tensor to write it as; use --format sinq, or leave it "
                                    f"unquantized with --exclude '{re.escape(name)}'")
                for e in range(ew.experts):
                    mine = held if group.conversion else (expert_piece(first, ew.experts, e),)
                    tasks.append(quantized_task(name, f"{name}.{e}", mine, ew.transposed, e, group.conversion, dtype))
                    held = () if group.conversion else held
                continue
            if name in quantized:
                tasks.append(quantized_task(name, name.removesuffix(".weight"), held, name in layout.conv1d_weights,
                                            None, group.conversion, dtype))
            else:
                tasks.append(copied(name, held, first, group.conversion))
            held = () if group.conversion else held
        return tasks

    tasks_of: dict[str, list[TensorTask]] = {}
    for sg in sorted(groups, key=lambda g: min(g.group.targets)):
        held: set[str] = set()  # the blocks in which the group's conversion has a task holding its pieces
        for task in tasks_for(sg):
            m = LAYER_PATTERN.match(task.name)
            block = m.group(1) if m else task.name
            if task.conversion is not None and task.conversion.expert is None and block not in held:
                # A conversion whose tensors land in several blocks (so several units) runs in each of them.
                task = dataclasses.replace(task, pieces=task.pieces or sg.ordered())
                held.add(block)
            tasks_of.setdefault(block, []).append(task)

    for tasks in tasks_of.values():
        # A layer's other tensors, then its experts in order: the order of the unsplit layer is that
        # of its split units one after another, so a shard's bytes do not depend on the split.
        tasks.sort(key=lambda t: t.expert if t.movable else -1)
    blocks = sorted(tasks_of, key=lambda b: (LAYER_PATTERN.match(b + ".") is not None, _layer_key(b)))
    # Buffers the model computes from its config, written for loaders that insist on them; a complex
    # one (Llama 4's vision rotary table) has no safetensors dtype, and every loader recomputes it.
    # Serving engines refuse a tensor their model has no parameter for (vLLM: "no module or parameter named
    # 'rotary_emb'"), so a compressed-tensors output writes none of them.
    buffers = {n: b for n, b in layout.buffers.items() if n not in filled and b.dtype in DTYPE_NAMES and not served}
    unwritten = frozenset(n for n, b in layout.buffers.items() if n not in filled and n not in buffers)
    grouped: list[tuple[str, list[list[TensorTask]]]] = []
    for block in blocks:
        if LAYER_PATTERN.match(block + ".") is None:
            grouped.append((block, [tasks_of[block]]))
    if buffers:
        grouped.append(("(model buffers)", [[_generated(n, b) for n, b in sorted(buffers.items())]]))
    for block in blocks:
        if LAYER_PATTERN.match(block + ".") is not None:
            # A compressed-tensors mixture whose experts' gate/up share one column scale is never split.
            recipe = recipe_for(model_config)
            whole = served and config.method != "rtn" and recipe is not None and bool(recipe.router)
            grouped.append((block, [tasks_of[block]] if whole else split_layer(source, block, tasks_of[block], worker_memory)))
    units: list[Unit] = []
    for block, parts in grouped:
        for tasks in parts:
            folds = None
            if served and any(t.quantize for t in tasks):  # a tower's layers (--include-towers) get no recipe
                names = {t.key: t.quantize for t in tasks}
                folds = layer_folds(block, names, model_config, config.method, {t.key: t.parts for t in tasks}) \
                    if block.startswith(decoder) else LayerFolds(rtn=config.method == "rtn")
                split = unfused(block, names)
                if split:
                    raise PlanError(f"{source.spec}: {split}")
            units.append(Unit(len(units), unit_name(block, tasks, len(parts)), tuple(tasks), block, folds))
    if not any(t.quantize for u in units for t in u.tasks):
        raise PlanError(f"{source.spec}: no tensor to quantize (no Linear or expert weights inside decoder "
                        "layers are selected)")

    shards: list[list[int]] = [[]]
    size = 0
    members_of: dict[str, list[Unit]] = {}
    for u in units:
        members_of.setdefault(u.block, []).append(u)
    for block, _ in grouped:
        members = members_of[block]
        block_bytes = sum(u.out_bytes for u in members)
        if shards[-1] and size + block_bytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].extend(u.index for u in members)
        size += block_bytes

    quantized_tasks = [t for u in units for t in u.tasks if t.quantize]
    quantized = {t.name for t in quantized_tasks}
    not_converted = {n.removesuffix(".weight") for n in filled if n.removesuffix(".weight") in layout.linear_modules
                     and n not in quantized} | {"lm_head"}
    if served:  # a router is a Linear to serving engines (vLLM's GateLinear takes the quantization config)
        not_converted |= {n.removesuffix(".weight") for n in filled if n.endswith(".weight") and n not in quantized
                          and LAYER_PATTERN.match(n) and len(layout.shapes[n]) == 2
                          and not re.search("Norm|Embedding", layout.kinds[n])}
    not_converted = sorted(not_converted)
    notes = []
    if skipped:
        notes.append(f"skipped       {len(skipped)} tensors that {layout.class_name} drops on load too "
                     f"(first: {skipped[0]})")
    if undivided:
        notes.append(f"kept small    {len(undivided)} matrices the group size {config.group_size} does not divide, "
                     f"{kept_small:,} parameters ({100 * kept_small / max(1, sum(t.numel for t in quantized_tasks)):.4f}% "
                     f"of those quantized), kept in full precision (first: {undivided[0][0]})")
    oversized = [b for b, _ in grouped if sum(u.out_bytes for u in members_of[b]) > max_shard_size]
    if oversized:
        notes.append(f"large shards  {len(oversized)} layers exceed --max-shard-size on their own (first: "
                     f"{oversized[0]}); a layer is never split across shards, so their shards are larger")
    over = [u for u in units if u.memory_bytes() > worker_memory]
    if over:
        logger.warning("%d units need more than --worker-memory %s (first: %s, %s)", len(over), gb(worker_memory),
                       over[0].name, gb(over[0].memory_bytes()))
        notes.append(f"over memory   {len(over)} units need more than --worker-memory {gb(worker_memory)} on a CPU "
                     f"worker (first: {over[0].name}, {gb(over[0].memory_bytes())}); only a layer's experts are split "
                     "(in compressed-tensors, only where they share no column scale), so these run as they are: raise --worker-memory if workers run out of memory")
    placements = column_scale_placements(units) if served else {}
    if served and config.uses_sinkhorn and recipe_for(model_config) is None:
        logger.warning("no exact column-scale fold is known for model_type %r: its matrices are written with a "
                       "column scale of 1 (round-to-nearest)", model_config.get("model_type"))
        notes.append(f"column scales no exact fold is known for model_type {model_config.get('model_type')!r}: every "
                     "matrix is written with a column scale of 1, which makes SINQ round-to-nearest")
    return Plan(source, config, units, shards, model_config, assets, not_converted, max_shard_size,
                worker_memory, _kinds(layout, filled, units, {n for n, _, _ in undivided}), source_format=fmt, unwritten_buffers=unwritten,
                notes=notes, output_format=output_format, column_scales=placements)


def _layer_key(block: str) -> tuple[str, int]:
    m = LAYER_PATTERN.match(block + ".")
    return (block[: -len(m.group(2))], int(m.group(2))) if m else (block, -1)


def _kinds(layout: ModelLayout, tensors: set[str], units: list[Unit], small: set[str]) -> list[KindSummary]:
    """Per kind of module: matrices and parameters quantized, tensors and parameters kept (and of
    those, the matrices kept because the group size does not divide them)."""
    totals: dict[str, list[int]] = {}
    quantized: dict[str, list[TensorTask]] = {}
    for u in units:
        for t in u.tasks:
            if t.quantize:
                quantized.setdefault(t.name, []).append(t)
    for name in tensors:
        row = totals.setdefault(layout.kinds[name], [0, 0, 0, 0, 0])
        numel = math.prod(layout.shapes[name])
        if name in quantized:
            row[0] += len(quantized[name])
            row[1] += numel
        else:
            row[2] += 1
            row[3] += numel
            row[4] += name in small
    return [KindSummary(kind, *row) for kind, row in sorted(totals.items())]
