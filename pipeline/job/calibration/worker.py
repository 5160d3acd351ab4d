"""A calibration worker: holds its shards' hidden states between layers and runs each layer on them.

The hidden states never leave the worker: only each shard's statistics travel back, so the
cluster's memory holds the calibration tokens' activations, not the driver's. A worker that dies
loses its shards; the job fails, and its rerun starts over from the layers already staged.
"""

from __future__ import annotations

import torch

from ...sources import Source
from .forward import LayerRunner
from .plan import CalibrationPlan
from .stats import SiteStats

ShardResult = tuple[dict[str, SiteStats], dict[str, str]]  # sites, and each Linear's site


class ShardWorker:
    """The forward on some of the calibration shards; the same object runs in-process or as an actor."""

    def __init__(self, source: Source, model_config: dict, threads: int, device: str) -> None:
        torch.set_num_threads(threads)  # a fixed count keeps float reductions, and so the statistics, identical
        self.runner = LayerRunner(source, model_config, device)
        self.hidden: dict[int, torch.Tensor] = {}

    def start(self, plan: CalibrationPlan, shards: dict[int, torch.Tensor]) -> None:
        """The first layer's input for each shard's token ids (the embedding read once for all)."""
        order = sorted(shards)
        hidden = self.runner.embed(list(plan.embed), torch.cat([shards[s] for s in order]))
        self.hidden = dict(zip(order, hidden.split([shards[s].shape[0] for s in order])))

    def layer(self, plan: CalibrationPlan, index: int, collect: bool) -> dict[int, ShardResult]:
        """Every shard through layer ``index``; with ``collect``, each shard's statistics of its inputs."""
        layer = plan.layers[index]
        results: dict[int, ShardResult] = {}
        cap, expert_cap = plan.shard_cap(plan.options.sample), plan.shard_cap(plan.options.expert_sample)
        with self.runner.layer(layer.block, list(layer.tasks)) as call:
            for shard in sorted(self.hidden):
                sites: dict[str, SiteStats] | None = {} if collect else None
                site_of: dict[str, str] = {}
                self.hidden[shard] = call(self.hidden[shard], sites, site_of, cap, expert_cap)
                if sites is not None:
                    results[shard] = (sites, site_of)
        return results
