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
from sinq_ops.columns import (fold_into_norm, fold_into_rows, heads_scale_to_kv, shared_column_scale,
                              tied_column_scale)
from sinq_ops.compressed import to_compressed

from ..io.safetensors_io import DTYPES
from .planned import TensorTask, Unit


class FoldError(ValueError):
    """A fold made a tensor its dtype cannot hold."""


@contextlib.contextmanager
def _naming(what: str) -> Iterator[None]:
    """A ``ValueError`` from the math, named after the tensor it was about."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def quantize_served(unit: Unit, config: QuantConfig, device: str, tensors: dict[str, torch.Tensor],
                    stat: Callable[[TensorTask, str, torch.Tensor, object, float], None]) -> dict[str, torch.Tensor]:
    """The unit's output tensors from its decoded ones (``tensors``, by ``TensorTask.key``; quantized
    tasks' as the [out, in] matrix). ``stat(task, leaf, weight, quantized, seconds)`` is called per
    matrix written: per row block for an expert's matrix written as its checkpoint tensors."""
    folds, g = unit.folds, config.group_size
    work = {name: t.to(device) for name, t in tensors.items()}
    column: dict[str, torch.Tensor] = {}
    # Shared scales first, from the matrices as they came: scaling a matrix's rows (the row folds below)
    # changes none of its codes in 1D tiling (each group lies in one row), but a row-scaled lead can look
    # heavy-tailed to the kurtosis gate and steers Sinkhorn's column scale toward the rows scaled up.
    for s in folds.shared:
        with _naming(s.lead[0].name):
            scale = shared_column_scale([work[b.name][b.start:b.stop] for b in s.lead], g)
        for n in s.readers:
            column[n] = scale
        work[s.norm] = fold_into_norm(work[s.norm], scale, one_plus=s.one_plus)
        for d in s.divided:  # a router reading the scaled input: W x == (W / s) (s * x)
            work[d] = work[d].float() / scale.to(work[d].device)
    for r in folds.rows:
        w = work[r.reader]
        with _naming(r.reader):
            if r.heads:
                scale = tied_column_scale(w, g, heads=r.heads, kv_heads=r.kv_heads)
                rows = heads_scale_to_kv(scale, heads=r.heads, kv_heads=r.kv_heads)
            else:
                scale = rows = shared_column_scale([w], g)
        column[r.reader] = scale
        producer = work[r.producer].float()
        producer[r.start:r.stop] = fold_into_rows(producer[r.start:r.stop], rows)
        work[r.producer] = producer
        bias = r.producer.removesuffix(".weight") + ".bias"
        if bias in work:
            work[bias] = work[bias].float() * rows

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
