"""Sinkhorn-style row/column normalisation of many tiles at once.

Tiles are addressed through a 4-D view ``[a, R, b, C]`` of the weight: tile ``(i, j)`` is
``view[i, :, j, :]`` with R rows and C columns. 1D tiling is ``a = 1, R = out_features``;
2D tiling is ``R = C = group_size``. Row and column statistics are computed from running
sums of T and T**2 with batched matrix-vector products, so no iteration materialises the
scaled tile.
"""

from __future__ import annotations

import torch
from torch import Tensor

_STD_MIN, _STD_MAX = 1e-3, 1e3
_STEP_MIN, _STEP_MAX = 0.7, 2.0
_LOG_MIN, _LOG_MAX = -0.3, 10.0
# Imbalances this close count as equal. The reference continues on an exact tie; without a
# margin, float noise in the statistics decides ties and can stop a tile early at a far worse
# scaling than the reference reaches.
_TIE_RTOL = 1e-4


_KURTOSIS_CHUNK = 1 << 22


def kurtosis(w: Tensor) -> float:
    """Pearson kurtosis (normal = 3) of the fp16-rounded weight in float32, as the reference computes
    it, but independent of the matrix's overall scale (the reference floors the variance at 1e-6).

    Works through the weight a few million elements at a time so that a large matrix is never
    copied whole; chunk sums are accumulated in float64.
    """
    chunks = w.reshape(-1).split(_KURTOSIS_CHUNK)
    total = torch.zeros(3, dtype=torch.float64, device=w.device)
    for c in chunks:
        total[0] += c.to(torch.float16).float().sum()
    mean = (total[0] / w.numel()).float()
    for c in chunks:
        sq = (c.to(torch.float16).float() - mean).square_()
        total[1] += sq.sum()
        total[2] += sq.square_().sum()
    var, fourth = float(total[1]) / w.numel(), float(total[2]) / w.numel()
    return fourth / (var * var) if var > 0 else 0.0


def _std_from_sums(s1: Tensor, s2: Tensor, n: int) -> Tensor:
    var = (s2 - s1 * s1 / n) / (n - 1)
    return var.clamp_min(0).sqrt()


def _imbalance(row_std: Tensor, col_std: Tensor) -> Tensor:
    hi = torch.maximum(row_std.amax(-1), col_std.amax(-1))
    lo = torch.minimum(row_std.amin(-1), col_std.amin(-1)).clamp_min(1e-12)
    return hi / lo


def sinkhorn_scales(tiles: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """Row scales ``[a, R, b]`` and column scales ``[a, b, C]`` for every tile of ``tiles``.

    Each tile runs ``iters`` log-domain updates toward equal row and column standard
    deviations and keeps the scaling with the smallest imbalance seen (the latest one among
    ties); a tile stops updating at the first step that makes it worse. Unlike the reference, the scaling
    produced by the last update is evaluated too, so no update is wasted.
    """
    a, rows, b, cols = tiles.shape
    batch = a * b
    t = tiles.permute(0, 2, 1, 3).reshape(batch, rows, cols)
    t2 = t.square()
    dev, f32 = tiles.device, torch.float32

    def stds(log_r: Tensor, log_c: Tensor) -> tuple[Tensor, Tensor]:
        inv_r, inv_c = torch.exp(-log_r), torch.exp(-log_c)
        r1 = torch.bmm(t, inv_c.unsqueeze(-1)).squeeze(-1)
        r2 = torch.bmm(t2, inv_c.square().unsqueeze(-1)).squeeze(-1)
        c1 = torch.bmm(inv_r.unsqueeze(1), t).squeeze(1)
        c2 = torch.bmm(inv_r.square().unsqueeze(1), t2).squeeze(1)
        return inv_r * _std_from_sums(r1, r2, cols), inv_c * _std_from_sums(c1, c2, rows)

    log_r = torch.zeros(batch, rows, dtype=f32, device=dev)
    log_c = torch.zeros(batch, cols, dtype=f32, device=dev)
    row_std, col_std = stds(log_r, log_c)
    target = (
        torch.minimum(row_std.clamp(_STD_MIN, _STD_MAX).amin(-1), col_std.clamp(_STD_MIN, _STD_MAX).amin(-1)) + 1e-6
    ).unsqueeze(-1)
    best_imb = _imbalance(row_std, col_std)
    best_r, best_c = log_r.clone(), log_c.clone()
    active = torch.ones(batch, dtype=torch.bool, device=dev)

    for step in range(iters + 1):
        if step:
            row_std, col_std = stds(log_r, log_c)
            imb = _imbalance(row_std, col_std)
            better = active & (imb <= best_imb * (1 + _TIE_RTOL))
            best_imb = torch.where(better, torch.minimum(imb, best_imb), best_imb)
            best_r = torch.where(better.unsqueeze(-1), log_r, best_r)
            best_c = torch.where(better.unsqueeze(-1), log_c, best_c)
            active = better
        if step == iters or not bool(active.any()):
            break
        gate = active.to(f32).unsqueeze(-1)
        step_c = (col_std.clamp(_STD_MIN, _STD_MAX) / target).clamp(_STEP_MIN, _STEP_MAX).log()
        step_r = (row_std.clamp(_STD_MIN, _STD_MAX) / target).clamp(_STEP_MIN, _STEP_MAX).log()
        log_c = (log_c + step_c * gate).clamp(_LOG_MIN, _LOG_MAX)
        log_r = (log_r + step_r * gate).clamp(_LOG_MIN, _LOG_MAX)

    row_scale = best_r.exp().reshape(a, b, rows).permute(0, 2, 1)
    col_scale = best_c.exp().reshape(a, b, cols)
    return row_scale, col_scale
