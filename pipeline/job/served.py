"""One unit of a compressed-tensors output: its layer's tensors quantized together, column scales folded.

A layer's folds tie its tensors to each other (``pipeline.job.folds``): ``o_proj``'s column scale
changes ``v_proj``'s rows before q, k and v get their shared column scale, which changes the
attention norm's weight. So, unlike the SINQ layout, a unit is decoded whole first, the folds run
in order, and only then is each matrix quantized with the column scale it was given.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import torch

from sinq_ops import QuantConfig, quantize
from sinq_ops.activation import search
from sinq_ops.columns import (fold_into_norm, fold_into_rows, heads_scale_to_kv, shared_column_scale,
                              tied_column_scale)
from sinq_ops.compressed import to_compressed

from ..io.safetensors_io import DTYPES
from .planned import TensorTask, Unit

# A-SINQ's search as the job runs it: the exponents coarse to fine, every 4th first (about 10 products
# a matrix instead of 21), the error measured on at most 512 of a matrix's output rows (bench/README.md
# measures what each costs in quality).
SEARCH = {"coarse": 4, "max_rows": 512}


def _tied(scale: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """``scale`` ``[heads * d]`` made equal across the query heads of each key/value head (their
    geometric mean), as an attention output's folded column scale must be."""
    d = scale.numel() // heads
    logs = scale.float().log().reshape(kv_heads, heads // kv_heads, d).mean(1, keepdim=True)
    return logs.exp().expand(kv_heads, heads // kv_heads, d).reshape(heads * d)


class FoldError(ValueError):
    """A fold made a tensor its dtype cannot hold."""


@contextlib.contextmanager
def _naming(what: str) -> Iterator[None]:
    """A ``ValueError`` from the math, named after the tensor it was about."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


Inputs = Callable[[str], "tuple[torch.Tensor, torch.Tensor] | None"]


def quantize_served(unit: Unit, config: QuantConfig, device: str, tensors: dict[str, torch.Tensor],
                    stat: Callable[[TensorTask, str, torch.Tensor, object, float], None],
                    inputs: Inputs | None = None, activation: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The unit's output tensors from its decoded ones (``tensors``, by ``TensorTask.key``; quantized
    tasks' as the [out, in] matrix). ``stat(task, leaf, weight, quantized, seconds)`` is called per
    matrix written: per row block for an expert's matrix written as its checkpoint tensors.

    A-SINQ (``inputs``: a matrix's key -> its calibration statistics, mean |x| and a token sample):
    each column scale is divided by an activation scale searched under the same constraint, so the
    quotient folds where the column scale does. A shared input's scale is searched on its lead (one
    dense matrix; a mixture's stacked up rows read different tokens per expert and keep the lead's
    column scale); an attention output's is tied per key/value head. ``activation`` gets, per
    quantized matrix, what became of its activation scale."""
    folds, g = unit.folds, config.group_size
    work = {name: t.to(device) for name, t in tensors.items()}
    column: dict[str, torch.Tensor] = {}
    notes = activation if activation is not None else {}

    def calibrated(key: str, w: torch.Tensor, scale: torch.Tensor, tie=None) -> torch.Tensor:
        """``scale`` divided by ``key``'s activation scale searched under it (unchanged without one)."""
        if inputs is None:
            return scale
        got = inputs(key)
        if got is None:
            notes.setdefault(key, "no calibration statistics")
            return scale
        mean, sample = got
        with _naming(key):
            s = search(w, sample.to(w.device, torch.float32), config, x_abs_mean=mean.to(w.device),
                       **SEARCH, column_scale=scale, tie=tie, zero_in_range=True)
        notes[key] = "searched" if s is not None else "round-to-nearest (a column scale of 1)"
        return scale if s is None else scale / s
    # Shared scales first, from the matrices as they came: scaling a matrix's rows (the row folds below)
    # changes none of its codes in 1D tiling (each group lies in one row), but a row-scaled lead can look
    # heavy-tailed to the kurtosis gate and steers Sinkhorn's column scale toward the rows scaled up.
    for s in folds.shared:
        with _naming(s.lead[0].name):
            scale = shared_column_scale([work[b.name][b.start:b.stop] for b in s.lead], g)
        lead = s.lead[0]
        if len(s.lead) == 1 and lead.start == 0 and lead.stop is None:
            scale = calibrated(lead.name, work[lead.name], scale)
        elif inputs is not None:
            notes.update({n: "none: a column scale shared by experts reading different tokens" for n in s.readers})
        for n in s.readers:
            column[n] = scale
            if n != lead.name and inputs is not None and n not in notes:
                notes[n] = f"shared: searched on {lead.name.rsplit('.', 2)[-2]}"
        work[s.norm] = fold_into_norm(work[s.norm], scale, one_plus=s.one_plus)
        for d in s.divided:  # a router reading the scaled input: W x == (W / s) (s * x)
            work[d] = work[d].float() / scale.to(work[d].device)
    for r in folds.rows:
        w = work[r.reader]
        with _naming(r.reader):
            if r.heads:
                scale = tied_column_scale(w, g, heads=r.heads, kv_heads=r.kv_heads)
                scale = calibrated(r.reader, w, scale, tie=lambda a, r=r: _tied(a, r.heads, r.kv_heads))
                rows = heads_scale_to_kv(scale, heads=r.heads, kv_heads=r.kv_heads)
            else:
                scale = rows = calibrated(r.reader, w, shared_column_scale([w], g))
        column[r.reader] = scale
        producer = work[r.producer].float()
        producer[r.start:r.stop] = fold_into_rows(producer[r.start:r.stop], rows)
        work[r.producer] = producer
        bias = r.producer.removesuffix(".weight") + ".bias"
        if bias in work:
            work[bias] = work[bias].float() * rows

    if inputs is not None:
        notes.update({t.key: "none: a column scale of 1 (no fold is known)" for t in unit.tasks
                      if t.quantize and t.key not in notes})
    outputs: dict[str, torch.Tensor] = {}
    for task in unit.tasks:
        w = work.pop(task.key)
        if not task.quantize:
            out = w.to("cpu", DTYPES[task.dtype])
            if out.is_floating_point() and not torch.isfinite(out).all() and torch.isfinite(w).all():
                raise FoldError(f"{task.name}: its folded values overflow {task.dtype}")
            outputs[task.name] = out
            continue
        scale = column.get(task.key)
        if scale is None:
            scale = torch.ones(w.shape[1], device=w.device)
        scale_dtype = next(o.dtype for o in task.outputs if o.name.endswith(".weight_scale"))
        start = 0
        # An expert's matrix goes out as the checkpoint's per-expert tensors, its blocks of rows: each
        # quantized on its own gets the codes the whole would (1D tiling), under the same column scale.
        for leaf, n in task.parts or ((task.leaf, w.shape[0]),):
            t0 = time.perf_counter()
            block = w[start:start + n]
            with _naming(leaf):
                q = quantize(block, **{**config.to_dict(), "aux": "fp16"}, backend="torch", column_scale=scale,
                             zero_in_range=True, scale_dtype=scale_dtype)
                outputs.update({f"{leaf}.{k}": v for k, v in to_compressed(q.to("cpu"), scale_dtype).items()})
            stat(task, leaf, block, q, time.perf_counter() - t0)
            start += n
    return outputs
