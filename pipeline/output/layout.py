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


def shard_names(count: int) -> list[str]:
    """``model-00001-of-00003.safetensors``, ...: the Hugging Face names of ``count`` shards."""
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def quantization_config(config: QuantConfig, not_converted: list[str]) -> dict:
    """The ``quantization_config`` block transformers reads (``SinqConfig`` keys) plus ours."""
    return {
        "quant_method": "sinq",
        "nbits": config.bits,
        "group_size": config.group_size,
        "tiling_mode": config.tiling,
        "method": config.method,
        "modules_to_not_convert": not_converted,
        "aux": config.aux,
    }
