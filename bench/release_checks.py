"""What planning by transformers' own conversions and the commit check's forward pass cost.

Runs, in one go on one machine, the same two commands with this tree and with a baseline revision
(checked out into a temporary git worktree, default the last revision before either existed):

- the dry run of ``synthetic://deepseek-v3`` (61 layers of 256 experts: the planner's worst case);
- the quick start: SmolLM2-135M-Instruct quantized to 4 bits on a local Ray (``jobs.quantize``).

Each is timed as a whole process (start to exit), the median of ``--repeats`` runs alternating
between the two trees, and the extra seconds are given as a share of the baseline's. Then, in this process and with this tree, the two
new stages on their own: grouping the checkpoint's tensors by transformers' conversions (its
operations run on meta tensors) and the commit check (output tensors against the model, and the
forward pass on fake tensors).

    python bench/release_checks.py [--baseline REV] [--repeats 5]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BASELINE = "681f88c"  # the last revision before conversions by transformers' operations and the forward check
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", os.urandom(32).hex())
os.environ["SINQ_AUTO_PATCH"] = "0"


def _timed(tree: Path, args: list[str], out: Path | None) -> float:
    cmd = [sys.executable, "-m", "jobs.quantize", *args] + (["--out", str(out)] if out else [])
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return seconds


def _medians(trees: tuple[Path, Path], args: list[str], repeats: int, scratch: Path) -> tuple[float, float]:
    """The median wall time of ``args`` with each tree, their runs alternating so that the machine's
    drift over the minutes weighs on both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats):
        for side, tree in enumerate(trees):
            out = scratch / f"{side}-{i}" if "--dry-run" not in args else None
            times[side].append(_timed(tree, args, out))
    return statistics.median(times[0]), statistics.median(times[1])


def _stages(spec: str) -> tuple[float, float, float]:
    """Plan seconds, of which the conversion grouping, and the commit check's seconds, in this process."""
    from pipeline.job import mapping
    from pipeline.job.plan import make_plan
    from pipeline.job.reduce import check_plan
    from pipeline.sources import open_source
    from sinq_ops import QuantConfig

    spent = [0.0]
    real = mapping.source_groups

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    mapping.source_groups = timed
    import pipeline.job.plan as plan_module

    plan_module.source_groups = timed
    try:
        source = open_source(spec)
        t0 = time.perf_counter()
        plan = make_plan(source, QuantConfig())
        planned = time.perf_counter() - t0
        t0 = time.perf_counter()
        check_plan(plan)
        checked = time.perf_counter() - t0
    finally:
        plan_module.source_groups = real
        mapping.source_groups = real
    return planned, spent[0], checked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from jobs.demo_model import smollm2_checkpoint

    smollm2 = str(smollm2_checkpoint(ROOT / ".cache"))
    with tempfile.TemporaryDirectory(prefix="sinq-bench-") as tmp:
        scratch = Path(tmp)
        before = scratch / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            rows = []
            for label, job in (("dry run, synthetic://deepseek-v3", ["--model", "synthetic://deepseek-v3", "--dry-run"]),
                               ("quick start, SmolLM2-135M 4-bit (local Ray)", ["--model", smollm2, "--workers", "2"])):
                base, now = _medians((before, ROOT), job, args.repeats, scratch)
                rows.append((label, base, now))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)

    print(f"baseline {args.baseline}, median of {args.repeats} process runs each, alternating\n")
    print("| command | baseline s | now s | added s | added % |")
    print("|---|---|---|---|---|")
    for label, base, now in rows:
        print(f"| {label} | {base:.2f} | {now:.2f} | {now - base:+.2f} | {100 * (now - base) / base:+.1f}% |")
    print("\nthe new stages alone, this tree, in one process:\n")
    print("| model | plan s | of which conversion grouping s | commit check s |")
    print("|---|---|---|---|")
    for spec in ("synthetic://deepseek-v3", smollm2):
        planned, grouping, checked = _stages(spec)
        name = spec if spec.startswith("synthetic") else "SmolLM2-135M-Instruct"
        print(f"| {name} | {planned:.2f} | {grouping:.2f} | {checked:.2f} |")


if __name__ == "__main__":
    main()
