"""The job on a multi-node Ray cluster on this machine: a head without CPUs and two worker
nodes with their own resources, so every unit must run on a worker node. Token authentication
is on (conftest sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH): every node, the driver and
the workers take the token from that file, and a client without it is refused."""

from __future__ import annotations

import os
import subprocess
import sys
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

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [c.add_node(num_cpus=1, resources={f"node_{i}": 1}) for i in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env={"env_vars": {"SINQ_AUTO_PATCH": "0"}})
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_the_cluster_admits_only_clients_with_its_token(cluster, no_ray_token: dict[str, str], tmp_path: Path) -> None:
    c, _ = cluster

    def status(env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, "status", "--address", c.address], env=env, capture_output=True, text=True,
                              timeout=300)

    def refused(env: dict[str, str]) -> str:
        proc = status(env)
        assert proc.returncode, "the cluster admitted a client without its token"
        return proc.stderr

    assert "Authentication token is missing or incorrect" in refused(no_ray_token)
    wrong = tmp_path / "another_token"
    wrong.write_text("0" * 64)
    wrong.chmod(0o600)
    assert "Authentication token is missing or incorrect" in refused(
        {**no_ray_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)})
    admitted = status({**no_ray_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": os.environ["RAY_AUTH_TOKEN_PATH"]})
    assert admitted.returncode == 0, admitted.stderr[-2000:]


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
