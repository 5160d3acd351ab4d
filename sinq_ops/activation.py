"""A-SINQ's activation-aware scale: the search that decides, per matrix, how much its inputs matter.

SINQ balances a weight's rows and columns from the weight alone. Its inputs are not balanced: a few
channels carry most of the activation mass, and a rounding error in their columns costs the layer's
output most. A-SINQ multiplies the Sinkhorn-normalised weight by a per-input-channel scale ``s``
before rounding (finer steps where ``s`` is large) and divides it out of the column scale after, as
AWQ scales weights; the layer computes the same function, with its error moved off the channels
that matter. ``s`` comes from a one-parameter family, ``mean|x|^a / mean|W|^(1-a)``, and the
exponent is chosen by the error of the layer's output on calibration inputs. A matrix the kurtosis
gate sends to round-to-nearest is decided before any search (``search`` gives None).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .config import KURTOSIS_GATE, SINKHORN_ITERS, QuantConfig
from .rounding import fake_uniform
from .sinkhorn import kurtosis, sinkhorn_scales

ALPHAS = 20  # exponents 0, 1/20, ..., 19/20, as the reference searches
OBJECTIVES = ("l1", "l2")
_FLOOR = 1e-4


def candidate_scale(x_abs_mean: Tensor, w_abs_mean: Tensor, alpha: float) -> Tensor:
    """``mean|x|^a / mean|W|^(1-a)`` per input channel, floored, normalised to a geometric middle of 1
    (its largest and smallest values multiply to 1), as the reference forms it."""
    s = x_abs_mean.float().pow(alpha).clamp_min(_FLOOR)
    s = (s / (w_abs_mean.float().pow(1 - alpha) + _FLOOR)).clamp_min(_FLOOR)
    return s / (s.max() * s.min()).sqrt()


def normalisation(weight: Tensor, config: QuantConfig) -> tuple[Tensor, Tensor] | None:
    """SINQ's Sinkhorn row and column scales of ``weight`` ``[out, in]`` in 1D tiling (as ``quantize``
    computes them), or None where the kurtosis gate sends it to round-to-nearest. Computed once and
    given to both ``search`` and ``quantize(sinkhorn=...)``: it costs as much as a few candidates."""
    n, k = weight.shape
    w = weight.to(torch.float16).float()
    if not config.uses_sinkhorn or n < 2 or kurtosis(w) > KURTOSIS_GATE:
        return None
    return sinkhorn_scales(w.view(1, n, k // config.group_size, config.group_size), SINKHORN_ITERS)


def search(weight: Tensor, inputs: Tensor, config: QuantConfig, *, x_abs_mean: Tensor | None = None,
           alphas: int = ALPHAS, objective: str = "l1", keep_sinq: bool = True, coarse: int = 1,
           column_scale: Tensor | None = None, tie: Callable[[Tensor], Tensor] | None = None,
           zero_in_range: bool = False, sinkhorn: tuple[Tensor, Tensor] | None = None,
           max_rows: int | None = None) -> Tensor | None:
    """The activation scale ``[in_features]`` for ``weight`` ``[out, in]`` that gives the smallest error
    of the layer's output on ``inputs`` ``[tokens, in]`` (mean absolute with ``"l1"``, mean square
    with ``"l2"``); None where the kurtosis gate falls back to round-to-nearest.

    ``x_abs_mean`` is the per-channel mean |x| over all calibration tokens (default: over
    ``inputs``): statistics can come from more tokens than the error is measured on. The float
    output is computed once; each exponent costs one rounding of the matrix and one product.

    ``keep_sinq`` puts plain SINQ (a scale of ones) first among the candidates. The family alone
    never holds it (its exponent 0 is ``1 / mean|W|``), so the reference's search can end worse
    on its own calibration error than no activation scale at all; ``keep_sinq=False`` searches
    exactly the reference's candidates.

    ``coarse`` > 1 searches the exponents coarse to fine: every ``coarse``-th first, then halving the
    step around the best so far (about 10 products instead of 21 for ``coarse=4``). The error is
    close to unimodal in the exponent, so this finds the grid's best or a neighbour of it at half
    the cost; 1 tries every exponent, as the reference does.

    For a compressed-tensors output, whose column scales are folded into the tensors producing the
    input: ``column_scale`` is the one the matrix is given (shared with the other readers of its
    input, or tied per key/value head) in place of its own Sinkhorn scale and the kurtosis gate (a
    scale of ones, round-to-nearest, gets no search); ``tie`` makes each candidate obey the same
    constraint (repeated across the query heads of a key/value head); ``zero_in_range`` rounds as
    that format stores its zeros. The matrix's column scale is then ``column_scale / s``.

    ``sinkhorn`` is ``normalisation(weight, config)`` where the caller has it (it then decides the
    kurtosis gate); otherwise the search computes it.

    ``max_rows`` measures the error on that many output rows, evenly spaced, of a taller matrix. A
    group lies within one row, so the rows rounded are rounded as in the whole matrix, and every
    candidate is measured on the same rows: the mean error of a few hundred rows ranks candidates
    as all rows do, at a cost that no longer grows with the matrix's height (28672 rows for a 70B
    model's gate and up). Normalisation is still over all rows.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not supported; choose one of {', '.join(OBJECTIVES)}")
    if coarse < 1:
        raise ValueError(f"coarse must be at least 1, got {coarse}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    if config.tiling != "1D" or config.codebook_name or not config.uses_sinkhorn:
        raise ValueError("the activation scale is searched for SINQ with uniform codes and 1D tiling")
    n, k = weight.shape
    g = config.group_size
    if inputs.ndim != 2 or inputs.shape[1] != k:
        raise ValueError(f"inputs must be [tokens, {k}], got {list(inputs.shape)}")
    w = weight.to(torch.float16).float()
    if column_scale is not None:
        if column_scale.numel() != k:
            raise ValueError(f"column_scale holds {column_scale.numel()} values, expected in_features={k}")
        if not bool((column_scale != 1).any()):
            return None
        rows, cols = None, column_scale.to(w.device, torch.float32).reshape(k)
    else:
        if sinkhorn is None:
            sinkhorn = normalisation(weight, config)
            if sinkhorn is None:
                return None
        rows, cols = sinkhorn[0].reshape(n, k // g, 1), sinkhorn[1].reshape(k)
    x = inputs.to(w.device, torch.float32)
    mean_x = (x.abs().mean(0) if x_abs_mean is None else x_abs_mean.to(w.device)).float()
    mean_w = w.abs().mean(0)  # the candidates' weight statistic: over every row
    if max_rows is not None and n > max_rows:
        keep = torch.div(torch.arange(max_rows, device=w.device) * n, max_rows, rounding_mode="floor")
        w, n = w[keep], max_rows
        rows = None if rows is None else rows[keep]
    normalised = w.view(n, k // g, g) / cols.view(k // g, g)  # only the rows measured are normalised
    if rows is not None:
        normalised = normalised / rows
    normalised = normalised.reshape(n, k)
    want = x @ w.t()

    def error(s: Tensor) -> float:
        # The weight is rows * deq(normalised * s) / s * cols: the row scale is applied per group with
        # the rounding's step, the column scale and 1/s to the inputs, which are the smaller matrix.
        deq = fake_uniform((normalised * s).view(n, k // g, g), config.max_code, zero_in_range=zero_in_range,
                           times=rows)
        diff = (x * (cols / s)) @ deq.view(n, k).t() - want
        return float(diff.abs().mean() if objective == "l1" else diff.square().mean())

    best, best_err = None, float("inf")
    if keep_sinq:
        best = torch.ones(k, device=w.device)
        best_err = error(best)
    tried: dict[int, float] = {}

    def attempt(i: int) -> None:
        nonlocal best, best_err
        if i in tried or not 0 <= i < alphas:
            return
        s = candidate_scale(mean_x, mean_w, i / alphas if alphas > 1 else 0.0)
        if tie is not None:
            s = tie(s)
        tried[i] = error(s)
        if tried[i] < best_err:  # the first of equal errors, as the reference keeps it
            best, best_err = s, tried[i]

    step = max(1, min(coarse, alphas))
    for i in range(0, alphas, step):
        attempt(i)
    while step > 1:
        step = max(1, step // 2)
        centre = min(tried, key=lambda i: (tried[i], i))
        attempt(centre - step)
        attempt(centre + step)
    return best
