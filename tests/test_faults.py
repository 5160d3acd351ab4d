"""Faults that really happen: a worker killed mid-unit, the driver killed mid-job, storage
that throttles or drops connections, a full disk, a destination that refuses writes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from fault_proxy import FaultProxy
from checkpoints import write_llama_checkpoint
from pipeline.output.manifest import MANIFEST_NAME, verify
from pipeline.job.plan import make_plan
from pipeline.job.options import JobOptions
from pipeline.job.run import JobError, run_job, run_key
from pipeline.sources import open_source
from pipeline.io.storage import Location, StorageOptions
from pipeline.job.unit import process_unit, staged_result
from pipeline_checks import file_bytes
from s3_server import FAKE_KEY_ID, FAKE_SECRET
from sinq_ops import QuantConfig

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """The environment now, with the S3 endpoint and credentials the fixtures set and the Ray token
    (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH) conftest set: a driver's own local Ray requires it too."""
    return {**os.environ, "SINQ_AUTO_PATCH": "0"}


S3_BUCKETS = ("src", "dst")
pytestmark = pytest.mark.usefixtures("ray_after_s3")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_llama_checkpoint(tmp_path_factory.mktemp("src") / "m", layers=10, hidden=256, intermediate=512,
                                  vocab=256, shards=2, seed=21)


