"""A real `ray job submit` round trip: `ray start --head` on 127.0.0.1, the quantize job
submitted with --working-dir, waited for until it succeeds, its output checked. Token
authentication is on, as on a stock cluster: the head and the submitting side read the token
from a mode-600 file named by RAY_AUTH_TOKEN_PATH, with RAY_AUTH_MODE=token (conftest makes it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from checkpoints import write_llama_checkpoint
from pipeline.output.manifest import verify
from pipeline.io.storage import Location
from pipeline_checks import assert_output_matches_source
from s3_server import FAKE_KEY_ID, FAKE_SECRET, free_port
from sinq_ops import QuantConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
# What the head and the submitting side are each given to authenticate: the mode and the token file's path.
RAY_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": os.environ["RAY_AUTH_TOKEN_PATH"]}
BASE = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}, "SINQ_AUTO_PATCH": "0",
        "PATH": f"{BIN}:{os.environ['PATH']}"}
# The head's environment carries credentials, as a real node's would; they must not leak into the job.
ENV = {**BASE, **RAY_AUTH, "AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
       "HF_TOKEN": "hf_fakeTokenForTheTestOnly"}
SUBMIT_ENV = {**BASE, **RAY_AUTH}  # the submitting machine: the token, no storage credentials


@pytest.fixture(scope="module")
def head() -> str:
    """A head started with --block in its own process group, so that stopping it ends this
    cluster alone (`ray stop` would end every Ray on the machine)."""
    port, dash, agent = free_port(), free_port(), free_port()  # not the default ports another Ray here may hold
    proc = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        # Ready once it accepts and runs a job: the dashboard answers before its job agent does.
        deadline = time.time() + 180
        while subprocess.run([RAY, "job", "submit", "--address", address, "--", "true"], env=SUBMIT_ENV,
                             capture_output=True).returncode:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("the Ray head did not come up")
            time.sleep(2)
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:  # a graceful stop takes half a minute; the cluster's state is of no use afterwards
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_submit_without_the_token_or_with_another_is_refused(head: str, no_ray_token: dict[str, str],
                                                              tmp_path: Path) -> None:
    client = JobSubmissionClient(head)  # this process has the token: RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH
    jobs = len(client.list_jobs())

    def submit(env: dict[str, str]) -> str:
        proc = subprocess.run([RAY, "job", "submit", "--address", head, "--", "true"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode, "the head accepted a job from a client without its token"
        return proc.stdout + proc.stderr

    assert "no authentication token was found" in submit(no_ray_token)  # a shell that never heard of the token
    wrong = tmp_path / "another_token"
    wrong.write_text("0" * 64)
    wrong.chmod(0o600)
    assert "token is invalid or incorrect" in submit({**no_ray_token, "RAY_AUTH_MODE": "token",
                                                       "RAY_AUTH_TOKEN_PATH": str(wrong)})
    assert len(client.list_jobs()) == jobs


def test_ray_job_submit_round_trip(head: str, ray_auth_token: str, tmp_path: Path) -> None:
    src = write_llama_checkpoint(tmp_path / "src", layers=2, hidden=128, intermediate=256, vocab=256, shards=2, seed=7)
    out = tmp_path / "out"
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", head, "--working-dir", str(ROOT), "--submission-id", "quantize-round-trip",
         "--runtime-env-json", json.dumps({"env_vars": {"SINQ_AUTO_PATCH": "0"}}),
         "--", "python", "-m", "jobs.quantize", "--model", str(src), "--out", str(out), "--workers", "2"],
        env=SUBMIT_ENV, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "units per worker" in proc.stdout
    client = JobSubmissionClient(head)
    assert client.get_job_status("quantize-round-trip") == JobStatus.SUCCEEDED
    info = client.get_job_info("quantize-round-trip")
    published = json.dumps([info.entrypoint, info.runtime_env, info.metadata, client.get_job_logs("quantize-round-trip"),
                            proc.stdout, proc.stderr, (out / "manifest.json").read_text()], default=str)
    for secret in (FAKE_KEY_ID, FAKE_SECRET, "hf_fakeTokenForTheTestOnly", ray_auth_token):
        assert secret not in published
    verify(Location(str(out)))
    assert_output_matches_source(out, src, QuantConfig())
