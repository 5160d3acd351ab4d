"""Triton kernels for SINQ: value checks and kurtosis, Sinkhorn balancing, quantize-and-pack.

The weight is read in its own dtype, rounded to fp16 in registers (as the reference rounds it)
and never copied, so the extra memory while quantizing is the outputs plus a few floats per group.
A small tile is balanced by one program holding it in registers; a tall tile's rows are spread over
many programs, and each step ends in a per-tile decision kernel, so the stop rule runs on the device
and the host only queues launches. Each quantize program owns a block of packed rows and writes them
in the reference layout directly. The torch functions in ``sinkhorn``, ``rounding`` and ``packing``
are the specification these follow step by step; only float rounding differs (summation order,
multiplications by reciprocals where the specification divides).
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
# Multiply-adds contracted to FMA, as compiled and tested; Triton's default for this changes in 3.10.
_OPTIONS = {"enable_fp_fusion": True}


@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _std(s1, s2, n):
    """Sample standard deviation from the sum and the sum of squares of ``n`` values."""
    inv_n = 1.0 / n
    inv_n1 = 1.0 / (n - 1)
    return tl.sqrt(tl.maximum((s2 - s1 * s1 * inv_n) * inv_n1, 0.0))


@triton.jit
def _stepped(log_s, std, inv_target, std_min, std_max, step_min, step_max, log_min, log_max):
    """One Sinkhorn update of log scales: by the log of the clamped ratio of each deviation to the
    tile's target, the result clamped too."""
    step = tl.log(tl.minimum(tl.maximum(tl.minimum(tl.maximum(std, std_min), std_max) * inv_target, step_min), step_max))
    return tl.minimum(tl.maximum(log_s + step, log_min), log_max)


@triton.jit
def _decide(r_lo, r_hi, c_lo, c_hi, first, target, best_imb, std_min, std_max, tie_rtol):
    """Score a tile's scaling by its imbalance (largest over smallest row or column deviation).

    Returns the target deviation (fixed at the first step), whether this scaling is no worse than
    the best so far (ties within ``tie_rtol`` count as no worse), and the best imbalance after it.
    """
    imb = tl.maximum(r_hi, c_hi) / tl.maximum(tl.minimum(r_lo, c_lo), 1e-12)
    lowest = tl.minimum(tl.minimum(tl.maximum(r_lo, std_min), std_max), tl.minimum(tl.maximum(c_lo, std_min), std_max))
    target = tl.where(first, lowest + 1e-6, target)
    better = first | (imb <= best_imb * (1 + tie_rtol))
    best_imb = tl.where(first, imb, tl.where(better, tl.minimum(imb, best_imb), best_imb))
    return target, better, best_imb


