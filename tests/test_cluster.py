"""The job on a multi-node Ray cluster on this machine: a head without CPUs and two worker
nodes with their own resources, so every unit must run on a worker node."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from checkpoints import write_llama_checkpoint
from pipeline.job.options import JobOptions
from pipeline.job.run import run_job
from pipeline_checks import file_bytes


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [c.add_node(num_cpus=1, resources={f"node_{i}": 1}) for i in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env={"env_vars": {"SINQ_AUTO_PATCH": "0"}})
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_units_spread_over_both_worker_nodes_and_bytes_match_one_node(cluster, tmp_path: Path) -> None:
    _, nodes = cluster
    src = write_llama_checkpoint(tmp_path / "src", layers=4, hidden=128, intermediate=256, vocab=256, shards=2, seed=5)
    spread = run_job(JobOptions(model=str(src), out=str(tmp_path / "spread"), workers=2, max_shard_size=100_000),
                     log=lambda _: None)
    used = {u["worker"].split("/")[1] for u in spread["units"]}
    assert used == {n.node_id[:8] for n in nodes}
    single = run_job(JobOptions(model=str(src), out=str(tmp_path / "single"), workers=1, max_shard_size=100_000),
                     log=lambda _: None)
    assert len({u["worker"].split("/")[1] for u in single["units"]}) == 1
    assert file_bytes(tmp_path / "spread") == file_bytes(tmp_path / "single")


def _reducer_node(timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = list_actors(filters=[("class_name", "=", "Reducer"), ("state", "=", "ALIVE")])
        if alive:
            return alive[0].node_id
        time.sleep(0.2)
    raise AssertionError("the reducer never started")


def test_a_worker_node_removed_mid_job_changes_nothing(cluster, tmp_path: Path) -> None:
    c, nodes = cluster
    spare = c.add_node(num_cpus=1, resources={"spare": 1})  # room for the actor that loses its node
    c.wait_for_nodes()
    src = write_llama_checkpoint(tmp_path / "src", layers=8, hidden=192, intermediate=384, vocab=256, shards=2, seed=6)
    removed: list[str] = []
    reducer_nodes: list[str] = []

    def log(line: str) -> None:
        if not removed and line.startswith("["):
            reducer_nodes.append(_reducer_node())
            victim = next(n for n in [*nodes, spare] if n.node_id[:8] in line)
            c.remove_node(victim)  # the node whose worker was just handed its next unit
            removed.append(victim.node_id[:8])

    out = tmp_path / "out"
    manifest = run_job(JobOptions(model=str(src), out=str(out), workers=2, max_shard_size=200_000), log=log)
    assert removed
    assert reducer_nodes == [c.head_node.node_id]  # never on a worker node that may be lost
    used = {u["worker"].split("/")[1] for u in manifest["units"]}
    assert len(used) == 3  # the two first homes, then the node the lost worker restarted on
    clean = run_job(JobOptions(model=str(src), out=str(tmp_path / "clean"), workers=1, max_shard_size=200_000),
                    log=lambda _: None)
    assert clean["files"] == manifest["files"]
    assert file_bytes(out) == file_bytes(tmp_path / "clean")
