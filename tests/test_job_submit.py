"""A real `ray job submit` round trip: `ray start --head` on 127.0.0.1, the quantize job
submitted with --working-dir, waited for until it succeeds, its output checked."""

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
# The head's environment carries credentials, as a real node's would; they must not leak into the job.
ENV = {**os.environ, "SINQ_AUTO_PATCH": "0", "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}",
       "AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "HF_TOKEN": "hf_fakeTokenForTheTestOnly"}


@pytest.fixture(scope="module")
def head() -> str:
    """A head started with --block in its own process group, so that stopping it ends this
    cluster alone (`ray stop` would end every Ray on the machine)."""
    port, dash = free_port(), free_port()
    proc = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             "--disable-usage-stats"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        # Ready once it accepts and runs a job: the dashboard answers before its job agent does.
        deadline = time.time() + 180
        while subprocess.run([RAY, "job", "submit", "--address", address, "--", "true"], env=ENV,
                             capture_output=True).returncode:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("the Ray head did not come up")
            time.sleep(2)
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_ray_job_submit_round_trip(head: str, tmp_path: Path) -> None:
    src = write_llama_checkpoint(tmp_path / "src", layers=2, hidden=128, intermediate=256, vocab=256, shards=2, seed=7)
    out = tmp_path / "out"
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", head, "--working-dir", str(ROOT), "--submission-id", "quantize-round-trip",
         "--runtime-env-json", json.dumps({"env_vars": {"SINQ_AUTO_PATCH": "0"}}),
         "--", "python", "-m", "jobs.quantize", "--model", str(src), "--out", str(out), "--workers", "2"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "units per worker" in proc.stdout
    client = JobSubmissionClient(head)
    assert client.get_job_status("quantize-round-trip") == JobStatus.SUCCEEDED
    info = client.get_job_info("quantize-round-trip")
    published = json.dumps([info.entrypoint, info.runtime_env, info.metadata, client.get_job_logs("quantize-round-trip"),
                            proc.stdout, proc.stderr, (out / "manifest.json").read_text()], default=str)
    for secret in (FAKE_KEY_ID, FAKE_SECRET, "hf_fakeTokenForTheTestOnly"):
        assert secret not in published
    verify(Location(str(out)))
    assert_output_matches_source(out, src, QuantConfig())
