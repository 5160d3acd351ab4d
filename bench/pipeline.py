"""End-to-end throughput and memory of the quantize job on generated checkpoints.

Starts a Ray head on this machine, then runs `python -m jobs.quantize` as separate driver
processes against it (so each driver's peak RSS can be sampled on its own) and prints, in
one run: end-to-end source GB/s, the raw read throughput of the same files (the I/O floor),
the workers' summed quantize time, the driver's peak RSS for a 4-layer and a 32-layer
checkpoint of the same width, and the speed-up from 1 to 2 workers.

    python bench/pipeline.py [--hidden 1024] [--intermediate 2816] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project, and the tests' checkpoint writers

from checkpoints import write_llama_checkpoint  # noqa: E402

ENV = {**os.environ, "SINQ_AUTO_PATCH": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(32).hex()}
RAY = str(Path(sys.executable).with_name("ray"))  # the CLI of this interpreter's environment


def raw_read_gbps(directory: Path) -> float:
    files = sorted(directory.glob("*.safetensors"))
    total = 0
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(64 * 1024 * 1024):
                total += len(block)
    return total / 1e9 / (time.perf_counter() - t0)


def run_driver(model: Path, out: Path, workers: int, address: str) -> tuple[dict, float, int]:
    """Run one job as its own driver process; returns (manifest, wall seconds, peak RSS bytes)."""
    cmd = [sys.executable, "-m", "jobs.quantize", "--model", str(model), "--out", str(out),
           "--workers", str(workers), "--ray-address", address, "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak = max(peak, p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    done.set()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"driver failed:\n{output}")
    return json.loads((out / "manifest.json").read_text()), wall, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--speedup-layers", type=int, default=16)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sinq-bench-"))
    port = 6390
    # --block in its own process group: stopping it ends this cluster alone, not every Ray on the machine.
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--num-cpus={args.cpus}", f"--port={port}",
                             "--include-dashboard=false", "--disable-usage-stats"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while subprocess.run([RAY, "status", "--address", address], env=ENV, capture_output=True).returncode:
        if time.time() > deadline:
            raise SystemExit("the Ray head did not come up")
        time.sleep(2)
    try:
        rows = {}
        for layers in sorted({4, 32, args.speedup_layers}):
            src = write_llama_checkpoint(work / f"src-{layers}", layers=layers, hidden=args.hidden,
                                         intermediate=args.intermediate, vocab=32000, shards=4)
            read = raw_read_gbps(src)
            for workers in (1, 2):
                if layers != args.speedup_layers and workers == 1:
                    continue
                manifest, wall, rss = run_driver(src, work / f"out-{layers}-{workers}", workers, address)
                gb = manifest["totals"]["source_bytes"] / 1e9
                rows[(layers, workers)] = (gb, wall, manifest["timings"]["quantize_s"], rss, read)
        print(f"\nhidden {args.hidden}, intermediate {args.intermediate}, vocab 32000, bf16; Ray head with {args.cpus} CPUs")
        print(f"{'layers':>6} {'workers':>7} {'source GB':>9} {'wall s':>7} {'GB/s':>6} {'raw read GB/s':>13} "
              f"{'quantize s (sum)':>16} {'driver peak RSS MB':>18}")
        for (layers, workers), (gb, wall, qs, rss, read) in sorted(rows.items()):
            print(f"{layers:>6} {workers:>7} {gb:>9.3f} {wall:>7.1f} {gb / wall:>6.3f} {read:>13.2f} {qs:>16.1f} {rss / 1e6:>18.1f}")
        rss4, rss32 = rows[(4, 2)][3], rows[(32, 2)][3]
        print(f"driver peak RSS, 32 vs 4 layers: {rss32 / rss4:.3f}x (goal: within 1.10x)")
        s = args.speedup_layers
        print(f"speed-up from 1 to 2 workers ({s} layers): {rows[(s, 1)][1] / rows[(s, 2)][1]:.2f}x (goal: 1.7x where cores allow)")
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


if __name__ == "__main__":
    main()