@triton.jit
def _sinkhorn_resident_kernel(
    w_ptr, best_r_ptr, best_c_ptr,
    K, R, C, tiles_per_row, iters,
    std_min, std_max, step_min, step_max, log_min, log_max, tie_rtol,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """A whole small tile (2D tiling) read once into registers and balanced there, all steps in one program."""
    t = tl.program_id(0)
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    cmask = cols < C
    offs = ((t // tiles_per_row) * R + rows).to(tl.int64)[:, None] * K + ((t % tiles_per_row) * C + cols)[None, :]
    x = tl.load(w_ptr + offs, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float16).to(tl.float32)
    log_r = tl.zeros([BLOCK_R], dtype=tl.float32)
    log_c = tl.zeros([BLOCK_C], dtype=tl.float32)
    best_r = tl.zeros([BLOCK_R], dtype=tl.float32)
    best_c = tl.zeros([BLOCK_C], dtype=tl.float32)
    best_imb = tl.full([], 0.0, dtype=tl.float32)
    target = tl.full([], 1.0, dtype=tl.float32)
    step = tl.full([], 0, dtype=tl.int32)
    go = 1
    while go != 0:
        inv_r = tl.exp(-log_r)
        inv_c = tl.exp(-log_c)
        xc = x * inv_c[None, :]
        s1 = tl.sum(xc, 1)
        s2 = tl.sum(xc * xc, 1)
        row_std = inv_r * _std(s1, s2, C)
        xr = x * inv_r[:, None]
        col_std = inv_c * _std(tl.sum(xr, 0), tl.sum(xr * xr, 0), R)
        target, better, best_imb = _decide(
            tl.min(tl.where(rmask, row_std, _INF), 0), tl.max(tl.where(rmask, row_std, -_INF), 0),
            tl.min(tl.where(cmask, col_std, _INF), 0), tl.max(tl.where(cmask, col_std, -_INF), 0),
            step == 0, target, best_imb, std_min, std_max, tie_rtol,
        )
        best_r = tl.where(better, log_r, best_r)
        best_c = tl.where(better, log_c, best_c)
        update = better & (step < iters)
        moved_r = _stepped(log_r, row_std, 1.0 / target, std_min, std_max, step_min, step_max, log_min, log_max)
        moved_c = _stepped(log_c, col_std, 1.0 / target, std_min, std_max, step_min, step_max, log_min, log_max)
        log_r = tl.where(update, moved_r, log_r)
        log_c = tl.where(update, moved_c, log_c)
        go = update.to(tl.int32)
        step += 1
    tl.store(best_r_ptr + t * R + rows, best_r, mask=rmask)
    tl.store(best_c_ptr + t * C + cols, best_c, mask=cmask)


@triton.jit(do_not_specialize=["step"])
def _sinkhorn_rows_kernel(
    w_ptr, log_r_ptr, log_r_out_ptr, best_r_ptr, row_std_ptr, row_std_out_ptr,
    log_c_ptr, flags_ptr, target_ptr, part_ptr, ext_ptr,
    K, R, C, tiles_per_row, chunks, chunk_rows, step,
    std_min, std_max, step_min, step_max, log_min, log_max,
    STATS: tl.constexpr, EVEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """A block of rows of one tile: carry out the previous step's row decisions, then (``STATS``)
    sum the tile's columns over these rows and record the rows' deviations and extremes.

    Row state is read from one buffer and written to another (they swap every step): a value one
    thread stores can then never reach another thread's load of the old value in the same launch.
    ``EVEN``: the rows fill whole blocks and the columns the block's width, so loads need no mask."""
    t = tl.program_id(0) // chunks
    ch = tl.program_id(0) % chunks
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    row0 = (t // tiles_per_row) * R
    col_off = (t % tiles_per_row) * C + cols
    state = t * R
    keep = tl.load(flags_ptr + 2 * t)
    move = tl.load(flags_ptr + 2 * t + 1)
    inv_target = 1.0 / tl.load(target_ptr + t)
    start = ch * chunk_rows
    end = tl.minimum(start + chunk_rows, R)
    # Stats are due on the first step and after every update; a stopped tile's loop is empty.
    todo = tl.maximum(tl.maximum(keep, move), (step == 0).to(tl.int32))
    inv_c = tl.exp(-tl.load(log_c_ptr + t * C + cols, mask=cmask, other=0.0))
    inv_c2 = inv_c * inv_c
    acc1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    hi = tl.full([BLOCK_R], -_INF, dtype=tl.float32)
    lo = tl.full([BLOCK_R], _INF, dtype=tl.float32)
    # Pipelined: the next blocks' loads are in flight while this one is reduced.
    for r in tl.range(start, start + (end - start) * todo, BLOCK_R, num_stages=3):
        rows = r + tl.arange(0, BLOCK_R)
        rmask = rows < end
        log_r = tl.load(log_r_ptr + state + rows, mask=rmask, other=0.0)
        tl.store(best_r_ptr + state + rows, log_r, mask=rows < end * keep)
        moved = rows < end * move
        row_std = tl.load(row_std_ptr + state + rows, mask=moved, other=1.0)
        stepped = _stepped(log_r, row_std, inv_target, std_min, std_max, step_min, step_max, log_min, log_max)
        log_r = tl.where(moved, stepped, log_r)
        tl.store(log_r_out_ptr + state + rows, log_r, mask=rmask)
        if STATS:
            block = w_ptr + (row0 + r).to(tl.int64) * K + (tl.arange(0, BLOCK_R).to(tl.int64)[:, None] * K + col_off[None, :])
            if EVEN:
                x = tl.load(block)
            else:
                x = tl.load(block, mask=rmask[:, None] & cmask[None, :], other=0.0)
            x = x.to(tl.float16).to(tl.float32)
            inv_r = tl.exp(-log_r)
            x2 = x * x
            s1 = tl.sum(x * inv_c[None, :], 1)
            s2 = tl.sum(x2 * inv_c2[None, :], 1)
            row_std = inv_r * _std(s1, s2, C)
            tl.store(row_std_out_ptr + state + rows, row_std, mask=rmask)
            hi = tl.maximum(hi, tl.where(rmask, row_std, -_INF))
            lo = tl.minimum(lo, tl.where(rmask, row_std, _INF))
            acc1 += x * inv_r[:, None]
            acc2 += x2 * (inv_r * inv_r)[:, None]
    if STATS:
        # Column sums and row extremes are reduced across threads once per program, not per block of rows.
        part = (t * chunks + ch) * 2 * C
        tl.store(part_ptr + part + cols, tl.sum(acc1, 0), mask=cmask)
        tl.store(part_ptr + part + C + cols, tl.sum(acc2, 0), mask=cmask)
        tl.store(ext_ptr + (t * chunks + ch) * 2, tl.max(hi, 0))
        tl.store(ext_ptr + (t * chunks + ch) * 2 + 1, tl.min(lo, 0))


@triton.jit(do_not_specialize=["step"])
def _sinkhorn_tile_kernel(
    log_c_ptr, best_c_ptr, flags_ptr, target_ptr, best_imb_ptr, part_ptr, ext_ptr,
    R, C, chunks, step, iters,
    std_min, std_max, step_min, step_max, log_min, log_max, tie_rtol,
    BLOCK_C: tl.constexpr,
):
    """One tile's decision for this step from its row blocks' partial sums: score the scaling,
    keep it if it is no worse than the best so far, and move the column scales if going on."""
    t = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    first = step == 0
    live = tl.maximum(tl.load(flags_ptr + 2 * t + 1), first.to(tl.int32))
    c1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    c2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    r_hi = tl.full([], -_INF, dtype=tl.float32)
    r_lo = tl.full([], _INF, dtype=tl.float32)
    for ch in range(0, chunks * live):
        part = (t * chunks + ch) * 2 * C
        c1 += tl.load(part_ptr + part + cols, mask=cmask, other=0.0)
        c2 += tl.load(part_ptr + part + C + cols, mask=cmask, other=0.0)
        r_hi = tl.maximum(r_hi, tl.load(ext_ptr + (t * chunks + ch) * 2))
        r_lo = tl.minimum(r_lo, tl.load(ext_ptr + (t * chunks + ch) * 2 + 1))
    log_c = tl.load(log_c_ptr + t * C + cols, mask=cmask, other=0.0)
    col_std = tl.exp(-log_c) * _std(c1, c2, R)
    last_imb = tl.load(best_imb_ptr + t)
    target, better, best_imb = _decide(
        r_lo, r_hi, tl.min(tl.where(cmask, col_std, _INF), 0), tl.max(tl.where(cmask, col_std, -_INF), 0),
        first, tl.load(target_ptr + t), last_imb, std_min, std_max, tie_rtol,
    )
    keep = better.to(tl.int32) * live
    move = (better & (step < iters)).to(tl.int32) * live
    # Every load of this tile's state is done before any thread overwrites it.
    tl.debug_barrier()
    # Stores are masked by cols < C * flag (flag 0 or 1): the column mask, switched off per tile.
    tl.store(best_c_ptr + t * C + cols, log_c, mask=cols < C * keep)
    stepped = _stepped(log_c, col_std, 1.0 / target, std_min, std_max, step_min, step_max, log_min, log_max)
    tl.store(log_c_ptr + t * C + cols, stepped, mask=cols < C * move)
    tl.store(flags_ptr + 2 * t, keep)
    tl.store(flags_ptr + 2 * t + 1, move)
    tl.store(target_ptr + t, target)
    tl.store(best_imb_ptr + t, tl.where(live != 0, best_imb, last_imb))


@triton.jit
def _round_small(x, top):
    """``x`` clamped to ``[0, top]`` and rounded half to even, for ``top`` below 2**22: adding and
    taking away 1.5 * 2**23 leaves no fraction bits, so the float adder does the rounding."""
    return (tl.minimum(tl.maximum(x, 0.0), top) + 12582912.0) - 12582912.0


@triton.jit
def _divided(y, d, inv):
    """``y / d`` correctly rounded, as the torch path divides, from ``inv``, the correctly rounded
    ``1 / d``: a product and one fused correction (Markstein) instead of a division per value."""
    q = y * inv
    return tl.fma(tl.fma(-q, d, y), inv, q)


@triton.jit
def _quantize_kernel(
    w_ptr, r_ptr, inv_c_ptr, mid_ptr, packed_ptr, scale_ptr, zero_ptr,
    K, groups, words, tiles_per_row, R, max_code, min_range,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, N_LEVELS: tl.constexpr,
):
    """Each program packs ``BLOCK_P`` words; slice ``s`` of a word is group ``s * words + p``.

    Per value only multiplications: by the column scale's reciprocal, then a division by the
    group's row scale times its step done as a product and a fused correction. Per group the
    divisions that set the step and the zero are IEEE ones, as in the torch path.
    """
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
        y = x * tl.load(inv_c_ptr + tile[:, None] * G + cols[None, :], mask=m2, other=1.0)
        r = tl.load(r_ptr + tile * R + row % R, mask=qmask, other=1.0)
        if N_LEVELS == 0:
            # The row scale is positive, so the extremes of y / r are those of y divided by r.
            lo = tl.min(tl.where(gmask[None, :], y, _INF), 1) / r
            hi = tl.max(tl.where(gmask[None, :], y, -_INF), 1) / r
            scale = tl.div_rn(tl.maximum(hi - lo, min_range), max_code)
            zero = -_round_half_even(tl.div_rn(lo, scale))
            d = r * scale
            normalised = _divided(y, d[:, None], tl.div_rn(tl.full([BLOCK_P], 1.0, tl.float32), d)[:, None])
            code = _round_small(normalised + zero[:, None], max_code).to(tl.int32)
        else:
            x = y * tl.div_rn(tl.full([BLOCK_P], 1.0, tl.float32), r)[:, None]
            mean = tl.sum(x, 1) / G
            scale = tl.maximum(tl.max(tl.where(m2, tl.abs(x - mean[:, None]), 0.0), 1), min_range)
            zero = -tl.div_rn(mean, scale)
            inv = tl.div_rn(tl.full([BLOCK_P], 1.0, tl.float32), scale)
            normalised = _divided(x, scale[:, None], inv[:, None]) + zero[:, None]
            code = tl.zeros([BLOCK_P, BLOCK_G], dtype=tl.int32)
            for level in tl.static_range(N_LEVELS - 1):
                code += (normalised > tl.load(mid_ptr + level)).to(tl.int32)
        word = word | (tl.where(m2, code, 0) << (BITS * (PER_WORD - 1 - s)))
        tl.store(scale_ptr + q, scale * r, mask=qmask)
        tl.store(zero_ptr + q, zero, mask=qmask)
    out = p[:, None] * G + cols[None, :]
    tl.store(packed_ptr + out, word.to(packed_ptr.dtype.element_ty), mask=(p < words)[:, None] & gmask[None, :])


@triton.jit
def _stats_kernel(w_ptr, out_ptr, numel, EVEN: tl.constexpr, BLOCK: tl.constexpr):
    """One block's mean and central moments 2-4 (fp16-rounded values) and extremes (raw values).

    A NaN anywhere makes the mean NaN. The moments share one reduction, as do the two extremes.
    ``EVEN``: every block is full, so loads need no mask and can be vectorised.
    """
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    if EVEN:
        inside = offs < BLOCK
        raw = tl.load(w_ptr + start + offs).to(tl.float32)
    else:
        inside = offs < numel - start
        raw = tl.load(w_ptr + start + offs, mask=inside, other=0.0).to(tl.float32)
    x = raw.to(tl.float16).to(tl.float32)
    mean = tl.sum(x, 0) / tl.minimum(numel - start, BLOCK).to(tl.float32)
    d = tl.where(inside, x - mean, 0.0)
    d2 = d * d
    s2_s3, s4_0 = tl.split(tl.sum(tl.join(tl.join(d2, d2 * d), tl.join(d2 * d2, tl.zeros_like(d))), 0))
    s2, s3 = tl.split(s2_s3)
    s4, _ = tl.split(s4_0)
    neg_lo, hi = tl.split(tl.max(tl.join(tl.where(inside, -raw, -_INF), tl.where(inside, raw, -_INF)), 0))
    out = out_ptr + 6 * tl.program_id(0)
    tl.store(out, mean)
    tl.store(out + 1, s2)
    tl.store(out + 2, s3)
    tl.store(out + 3, s4)
    tl.store(out + 4, -neg_lo)
    tl.store(out + 5, hi)


def weight_stats(w: Tensor) -> tuple[float, float, float]:
    """Smallest and largest value (NaN if any value is NaN) and :func:`sinq_ops.sinkhorn.kurtosis`,
    all from one read of the weight.

    Blocks' central moments are combined about the overall mean in float64 (exact shifts, no
    cancellation between raw moments).
    """
    block = 4096
    numel = w.numel()
    programs = triton.cdiv(numel, block)
    part = torch.empty(programs, 6, dtype=torch.float32, device=w.device)
    _stats_kernel[(programs,)](w, part, numel, EVEN=numel % block == 0, BLOCK=block, **_OPTIONS)
    p = part.double()
    counts = torch.full((programs,), float(block), dtype=torch.float64, device=w.device)
    counts[-1] = numel - (programs - 1) * block
    mean = (counts * p[:, 0]).sum() / numel
    delta = p[:, 0] - mean
    m2 = (p[:, 1] + counts * delta**2).sum()
    m4 = (p[:, 3] + 4 * delta * p[:, 2] + 6 * delta**2 * p[:, 1] + counts * delta**4).sum()
    summary = torch.stack([p[:, 4].min(), p[:, 5].max(), p[:, 0].isnan().sum(), m2 / numel, m4 / numel])
    lo, hi, nans, var, fourth = summary.tolist()
    return (float("nan") if nans else lo), hi, (fourth / (var * var) if var > 0 else 0.0)


# Tiles up to this many (padded) elements stay in one program's registers for all their steps.
_RESIDENT_ELEMENTS = 16384
# Row blocks a Sinkhorn program takes on CUDA: enough programs to keep every SM streaming.
_PROGRAMS_PER_SM = 8


def _rows_per_program(w: Tensor, rows: int, tiles: int, block_r: int) -> int:
    blocks = triton.cdiv(rows, block_r)
    if not w.is_cuda:
        return blocks * block_r  # the interpreter runs programs one after another: one per tile
    programs = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(w.device).multi_processor_count
    chunks = max(1, min(blocks, programs // tiles))
    return triton.cdiv(blocks, chunks) * block_r  # chunks of (nearly) equal size, no short last one


def sinkhorn_scales(
    w: Tensor, rows: int, cols: int, iters: int, rows_per_program: int | None = None
) -> tuple[Tensor, Tensor]:
    """Row scales ``[tiles, rows]`` and column scales ``[tiles, cols]`` of the ``rows x cols`` tiles of ``w``.

    Tiles are numbered row-major over the tile grid, as in :func:`sinq_ops.sinkhorn.sinkhorn_scales`.
    A small tile (2D tiling) is read once and balanced in one program's registers. A tall tile (1D)
    takes two launches a step: its row blocks in parallel, each a pass over its part of the weight,
    then one program to decide. Tiles stop on the device; the host never waits. ``rows_per_program``
    sets how tall tiles are split, and streams even small ones.
    """
    n, k = w.shape
    tiles_per_row = k // cols
    tiles = (n // rows) * tiles_per_row
    block_c = triton.next_power_of_2(cols)
    bounds = (sinkhorn._STD_MIN, sinkhorn._STD_MAX, sinkhorn._STEP_MIN, sinkhorn._STEP_MAX,
              sinkhorn._LOG_MIN, sinkhorn._LOG_MAX)
    f32 = dict(dtype=torch.float32, device=w.device)
    resident = triton.next_power_of_2(rows) * block_c
    if rows_per_program is None and resident <= _RESIDENT_ELEMENTS:
        best_r, best_c = torch.empty(tiles, rows, **f32), torch.empty(tiles, cols, **f32)
        _sinkhorn_resident_kernel[(tiles,)](
            w, best_r, best_c, k, rows, cols, tiles_per_row, iters, *bounds, sinkhorn._TIE_RTOL,
            BLOCK_R=triton.next_power_of_2(rows), BLOCK_C=block_c, num_warps=min(16, max(4, resident // 1024)),
            **_OPTIONS,
        )
        return best_r.exp_(), best_c.exp_()
    block_r = min(triton.next_power_of_2(rows), max(8, 4096 // block_c))
    chunk_rows = rows_per_program or _rows_per_program(w, rows, tiles, block_r)
    if chunk_rows % block_r:
        raise ValueError(f"rows_per_program={chunk_rows} must be a multiple of {block_r}")
    chunks = triton.cdiv(rows, chunk_rows)
    even = rows % block_r == 0 and cols == block_c
    log_r, row_std = torch.zeros(2, tiles, rows, **f32), torch.zeros(2, tiles, rows, **f32)  # swapped each step
    best_r = torch.zeros(tiles, rows, **f32)
    log_c, best_c = torch.zeros(tiles, cols, **f32), torch.zeros(tiles, cols, **f32)
    target, best_imb = torch.ones(tiles, **f32), torch.zeros(tiles, **f32)
    flags = torch.zeros(tiles, 2, dtype=torch.int32, device=w.device)  # keep, move: the last decision
    part, ext = torch.empty(tiles, chunks, 2, cols, **f32), torch.empty(tiles, chunks, 2, **f32)

    def rows_pass(step: int, stats: bool) -> None:
        now, then = step % 2, (step + 1) % 2
        _sinkhorn_rows_kernel[(tiles * chunks,)](
            w, log_r[now], log_r[then], best_r, row_std[now], row_std[then], log_c, flags, target, part, ext,
            k, rows, cols, tiles_per_row, chunks, chunk_rows, step, *bounds,
            STATS=stats, EVEN=even, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8, **_OPTIONS,
        )

    for step in range(iters + 1):
        rows_pass(step, True)
        _sinkhorn_tile_kernel[(tiles,)](
            log_c, best_c, flags, target, best_imb, part, ext,
            rows, cols, chunks, step, iters, *bounds, sinkhorn._TIE_RTOL, BLOCK_C=block_c, **_OPTIONS,
        )
    rows_pass(iters + 1, False)  # the last decision's row scales
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
        w, row_scale, col_scale.reciprocal(), midpoints, packed, scale, zero,
        k, groups, words, k // g, tile_rows, float(config.max_code), _MIN_RANGE,
        G=g, BLOCK_G=block_g, BLOCK_P=block_p, BITS=spec.bits, PER_WORD=spec.per_word,
        N_LEVELS=midpoints.numel() + 1 if config.codebook_name else 0, **_OPTIONS,
    )
    return packed, scale, zero
