"""A mixture of experts through the whole job beside a dense model of about the same size.

Runs, on one local Ray with token authentication, three jobs from synthetic sources (nothing on
disk but the outputs): Qwen3-30B-A3B decoder layers at full width (128 experts of 2048 x 768),
the same with a worker memory small enough that every layer splits into units by groups of
experts, and Llama-8B-shaped dense layers of about the same total size. Prints per job: source
GB, units, wall seconds, GB/s, summed quantize seconds, the planned peak per CPU worker and the
workers' measured peak resident memory, and the MoE-to-dense ratios.

    python bench/moe.py [--moe-layers 2] [--dense-layers 6] [--workers 2] [--split-memory 1.2GB]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Token authentication, as a stock cluster runs; Ray reads these when it is imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", os.urandom(32).hex())
os.environ["SINQ_AUTO_PATCH"] = "0"

import ray  # noqa: E402

from pipeline.job.options import JobOptions  # noqa: E402
from pipeline.job.plan import make_plan  # noqa: E402
from pipeline.job.run import run_job  # noqa: E402
from pipeline.job.settings import parse_size  # noqa: E402
from pipeline.sources import open_source  # noqa: E402


def run(spec: str, out: Path, workers: int, worker_memory: int | None) -> dict:
    settings = {"model": spec, "out": str(out), "workers": workers, "method": "sinq"}
    if worker_memory is not None:
        settings["worker_memory"] = worker_memory
    opts = JobOptions.from_settings(settings)
    plan = make_plan(open_source(spec), opts.quant, worker_memory=opts.worker_memory)
    t0 = time.perf_counter()
    manifest = run_job(opts, log=lambda _: None)
    wall = time.perf_counter() - t0
    return {
        "spec": spec, "gb": manifest["totals"]["source_bytes"] / 1e9, "units": manifest["totals"]["units"],
        "split": sum(1 for u in plan.units if "(experts" in u.name), "wall": wall,
        "quantize": manifest["timings"]["quantize_s"], "planned": plan.worker_memory_bytes() / 1e9,
        "rss": max(u["peak_rss_bytes"] for u in manifest["units"]) / 1e9,
        "share": manifest["structure"]["quantized_share"], "error": manifest["totals"]["mean_rel_error"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moe-layers", type=int, default=2)
    ap.add_argument("--dense-layers", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--split-memory", type=parse_size, default=parse_size("1.2GB"))
    args = ap.parse_args()

    ray.init(address="local", num_cpus=args.workers, include_dashboard=False)
    work = Path(tempfile.mkdtemp(prefix="sinq-bench-moe-"))
    moe = f"synthetic://qwen3-30b-a3b?layers={args.moe_layers}"
    dense = f"synthetic://llama-8b?layers={args.dense_layers}"
    try:
        rows = {
            "moe": run(moe, work / "moe", args.workers, None),
            "moe split": run(moe, work / "moe-split", args.workers, args.split_memory),
            "dense": run(dense, work / "dense", args.workers, None),
        }
    finally:
        ray.shutdown()
    print(f"\n{args.workers} CPU workers, sinq 4-bit g64 1D; split run with --worker-memory {args.split_memory / 1e9:.2f} GB")
    print(f"{'job':10s} {'source':38s} {'GB':>6} {'units':>5} {'split':>5} {'wall s':>7} {'GB/s':>6} "
          f"{'quant s':>7} {'plan GB':>7} {'RSS GB':>6} {'share':>6} {'error':>7}")
    for name, r in rows.items():
        print(f"{name:10s} {r['spec']:38s} {r['gb']:>6.2f} {r['units']:>5} {r['split']:>5} {r['wall']:>7.1f} "
              f"{r['gb'] / r['wall']:>6.3f} {r['quantize']:>7.1f} {r['planned']:>7.2f} {r['rss']:>6.2f} "
              f"{r['share']:>6.3f} {r['error']:>7.4f}")
    m, s, d = rows["moe"], rows["moe split"], rows["dense"]
    print(f"GB/s, MoE vs dense: {m['gb'] / m['wall'] / (d['gb'] / d['wall']):.2f}x; "
          f"split vs whole layers: {s['gb'] / s['wall'] / (m['gb'] / m['wall']):.2f}x")
    print(f"worker peak RSS, split vs whole layers: {s['rss'] / m['rss']:.2f}x "
          f"(planned {s['planned'] / m['planned']:.2f}x)")


if __name__ == "__main__":
    main()
