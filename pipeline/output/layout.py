"""The output's file names and the blocks other tools read: what makes an output this tool's.

The loader, the driver and the reducer all take names from here, so the format has one home.
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from sinq_ops.config import QuantConfig

from ..io.hf_names import INDEX_NAME

# Per quantized Linear: the reference's metadata (nbits, group_size, shape, packing, ...).
SIDECAR_NAME = INDEX_NAME + ".meta.json"
# The model card (pipeline.output.card) and the perplexity figures an evaluation adds.
CARD_NAME = "README.md"
EVAL_NAME = "eval.json"
TOOL_NAME = "sinq-cluster"


@lru_cache(maxsize=1)
def tool_version() -> str:
    """The installed package's version; from pyproject.toml where the code runs uninstalled (a Ray
    job's --working-dir), so that both ways give the same run keys and manifests."""
    try:
        return metadata.version(TOOL_NAME)
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


# A compressed-tensors output's tensors per quantized Linear (``sinq_ops.compressed``).
CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def quantized_leaf(name: str) -> str:
    """The quantized Linear (or expert matrix) an output tensor belongs to, in either format
    (``<leaf>.W_q``, ``<leaf>.meta.*``; ``<leaf>.weight_packed``, ...), else ``name`` itself."""
    if name.endswith(".W_q"):
        return name.removesuffix(".W_q")
    if ".meta." in name:
        return name.split(".meta.")[0]
    leaf, _, last = name.rpartition(".")
    return leaf if last in CT_SUFFIXES else name


def shard_names(count: int) -> list[str]:
    """``model-00001-of-00003.safetensors``, ...: the Hugging Face names of ``count`` shards."""
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def loads_with_from_pretrained(method: str, tiling: str) -> bool:
    """Whether plain ``transformers`` ``from_pretrained``, through the ``sinq`` package's import
    hook, computes what an output of this method and tiling holds.

    The hook hands the directory to the reference loader, which decodes every layer by the method
    its sidecar entry names: right for every method on CPU, and on CUDA without GemLite. On CUDA
    with GemLite installed it runs each 4-bit layer with 1D tiling through GemLite's kernel, which
    only knows uniform codes (``sinq/sinqlinear.py``: ``_can_use_gemlite_from_meta`` never looks at
    the method, ``_prepare_gemlite_args`` packs the raw codes): right for sinq and rtn, wrong for
    NF4 codes. So nf4 with 1D tiling is the one output that must not load that way.
    """
    return not (method == "nf4" and tiling == "1D")


def quantization_config(config: QuantConfig, not_converted: list[str], *, quantized_experts: bool = False) -> dict:
    """The ``quantization_config`` block transformers reads (``SinqConfig`` keys) plus ours.

    ``method`` is always ``"sinq"``: transformers' ``SinqConfig`` accepts only ``"sinq"`` and
    ``"asinq"``, and nothing that loads this layout decodes by it. Every quantized Linear's
    sidecar entry names its own method (``rtn_quantAux``, ``sinq_nf4_quantAux``, ...), which is
    what the reference loader and ours decode, so rtn, nf3 and 2D-tiled nf4 outputs load through
    ``from_pretrained`` and compute what ``pipeline.loader`` does. The job's own method is
    ``sinq_method``.

    An output that plain ``from_pretrained`` would run wrongly (``loads_with_from_pretrained``),
    or could not build (``quantized_experts``: the reference loader knows Linear layers only, not
    transformers 5's experts modules, which ``pipeline.loader`` fills from one quantized matrix per
    expert), gets a block without ``quant_method``: the hook then leaves it alone, and transformers
    refuses it ("no `quant_method` attribute") instead of loading it as an unquantized model.
    """
    block = {
        "quant_method": "sinq",
        "nbits": config.bits,
        "group_size": config.group_size,
        "tiling_mode": config.tiling,
        "method": "sinq",
        "sinq_method": config.method,
        "modules_to_not_convert": not_converted,
        "aux": config.aux,
    }
    if quantized_experts:
        why = ("its experts modules hold one quantized matrix per expert, which only pipeline.loader.load_quantized "
               "builds")
    elif not loads_with_from_pretrained(config.method, config.tiling):
        why = ("transformers' from_pretrained (with the sinq package's hook) would run these NF4 layers through "
               "GemLite on CUDA as uniform codes")
    else:
        return block
    return {
        **{k: v for k, v in block.items() if k not in ("quant_method", "method")},
        "loader": "pipeline.loader.load_quantized",
        "note": f"no quant_method on purpose: {why}; load with pipeline.loader.load_quantized",
    }


def compressed_tensors_config(config: QuantConfig, not_converted: list[str]) -> dict:
    """The ``quantization_config`` block vLLM, SGLang and transformers read for a ``pack-quantized``
    output: every Linear in one group of asymmetric integer weights, activations left in float,
    the Linear layers this output keeps in full precision (``lm_head``, routers, towers) ignored."""
    weights = {"num_bits": config.bits, "type": "int", "symmetric": False, "strategy": "group",
               "group_size": config.group_size, "dynamic": False, "actorder": None, "block_structure": None,
               "observer": "minmax", "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": sorted(not_converted),
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }
