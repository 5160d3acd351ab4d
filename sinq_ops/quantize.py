"""SINQ quantization of one weight matrix, and the quantized weight it produces."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor

from . import aux8, packing
from .config import KURTOSIS_GATE, SINKHORN_ITERS, QuantConfig
from .layout import quantized_layout
from .memory import ERROR_BLOCK_ELEMENTS
from .rounding import codebook, decode, round_codebook, round_uniform
from .sinkhorn import kurtosis, sinkhorn_scales

_FP16_MAX = torch.finfo(torch.float16).max
GroupValues = Tensor | aux8.Aux8


def _values(x: GroupValues) -> Tensor:
    return x.values() if isinstance(x, aux8.Aux8) else x.float()


@dataclass
class QuantizedWeight:
    """Packed codes plus the scales needed to rebuild ``W ~ (Q - zero) * scale * scale2``.

    Layouts follow the reference: ``scale``/``zero`` are ``[N*K/g, 1]`` (1D) or
    ``[tiles, g, 1]`` (2D, tile-major); ``scale2`` is ``[1, K]`` (1D) or ``[tiles, 1, g]`` (2D).
    """

    qweight: Tensor
    scale: GroupValues
    zero: GroupValues
    scale2: Tensor
    shape: tuple[int, int]
    config: QuantConfig
    sinkhorn_applied: bool = True

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def dequantize(self, dtype: torch.dtype = torch.float32, apply_scale2: bool = True) -> Tensor:
        """The reconstructed weight ``[out_features, in_features]``.

        ``apply_scale2=False`` (1D tiling only) leaves the column scale out, for callers that
        apply it to the activations instead: ``W @ x == deq_without_scale2 @ (scale2 * x)``.
        """
        if not apply_scale2 and self.config.tiling != "1D":
            raise ValueError("the column scale can only be moved to the activations with 1D tiling")
        out = torch.empty(self.shape, dtype=dtype, device=self.qweight.device)
        for start, block in self.row_blocks(out.numel(), apply_scale2):
            out[start:start + block.shape[0]] = block
        return out

    def row_blocks(self, block_elements: int, apply_scale2: bool = True) -> Iterator[tuple[int, Tensor]]:
        """``(first_row, rows)`` of the reconstructed weight in float32, about ``block_elements`` at a time.

        Lets callers compare against the original without a full float32 copy of either.
        """
        n, k = self.shape
        g = self.config.group_size
        cols = k // g
        codes = packing.unpack(self.qweight, self.config.bits, n * cols)
        scale, zero = _values(self.scale).reshape(-1), _values(self.zero).reshape(-1)
        if self.config.tiling == "2D":
            scale, zero = (_tile_major_to_rows(t, n, cols, g) for t in (scale, zero))
        levels = codebook(self.config.codebook_name, codes.device) if self.config.codebook_name else None
        s2 = self.scale2.float().reshape(-1, k)  # one row (1D) or one row per g rows (2D)
        unit = g if self.config.tiling == "2D" else 1
        step = max(unit, block_elements // k // unit * unit)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            q0, q1 = r0 * cols, r1 * cols
            w = decode(codes[q0:q1], scale[q0:q1, None], zero[q0:q1, None], levels).reshape(r1 - r0, k)
            if apply_scale2 and unit == 1:
                w *= s2
            elif apply_scale2:
                w = (w.reshape(-1, g, k) * s2[r0 // g:r1 // g, None, :]).reshape(r1 - r0, k)
            yield r0, w

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        def move(x: GroupValues) -> GroupValues:
            if isinstance(x, aux8.Aux8):
                return aux8.Aux8(x.codes.to(device), x.step.to(device), x.offset.to(device), x.shape)
            return x.to(device)

        return QuantizedWeight(
            self.qweight.to(device), move(self.scale), move(self.zero), self.scale2.to(device),
            self.shape, self.config, self.sinkhorn_applied,
        )

    def _tensors(self) -> dict[str, Tensor]:
        out = {"W_q": self.qweight, "meta.scale2": self.scale2}
        for name, value in (("scale", self.scale), ("zero", self.zero)):
            if isinstance(value, aux8.Aux8):
                out.update({f"meta.{name}.{k}": t for k, t in value.tensors().items()})
            else:
                out[f"meta.{name}"] = value
        return out

    def to_state_dict(self, prefix: str) -> dict[str, Tensor]:
        """Tensors under the reference's key names, e.g. ``<prefix>.W_q``, ``<prefix>.meta.scale.x``."""
        return {f"{prefix}.{k}": t.contiguous() for k, t in self._tensors().items()}

    def metadata(self) -> dict:
        """The non-tensor fields the reference keeps in its sidecar file under ``{"meta": ...}``."""
        meta = {
            "nbits": self.config.bits,
            "group_size": self.config.group_size,
            "shape": list(self.shape),
            "axis": 1,
            "packing": packing.PACKINGS[self.config.bits].name,
            "method": self.config.reference_method,
            "tiling_mode": self.config.tiling,
            "compute_dtype": "torch.float32",
            "unpack_view_dtype": str(packing.PACKINGS[self.config.bits].dtype),
            "view_as_float": False,
            "awq_scale": None,
        }
        for name, value in (("scale", self.scale), ("zero", self.zero)):
            if isinstance(value, aux8.Aux8):
                meta[f"{name}.shape"] = list(value.shape)
        return meta

    @classmethod
    def placeholder(cls, shape: tuple[int, int], config: QuantConfig, device: str | torch.device = "meta") -> "QuantizedWeight":
        """A quantized weight of the layout :func:`quantize` gives for ``shape`` and ``config``, with
        uninitialised tensors (on the meta device, none at all): for checking what a model built
        from such weights computes with, before any weight is quantized."""
        n, k = shape
        g = config.group_size
        t = {suffix: torch.empty(shp, dtype=dtype, device=device)
             for suffix, (dtype, shp) in quantized_layout(shape, config).items()}
        group_shape = (n * k // g, 1) if config.tiling == "1D" else (n * k // g // g, g, 1)

        def group_values(name: str) -> GroupValues:
            if config.aux == "int8":
                return aux8.Aux8(t[f"meta.{name}.x"], t[f"meta.{name}.s"], t[f"meta.{name}.m"], group_shape)
            return t[f"meta.{name}"]

        return cls(t["W_q"], group_values("scale"), group_values("zero"), t["meta.scale2"], (n, k), config)

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, Tensor], meta: Mapping, prefix: str) -> "QuantizedWeight":
        """Rebuild from :meth:`to_state_dict` tensors and :meth:`metadata` (ours or the reference's)."""
        try:
            config = _config_from_meta(meta, tensors, prefix)
            shape = tuple(int(d) for d in meta["shape"])

            def group_values(name: str) -> GroupValues:
                if config.aux == "int8":
                    parts = [tensors[f"{prefix}.meta.{name}.{k}"] for k in ("x", "s", "m")]
                    return aux8.Aux8(*parts, tuple(int(d) for d in meta[f"{name}.shape"]))
                return tensors[f"{prefix}.meta.{name}"]

            q = cls(
                tensors[f"{prefix}.W_q"], group_values("scale"), group_values("zero"),
                tensors[f"{prefix}.meta.scale2"], shape, config,
            )
        except KeyError as exc:
            raise ValueError(f"{prefix}: missing quantized field {exc.args[0]!r}") from None
        _check_layout(q, prefix)
        return q


