"""Time sinq_ops.quantize against the reference (sinq==0.2.0) on Llama-70B weight shapes.

Both run on the same matrices in the same process: on the CPU always (row slices of the 70B
shapes unless --full), and on CUDA when a GPU is present (full shapes). Prints milliseconds
per shape, the speed ratio, and both reconstruction errors so equal output is visible.

    python bench/quantize_speed.py [--rows-div 8] [--full] [--repeats 2] [--bits 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("SINQ_AUTO_PATCH", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from matrices import llm_like  # noqa: E402
from oracle import reference_dequantize, reference_quantize  # noqa: E402

from pipeline.sources.synthetic import decoder_matrices  # noqa: E402
from sinq_ops import QuantConfig, quantize, relative_error  # noqa: E402

LLAMA_70B = decoder_matrices("llama-70b")  # (names, out_features, in_features, count in a layer)


def _timed(fn, device: str, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1000, out


def run(device: str, rows_div: int, repeats: int, cfg: QuantConfig) -> None:
    print(f"\n== {device}: {torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} threads'}"
          f", {cfg.bits}-bit g{cfg.group_size} {cfg.tiling} {cfg.method}/{cfg.aux}, rows / {rows_div}")
    print(f"{'tensor':14s} {'shape':>13s} {'ours ms':>9s} {'ref ms':>9s} {'ratio':>6s} {'err ours':>9s} {'err ref':>9s}")
    layer_ours = layer_ref = 0.0
    for name, n, k, count in LLAMA_70B:
        n = max(cfg.group_size, n // rows_div)
        w = llm_like(n, k, seed=n + k).half().to(device)
        t_ours, q = _timed(lambda w=w: quantize(w, **cfg.to_dict()), device, repeats)
        t_ref, (packed, meta) = _timed(lambda w=w: reference_quantize(w, cfg, device), device, repeats)
        err_ours = relative_error(w, q)
        ref = reference_dequantize(packed, meta).float()
        w32 = w.float()
        err_ref = float((w32 - ref).norm() / w32.norm())
        layer_ours += t_ours * count
        layer_ref += t_ref * count
        print(f"{name:14s} {f'{n}x{k}':>13s} {t_ours:9.1f} {t_ref:9.1f} {t_ref / t_ours:6.2f} {err_ours:9.5f} {err_ref:9.5f}")
        del w, q, packed, meta, ref
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"{'decoder layer':14s} {'':>13s} {layer_ours:9.1f} {layer_ref:9.1f} {layer_ref / layer_ours:6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows-div", type=int, default=8, help="CPU: divide each shape's rows by this (default 8)")
    ap.add_argument("--full", action="store_true", help="CPU: full 70B shapes (slow for the reference)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--tiling", default="1D")
    ap.add_argument("--method", default="sinq")
    ap.add_argument("--aux", default="int8")
    args = ap.parse_args()
    cfg = QuantConfig(bits=args.bits, group_size=args.group_size, tiling=args.tiling, method=args.method, aux=args.aux)
    run("cpu", 1 if args.full else args.rows_div, args.repeats, cfg)
    if torch.cuda.is_available():
        run("cuda", 1, args.repeats, cfg)


if __name__ == "__main__":
    main()
