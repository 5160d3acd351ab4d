"""SINQ weight quantization as pure tensor code (no Ray, storage or transformers here)."""

from .config import QuantConfig
from .linear import SINQLinear
from .quantize import QuantizedWeight, quantize, quantized_layout, relative_error

__all__ = ["QuantConfig", "QuantizedWeight", "SINQLinear", "quantize", "quantized_layout", "relative_error"]
