"""Triton kernels for SINQ: one launch balances every tile, one more quantizes and packs.

The weight is read in its own dtype, rounded to fp16 in registers (as the reference rounds it)
and never copied, so the extra memory while quantizing is the outputs plus a few floats per group. Each Sinkhorn program owns one tile and runs all of
its iterations, including the stop rule, without returning to the host; the quantize program
owns a block of packed rows and writes them in the reference layout directly.
The torch functions in ``sinkhorn``, ``rounding`` and ``packing`` are the specification these
follow step by step; only float summation order differs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import sinkhorn
from .config import QuantConfig
from .packing import PACKINGS, packed_rows
from .rounding import _MIN_RANGE, codebook

_INF = tl.constexpr(float("inf"))


@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _sinkhorn_kernel(
    w_ptr, log_r_ptr, best_r_ptr, row_std_ptr, best_c_ptr,
    K, R, C, tiles_per_row, iters,
    std_min, std_max, step_min, step_max, log_min, log_max, tie_rtol,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0)
    row0 = (t // tiles_per_row) * R
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    col_off = (t % tiles_per_row) * C + cols
    state = t * R
    log_c = tl.zeros([BLOCK_C], dtype=tl.float32)
    best_c = tl.zeros([BLOCK_C], dtype=tl.float32)
    best_imb = 0.0
    target = 0.0
    step = 0
    go = 1
    while go != 0:
        # log_r and row_std pass through global scratch between loops, written and read by
        # different threads: each hand-over needs a barrier on a GPU.
        tl.debug_barrier()
        inv_c = tl.exp(-log_c)
        acc1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        hi = tl.full([BLOCK_R], -_INF, dtype=tl.float32)
        lo = tl.full([BLOCK_R], _INF, dtype=tl.float32)
        for r in range(0, R, BLOCK_R):
            rows = r + tl.arange(0, BLOCK_R)
            rmask = rows < R
            offs = (row0 + rows).to(tl.int64)[:, None] * K + col_off[None, :]
            x = tl.load(w_ptr + offs, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float16).to(tl.float32)
            inv_r = tl.exp(-tl.load(log_r_ptr + state + rows, mask=rmask, other=0.0))
            xc = x * inv_c[None, :]
            s1 = tl.sum(xc, 1)
            s2 = tl.sum(xc * xc, 1)
            row_std = inv_r * tl.sqrt(tl.maximum((s2 - s1 * s1 / C) / (C - 1), 0.0))
            tl.store(row_std_ptr + state + rows, row_std, mask=rmask)
            hi = tl.maximum(hi, tl.where(rmask, row_std, -_INF))
            lo = tl.minimum(lo, tl.where(rmask, row_std, _INF))
            xr = x * inv_r[:, None]
            acc1 += xr
            acc2 += xr * xr
        # Column sums and the row extremes are reduced across threads once per iteration, not per chunk.
        c1 = tl.sum(acc1, 0)
        c2 = tl.sum(acc2, 0)
        r_hi = tl.max(hi, 0)
        r_lo = tl.min(lo, 0)
        col_std = inv_c * tl.sqrt(tl.maximum((c2 - c1 * c1 / R) / (R - 1), 0.0))
        c_hi = tl.max(tl.where(cmask, col_std, -_INF), 0)
        c_lo = tl.min(tl.where(cmask, col_std, _INF), 0)
        imb = tl.maximum(r_hi, c_hi) / tl.maximum(tl.minimum(r_lo, c_lo), 1e-12)

        first = tl.full([], step, tl.int32) == 0
        lowest = tl.minimum(tl.minimum(tl.maximum(r_lo, std_min), std_max), tl.minimum(tl.maximum(c_lo, std_min), std_max))
        target = tl.where(first, lowest + 1e-6, target)
        better = first | (imb <= best_imb * (1 + tie_rtol))
        best_imb = tl.where(first, imb, tl.where(better, tl.minimum(imb, best_imb), best_imb))
        best_c = tl.where(better, log_c, best_c)
        update = better & (step < iters)
        # Stores below are masked by rows < R * flag (flag 0 or 1): the same row mask, switched off per tile.
        keep, move = better.to(tl.int32), update.to(tl.int32)
        step_c = tl.log(tl.minimum(tl.maximum(tl.minimum(tl.maximum(col_std, std_min), std_max) / target, step_min), step_max))
        log_c = tl.where(update, tl.minimum(tl.maximum(log_c + step_c, log_min), log_max), log_c)
        tl.debug_barrier()
        for r in range(0, R, BLOCK_R):
            rows = r + tl.arange(0, BLOCK_R)
            rmask = rows < R
            log_r = tl.load(log_r_ptr + state + rows, mask=rmask, other=0.0)
            tl.store(best_r_ptr + state + rows, log_r, mask=rows < R * keep)
            row_std = tl.load(row_std_ptr + state + rows, mask=rmask, other=1.0)
            step_r = tl.log(tl.minimum(tl.maximum(tl.minimum(tl.maximum(row_std, std_min), std_max) / target, step_min), step_max))
            tl.store(log_r_ptr + state + rows, tl.minimum(tl.maximum(log_r + step_r, log_min), log_max), mask=rows < R * move)
        go = move
        step += 1
    tl.store(best_c_ptr + t * C + cols, best_c, mask=cmask)


@triton.jit
def _quantize_kernel(
    w_ptr, r_ptr, c_ptr, mid_ptr, packed_ptr, scale_ptr, zero_ptr,
    K, groups, words, tiles_per_row, R, max_code, min_range,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, N_LEVELS: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_G)
    gmask = cols < G
    word = tl.zeros([BLOCK_P, BLOCK_G], dtype=tl.int32)
    for s in tl.static_range(PER_WORD):
        q = s * words + p
        qmask = (p < words) & (q < groups)
        m2 = qmask[:, None] & gmask[None, :]
        row = q // tiles_per_row
        grp = q % tiles_per_row
        tile = (row // R) * tiles_per_row + grp
        offs = row.to(tl.int64)[:, None] * K + (grp * G)[:, None] + cols[None, :]
        x = tl.load(w_ptr + offs, mask=m2, other=0.0).to(tl.float16).to(tl.float32)
        c = tl.load(c_ptr + tile[:, None] * G + cols[None, :], mask=m2, other=1.0)
        r = tl.load(r_ptr + tile * R + row % R, mask=qmask, other=1.0)
        x = x / c / r[:, None]
        if N_LEVELS == 0:
            lo = tl.min(tl.where(gmask[None, :], x, _INF), 1)
            hi = tl.max(tl.where(gmask[None, :], x, -_INF), 1)
            scale = tl.maximum(hi - lo, min_range) / max_code
            zero = -_round_half_even(lo / scale)
            code = _round_half_even(x / scale[:, None] + zero[:, None])
            code = tl.minimum(tl.maximum(code, 0.0), max_code).to(tl.int32)
        else:
            mean = tl.sum(x, 1) / G
            scale = tl.maximum(tl.max(tl.where(m2, tl.abs(x - mean[:, None]), 0.0), 1), min_range)
            zero = -mean / scale
            normalised = x / scale[:, None] + zero[:, None]
            code = tl.zeros([BLOCK_P, BLOCK_G], dtype=tl.int32)
            for level in tl.static_range(N_LEVELS - 1):
                code += (normalised > tl.load(mid_ptr + level)).to(tl.int32)
        word = word | (tl.where(m2, code, 0) << (BITS * (PER_WORD - 1 - s)))
        tl.store(scale_ptr + q, scale * r, mask=qmask)
        tl.store(zero_ptr + q, zero, mask=qmask)
    out = p[:, None] * G + cols[None, :]
    tl.store(packed_ptr + out, word.to(packed_ptr.dtype.element_ty), mask=(p < words)[:, None] & gmask[None, :])


@triton.jit
def _moments_kernel(w_ptr, out_ptr, numel, mean, CENTRAL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float16).to(tl.float32)
    if CENTRAL:
        d = tl.where(mask, x - mean, 0.0)
        sq = d * d
        tl.store(out_ptr + 2 * tl.program_id(0), tl.sum(sq, 0))
        tl.store(out_ptr + 2 * tl.program_id(0) + 1, tl.sum(sq * sq, 0))
    else:
        tl.store(out_ptr + 2 * tl.program_id(0), tl.sum(x, 0))
        tl.store(out_ptr + 2 * tl.program_id(0) + 1, 0.0)


def kurtosis(w: Tensor) -> float:
    """:func:`sinq_ops.sinkhorn.kurtosis` in two reads of the weight: its mean, then the central moments."""
    block = 4096
    programs = triton.cdiv(w.numel(), block)
    partial = torch.empty(programs, 2, dtype=torch.float32, device=w.device)
    _moments_kernel[(programs,)](w, partial, w.numel(), 0.0, CENTRAL=False, BLOCK=block)
    mean = float(partial[:, 0].double().sum()) / w.numel()
    _moments_kernel[(programs,)](w, partial, w.numel(), mean, CENTRAL=True, BLOCK=block)
    var, fourth = (partial.double().sum(0) / w.numel()).tolist()
    return fourth / (var * var) if var > 0 else 0.0


def sinkhorn_scales(w: Tensor, rows: int, cols: int, iters: int) -> tuple[Tensor, Tensor]:
    """Row scales ``[tiles, rows]`` and column scales ``[tiles, cols]`` of the ``rows x cols`` tiles of ``w``.

    Tiles are numbered row-major over the tile grid, as in :func:`sinq_ops.sinkhorn.sinkhorn_scales`.
    """
    n, k = w.shape
    tiles_per_row = k // cols
    tiles = (n // rows) * tiles_per_row
    f32 = dict(dtype=torch.float32, device=w.device)
    log_r, best_r = torch.zeros(tiles, rows, **f32), torch.zeros(tiles, rows, **f32)
    row_std, best_c = torch.empty(tiles, rows, **f32), torch.empty(tiles, cols, **f32)
    block_c = triton.next_power_of_2(cols)
    block_r = min(triton.next_power_of_2(rows), max(8, 4096 // block_c))
    _sinkhorn_kernel[(tiles,)](
        w, log_r, best_r, row_std, best_c,
        k, rows, cols, tiles_per_row, iters,
        sinkhorn._STD_MIN, sinkhorn._STD_MAX, sinkhorn._STEP_MIN, sinkhorn._STEP_MAX,
        sinkhorn._LOG_MIN, sinkhorn._LOG_MAX, sinkhorn._TIE_RTOL,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8,
    )
    return best_r.exp_(), best_c.exp_()


@functools.cache
def _midpoints(name: str, device: torch.device) -> Tensor:
    """Decision boundaries between codebook levels, made once per device (no copy per call)."""
    if not name:
        return torch.zeros(1, device=device)
    levels = codebook(name)
    return ((levels[1:] + levels[:-1]) / 2).to(device)


def quantize_groups(
    w: Tensor, row_scale: Tensor, col_scale: Tensor, tile_rows: int, config: QuantConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Packed codes (reference layout), group scales times row scales, and zeros, groups row-major.

    ``row_scale`` is ``[tiles, tile_rows]`` and ``col_scale`` ``[tiles, group_size]``.
    """
    n, k = w.shape
    g = config.group_size
    groups = n * k // g
    spec = PACKINGS[config.bits]
    words = packed_rows(groups, config.bits)
    midpoints = _midpoints(config.codebook_name or "", w.device)
    packed = torch.empty(words, g, dtype=spec.dtype, device=w.device)
    scale = torch.empty(groups, dtype=torch.float32, device=w.device)
    zero = torch.empty(groups, dtype=torch.float32, device=w.device)
    block_g = triton.next_power_of_2(g)
    # Ten 3-bit (or five/six-bit) slices per word, or a codebook search, hold more live values: halve the block.
    heavy = spec.per_word >= 5 or config.codebook_name is not None
    block_p = max(1, min(triton.next_power_of_2(words), (2048 if heavy else 4096) // block_g))
    _quantize_kernel[(triton.cdiv(words, block_p),)](
        w, row_scale, col_scale, midpoints, packed, scale, zero,
        k, groups, words, k // g, tile_rows, float(config.max_code), _MIN_RANGE,
        G=g, BLOCK_G=block_g, BLOCK_P=block_p, BITS=spec.bits, PER_WORD=spec.per_word,
        N_LEVELS=midpoints.numel() + 1 if config.codebook_name else 0,
    )
    return packed, scale, zero
