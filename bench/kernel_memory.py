"""Peak memory the quantize paths allocate, per byte of the weight's fp16 size, measured on the CPU.

Every tensor the Triton path allocates is a device allocation on a GPU; here the kernels run
under Triton's interpreter (TRITON_INTERPRET=1), so the torch profiler's allocation records give
the same figure without a GPU. Values the kernels hold in registers are not allocations on
either. Each figure is taken in a fresh process, so nothing freed during the measurement was
allocated before it. Then the worker's error check (``relative_error``) on a larger matrix.

    python bench/kernel_memory.py [--rows 1024] [--cols 2048] [--error-size 8192]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from matrices import llm_like  # noqa: E402
from sinq_ops import QuantConfig, quantize, relative_error  # noqa: E402

CONFIGS = [QuantConfig(bits=4), QuantConfig(bits=3, group_size=128), QuantConfig(bits=4, tiling="2D"),
           QuantConfig(bits=4, method="nf4")]


def peak_allocated(fn) -> int:
    """Highest running total of the allocations recorded while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return peak


def measure(rows: int, cols: int, cfg: QuantConfig | None, dtype: torch.dtype, backend: str) -> int:
    w = llm_like(rows, cols, seed=1).to(dtype)
    if cfg is None:
        q = quantize(w, backend="torch")
        return peak_allocated(lambda: relative_error(w, q))
    return peak_allocated(lambda: quantize(w, **cfg.to_dict(), backend=backend))


def isolated(*args) -> int:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--error-size", type=int, default=8192)
    args = ap.parse_args()
    fp16_bytes = args.rows * args.cols * 2
    print(f"{args.rows}x{args.cols}; peak allocations / fp16 size of the weight")
    print(f"{'setting':22s} {'input':>8s} {'torch':>7s} {'triton':>7s}")
    for cfg in CONFIGS:
        for dtype in (torch.float16, torch.bfloat16):
            ours, fast = (isolated(args.rows, args.cols, cfg, dtype, b) / fp16_bytes for b in ("torch", "triton"))
            name = f"{cfg.method} {cfg.bits}-bit g{cfg.group_size} {cfg.tiling}"
            print(f"{name:22s} {str(dtype).split('.')[-1]:>8s} {ours:7.2f} {fast:7.2f}", flush=True)
    n = args.error_size
    peak = isolated(n, n, None, torch.float16, "torch")
    print(f"\nrelative_error on {n}x{n} fp16: peak {peak / 2**20:.0f} MB = {peak / (n * n * 2):.2f} x the fp16 size")


if __name__ == "__main__":
    main()
