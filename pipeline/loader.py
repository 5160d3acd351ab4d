"""Load a quantized output as a transformers model whose Linear layers stay quantized, and a
source checkpoint as the float model it was quantized from.

The model is built from config.json on the meta device (no memory for parameters), every
quantized Linear is swapped for a SINQLinear holding the packed tensors, every experts module
with quantized matrices for a SINQExperts holding one per expert, and the remaining
tensors are read one at a time, by byte range, from a local directory or object storage.
No full-precision copy of a quantized weight is ever made. ``load_source`` fills the same
empty model from any checkpoint source (directory, s3://, Hub repo at an exact commit).
"""

from __future__ import annotations

import torch
from torch import nn

from sinq_ops import QuantConfig, QuantizedWeight
from sinq_ops.compressed import cat_rows, from_compressed

from .architecture import empty_model, model_layout
from .job.formats import pair_scales, source_format
from .job.mapping import source_groups
from sinq_ops.formats import dequantize_fp8, dequantize_mxfp4
from .io.hf_names import INDEX_NAME
from .io.storage import Location, StorageOptions
from .output.layout import SIDECAR_NAME, quantized_leaf
from .output.manifest import IncompleteOutput, verify
from .quantized import IncompleteExperts, install
from .sources import Source, open_source


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if module is not None and attr in module._parameters:
        value = tensor.to(dtype) if tensor.is_floating_point() else tensor
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif module is not None and attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise ValueError(f"checkpoint tensor {name!r} has no place in the {type(model).__name__} built from config.json")