@pytest.fixture(scope="module")
def clean(checkpoint: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    run_job(JobOptions(model=str(checkpoint), out=str(out), workers=2, max_shard_size=500_000), log=lambda _: None)
    return out


def test_worker_killed_mid_unit_is_restarted_and_output_is_unchanged(checkpoint: Path, clean: Path, tmp_path: Path) -> None:
    killed: list[int] = []

    def log(line: str) -> None:
        m = re.search(r"/pid(\d+)/", line)
        if m and not killed:
            pid = int(m.group(1))  # this worker was just handed its next unit: kill it mid-unit
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    out = tmp_path / "out"
    manifest = run_job(JobOptions(model=str(checkpoint), out=str(out), workers=2, max_shard_size=500_000), log=log)
    assert killed
    pids = {u["worker"].split("/pid")[1].split("/")[0] for u in manifest["units"]}
    assert len(pids) >= 3  # the restarted worker is a new process
    assert file_bytes(out) == file_bytes(clean)


def _cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.quantize", *args], cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw)


def test_driver_killed_then_rerun_reuses_staged_units(checkpoint: Path, clean: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--model", str(checkpoint), "--out", str(out), "--workers", "1", "--max-shard-size", "500KB"]
    proc = _cli(args)
    deadline = time.time() + 240
    staged = []
    while time.time() < deadline and len(staged) < 4:
        staged = list(out.glob(".staging/*/unit-*.json"))
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    proc.wait()
    assert len(staged) >= 4 and not (out / MANIFEST_NAME).exists()

    rerun = _cli(args)
    text = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, text[-2000:]
    reused = int(re.search(r"resuming: (\d+) of (\d+) units", text).group(1))
    assert reused >= 4
    assert file_bytes(out) == file_bytes(clean)
    assert not (out / ".staging").exists()


def test_a_staged_unit_is_reused_only_while_it_verifies(checkpoint: Path, tmp_path: Path) -> None:
    plan = make_plan(open_source(str(checkpoint)), QuantConfig())
    unit = next(u for u in plan.units if any(t.quantize for t in u.tasks))
    staging = Location(str(tmp_path / "staging"))
    first = process_unit(plan.source, unit, plan.config, staging, "cpu")
    again = process_unit(plan.source, unit, plan.config, staging, "cpu")
    assert not first.reused and again.reused and again.sha256 == first.sha256
    data = tmp_path / "staging" / first.staged
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert staged_result(unit, staging) is None
    redone = process_unit(plan.source, unit, plan.config, staging, "cpu")
    assert not redone.reused and redone.sha256 == first.sha256 and data.read_bytes() != bytes(raw)


def test_a_different_config_never_reuses_staged_units(checkpoint: Path, tmp_path: Path) -> None:
    """Units staged by an interrupted 4-bit job sit where a rerun of that job looks for them;
    a 3-bit job on the same output neither finds nor reuses them."""
    out = tmp_path / "out"
    first = JobOptions(model=str(checkpoint), out=str(out), workers=2)
    second = JobOptions(model=str(checkpoint), out=str(out), workers=2, quant=QuantConfig(bits=3))

    def plan_of(opts: JobOptions):
        return make_plan(open_source(opts.model), opts.quant, include=list(opts.include), exclude=list(opts.exclude),
                         max_shard_size=opts.max_shard_size)

    plan = plan_of(first)
    first_key = run_key(plan.source, first)
    staging = Location(str(out / ".staging" / first_key))
    for unit in plan.units[:3]:
        assert not process_unit(plan.source, unit, plan.config, staging, "cpu").reused
    assert all(process_unit(plan.source, u, plan.config, staging, "cpu").reused for u in plan.units[:3])

    lines: list[str] = []
    manifest = run_job(second, log=lines.append)
    assert not any("resuming" in line for line in lines), lines
    assert manifest["timings"]["units_reused"] == 0
    assert manifest["quantization"]["bits"] == 3
    assert manifest["run_key"] == run_key(plan_of(second).source, second) != first_key


def test_throttling_and_dropped_connections_are_retried(s3, checkpoint: Path, clean: Path, tmp_path: Path) -> None:
    s3.put(str(checkpoint) + "/", "src/m/", recursive=True)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"], every=7) as proxy:
        run_job(JobOptions(model="s3://src/m", out="s3://dst/retried", workers=2, max_shard_size=500_000,
                           storage=StorageOptions(endpoint_url=proxy.url)), log=lambda _: None)
        assert proxy.faults >= 5
    verify(Location("s3://dst/retried"))
    for name, data in file_bytes(clean).items():
        assert s3.cat_file(f"dst/retried/{name}") == data, name


def test_a_fault_that_outlasts_the_retries_fails_without_a_manifest(s3, checkpoint: Path) -> None:
    s3.put(str(checkpoint) + "/", "src/m2/", recursive=True)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"], fail_writes=True) as proxy:
        with pytest.raises(JobError, match="SlowDown|reduce your request rate"):
            run_job(JobOptions(model="s3://src/m2", out="s3://dst/failed", workers=1,
                               storage=StorageOptions(endpoint_url=proxy.url, max_attempts=2)), log=lambda _: None)
    assert not s3.exists(f"dst/failed/{MANIFEST_NAME}")


def test_disk_full_fails_cleanly(tmp_path: Path) -> None:
    """Every Ray worker of this job may write at most 6 MB per file; the 8 MB embedding cannot be staged."""
    src = write_llama_checkpoint(tmp_path / "wide", layers=1, hidden=256, intermediate=256, vocab=16384, shards=1, seed=2)
    out = tmp_path / "out"
    script = (
        "import sys, ray\n"
        "ray.init(address='local', num_cpus=2, include_dashboard=False, runtime_env={'env_vars': {'SINQ_AUTO_PATCH': '0'},"
        " 'worker_process_setup_hook': 'fault_hooks.limit_file_size'})\n"
        "from jobs import quantize\n"
        f"sys.exit(quantize.main(['--model', {str(src)!r}, '--out', {str(out)!r}, '--workers', '1']))\n"
    )
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]  # Ray logs its own lines too
    assert len(ours) == 1 and "File too large" in ours[0], proc.stderr[-2000:]
    assert not (out / MANIFEST_NAME).exists() and not list(out.glob("model-*.safetensors"))
    assert not list(out.rglob("*.partial-*"))


def test_a_failed_job_stops_its_workers_then_removes_unfinished_files(tmp_path: Path) -> None:
    """Staged units stay for a rerun; files a killed writer left unfinished do not."""
    src = write_llama_checkpoint(tmp_path / "m", layers=2, hidden=64, intermediate=128, vocab=64, shards=1, seed=5)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 4] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    opts = JobOptions(model=str(src), out=str(out), workers=1)
    with pytest.raises(JobError, match="NaN or Inf"):
        run_job(opts, log=lambda _: None)
    (staging,) = (out / ".staging").iterdir()
    staged = sorted(p.name for p in staging.iterdir())
    assert staged  # the units before the poisoned one
    (staging / "unit-00003.safetensors.partial-0badf00d").write_bytes(b"\0" * 100)
    with pytest.raises(JobError, match="NaN or Inf"):
        run_job(opts, log=lambda _: None)
    # A worker holds two units at once (it reads the next while it quantizes), so the rerun may stage
    # one the first run did not finish; it never loses one, and no unfinished file survives.
    after = sorted(p.name for p in staging.iterdir())
    assert set(staged) <= set(after) and not [n for n in after if ".partial-" in n]


def test_destination_that_refuses_writes_fails_at_once(checkpoint: Path) -> None:
    with pytest.raises(JobError, match=r"cannot write to /sys/fs/sinq-out: Operation not permitted"):
        run_job(JobOptions(model=str(checkpoint), out="/sys/fs/sinq-out"), log=lambda _: None)


def test_credentials_never_reach_outputs_or_logs(s3, checkpoint: Path, tmp_path: Path) -> None:
    s3.put(str(checkpoint) + "/", "src/m3/", recursive=True)
    sessions_before = set(Path("/tmp/ray").glob("session_2*"))
    proc = _cli(["--model", "s3://src/m3", "--out", "s3://dst/secret-check", "--workers", "2"])
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, text[-2000:]
    seen = [text]
    for key in s3.find("dst/secret-check"):
        seen.append(s3.cat_file(key).decode("latin-1"))
    for session in set(Path("/tmp/ray").glob("session_2*")) - sessions_before:
        for log in (session / "logs").rglob("*"):
            if log.is_file():
                seen.append(log.read_text(errors="replace"))
    assert len(seen) > 10
    for blob in seen:
        assert FAKE_SECRET not in blob and FAKE_KEY_ID not in blob
