"""The reference package (PyPI sinq==0.2.0) used as a numerical oracle.

Imported from ``$SINQ_ORACLE_PATH`` when set (``dev.sh`` sets it), else from ``.venv/oracle``
where dev.sh put it, else from site-packages.

Only ``sinq.quantizer`` is needed. Its import chain reaches ``sinq.awq``, which imports
``datasets`` at module level for calibration data that quantization never uses; when
``datasets`` is not installed an empty module stands in for it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import torch

os.environ.setdefault("SINQ_AUTO_PATCH", "0")
# dev.sh installs the reference into its own folder, off the default import path.
_BUILT = Path(__file__).resolve().parents[1] / ".venv" / "oracle"
os.environ.setdefault("SINQ_ORACLE_PATH", str(_BUILT) if _BUILT.is_dir() else "")
if os.environ["SINQ_ORACLE_PATH"]:
    sys.path.insert(0, os.environ["SINQ_ORACLE_PATH"])
if importlib.util.find_spec("datasets") is None:
    stub = types.ModuleType("datasets")
    stub.load_dataset = None
    sys.modules["datasets"] = stub

from sinq.quantizer import Quantizer  # noqa: E402

from sinq_ops import QuantConfig  # noqa: E402


def reference_quantize(weight: torch.Tensor, config: QuantConfig, device: str = "cpu") -> tuple[torch.Tensor, dict]:
    """Quantize with the reference on CPU, from the same fp16-rounded weight that ours sees.

    On CPU the reference keeps every scale in float32; the checkpoints it writes (computed on
    GPU) hold the column scale, and the group scales and zeros of the non-8-bit format, in
    fp16. Those are rounded here the same way, so the oracle describes what its files contain.
    """
    w = weight.to(torch.float16).float().to(device)
    packed, meta = Quantizer.quantize(
        w, None, nbits=config.bits, group_size=config.group_size, axis=1, device=device,
        tiling_mode=config.tiling, method=config.reference_method, compute_dtype=torch.float32,
    )
    meta["scale2"] = meta["scale2"].half()
    if config.aux == "fp16":
        meta["scale"], meta["zero"] = meta["scale"].half(), meta["zero"].half()
    return packed, meta


def reference_dequantize(packed: torch.Tensor, meta: dict) -> torch.Tensor:
    return Quantizer.dequantize(packed, meta).float()
