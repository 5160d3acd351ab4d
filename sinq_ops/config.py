"""Quantization settings, validated once so that every other module can trust them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
METHODS = ("sinq", "rtn", "nf4", "nf3", "asinq")
TILINGS = ("1D", "2D")
AUX_FORMATS = ("int8", "fp16")

# Above this Pearson kurtosis a matrix is quantized without Sinkhorn scaling.
KURTOSIS_GATE = 5.0
SINKHORN_ITERS = 16


@dataclass(frozen=True)
class QuantConfig:
    """How one weight matrix is quantized."""

    bits: int = 4
    group_size: int = 64
    tiling: str = "1D"
    method: str = "sinq"
    aux: str = "int8"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not supported; choose one of {', '.join(METHODS)}")
        if self.method in ("nf4", "nf3"):
            need = 4 if self.method == "nf4" else 3
            if self.bits != need:
                raise ValueError(f"method={self.method!r} needs bits={need}, got bits={self.bits}")
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; choose one of {SUPPORTED_BITS}")
        if self.method == "asinq" and self.tiling != "1D":
            raise ValueError(f"method='asinq' needs tiling='1D' (its activation scale runs along the input "
                             f"features, as 1D groups do), got tiling={self.tiling!r}")
        if self.tiling not in TILINGS:
            raise ValueError(f"tiling={self.tiling!r} is not supported; choose one of {', '.join(TILINGS)}")
        if self.aux not in AUX_FORMATS:
            raise ValueError(f"aux={self.aux!r} is not supported; choose one of {', '.join(AUX_FORMATS)}")
        if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 8:
            raise ValueError(f"group_size={self.group_size!r} must be a positive multiple of 8")

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def codebook_name(self) -> str | None:
        """Name of the non-uniform codebook, or None for uniform codes."""
        return self.method if self.method in ("nf4", "nf3") else None

    @property
    def calibrated(self) -> bool:
        """Whether the job needs calibration activations (A-SINQ's activation-aware scale)."""
        return self.method == "asinq"

    @property
    def uses_sinkhorn(self) -> bool:
        return self.method != "rtn"

    @property
    def reference_method(self) -> str:
        """The method string the reference package stores in its metadata for this config."""
        base = {"sinq": "sinq", "rtn": "rtn", "nf4": "sinq_nf4", "nf3": "sinq_nf3", "asinq": "sinq_awq_l1"}[self.method]
        return base + ("_quantAux" if self.aux == "int8" else "")

    def to_dict(self) -> dict:
        return asdict(self)


# What serving engines' integer kernels run (vLLM's Marlin, Machete and CPU kernels, SGLang's):
# uniform asymmetric codes in groups along the input axis.
SERVING_BITS = (4, 8)
SERVING_GROUP_SIZES = (32, 64, 128)
SERVING_8BIT_GROUP_SIZES = (64, 128)


def check_servable(config: QuantConfig) -> None:
    """Refuse, in one line naming what is supported, a config that no serving engine's int kernels run."""
    why = []
    if config.bits not in SERVING_BITS:
        why.append(f"bits={config.bits} (supported: {', '.join(map(str, SERVING_BITS))})")
    if config.group_size not in SERVING_GROUP_SIZES:
        why.append(f"group_size={config.group_size} (supported: {', '.join(map(str, SERVING_GROUP_SIZES))})")
    elif config.bits == 8 and config.group_size not in SERVING_8BIT_GROUP_SIZES:
        why.append(f"bits=8 with group_size={config.group_size} (asymmetric 8-bit runs on Machete only, which takes "
                   f"groups of {' or '.join(map(str, SERVING_8BIT_GROUP_SIZES))})")
    if config.tiling != "1D":
        why.append(f"tiling={config.tiling} (supported: 1D)")
    if config.codebook_name:
        why.append(f"method={config.method} (supported: sinq, asinq, rtn; engines run uniform integer codes only)")
    if why:
        raise ValueError("--format compressed-tensors cannot hold " + "; ".join(why))