def _config_from_meta(meta: Mapping, tensors: Mapping[str, Tensor], prefix: str) -> QuantConfig:
    method = str(meta["method"]).lower()
    name = "nf4" if "nf4" in method else "nf3" if "nf3" in method else "sinq" if "sinq" in method else "rtn"
    tiling = meta.get("tiling_mode")
    if tiling is None:
        # The reference does not record the tiling; its 2D layout keeps 3-D group scales.
        scale_shape = meta.get("scale.shape") or tensors[f"{prefix}.meta.scale"].shape
        tiling = "2D" if len(scale_shape) == 3 else "1D"
    return QuantConfig(
        bits=int(meta["nbits"]), group_size=int(meta["group_size"]), tiling=tiling, method=name,
        aux="int8" if "quantaux" in method else "fp16",
    )


def _check_layout(q: QuantizedWeight, prefix: str) -> None:
    n, k = q.shape
    g = q.config.group_size
    if n <= 0 or k % g or (q.config.tiling == "2D" and n % g):
        raise ValueError(f"{prefix}: shape {list(q.shape)} does not fit group size {g} ({q.config.tiling})")
    groups = n * k // g
    want_rows = packing.packed_rows(groups, q.config.bits)
    if tuple(q.qweight.shape) != (want_rows, g):
        raise ValueError(f"{prefix}: W_q has shape {list(q.qweight.shape)}, expected {[want_rows, g]}")
    for name in ("scale", "zero"):
        numel = _values(getattr(q, name)).numel()
        if numel != groups:
            raise ValueError(f"{prefix}: meta.{name} holds {numel} values, expected {groups}")
    want_s2 = k if q.config.tiling == "1D" else n * k // g
    if q.scale2.numel() != want_s2:
        raise ValueError(f"{prefix}: meta.scale2 holds {q.scale2.numel()} values, expected {want_s2}")


