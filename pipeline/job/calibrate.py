"""The job's calibration stage (A-SINQ): the text read and tokenized on the driver, the float
forward on a pool of calibration workers (Ray actors, or one object in this process), each layer's
statistics staged beside the units, where the quantize workers read them.

The quantize pool's actors calibrate first (each holding some shards' hidden states), then drop
their shards and take units: one set of processes and GPUs for both stages.
"""

from __future__ import annotations

import logging
from typing import Callable

import ray
import torch

from ..architecture import shared_layout
from .calibration.plan import CalibrationPlan, calibration_plan
from .calibration.stage import calibrate
from .calibration.text import read_text, synthetic_ids, token_ids
from .calibration.worker import ShardWorker
from ..io.storage import Location
from .options import JobOptions
from .plan import Plan

logger = logging.getLogger(__name__)


def plan_calibration(plan: Plan, opts: JobOptions) -> CalibrationPlan:
    return calibration_plan(plan, opts.calibration, shared_layout(plan.model_config).decoder)


class CalibrationInput:
    """The calibration text, read once on the driver: its digest names the job, its tokens feed the stage."""

    def __init__(self, plan: Plan, opts: JobOptions) -> None:
        self.synthetic = plan.source.spec.startswith("synthetic://")
        self.spec = "synthetic token ids" if self.synthetic else opts.calibration.resolved_text()
        if self.synthetic:
            self.text, self.sha256 = "", "synthetic"
        else:
            self.text, self.sha256 = read_text(self.spec, opts.storage)

    def identity(self, opts: JobOptions) -> dict:
        return {"text_sha256": self.sha256, **{k: v for k, v in opts.calibration.to_dict().items() if k != "text"}}

    def ids(self, plan: Plan, opts: JobOptions) -> torch.Tensor:
        if self.synthetic:
            return synthetic_ids(plan.model_config, opts.calibration)
        return token_ids(plan.source, self.text, opts.calibration, self.spec)


def run_calibration(plan: Plan, opts: JobOptions, given: CalibrationInput, where: Location, *,
                    log: Callable[[str], None], actors: list | None = None) -> None:
    """Stage every decoder layer's statistics at ``where``: on the quantize pool's ``actors``
    (``QuantizeWorker.calibrate``), or without them in this process."""
    cplan = plan_calibration(plan, opts)
    ids = given.ids(plan, opts)
    if actors is None:
        threads = torch.get_num_threads()
        worker = ShardWorker(plan.source, plan.model_config, opts.cpus_per_worker, "cpu")
        try:
            def call(method: str, args: list[tuple]) -> Callable[[], list]:
                results = [getattr(worker, method)(*a) for a in args]
                return lambda: results

            calibrate(cplan, ids, where, call, 1, log)
        finally:
            torch.set_num_threads(threads)
        return
    used = actors[:cplan.workers(len(actors))]
    log(f"calibrating on {len(ids)} x {ids.shape[1]} tokens of {given.spec}: {len(cplan.layers)} layers, "
        f"{cplan.shards} shards on {len(used)} workers")

    def call(method: str, args: list[tuple]) -> Callable[[], list]:
        refs = [w.calibrate.remote(method, *a) for w, a in zip(used, args)]
        return lambda: ray.get(refs)

    calibrate(cplan, ids, where, call, len(used), log)
    ray.get([w.end_calibration.remote() for w in used])
