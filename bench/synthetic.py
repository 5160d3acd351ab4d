"""How fast a worker generates synthetic://llama-70b weights: GB/s for whole decoder layers.

A synthetic job stands in for reading a checkpoint, so generation should run at least at the
rate a worker reads from disk or object storage.

    python bench/synthetic.py [--layers 2] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.sources import open_source  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = open_source(f"synthetic://llama-70b?layers={args.layers}")
    print(f"synthetic://llama-70b, bf16, {args.threads} threads")
    print(f"{'layer':>5} {'GB':>6} {'s':>6} {'GB/s':>6}")
    for i in range(args.layers):
        name = f"layer-{i:05d}"
        t0 = time.perf_counter()
        size = sum(src.read_tensor(name, info).nbytes for info in src.header(name).values())
        dt = time.perf_counter() - t0
        print(f"{i:>5} {size / 1e9:>6.3f} {dt:>6.2f} {size / 1e9 / dt:>6.2f}")


if __name__ == "__main__":
    main()
