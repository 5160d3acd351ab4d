"""Long-lived Ray actors: quantize workers, and the reducer that holds the reduce stage's ``Assembler``.

A worker process starts once (importing torch costs seconds) and then takes unit after
unit; Ray restarts a worker that dies and retries the units it held. A worker runs two calls
at once: while one quantizes (under ``compute``, one at a time), the other reads the next unit's
bytes or uploads the last unit's outputs, so the network and the quantizer work side by side.
"""

from __future__ import annotations

import os
import resource
import socket
import threading

import ray
import torch

from sinq_ops import QuantConfig

from .calibration.worker import ShardWorker
from ..io.storage import Location
from ..sources import Source
from .plan import Plan, Unit
from .reduce import Assembler
from .unit import UnitResult, process_unit


@ray.remote(max_restarts=3, max_task_retries=3, max_concurrency=2)
class QuantizeWorker:
    def __init__(self, source: Source, config: QuantConfig, staging: Location, threads: int,
                 calibration: Location | None = None, model_config: dict | None = None) -> None:
        self.source = source
        self.calibration = calibration
        self.model_config = model_config
        self.threads = threads
        self.shards: ShardWorker | None = None
        self.config = config
        self.staging = staging
        torch.set_num_threads(threads)  # a fixed count keeps float reductions, and so output, identical
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        node = ray.get_runtime_context().get_node_id()[:8]
        self.where = f"{socket.gethostname()}/{node}/pid{os.getpid()}/{self.device}"
        self.compute = threading.Lock()

    def calibrate(self, method: str, *args):
        """A call of the calibration stage (``ShardWorker``) on this worker's process and device: the
        same pool calibrates, then quantizes, without starting processes twice."""
        if self.shards is None:
            self.shards = ShardWorker(self.source, self.model_config or {}, self.threads, self.device)
        return getattr(self.shards, method)(*args)

    def end_calibration(self) -> None:
        """Free the shards' hidden states and the meta model before the units come."""
        self.shards = None

    def process(self, unit: Unit) -> UnitResult:
        result = process_unit(self.source, unit, self.config, self.staging, self.device, self.compute,
                              calibration=self.calibration)
        result.worker = self.where
        # The process's high-water mark so far (Linux reports KiB): what the plan's memory bound is checked against.
        result.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return result


@ray.remote(max_restarts=0)
class Reducer:
    """Holds the assembler state; units are added in completion order."""

    def __init__(self, plan: Plan, dest: Location, staging: Location) -> None:
        self.assembler = Assembler(plan, dest, staging)

    def add(self, result: UnitResult) -> list[str]:
        return self.assembler.add(result)

    def finish(self, run_info: dict, run_key: str) -> dict:
        return self.assembler.finish(run_info, run_key)
