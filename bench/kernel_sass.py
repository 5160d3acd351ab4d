"""How many instructions the Triton kernels issue per byte of weight on an H100, read from the sm_90
machine code Triton's compiler builds here, with no GPU.

A streaming kernel can only reach the memory bandwidth if the SMs can issue its instructions that
fast: per kernel, the instructions in its hot loop (warp instructions, times the program's warps)
per byte of weight one trip reads, the registers per thread, the ceiling that the issue rate sets
on its throughput (132 SMs, 4 schedulers each issuing one warp instruction a cycle), and the share
of all issue slots it needs to stream at the HBM bandwidth. Then a bound for one Llama-70B decoder
layer: the statistics pass, every Sinkhorn pass (all tiles running all steps) and the quantize
pass, each at the lower of the two ceilings. These are ceilings, not timings: stalls, launches and
the row-state traffic come on top.

    python bench/kernel_sass.py [--clock-ghz 1.98] [--hbm-tbs 3.35]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import triton  # noqa: E402

from pipeline.sources.synthetic import decoder_matrices  # noqa: E402
from sinq_ops.config import SINKHORN_ITERS  # noqa: E402
from sm90 import LLAMA_70B_BUILDS, compile_for_h100, hot_loop, machine_code  # noqa: E402

SMS, SCHEDULERS = 132, 4  # H100 SXM
BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
LAYER_ELEMENTS = sum(n * k * count for _, n, k, count in decoder_matrices("llama-70b"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock (the H100 SXM's boost clock)")
    ap.add_argument("--hbm-tbs", type=float, default=3.35, help="memory bandwidth, TB/s (H100 SXM, HBM3)")
    args = ap.parse_args()
    issue = SMS * SCHEDULERS * args.clock_ghz * 1e9  # warp instructions a second
    print(f"sm_90, Triton {triton.__version__}; {SMS} SMs x {SCHEDULERS} schedulers at {args.clock_ghz} GHz, "
          f"HBM {args.hbm_tbs} TB/s")
    print(f"{'kernel':32s} {'warps':>5s} {'regs':>4s} {'spill B':>7s} {'loop':>5s} {'bytes':>6s} "
          f"{'w.instr/KB':>10s} {'ceiling TB/s':>12s} {'issue share at HBM':>18s}")
    ceiling = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in LLAMA_70B_BUILDS.items():
            code = machine_code(compile_for_h100(build), Path(tmp))
            loop = hot_loop(code.instructions)
            nbytes = build.weight_elements * BYTES[build.dtype]
            row = f"{name:32s} {build.num_warps:>5d} {code.registers:>4d} {code.spilled_bytes:>7d} {len(loop):>5d}"
            if not nbytes:
                print(f"{row} {'-':>6s}")
                continue
            per_byte = len(loop) * build.num_warps / nbytes
            ceiling[name] = issue / per_byte / 1e12
            print(f"{row} {nbytes:>6d} {per_byte * 1024:>10.0f} {ceiling[name]:>12.2f} "
                  f"{args.hbm_tbs / ceiling[name]:>17.0%}")

    def ms(kernel: str) -> float:
        return LAYER_ELEMENTS * 2 / (min(args.hbm_tbs, ceiling[kernel]) * 1e12) * 1e3

    passes = SINKHORN_ITERS + 1
    stats, sinkhorn, pack = ms("statistics, fp16"), passes * ms("sinkhorn rows, g64 fp16"), ms("quantize, 4-bit g64")
    floor = LAYER_ELEMENTS * 2 * (passes + 2) / (args.hbm_tbs * 1e12) * 1e3
    print(f"\nLlama-70B decoder layer, fp16, 4-bit g64 1D: statistics {stats:.2f} + Sinkhorn {passes} x "
          f"{sinkhorn / passes:.2f} + quantize {pack:.2f} = {stats + sinkhorn + pack:.2f} ms "
          f"(the same {passes + 2} reads at HBM bandwidth: {floor:.2f} ms; goal 20 ms)")


if __name__ == "__main__":
    main()
