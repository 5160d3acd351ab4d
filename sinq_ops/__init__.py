"""SINQ weight quantization as pure tensor code (no Ray, storage or transformers here).

The names below load on first use, so that ``sinq_ops.config`` (settings and their checks)
can be imported without torch: a command line answers ``--help`` before torch would load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "QuantConfig": "config", "SINQExperts": "experts", "SINQLinear": "linear", "QuantizedWeight": "quantize", "quantize": "quantize",
    "quantized_layout": "layout", "relative_error": "quantize",
}

if TYPE_CHECKING:
    from .config import QuantConfig
    from .experts import SINQExperts
    from .linear import SINQLinear
    from .layout import quantized_layout
    from .quantize import QuantizedWeight, quantize, relative_error


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'sinq_ops' has no attribute {name!r}")
    module = importlib.import_module(f".{_HOMES[name]}", __name__)
    # Bind every name of that module now: importing ``.quantize`` set ``sinq_ops.quantize`` to the
    # submodule, which must not stand in for the function of the same name.
    globals().update({n: getattr(module, n) for n, home in _HOMES.items() if home == _HOMES[name]})
    return globals()[name]


__all__ = sorted(_HOMES)
