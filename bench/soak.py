"""Soak: a 64-layer generated checkpoint through 4 workers on a local cluster of two worker
nodes while a worker process is killed every N seconds. Reports kills, units redone (task
attempts beyond the first) and whether the output equals a clean run byte for byte.

    python bench/soak.py [--layers 64] [--kill-every 1.5] [--hidden 512]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project, and the tests' checkpoint writers
os.environ.setdefault("SINQ_AUTO_PATCH", "0")

from checkpoints import write_llama_checkpoint  # noqa: E402
from pipeline.job.options import JobOptions  # noqa: E402
from pipeline.job.run import run_job  # noqa: E402


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != "manifest.json"}


def killer(every: float, stop: threading.Event, kills: list[int]) -> None:
    rng = random.Random(0)
    while not stop.wait(every):
        alive = [a for a in list_actors(filters=[("class_name", "=", "QuantizeWorker"), ("state", "=", "ALIVE")])
                 if a.pid]
        if alive:
            victim = rng.choice(alive)
            try:
                os.kill(victim.pid, signal.SIGKILL)
                kills.append(victim.pid)
            except ProcessLookupError:
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--kill-every", type=float, default=1.5)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sinq-soak-"))
    src = write_llama_checkpoint(work / "src", layers=args.layers, hidden=args.hidden, intermediate=2 * args.hidden,
                                 vocab=1024, shards=4, seed=1)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"SINQ_AUTO_PATCH": "0"}})
    try:
        opts = dict(model=str(src), workers=4, max_shard_size=2_000_000)
        t0 = time.perf_counter()
        run_job(JobOptions(out=str(work / "clean"), **opts), log=lambda _: None)
        clean_s = time.perf_counter() - t0

        kills: list[int] = []
        stop = threading.Event()
        thread = threading.Thread(target=killer, args=(args.kill_every, stop, kills), daemon=True)
        t0 = time.perf_counter()
        thread.start()
        manifest = run_job(JobOptions(out=str(work / "soak"), **opts), log=lambda _: None)
        stop.set()
        thread.join()
        soak_s = time.perf_counter() - t0
        tasks = list_tasks(filters=[("name", "=", "QuantizeWorker.process")], limit=10_000)
        redone = sum(1 for t in tasks if t.attempt_number > 0)
        same = files(work / "clean") == files(work / "soak")
        print(f"\n{args.layers} layers (hidden {args.hidden}), 4 workers on 2 worker nodes, a worker killed every "
              f"{args.kill_every:g} s")
        print(f"clean run {clean_s:.1f} s; soak run {soak_s:.1f} s with {len(kills)} workers killed, "
              f"{redone} unit attempts redone, {len(manifest['units'])} units")
        print(f"output identical to the clean run: {same}")
        if not same:
            sys.exit(1)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
