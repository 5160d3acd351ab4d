"""What checking an output's content costs, against the quick start's wall time.

A rerun finds its existing output complete only once every file's sha256 matches the manifest,
and ``load_quantized`` checks the same by default. Both read every byte of the output once more.
This measures, on one machine in one run:

- the quick start: SmolLM2-135M-Instruct quantized to 4 bits on a local Ray (``jobs.quantize``,
  a whole process, start to exit);
- its rerun (a whole process that verifies the output and finds nothing to do);
- ``verify`` with every sha256 and with sizes only, in this process;
- ``load_quantized`` with and without the hash check, in this process;

each the median of ``--repeats`` runs, and gives the extra time of content checks as a share of
the quick start's wall time.

    python bench/verify_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", os.urandom(32).hex())
os.environ["SINQ_AUTO_PATCH"] = "0"


def _process(args: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jobs.quantize", *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"jobs.quantize {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return seconds, proc.stdout


def _median(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from jobs.demo_model import smollm2_checkpoint
    from jobs.quantize import CACHE
    from pipeline.io.storage import Location
    from pipeline.loader import load_quantized
    from pipeline.output.manifest import verify

    model = str(smollm2_checkpoint(ROOT / CACHE))
    with tempfile.TemporaryDirectory(prefix="sinq-verify-cost-") as tmp:
        demos, reruns = [], []
        for i in range(args.repeats):
            out = str(Path(tmp) / f"out-{i}")
            demos.append(_process(["--model", model, "--out", out])[0])
            seconds, text = _process(["--model", model, "--out", out])
            if "nothing to do" not in text:
                raise SystemExit(f"the rerun did not find its output complete: {text[-300:]}")
            reruns.append(seconds)
        out = str(Path(tmp) / "out-0")
        dest = Location(out)
        size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
        hashed = _median(lambda: verify(dest), args.repeats)
        sized = _median(lambda: verify(dest, hashes=False), args.repeats)
        load_hashed = _median(lambda: load_quantized(out), args.repeats)
        load_sized = _median(lambda: load_quantized(out, check_hashes=False), args.repeats)

    demo = statistics.median(demos)
    print(f"output                 {size / 1e6:.1f} MB (SmolLM2-135M-Instruct, 4-bit g64)")
    print(f"quick start            {demo:.2f} s wall (median of {args.repeats} processes)")
    print(f"rerun, nothing to do   {statistics.median(reruns):.2f} s wall, hashes included")
    print(f"verify                 {hashed:.3f} s with every sha256, {sized:.3f} s sizes only: "
          f"+{hashed - sized:.3f} s = {100 * (hashed - sized) / demo:.1f}% of the quick start")
    print(f"load_quantized         {load_hashed:.3f} s with the hash check, {load_sized:.3f} s without: "
          f"+{load_hashed - load_sized:.3f} s = {100 * (load_hashed - load_sized) / demo:.1f}% of the quick start")


if __name__ == "__main__":
    main()