def _finish(model: nn.Module, label: str, device: str | torch.device) -> nn.Module:
    """Tie as transformers' own loading ties (a tied parameter the checkpoint lacks takes its partner's
    tensor; two present with different values stay apart), refuse a parameter left without a tensor,
    move and set eval mode."""
    unfilled = {n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"}
    model.tie_weights(missing_keys=unfilled, recompute_mapping=False)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise IncompleteOutput(f"{label}: no tensor for {missing[0]} ({len(missing)} missing)")
    return model.to(device).eval()


def load_quantized(
    location: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    require_manifest: bool = True, check_hashes: bool = True, storage: StorageOptions | None = None,
) -> nn.Module:
    """A ready-to-run model from a quantized output: the class its config.json names (a causal LM, or
    a vision-language wrapper), else its ``AutoModelForCausalLM``.

    Refuses an output whose manifest is missing or does not match its files (each file's sha256;
    sizes only with ``check_hashes=False``, which reads each file once instead of twice but misses
    a same-size change), unless ``require_manifest=False``. ``dtype`` is the compute dtype of every
    layer. Every file read lies inside the output (``pipeline.io.containment``).
    """
    loc = Location(location, storage or StorageOptions())
    if require_manifest:
        verify(loc, hashes=check_hashes)
    elif not loc.exists(INDEX_NAME):
        raise IncompleteOutput(f"{location}: no {INDEX_NAME}")
    source = Source(spec=location, location=loc)
    model = empty_model(source.read_json("config.json"))

    weight_map: dict[str, str] = source.read_json(INDEX_NAME)["weight_map"]
    sidecar = source.read_json(SIDECAR_NAME) if source.exists(SIDECAR_NAME) else {}
    headers = {f: source.header(f) for f in sorted(set(weight_map.values()))}

    def read(name: str) -> torch.Tensor:
        file = weight_map[name]
        return source.read_tensor(file, headers[file][name])

    weights: dict[str, QuantizedWeight] = {}
    biases: dict[str, torch.Tensor] = {}
    claimed: set[str] = set()
    of_leaf: dict[str, list[str]] = {}  # a quantized leaf's tensors: <leaf>.W_q and <leaf>.meta.*, or <leaf>.weight_*
    for n in weight_map:
        leaf = quantized_leaf(n)
        if leaf != n and leaf in sidecar:
            of_leaf.setdefault(leaf, []).append(n)
    stacked: dict[str, list[tuple[str, dict, dict[str, torch.Tensor]]]] = {}  # an expert's matrix: its row blocks
    for leaf, entry in sidecar.items():
        names = of_leaf.get(leaf, [])
        meta = entry["meta"]
        if "of" in meta:  # one of an expert's checkpoint tensors in compressed-tensors: stacked back below
            stacked.setdefault(meta["of"], []).append((leaf, meta, {n[len(leaf) + 1:]: read(n) for n in names}))
            claimed.update(names)
            continue
        weights[leaf] = _weight(leaf, {n: read(n) for n in names}, meta)
        claimed.update(names)
        if f"{leaf}.bias" in weight_map:
            biases[leaf] = read(f"{leaf}.bias")
            claimed.add(f"{leaf}.bias")
    for leaf, blocks in stacked.items():
        weights[leaf] = _stacked_weight(leaf, blocks)
    for name in sorted(set(weight_map) - claimed):
        _set_tensor(model, name, read(name), dtype)
    try:
        install(model, weights, biases, dtype)
    except IncompleteExperts as exc:
        raise IncompleteOutput(f"{location}: {exc}") from None
    return _finish(model, location, device)


def _stacked_weight(leaf: str, blocks: list[tuple[str, dict, dict[str, torch.Tensor]]]) -> QuantizedWeight:
    """An expert's matrix from the checkpoint tensors that are its row blocks ``(name, sidecar entry,
    tensors by suffix)``: each as its entry says, the blocks tiling the rows from 0 without gap or overlap."""
    blocks = sorted(blocks, key=lambda b: int(b[1]["rows"][0]))
    end = 0
    for name, meta, tensors in blocks:
        start, stop = (int(r) for r in meta["rows"])
        shape = tensors.get("weight_shape")
        if start != end or shape is None or shape.tolist() != [stop - start, int(meta["shape"][1])]:
            raise ValueError(f"{leaf}: its block {name} (rows {start}:{stop}) does not continue rows 0:{end} as its "
                             f"entry says")
        end = stop
    meta = blocks[0][1]
    try:
        whole = cat_rows([t for _, _, t in blocks], int(meta["nbits"]))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{leaf}: its checkpoint tensors do not stack: {exc}") from None
    return _weight(leaf, {f"{leaf}.{k}": v for k, v in whole.items()}, {**meta, "shape": [end, int(meta["shape"][1])]})


def _weight(leaf: str, tensors: dict[str, torch.Tensor], meta: dict) -> QuantizedWeight:
    """A quantized leaf from its tensors and sidecar entry, in either output format."""
    if meta.get("format") != "pack-quantized":
        return QuantizedWeight.from_state_dict(tensors, meta, leaf)
    try:
        config = QuantConfig(bits=int(meta["nbits"]), group_size=int(meta["group_size"]), method=str(meta["method"]),
                             aux="fp16")
        q = from_compressed({n[len(leaf) + 1:]: t for n, t in tensors.items()}, config)
    except KeyError as exc:
        raise ValueError(f"{leaf}: missing quantized field {exc.args[0]!r}") from None
    except ValueError as exc:
        raise ValueError(f"{leaf}: {exc}") from None
    if list(q.shape) != [int(d) for d in meta["shape"]]:
        raise ValueError(f"{leaf}: weight_shape {list(q.shape)} is not the sidecar's {meta['shape']}")
    return q


def load_source(
    source: str | Source, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    storage: StorageOptions | None = None,
) -> nn.Module:
    """The float model of a source checkpoint (the class config.json names), in ``dtype``: FP8 and
    MXFP4 weights as the float values they encode, per-expert tensors stacked as the model holds them.

    ``source`` is a spec for ``open_source`` (local directory, ``s3://...``, ``org/name[@revision]``)
    or an already resolved ``Source``. Tensors are read one at a time, by byte range from a
    directory or object storage; a Hub repo's files come through the huggingface_hub cache.
    """
    src = source if isinstance(source, Source) else open_source(source, storage)
    config = src.read_json("config.json")
    layout = model_layout(config)
    model = layout.model
    fmt = source_format(f"{src.spec}/config.json", config)
    inventory = {name: (file, info) for file in src.weight_files() for name, info in src.header(file).items()}
    tensors, scales = pair_scales(src.spec, fmt, inventory)
    groups, _ = source_groups(src.spec, layout, tensors, scales, fmt)
    for sg in groups:
        parts = []
        for piece in sg.ordered():
            tensor = src.read_tensor(piece.file, piece.info)
            if piece.scale is not None:  # FP8 or MXFP4: the float weight it encodes
                scale = src.read_tensor(piece.scale_file, piece.scale)
                tensor = (dequantize_mxfp4(tensor, scale).transpose(-1, -2) if piece.codes == "mxfp4"
                          else dequantize_fp8(tensor, scale, piece.block))
            parts.append((piece.pattern, tensor))
        if sg.group.conversion is None:
            made = {next(iter(sg.group.targets)): parts[0][1]}
        else:
            inputs: dict[str, list[torch.Tensor]] = {}
            for pattern, tensor in parts:
                inputs.setdefault(pattern, []).append(tensor)
            made = sg.group.conversion.apply(inputs)
        for name, tensor in made.items():
            _set_tensor(model, name, tensor, dtype)
    return _finish(model, src.spec, device)
