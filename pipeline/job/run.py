"""The job: plan on the driver, quantize on a pool of Ray actors, assemble in a reducer actor.

Work in flight is bounded by the pool (one unit per worker at a time), so the driver's
memory does not grow with the model: it holds the plan and small per-unit records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Callable, Iterator

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..io import locks
from ..io.storage import Location
from ..output.layout import tool_version
from ..output.manifest import MANIFEST_NAME, IncompleteOutput, verify
from ..sources import Source, open_source
from .actors import QuantizeWorker, Reducer
from .calibration.staged import CALIBRATION_DIR
from .calibrate import CalibrationInput, plan_calibration, run_calibration
from .destination import check_apart, take
from .errors import JobError
from .options import JobOptions
from .plan import Plan, make_plan
from .progress import Progress
from .reduce import Assembler, check_plan
from .unit import process_unit, staged_names

STAGING_DIR = ".staging"
logger = logging.getLogger(__name__)
_STOP_WAIT_S = 30.0


def run_key(source: Source, opts: JobOptions, calibration: dict | None = None) -> str:
    """Names the staging area: the same source, config and selection (and, for A-SINQ, the same
    calibration text and sizes) give the same key."""
    ident = {**({"calibration": calibration} if calibration is not None else {}),"source": source.identity, "config": opts.quant.to_dict(), "include": list(opts.include),
             "exclude": list(opts.exclude), "max_shard_size": opts.max_shard_size, "tool": tool_version(),
             **({"include_towers": True} if opts.include_towers else {}),
             **({"format": opts.output_format} if opts.output_format != "sinq" else {})}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _existing_output(dest: Location, key: str, opts: JobOptions, log: Callable[[str], None]) -> dict | None:
    """The manifest of a complete output of this very job, every file's content verified, else None.
    A damaged or incomplete output is redone (its manifest removed first, so it never looks complete
    meanwhile). Refuses to replace a complete output of another job unless ``opts.overwrite``."""
    if not dest.exists(MANIFEST_NAME):
        return None
    try:
        old = verify(dest)
    except IncompleteOutput as exc:
        log(f"the output there does not verify ({exc}); it is written again")
        old = None
    if old is not None and old.get("run_key") == key and not opts.overwrite:
        return old
    if old is not None and not opts.overwrite:
        raise JobError(f"{dest.url} already holds a complete output of another job (model, config, output format, "
                       "tensor selection or tool version); pass --overwrite to replace it")
    dest.remove(MANIFEST_NAME)  # from here on the output is incomplete until the new manifest lands
    return None


def _probe(staging: Location) -> None:
    """Fail at once, not hours later, when the destination cannot be written."""
    try:
        staging.write_bytes(".probe", b"")
        staging.remove(".probe")
    except OSError as exc:
        raise JobError(f"cannot write to {staging.url.rsplit('/' + STAGING_DIR, 1)[0]}: {exc.strerror or exc}") from None


def _staged_earlier(plan: Plan, staging: Location) -> int:
    """How many units an earlier run of the same job left staged (a listing; the workers verify them)."""
    present = set(staging.list())
    return sum(all(n in present for n in staged_names(u)) for u in plan.units)


def _ensure_ray(opts: JobOptions) -> None:
    if ray.is_initialized():
        return
    if opts.ray_address or os.environ.get("RAY_ADDRESS"):
        logger.info("joining the Ray cluster at %s", opts.ray_address or os.environ["RAY_ADDRESS"])
        # A cluster (or `ray job submit`) brings its own runtime environment; adding one would conflict.
        ray.init(address=opts.ray_address, log_to_driver=True)
    else:
        logger.info("starting a local Ray")
        # A fresh local Ray: never a cluster that a stale /tmp/ray record points at.
        # No dashboard: it costs a second of start-up, and the job logs its own progress.
        ray.init(address="local", log_to_driver=True, include_dashboard=False,
                 runtime_env={"env_vars": {"SINQ_AUTO_PATCH": "0"}})


def _plan(source: Source, opts: JobOptions) -> Plan:
    plan = make_plan(source, opts.quant, include=list(opts.include), exclude=list(opts.exclude),
                     max_shard_size=opts.max_shard_size, worker_memory=opts.worker_memory,
                     include_towers=opts.include_towers, output_format=opts.output_format)
    logger.info("planned %d units in %d shards: %.3f GB in, %.3f GB out", len(plan.units), len(plan.shards),
                plan.in_bytes / 1e9, plan.out_bytes / 1e9)
    return plan


def _checked(plan: Plan, check: Future) -> None:
    """Wait for the commit check (``check_plan``) and record how its forward pass ran."""
    plan.forward_check = check.result().how
    (logger.warning if plan.forward_check.startswith("not run") else logger.info)(
        "forward check of the output: %s", plan.forward_check)


def _actor_options(opts: JobOptions) -> tuple[int, dict]:
    """How many workers the cluster takes by default, and each one's resources."""
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0.0)
    if gpus:
        n = opts.workers or max(1, int(gpus // opts.gpus_per_worker))
        actor_opts = {"num_gpus": opts.gpus_per_worker, "num_cpus": opts.cpus_per_worker}
    else:
        n = opts.workers or max(1, int(resources.get("CPU", 1) // opts.cpus_per_worker))
        actor_opts = {"num_cpus": opts.cpus_per_worker}
    return n, actor_opts


def _pool(plan: Plan, opts: JobOptions, staging: Location, calibration: Location | None) -> list:
    n, actor_opts = _actor_options(opts)
    resources = ray.cluster_resources()
    n = min(n, len(plan.units))
    logger.info("%d quantize workers, each %s (cluster: %s)", n, actor_opts, dict(resources))
    return [
        QuantizeWorker.options(**actor_opts, scheduling_strategy="SPREAD").remote(
            plan.source, opts.quant, staging, opts.cpus_per_worker, calibration,
            plan.model_config if calibration is not None else None
        )
        for _ in range(n)
    ]


def _on_driver_node() -> NodeAffinitySchedulingStrategy:
    """The reducer shares the driver's fate: losing a worker node must never take it along."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _stop(actors: list, busy: bool = True) -> None:
    """Kill the actors; when some may be ``busy`` (the job failed), wait until each is gone, so that
    none is still writing afterwards (a call that Ray retries until the actor's death is final)."""
    logger.debug("stopping %d actors", len(actors))
    for actor in actors:
        ray.kill(actor, no_restart=True)
    if not busy:
        return
    for actor in actors:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=_STOP_WAIT_S)
        except (RayActorError, GetTimeoutError):
            pass


def _dispatch(workers: list, units: list, depth: int) -> Iterator:
    """Results of ``units`` as they finish, each worker holding up to ``depth`` units at a time (the
    one it quantizes and the one it reads meanwhile); a finished unit's worker gets the next."""
    queue = iter(units)
    pending: dict = {}

    def submit(actor) -> None:
        unit = next(queue, None)
        if unit is not None:
            pending[actor.process.remote(unit)] = actor

    for _ in range(depth):
        for actor in workers:
            submit(actor)
    while pending:
        [ready], _ = ray.wait(list(pending), num_returns=1)
        actor = pending.pop(ready)
        result = ray.get(ready)
        submit(actor)
        yield result


def _unwrap(exc: Exception) -> str:
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    text = lines[0] if isinstance(cause, ValueError) or not lines else lines[-1]
    return f"a worker died and its restarts ran out: {text}" if isinstance(cause, RayActorError) else text


def _run_in_process(plan: Plan, opts: JobOptions, dest: Location, staging: Location, key: str, t_start: float,
                    calibration: Location | None) -> dict:
    """The job's units quantized here, one after another, and assembled here."""
    assembler = Assembler(plan, dest, staging)
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.cpus_per_worker)  # as a worker runs: the same reductions, the same bytes
    try:
        reused = 0
        for unit in plan.units:
            result = process_unit(plan.source, unit, opts.quant, staging, "cpu", calibration=calibration)
            reused += result.reused
            assembler.add(result)
    finally:
        torch.set_num_threads(threads)
        if assembler.next_shard != len(plan.shards):
            staging.remove_partials()
    manifest = assembler.finish({"wall_s": round(time.perf_counter() - t_start, 3), "workers": 0,
                                 "units_reused": reused}, key)
    dest.remove(f"{STAGING_DIR}/{key}", recursive=True)
    dest.remove_empty_dir(STAGING_DIR)
    return manifest


def run_job(opts: JobOptions, log: Callable[[str], None] = print, *, in_process: bool = False,
            lock: locks.Lock | None = None) -> dict:
    """Run the whole job; returns the manifest (or, on a dry run, the plan as a dict).

    ``in_process`` quantizes unit after unit in this process, without Ray: the same plan, units,
    staging and assembly, for small models and tests where starting a cluster costs more than the work.
    The job holds the lock on its destination (``lock``, when the caller already took it, as a
    nightly run does), renewed while it runs; a destination another job holds is refused."""
    t_start = time.perf_counter()
    source = open_source(opts.model, opts.storage)
    dest = Location(opts.out, opts.storage)
    check_apart(source, dest)
    plan = _plan(source, opts)
    if opts.dry_run:
        log(plan.describe())
        if opts.quant.calibrated:
            workers = opts.workers or 8
            text = "synthetic token ids" if plan.source.spec.startswith("synthetic://") else None
            log(plan_calibration(plan, opts).describe(workers, gpu=True, text=text))
        return {"dry_run": True, "units": len(plan.units), "shards": len(plan.shards), "out_bytes": plan.out_bytes,
                **plan.structure()}

    # The commit check needs the plan alone: it runs while the destination is locked and probed, Ray
    # starts and the workers import torch, and the job waits for it before the first unit goes out.
    with ThreadPoolExecutor(1, thread_name_prefix="commit-check") as checker:
        check = checker.submit(check_plan, plan)
        held = lock if lock is not None else take(dest)
        try:
            with locks.kept_alive(held) if held is not None else nullcontext():
                return _run_locked(plan, opts, dest, check, log, in_process, t_start)
        finally:
            if lock is None and held is not None:
                held.release()


def _run_locked(plan: Plan, opts: JobOptions, dest: Location, check: Future, log: Callable[[str], None],
                in_process: bool, t_start: float) -> dict:
    """The job once its destination is this job's alone."""
    given = CalibrationInput(plan, opts) if opts.quant.calibrated else None
    key = run_key(plan.source, opts, given.identity(opts) if given is not None else None)
    existing = _existing_output(dest, key, opts, log)
    if existing is not None:
        log(f"{dest.url} already holds this job's complete output, every file verified; nothing to do")
        return existing
    staging = dest.child(f"{STAGING_DIR}/{key}")
    _probe(staging)
    if in_process:
        _checked(plan, check)
        calibration = staging.child(CALIBRATION_DIR) if given is not None else None
        if given is not None:
            run_calibration(plan, opts, given, calibration, log=log)
        return _run_in_process(plan, opts, dest, staging, key, t_start, calibration)
    _ensure_ray(opts)
    calibration = staging.child(CALIBRATION_DIR) if given is not None else None
    workers = _pool(plan, opts, staging, calibration)
    try:
        _checked(plan, check)
        if given is not None:  # the pool calibrates first, then takes the units
            run_calibration(plan, opts, given, calibration, log=log, actors=workers)
    except (RayTaskError, RayActorError) as exc:
        _stop(workers)
        logger.debug("the calibration stage failed", exc_info=exc)
        raise JobError(_unwrap(exc)) from None
    except BaseException:
        _stop(workers, busy=False)
        raise
    return _run_on_ray(plan, dest, staging, key, workers, log, t_start)


def _run_on_ray(plan: Plan, dest: Location, staging: Location, key: str, workers: list, log: Callable[[str], None],
                t_start: float) -> dict:
    """Units through the worker pool as they finish, assembled by a reducer beside the driver."""
    reducer = Reducer.options(num_cpus=0, scheduling_strategy=_on_driver_node()).remote(plan, dest, staging)
    staged = _staged_earlier(plan, staging)
    if staged:
        log(f"resuming: {staged} of {len(plan.units)} units were staged by an earlier run; workers reuse those that verify")
    log(f"quantizing {plan.source.spec} -> {dest.url}: {len(plan.units)} units on {len(workers)} workers")

    pending_adds = []
    reused = 0
    progress = Progress(len(plan.units), plan.in_bytes, len(workers), log)
    done = False
    gpu = bool(ray.cluster_resources().get("GPU", 0.0))
    depth = 2 if plan.read_ahead_fits(gpu) else 1
    if depth == 1:
        log(f"no read-ahead: a unit and the next one (or the last one's outputs) need "
            f"{(plan.worker_memory_bytes(gpu) + plan.read_ahead_bytes()) / 1e9:.2f} GB, more than --worker-memory")
    try:
        for result in _dispatch(workers, plan.units, depth):
            pending_adds.append(reducer.add.remote(result))
            reused += result.reused
            seconds = result.read_s + result.quantize_s + result.write_s
            progress.unit_done(result.name, plan.units[result.index].in_bytes, result.worker, seconds)
        ray.get(pending_adds)
        log(f"units per worker: {progress.worker_summary()}")
        run_info = {"wall_s": round(time.perf_counter() - t_start, 3), "workers": len(workers),
                    "units_reused": reused}
        manifest = ray.get(reducer.finish.remote(run_info, key))
        done = True
    except (RayTaskError, RayActorError) as exc:
        logger.debug("the job failed", exc_info=exc)
        raise JobError(_unwrap(exc)) from None
    finally:
        _stop([*workers, reducer], busy=not done)
        if not done:
            # A worker given its next unit just before the failure may have been killed mid-write.
            staging.remove_partials()
    dest.remove(f"{STAGING_DIR}/{staging.url.rsplit('/', 1)[-1]}", recursive=True)
    dest.remove_empty_dir(STAGING_DIR)
    return manifest