def _tile_major_to_rows(t: Tensor, n: int, cols: int, g: int) -> Tensor:
    """2D group values ``[tiles, g, 1]`` (tile-major) to row-major ``[n * cols]``."""
    return t.reshape(n // g, cols, g).permute(0, 2, 1).reshape(-1)


def _prepare(weight: Tensor, config: QuantConfig) -> Tensor:
    if not isinstance(weight, Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {list(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    n, k = weight.shape
    g = config.group_size
    if n == 0 or k == 0:
        raise ValueError(f"weight is empty: shape {list(weight.shape)}")
    if k % g:
        raise ValueError(f"group_size={g} does not divide in_features={k}")
    if config.tiling == "2D" and n % g:
        raise ValueError(f"2D tiling needs group_size={g} to divide out_features={n} too")
    return weight.contiguous()


def _check_range(lo: float, hi: float) -> None:
    """Each path finds the weight's extremes in its own first read; NaN and Inf must not get past it."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("weight contains NaN or Inf")
    if max(-lo, hi) > _FP16_MAX:
        raise ValueError(f"weight has values beyond the fp16 range (|w| > {_FP16_MAX:g})")


BACKENDS = ("auto", "torch", "triton")


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _backend(w: Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; choose one of {', '.join(BACKENDS)}")
    triton_ok = _have_triton()
    if backend == "auto":
        return "triton" if w.is_cuda and triton_ok else "torch"
    if backend == "triton":
        if not triton_ok:
            raise ValueError("backend='triton' needs the triton package")
        if not w.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1)")
    return backend


def _wants_sinkhorn(config: QuantConfig, tile_rows: int, kurtosis_of: Callable[[], float]) -> bool:
    """The reference's gate: Sinkhorn only for multi-row tiles of weights that are not too heavy-tailed."""
    return config.uses_sinkhorn and tile_rows > 1 and kurtosis_of() <= KURTOSIS_GATE


def _torch_path(w: Tensor, config: QuantConfig, tile_rows: int, column_scale: Tensor | None = None,
                zero_in_range: bool = False, scale_dtype: torch.dtype | None = None,
                activation_scale: Tensor | None = None, sinkhorn: tuple[Tensor, Tensor] | None = None):
    """Reference path: sinkhorn.py, rounding.py and packing.py on an fp32 copy of the weight."""
    _check_range(*(float(v) for v in torch.aminmax(w)))  # NaN and Inf propagate
    if column_scale is not None:
        use_sinkhorn = bool((column_scale != 1).any())
    elif sinkhorn is not None:
        use_sinkhorn = True
    else:
        use_sinkhorn = _wants_sinkhorn(config, tile_rows, lambda: kurtosis(w))
    n, k = w.shape
    g = config.group_size
    tiles = w.to(torch.float16).float().view(n // tile_rows, tile_rows, k // g, g)
    a, rows, b, cols = tiles.shape
    if column_scale is not None:
        # A column scale decided by the caller (shared with other matrices, or tied across heads): in
        # 1D tiling a row scale is constant over each group, so it would not change a single code.
        row_scale = torch.ones(a, rows, b, device=w.device)
        col_scale = column_scale.to(w.device, torch.float32).reshape(a, b, cols)
        normalised = tiles / col_scale.unsqueeze(1)
    elif use_sinkhorn:
        row_scale, col_scale = sinkhorn_scales(tiles, SINKHORN_ITERS) if sinkhorn is None else sinkhorn
        normalised = tiles / col_scale.unsqueeze(1) / row_scale.unsqueeze(-1)
    else:
        row_scale = torch.ones(a, rows, b, device=w.device)
        col_scale = torch.ones(a, b, cols, device=w.device)
        normalised = tiles
    if activation_scale is not None and use_sinkhorn:
        act = activation_scale.to(w.device, torch.float32).reshape(a, b, cols)
        normalised = normalised * act.unsqueeze(1)
        col_scale = col_scale / act
    if config.codebook_name:
        codes, step, zero = round_codebook(normalised, codebook(config.codebook_name, w.device))
    else:
        codes, step, zero = round_uniform(normalised, config.max_code, zero_in_range=zero_in_range,
                                          scale_dtype=scale_dtype)
    del normalised, tiles
    qweight = packing.pack(codes.reshape(-1, g), config.bits)
    return qweight, step.squeeze(-1) * row_scale, zero.squeeze(-1), col_scale, use_sinkhorn


def _triton_path(w: Tensor, config: QuantConfig, tile_rows: int):
    """Same results from kernel launches that read the weight in place, in its own dtype."""
    from . import kernels

    lo, hi, kurt = kernels.weight_stats(w)
    _check_range(lo, hi)
    use_sinkhorn = _wants_sinkhorn(config, tile_rows, lambda: kurt)
    n, k = w.shape
    g = config.group_size
    tiles = (n // tile_rows) * (k // g)
    if use_sinkhorn:
        row_scale, col_scale = kernels.sinkhorn_scales(w, tile_rows, g, SINKHORN_ITERS)
    else:
        row_scale = torch.ones(tiles, tile_rows, device=w.device)
        col_scale = torch.ones(tiles, g, device=w.device)
    qweight, group_scale, zero = kernels.quantize_groups(w, row_scale, col_scale, tile_rows, config)
    a, b = n // tile_rows, k // g
    shape = (a, tile_rows, b)
    return qweight, group_scale.view(shape), zero.view(shape), col_scale.view(a, b, g), use_sinkhorn


def quantize(
    weight: Tensor,
    *,
    bits: int = 4,
    group_size: int = 64,
    tiling: str = "1D",
    method: str = "sinq",
    aux: str = "int8",
    backend: str = "auto",
    column_scale: Tensor | None = None,
    zero_in_range: bool = False,
    scale_dtype: torch.dtype | None = None,
    activation_scale: Tensor | None = None,
    sinkhorn: tuple[Tensor, Tensor] | None = None,
) -> QuantizedWeight:
    """Quantize a 2-D ``[out_features, in_features]`` weight on the device it lives on.

    The weight is rounded to fp16 first (as the reference does) and processed in fp32.
    ``backend="auto"`` runs the Triton kernels on CUDA tensors and the torch path elsewhere.

    ``column_scale`` (``[in_features]``, 1D tiling, uniform codes) replaces the Sinkhorn column
    scale and the kurtosis gate: the caller has computed one scale for several matrices that will
    share it (``sinq_ops.columns``). ``zero_in_range`` keeps every group's zero among the codes
    (``rounding.round_uniform``), and ``scale_dtype`` has the codes chosen for, and the group scales
    kept in, the dtype a serving format stores them in. ``activation_scale`` (``[in_features]``,
    A-SINQ's, from ``sinq_ops.activation.search``) multiplies the normalised weight before rounding
    and divides the column scale; a matrix the kurtosis gate sends to round-to-nearest ignores it.
    ``sinkhorn`` is the weight's row and column scales from ``sinq_ops.activation.normalisation``,
    which A-SINQ's search has computed already (given, they decide the gate). These run on the
    torch path.
    """
    config = QuantConfig(bits=bits, group_size=group_size, tiling=tiling, method=method, aux=aux)
    w = _prepare(weight, config)
    n, k = w.shape
    g = config.group_size
    constrained = column_scale is not None or zero_in_range or scale_dtype is not None \
        or activation_scale is not None or sinkhorn is not None
    if constrained:
        if tiling != "1D" or config.codebook_name:
            raise ValueError("a given column scale, zero_in_range, scale_dtype, activation_scale and sinkhorn need 1D "
                             "tiling and uniform codes")
        if sinkhorn is not None:
            if column_scale is not None or not config.uses_sinkhorn:
                raise ValueError("sinkhorn is given for SINQ's own normalisation, not with a column_scale or for "
                                 f"method={method!r}")
            if tuple(sinkhorn[0].shape) != (1, n, k // g) or tuple(sinkhorn[1].shape) != (1, k // g, g):
                raise ValueError(f"sinkhorn holds scales of shapes {[list(t.shape) for t in sinkhorn]}, expected "
                                 f"[[1, {n}, {k // g}], [1, {k // g}, {g}]] (sinq_ops.activation.normalisation)")
        for name, given in (("column_scale", column_scale), ("activation_scale", activation_scale)):
            if given is not None and given.numel() != k:
                raise ValueError(f"{name} holds {given.numel()} values, expected in_features={k}")
        if backend == "triton":
            raise ValueError("backend='triton' takes no given column scale, zero_in_range, scale_dtype, "
                             "activation_scale or sinkhorn; use 'torch'")
        qweight, group_scale, zero, col_scale, use_sinkhorn = _torch_path(w, config, n, column_scale, zero_in_range,
                                                                          scale_dtype, activation_scale, sinkhorn)
    else:
        path = _triton_path if _backend(w, backend) == "triton" else _torch_path
        qweight, group_scale, zero, col_scale, use_sinkhorn = path(w, config, n if tiling == "1D" else g)

    if tiling == "1D":
        scale_l, zero_l = group_scale.reshape(-1, 1), zero.reshape(-1, 1)
        scale2 = col_scale.reshape(1, k)
    else:
        scale_l = group_scale.permute(0, 2, 1).reshape(-1, g, 1)
        zero_l = zero.permute(0, 2, 1).reshape(-1, g, 1)
        scale2 = col_scale.reshape(-1, 1, g)

    if config.aux == "int8":
        scale_v: GroupValues = aux8.encode(scale_l, aux8.scale_tile(scale_l.numel()))
        zero_v: GroupValues = aux8.encode(zero_l, zero_l.numel())
    else:
        scale_v, zero_v = scale_l.to(scale_dtype or torch.float16), zero_l.to(torch.float16)
    return QuantizedWeight(
        qweight, scale_v, zero_v, scale2.to(torch.float16), (n, k), config, use_sinkhorn,
    )


def relative_error(weight: Tensor, quantized: QuantizedWeight) -> float:
    """``||W - deq(W)|| / ||W||`` on the weight's device, a few million elements at a time."""
    diff = norm = torch.zeros((), dtype=torch.float64, device=weight.device)
    for r0, block in quantized.row_blocks(ERROR_BLOCK_ELEMENTS):
        w = weight[r0:r0 + block.shape[0]].float()
        diff = diff + (w - block.to(w.device)).square_().sum(dtype=torch.float64)
        norm = norm + w.square().sum(dtype=torch.float64)
    diff, norm = float(diff.sqrt()), float(norm.sqrt())
    return diff / norm if norm > 0 else diff
