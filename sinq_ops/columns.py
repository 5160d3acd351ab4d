"""Column scales that several matrices share, so that a serving format can fold them away.

A serving engine's int4 formats (compressed-tensors ``pack-quantized``) hold codes, a group scale
and a zero per group, and nothing per input column. SINQ's column scale ``c`` then has to move
into whatever produces the matrix's input: ``W x = deq(W) (c * x)``. That is exact only when
every matrix reading one input uses the same ``c`` (q, k and v read one normed input; gate and up
another), and, for an attention output projection, when ``c`` repeats for the query heads that
read one key/value head (it then moves into ``v_proj``'s rows). These functions compute such a
scale the way SINQ computes one, by Sinkhorn over the rows of the matrices it is computed from;
which matrices those are is the caller's choice (``pipeline.job.folds``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import KURTOSIS_GATE, SINKHORN_ITERS
from .sinkhorn import kurtosis, sinkhorn_scales


def shared_column_scale(weights: list[Tensor], group_size: int) -> Tensor:
    """One column scale ``[in_features]`` for matrices ``[n_i, in_features]`` that read one input.

    Sinkhorn runs on the rows of all of them stacked, tile by tile as SINQ's 1D tiling runs on one
    matrix (every row, ``group_size`` columns a tile), so one matrix alone gets the column scale
    ``sinq_ops.quantize`` would give it; the kurtosis gate looks at the stack, and gives ones where
    it falls back to RTN.
    """
    if not weights:
        raise ValueError("no matrices to share a column scale")
    k = weights[0].shape[-1]
    if any(w.ndim != 2 or w.shape[-1] != k for w in weights):
        raise ValueError(f"matrices sharing a column scale need one in_features: {[list(w.shape) for w in weights]}")
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={k}")
    stacked = torch.cat([w.to(torch.float16).float() for w in weights])
    if not torch.isfinite(stacked).all():
        raise ValueError("weight contains NaN or Inf")
    if stacked.shape[0] < 2 or kurtosis(stacked) > KURTOSIS_GATE:
        return torch.ones(k, device=stacked.device)
    _, col = sinkhorn_scales(stacked.view(1, stacked.shape[0], k // group_size, group_size), SINKHORN_ITERS)
    return col.reshape(k)


def tied_column_scale(weight: Tensor, group_size: int, *, heads: int, kv_heads: int) -> Tensor:
    """A column scale ``[in_features]`` for an attention output projection ``[hidden, heads * d]``
    that repeats for every query head of one key/value head, so it folds into ``v_proj``'s rows.

    The columns of the query heads that share a key/value head are stacked as rows of one matrix
    ``[heads / kv_heads * hidden, kv_heads * d]``, whose Sinkhorn column scale is then repeated.
    """
    n, k = weight.shape
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads or k % heads:
        raise ValueError(f"{heads} heads over {kv_heads} key/value heads do not fit in_features={k}")
    rep, d = heads // kv_heads, k // heads
    rows = weight.reshape(n, kv_heads, rep, d).permute(2, 0, 1, 3).reshape(rep * n, kv_heads * d)
    # Sinkhorn's tiles as wide as the groups, unless the stacked columns are fewer than one group
    # holds (one key/value head narrower than a group): then as wide as both allow.
    tile = math.gcd(group_size, kv_heads * d)
    return kv_scale_to_heads(shared_column_scale([rows], tile), heads=heads, kv_heads=kv_heads)


def kv_scale_to_heads(scale: Tensor, *, heads: int, kv_heads: int) -> Tensor:
    """A per-key/value-head scale ``[kv_heads * d]`` repeated for each query head: ``[heads * d]``."""
    d = scale.numel() // kv_heads
    return scale.reshape(kv_heads, 1, d).expand(kv_heads, heads // kv_heads, d).reshape(heads * d)


def heads_scale_to_kv(scale: Tensor, *, heads: int, kv_heads: int) -> Tensor:
    """The inverse of ``kv_scale_to_heads`` for a tied scale: the one value per key/value head's column."""
    d = scale.numel() // heads
    return scale.reshape(kv_heads, heads // kv_heads, d)[:, 0].reshape(kv_heads * d)


def fold_into_norm(weight: Tensor, scale: Tensor, *, one_plus: bool = False) -> Tensor:
    """A norm's weight that also multiplies its output by ``scale``: ``w * s``, or for a norm that
    computes ``x * (1 + w)``, ``(1 + w) * s - 1``. Computed in float32."""
    w = weight.float()
    s = scale.to(w.device, torch.float32)
    return (1 + w) * s - 1 if one_plus else w * s


def fold_into_rows(weight: Tensor, scale: Tensor) -> Tensor:
    """``diag(scale) @ weight`` in float32: a producer whose outputs the next matrix's column scale multiplied."""
    return weight.float() * scale.to(weight.device, torch.float32)[:, None]
