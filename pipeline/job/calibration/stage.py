"""The calibration stage on the driver: token ids out to the workers' shards, the decoder layers in
order, each layer's shard statistics merged and staged before the next layer runs.

Statistics are merged in shard order from per-shard float64 sums and samples, so the staged bytes
do not depend on the number of workers. Layers an earlier run staged are not collected again; the
forward still passes through them, since hidden states are not staged (a 70B model's are GB a
layer), so a rerun reads those layers' weights once more but computes no statistics.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from ...io.storage import Location
from .forward import CalibrationError
from .plan import CalibrationPlan
from .staged import LayerStats, stage, staged
from .stats import merge
from .worker import ShardResult

logger = logging.getLogger(__name__)


def worker_shards(plan: CalibrationPlan, workers: int) -> list[list[int]]:
    """Consecutive shards per worker."""
    n = plan.workers(workers)
    return [list(range(w * plan.shards // n, (w + 1) * plan.shards // n)) for w in range(n)]


def layer_stats(plan: CalibrationPlan, index: int, results: dict[int, ShardResult]) -> LayerStats:
    """One layer's shards' statistics merged in shard order, with the reason for each quantized matrix
    left without any."""
    layer = plan.layers[index]
    order = sorted(results)
    names = sorted({name for s in order for name in results[s][0]})
    site_of: dict[str, str] = {}
    for s in order:
        site_of.update(results[s][1])
    experts = {t.leaf for t in layer.quantized if t.expert is not None}
    sites = {}
    for name in names:
        merged = merge([results[s][0][name] for s in order if name in results[s][0]],
                       plan.options.expert_sample if name in experts else plan.options.sample)
        if merged is not None:
            sites[name] = merged
            if name in experts:
                site_of[name] = name
    site_of = {leaf: site for leaf, site in site_of.items() if site in sites}
    missing = {}
    for t in layer.quantized:
        if t.leaf in site_of:
            continue
        if t.expert is None:
            missing[t.leaf] = "its input was not seen in the calibration forward"
        elif t.leaf in names:
            missing[t.leaf] = "no calibration token was routed to this expert"
        else:
            missing[t.leaf] = "its experts module is not of the gate_up/down form whose inputs are recomputed"
    return LayerStats(sites, site_of, missing)


def calibrate(plan: CalibrationPlan, ids: torch.Tensor, location: Location, call: Callable, workers: int,
              log: Callable[[str], None] = print) -> int:
    """Run the stage; returns how many layers an earlier run had staged. ``call(method, per_worker_args)``
    starts a ``ShardWorker`` method on every worker with its own arguments and returns a function that
    waits for the results, in worker order (Ray actors, or objects in this process): the workers run
    the next layer while the driver merges and stages the last."""
    done = [staged(location, layer.block) for layer in plan.layers]
    if all(done):
        log(f"calibration: all {len(plan.layers)} layers' statistics were staged by an earlier run; reused")
        return len(done)
    last = max(i for i, d in enumerate(done) if not d)
    if any(done):
        log(f"calibration: resuming, {sum(done)} of {len(done)} layers' statistics staged by an earlier run")
    t0 = time.perf_counter()
    split = worker_shards(plan, workers)
    call("start", [(plan, {s: ids[plan.shard_sequences(s).start:plan.shard_sequences(s).stop] for s in shards})
                   for shards in split])()
    pending = call("layer", [(plan, 0, not done[0])] * len(split))
    for i in range(last + 1):
        collect = not done[i]
        results: dict[int, ShardResult] = {}
        for part in pending():
            results.update(part)
        if i < last:  # the next layer needs only the workers' hidden states, not this layer's staging
            pending = call("layer", [(plan, i + 1, not done[i + 1])] * len(split))
        if collect and sorted(results) != list(range(plan.shards)):
            # A worker restarted after a crash holds no hidden states: never stage a layer short of shards.
            raise CalibrationError(f"calibration of {plan.layers[i].block}: shards {sorted(set(range(plan.shards)) - set(results))} "
                               "are gone (a worker died and lost its hidden states); rerun the job, which resumes "
                               "from the layers staged")
        if collect:
            stage(location, plan.layers[i].block, layer_stats(plan, i, results))
        logger.info("calibration: %s %s", plan.layers[i].block, "staged" if collect else "passed (staged earlier)")
    log(f"calibration: {last + 1 - sum(done[:last + 1])} layers' statistics staged in "
        f"{time.perf_counter() - t0:.1f} s on {len(split)} workers")
    return sum(done)
